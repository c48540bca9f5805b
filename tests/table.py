"""The README's results tables: python tests/table.py [--sets ...] [--seeds 0 1 2] [--fusions | --analyze-only]
[--tag T] [-- train.py flags, e.g. --weights fractal_vit.safetensors]

Four generated data sets of different character, each trained with `python train.py` at its defaults into
runs/table/<tag or default>/<set>/<run>-<seed>; a run already there is reused. Per set: the --analyze table
of the frozen stand-in (best block per column, the pair recommended on val), then the model at step 0
(`start`), a linear probe on the frozen features (`probe`), --method final, penultimate and scilt, and
scilt on the recommended levels: mean ± sample standard deviation over seeds, each method's gain over the
better of start and probe, paired by seed, and every scilt run's fused prediction against its own heads.

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


def run_once(name, label, seed, tag, flags, sets, analyze=False):
    """metrics.json (layers.json) of `python train.py <set flags> --seed S <flags>`, run if missing."""
    out = OUT / (tag or "default") / name / f"{label}-{seed}"
    result = out / ("layers.json" if analyze else "metrics.json")
    if not result.exists():
        command = [sys.executable, "train.py", *sets[name], "--seed", str(seed), "--out", str(out), *flags]
        print(" ".join(command[1:]), file=sys.stderr, flush=True)
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def runs_of(name, method, seeds, tag, flags, sets):
    return [run_once(name, method, seed, tag, ["--method", method, *flags], sets) for seed in seeds]


def print_analysis(name, analyses):
    """--analyze over seeds: each block's frozen class means and probe, balanced and tail accuracy on test
    (mean over seeds, * the best block per column), and the level pair each seed's val recommends."""
    layers = [a["layers"] for a in analyses]
    tail = "few" if layers[0][0]["ncm"]["few"] is not None and layers[0][0]["ncm"]["many"] is not None else "tail"
    columns = [(kind, key) for kind in ("ncm", "probe") for key in ("balanced_acc", tail)]
    mean = lambda block, c: statistics.mean(100 * (run[block][c[0]][c[1]] or 0) for run in layers)
    best = {c: max(range(len(layers[0])), key=lambda block: mean(block, c)) for c in columns}
    print(f"\n{name}, --analyze on the frozen stand-in (test, mean of {len(layers)} seeds; * best block)\n")
    print("| block | class means balanced | class means " + tail + " | probe balanced | probe " + tail + " |")
    print("|---|---|---|---|---|")
    for block in range(len(layers[0])):
        cells = (f"{mean(block, c):.1f}{'*' if best[c] == block else ''}" for c in columns)
        print(f"| {block + 1} | " + " | ".join(cells) + " |")
    pairs = (" ".join(map(str, a["recommended"]["blocks"])) for a in analyses)
    print("\nrecommended on val, by seed: " + ", ".join(pairs))


def analyses_of(name, args, flags, sets):
    return [run_once(name, "analyze", seed, args.tag, ["--analyze", *flags], sets, analyze=True)
            for seed in args.seeds]


def print_table(name, args, flags, sets):
    analyses = analyses_of(name, args, flags, sets)
    print_analysis(name, analyses)
    runs = {method: runs_of(name, method, args.seeds, args.tag, flags, sets) for method in args.methods}
    default = [len(analyses[0]["layers"]) - 1, len(analyses[0]["layers"])]
    runs["scilt, recommended levels"] = [  # the default's run where the default is recommended
        scilt if a["recommended"]["blocks"] == default else
        run_once(name, "scilt-recommended", seed, args.tag,
                 ["--blocks", *map(str, a["recommended"]["blocks"]), *flags], sets)
        for seed, a, scilt in zip(args.seeds, analyses, runs["scilt"])]
    rows = {row: [r["heads"][row] for r in runs["scilt"]] for row in ("start", "probe")}
    rows.update({method: [r["heads"]["fused"] for r in rs] for method, rs in runs.items()})
    bar = [max(s["balanced_acc"], q["balanced_acc"]) for s, q in zip(rows["start"], rows["probe"])]
    print(f"\n{name} ({sum(runs['scilt'][0]['class_counts'].values())} training images, "
          f"seeds {' '.join(map(str, args.seeds))})\n")
    print(f"| | {' | '.join(c.removesuffix('_acc') for c in COLUMNS)} | balanced − max(start, probe) |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for row, metrics in rows.items():
        gain = cell([m["balanced_acc"] - b for m, b in zip(metrics, bar)]) if row in runs else ""
        print(f"| {row} | {' | '.join(cell([m[c] for m in metrics]) for c in COLUMNS)} | {gain} |")
    for method in ("scilt", "scilt, recommended levels"):  # every run: the fused prediction against its own heads
        print(f"\n{method}, balanced accuracy of each run's heads (" + "; ".join(
            ", ".join(f"{head} {100 * m['balanced_acc']:.1f}" for head, m in r["heads"].items()
                      if m and head not in ("start", "probe")) for r in runs[method]) + ")")
        print(f"fused − its better head: {cell([fused_gain(r) for r in runs[method]])}; "
              f"fused − its worse head: {cell([fused_gain(r, min) for r in runs[method]])}")


def fused_gain(run, pick=max):
    """The fused prediction's balanced accuracy minus that of the best (pick=min: worst) of the run's own
    level heads."""
    heads = run["heads"]
    return heads["fused"]["balanced_acc"] - pick(m["balanced_acc"] for h, m in heads.items()
                                                 if m and h not in ("start", "probe", "fused"))


def print_fusions(name, args, flags, sets):
    """scilt with each --fusion; differences paired by seed against the default (class)."""
    runs = {f: runs_of(name, "scilt", args.seeds, "-".join(filter(None, (args.tag, "fusion", f))),
                      flags + ["--fusion", f], sets)
            for f in ("class", "fixed")}
    print(f"\n{name}, scilt by fusion (seeds {' '.join(map(str, args.seeds))})\n")
    print("| fusion | balanced | few | balanced − class | fused − its better head | fused − its worse head |\n"
          "|---|---|---|---|---|---|")
    for f, rs in runs.items():
        diff = "" if f == "class" else cell([r["balanced_acc"] - c["balanced_acc"] for r, c in zip(rs, runs["class"])])
        print(f"| {f} | {cell([r['balanced_acc'] for r in rs])} | {cell([r['few'] for r in rs])} | {diff} | "
              f"{cell([fused_gain(r) for r in rs])} | {cell([fused_gain(r, min) for r in rs])} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=["embedded", "small", "res48", "large"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["final", "penultimate", "scilt"])
    p.add_argument("--fusions", action="store_true", help="compare --fusion class and fixed instead")
    p.add_argument("--analyze-only", action="store_true", help="only the --analyze tables")
    p.add_argument("--tag", default="", help="a sub-folder name for runs with extra train.py flags")
    args, flags = p.parse_known_args()
    flags = [f for f in flags if f != "--"]
    sets = make_sets()
    for name in args.sets:
        if args.analyze_only:
            print_analysis(name, analyses_of(name, args, flags, sets))
        else:
            (print_fusions if args.fusions else print_table)(name, args, flags, sets)


if __name__ == "__main__":
    main()
