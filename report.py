"""The evaluation and the report of a train.py run: what the model predicts on each set (over one
process or several), the bars training must clear (the model at step 0, and linear probes on the
frozen final block and on the model's own levels), history.csv as the epochs end, every head's
row, the printed tables, metrics.json and report.png.
"""
import csv
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import scilt
from checkpoint import replacing

PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)  # the linear probe's, chosen on val


def head_metrics(predictions, labels, counts, classes=None):
    """A head's row of the report: scilt.long_tail_metrics of the classes it predicts."""
    return scilt.long_tail_metrics(predictions.numpy(), labels.numpy(), counts, classes)


# --------------------------------------------------------------------------------------------------
# Evaluation, over one process or several (torchrun).

class Evaluation(NamedTuple):
    """What evaluate() keeps of every image of a set: what grows with N, never N x K."""
    labels: torch.Tensor  # (N,)
    level_features: torch.Tensor  # (N, L, D): the features of the model's L levels
    final: torch.Tensor   # (N, D): the final block's, which the linear probe reads
    predicted: dict       # head name ("fused", then the level names) -> (N,) predicted classes


@torch.no_grad()
def evaluate(model, data_loader, device):
    """Features and predicted classes of every image of the set, gathered from all processes."""
    model.eval()
    final = len(model.backbone.blocks) - 1
    blocks = model.blocks + ([final] if model.blocks[-1] != final else [])
    heads = ["fused", *model.level_names()]
    nothing = torch.zeros(0, dtype=torch.long)  # a process may have no image
    keep = {"labels": [nothing], **{name: [nothing] for name in heads},
            "h": [torch.zeros(0, len(blocks), model.backbone.num_features)]}
    for images, labels in data_loader:
        with scilt.autocast(device):
            h = scilt.tap(model.backbone, images.to(device, non_blocking=True), blocks)
            out = model.classify(*h[:len(model.blocks)])
        keep["labels"].append(labels)
        keep["h"].append(torch.stack(h, 1).float().cpu())  # (B, L or L + 1, D)
        for name, scores in zip(heads, [out.logits, *out.level_scores]):
            keep[name].append(scores.argmax(1).cpu())
    joined = gather({key: torch.cat(parts) for key, parts in keep.items()})
    h = joined.pop("h")
    return Evaluation(joined.pop("labels"), h[:, :len(model.blocks)], h[:, -1], joined)


def gather(parts):
    """Every process's share of an evaluation (name -> tensor), joined on every process in the
    set's own order. train.make_loader() deals process r the images r, r + W, r + 2W, ... of W
    processes: the shares, padded to the longest, interleave back into the set, and the padding
    falls past its end, where it is cut off."""
    if not dist.is_initialized():
        return parts
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    world = dist.get_world_size()
    lengths = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([len(parts["labels"])], device=device))
    total, longest, joined = int(sum(lengths)), int(max(lengths)), {}
    for key, value in parts.items():
        padded = value.new_zeros((longest, *value.shape[1:]), device=device)
        padded[:len(value)] = value
        shares = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(shares, padded)
        in_order = torch.stack(shares, dim=1).flatten(0, 1)  # (longest * W, ...): r, r + W, ...
        joined[key] = in_order[:total].cpu()
    return joined


# --------------------------------------------------------------------------------------------------
# The linear probe: the baseline every fine-tuning must beat.

class LinearProbe:
    """Logit-adjusted softmax regression on standardised frozen features, fit to convergence by
    L-BFGS in float32 on `device`. The loss is summed over chunks of images, so memory grows with
    chunk x K, not N x K. The adjustment makes its argmax balanced, as the heads' loss does: a fair
    bar for them."""

    def __init__(self, features, labels, log_prior, tau=1.0, weight_decay=1e-4, steps=200,
                 device="cpu", chunk=8192):
        x = torch.as_tensor(features, dtype=torch.float32).to(device)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        self.device, self.chunk = device, chunk
        x = (x - self.mean) / self.std
        labels = torch.as_tensor(labels).to(device)
        log_prior = torch.as_tensor(log_prior, dtype=torch.float32).to(device)
        weight = torch.zeros(x.shape[1], len(log_prior), device=device, requires_grad=True)
        bias = torch.zeros(len(log_prior), device=device, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, tolerance_grad=1e-7,
                                      tolerance_change=1e-10, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = weight_decay * weight.pow(2).sum()
            loss.backward()
            for start in range(0, len(x), chunk):  # the mean cross-entropy, a chunk at a time
                scores = x[start:start + chunk] @ weight + bias + tau * log_prior
                part = F.cross_entropy(scores, labels[start:start + chunk], reduction="sum")
                (part / len(x)).backward()
                loss = loss + part.detach() / len(x)
            return loss

        optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()

    def predict(self, features):
        """(N, D) features -> (N,) predicted classes, a chunk at a time."""
        predicted = [torch.zeros(0, dtype=torch.long)]
        for h in torch.as_tensor(features, dtype=torch.float32).split(self.chunk):
            x = (h.to(self.device) - self.mean) / self.std
            predicted.append((x @ self.weight + self.bias).argmax(1).cpu())
        return torch.cat(predicted)


def fit_probe(train_h, train_labels, val_h, val_labels, counts, tau=1.0, device="cpu", steps=200):
    """The linear probe with the weight decay that val's balanced accuracy prefers."""
    log_prior = torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts))
    if len(val_labels) == 0:  # with nothing to choose by, the middle weight decay alone
        decay = PROBE_WEIGHT_DECAYS[len(PROBE_WEIGHT_DECAYS) // 2]
        return LinearProbe(train_h, train_labels, log_prior, tau, decay, steps, device)
    best, best_score = None, -1.0
    for decay in PROBE_WEIGHT_DECAYS:
        probe = LinearProbe(train_h, train_labels, log_prior, tau, decay, steps, device)
        score = head_metrics(probe.predict(val_h), val_labels, counts)["balanced_acc"]
        if score > best_score:  # the first of equals
            best, best_score = probe, score
    return best


def start_metrics(train, val, test, counts, groups, classes, tau=1.0, device="cpu", steps=200):
    """The bars training must clear, on test: the model at step 0 (class-mean heads on the
    pretrained features, fused as the method fuses them), a linear probe on the pretrained final
    block's features, and one on the model's own levels concatenated (what a method reading two
    levels must beat, as DINOv2's linear evaluation reads the last blocks together). `train`,
    `val`, `test`: Evaluation; `groups`: the counts that define many / medium / few."""
    def probe_row(features):  # features(evaluation) -> (N, D'): fitted, chosen on val, scored
        probe = fit_probe(features(train), train.labels, features(val), val.labels, counts, tau,
                          device, steps)
        return head_metrics(probe.predict(features(test)), test.labels, groups, classes)

    rows = {"start": head_metrics(test.predicted["fused"], test.labels, groups, classes),
            "probe": probe_row(lambda evaluation: evaluation.final)}
    only_final = train.level_features.shape[1] == 1 and torch.equal(train.level_features[:, 0],
                                                                    train.final)
    rows["probe_levels"] = rows["probe"] if only_final else \
        probe_row(lambda evaluation: evaluation.level_features.flatten(1))  # (N, L * D)
    return rows


def step_zero(model, loaders, data, device, log):
    """The heads start as nearest-class-mean classifiers on the un-augmented pretrained features;
    the model at step 0 and a linear probe on the frozen features are the report's first rows."""
    train = evaluate(model, loaders["train"], device)
    features = [train.level_features[:, l].to(device) for l in range(len(model.blocks))]
    model.init_heads(features, train.labels.to(device))
    val = evaluate(model, loaders["val"], device)
    test = evaluate(model, loaders["test"], device)
    # every process has every image's features and fits the same probe, so none waits on another
    bars = start_metrics(train, val, test, data.class_counts, data.group_counts, data.classes,
                           model.tau, device)
    log(f"step 0 on test: class means {100 * bars['start']['balanced_acc']:.1f}% (cosine scale "
        f"fitted to {model.scale:.3g}), linear probe on frozen features "
        f"{100 * bars['probe']['balanced_acc']:.1f}%, on the levels "
        f"{100 * bars['probe_levels']['balanced_acc']:.1f}% balanced accuracy")
    return bars


def finish(model, loaders, data, bars, summary, device, out, log):
    """The report of the trained model (the epoch the run kept): every set evaluated, the table
    printed, metrics.json and report.png written by the first process."""
    test, val, train = (evaluate(model, loaders[name], device) for name in ("test", "val", "train"))
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    metrics = metrics_of(model, test, val, train, data, bars)
    metrics.update(summary)
    print_report(metrics)
    write(metrics, out)
    log(f"wrote {out / 'metrics.json'}, {out / 'history.csv'}, {out / 'report.png'}, "
        f"{out / 'checkpoint.pt'}, {out / 'splits.csv'}")


# --------------------------------------------------------------------------------------------------
# history.csv: a row per epoch, written as the epoch ends.

def history_row(model, epoch, losses, lr, val_scores, seconds, images):
    """The epoch's mean training loss and its terms (loss_fused: LA(s); loss_<level>: LA(s_l)),
    the learning rate at its end, each head's val balanced accuracy (empty without val), the gate's
    mean weight on each level over the classes, its seconds and images per second."""
    names = model.level_names()
    row = {"epoch": epoch, "loss": losses[0], "loss_fused": losses[1]}
    row.update({f"loss_{name}": value for name, value in zip(names, losses[2:])})
    row["lr"] = lr
    row.update({f"val_{head}": val_scores.get(head) for head in ["fused", *names]})
    weights = model.level_weights().detach().mean(0).tolist()
    row.update({f"weight_{name}": weight for name, weight in zip(names, weights)})
    row.update(seconds=seconds, images_per_s=images / seconds)
    return {key: f"{value:.6g}" if isinstance(value, float) else value
            for key, value in row.items()}


def append_history(out, row):
    """One row at the end of history.csv, flushed: a run killed later keeps the rows it wrote."""
    path = Path(out) / "history.csv"
    new = not path.exists()
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_history(out):
    """history.csv's rows (column -> float, None where empty); none if there is no file."""
    path = Path(out) / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return [{key: float(value) if value else None for key, value in row.items()}
                for row in csv.DictReader(file)]


def keep_history(out, epochs):
    """history.csv's rows of the first `epochs` epochs alone, as the checkpoint holds them: a run
    killed between an epoch's row and its checkpoint wrote one its resumption writes again."""
    path, rows = Path(out) / "history.csv", read_history(out)
    kept = [row for row in rows if row["epoch"] <= epochs]
    if len(kept) == len(rows):
        return
    with replacing(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: "" if v is None else f"{v:.6g}" for key, v in row.items()}
                         for row in kept)


# --------------------------------------------------------------------------------------------------
# metrics.json, the printed tables and report.png.

def fusion_val_correlation(a, val, counts):
    """Over the classes val holds, the correlation of a (K,) with the penultimate head's val
    accuracy minus the final head's: does a class lean on the level that serves it better?"""
    pen = head_metrics(val.predicted["penultimate"], val.labels, counts)["per_class_acc"]
    fin = head_metrics(val.predicted["final"], val.labels, counts)["per_class_acc"]
    pen, fin = list(pen.values()), list(fin.values())
    held = [k for k, p in enumerate(pen) if p is not None]  # the classes val has
    gain = [pen[k] - fin[k] for k in held]
    if len(held) < 2 or a[held].std() == 0 or np.std(gain) == 0:
        return None
    return float(np.corrcoef(a[held].numpy(), gain)[0, 1])


def metrics_of(model, test, val, train, data, bars):
    """metrics.json, accuracies as fractions: the fused prediction's `overall_acc`,
    `balanced_acc`, `macro_f1`, `many` / `medium` / `few` (by data.group_counts), `head` / `middle`
    / `tail` (by rank) and `per_class_acc`; `heads`: the same for `start` (step 0), `probe` (the
    final block), `probe_levels` (the model's levels), `fused` and each level's head
    (`penultimate`, `final`, `block<l>`; None for one the method lacks); `class_counts`;
    `fusion_weights` (class -> a, its weight on the levels below the final block: for the paper's
    two, on the penultimate one); `level_names`; `level_weights` (class -> level -> weight);
    `fusion_val_correlation`; `rademacher` (scilt.rademacher_check on the training
    sample, with its balanced accuracy and the train - test gap)."""
    names, classes, groups = model.level_names(), data.classes, data.group_counts
    heads = {name: head_metrics(test.predicted[name], test.labels, groups, classes)
             for name in ["fused", *names]}
    weights = model.level_weights().detach().cpu()  # (K, L)
    a = 1 - weights[:, names.index("final")] if "final" in names else torch.ones(len(classes))
    correlation = None
    if "penultimate" in names and "final" in names and model.fusion == "class":  # a per class
        correlation = fusion_val_correlation(a, val, data.class_counts)
    train_balanced = head_metrics(train.predicted["fused"], train.labels,
                                  data.class_counts)["balanced_acc"]
    level_features = {name: train.level_features[:, l] for l, name in enumerate(names)}
    fused = None  # where features are fused, the fused class is on the fused features
    if model.fused_head is not None:
        with torch.no_grad():
            device = model.gate.device
            fused = model.fused_features(*(h.to(device) for h in level_features.values())).cpu()
    check = scilt.rademacher_check(level_features, weights, model.scale, fused)
    rows = dict(bars)  # start and the probes, then every level the method could have, then fused
    for name in [*names, "penultimate", "final"]:
        rows.setdefault(name, heads.get(name))
    rows["fused"] = heads["fused"]
    return {
        **heads["fused"],
        "class_counts": dict(zip(classes, data.class_counts)),
        "heads": rows,
        "fusion_weights": dict(zip(classes, a.tolist())),
        "level_names": names,
        "level_weights": {c: dict(zip(names, w)) for c, w in zip(classes, weights.tolist())},
        "fusion_val_correlation": correlation,
        "rademacher": {"classes": {k: v._asdict() for k, v in check.classes.items()},
                       "n": check.n, "scale": check.scale, "level_weights": check.level_weights,
                       "train_balanced_acc": train_balanced,
                       "gap": train_balanced - heads["fused"]["balanced_acc"]},
    }


def percent(value):
    return "     -" if value is None else f"{100 * value:6.1f}"


def print_report(metrics):
    columns = ("overall_acc", "balanced_acc", "many", "medium", "few", "head", "middle", "tail")
    labels = {"start": "start (step 0)", "probe": "linear probe", "fused": "fused",
              "probe_levels": "probe " + "+".join(metrics["level_names"])}
    print(f"\n{'test set':24s}" + "".join(f"{c.removesuffix('_acc'):>9s}" for c in columns))
    for name, head in metrics["heads"].items():
        if head:
            label = labels.get(name, f"{name} head")
            print(f"{label:24s}" + "".join(f"{percent(head[c]):>9s}" for c in columns))
    print(f"\n{'class':26s}{'train':>7s}{'acc':>8s}{'a':>13s}")
    for name, count in metrics["class_counts"].items():
        print(f"{name:26s}{count:7d}{percent(metrics['per_class_acc'][name]):>8s}"
              f"{metrics['fusion_weights'][name]:13.3f}")
    if metrics["fusion_val_correlation"] is not None:
        print("correlation on val between a and (penultimate - final head accuracy) per class: "
              f"{metrics['fusion_val_correlation']:+.2f}")
    r = metrics["rademacher"]
    estimates = ", ".join(f"{name} {c['estimate']:.3f} ± {c['stderr']:.3f} ({c['fraction']:.2f})"
                          for name, c in r["classes"].items())
    print(f"\nRademacher complexity on the {r['n']} training images, |w| <= t = {r['scale']:.3g} "
          f"(estimate ± s.e. and its fraction of the bound t/sqrt(n) = "
          f"{r['classes']['fused']['bound']:.3f}, L t/sqrt(n) for the sum of L):\n  {estimates}")
    print("  the bound is fixed by n and t; the fraction says how diverse the training features "
          "are (0.80: all alike, 1: orthogonal)")
    print(f"train - test balanced accuracy gap: {percent(r['train_balanced_acc']).strip()}% - "
          f"{percent(metrics['balanced_acc']).strip()}% = {100 * r['gap']:.1f} points")
    print(f"balanced accuracy {percent(metrics['balanced_acc']).strip()}%, macro-F1 "
          f"{percent(metrics['macro_f1']).strip()}%")


def write(metrics, out):
    """metrics.json and report.png in the folder `out`, each written whole or not at all."""
    with replacing(Path(out) / "metrics.json") as temporary:
        temporary.write_text(json.dumps(metrics, indent=2))
    plot_report(metrics, Path(out) / "report.png", read_history(out))


def pyplot():
    import matplotlib  # only here, as nothing else needs it
    matplotlib.use("Agg")  # to files, no display
    import matplotlib.pyplot as plt
    return plt


STYLES = {"start": dict(color="0.6", marker="o", ms=3),
          "probe": dict(color="k", ls="--", marker="x"),
          "probe_levels": dict(color="0.35", ls=":", marker="+"),
          "final": dict(color="tab:blue", marker="s", ms=3),
          "penultimate": dict(color="tab:green", marker="^", ms=3),
          "fused": dict(color="tab:red", marker="o", lw=2)}


def plot_report(metrics, path, history=()):
    """report.png: each class's test accuracy against its training count, one series per head
    (where the tail gains or loses); each class's fusion weight a (1: the penultimate layer); and
    the training curves of history.csv with the epoch the run kept."""
    plt = pyplot()
    classes = list(metrics["class_counts"])
    counts = np.array(list(metrics["class_counts"].values()))
    order = np.argsort(-counts, kind="stable")
    fig, (left, right, curves) = plt.subplots(1, 3, figsize=(17, 4.5),
                                              gridspec_kw=dict(width_ratios=(2, 1, 1.4)))
    for name, head in metrics["heads"].items():
        if head:
            accuracy = [head["per_class_acc"][classes[k]] for k in order]
            left.plot(counts[order], [np.nan if a is None else 100 * a for a in accuracy],
                      **STYLES.get(name, dict(marker="v", ms=3)),
                      label=f"{name} ({100 * head['balanced_acc']:.1f})")
    for boundary in (scilt.FEW_SHOT, scilt.MANY_SHOT):  # few | medium | many
        left.axvline(boundary, color="0.85", ls=":")
    left.set(xscale="log", xlabel="training images of the class (log scale)",
             ylabel="test accuracy (%)",
             title="per-class test accuracy (legend: balanced accuracy)")
    left.legend(fontsize=8)
    right.scatter(counts, [metrics["fusion_weights"][c] for c in classes], color="tab:purple")
    right.axhline(0.5, color="0.6", lw=0.8)
    right.set(xscale="log", ylim=(-0.05, 1.05), xlabel="training images of the class (log scale)",
              ylabel="a (1: penultimate, 0: final)", title="fusion weight per class")
    plot_curves(curves, history, metrics.get("best_epoch"))
    fig.tight_layout()
    with replacing(path) as temporary:
        fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)


def plot_curves(ax, history, kept_epoch):
    """The training loss (left axis) and each head's val balanced accuracy (right) by epoch."""
    ax.set(xlabel="epoch", ylabel="training loss", title="training (history.csv)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if not history:
        ax.text(0.5, 0.5, "no epochs trained", ha="center", transform=ax.transAxes)
        return
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [row["loss"] for row in history], color="k", label="training loss")
    val = ax.twinx()
    for column in (c for c in history[0] if c.startswith("val_")):
        scores = [np.nan if row[column] is None else 100 * row[column] for row in history]
        val.plot(epochs, scores, **STYLES.get(column[4:], dict(marker="v", ms=3)),
                 label=f"val {column[4:]}")
    val.set_ylabel("val balanced accuracy (%)")
    if kept_epoch:
        ax.axvline(kept_epoch, color="0.5", ls="--", lw=0.8, label=f"kept: epoch {kept_epoch}")
    lines = ax.get_legend_handles_labels()[0] + val.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="center right")
