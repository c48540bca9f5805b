"""The embedded default's stand-in foundation models:

    python scripts/pretrain_tiny.py --source cells|fractals

The tiny ViT of train.py (TINY: 6 blocks, width 96, 0.7M parameters), trained from scratch on one
of two source domains; the file it writes (fp16, backbone without its head) ships with the
repository, so users never run this.

cells -> tiny_vit.safetensors, the default: the 14 cell types of the synthetic generator that the
benchmark does NOT use (all combinations of stain x nuclei x shape x texture but the ten benchmark
classes), in the original stain, 200,000 images; 4,000 steps of batch 512 (70% held-out accuracy;
90 s on one H200, hours on a CPU). A source near the target: new classes of the same kind of image.

fractals -> fractal_vit.safetensors: the paper's premise is a domain gap, a model pretrained on one
kind of image meeting scientific images with its top blocks specialised to the pretraining task.
Here the source is formula-driven (FractalDB, Kataoka et al. 2020): each class a random iterated
function system (2-4 contractive affine maps), each image one rendering of it by the chaos game
with its maps jittered, in a random colour on black; 50 fractals x 1,000 images, 1,500 steps of
batch 256 (80% held-out accuracy; 34 minutes on one CPU core).
"""
import argparse
import itertools
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import data  # noqa: E402
import scilt  # noqa: E402

FACTORS = itertools.product((0, 1), (1, 2, 3), (0, 1), (0, 1))  # stain, nuclei, shape, texture
UPSTREAM = [t for t in FACTORS if t not in data.CELL_TYPES]
SOURCES = {  # each recipe: images, steps, batch, warm-up steps, smallest crop, vertical flips
    "cells": dict(out="tiny_vit.safetensors", steps=4000, batch_size=512, warmup=200, crop=0.6,
                  vertical=True),
    "fractals": dict(out="fractal_vit.safetensors", steps=1500, batch_size=256, warmup=100,
                     crop=0.7, vertical=False),
}


def draw_cells(seed, n=2000):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(UPSTREAM), n)
    data.CELL_TYPES[:] = UPSTREAM  # draw_cells reads the factor table by label (a copy per worker)
    return data.draw_cells(labels, rng), labels


def random_system(rng):
    """2-4 affine maps x -> A x + b with singular values < 0.9 (contractive), each chosen with
    probability proportional to |det A|, as FractalDB draws them."""
    maps = []
    while len(maps) < rng.integers(2, 5):
        A, b = rng.uniform(-1, 1, (2, 2)), rng.uniform(-1, 1, 2)
        if np.linalg.svd(A, compute_uv=False)[0] < 0.9 and abs(np.linalg.det(A)) > 0.05:
            maps.append(np.concatenate([A, b[:, None]], 1))
    maps = np.stack(maps)
    return maps, np.abs(np.linalg.det(maps[:, :, :2]))


def render(systems, rng, size=32, points=3000, jitter=0.03):
    """One image per (maps, weights) system: the chaos game's points (the first 20 dropped) binned
    on a size x size grid fitted to their extent, as density in a random colour on black."""
    n, most = len(systems), max(len(m) for m, _ in systems)
    maps = np.zeros((n, most, 2, 3))
    chance = np.zeros((n, most))
    for i, (m, w) in enumerate(systems):
        maps[i, :len(m)] = m + rng.normal(0, jitter, m.shape)  # each image its own variant
        chance[i, :len(m)] = w / w.sum()
    cumulative = chance.cumsum(1)
    x, trace = np.zeros((n, 2)), np.zeros((points, n, 2))
    for t in range(points + 20):
        choice = np.minimum((rng.random((n, 1)) > cumulative).sum(1), most - 1)
        step = maps[np.arange(n), choice]
        x = np.einsum("nij,nj->ni", step[:, :, :2], x) + step[:, :, 2]
        if t >= 20:
            trace[t - 20] = x
    low, high = np.percentile(trace, 1, axis=0), np.percentile(trace, 99, axis=0)
    scaled = (trace - low) / np.maximum(high - low, 1e-6) * (size - 2) + 1
    cells = np.clip(scaled, 0, size - 1).astype(int)
    index = np.arange(n)[None, :] * size * size + cells[..., 1] * size + cells[..., 0]
    density = np.bincount(index.ravel(), minlength=n * size * size)
    density = density.reshape(n, size, size).astype(float)
    bright = np.percentile(density.reshape(n, -1), 97, axis=1)[:, None, None].clip(1)
    density = np.clip(density / bright, 0, 1)
    colour = rng.uniform(64, 255, (n, 1, 1, 3))
    return (colour * density[..., None]).astype(np.uint8)  # on black, as FractalDB


def fractal_classes(count, seed=0, size=32):
    """`count` systems whose rendering fills 10% to 60% of the canvas (FractalDB's filter)."""
    rng, kept = np.random.default_rng(seed), []
    while len(kept) < count:
        system = random_system(rng)
        if 0.1 < (render([system], rng, size, jitter=0)[0].max(-1) > 0).mean() < 0.6:
            kept.append(system)
    return kept


def source_images(name):
    """The pretraining set of one source: uint8 images (N, 32, 32, 3) and labels."""
    if name == "cells":  # seeds 10_000.. : no image of the benchmark (seeds 0..) repeats
        with ProcessPoolExecutor() as pool:
            parts = list(pool.map(draw_cells, range(10_000, 10_100)))
        return (np.concatenate(part) for part in zip(*parts))
    rng, systems = np.random.default_rng(1), fractal_classes(50)
    labels = rng.permutation(np.repeat(np.arange(len(systems)), 1000))
    images = [render([systems[k] for k in part], rng) for part in np.array_split(labels, 50)]
    return np.concatenate(images), labels


def batch(images, index, recipe, img_size, train_mode):
    """The images at `index` as the model takes them: with a random crop and flips in training,
    as data.py augments (no colour change), resized to img_size."""
    x = images[index].float() / 127.5 - 1  # the model's mean and std are 0.5
    if train_mode:
        fraction = recipe["crop"] + (1 - recipe["crop"]) * torch.rand(()).item()
        side = int(x.shape[-1] * fraction)
        top, left = torch.randint(0, x.shape[-1] - side + 1, (2,)).tolist()
        x = x[..., top:top + side, left:left + side]
        x = x.flip(-1) if torch.rand(()) < 0.5 else x
        x = x.flip(-2) if recipe["vertical"] and torch.rand(()) < 0.5 else x
    return F.interpolate(x, size=(img_size,) * 2, mode="bilinear", antialias=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=SOURCES, default="fractals")
    p.add_argument("--out", help="default: the file the source's model ships as")
    args = p.parse_args()
    recipe = SOURCES[args.source]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    start = time.time()
    images, labels = source_images(args.source)
    classes = len(UPSTREAM) if args.source == "cells" else 50
    images = torch.tensor(images).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.tensor(labels).to(device)
    print(f"{len(images)} images of {classes} {args.source} classes in {time.time() - start:.0f}s",
          flush=True)
    held_out = len(images) // 50

    kwargs = {k: v for k, v in checkpoint.TINY.items() if k != "name"}
    model = timm.create_model(checkpoint.TINY["name"], num_classes=classes, **kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    model.train()
    for step in range(recipe["steps"]):
        warm = min(1, (step + 1) / recipe["warmup"])
        lr = 1e-3 * warm * 0.5 * (1 + np.cos(np.pi * step / recipe["steps"]))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(held_out, len(images), (recipe["batch_size"],), device=device)
        with scilt.autocast(device):
            x = batch(images, index, recipe, kwargs["img_size"], True)
            loss = F.cross_entropy(model(x), labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == recipe["steps"] - 1:
            model.eval()
            index = torch.arange(held_out, device=device)
            with torch.no_grad():
                predicted = model(batch(images, index, recipe, kwargs["img_size"], False)).argmax(1)
                accuracy = (predicted == labels[:held_out]).float().mean().item()
            model.train()
            print(f"step {step} loss {loss.item():.3f} held-out accuracy {accuracy:.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    model.reset_classifier(0)
    from safetensors.torch import save_file
    out = args.out or ROOT / recipe["out"]
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
