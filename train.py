"""Train and evaluate SciLT on a long-tailed scientific image data set.

    python train.py                                # the embedded default: synthetic cells, tiny ViT
    python train.py --data isic --epochs 20        # ISIC 2019 (into data/isic2019 if missing)
    python train.py --data isic --weights vit_b16.safetensors      # backbone weights from a file
    python train.py --data folder --data-root DIR  # your images: DIR/train/<class>/*, DIR/test/...
    torchrun --nproc_per_node=4 train.py --data nih                # one process per GPU
    python train.py --out runs/x --resume          # continue run x; --eval-only re-evaluates it

Writes to --out: metrics.json, history.csv and report.png (report.py), checkpoint.pt (checkpoint.py:
LoRA, heads, gate, optimizer and arguments, not the frozen backbone) and splits.csv (the exact
train / val / test images). scripts/predict.py and scripts/export.py use a finished run.
To read one run: scilt.py (the method), then this file top to bottom (the settings, the flags, the
loop, run()), stepping into checkpoint.py for the model and the run's files, data.py for the sets
and report.py for step 0 and the report.
"""
import argparse
import contextlib
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Subset

import checkpoint
import report
import scilt
from checkpoint import Abort, build_model, claim, count_parameters, normalisation, weights_file
from data import AUGMENTS, DataError, Loader, load_data, write_splits

# --------------------------------------------------------------------------------------------------
# Settings: what flags left out become, and the recipe's constants, all in one place.

NATURAL = ("cifar100-lt", "imagenet-lt", "places-lt", "inat2018")  # natural-image long-tail sets
DEFAULT_MODEL = {"synthetic": "tiny", "scientific": "vit_base_patch16_224.augreg_in21k",
                 "natural": "vit_base_patch16_clip_224.openai"}  # CLIP ViT-B/16, as LIFT's numbers
DEFAULTS = {  # what flags left out become: the tiny ViT on a CPU, a timm ViT on a GPU
    "tiny": dict(epochs=20, batch_size=64, lr=3e-3, img_size=32),
    "vit": dict(epochs=20, batch_size=64, lr=1e-3, img_size=224),
    "natural": dict(epochs=10, batch_size=128, lr=1e-3, img_size=224),  # LIFT: 10 of batch 128
}
WARMUP_FRACTION = 0.05   # of all steps: linear warm-up, then cosine decay to 0
MIN_VAL_PER_CLASS = 10   # a run keeps its val-best epoch where val has this many images of every
                         # class, else its last (lr 0 there), as a few images a class pick noise
TIMEOUT = timedelta(minutes=30)  # under torchrun, how long a process waits for the others


USER_ERRORS = (Abort, DataError)  # each: one line, exit status 2


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def default_help(key):  # --help's words for what a flag left out becomes, per kind of model
    kinds = {"tiny": "with --model tiny", "vit": "with a timm ViT", "natural": "on natural sets"}
    return "default " + ", ".join(f"{DEFAULTS[k][key]:g} {words}" for k, words in kinds.items())


def parse_args(argv=None, job=None):
    """train.py's flags, with what a flag left out becomes; --out defaults to
    runs/<data>-<job>-<time>, the job the --method unless named (scripts/analyze.py: analysis)."""
    p = Parser(description="SciLT: long-tailed classification by PEFT of a ViT, fusing its "
                           "penultimate and final layers.")
    p.add_argument("--data", default="synthetic",
                   choices=["synthetic", "isic", "nih", "blood", "npz", "folder", *NATURAL])
    p.add_argument("--data-root", help="the set's folder or .npz file; default data/<set>")
    p.add_argument("--no-download", action="store_true", help="fail if the data are not there")
    p.add_argument("--epochs", type=int, help=default_help("epochs") + " (20 on inat2018)")
    p.add_argument("--batch-size", type=int, help="per process; " + default_help("batch_size"))
    p.add_argument("--lr", type=float, help="AdamW's peak learning rate; " + default_help("lr"))
    models = ", ".join(f"{name} ({kind})" for kind, name in DEFAULT_MODEL.items())
    p.add_argument("--model", help=f"'tiny' or a timm ViT name; default {models}")
    p.add_argument("--weights", help="a local weights file (.safetensors or .pth) for the model")
    p.add_argument("--method", default="scilt", choices=scilt.METHODS, help="default scilt; final "
                   "and penultimate train one level's head alone")
    p.add_argument("--fusion", default="class", choices=scilt.FUSIONS,
                   help="class: a learned per-class gate over the levels' scores (default); "
                   "feature: a per-channel gate over their features; fixed: equal weights")
    p.add_argument("--blocks", type=int, nargs="+", default=[-2, -1],
                   help="the levels scilt fuses: blocks 1..N, or -1 (N), -2 (N-1); default -2 -1")
    p.add_argument("--lora-rank", type=int, default=8, help="r, with alpha = r; default 8")
    p.add_argument("--img-size", type=int, help=default_help("img_size"))
    p.add_argument("--augment", choices=AUGMENTS, help="default strong from 128 px, light below")
    p.add_argument("--imbalance-ratio", type=float, help="r of the long-tailed protocol (100)")
    p.add_argument("--seed", type=int, default=0, help="of the splits, the init and the order; 0")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default cuda where there is one, else cpu")
    p.add_argument("--workers", type=int, help="loader processes; default 0 on synthetic, else 8")
    p.add_argument("--out", help="the run's folder; default runs/<data>-<method>-<time>")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate the run in --out")
    args = p.parse_args(argv)
    natural = args.data in NATURAL
    data_kind = "natural" if natural else "synthetic" if args.data == "synthetic" else "scientific"
    args.model = args.model or DEFAULT_MODEL[data_kind]
    kind = "tiny" if args.model == "tiny" else "natural" if natural else "vit"
    defaults = dict(DEFAULTS[kind], epochs=20) if args.data == "inat2018" else DEFAULTS[kind]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = 0 if args.data == "synthetic" else min(8, os.cpu_count() or 1)
    check_flags(p, args)
    args.out = args.out or f"runs/{args.data}-{job or args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def check_flags(p, args):
    """Every flag that a value of its type may still make wrong: one line naming what was expected.
    (Comparisons with NaN are false, so each check asks for what is right.)"""
    for name in ("epochs", "batch_size", "lr", "lora_rank", "img_size"):
        if not 0 < getattr(args, name) < math.inf:
            p.error(f"--{name.replace('_', '-')} must be a positive number, got "
                    f"{getattr(args, name)}")
    if args.imbalance_ratio is not None and not 1 <= args.imbalance_ratio < math.inf:
        p.error("--imbalance-ratio must be a number of at least 1 (the most frequent class's "
                f"training images over the rarest's), got {args.imbalance_ratio}")
    if args.seed < 0:
        p.error(f"--seed must be 0 or more, got {args.seed}")
    check_device_and_workers(p, args)
    if (args.resume or args.eval_only) and not args.out:
        p.error("--resume and --eval-only need --out, the folder of the run")


def check_device_and_workers(p, args):
    """--device names one PyTorch has here, --workers is not negative: one line if not."""
    if args.workers < 0:
        p.error(f"--workers must be 0 or more, got {args.workers}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}, but PyTorch sees no CUDA device here: expected --device "
                "cpu, or a PyTorch built with CUDA on a machine with a GPU")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: expected cpu, cuda or cuda:N")


# --------------------------------------------------------------------------------------------------
# Loading and evaluating, over one process or several (torchrun).

def setup_distributed(device):
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK: a process per GPU (nccl) or CPU slot (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device


def processes():
    return dist.get_world_size() if dist.is_initialized() else 1


def make_loader(dataset, args, device, *, train=False):
    """Training: a seeded shuffle split over processes. Evaluation: every process takes every
    world-th image, in order, so that the gathered predictions cover the set exactly once."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    common = dict(batch_size=args.batch_size, num_workers=args.workers,
                  pin_memory=device.type == "cuda")
    if train:
        sampler = DistributedSampler(dataset, processes(), rank, shuffle=True, seed=args.seed)
        full_batches = len(dataset) // processes() >= args.batch_size
        return Loader(dataset, sampler=sampler, drop_last=full_batches, **common)
    return Loader(Subset(dataset, range(rank, len(dataset), processes())), **common)


# --------------------------------------------------------------------------------------------------
# Training.

def get_lr(step, total_steps, args):
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup:  # 1) linear warm-up from lr / warmup
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)  # 2) then cosine decay to 0
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_one_epoch(model, ddp, optimizer, train_loader, epoch, args, device, log):
    """One pass over the training set: its seconds, images, and mean loss and terms (the loss's,
    LA(s)'s, each level's, over every process). Stops on a non-finite loss."""
    steps, total_steps = len(train_loader), args.epochs * len(train_loader)
    log_every = max(1, min(50, steps // 4))
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(args.seed + 1000 * rank + epoch)  # the same draws on a resumed run
    train_loader.sampler.set_epoch(epoch)
    ddp.train()
    started, seen, sums = time.time(), 0, 0  # sums: of the loss and its terms, on the device
    for i, (images, labels) in enumerate(train_loader):
        step = epoch * steps + i
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, total_steps, args) * group["lr_scale"]
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with scilt.autocast(device):
            loss, terms = model.loss(ddp(images), labels, terms=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums = sums + torch.cat([loss.detach()[None], terms])
        seen += len(images)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            total = sums.clone()
            if processes() > 1:  # so that all see the same mean, and stop together on a bad one
                dist.all_reduce(total)
            mean_loss = total[0].item() / (processes() * (i + 1))
            if not math.isfinite(mean_loss):
                stop_non_finite(f"the loss became {mean_loss}", epoch, args)
            elapsed = time.time() - started
            left = elapsed / (i + 1) * (total_steps - step - 1)
            log(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps} loss {mean_loss:.4f} "
                f"lr {get_lr(step, total_steps, args):.2e} "
                f"{seen * processes() / elapsed:.0f} img/s "
                f"left {int(left // 60)}m{int(left % 60):02d}s")
    # the last update may have made the weights non-finite after the loss was measured
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        stop_non_finite("the weights became non-finite", epoch, args)
    return time.time() - started, seen * processes(), (total / (processes() * steps)).tolist()


def stop_non_finite(what, epoch, args):
    """Stop before anything non-finite reaches a checkpoint or metrics.json."""
    saved = Path(args.out, "checkpoint.pt")
    last = f"the last good checkpoint is {saved}" if saved.exists() else \
        "no checkpoint was written yet"
    raise Abort(f"{what} in epoch {epoch + 1}; {last} (try a lower --lr)")


def val_scores(model, val_loader, counts, device):
    """Each head's balanced accuracy on val ("fused" first), and whether val can choose the epoch a
    run keeps: MIN_VAL_PER_CLASS images of every class."""
    val = report.evaluate(model, val_loader, device)
    enough = bool(torch.bincount(val.labels, minlength=len(counts)).min() >= MIN_VAL_PER_CLASS)
    return {head: report.head_metrics(predicted, val.labels, counts)["balanced_acc"]
            for head, predicted in val.predicted.items()}, enough


def train_epochs(model, optimizer, state, data, val_loader, args, device, log, checkpoint_path):
    """From state["epoch"] to args.epochs: train, keep the epoch that does best on val where val
    can choose (else the last one); after each epoch a row of history.csv, then a checkpoint."""
    if len(data.val) == 0:
        log("no val images: the last epoch is kept")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    train_loader = make_loader(data.train, args, device, train=True)
    for epoch in range(state["epoch"], args.epochs):
        seconds, images, losses = train_one_epoch(model, ddp, optimizer, train_loader, epoch, args,
                                                  device, log)
        state["train_seconds"] += seconds
        state["epoch"] = epoch + 1
        scores, by_val = {}, False
        if len(data.val):
            scores, by_val = val_scores(model, val_loader, data.class_counts, device)
        score = scores.get("fused", 0.0)
        if not by_val or score > state["best_val"]:
            state.update(best_val=score, best_epoch=epoch + 1,
                         best=checkpoint.trainable_state(model))
        choice = f"best {100 * state['best_val']:.1f}%, epoch {state['best_epoch']}"
        if not by_val:
            choice = f"fewer than {MIN_VAL_PER_CLASS} val images of a class: the last epoch is kept"
        if len(data.val):
            log(f"epoch {epoch + 1}: val balanced acc {100 * score:.1f}% ({choice})")
        if not dist.is_initialized() or dist.get_rank() == 0:
            lr = optimizer.param_groups[0]["lr"]  # its last step's
            report.append_history(args.out, report.history_row(model, epoch + 1, losses, lr, scores,
                                                               seconds, images))
            saved = {"state": state, "model": checkpoint.trainable_state(model),
                     "classes": data.classes, "class_counts": data.class_counts,
                     "optimizer": optimizer.state_dict(), "args": vars(args),
                     "weights_sha256": checkpoint.sha256(weights_file(args)),
                     "world_size": processes(),
                     "levels": checkpoint.saved_levels(model)}
            checkpoint.save_atomically(saved, checkpoint_path)


# --------------------------------------------------------------------------------------------------

def load_run_data(args, splits=None):
    """The data the flags name, normalised as the backbone was pretrained. Under torchrun the first
    process fetches a missing set while the others wait, rather than all into the same files."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    mean, std = normalisation(args.model)
    if rank > 0:
        dist.barrier()
    data = load_data(args.data, args.data_root, img_size=args.img_size, augment=args.augment,
                     imbalance_ratio=args.imbalance_ratio, seed=args.seed, mean=mean, std=std,
                     download=not args.no_download, splits=splits)
    if rank == 0 and processes() > 1:
        dist.barrier()
    return data


def run(args):
    rank, _, device = setup_distributed(args.device)
    out, continuing = Path(args.out), args.resume or args.eval_only
    if continuing and not (out / "checkpoint.pt").exists():
        raise Abort(f"no checkpoint at {out / 'checkpoint.pt'}: train into that --out first")
    if not continuing and (out / "checkpoint.pt").exists():  # every process stops, not only one
        raise Abort(f"{out} already holds a run: pass --resume or --eval-only, or choose another "
                    "--out")
    with claim(out, continuing) if rank == 0 else contextlib.nullcontext():
        return train_and_report(args, device, out, continuing)


def train_and_report(args, device, out, continuing):
    rank = dist.get_rank() if dist.is_initialized() else 0
    log = print if rank == 0 else (lambda *a, **k: None)
    checkpoint_path = out / "checkpoint.pt"
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # the data first, so that a bad --data-root fails at once
    data = load_run_data(args, out / "splits.csv" if continuing else None)
    saved = checkpoint.load(checkpoint_path, data.classes) if continuing else None
    model = build_model(args, data.class_counts).to(device)
    trainable, total = count_parameters(model)
    log(f"{args.data}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test "
        f"images, {len(data.classes)} classes, training counts "
        f"{max(data.class_counts)}..{min(data.class_counts)}")
    log(f"{args.model} + LoRA r={args.lora_rank} on {model.num_lora_layers} layers, method "
        f"{args.method}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), {processes()} x {device}")

    optimizer = model.configure_optimizer(args.lr)  # the method's parameter groups
    loaders = {"train": make_loader(data.train_eval, args, device),
               "val": make_loader(data.val, args, device),
               "test": make_loader(data.test, args, device)}
    if continuing:
        weights = checkpoint.sha256(weights_file(args))
        checkpoint.restore(model, saved, checkpoint_path, args, weights, processes(),
                           None if args.eval_only else optimizer)
        state = saved["state"]
        log(f"loaded {checkpoint_path}: {state['epoch']} of {args.epochs} epoch(s) done, "
            f"epoch {state['best_epoch']} kept")
    else:
        bars = report.step_zero(model, loaders, data, device, log)
        state = dict(epoch=0, best_epoch=0, best_val=-1.0, best=None, train_seconds=0.0,
                     bars=bars)
        if rank == 0:
            write_splits(out / "splits.csv", data)
    if rank == 0 and not args.eval_only:  # rows of epochs the checkpoint holds, no later ones
        report.keep_history(out, state["epoch"])

    if not args.eval_only:
        train_epochs(model, optimizer, state, data, loaders["val"], args, device, log,
                     checkpoint_path)
    if state["best"] is not None:
        model.load_state_dict(state["best"], strict=False)
    summary = dict(trainable_params=trainable, total_params=total, method=args.method,
                 train_seconds=round(state["train_seconds"], 1), epochs=state["epoch"],
                 best_epoch=state["best_epoch"], args=vars(args))
    report.finish(model, loaders, data, state["bars"], summary, device, out, log)
    return out


def run_program(work, args, resumable=False):
    """A program's work as its user sees it: bad input, a fault of the machine (a full disk, a
    read-only folder, memory) or Ctrl-C ends in one line on stderr and exit status 2, said once
    under torchrun, with every file written before left as it was."""
    try:
        return work(args)
    except KeyboardInterrupt:
        message = "interrupted; every file written before is intact"
        if resumable and Path(args.out, "checkpoint.pt").exists():
            message += f"; --resume --out {args.out} goes on from its last checkpoint"
    except USER_ERRORS as error:
        message = str(error)
    except OSError as error:  # no space left, a read-only or missing folder, ...
        where = f" ({error.filename})" if error.filename else ""
        message = f"{error.strerror or error}{where}: every file written before is intact"
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and "memory" not in str(error):
            raise  # a bug, not the machine, whose traceback helps
        message = "out of memory: expected a smaller --batch-size or --img-size"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    return run_program(run, parse_args(argv), resumable=True)


if __name__ == "__main__":
    main()
