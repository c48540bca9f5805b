"""Train and evaluate SciLT on a long-tailed scientific image data set.

    python train.py                                             # embedded default: synthetic cells, tiny ViT
    python train.py --data isic --data-root ~/data/isic2019 --epochs 20
    python train.py --data isic --data-root DIR --weights vit_b16_in21k.safetensors   # offline
    torchrun --nproc_per_node=4 train.py --data nih --data-root ~/data/nih-cxr-lt
    python train.py --out runs/x --resume          # continue run x;  --eval-only: re-evaluate its checkpoint

Writes to --out: metrics.json (the report), checkpoint.pt (LoRA, heads, gate, optimizer and arguments:
not the frozen backbone) and splits.csv (the exact train / val / test images). See README.md.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

import scilt
from data import DataError, load_data, write_splits

# The embedded default's backbone: a 6-block ViT on 32 x 32 images (8 x 8 patches of 4 px). Its weights,
# tiny_vit.safetensors, are a stand-in foundation model, made by tests/pretrain_tiny.py: pretrained on 14
# synthetic cell types that the benchmark's 10 classes are not among. --no-pretrained starts it at random
# ("jax" init: with timm's default init of std 0.02 random blocks are nearly the identity).
TINY = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
            weight_init="jax")
TINY_WEIGHTS = Path(__file__).resolve().parent / "tiny_vit.safetensors"
DEFAULTS = {  # what flags left out become: the embedded default, and the real job on a GPU
    "synthetic": dict(model="tiny", epochs=10, batch_size=64, lr=2e-3, img_size=32),
    "real": dict(model="vit_base_patch16_224.augreg_in21k", epochs=20, batch_size=64, lr=1e-3, img_size=224),
}
WARMUP_FRACTION, WEIGHT_DECAY = 0.05, 1e-2


class Abort(Exception):
    """A problem with the user's input: one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = Parser(description="SciLT: long-tailed classification by PEFT of a ViT with penultimate-layer fusion.")
    p.add_argument("--data", default="synthetic", choices=["synthetic", "isic", "nih", "blood", "npz", "folder"])
    p.add_argument("--data-root", help="the data set's folder (or .npz file); see README.md for layouts")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (linear warm-up, cosine decay)")
    p.add_argument("--model", help="'tiny' or a timm ViT name (default per --data)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from pretrained weights (timm's hub; for tiny, tiny_vit.safetensors)")
    p.add_argument("--weights", help="a local weights file (.safetensors or .pth) instead of the hub")
    p.add_argument("--method", default="scilt", choices=scilt.METHODS)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--img-size", type=int)
    p.add_argument("--imbalance-ratio", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, help="data loader processes (default: 0 for synthetic, else up to 8)")
    p.add_argument("--out", help="output folder (default: runs/<data>-<method>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --out on the test set")
    args = p.parse_args(argv)
    if args.model == "tiny" and args.img_size is None:  # on any data set, the size it was pretrained at
        args.img_size = TINY["img_size"]
    for key, value in DEFAULTS["synthetic" if args.data == "synthetic" else "real"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = 0 if args.data == "synthetic" else min(8, os.cpu_count() or 1)
    for name in ("epochs", "batch_size", "lr", "lora_rank", "img_size", "imbalance_ratio"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if (args.resume or args.eval_only) and not args.out:
        p.error("--resume and --eval-only need --out, the folder of the run")
    args.out = args.out or f"runs/{args.data}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def create_backbone(args):
    if args.model == "tiny":  # its pretrained weights ship with this repository: nothing to download
        weights = args.weights or (TINY_WEIGHTS if args.pretrained else None)
        kwargs = dict(TINY, img_size=args.img_size, pretrained=False, weights=weights)
    else:
        kwargs = dict(name=args.model, img_size=args.img_size, pretrained=args.pretrained, weights=args.weights)
    try:
        return scilt.create_backbone(**kwargs)
    except ValueError as error:
        raise Abort(str(error)) from None


def loader(dataset, args, device, *, train, rank, world):
    """Training: a seeded shuffle split over processes. Evaluation: every process takes every world-th
    image, in order, so that the gathered predictions cover the test set exactly once."""
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    if train:
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed)
        return DataLoader(dataset, sampler=sampler, drop_last=len(dataset) // world >= args.batch_size, **common)
    return DataLoader(Subset(dataset, range(rank, len(dataset), world)), **common)


@torch.no_grad()
def predict(model, data_loader, device):
    """Features, head scores and labels of every image of the set, gathered from all processes."""
    model.eval()
    keep = {k: [] for k in ("h_pen", "h_fin", "logits", "s1", "s2", "labels")}
    for images, labels in data_loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            h_pen, h_fin = model.features(images.to(device, non_blocking=True))
            out = model.classify(h_pen, h_fin)
        for key, value in zip(keep, (h_pen, h_fin, *out, labels)):
            if value is not None:
                keep[key].append(value.float().cpu() if value.is_floating_point() else value)
    result = {k: torch.cat(v) for k, v in keep.items() if v}
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, result)
        result = {k: torch.cat([part[k] for part in parts]) for k in result}
    return result


def evaluate(model, predictions, classes, counts):
    """The report: fused-prediction metrics, then each head's, the fusion weights and the Rademacher check."""
    labels = predictions["labels"].numpy()
    heads = {name: scilt.long_tail_metrics(predictions[key].argmax(1).numpy(), labels, counts, classes)
             for name, key in (("fused", "logits"), ("final", "s2"), ("penultimate", "s1")) if key in predictions}
    columns = ("overall_acc", "balanced_acc", "macro_f1", "many", "medium", "few", "head", "middle", "tail")
    return {
        **heads["fused"],
        "class_counts": dict(zip(classes, counts)),
        "heads": {name: ({k: heads[name][k] for k in columns} if name in heads else None)
                  for name in ("penultimate", "final", "fused")},
        "fusion_weights": dict(zip(classes, model.fusion_weights().tolist())),
        "rademacher": scilt.rademacher_check(predictions["h_pen"], predictions["h_fin"], bound=model.scale),
    }


def print_report(metrics):
    percent = lambda v: "     -" if v is None else f"{100 * v:6.1f}"
    columns = ("overall_acc", "balanced_acc", "many", "medium", "few", "head", "middle", "tail")
    print(f"\n{'test set':18s}" + "".join(f"{c.removesuffix('_acc'):>9s}" for c in columns))
    for name, label in (("fused", "fused"), ("final", "final head"), ("penultimate", "penultimate head")):
        if metrics["heads"][name]:
            print(f"{label:18s}" + "".join(f"{percent(metrics['heads'][name][c]):>9s}" for c in columns))
    print(f"\n{'class':26s}{'train':>7s}{'acc':>8s}{'a (penult.)':>13s}")
    for name, count in metrics["class_counts"].items():
        print(f"{name:26s}{count:7d}{percent(metrics['per_class_acc'][name]):>8s}"
              f"{metrics['fusion_weights'][name]:13.3f}")
    r = metrics["rademacher"]
    print(f"\nRademacher check on {r['n']} test features (|w| <= scale on unit features): "
          + ", ".join(f"{k} {r[k]['estimate']:.4f} <= {r[k]['bound']:.4f}" for k in ("penultimate", "final", "scilt"))
          + f": {'holds' if r['holds'] else 'VIOLATED'}")
    print(f"balanced accuracy {percent(metrics['balanced_acc']).strip()}%, macro-F1 "
          f"{percent(metrics['macro_f1']).strip()}%")


def trainable_state(model):
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def save_atomically(obj, path, text=False):
    temporary = Path(f"{path}.tmp")
    if text:
        temporary.write_text(json.dumps(obj, indent=2))
    else:
        torch.save(obj, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, classes):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint["classes"] != classes:
        raise Abort(f"checkpoint {path} was trained on {len(checkpoint['classes'])} classes "
                    f"({', '.join(checkpoint['classes'][:4])}, ...), but this data set has {len(classes)}")
    return checkpoint


def restore(model, optimizer, checkpoint, path):
    if set(checkpoint["model"]) != set(trainable_state(model)):
        old = checkpoint["args"]
        raise Abort(f"checkpoint {path} holds another model: it was trained with --model {old['model']} "
                    f"--method {old['method']} --lora-rank {old['lora_rank']}")
    model.load_state_dict(checkpoint["model"], strict=False)
    optimizer.load_state_dict(checkpoint["optimizer"])


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


def run(args):
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out)
    checkpoint_path = out / "checkpoint.pt"
    continuing = args.resume or args.eval_only
    if not continuing and checkpoint_path.exists():
        raise Abort(f"{out} already holds a run: pass --resume or --eval-only, or choose another --out")
    if continuing and not checkpoint_path.is_file():
        raise Abort(f"no checkpoint at {checkpoint_path}: train into that --out first")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # the data first, normalised as the backbone was pretrained, so that a bad --data-root fails at once
    config = timm.models.get_pretrained_cfg(TINY["name"] if args.model == "tiny" else args.model)
    data = load_data(args.data, args.data_root, img_size=args.img_size, imbalance_ratio=args.imbalance_ratio,
                     seed=args.seed, mean=getattr(config, "mean", (0.5,) * 3), std=getattr(config, "std", (0.5,) * 3),
                     splits=out / "splits.csv" if continuing else None)
    checkpoint = load_checkpoint(checkpoint_path, data.classes) if continuing else None
    backbone = create_backbone(args)
    model = scilt.SciLT(backbone, len(data.classes), data.class_counts, method=args.method,
                        rank=args.lora_rank, alpha=float(args.lora_rank)).to(device)
    trainable, total = scilt.count_parameters(model)
    log(f"{args.data}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
        f"{len(data.classes)} classes, training counts {max(data.class_counts)}..{min(data.class_counts)}")
    log(f"{args.model} + LoRA r={args.lora_rank} on {model.num_lora_layers} layers, method {args.method}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%), {world} x {device}")

    train_loader = loader(data.train, args, device, train=True, rank=rank, world=world)
    val_loader = loader(data.val, args, device, train=False, rank=rank, world=world)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]  # LoRA and head matrices
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # the gate
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    state = dict(epoch=0, best_epoch=0, best_val=-1.0, train_seconds=0.0, best=None)
    if continuing:
        restore(model, optimizer, checkpoint, checkpoint_path)
        state = {k: checkpoint[k] for k in state}
        log(f"loaded {checkpoint_path}: {state['epoch']} epoch(s) done, best val balanced acc "
            f"{100 * state['best_val']:.1f}% at epoch {state['best_epoch']}")
    else:  # heads start as nearest-class-mean classifiers on the pretrained features
        features = predict(model, loader(data.train, args, device, train=False, rank=rank, world=world),
                           device)
        model.init_heads(features["h_pen"].to(device), features["h_fin"].to(device), features["labels"].to(device))
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_splits(out / "splits.csv", data)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    steps_per_epoch = len(train_loader)
    total_steps, warmup = args.epochs * steps_per_epoch, max(1, round(WARMUP_FRACTION * args.epochs * steps_per_epoch))
    learning_rate = lambda step: args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * max(0, step - warmup) / max(1, total_steps - warmup)))
    log_every = max(1, min(50, steps_per_epoch // 4))
    for epoch in range(state["epoch"], 0 if args.eval_only else args.epochs):
        # reseeding each epoch makes a resumed run draw the same shuffles and augmentations
        torch.manual_seed(args.seed + 1000 * rank + epoch)
        train_loader.sampler.set_epoch(epoch)
        ddp.train()
        started, seen, loss_sum = time.time(), 0, torch.zeros((), device=device)
        for i, (images, labels) in enumerate(train_loader):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = model.loss(ddp(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            seen += len(images)
            if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch:
                total_loss = loss_sum.clone()
                if world > 1:  # every process sees the same mean, so all stop together on a bad loss
                    dist.all_reduce(total_loss)
                mean_loss = total_loss.item() / (world * (i + 1))
                if not math.isfinite(mean_loss):
                    raise Abort(f"the loss became {mean_loss} in epoch {epoch + 1}; the last good checkpoint "
                                f"is {checkpoint_path} (try a lower --lr)")
                elapsed = time.time() - started
                left = elapsed / (i + 1) * (total_steps - step - 1)
                log(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch} loss {mean_loss:.4f} "
                    f"lr {learning_rate(step):.2e} {seen * world / elapsed:.0f} img/s "
                    f"left {int(left // 60)}m{int(left % 60):02d}s")
        state["train_seconds"] += time.time() - started
        val = predict(model, val_loader, device)
        val = scilt.long_tail_metrics(val["logits"].argmax(1), val["labels"], data.class_counts)["balanced_acc"]
        state["epoch"] = epoch + 1
        if val > state["best_val"]:
            state.update(best_val=val, best_epoch=epoch + 1, best=trainable_state(model))
        log(f"epoch {epoch + 1}: val balanced acc {100 * val:.1f}% (best {100 * state['best_val']:.1f}% at "
            f"epoch {state['best_epoch']})")
        if rank == 0:
            save_atomically({**state, "model": trainable_state(model), "optimizer": optimizer.state_dict(),
                             "classes": data.classes, "args": vars(args)}, checkpoint_path)

    if state["best"] is not None:  # test the epoch that did best on val
        model.load_state_dict(state["best"], strict=False)
    predictions = predict(model, loader(data.test, args, device, train=False, rank=rank, world=world), device)
    if rank == 0:
        metrics = evaluate(model, predictions, data.classes, data.class_counts)
        metrics.update(trainable_params=trainable, total_params=total, train_seconds=round(state["train_seconds"], 1),
                       method=args.method, best_epoch=state["best_epoch"], epochs=state["epoch"], args=vars(args))
        print_report(metrics)
        save_atomically(metrics, out / "metrics.json", text=True)
        log(f"wrote {out / 'metrics.json'}, {checkpoint_path}, {out / 'splits.csv'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (Abort, DataError) as error:
        # a DataLoader worker re-raises our DataError with its traceback in the message: keep our line
        print(f"error: {str(error).strip().splitlines()[-1].removeprefix('data.DataError: ')}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
