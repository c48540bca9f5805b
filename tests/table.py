"""The README's results table on the embedded benchmark: python tests/table.py [--seeds 0 1 2] [train.py flags]

Trains final, penultimate and scilt for each seed (each run as `python train.py --method M --seed S`, into
runs/table/M-S; a run already there is reused) and prints the mean and spread (sample standard deviation)
of the test metrics as a Markdown table.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("overall_acc", "balanced_acc", "macro_f1", "many", "medium", "few")

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
args, train_flags = p.parse_known_args()
results = {}
for method in ("final", "penultimate", "scilt"):
    for seed in args.seeds:
        out = ROOT / "runs" / "table" / f"{method}-{seed}"
        if not (out / "metrics.json").exists():
            subprocess.run([sys.executable, "train.py", "--method", method, "--seed", str(seed), "--out", str(out),
                            *train_flags], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        results.setdefault(method, []).append(json.loads((out / "metrics.json").read_text()))

print(f"| method | {' | '.join(c.removesuffix('_acc') for c in COLUMNS)} |")
print("|---" * (len(COLUMNS) + 1) + "|")
for method, runs in results.items():
    cells = []
    for column in COLUMNS:
        values = [100 * r[column] for r in runs if r[column] is not None]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}" if values else "-")
    print(f"| {method} | {' | '.join(cells)} |")
