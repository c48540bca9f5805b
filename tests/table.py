"""The README's results tables: python tests/table.py [--sets ...] [--seeds 0 1 2] [--fusions] [-- train.py flags]

Four generated data sets of different character, each trained with `python train.py` at its defaults
(--method final, penultimate, scilt; 3 seeds), into runs/table/<set>/<method>-<seed>; a run already there
is reused. Prints, per set, the model at step 0 (`start`), a linear probe on the frozen features (`probe`)
and the three methods: mean ± sample standard deviation over seeds, and each method's gain over the
better of start and probe, paired by seed.

  embedded  the embedded default (--data synthetic): 10 cell types, 400 -> 4 training images, 48 -> 32 px
  small     460 images (135 -> 7; a tenth kept for val), 10 types drawn at 32 px, PNG files (--data folder)
  res48     6 cell types drawn at 64 px and seen at 48 px, 300 -> 15, a MedMNIST-style .npz (--data npz)
  large     2,478 training images (1,000 -> 10), 10 types, .npz
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

OUT = ROOT / "runs" / "table"
COLUMNS = ("balanced_acc", "many", "medium", "few")


def draw(labels, seed, size):
    """The embedded benchmark's cells (and its stain gap: colour channels permuted) at any size."""
    return data.draw_cells(np.asarray(labels), np.random.default_rng(seed), size)[..., [1, 2, 0]]


def write_folder(root, types, train_counts, test_per_class, size, seed=100):
    for split, counts in (("train", train_counts), ("test", [test_per_class] * len(types))):
        labels = np.repeat(types, counts)
        for i, (image, label) in enumerate(zip(draw(labels, seed + len(split), size), labels)):
            folder = root / split / data.cell_name(*data.CELL_TYPES[label])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")


def write_npz(path, types, train_counts, val_per_class, test_per_class, size, seed=200):
    arrays = {}
    for split, counts in (("train", train_counts), ("val", [val_per_class] * len(types)),
                          ("test", [test_per_class] * len(types))):
        labels = np.repeat(np.arange(len(types)), counts)
        arrays[f"{split}_images"] = draw(np.asarray(types)[labels], seed + len(split), size)
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez(path, classes=np.array([data.cell_name(*data.CELL_TYPES[t]) for t in types]), **arrays)


def make_sets():
    """name -> train.py flags; writes the generated files once."""
    sets = {"embedded": []}
    small = OUT / "data" / "small"
    if not small.exists():
        write_folder(small, list(range(10)), data.long_tail_counts(135, 10, 20), 50, size=32)
    sets["small"] = ["--data", "folder", "--data-root", str(small), "--model", "tiny"]
    res48 = OUT / "data" / "res48.npz"
    if not res48.exists():
        res48.parent.mkdir(parents=True, exist_ok=True)
        write_npz(res48, [0, 2, 3, 5, 6, 9], data.long_tail_counts(300, 6, 20), 20, 80, size=64)
    sets["res48"] = ["--data", "npz", "--data-root", str(res48), "--model", "tiny", "--img-size", "48"]
    large = OUT / "data" / "large.npz"
    if not large.exists():
        write_npz(large, list(range(10)), data.long_tail_counts(1000, 10, 100), 20, 80, size=48)
    sets["large"] = ["--data", "npz", "--data-root", str(large), "--model", "tiny"]
    return sets


def cell(values):
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def runs_of(name, method, seeds, tag, flags, sets):
    """metrics.json of `python train.py <set flags> --method M --seed S <flags>` per seed, run if missing."""
    runs = []
    for seed in seeds:
        out = OUT / (tag or "default") / name / f"{method}-{seed}"
        if not (out / "metrics.json").exists():
            command = [sys.executable, "train.py", *sets[name], "--method", method, "--seed", str(seed),
                       "--out", str(out), *flags]
            print(" ".join(command[1:]), file=sys.stderr, flush=True)
            subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        runs.append(json.loads((out / "metrics.json").read_text()))
    return runs


def spread(runs):
    return [max(r["fusion_weights"].values()) - min(r["fusion_weights"].values()) for r in runs]


def print_table(name, args, flags, sets):
    runs = {method: runs_of(name, method, args.seeds, args.tag, flags, sets) for method in args.methods}
    rows = {"start": [r["heads"]["start"] for r in runs[args.methods[-1]]],
            "probe": [r["heads"]["probe"] for r in runs[args.methods[-1]]]}
    rows.update({method: [r["heads"]["fused" if method == "scilt" else method] for r in rs]
                 for method, rs in runs.items()})
    bar = [max(s["balanced_acc"], q["balanced_acc"]) for s, q in zip(rows["start"], rows["probe"])]
    print(f"\n{name} ({sum(runs[args.methods[-1]][0]['class_counts'].values())} training images, "
          f"seeds {' '.join(map(str, args.seeds))})\n")
    print(f"| | {' | '.join(c.removesuffix('_acc') for c in COLUMNS)} | balanced − max(start, probe) |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for row, metrics in rows.items():
        gain = cell([m["balanced_acc"] - b for m, b in zip(metrics, bar)]) if row in runs else ""
        print(f"| {row} | {' | '.join(cell([m[c] for m in metrics]) for c in COLUMNS)} | {gain} |")
    if "scilt" in runs:
        correlation = [r["fusion_val_correlation"] for r in runs["scilt"]]
        print(f"\nscilt: spread of the fusion weights (max a - min a) {', '.join(f'{s:.2f}' for s in spread(runs['scilt']))}; "
              f"val correlation of a with the penultimate head's per-class gain "
              f"{', '.join('-' if c is None else f'{c:+.2f}' for c in correlation)}")


def print_fusions(name, args, flags, sets):
    """scilt with each --fusion; differences paired by seed against the default (class)."""
    runs = {f: runs_of(name, "scilt", args.seeds, "" if f == "class" else f"fusion-{f}", flags + ["--fusion", f], sets)
            for f in ("class", "fixed", "sample")}
    print(f"\n{name}, scilt by fusion (seeds {' '.join(map(str, args.seeds))})\n")
    print("| fusion | balanced | few | balanced − class | few − class | spread of a |\n|---|---|---|---|---|---|")
    for f, rs in runs.items():
        diff = lambda key: "" if f == "class" else cell([r[key] - c[key] for r, c in zip(rs, runs["class"])])
        a = f"{statistics.mean(spread(rs)):.2f}" if f != "fixed" else "0"
        print(f"| {f} | {cell([r['balanced_acc'] for r in rs])} | {cell([r['few'] for r in rs])} | "
              f"{diff('balanced_acc')} | {diff('few')} | {a} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=["embedded", "small", "res48", "large"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["final", "penultimate", "scilt"])
    p.add_argument("--fusions", action="store_true", help="compare --fusion class, fixed and sample instead")
    p.add_argument("--tag", default="", help="a sub-folder name for runs with extra train.py flags")
    args, flags = p.parse_known_args()
    flags = [f for f in flags if f != "--"]
    sets = make_sets()
    for name in args.sets:
        (print_fusions if args.fusions else print_table)(name, args, flags, sets)


if __name__ == "__main__":
    main()
