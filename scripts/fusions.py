"""Fusions that follow held-out behaviour, measured after training on the runs of scripts/table.py:

    python scripts/fusions.py [--tag T] [--sets ...] [--seeds 0 1 2] [-- train.py flags]

For every `scilt class` run (the per-class gate trained with the heads), the same trained heads
fused four ways at prediction: the gate as trained; the plain average (a = 1/2, nothing fitted);
one weight a shared by all classes, fitted on val after training (the a of 0, 0.05, .. 1 with the
best val balanced accuracy); and the head val prefers. Val scores a fitted fusion by two-fold
cross-validation inside val (fitted on one half, scored on the other), so that val can decide
between them fairly; test is reported beside it, never used to choose. Mean ± standard deviation
over seeds, and each fusion minus the gate, paired by seed.
"""
import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scilt  # noqa: E402
import table  # noqa: E402
import train  # noqa: E402
from data import Loader  # noqa: E402
from predict import load_run  # noqa: E402

GRID = np.linspace(0, 1, 21)  # the shared weight a on the penultimate level


@torch.no_grad()
def scores(model, dataset, batch_size=256):
    """Each level's scores s_l and the gate's fused s of every image: (N, L + 1, K), and labels."""
    kept, labels = [], []
    for images, y in Loader(dataset, batch_size=batch_size):
        out = model(images)
        kept.append(torch.stack([out.logits, *out.level_scores], 1).float())
        labels.append(y)
    return torch.cat(kept), torch.cat(labels)


def balanced(logits, labels):
    counts = [1] * logits.shape[-1]  # balanced accuracy needs no training counts
    return scilt.long_tail_metrics(logits.argmax(-1), labels, counts)["balanced_acc"]


def shared(logits, a):
    return a * logits[:, 1] + (1 - a) * logits[:, 2]


def fit(fusion, logits, labels):
    """What a fusion takes from val: the shared a, or the better head (1 or 2); None if nothing."""
    if fusion == "shared a on val":
        accuracies = [balanced(shared(logits, a), labels) for a in GRID]
        return GRID[int(np.argmax(accuracies))]  # the first of equals
    if fusion == "head on val":
        return 1 + int(np.argmax([balanced(logits[:, 1 + l], labels) for l in range(2)]))
    return None


def fused(fusion, logits, chosen):
    if fusion == "gate":
        return logits[:, 0]
    if fusion == "average":
        return shared(logits, 0.5)
    if fusion == "shared a on val":
        return shared(logits, chosen)
    return logits[:, chosen]  # the head val prefers


def two_fold(fusion, logits, labels, seed=0):
    """Fit on one half of val, score on the other, both ways; the mean of the two."""
    halves = np.array_split(np.random.default_rng(seed).permutation(len(labels)), 2)
    results = []
    for fit_on, score_on in (halves, halves[::-1]):
        chosen = fit(fusion, logits[fit_on], labels[fit_on])
        results.append(balanced(fused(fusion, logits[score_on], chosen), labels[score_on]))
    return float(np.mean(results))


FUSIONS = ("gate", "average", "shared a on val", "head on val")


def measure(out):
    """val (two-fold) and test balanced accuracy of each fusion for the run in `out`."""
    model, trained, classes = load_run(out, torch.device("cpu"))
    trained.no_download = True
    data = train.load_run_data(trained, Path(out) / "splits.csv")
    val, val_labels = scores(model, data.val)
    test, test_labels = scores(model, data.test)
    result = {}
    for fusion in FUSIONS:
        chosen = fit(fusion, val, val_labels)  # on the whole of val, for test
        result[fusion] = (two_fold(fusion, val, val_labels),
                          balanced(fused(fusion, test, chosen), test_labels))
    return result


def cell(values):
    values = [100 * v for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=["embedded", "res48", "large", "fractal"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tag", default="")
    args, flags = p.parse_known_args()
    runs = table.Runs(table.make_sets(), args.tag, [f for f in flags if f != "--"])
    print("| set | fusion | val (two-fold) | test | val − gate | test − gate |")
    print("|---|---|---|---|---|---|")
    for name in args.sets:
        measured = [measure(runs.folder(name, "scilt-class", seed)) for seed in args.seeds]
        for fusion in FUSIONS:
            val = [m[fusion][0] for m in measured]
            test = [m[fusion][1] for m in measured]
            gains = [cell([m[fusion][i] - m["gate"][i] for m in measured]) for i in (0, 1)]
            print(f"| {name} | {fusion} | {cell(val)} | {cell(test)} | {gains[0]} | {gains[1]} |")


if __name__ == "__main__":
    main()
