"""The README's results tables, over seeds and generated data sets:

    python scripts/table.py [--sets ...] [--seeds 0 1 2] [--jobs 2] [--tag T]
                            [--variants [NAME ...]]
                            [-- train.py flags, e.g. --weights fractal_vit.safetensors]

Five generated data sets of different character, each trained with `python train.py` at its defaults
into runs/table/<tag or default>/<set>/<run>-<seed>; a run already there is reused (one cut short
starts again), and --jobs runs go side by side, one thread each. Per set: the frozen stand-in per
block (scripts/analyze.py: best block per column, the pair recommended on val), then the model at
step 0 (`start`), linear probes on the frozen final block (`probe`) and on the levels scilt reads
(`probe_levels`), --method final and penultimate, and scilt with each --fusion kept: mean ± sample
standard deviation over seeds, each method's gain over the best of those bars and over the better
single level, paired by seed, and every scilt run's fused prediction against its own heads.
With --variants (all of VARIANTS if no name is given), only scilt and scilt with one lever of the
recipe moved are trained, and each variant is set beside scilt, paired by seed, on val (what
chooses a default) and on test, with the step-0 bars.

  embedded  the embedded default (--data synthetic): 10 cell types, 400 -> 4 images, 48 -> 32 px
  small     460 images (135 -> 7; a tenth kept for val), 10 types at 32 px, PNG files (folder)
  res48     6 cell types drawn at 64 px and seen at 48 px, 300 -> 15, a MedMNIST-style .npz
  large     2,478 training images (1,000 -> 10), 10 types, .npz
  fractal   10 fractals the fractal stand-in never saw (100 -> 5), 32 px, .npz: another kind of
            image, where the fractal stand-in's frozen probe is strong and the training set small
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import pretrain_tiny  # noqa: E402

OUT = ROOT / "runs" / "table"
COLUMNS = ("balanced_acc", "many", "medium", "few")
FUSIONS = ("class", "feature")  # scilt's rows: the default first


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


def write_npz(path, names, draw_split, train_counts, val_per_class, test_per_class):
    """A MedMNIST-style .npz: draw_split(split, labels) -> images (N, H, W, 3)."""
    arrays = {}
    for split, counts in (("train", train_counts), ("val", [val_per_class] * len(names)),
                          ("test", [test_per_class] * len(names))):
        labels = np.repeat(np.arange(len(names)), counts)
        arrays[f"{split}_images"] = draw_split(split, labels)
        arrays[f"{split}_labels"] = labels[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, classes=np.array(names), **arrays)


def write_cells(path, types, train_counts, size, seed=200):
    names = [data.cell_name(*data.CELL_TYPES[t]) for t in types]

    def draw_split(split, labels):
        return draw(np.asarray(types)[labels], seed + len(split), size)

    write_npz(path, names, draw_split, train_counts, 20, 80)


def write_fractals(path):
    """10 fractal classes of another seed than the stand-in's 50, rendered with twice the jitter."""
    systems, rng = pretrain_tiny.fractal_classes(10, seed=7), np.random.default_rng(300)

    def draw_split(split, labels):
        return pretrain_tiny.render([systems[k] for k in labels], rng, jitter=0.06)

    counts = data.long_tail_counts(100, 10, 20)
    write_npz(path, [f"fractal{k}" for k in range(10)], draw_split, counts, 20, 80)


def make_sets():
    """name -> train.py flags; writes the generated files once."""
    files = OUT / "data"
    if not (files / "small").exists():
        write_folder(files / "small", list(range(10)), data.long_tail_counts(135, 10, 20), 50, 32)
    if not (files / "res48.npz").exists():
        write_cells(files / "res48.npz", [0, 2, 3, 5, 6, 9], data.long_tail_counts(300, 6, 20), 64)
    if not (files / "large.npz").exists():
        write_cells(files / "large.npz", list(range(10)), data.long_tail_counts(1000, 10, 100), 48)
    if not (files / "fractal.npz").exists():
        write_fractals(files / "fractal.npz")
    npz = ["--data", "npz", "--model", "tiny", "--data-root"]
    return {"embedded": [],
            "small": ["--data", "folder", "--model", "tiny", "--data-root", str(files / "small")],
            "res48": [*npz, str(files / "res48.npz"), "--img-size", "48"],
            "large": [*npz, str(files / "large.npz")],
            "fractal": [*npz, str(files / "fractal.npz")]}


class Runs:
    """Every run a table needs: run_all() trains what is missing, side by side; result() reads."""

    def __init__(self, sets, tag, flags):
        self.sets, self.tag, self.flags, self.missing = sets, tag or "default", flags, []

    def folder(self, name, label, seed):
        return OUT / self.tag / name / f"{label}-{seed}"

    def need(self, name, label, seed, flags=(), analyze=False):
        out = self.folder(name, label, seed)
        if not (out / ("layers.json" if analyze else "metrics.json")).exists():
            if out.exists():  # a run cut short: it starts again
                shutil.rmtree(out)
            program = "scripts/analyze.py" if analyze else "train.py"
            self.missing.append([sys.executable, program, *self.sets[name], "--seed", str(seed),
                                 "--out", str(out), *flags, *self.flags])

    def run_all(self, jobs):
        environment = dict(os.environ, OMP_NUM_THREADS="1") if jobs > 1 else None

        def run(command):
            print(" ".join(command[1:]), file=sys.stderr, flush=True)
            subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                           env=environment)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(run, self.missing))

    def result(self, name, label, seed, analyze=False):
        out = self.folder(name, label, seed)
        return json.loads((out / ("layers.json" if analyze else "metrics.json")).read_text())

    def val(self, name, label, seed):
        """The val balanced accuracy of the epoch the run kept: what chooses between fusions."""
        checkpoint = self.folder(name, label, seed) / "checkpoint.pt"
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["state"]["best_val"]


RUNS = {"final": ["--method", "final"], "penultimate": ["--method", "penultimate"],
        **{f"scilt {f}": ["--fusion", f] for f in FUSIONS}}


VARIANTS = {  # scilt with one lever moved, each measured against the default in docs/results.md
    "final": RUNS["final"], "penultimate": RUNS["penultimate"],  # one level: the full table's runs
    "rank1": ["--lora-rank", "1"],             # LIFT's light adaptation: a bottleneck of 1
    "blocks456": ["--blocks", "4", "5", "6"],  # the top half of the blocks, a gate over three
    "allblocks": ["--blocks", "1", "2", "3", "4", "5", "6"],  # every level, a gate over six
    "lr1e-3": ["--lr", "1e-3"],                # a third of the tiny model's learning rate
    "lr1e-2": ["--lr", "1e-2"],                # three times it
}
SCILT = f"scilt-{FUSIONS[0]}"  # the default's runs: the full table's and the variants'


def plan(runs, names, seeds, variants=None):
    for name in names:
        for seed in seeds:
            if variants is not None:
                for label in [SCILT, *variants]:
                    runs.need(name, label, seed, VARIANTS.get(label, []))
                continue
            runs.need(name, "analyze", seed, analyze=True)
            for label, flags in RUNS.items():
                runs.need(name, label.replace(" ", "-"), seed, flags)


def cell(values):
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


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


BARS = ("start", "probe", "probe_levels")  # the step-0 rows: what fine-tuning must beat


def own_heads(run):
    return [m["balanced_acc"] for h, m in run["heads"].items()
            if m and h not in (*BARS, "fused")]


def print_table(name, runs, seeds):
    """The per-block analysis, the rows of every method, each fused prediction against its heads;
    returns the row of the summary."""
    print_analysis(name, [runs.result(name, "analyze", seed, analyze=True) for seed in seeds])
    results = {label: [runs.result(name, label.replace(" ", "-"), seed) for seed in seeds]
               for label in RUNS}
    val = {label: [runs.val(name, label.replace(" ", "-"), seed) for seed in seeds]
           for label in RUNS}
    first = results[f"scilt {FUSIONS[0]}"]
    rows = {row: [r["heads"][row] for r in first] for row in BARS}
    rows.update({label: [r["heads"]["fused"] for r in rs] for label, rs in results.items()})
    bars = {"the best bar": [max(r[bar]["balanced_acc"] for bar in BARS)
                             for r in (run["heads"] for run in first)],
            "better single level": [max(f["balanced_acc"], p["balanced_acc"])
                                    for f, p in zip(rows["final"], rows["penultimate"])]}
    images = sum(first[0]["class_counts"].values())
    print(f"\n{name} ({images} training images, seeds {' '.join(map(str, seeds))})\n")
    print(f"| | val balanced | {' | '.join(c.removesuffix('_acc') for c in COLUMNS)} | "
          f"{' | '.join(f'balanced − {bar}' for bar in bars)} |")
    print("|---" * (len(COLUMNS) + 2 + len(bars)) + "|")
    for row, metrics in rows.items():
        gains = [cell([m["balanced_acc"] - b for m, b in zip(metrics, bar)]) if row in results
                 else "" for bar in bars.values()]
        on_val = cell(val[row]) if row in val else ""
        print(f"| {row} | {on_val} | {' | '.join(cell([m[c] for m in metrics]) for c in COLUMNS)} "
              f"| {' | '.join(gains)} |")
    for fusion in FUSIONS:  # every run: the fused prediction against its own heads
        scilt_runs = results[f"scilt {fusion}"]
        shown = ["; ".join(f"{h} {100 * m['balanced_acc']:.1f}" for h, m in r["heads"].items()
                           if m and h not in BARS) for r in scilt_runs]
        better = [r["balanced_acc"] - max(own_heads(r)) for r in scilt_runs]
        worse = [r["balanced_acc"] - min(own_heads(r)) for r in scilt_runs]
        print(f"\nscilt {fusion}, each run's heads: {' | '.join(shown)}\n"
              f"fused − its better head: {cell(better)}; fused − its worse head: {cell(worse)}")
    default = results[f"scilt {FUSIONS[0]}"]
    summary = [cell([m["balanced_acc"] for m in rows[row]]) for row in rows]
    return summary + [cell([r["balanced_acc"] - max(own_heads(r)) for r in default])]


def print_variants(name, runs, seeds, variants):
    """scilt and each variant on one set: val and test balanced accuracy, and each variant minus
    scilt paired by seed, under the step-0 bars; returns the summary's row (test mean ± std, and
    for a variant its mean val difference in brackets, which is what would choose it) and each
    variant's (val, test) differences by seed."""
    labels = [SCILT, *variants]
    test = {label: [runs.result(name, label, seed)["balanced_acc"] for seed in seeds]
            for label in labels}
    val = {label: [runs.val(name, label, seed) for seed in seeds] for label in labels}
    heads = [runs.result(name, SCILT, seed)["heads"] for seed in seeds]
    bars = [cell([h[bar]["balanced_acc"] for h in heads]) for bar in BARS]
    print(f"\n{name}, scilt and its variants (seeds {' '.join(map(str, seeds))})\n")
    print("| | val balanced | balanced | − scilt, paired: val | balanced |")
    print("|---|---|---|---|---|")
    for bar, shown in zip(BARS, bars):
        print(f"| {bar} | | {shown} | | |")
    print(f"| scilt | {cell(val[SCILT])} | {cell(test[SCILT])} | | |")
    row, gains = [*bars, cell(test[SCILT])], {}
    for label in variants:
        val_gain = [b - a for a, b in zip(val[SCILT], val[label])]
        test_gain = [b - a for a, b in zip(test[SCILT], test[label])]
        print(f"| {label} | {cell(val[label])} | {cell(test[label])} | {cell(val_gain)} | "
              f"{cell(test_gain)} |")
        row.append(f"{cell(test[label])} [{100 * statistics.mean(val_gain):+.1f}]")
        gains[label] = list(zip(val_gain, test_gain))
    return row, gains


def print_means(gains_per_set, variants):
    """Each variant − scilt over every set and seed: on val, which would choose it; on test."""
    print()
    for label in variants:
        paired = [pair for gains in gains_per_set for pair in gains[label]]
        val, test = (100 * statistics.mean(column) for column in zip(*paired))
        print(f"{label} − scilt, mean over {len(paired)} runs: val {val:+.2f}, test {test:+.2f}")


def print_summary(summaries, tag, variants=None):
    """One row per set: the README's table (with variants: their test, [their val − scilt's])."""
    columns = [*BARS, "scilt", *variants] if variants is not None else [
        *BARS, *RUNS, "scilt fused − its better head"]
    print(f"\nsummary ({tag or 'default'}): test balanced accuracy, mean ± std over seeds\n")
    print(f"| set | {' | '.join(columns)} |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in summaries.items():
        print(f"| {name} | {' | '.join(row)} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=["embedded", "small", "res48", "large", "fractal"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each")
    p.add_argument("--tag", default="", help="a sub-folder name for runs with extra train.py flags")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS),
                   help="scilt against these variants only (none named: all)")
    args, flags = p.parse_known_args()
    variants = args.variants
    if variants == []:  # --variants alone: all of them
        variants = list(VARIANTS)
    runs = Runs(make_sets(), args.tag, [f for f in flags if f != "--"])
    plan(runs, args.sets, args.seeds, variants)
    runs.run_all(args.jobs)
    if variants is None:
        print_summary({name: print_table(name, runs, args.seeds) for name in args.sets}, args.tag)
        return
    results = {name: print_variants(name, runs, args.seeds, variants) for name in args.sets}
    print_summary({name: row for name, (row, _) in results.items()}, args.tag, variants)
    print_means([gains for _, gains in results.values()], variants)


if __name__ == "__main__":
    main()
