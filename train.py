"""Train and evaluate SciLT on a long-tailed scientific image data set.

    python train.py                                      # embedded default: synthetic cells, tiny ViT
    python train.py --data isic --epochs 20              # fetches ISIC 2019 into data/isic2019 if missing
    python train.py --data isic --weights vit_b16_in21k.safetensors       # backbone weights from a file
    python train.py --data folder --data-root DIR        # your own images: DIR/train/<class>/*, DIR/test/...
    torchrun --nproc_per_node=4 train.py --data nih
    python train.py --out runs/x --resume          # continue run x;  --eval-only: re-evaluate its checkpoint
    python train.py --out runs/x --predict new_images/         # runs/x/predictions.csv
    python train.py --out runs/x --export x.safetensors        # one file: scilt.load_exported() reads it

Writes to --out: metrics.json and report.png (the report), checkpoint.pt (LoRA, heads, gate, optimizer
and arguments: not the frozen backbone) and splits.csv (the exact train / val / test images).
"""
import argparse
import csv
import json
import math
import os
import pickle
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, Subset

import scilt
from data import AUGMENTS, DataError, ImageFiles, Loader, find_images, load_data, make_transform, write_splits

# ----------------------------------------------------------------------------------------------------
# Settings: what flags left out become, and the recipe's constants, all in one place.

# The embedded default's backbone: a 6-block ViT on 32 x 32 images (8 x 8 patches of 4 px). Its weights,
# tiny_vit.safetensors, are a stand-in foundation model, made by tests/pretrain_tiny.py: pretrained on 14
# synthetic cell types that the benchmark's 10 classes are not among. --weights fractal_vit.safetensors
# gives one pretrained across a domain gap, on fractals. --no-pretrained starts it at random ("jax" init:
# with timm's default init of std 0.02 random blocks are nearly the identity).
TINY = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
            weight_init="jax")
TINY_WEIGHTS = Path(__file__).resolve().parent / "tiny_vit.safetensors"
DEFAULT_MODEL = {"synthetic": "tiny", "real": "vit_base_patch16_224.augreg_in21k",
                 "natural": "vit_base_patch16_clip_224.openai"}  # CLIP ViT-B/16, as LIFT's numbers use
NATURAL = ("cifar100-lt", "imagenet-lt", "places-lt", "inat2018")  # the natural-image long-tail benchmarks
DEFAULTS = {  # what flags left out become, for the tiny ViT on a CPU and for a real ViT on a GPU
    "tiny": dict(epochs=20, batch_size=64, lr=3e-3, img_size=32),
    "vit": dict(epochs=20, batch_size=64, lr=1e-3, img_size=224),
    "natural": dict(epochs=10, batch_size=128, lr=1e-3, img_size=224),  # LIFT: 10 epochs of batch 128
}
WARMUP_FRACTION = 0.05   # of all steps: linear warm-up, then cosine decay to 0
WEIGHT_DECAY = 1e-2      # AdamW's, on LoRA and the heads; none on the gate
GATE_LR_SCALE = 30       # the gate's learning rate / the others': AdamW moves a parameter ~lr per step
FUSION = "class"         # scilt's --fusion: a learned per-class gate over the levels
TAU = 1.0                # logit adjustment: LA(z, y) = CE(z + tau * log prior, y)
AUX_WEIGHT = 0.5         # lambda of the dual supervision: L = LA(s) + lambda * (LA(s_1) + LA(s_2))
PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)  # the step-0 linear probe's, chosen on val
MIN_VAL_PER_CLASS = 10   # a run keeps its val-best epoch where val has this many images of every class, else
                         # its last (lr 0 there): a few images a class pick noise (docs/results.md)
# flags a checkpoint must agree with on --resume (all) and --eval-only (what makes the model)
MODEL_FLAGS = ("data", "model", "pretrained", "method", "fusion", "blocks", "lora_rank", "img_size", "imbalance_ratio")
SCHEDULE_FLAGS = ("epochs", "batch_size", "lr", "augment", "seed")


class Abort(Exception):
    """A problem with the user's input: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = Parser(description="SciLT: long-tailed classification by PEFT of a ViT with penultimate-layer fusion.")
    p.add_argument("--data", default="synthetic", choices=["synthetic", "isic", "nih", "blood", "npz", "folder", *NATURAL])
    p.add_argument("--data-root", help="the data set's folder (or .npz file); default data/<set>, where a missing "
                                       "set is downloaded; see README.md for layouts")
    p.add_argument("--no-download", action="store_true", help="never download: fail if the data are not there")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (linear warm-up, cosine decay)")
    p.add_argument("--model", help="'tiny' or a timm ViT name (default per --data)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from pretrained weights (timm's hub; for tiny, tiny_vit.safetensors)")
    p.add_argument("--weights", help="a local weights file (.safetensors or .pth) instead of the hub")
    p.add_argument("--method", default="scilt", choices=scilt.METHODS)
    p.add_argument("--fusion", default=FUSION, choices=scilt.FUSIONS,
                   help="how scilt fuses its levels: a learned per-class gate, or a = 1 / levels")
    p.add_argument("--blocks", type=int, nargs="+", default=[-2, -1],
                   help="the levels scilt fuses: blocks 1..N, or -1 (N), -2 (N-1), ...; the paper's -2 -1 by default")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--img-size", type=int)
    p.add_argument("--augment", choices=AUGMENTS, help="default: strong from 128 px up, light below")
    p.add_argument("--imbalance-ratio", type=float, help="r of the long-tailed protocol (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, help="data loader processes (default: 0 for synthetic, else up to 8)")
    p.add_argument("--out", help="output folder (default: runs/<data>-<method>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --out on the test set")
    p.add_argument("--analyze", action="store_true",
                   help="no training: how well each block's frozen features serve each class group (layers.json)")
    p.add_argument("--predict", nargs="+", metavar="PATH",
                   help="classify images (files, or folders searched recursively) with the run in --out: predictions.csv")
    p.add_argument("--export", metavar="FILE", help="write the run in --out as one .safetensors file for inference")
    args = p.parse_args(argv)
    kind = "synthetic" if args.data == "synthetic" else "natural" if args.data in NATURAL else "real"
    args.model = args.model or DEFAULT_MODEL[kind]
    defaults = DEFAULTS["tiny" if args.model == "tiny" else "natural" if kind == "natural" else "vit"]
    for key, value in dict(defaults, **({"epochs": 20} if args.data == "inat2018" else {})).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = 0 if args.data == "synthetic" and not args.predict else min(8, os.cpu_count() or 1)
    for name in ("epochs", "batch_size", "lr", "lora_rank", "img_size", "imbalance_ratio"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if (args.resume or args.eval_only or args.predict or args.export) and not args.out:
        p.error("--resume, --eval-only, --predict and --export need --out, the folder of the run")
    args.out = args.out or f"runs/{args.data}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def normalisation(model):
    """The mean and std the backbone was pretrained with (timm's config), for every image it sees."""
    config = timm.models.get_pretrained_cfg(TINY["name"] if model == "tiny" else model)
    return tuple(getattr(config, "mean", (0.5,) * 3)), tuple(getattr(config, "std", (0.5,) * 3))


def load_backbone(args):
    """The backbone the flags name, through scilt.create_backbone; one line (Abort) if it cannot be had."""
    if args.model == "tiny":  # its pretrained weights ship with this repository: nothing to download
        weights = args.weights or (TINY_WEIGHTS if args.pretrained else None)
        kwargs = dict(TINY, img_size=args.img_size, pretrained=False, weights=weights)
    else:
        kwargs = dict(name=args.model, img_size=args.img_size, pretrained=args.pretrained, weights=args.weights)
    try:
        return scilt.create_backbone(**kwargs)
    except ValueError as error:
        hint = "; download them where there is internet and pass --weights FILE" if "internet" in str(error) else ""
        raise Abort(f"{error}{hint}") from None


# ----------------------------------------------------------------------------------------------------
# Data loading and prediction, over one process or several (torchrun).

def setup_distributed(device):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: one process per GPU (nccl), or per CPU slot (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def loader(dataset, args, device, *, train=False):
    """Training: a seeded shuffle split over processes. Evaluation: every process takes every world-th
    image, in order, so that the gathered predictions cover the set exactly once."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    if train:
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed)
        return Loader(dataset, sampler=sampler, drop_last=len(dataset) // world >= args.batch_size, **common)
    return Loader(Subset(dataset, range(rank, len(dataset), world)), **common)


@torch.no_grad()
def predict(model, data_loader, device):
    """Of every image of the set, gathered from all processes: the features h (N, L, D) of the model's L
    levels (then of the final block, the linear probe's, if it is not the last level), the label, and the
    class predicted by the fused scores (`fused`) and by each level's head (by its name). What grows with
    N is kept, nothing that grows with N x K: the report needs only the predicted classes."""
    model.eval()
    final = len(model.backbone.blocks) - 1
    blocks = model.blocks + ([final] if model.blocks[-1] != final else [])
    names = ["fused", *model.level_names()]
    keep = {"h": [torch.zeros(0, len(blocks), model.backbone.num_features)],   # the same keys on every
            **{name: [torch.zeros(0, dtype=torch.long)] for name in ["labels", *names]}}  # process, even with no image
    for images, labels in data_loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            h = scilt.tap(model.backbone, images.to(device, non_blocking=True), blocks)
            out = model.classify(*h[:len(model.blocks)])
        found = {"h": torch.stack(h, 1).float(), "labels": labels,
                 **{name: s.argmax(1) for name, s in zip(names, [out.logits, *out.levels])}}
        for key, value in found.items():
            keep[key].append(value.cpu())
    return gather({k: torch.cat(v) for k, v in keep.items()})


def levels(model, result):
    """The model's levels' features, one (N, D) each, from predict()'s result."""
    return [result["h"][:, l] for l in range(len(model.blocks))]


def gather(result):
    """Every process's part of an evaluation (name -> tensor), joined in the order loader() dealt them, on
    every process, by tensor collectives: parts differ by at most one image, so each is padded to the
    longest, gathered, and cut back."""
    if not dist.is_initialized():
        return result
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    lengths = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, torch.tensor([len(result["labels"])], device=device))
    longest, joined = int(max(lengths)), {}
    for key, value in result.items():
        padded = value.new_zeros((longest, *value.shape[1:]), device=device)
        padded[:len(value)] = value
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded)
        joined[key] = torch.cat([part[:int(n)] for part, n in zip(parts, lengths)]).cpu()
    return joined


# ----------------------------------------------------------------------------------------------------
# Training.

def get_lr(step, total_steps, args):
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup:  # 1) linear warm-up from lr / warmup
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)  # 2) then cosine decay to 0
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_one_epoch(model, ddp, optimizer, train_loader, epoch, args, device, log):
    """One pass over the training set; returns its seconds. Stops on a non-finite loss."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    steps, total_steps = len(train_loader), args.epochs * len(train_loader)
    log_every = max(1, min(50, steps // 4))
    torch.manual_seed(args.seed + 1000 * (dist.get_rank() if world > 1 else 0) + epoch)  # resumable draws
    train_loader.sampler.set_epoch(epoch)
    ddp.train()
    started, seen, loss_sum = time.time(), 0, torch.zeros((), device=device)
    for i, (images, labels) in enumerate(train_loader):
        step = epoch * steps + i
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, total_steps, args) * group["lr_scale"]
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(ddp(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        seen += len(images)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            total_loss = loss_sum.clone()
            if world > 1:  # every process sees the same mean, so all stop together on a bad loss
                dist.all_reduce(total_loss)
            mean_loss = total_loss.item() / (world * (i + 1))
            if not math.isfinite(mean_loss):
                raise Abort(f"the loss became {mean_loss} in epoch {epoch + 1}; the last good checkpoint "
                            f"is in {args.out} (try a lower --lr)")
            elapsed = time.time() - started
            left = elapsed / (i + 1) * (total_steps - step - 1)
            log(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps} loss {mean_loss:.4f} "
                f"lr {get_lr(step, total_steps, args):.2e} {seen * world / elapsed:.0f} img/s "
                f"left {int(left // 60)}m{int(left % 60):02d}s")
    return time.time() - started


def val_score(model, val_loader, counts, device):
    """The fused prediction's balanced accuracy on val, and whether val can choose the epoch a run keeps:
    MIN_VAL_PER_CLASS images of every class."""
    val = predict(model, val_loader, device)
    enough = bool(torch.bincount(val["labels"], minlength=len(counts)).min() >= MIN_VAL_PER_CLASS)
    return head_metrics(val["fused"], val["labels"], counts)["balanced_acc"], enough


def train_epochs(model, optimizer, state, data, val_loader, args, device, log, checkpoint_path):
    """From state["epoch"] to args.epochs: train, keep the epoch that does best on val where val can choose
    (else the last one), save a checkpoint after each epoch."""
    if len(data.val) == 0:
        log("no val images: the last epoch is kept")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    train_loader = loader(data.train, args, device, train=True)
    for epoch in range(state["epoch"], args.epochs):
        state["train_seconds"] += train_one_epoch(model, ddp, optimizer, train_loader, epoch, args, device, log)
        state["epoch"] = epoch + 1
        score, by_val = val_score(model, val_loader, data.class_counts, device) if len(data.val) else (0.0, False)
        if not by_val or score > state["best_val"]:
            state.update(best_val=score, best_epoch=epoch + 1, best=trainable_state(model))
        if len(data.val):
            log(f"epoch {epoch + 1}: val balanced acc {100 * score:.1f}% " + (
                f"(best {100 * state['best_val']:.1f}%, epoch {state['best_epoch']})" if by_val else
                f"(fewer than {MIN_VAL_PER_CLASS} val images of a class: the last epoch is kept)"))
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_atomically({"state": state, "model": trainable_state(model), "classes": data.classes,
                             "class_counts": data.class_counts,
                             "optimizer": optimizer.state_dict(), "args": vars(args)}, checkpoint_path)


# ----------------------------------------------------------------------------------------------------
# Evaluation and the report.

def head_metrics(predictions, labels, counts, classes=None):
    """A head's row of the report: scilt.long_tail_metrics of the classes it predicts."""
    return scilt.long_tail_metrics(predictions.numpy(), labels.numpy(), counts, classes)


def linear_probe(features, labels, log_prior, tau=1.0, weight_decay=1e-4, steps=200, device="cpu", chunk=8192):
    """The baseline every fine-tuning must beat: logit-adjusted softmax regression on frozen features
    (standardised), fit to convergence by L-BFGS in float32 on `device`. The loss is summed over chunks of
    images, so memory grows with chunk x K, not N x K. The adjustment makes its argmax balanced, as the
    heads' loss does: a fair bar for them. Returns a function features -> predicted classes."""
    x = torch.as_tensor(features, dtype=torch.float32).to(device)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    labels, log_prior = torch.as_tensor(labels).to(device), torch.as_tensor(log_prior, dtype=torch.float32).to(device)
    weight = torch.zeros(x.shape[1], len(log_prior), device=device, requires_grad=True)
    bias = torch.zeros(len(log_prior), device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, tolerance_grad=1e-7, tolerance_change=1e-10,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = weight_decay * weight.pow(2).sum()
        loss.backward()
        for start in range(0, len(x), chunk):  # mean cross-entropy, one chunk's share at a time
            part = F.cross_entropy(x[start:start + chunk] @ weight + bias + tau * log_prior,
                                   labels[start:start + chunk], reduction="sum") / len(x)
            part.backward()
            loss = loss + part.detach()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    predict = lambda h: ((h.to(device) - mean) / std @ weight + bias).argmax(1).cpu()
    return lambda h: torch.cat([predict(part) for part in torch.as_tensor(h, dtype=torch.float32).split(chunk)]
                               or [torch.zeros(0, dtype=torch.long)])


def fit_probe(train_h, train_labels, val_h, val_labels, counts, device="cpu", steps=200):
    """The linear probe with its weight decay chosen by val balanced accuracy."""
    log_prior = torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts))
    fit = lambda decay: linear_probe(train_h, train_labels, log_prior, TAU, decay, steps, device)
    if len(val_labels) == 0:  # nothing to choose by: the middle weight decay alone
        return fit(PROBE_WEIGHT_DECAYS[len(PROBE_WEIGHT_DECAYS) // 2])
    return max(map(fit, PROBE_WEIGHT_DECAYS),
               key=lambda probe: head_metrics(probe(val_h), val_labels, counts)["balanced_acc"])


def start_metrics(train, val, test, counts, groups, classes, device="cpu", probe_steps=200):
    """The model at step 0 (class-mean heads on the pretrained features, fused as the method fuses them)
    and a linear probe on the pretrained final-layer features: the two bars training must clear. `groups`:
    the counts that define many / medium / few."""
    probe = fit_probe(train["h"][:, -1], train["labels"], val["h"][:, -1], val["labels"], counts, device, probe_steps)
    return {name: head_metrics(predictions, test["labels"], groups, classes)
            for name, predictions in (("start", test["fused"]), ("probe", probe(test["h"][:, -1])))}


# ----------------------------------------------------------------------------------------------------
# --analyze: which block's frozen features serve which classes, before any training.

@torch.no_grad()
def block_features(backbone, data_loader, device):
    """pool(norm(z_l)) of every block l, one pass per batch: {"h": (N, L, C) float32 on the CPU, "labels"}."""
    backbone.eval()
    features = [torch.zeros(0, len(backbone.blocks), backbone.num_features)]
    labels = [torch.zeros(0, dtype=torch.long)]  # an empty val set gives empty tensors
    for images, y in data_loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            levels = scilt.tap(backbone, images.to(device, non_blocking=True), range(len(backbone.blocks)))
        features.append(torch.stack(levels, dim=1).float().cpu())
        labels.append(y)
    return gather({"h": torch.cat(features), "labels": torch.cat(labels)})


def analyze(backbone, data, args, device, log):
    """For each block: class means (the heads' start) and a linear probe on its frozen features, scored on
    the test set; and the pair of levels whose class means, averaged as scilt starts, do best on val by
    balanced accuracy, which weighs a tail class as much as a head class (the tail breaks ties, then the
    paper's N-1, N). layers.json holds it all."""
    sets = {name: block_features(backbone.to(device), loader(dataset, args, device), device)
            for name, dataset in (("train", data.train_eval), ("val", data.val), ("test", data.test))}
    counts, groups, layers, val_scores = data.class_counts, data.group_counts, [], []
    for block in range(len(backbone.blocks)):
        h = {name: s["h"][:, block] for name, s in sets.items()}
        means = scilt.CosineClassifier(h["train"].shape[1], len(counts))
        means.set_class_means(h["train"], sets["train"]["labels"])
        probe = fit_probe(h["train"], sets["train"]["labels"], h["val"], sets["val"]["labels"], counts, device)
        predictions = {"ncm": means(h["test"]).argmax(1), "probe": probe(h["test"])}
        layers.append({"block": block + 1, **{name: head_metrics(p, sets["test"]["labels"], groups, data.classes)
                                              for name, p in predictions.items()}})
        val_scores.append(means(h["val"]))  # (N_val, K) cosines: a level's class-mean scores on val
        log(f"block {block + 1}/{len(backbone.blocks)}: class means {100 * layers[-1]['ncm']['balanced_acc']:.1f}%, "
            f"probe {100 * layers[-1]['probe']['balanced_acc']:.1f}% balanced accuracy")
    depth, tail = len(layers), tail_group(layers)
    pairs = [(depth - 1, depth)] + [(l, m) for m in range(2, depth + 1) for l in range(1, m)
                                    if (l, m) != (depth - 1, depth)]  # the default first: it wins ties
    on_val = [head_metrics((val_scores[l - 1] + val_scores[m - 1]).argmax(1), sets["val"]["labels"], groups)
              for l, m in pairs]
    best = max(range(len(pairs)), key=lambda i: (on_val[i]["balanced_acc"] or 0, on_val[i][tail] or 0))
    if not len(sets["val"]["labels"]):  # nothing to choose by
        best = 0
    pick = lambda i: {"blocks": list(pairs[i]), "val": {k: on_val[i][k] for k in ("balanced_acc", tail)}}
    return {"layers": layers, "recommended": pick(best), "default": pick(0)}


def tail_group(layers):
    """few (< 20 training images) where there are classes in each of many / medium / few, else tail (by rank)."""
    return "few" if all(layers[0]["ncm"][g] is not None for g in ("many", "medium", "few")) else "tail"


def print_layers(analysis):
    layers, tail = analysis["layers"], tail_group(analysis["layers"])
    groups = ("many", "medium", "few") if tail == "few" else ("head", "middle", "tail")
    columns = [(kind, key) for kind in ("ncm", "probe") for key in ("balanced_acc", *groups)]
    best = {c: max(layer[c[0]][c[1]] or 0 for layer in layers) for c in columns}
    cell = lambda layer, c: "     -" if layer[c[0]][c[1]] is None else \
        f"{100 * layer[c[0]][c[1]]:5.1f}{'*' if layer[c[0]][c[1]] == best[c] else ' '}"
    print(f"\n{'':6s}{'class means (start)':^32s}  {'linear probe':^32s}")
    print(f"{'block':6s}" + "".join(f"{k.removesuffix('_acc')[:8]:>8s}" + ("  " if i == 3 else "")
                                    for i, (_, k) in enumerate(columns)))
    for layer in layers:
        print(f"{layer['block']:<6d}" + "".join(f"{cell(layer, c):>8s}" + ("  " if i == 3 else "")
                                             for i, c in enumerate(columns)))
    pen, fin = layers[-2], layers[-1]
    verdict = [f"{kind} {100 * pen[kind][tail]:.1f}% vs {100 * fin[kind][tail]:.1f}%" for kind in ("probe", "ncm")]
    better = pen["probe"][tail] > fin["probe"][tail]
    print(f"(* best block per column, on test) The penultimate block's frozen features serve the {tail} classes "
          f"{'better' if better else 'no better'} than the final block's ({tail}: {', '.join(verdict)}).")
    on_val = lambda choice: ", ".join(f"{k.removesuffix('_acc')} {100 * (v or 0):.1f}%"
                                      for k, v in choice["val"].items())
    chosen, default = analysis["recommended"], analysis["default"]
    print(f"Recommended on val: --blocks {' '.join(map(str, chosen['blocks']))} (their class means: {on_val(chosen)}; "
          f"the default {' '.join(map(str, default['blocks']))}: {on_val(default)})")


def plot_layers(layers, path):
    """layers.png: balanced and tail accuracy of each block's frozen features, class means and probe."""
    plt = pyplot()
    tail = tail_group(layers)
    blocks = [layer["block"] for layer in layers]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, color in (("ncm", "tab:blue"), ("probe", "tab:orange")):
        for key, style in (("balanced_acc", "-"), (tail, "--")):
            ax.plot(blocks, [100 * (layer[kind][key] or 0) for layer in layers], style, color=color, marker="o",
                    label=f"{'class means' if kind == 'ncm' else 'linear probe'}: {key.removesuffix('_acc')}")
    ax.axvline(blocks[-2], color="0.7", lw=0.8)  # the penultimate block
    ax.set(xlabel="block (frozen features)", ylabel="test accuracy (%)", xticks=blocks,
           title="which block's features serve which classes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The report: metrics.json, the printed table and report.png.

def report(model, test, val, train, classes, counts, groups, before):
    """metrics.json, accuracies as fractions: the fused prediction's `overall_acc`, `balanced_acc`,
    `macro_f1`, `many` / `medium` / `few` (by `groups`, the counts that define them), `head` / `middle` /
    `tail` (by rank) and `per_class_acc`; `heads`: the same for `start` (step 0), `probe`, `fused` and each
    level's head (`penultimate`, `final`, `block<l>`; None for one the method lacks); `class_counts`;
    `fusion_weights` (class -> a, its weight on the levels below the final block: for the paper's two, on
    the penultimate one); `level_weights` (class -> level -> weight); `fusion_val_correlation` (over
    classes, of a with the penultimate head's val gain over the final's); `rademacher`
    (scilt.rademacher_check on the training sample, with its balanced accuracy and the gap)."""
    names = model.level_names()
    heads = {name: head_metrics(test[name], test["labels"], groups, classes) for name in ["fused", *names]}
    weights = model.fusion_weights().detach().cpu()  # (K, L)
    a = 1 - weights[:, names.index("final")] if "final" in names else torch.ones(len(classes))
    correlation = None
    if "penultimate" in val and "final" in val and a.std() > 0:  # does a class lean on the level serving it better?
        gain = [p - f if p is not None and f is not None else 0.0 for p, f in zip(
            head_metrics(val["penultimate"], val["labels"], counts)["per_class_acc"].values(),
            head_metrics(val["final"], val["labels"], counts)["per_class_acc"].values())]
        correlation = float(np.corrcoef(a.numpy(), gain)[0, 1]) if np.std(gain) > 0 else None
    train_balanced = head_metrics(train["fused"], train["labels"], counts)["balanced_acc"]
    rademacher = scilt.rademacher_check(dict(zip(names, levels(model, train))), weights, model.scale)
    rademacher.update(train_balanced_acc=train_balanced, gap=train_balanced - heads["fused"]["balanced_acc"])
    return {
        **heads["fused"],
        "class_counts": dict(zip(classes, counts)),
        "heads": {**before, **{name: heads.get(name) for name in dict.fromkeys([*names, "penultimate", "final"])},
                  "fused": heads["fused"]},
        "fusion_weights": dict(zip(classes, a.tolist())),
        "level_weights": {c: dict(zip(names, w)) for c, w in zip(classes, weights.tolist())},
        "fusion_val_correlation": correlation,
        "rademacher": rademacher,
    }


def print_report(metrics):
    percent = lambda v: "     -" if v is None else f"{100 * v:6.1f}"
    columns = ("overall_acc", "balanced_acc", "many", "medium", "few", "head", "middle", "tail")
    print(f"\n{'test set':22s}" + "".join(f"{c.removesuffix('_acc'):>9s}" for c in columns))
    labels = {"start": "start (step 0)", "probe": "linear probe", "fused": "fused"}
    for name, head in metrics["heads"].items():
        if head:
            print(f"{labels.get(name, name + ' head'):22s}" + "".join(f"{percent(head[c]):>9s}" for c in columns))
    print(f"\n{'class':26s}{'train':>7s}{'acc':>8s}{'a':>13s}")
    for name, count in metrics["class_counts"].items():
        print(f"{name:26s}{count:7d}{percent(metrics['per_class_acc'][name]):>8s}"
              f"{metrics['fusion_weights'][name]:13.3f}")
    if metrics["fusion_val_correlation"] is not None:
        print(f"correlation on val between a and (penultimate - final head accuracy) per class: "
              f"{metrics['fusion_val_correlation']:+.2f}")
    r = metrics["rademacher"]
    print(f"\nRademacher complexity on the {r['n']} training images, |w| <= t = {r['scale']:.3g} (estimate ± s.e. "
          f"and its fraction of the bound t/sqrt(n) = {r['fused']['bound']:.3f}, L t/sqrt(n) for the sum of L):\n  "
          + ", ".join(f"{k} {v['estimate']:.3f} ± {v['stderr']:.3f} ({v['fraction']:.2f})"
                      for k, v in r.items() if isinstance(v, dict)))
    print("  the bound is fixed by n and t; the fraction says how diverse the training features are "
          "(0.80: all alike, 1: orthogonal)")
    print(f"train - test balanced accuracy gap: {percent(r['train_balanced_acc']).strip()}% - "
          f"{percent(metrics['balanced_acc']).strip()}% = {100 * r['gap']:.1f} points")
    print(f"balanced accuracy {percent(metrics['balanced_acc']).strip()}%, macro-F1 "
          f"{percent(metrics['macro_f1']).strip()}%")


def pyplot():
    import matplotlib  # only here: nothing else needs it
    matplotlib.use("Agg")  # to files, no display
    import matplotlib.pyplot as plt
    return plt


def plot_report(metrics, path):
    """report.png: each class's test accuracy against its training count, one series per head (where the
    tail gains or loses), and each class's fusion weight a (1: leans on the penultimate layer)."""
    plt = pyplot()
    classes, counts = list(metrics["class_counts"]), np.array(list(metrics["class_counts"].values()))
    order = np.argsort(-counts, kind="stable")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw=dict(width_ratios=(2, 1)))
    styles = {"start": dict(color="0.6", marker="o", ms=3), "probe": dict(color="k", ls="--", marker="x"),
              "final": dict(color="tab:blue", marker="s", ms=3),
              "penultimate": dict(color="tab:green", marker="^", ms=3),
              "fused": dict(color="tab:red", marker="o", lw=2)}
    for name, head in metrics["heads"].items():
        if head:
            style = styles.get(name, dict(marker="v", ms=3))
            accuracy = [head["per_class_acc"][classes[k]] for k in order]
            left.plot(counts[order], [np.nan if a is None else 100 * a for a in accuracy], **style,
                      label=f"{name} ({100 * head['balanced_acc']:.1f})")
    for boundary in (20, 100):  # few | medium | many
        left.axvline(boundary, color="0.85", ls=":")
    left.set(xscale="log", xlabel="training images of the class (log scale)", ylabel="test accuracy (%)",
             title="per-class test accuracy (legend: balanced accuracy)")
    left.legend(fontsize=8)
    right.scatter(counts, [metrics["fusion_weights"][c] for c in classes], color="tab:purple")
    right.axhline(0.5, color="0.6", lw=0.8)
    right.set(xscale="log", ylim=(-0.05, 1.05), xlabel="training images of the class (log scale)",
              ylabel="a (1: penultimate, 0: final)", title="fusion weight per class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: what learns (LoRA, heads, gate), the optimizer, the run's state and arguments.

def trainable_state(model):
    """What training changes, and the heads' scale, fitted at step 0."""
    learned = [(k, v) for k, v in model.named_parameters() if v.requires_grad]
    scales = [(k, v) for k, v in model.named_buffers() if k.endswith(".scale")]
    return {k: v.detach().cpu().clone() for k, v in learned + scales}


def save_atomically(obj, path, text=False):
    temporary = Path(f"{path}.tmp")
    if text:
        temporary.write_text(json.dumps(obj, indent=2))
    else:
        torch.save(obj, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, classes=None):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise Abort(f"cannot read checkpoint {path} ({type(error).__name__}): expected a complete "
                    "checkpoint.pt written by train.py; it may be truncated") from None
    if classes is not None and checkpoint["classes"] != classes:
        raise Abort(f"checkpoint {path} was trained on {len(checkpoint['classes'])} classes "
                    f"({', '.join(checkpoint['classes'][:4])}, ...), but this data set has {len(classes)}")
    return checkpoint


def load_trained(model, checkpoint, path):
    """What training changed (LoRA, heads, gate, scales) into the model built from the same flags."""
    unexpected = model.load_state_dict(checkpoint["model"], strict=False).unexpected_keys
    if unexpected:
        raise Abort(f"checkpoint {path} holds {', '.join(unexpected[:3])}, which this model lacks: it was written "
                    "by another version of train.py; train it again into another --out")


def restore(model, optimizer, checkpoint, path, args):
    """Load a checkpoint into the model (and optimizer) after checking that this run's flags are the ones it
    was trained with: what makes the model, and on --resume what shapes the learning-rate schedule."""
    flags = MODEL_FLAGS + (() if args.eval_only else SCHEDULE_FLAGS)
    was, asked = checkpoint["args"], vars(args)
    differ = [flag for flag in flags if was.get(flag) != asked[flag]]
    if differ:
        value = lambda v: " ".join(map(str, v)) if isinstance(v, list) else v
        show = lambda values: " ".join(f"--{flag.replace('_', '-')} {value(values.get(flag))}" for flag in differ)
        raise Abort(f"checkpoint {path} was trained with {show(was)}, but this run asks for {show(asked)}: "
                    "pass the flags it was trained with, or another --out")
    load_trained(model, checkpoint, path)
    if not args.eval_only:
        optimizer.load_state_dict(checkpoint["optimizer"])


# ----------------------------------------------------------------------------------------------------

def build_model(args, class_counts):
    """SciLT on the backbone the flags name; --blocks counts 1..N (or -1 = N back), as --analyze does."""
    backbone = load_backbone(args)
    depth = len(backbone.blocks)
    if not all(1 <= abs(b) <= depth for b in args.blocks):
        raise Abort(f"--blocks {' '.join(map(str, args.blocks))}: {args.model} has {depth} blocks, "
                    f"expected numbers in 1..{depth} or -{depth}..-1")
    return scilt.SciLT(backbone, class_counts, method=args.method, fusion=args.fusion,
                       blocks=[b - 1 if b > 0 else b for b in args.blocks], rank=args.lora_rank, tau=TAU,
                       aux_weight=AUX_WEIGHT)


def run(args):
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    out, continuing = Path(args.out), args.resume or args.eval_only
    checkpoint_path = out / "checkpoint.pt"
    if continuing != checkpoint_path.exists() and not args.analyze:
        raise Abort(f"no checkpoint at {checkpoint_path}: train into that --out first" if continuing else
                    f"{out} already holds a run: pass --resume or --eval-only, or choose another --out")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # the data first, normalised as the backbone was pretrained, so that a bad --data-root fails at once
    mean, std = normalisation(args.model)
    if rank > 0:  # under torchrun the first process fetches a missing data set while the others wait
        dist.barrier()
    data = load_data(args.data, args.data_root, img_size=args.img_size, augment=args.augment,
                     imbalance_ratio=args.imbalance_ratio, seed=args.seed, download=not args.no_download,
                     mean=mean, std=std,
                     splits=out / "splits.csv" if continuing else None)
    if rank == 0 and world > 1:
        dist.barrier()
    if args.analyze:
        layers = analyze(load_backbone(args), data, args, device, log)
        if rank == 0:
            print_layers(layers)
            out.mkdir(parents=True, exist_ok=True)
            save_atomically(layers, out / "layers.json", text=True)
            plot_layers(layers["layers"], out / "layers.png")
            log(f"wrote {out / 'layers.json'} and {out / 'layers.png'}")
        return out
    checkpoint = load_checkpoint(checkpoint_path, data.classes) if continuing else None
    model = build_model(args, data.class_counts).to(device)
    trainable, total = scilt.count_parameters(model)
    log(f"{args.data}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
        f"{len(data.classes)} classes, training counts {max(data.class_counts)}..{min(data.class_counts)}")
    log(f"{args.model} + LoRA r={args.lora_rank} on {model.num_lora_layers} layers, method {args.method}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%), {world} x {device}")

    others = [p for p in model.parameters() if p.requires_grad and p is not model.gate]  # LoRA, heads
    optimizer = torch.optim.AdamW([{"params": others, "weight_decay": WEIGHT_DECAY, "lr_scale": 1.0},
                                   {"params": [model.gate] if model.gate is not None else [], "weight_decay": 0.0,
                                    "lr_scale": GATE_LR_SCALE}])
    test_loader, val_loader = loader(data.test, args, device), loader(data.val, args, device)
    train_eval_loader = loader(data.train_eval, args, device)
    if continuing:
        restore(model, optimizer, checkpoint, checkpoint_path, args)
        state = checkpoint["state"]
        log(f"loaded {checkpoint_path}: {state['epoch']} of {args.epochs} epoch(s) done, "
            f"epoch {state['best_epoch']} kept")
    else:  # heads start as nearest-class-mean classifiers on the un-augmented pretrained features
        train = predict(model, train_eval_loader, device)
        model.init_heads([h.to(device) for h in levels(model, train)], train["labels"].to(device))
        val, test = predict(model, val_loader, device), predict(model, test_loader, device)
        before = start_metrics(train, val, test, data.class_counts, data.group_counts, data.classes, device) \
            if rank == 0 else None  # the probe is fit by the first process alone
        state = dict(epoch=0, best_epoch=0, best_val=-1.0, best=None, train_seconds=0.0, before=before)
        if rank == 0:
            log(f"step 0 on test: class means {100 * before['start']['balanced_acc']:.1f}% (cosine scale fitted "
                f"to {model.scale:.3g}), linear probe on frozen features {100 * before['probe']['balanced_acc']:.1f}% "
                "balanced accuracy")
            out.mkdir(parents=True, exist_ok=True)
            write_splits(out / "splits.csv", data)

    if not args.eval_only:
        train_epochs(model, optimizer, state, data, val_loader, args, device, log, checkpoint_path)
    if state["best"] is not None:
        model.load_state_dict(state["best"], strict=False)
    test, val = predict(model, test_loader, device), predict(model, val_loader, device)
    train = predict(model, train_eval_loader, device)
    if rank == 0:
        metrics = report(model, test, val, train, data.classes, data.class_counts, data.group_counts, state["before"])
        metrics.update(trainable_params=trainable, total_params=total, train_seconds=round(state["train_seconds"], 1),
                       method=args.method, best_epoch=state["best_epoch"], epochs=state["epoch"], args=vars(args))
        print_report(metrics)
        save_atomically(metrics, out / "metrics.json", text=True)
        plot_report(metrics, out / "report.png")
        log(f"wrote {out / 'metrics.json'}, {out / 'report.png'}, {checkpoint_path}, {out / 'splits.csv'}")
    return out


# ----------------------------------------------------------------------------------------------------
# Using a trained run: --predict (a CSV of predictions) and --export (one file for inference).

def load_run(args, device):
    """The model a run's evaluation used (the epoch it kept), rebuilt from its checkpoint and arguments, in
    eval mode; the backbone from timm or a weights file as trained (a --weights given now replaces it)."""
    path = Path(args.out) / "checkpoint.pt"
    if not path.exists():
        raise Abort(f"no checkpoint at {path}: train into that --out first")
    checkpoint = load_checkpoint(path)
    trained = argparse.Namespace(**checkpoint["args"])
    trained.weights = args.weights or trained.weights
    counts = checkpoint.get("class_counts", [1] * len(checkpoint["classes"]))  # older checkpoints lack them
    trained.blocks = getattr(trained, "blocks", [-2, -1])
    model = build_model(trained, counts)
    load_trained(model, {"model": checkpoint["state"]["best"] or checkpoint["model"]}, path)
    return model.to(device).eval(), trained, checkpoint["classes"]


@torch.no_grad()
def predict_images(args, device, log):
    """predictions.csv in --out: per image its path, the predicted class, that class's probability, every
    class's probability (softmax of the fused scores s), and the error if the file could not be read."""
    paths = find_images(args.predict)
    model, trained, classes = load_run(args, device)
    scilt.merge_lora(model)  # inference at the plain model's speed, the same outputs
    images = ImageFiles(paths, make_transform(trained.img_size, *normalisation(trained.model)), trained.img_size)
    batches = Loader(images, batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    rows, started, failed = [], time.time(), 0
    for i, (x, errors) in enumerate(batches):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            probabilities = model(x.to(device, non_blocking=True)).logits.float().softmax(-1).cpu()
        for p, error in zip(probabilities, errors):
            path, k = paths[len(rows)], int(p.argmax())
            rows.append([path, "", "", *[""] * len(classes), error] if error else
                        [path, classes[k], f"{p[k]:.6f}", *(f"{q:.6f}" for q in p.tolist()), ""])
            failed += bool(error)
        if (i + 1) % 50 == 0:
            log(f"predicted {len(rows):,} / {len(paths):,} images, {len(rows) / (time.time() - started):.0f} img/s")
    target = Path(args.out) / "predictions.csv"
    with open(f"{target}.tmp", "w", newline="") as file:
        csv.writer(file).writerows([["path", "predicted", "probability", *classes, "error"], *rows])
    os.replace(f"{target}.tmp", target)
    log(f"wrote {target}: {len(rows) - failed:,} images classified" +
        (f", {failed:,} could not be read (their rows give the error)" if failed else ""))
    return target


def export_run(args, log):
    """--export FILE: the backbone with LoRA merged in, the heads and the gate, with what rebuilds them."""
    model, trained, classes = load_run(args, torch.device("cpu"))
    name, kwargs = (TINY["name"], {k: v for k, v in TINY.items() if k != "name"}) if trained.model == "tiny" \
        else (trained.model, {})
    mean, std = normalisation(trained.model)
    scilt.export(model, f"{args.export}.tmp", model=name, model_kwargs={**kwargs, "img_size": trained.img_size},
                 img_size=trained.img_size, mean=mean, std=std, classes=classes)
    os.replace(f"{args.export}.tmp", args.export)
    log(f"wrote {args.export} ({os.path.getsize(args.export) / 2**20:.1f} MB): scilt.load_exported() reads it")
    return Path(args.export)


def main(argv=None):
    args = parse_args(argv)
    try:
        if (args.predict or args.export) and "RANK" in os.environ:
            raise Abort("--predict and --export run in one process: start them with python, not torchrun")
        if args.predict:
            return predict_images(args, torch.device(args.device), print)
        if args.export:
            return export_run(args, print)
        return run(args)
    except (Abort, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
