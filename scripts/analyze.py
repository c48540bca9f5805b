"""Which block's frozen features serve which classes, before any training:

    python scripts/analyze.py                        # the embedded benchmark: ~20 s on 2 CPU cores
    python scripts/analyze.py --data isic              # ViT-B/16: one forward pass over the data

Takes train.py's data and model flags. For each block of the frozen backbone: class means (how the
heads start) and a linear probe on its features, scored on the test set; and the pair of levels
whose class means, averaged as scilt starts, do best on val by balanced accuracy (which weighs a
tail class as much as a head class; the tail breaks ties, then the paper's N-1, N). Writes
layers.json and layers.png to --out, and prints the table with the recommended --blocks.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import report  # noqa: E402
import checkpoint  # noqa: E402
import scilt  # noqa: E402
import train  # noqa: E402
from checkpoint import replacing  # noqa: E402


@torch.no_grad()
def block_features(backbone, data_loader, device):
    """pool(norm(z_l)) of every block l, one pass per batch, of every image, gathered from all
    processes: {"h": (N, L, C) float32 on the CPU, "labels": (N,)}."""
    backbone.eval()
    features = [torch.zeros(0, len(backbone.blocks), backbone.num_features)]
    labels = [torch.zeros(0, dtype=torch.long)]  # an empty val set gives empty tensors
    for images, y in data_loader:
        with scilt.autocast(device):
            x = images.to(device, non_blocking=True)
            levels = scilt.tap(backbone, x, range(len(backbone.blocks)))
        features.append(torch.stack(levels, dim=1).float().cpu())
        labels.append(y)
    return report.gather({"h": torch.cat(features), "labels": torch.cat(labels)})


def tail_group(data):
    """few (< 20 training images) where many, medium and few all hold classes, else tail (by rank
    in thirds; with 2 classes the middle third is empty and tail the rarer class)."""
    counts = torch.tensor(data.group_counts)
    many, few = counts > scilt.MANY_SHOT, counts < scilt.FEW_SHOT
    if many.any() and (~many & ~few).any() and few.any():
        return "few"
    return "tail"


def analyze(backbone, data, args, device, log):
    """Per block: class means and the linear probe on test; the recommended pair on val."""
    sets = {}
    for name, dataset in (("train", data.train_eval), ("val", data.val), ("test", data.test)):
        sets[name] = block_features(backbone.to(device), train.make_loader(dataset, args, device),
                                    device)
    counts, groups, layers, val_scores = data.class_counts, data.group_counts, [], []
    for block in range(len(backbone.blocks)):
        h = {name: s["h"][:, block] for name, s in sets.items()}
        means = scilt.CosineClassifier(h["train"].shape[1], len(counts))
        means.set_class_means(h["train"], sets["train"]["labels"])
        probe = report.fit_probe(h["train"], sets["train"]["labels"], h["val"],
                                 sets["val"]["labels"], counts, device=device)
        layer = {"block": block + 1}
        for kind, predicted in (("ncm", means(h["test"]).argmax(1)),
                                ("probe", probe.predict(h["test"]))):
            layer[kind] = report.head_metrics(predicted, sets["test"]["labels"], groups,
                                              data.classes)
        layers.append(layer)
        val_scores.append(means(h["val"]))  # (N_val, K) cosines: this level's class means on val
        log(f"block {block + 1}/{len(backbone.blocks)}: class means "
            f"{100 * layer['ncm']['balanced_acc']:.1f}%, probe "
            f"{100 * layer['probe']['balanced_acc']:.1f}% balanced accuracy")
    depth, tail = len(layers), tail_group(data)
    pairs = [(depth - 1, depth)]  # the default first: it wins ties
    pairs += [(l, m) for m in range(2, depth + 1) for l in range(1, m) if (l, m) != pairs[0]]
    on_val = []
    for l, m in pairs:
        fused = (val_scores[l - 1] + val_scores[m - 1]).argmax(1)
        scores = report.head_metrics(fused, sets["val"]["labels"], groups)
        on_val.append({"balanced_acc": scores["balanced_acc"], tail: scores[tail]})

    def ranking(i):
        return (on_val[i]["balanced_acc"] or 0, on_val[i][tail] or 0)

    best = max(range(len(pairs)), key=ranking) if len(sets["val"]["labels"]) else 0
    recommended = {"blocks": list(pairs[best]), "val": on_val[best]}
    return {"layers": layers, "tail": tail, "recommended": recommended,
            "default": {"blocks": list(pairs[0]), "val": on_val[0]}}


def cell(value, best):
    if value is None:
        return "     -"
    return f"{100 * value:5.1f}{'*' if value == best else ' '}"


def print_layers(analysis):
    layers, tail = analysis["layers"], analysis["tail"]
    groups = ("many", "medium", "few") if tail == "few" else ("head", "middle", "tail")
    keys = ("balanced_acc", *groups)
    print(f"\n{'':6s}{'class means (start)':^32s}  {'linear probe':^32s}")
    print(f"{'block':6s}" + "  ".join("".join(f"{k.removesuffix('_acc')[:8]:>8s}" for k in keys)
                                     for _ in ("ncm", "probe")))
    best = {(kind, key): max(layer[kind][key] or 0 for layer in layers)
            for kind in ("ncm", "probe") for key in keys}
    for layer in layers:
        halves = ["".join(f"{cell(layer[kind][key], best[kind, key]):>8s}" for key in keys)
                  for kind in ("ncm", "probe")]
        print(f"{layer['block']:<6d}" + "  ".join(halves))
    pen, fin = layers[-2], layers[-1]
    if pen["probe"][tail] is not None and fin["probe"][tail] is not None:
        verdict = "better" if pen["probe"][tail] > fin["probe"][tail] else "no better"
        numbers = ", ".join(f"{kind} {100 * pen[kind][tail]:.1f}% vs {100 * fin[kind][tail]:.1f}%"
                            for kind in ("probe", "ncm"))
        print(f"(* best block per column, on test) The penultimate block's frozen features serve "
              f"the {tail} classes {verdict} than the final block's ({tail}: {numbers}).")

    def on_val(choice):
        return ", ".join(f"{k.removesuffix('_acc')} {100 * (v or 0):.1f}%"
                         for k, v in choice["val"].items())

    chosen, default = analysis["recommended"], analysis["default"]
    print(f"Recommended on val: --blocks {' '.join(map(str, chosen['blocks']))} (their class "
          f"means: {on_val(chosen)}; the default {' '.join(map(str, default['blocks']))}: "
          f"{on_val(default)})")


def plot_layers(analysis, path):
    """layers.png: balanced and tail accuracy of each block's frozen features, class means and
    probe."""
    plt = report.pyplot()
    layers, tail = analysis["layers"], analysis["tail"]
    blocks = [layer["block"] for layer in layers]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, color, name in (("ncm", "tab:blue", "class means"),
                              ("probe", "tab:orange", "linear probe")):
        for key, style in (("balanced_acc", "-"), (tail, "--")):
            ax.plot(blocks, [100 * (layer[kind][key] or 0) for layer in layers], style,
                    color=color, marker="o", label=f"{name}: {key.removesuffix('_acc')}")
    ax.axvline(blocks[-2], color="0.7", lw=0.8)  # the penultimate block
    ax.set(xlabel="block (frozen features)", ylabel="test accuracy (%)", xticks=blocks,
           title="which block's features serve which classes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(path) as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)


def run(args):
    rank, _, device = train.setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    data = train.load_run_data(args)
    analysis = analyze(checkpoint.load_backbone(args), data, args, device, log)
    if rank == 0:
        print_layers(analysis)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with replacing(out / "layers.json") as temporary:
            temporary.write_text(json.dumps(analysis, indent=2))
        plot_layers(analysis, out / "layers.png")
        log(f"wrote {out / 'layers.json'} and {out / 'layers.png'}")
    return Path(args.out)


def main(argv=None):
    return train.run_program(run, train.parse_args(argv, job="analysis"))


if __name__ == "__main__":
    main()
