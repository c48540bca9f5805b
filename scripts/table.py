"""The README's results tables, over seeds and generated data sets:

    python scripts/table.py [--sets ...] [--seeds 0 1 2] [--fusions | --analyze-only] [--tag T]
                            [-- train.py flags, e.g. --weights fractal_vit.safetensors]

Four generated data sets of different character, each trained with `python train.py` at its
defaults into runs/table/<tag or default>/<set>/<run>-<seed>; a run already there is reused. Per
set: the per-block table of the frozen stand-in (scripts/analyze.py: best block per column, the
pair recommended on val), then the model at step 0 (`start`), a linear probe on the frozen features
(`probe`), --method final, penultimate and scilt, and scilt on the recommended levels: mean ±
sample standard deviation over seeds, each method's gain over the better of start and probe,
paired by seed, and every scilt run's fused prediction against its own heads.

  embedded  the embedded default (--data synthetic): 10 cell types, 400 -> 4 images, 48 -> 32 px
  small     460 images (135 -> 7; a tenth kept for val), 10 types at 32 px, PNG files (folder)
  res48     6 cell types drawn at 64 px and seen at 48 px, 300 -> 15, a MedMNIST-style .npz
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
    names = [data.cell_name(*data.CELL_TYPES[t]) for t in types]
    np.savez(path, classes=np.array(names), **arrays)


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
    sets["res48"] = ["--data", "npz", "--data-root", str(res48), "--model", "tiny",
                     "--img-size", "48"]
    large = OUT / "data" / "large.npz"
    if not large.exists():
        write_npz(large, list(range(10)), data.long_tail_counts(1000, 10, 100), 20, 80, size=48)
    sets["large"] = ["--data", "npz", "--data-root", str(large), "--model", "tiny"]
    return sets


def cell(values):
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def run_once(name, label, seed, tag, flags, sets, analyze=False):
    """metrics.json (layers.json) of `python train.py <set flags> --seed S <flags>` (of
    scripts/analyze.py), run if missing."""
    out = OUT / (tag or "default") / name / f"{label}-{seed}"
    result = out / ("layers.json" if analyze else "metrics.json")
    if not result.exists():
        program = "scripts/analyze.py" if analyze else "train.py"
        command = [sys.executable, program, *sets[name], "--seed", str(seed), "--out", str(out),
                   *flags]
        print(" ".join(command[1:]), file=sys.stderr, flush=True)
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def runs_of(name, method, seeds, tag, flags, sets):
    return [run_once(name, method, seed, tag, ["--method", method, *flags], sets) for seed in seeds]


def print_analysis(name, analyses):
    """The per-block analysis over seeds: each block's frozen class means and probe, balanced and
    tail accuracy on test (mean over seeds, * the best block per column), and the level pair each
    seed's val recommends."""
    layers, tail = [a["layers"] for a in analyses], analyses[0]["tail"]
    columns = [(kind, key) for kind in ("ncm", "probe") for key in ("balanced_acc", tail)]

    def mean(block, column):
        return statistics.mean(100 * (run[block][column[0]][column[1]] or 0) for run in layers)

    blocks = range(len(layers[0]))
    best = {c: max(blocks, key=lambda block: mean(block, c)) for c in columns}
    print(f"\n{name}, the frozen stand-in per block (test, mean of {len(layers)} seeds; * best "
          "block)\n")
    print(f"| block | class means balanced | class means {tail} | probe balanced | probe {tail} |")
    print("|---|---|---|---|---|")
    for block in blocks:
        cells = (f"{mean(block, c):.1f}{'*' if best[c] == block else ''}" for c in columns)
        print(f"| {block + 1} | " + " | ".join(cells) + " |")
    pairs = (" ".join(map(str, a["recommended"]["blocks"])) for a in analyses)
    print("\nrecommended on val, by seed: " + ", ".join(pairs))


def analyses_of(name, args, flags, sets):
    return [run_once(name, "analyze", seed, args.tag, flags, sets, analyze=True)
            for seed in args.seeds]


def fused_gain(run, pick=max):
    """The fused prediction's balanced accuracy minus that of the best (pick=min: worst) of the
    run's own level heads."""
    heads = run["heads"]
    levels = [m["balanced_acc"] for h, m in heads.items()
              if m and h not in ("start", "probe", "fused")]
    return heads["fused"]["balanced_acc"] - pick(levels)


def print_heads(method, runs):
    """Every run: the fused prediction against its own heads."""
    shown = []
    for r in runs:
        heads = (f"{head} {100 * m['balanced_acc']:.1f}" for head, m in r["heads"].items()
                 if m and head not in ("start", "probe"))
        shown.append(", ".join(heads))
    print(f"\n{method}, balanced accuracy of each run's heads ({'; '.join(shown)})")
    print(f"fused − its better head: {cell([fused_gain(r) for r in runs])}; "
          f"fused − its worse head: {cell([fused_gain(r, min) for r in runs])}")


def print_table(name, args, flags, sets):
    analyses = analyses_of(name, args, flags, sets)
    print_analysis(name, analyses)
    runs = {method: runs_of(name, method, args.seeds, args.tag, flags, sets)
            for method in args.methods}
    default = [len(analyses[0]["layers"]) - 1, len(analyses[0]["layers"])]
    recommended = []
    for seed, analysis, scilt_run in zip(args.seeds, analyses, runs["scilt"]):
        blocks = analysis["recommended"]["blocks"]
        if blocks == default:  # the default's run where the default is recommended
            recommended.append(scilt_run)
        else:
            recommended.append(run_once(name, "scilt-recommended", seed, args.tag,
                                        ["--blocks", *map(str, blocks), *flags], sets))
    runs["scilt, recommended levels"] = recommended
    rows = {row: [r["heads"][row] for r in runs["scilt"]] for row in ("start", "probe")}
    rows.update({method: [r["heads"]["fused"] for r in rs] for method, rs in runs.items()})
    bar = [max(s["balanced_acc"], q["balanced_acc"]) for s, q in zip(rows["start"], rows["probe"])]
    images = sum(runs["scilt"][0]["class_counts"].values())
    print(f"\n{name} ({images} training images, seeds {' '.join(map(str, args.seeds))})\n")
    print(f"| | {' | '.join(c.removesuffix('_acc') for c in COLUMNS)} | balanced − max(start, "
          "probe) |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for row, metrics in rows.items():
        gain = cell([m["balanced_acc"] - b for m, b in zip(metrics, bar)]) if row in runs else ""
        print(f"| {row} | {' | '.join(cell([m[c] for m in metrics]) for c in COLUMNS)} | {gain} |")
    for method in ("scilt", "scilt, recommended levels"):
        print_heads(method, runs[method])


def print_fusions(name, args, flags, sets):
    """scilt with each --fusion; differences paired by seed against the default (class)."""
    runs = {}
    for fusion in ("class", "fixed"):
        tag = "-".join(filter(None, (args.tag, "fusion", fusion)))
        runs[fusion] = runs_of(name, "scilt", args.seeds, tag, flags + ["--fusion", fusion], sets)
    print(f"\n{name}, scilt by fusion (seeds {' '.join(map(str, args.seeds))})\n")
    print("| fusion | balanced | few | balanced − class | fused − its better head | fused − its "
          "worse head |\n|---|---|---|---|---|---|")
    for fusion, rs in runs.items():
        diff = ""
        if fusion != "class":
            diff = cell([r["balanced_acc"] - c["balanced_acc"] for r, c in zip(rs, runs["class"])])
        print(f"| {fusion} | {cell([r['balanced_acc'] for r in rs])} | "
              f"{cell([r['few'] for r in rs])} | {diff} | {cell([fused_gain(r) for r in rs])} | "
              f"{cell([fused_gain(r, min) for r in rs])} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=["embedded", "small", "res48", "large"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["final", "penultimate", "scilt"])
    p.add_argument("--fusions", action="store_true", help="compare --fusion class and fixed")
    p.add_argument("--analyze-only", action="store_true", help="only the per-block tables")
    p.add_argument("--tag", default="", help="a sub-folder name for runs with extra train.py flags")
    args, flags = p.parse_known_args()
    flags = [f for f in flags if f != "--"]
    sets = make_sets()
    for name in args.sets:
        if args.analyze_only:
            print_analysis(name, analyses_of(name, args, flags, sets))
        elif args.fusions:
            print_fusions(name, args, flags, sets)
        else:
            print_table(name, args, flags, sets)


if __name__ == "__main__":
    main()
