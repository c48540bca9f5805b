"""A run's model and files: the SciLT model its flags describe (the backbone and its weights,
which must fit), the folder it writes into (locked while it does), every file written whole or
not at all, and the checkpoint: what training changed (LoRA, heads, gate), the optimizer, the
run's state and flags, the SHA-256 of the backbone's weights and the number of processes, with the
checks that load it, on --resume, --eval-only or in a script, only into the model it was trained
as. train.py and the scripts build what they use here.
"""
import contextlib
import functools
import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import timm
import torch

import scilt

try:
    import fcntl  # to lock a run's folder while it writes
except ImportError:  # Windows: no lock
    fcntl = None

# The embedded default's backbone: a 6-block ViT on 32 x 32 images (8 x 8 patches of 4 px). Its
# weights, tiny_vit.safetensors, are a stand-in foundation model (scripts/pretrain_tiny.py):
# pretrained on 14 synthetic cell types that the benchmark's 10 classes are not among.
# --weights fractal_vit.safetensors gives one pretrained across a domain gap, on fractals.
TINY = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=6,
            num_heads=3, weight_init="jax")
TINY_WEIGHTS = Path(__file__).resolve().parent / "tiny_vit.safetensors"
WEIGHT_PREFIXES = ("module.", "model.", "backbone.")  # DDP's, other trainers', scripts/export.py's
# what a checkpoint must agree with on --resume (all) and --eval-only (what makes the model)
# (besides the backbone's weights, compared by content, and the levels, however spelled)
MODEL_FLAGS = ("data", "model", "method", "fusion", "lora_rank", "img_size", "imbalance_ratio")
SCHEDULE_FLAGS = ("epochs", "batch_size", "lr", "augment", "seed")
KEYS = {"state", "model", "classes", "class_counts", "optimizer", "args", "weights_sha256",
        "world_size", "levels"}  # what train.py saves
STATE_KEYS = {"epoch", "best_epoch", "best_val", "best", "train_seconds", "bars"}
ARGS = {*MODEL_FLAGS, *SCHEDULE_FLAGS, "weights"}


class Abort(Exception):
    """A problem with the user's input or files (flags, a model, weights, a run's folder or
    checkpoint): one line, exit status 2."""


# --------------------------------------------------------------------------------------------------
# The model a run's flags describe.

def normalisation(model):
    """The mean and std the backbone was pretrained with (timm's config), for every image."""
    try:
        config = timm.models.get_pretrained_cfg(TINY["name"] if model == "tiny" else model)
    except RuntimeError as error:  # a tag timm does not have: vit_base_patch16_224.nosuchtag
        architecture = model.split(".")[0]
        raise Abort(f"--model {model}: {error} Expected one of "
                    f"timm.list_pretrained('{architecture}*')") from None
    return tuple(getattr(config, "mean", (0.5,) * 3)), tuple(getattr(config, "std", (0.5,) * 3))


def load_backbone(args):
    """The backbone the flags name, pretrained: from timm's hub, or from --weights (a .safetensors
    or .pth state dict, loaded as timm loads the hub's: head dropped, position embeddings resized
    to --img-size). One line (Abort) if it cannot be had."""
    name, weights, kwargs = args.model, args.weights, dict(img_size=args.img_size)
    if name == "tiny":  # its pretrained weights ship with this repository
        name, weights = TINY["name"], weights or TINY_WEIGHTS
        kwargs.update((k, v) for k, v in TINY.items() if k not in ("name", "img_size"))
    if not timm.is_model(name):
        raise Abort(f"unknown model {name!r}: expected 'tiny' or a timm ViT name such as "
                    "vit_base_patch16_224.augreg_in21k (see timm.list_models('vit_*'))")
    if weights is not None and not os.path.isfile(weights):
        raise Abort(f"weights file {weights} not found: expected a .safetensors or .pth file")
    names = weight_names(weights) if weights is not None else None
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
    try:
        backbone = scilt.create_backbone(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        if "is not a ViT" in reason:
            raise Abort(reason) from None
        if weights is not None:
            raise Abort(f"could not load weights file {weights} into {name}: {reason}") from None
        raise Abort(f"could not fetch pretrained weights for {name} ({reason}): without internet, "
                    "download them where there is and pass --weights FILE") from None
    if names is not None:
        check_weights_fit(weights, names, backbone, name)
    return backbone


def weight_names(path):
    """The tensor names of a .safetensors or .pth state dict (None for another format, which timm
    checks itself), read without running pickled code."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(str(path), "pt") as file:
                return list(file.keys())
        if not str(path).endswith((".pth", ".pt", ".bin")):
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors' own error, pickle's, zip's, a file too short ...
        raise Abort(f"cannot read weights file {path} ({type(error).__name__}): expected a "
                    "state dict saved by safetensors or torch.save") from None
    for key in ("state_dict", "model"):  # a training checkpoint that holds one, as timm reads
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return list(state) if isinstance(state, dict) else []


def check_weights_fit(path, names, backbone, name):
    """timm loads a weights file leniently, as the backbone is built without its classifier: a
    file whose names differ would load nothing, and a random backbone would train. Stop, naming
    how many fit, unless the file holds every tensor of the backbone."""
    given = {n.removeprefix("module.") for n in names}  # timm strips DDP's prefix itself
    expected = set(backbone.state_dict())
    missing = sorted(expected - given)
    if not missing:
        return
    prefix = next((p for p in WEIGHT_PREFIXES[1:] if any(n.startswith(p) for n in names)), None)
    hint = (f"; its names start with {prefix!r} (scripts/export.py writes 'backbone.'): save the "
            "backbone's own state dict, without the prefix" if prefix else "")
    example = sorted(names)[0] if names else "nothing"
    raise Abort(f"weights file {path} holds {len(expected) - len(missing)} of the "
                f"{len(expected)} tensors of {name} (the model has {missing[0]}, the file "
                f"{example}){hint}: expected a timm state dict of that model")


def weights_file(args):  # the backbone's weights file; None: timm's hub
    return args.weights or (TINY_WEIGHTS if args.model == "tiny" else None)


def count_parameters(model):  # (trainable, all)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def build_model(args, class_counts):
    """SciLT on the backbone the flags name; --blocks counts 1..N (or -1 = N back)."""
    backbone = load_backbone(args)
    depth = len(backbone.blocks)
    if not all(1 <= abs(b) <= depth for b in args.blocks):
        raise Abort(f"--blocks {' '.join(map(str, args.blocks))}: {args.model} has {depth} blocks, "
                    f"expected numbers in 1..{depth} or -{depth}..-1")
    blocks = [b - 1 if b > 0 else b for b in args.blocks]  # to the library's 0-based indices
    return scilt.SciLT(backbone, class_counts, method=args.method, fusion=args.fusion,
                       blocks=blocks, rank=args.lora_rank)


# --------------------------------------------------------------------------------------------------
# The run's folder and its files.

@contextlib.contextmanager
def claim(out, continuing):
    """The run's folder, made if new and locked while this process writes into it, so that a second
    run into it stops here; a new run starts only in a new or empty folder, so that nothing the
    folder holds is overwritten."""
    if out.exists() and not out.is_dir():
        raise Abort(f"--out {out} is a file: expected a folder for the run")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    folder = os.open(out, os.O_RDONLY) if fcntl else None  # Windows opens no folder
    try:
        if folder is not None:  # the lock goes with the process, however it ends
            try:
                fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Abort(f"another run is writing into {out}: wait for it to end, or choose "
                            "another --out") from None
        held = sorted(path.name for path in out.iterdir())
        if held and not continuing:
            raise Abort(f"{out} already holds {', '.join(held[:4])}{', ...' * (len(held) > 4)}: "
                        "a new run starts in a new or empty folder; pass --resume or --eval-only "
                        "for the run there, or choose another --out")
        yield
    finally:
        if folder is not None:
            os.close(folder)
        if created and not any(out.iterdir()):  # a run that wrote nothing leaves no folder
            out.rmdir()


@contextlib.contextmanager
def replacing(path):
    """A temporary path beside `path` to write to, which then replaces `path` whole: a process
    killed, or a disk filled, midway leaves the file as it was and no temporary file behind."""
    temporary = Path(f"{path}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# The checkpoint.

def trainable_state(model):
    """What training changes, and the heads' scale, fitted at step 0."""
    learned = [(k, v) for k, v in model.named_parameters() if v.requires_grad]
    scales = [(k, v) for k, v in model.named_buffers() if k.endswith(".scale")]
    return {k: v.detach().cpu().clone() for k, v in learned + scales}


def save_atomically(checkpoint, path):  # a run killed mid-write keeps its last checkpoint
    with replacing(path) as temporary:
        torch.save(checkpoint, temporary)


def load(path, classes=None):
    """The checkpoint at path, read without pickled code; `classes`: those it must have."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as error:
        pickled = "Weights only load failed" in str(error)
        why = "it holds pickled objects, which are never run" if pickled else "it may be truncated"
        raise Abort(f"cannot read checkpoint {path} ({type(error).__name__}): expected "
                    f"a complete checkpoint.pt written by train.py; {why}") from None
    ours = isinstance(checkpoint, dict) and KEYS <= set(checkpoint) and \
        isinstance(checkpoint["state"], dict) and STATE_KEYS <= set(checkpoint["state"]) and \
        isinstance(checkpoint["args"], dict) and ARGS <= set(checkpoint["args"])
    if not ours:
        raise Abort(f"{path} is not a checkpoint written by train.py: expected a dict "
                    f"of {', '.join(sorted(KEYS))}")
    if classes is not None and checkpoint["classes"] != classes:
        raise Abort(f"checkpoint {path} was trained on {len(checkpoint['classes'])} "
                    f"classes ({', '.join(checkpoint['classes'][:4])}, ...), but this "
                    f"data set has {len(classes)}")
    return checkpoint


@functools.lru_cache
def sha256(path):
    """The SHA-256 of a backbone's weights file (None for none: timm's hub): a run is resumed,
    re-evaluated or used only on the very weights it was trained on, wherever they lie."""
    if path is None or not os.path.isfile(path):
        return None
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def saved_levels(model):  # the blocks a model reads, 1..N, as a checkpoint keeps them
    return [b + 1 for b in model.blocks]


def flag_values(values, flags):
    """--flag value ... of these flags, as a user types them."""
    def shown(value):
        return " ".join(map(str, value)) if isinstance(value, list) else value
    return " ".join(f"--{flag.replace('_', '-')} {shown(values.get(flag))}" for flag in flags)


def restore(model, checkpoint, path, args, weights_sha256, processes=1, optimizer=None,
            kept=False):
    """What training changed (of the last epoch, or of the one the run kept) into a model built
    from this run's flags, and the optimizer's state, once the flags are found to be those it was
    trained with: what makes the model (the backbone's weights by content, the levels however
    spelled), and on --resume what shapes the schedule (the number of processes too)."""
    flags = MODEL_FLAGS + (() if args.eval_only else SCHEDULE_FLAGS)
    was, asked = dict(checkpoint["args"]), vars(args).copy()
    differ = [flag for flag in flags if was.get(flag) != asked.get(flag)]
    # the levels as the models read them, blocks 1..N, however --blocks spelled them
    was["blocks"], asked["blocks"] = checkpoint["levels"], saved_levels(model)
    if not differ and was["blocks"] != asked["blocks"]:
        differ = ["blocks"]
    if differ:
        raise Abort(f"checkpoint {path} was trained with {flag_values(was, differ)}, "
                    f"but this run asks for {flag_values(asked, differ)}: pass the "
                    "flags it was trained with, or another --out")
    trained_on = checkpoint["weights_sha256"]
    if trained_on != weights_sha256:
        raise Abort(f"checkpoint {path} was trained on backbone weights with SHA-256 "
                    f"{str(trained_on)[:12]}, but this run loads "
                    f"{args.weights or args.model} ({str(weights_sha256)[:12]}): pass "
                    "the weights it was trained on, or another --out")
    trained_by = checkpoint["world_size"]
    if not args.eval_only and trained_by != processes:
        raise Abort(f"checkpoint {path} was trained by {trained_by} process(es), but "
                    f"this run has {processes}: the steps per epoch, and so the "
                    f"schedule, would change; resume it with torchrun "
                    f"--nproc_per_node={trained_by}")
    state = checkpoint["model"]
    if kept and checkpoint["state"]["best"] is not None:
        state = checkpoint["state"]["best"]
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise Abort(f"checkpoint {path} holds {', '.join(unexpected[:3])}, which this "
                    "model lacks: it was written by another version of train.py; train "
                    "it again into another --out")
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
