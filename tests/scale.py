"""Time and memory of what train.py does after its forward passes, at the size of a real benchmark:

    python tests/scale.py --images 115846 --classes 1000 --dim 768                 # ImageNet-LT
    python tests/scale.py --images 437513 --classes 8142 --dim 768 --val 0 --test 24426 --probe-steps 2

On random long-tailed features of that size, on the CPU, it runs the very functions train.py uses: head
initialisation (class means and the fitted scale), the step-0 model's predictions and the linear probe
(`start_metrics`), and the report with its Rademacher check. Prints one JSON line: the seconds of each part
and the peak resident memory. The forward passes themselves (the GPU's work) are not part of it.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scilt  # noqa: E402
import train  # noqa: E402


def features(labels, centres, generator):
    """(N, D) float32 features: the class's centre plus noise, made a chunk at a time."""
    return torch.cat([centres[part] + torch.randn(len(part), centres.shape[1], generator=generator)
                      for part in labels.split(65536)])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=115846, help="training images")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--val", type=int, default=20000)
    p.add_argument("--test", type=int, default=50000)
    p.add_argument("--probe-steps", type=int, default=200, help="L-BFGS iterations of each probe fit (train.py: 200)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    generator = torch.Generator().manual_seed(0)
    # a long-tailed training set: n_k proportional to r^(-k/(K-1)), r = 100, at least one image a class
    prior = 100.0 ** (-torch.arange(args.classes) / max(1, args.classes - 1))
    counts = (prior / prior.sum() * (args.images - args.classes)).floor().long() + 1
    counts[0] += args.images - counts.sum()
    labels = torch.arange(args.classes).repeat_interleave(counts)
    balanced = lambda n: torch.arange(n) % args.classes
    centres = 3 * F.normalize(torch.randn(args.classes, args.dim, generator=generator), dim=-1) / args.dim ** 0.5
    sets = {name: {"labels": y, "h": torch.stack([features(y, centres, generator) for _ in range(2)], 1)}
            for name, y in (("train", labels), ("val", balanced(args.val)), ("test", balanced(args.test)))}
    backbone = scilt.create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=16, embed_dim=args.dim,
                                     depth=2, num_heads=max(1, args.dim // 64))
    model = scilt.SciLT(backbone, counts.tolist())
    classes, seconds, peak = [f"class{k}" for k in range(args.classes)], {}, {}
    peak["features"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

    def timed(name, function, *arguments):
        started = time.perf_counter()
        result = function(*arguments)
        seconds[name] = round(time.perf_counter() - started, 1)
        peak[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        print(f"{name}: {seconds[name]} s, peak memory so far {peak[name]} GB", file=sys.stderr, flush=True)
        return result

    timed("init_heads", model.init_heads, train.levels(model, sets["train"]), labels)

    def classify_all():  # what predict() keeps of each image after its forward pass: the predicted classes
        for s in sets.values():
            parts = [[z.argmax(1) for z in (out.logits, *out.levels)]
                     for out in (model.classify(h[:, 0], h[:, 1]) for h in s["h"].split(8192))]
            s.update({name: torch.cat([part[i] for part in parts] or [torch.zeros(0, dtype=torch.long)])
                      for i, name in enumerate(("fused", "penultimate", "final"))})

    timed("classify", classify_all)
    with torch.enable_grad():
        before = timed("start_metrics (step 0 and the probe)", lambda: train.start_metrics(
            *sets.values(), counts.tolist(), counts.tolist(), classes, "cpu", args.probe_steps))
    timed("report (with the Rademacher check)", train.report, model, sets["test"], sets["val"], sets["train"], classes,
          counts.tolist(), counts.tolist(), before)
    print(json.dumps({"images": args.images, "classes": args.classes, "dim": args.dim, "val": args.val,
                      "test": args.test, "probe_steps": args.probe_steps, "seconds": seconds,
                      "total_seconds": round(sum(seconds.values()), 1),
                      "peak_rss_gb": max(peak.values()), "peak_rss_gb_after": peak}))


if __name__ == "__main__":
    main()
