"""Time and memory of what train.py does after its forward passes, at a real benchmark's size:

    python scripts/scale.py --images 115846 --classes 1000 --dim 768          # ImageNet-LT
    python scripts/scale.py --images 437513 --classes 8142 --dim 768 --val 0 --test 24426 \\
        --probe-steps 2                                                       # iNaturalist 2018

On random long-tailed features of that size, on the CPU, it runs the very functions train.py uses:
head initialisation (class means and the fitted scale), the step-0 model's predictions and the
linear probe (report.start_metrics), and the report with its Rademacher check. Prints one JSON
line: the seconds of each part and the peak resident memory. The forward passes themselves (the
GPU's work) are not part of it.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import report  # noqa: E402
import scilt  # noqa: E402


def features(labels, centres, generator):
    """(N, D) float32 features: the class's centre plus noise, made a chunk at a time."""
    return torch.cat([centres[part] + torch.randn(len(part), centres.shape[1], generator=generator)
                      for part in labels.split(65536)])


def peak_gb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def classify_all(model, evaluation):
    """What report.evaluate() keeps of each image after its forward pass: the predicted classes."""
    heads = ("fused", *model.level_names())
    predicted = {name: [torch.zeros(0, dtype=torch.long)] for name in heads}
    for h in evaluation.level_features.split(8192):
        out = model.classify(h[:, 0], h[:, 1])
        for name, scores in zip(predicted, (out.logits, *out.level_scores)):
            predicted[name].append(scores.argmax(1))
    evaluation.predicted.update({name: torch.cat(parts) for name, parts in predicted.items()})


def random_sets(args):
    """Training counts n_k proportional to r^(-k/(K-1)), r = 100 (at least one a class), and the
    three sets' evaluations of random features around class centres, two levels each."""
    generator = torch.Generator().manual_seed(0)
    prior = 100.0 ** (-torch.arange(args.classes) / max(1, args.classes - 1))
    counts = (prior / prior.sum() * (args.images - args.classes)).floor().long() + 1
    counts[0] += args.images - counts.sum()
    labels = {"train": torch.arange(args.classes).repeat_interleave(counts),
              "val": torch.arange(args.val) % args.classes,
              "test": torch.arange(args.test) % args.classes}
    centres = torch.randn(args.classes, args.dim, generator=generator)
    centres = 3 * F.normalize(centres, dim=-1) / args.dim ** 0.5
    sets = {}
    for name, y in labels.items():
        h = torch.stack([features(y, centres, generator) for _ in range(2)], 1)  # (N, 2, D)
        sets[name] = report.Evaluation(y, h, h[:, 1], {})
    return counts, sets


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=115846, help="training images")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--val", type=int, default=20000)
    p.add_argument("--test", type=int, default=50000)
    p.add_argument("--probe-steps", type=int, default=200,
                   help="L-BFGS iterations of each probe fit (train.py: 200)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    counts, sets = random_sets(args)
    backbone = scilt.create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=16,
                                     embed_dim=args.dim, depth=2, num_heads=max(1, args.dim // 64))
    model = scilt.SciLT(backbone, counts.tolist())
    classes = [f"class{k}" for k in range(args.classes)]
    data = SimpleNamespace(classes=classes, class_counts=counts.tolist(),
                           group_counts=counts.tolist())
    seconds, peak = {}, {"features": peak_gb()}

    def timed(name, function, *arguments):
        started = time.perf_counter()
        result = function(*arguments)
        seconds[name] = round(time.perf_counter() - started, 1)
        peak[name] = peak_gb()
        print(f"{name}: {seconds[name]} s, peak memory so far {peak[name]} GB", file=sys.stderr,
              flush=True)
        return result

    train_levels = [sets["train"].level_features[:, 0], sets["train"].level_features[:, 1]]
    timed("init_heads", model.init_heads, train_levels, sets["train"].labels)
    timed("classify", lambda: [classify_all(model, s) for s in sets.values()])
    with torch.enable_grad():
        bars = timed("start_metrics (step 0 and the probe)", report.start_metrics,
                     sets["train"], sets["val"], sets["test"], data.class_counts,
                     data.group_counts, classes, model.tau, "cpu", args.probe_steps)
    timed("report (with the Rademacher check)", report.metrics_of, model, sets["test"], sets["val"],
          sets["train"], data, bars)
    print(json.dumps({"images": args.images, "classes": args.classes, "dim": args.dim,
                      "val": args.val, "test": args.test, "probe_steps": args.probe_steps,
                      "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
                      "peak_rss_gb": max(peak.values()), "peak_rss_gb_after": peak}))


if __name__ == "__main__":
    main()
