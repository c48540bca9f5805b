"""Make tiny_vit.safetensors, the embedded default's stand-in foundation model: python tests/pretrain_tiny.py

The tiny ViT of train.py (TINY) trained from scratch on the 14 cell types of the synthetic generator that
the embedded benchmark does NOT use (all combinations of stain x nuclei x shape x texture but the ten
benchmark classes), balanced, with fresh images. The benchmark then fine-tunes it on ten new cell types,
as a real foundation model is fine-tuned on classes it never saw. Needs a GPU for a few minutes (hours on
a CPU); the file it writes (fp16, backbone without its head) is committed, so users never run this.
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
import data  # noqa: E402
import train  # noqa: E402

UPSTREAM = [t for t in itertools.product((0, 1), (1, 2, 3), (0, 1), (0, 1)) if t not in data.CELL_TYPES]


def draw(seed, n=2000):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(UPSTREAM), n)
    data.CELL_TYPES[:] = UPSTREAM  # draw_cells reads the factor table by label (a copy per worker)
    return data.draw_cells(labels, rng), labels


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "tiny_vit.safetensors"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    start = time.time()
    with ProcessPoolExecutor() as pool:  # seeds 10_000.. : no image of the benchmark (seeds 0..) repeats
        parts = list(pool.map(draw, range(10_000, 10_000 + args.images // 2000)))
    images = torch.tensor(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(np.concatenate([p[1] for p in parts]))
    print(f"{len(images)} images of {len(UPSTREAM)} upstream cell types in {time.time() - start:.0f}s")
    images, labels = images.to(device), labels.to(device)
    held_out = len(images) // 50

    kwargs = {k: v for k, v in train.TINY.items() if k != "name"}
    model = timm.create_model(train.TINY["name"], num_classes=len(UPSTREAM), **kwargs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    size = kwargs["img_size"]

    def batch(index, train_mode):
        x = images[index].float() / 127.5 - 1  # the model's mean and std are 0.5
        if train_mode:  # random crop of 60..100% of the side, flips: what data.py does
            side = int(x.shape[-1] * (0.6 + 0.4 * torch.rand(()).item()))
            top, left = torch.randint(0, x.shape[-1] - side + 1, (2,)).tolist()
            x = x[..., top:top + side, left:left + side]
            x = x.flip(-1) if torch.rand(()) < 0.5 else x
            x = x.flip(-2) if torch.rand(()) < 0.5 else x
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)

    model.train()
    for step in range(args.steps):
        lr = 1e-3 * min(1, (step + 1) / 200) * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(held_out, len(images), (args.batch_size,), device=device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(batch(index, True)), labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == args.steps - 1:
            model.eval()
            with torch.no_grad():
                accuracy = (model(batch(torch.arange(held_out, device=device), False)).argmax(1)
                            == labels[:held_out]).float().mean().item()
            model.train()
            print(f"step {step} loss {loss.item():.3f} held-out accuracy {accuracy:.3f} ({time.time() - start:.0f}s)")
    model.reset_classifier(0)
    from safetensors.torch import save_file
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
