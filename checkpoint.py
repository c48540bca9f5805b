"""A train.py run's checkpoint: what training changed (LoRA, heads, gate), the optimizer, the run's
state and flags, the SHA-256 of the backbone's weights and the number of processes; and the checks
that load it, on --resume, --eval-only or in a script, only into the model it was trained as.
Every file a run or a script writes is written as the checkpoint is: whole or not at all.
"""
import argparse
import contextlib
import functools
import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import torch

# what a checkpoint must agree with on --resume (all) and --eval-only (what makes the model)
# (besides the backbone's weights, compared by content, and the levels, however spelled)
MODEL_FLAGS = ("data", "model", "method", "fusion", "lora_rank", "img_size", "imbalance_ratio")
SCHEDULE_FLAGS = ("epochs", "batch_size", "lr", "augment", "seed")


KEYS = {"state", "model", "classes", "class_counts", "optimizer", "args", "weights_sha256",
        "world_size"}  # what train.py saves
STATE_KEYS = {"epoch", "best_epoch", "best_val", "best", "train_seconds", "before"}
ARGS = {*MODEL_FLAGS, *SCHEDULE_FLAGS, "blocks", "weights"}


class CheckpointError(Exception):
    """A checkpoint that cannot be used as asked: one line, exit status 2."""


def trainable_state(model):
    """What training changes, and the heads' scale, fitted at step 0."""
    learned = [(k, v) for k, v in model.named_parameters() if v.requires_grad]
    scales = [(k, v) for k, v in model.named_buffers() if k.endswith(".scale")]
    return {k: v.detach().cpu().clone() for k, v in learned + scales}


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
        raise CheckpointError(f"cannot read checkpoint {path} ({type(error).__name__}): expected "
                              f"a complete checkpoint.pt written by train.py; {why}") from None
    ours = isinstance(checkpoint, dict) and KEYS <= set(checkpoint) and \
        isinstance(checkpoint["state"], dict) and STATE_KEYS <= set(checkpoint["state"]) and \
        isinstance(checkpoint["args"], dict) and ARGS <= set(checkpoint["args"])
    if not ours:
        raise CheckpointError(f"{path} is not a checkpoint written by train.py: expected a dict "
                              f"of {', '.join(sorted(KEYS))}")
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
    asked = {"scilt": args.blocks, "final": [-1], "penultimate": [-2]}[args.method]
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
    trained_on = checkpoint["weights_sha256"]
    if trained_on != weights_sha256:
        raise CheckpointError(f"checkpoint {path} was trained on backbone weights with SHA-256 "
                              f"{str(trained_on)[:12]}, but this run loads "
                              f"{args.weights or args.model} ({str(weights_sha256)[:12]}): pass "
                              "the weights it was trained on, or another --out")
    trained_by = checkpoint["world_size"]
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
