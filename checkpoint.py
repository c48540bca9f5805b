"""A train.py run's checkpoint: what training changed (LoRA, heads, gate), the optimizer, the run's
state and flags, the SHA-256 of the backbone's weights and the number of processes; and the checks
that load it, on --resume, --eval-only or in a script, only into the model it was trained as.
"""
import argparse
import functools
import hashlib
import os
import pickle
import zipfile

import torch

# what a checkpoint must agree with on --resume (all) and --eval-only (what makes the model)
# (besides the backbone's weights, compared by content, and the levels, however spelled)
MODEL_FLAGS = ("data", "model", "method", "fusion", "lora_rank", "img_size", "imbalance_ratio")
SCHEDULE_FLAGS = ("epochs", "batch_size", "lr", "augment", "seed")


class CheckpointError(Exception):
    """A checkpoint that cannot be used as asked: one line, exit status 2."""


def trainable_state(model):
    """What training changes, and the heads' scale, fitted at step 0."""
    learned = [(k, v) for k, v in model.named_parameters() if v.requires_grad]
    scales = [(k, v) for k, v in model.named_buffers() if k.endswith(".scale")]
    return {k: v.detach().cpu().clone() for k, v in learned + scales}


def save_atomically(checkpoint, path):  # a run killed mid-write keeps its last checkpoint
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load(path, classes=None):
    """The checkpoint at path, read without pickled code; `classes`: those it must have."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as error:
        raise CheckpointError(f"cannot read checkpoint {path} ({type(error).__name__}): expected "
                              "a complete checkpoint.pt written by train.py; it may be "
                              "truncated") from None
    if classes is not None and checkpoint["classes"] != classes:
        raise CheckpointError(f"checkpoint {path} was trained on {len(checkpoint['classes'])} "
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


def level_blocks(args, depth):
    """The blocks (1..N) a run's model reads, however --blocks spelled them."""
    asked = {"scilt": getattr(args, "blocks", None) or [-2, -1], "final": [-1],
             "penultimate": [-2]}[args.method]
    return sorted({b if b > 0 else depth + 1 + b for b in asked})


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
    was, asked, depth = dict(checkpoint["args"]), vars(args).copy(), len(model.backbone.blocks)
    differ = [flag for flag in flags if was.get(flag) != asked.get(flag)]
    was["blocks"] = level_blocks(argparse.Namespace(**was), depth)
    asked["blocks"] = level_blocks(args, depth)
    if not differ and was["blocks"] != asked["blocks"]:
        differ = ["blocks"]
    if differ:
        raise CheckpointError(f"checkpoint {path} was trained with {flag_values(was, differ)}, "
                              f"but this run asks for {flag_values(asked, differ)}: pass the "
                              "flags it was trained with, or another --out")
    trained_on = checkpoint.get("weights_sha256")
    if "weights_sha256" in checkpoint and trained_on != weights_sha256:
        raise CheckpointError(f"checkpoint {path} was trained on backbone weights with SHA-256 "
                              f"{str(trained_on)[:12]}, but this run loads "
                              f"{args.weights or args.model} ({str(weights_sha256)[:12]}): pass "
                              "the weights it was trained on, or another --out")
    trained_by = checkpoint.get("world_size", processes)
    if not args.eval_only and trained_by != processes:
        raise CheckpointError(f"checkpoint {path} was trained by {trained_by} process(es), but "
                              f"this run has {processes}: the steps per epoch, and so the "
                              f"schedule, would change; resume it with torchrun "
                              f"--nproc_per_node={trained_by}")
    state = checkpoint["model"]
    if kept and checkpoint["state"]["best"] is not None:
        state = checkpoint["state"]["best"]
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise CheckpointError(f"checkpoint {path} holds {', '.join(unexpected[:3])}, which this "
                              "model lacks: it was written by another version of train.py; train "
                              "it again into another --out")
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
