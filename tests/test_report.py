"""report.py: the evaluation over processes, the linear probe, the report's rows and groups."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import report
import scilt
from conftest import tiny_vit

TAU = 1.0


def predicted(*classes):
    return torch.tensor(classes)


def test_probe_weight_decay_is_the_best_on_val():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 64, generator=generator)

    def sample(n):
        y = torch.arange(4).repeat(n)
        return centres[y] + 3 * torch.randn(len(y), 64, generator=generator), y

    (h, y), (val_h, val_y) = sample(6), sample(40)
    counts = [6] * 4
    log_prior = torch.log(torch.tensor(counts, dtype=torch.float64) / 24)
    scores = []
    for decay in report.PROBE_WEIGHT_DECAYS:
        probe = report.LinearProbe(h, y, log_prior, TAU, decay)
        scores.append(report.head_metrics(probe.predict(val_h), val_y, counts)["balanced_acc"])
    assert len(set(scores)) > 1  # the decay matters on these features
    best = report.PROBE_WEIGHT_DECAYS[scores.index(max(scores))]
    chosen = report.fit_probe(h, y, val_h, val_y, counts).predict(val_h)
    torch.testing.assert_close(chosen,
                               report.LinearProbe(h, y, log_prior, TAU, best).predict(val_h))


def test_report_groups_by_group_counts_and_correlates_a_with_the_penultimate_gain():
    """CIFAR-100-LT's many / medium / few come from its r = 100 counts whatever the training counts
    are; and a class whose gate leans on the penultimate layer where that head does better
    correlates +."""
    model = scilt.SciLT(tiny_vit(), [200, 50, 5])
    with torch.no_grad():
        model.gate[:, 0] = torch.tensor([2.0, 0.0, -2.0])  # a = 0.88, 0.5, 0.12
    labels = predicted(0, 0, 1, 1, 2, 2)
    h = torch.randn(6, 2, 48)

    def evaluation(fused, penultimate, final):  # what report.evaluate() keeps
        heads = {"fused": fused, "penultimate": penultimate, "final": final}
        return report.Evaluation(labels, h, h[:, -1], heads)

    same = predicted(0, 0, 1, 1, 0, 0)
    test = evaluation(same, same, same)
    # on val the penultimate head is right on class 0 and wrong on class 2, the final the reverse
    val = evaluation(predicted(0, 0, 1, 1, 2, 2), same, predicted(1, 1, 1, 1, 2, 2))
    data = SimpleNamespace(classes=["a", "b", "c"], class_counts=[200, 50, 5],
                           group_counts=[5, 50, 200])
    metrics = report.metrics_of(model, test, val, test, data, {})
    # by [5, 50, 200]
    assert (metrics["many"], metrics["medium"], metrics["few"]) == (0.0, 1.0, 1.0)
    assert metrics["fusion_val_correlation"] == pytest.approx(1.0)


def test_fusion_val_correlation_leaves_out_the_classes_val_lacks():
    """Class 3 has no val image: it is left out, not counted as a gain of 0."""
    labels = predicted(0, 0, 1, 1, 2, 2)
    pen = predicted(0, 0, 1, 0, 0, 0)   # right on 0, half on 1, wrong on 2
    fin = predicted(1, 1, 1, 1, 2, 2)   # the reverse: 0, 1, 1
    val = report.Evaluation(labels, None, None, {"penultimate": pen, "final": fin})
    a = torch.tensor([0.9, 0.5, 0.1, 0.9])  # class 3 leans on the penultimate level
    # gains over the classes held, 1, -0.5, -1, against a = 0.9, 0.5, 0.1
    expected = float(np.corrcoef([0.9, 0.5, 0.1], [1.0, -0.5, -1.0])[0, 1])
    assert report.fusion_val_correlation(a, val, [10, 10, 10, 10]) == pytest.approx(expected)


def test_linear_probe_separates_separable_features():
    counts = [120, 60, 30, 12, 4]
    log_prior = torch.log(torch.tensor(counts) / sum(counts))
    centres = 4 * F.normalize(torch.randn(5, 32), dim=-1)
    labels = torch.arange(5).repeat_interleave(torch.tensor(counts))
    h = centres[labels] + 0.5 * torch.randn(len(labels), 32)
    probe = report.LinearProbe(h, labels, log_prior)
    assert (probe.predict(h) == labels).all()
    test_labels = torch.arange(5).repeat(20)
    assert (probe.predict(centres[test_labels] + 0.5 * torch.randn(100, 32)) == test_labels).all()


def test_linear_probe_in_chunks_is_the_same_fit():
    """Bounded memory: the loss summed over chunks of images is the full-batch loss, so the fit is
    the same."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(torch.tensor([40, 20, 10, 5]))
    h = torch.randn(4, 12, generator=generator)[labels] + torch.randn(75, 12, generator=generator)
    log_prior = torch.log(torch.tensor([40, 20, 10, 5]) / 75)
    whole, chunked = (report.LinearProbe(h, labels, log_prior, chunk=chunk) for chunk in (8192, 16))
    x = torch.randn(500, 12, generator=generator)
    assert (whole.predict(x) == chunked.predict(x)).float().mean() > 0.99
    assert len(whole.predict(torch.zeros(0, 12))) == 0  # an empty set: no prediction, no error


def test_linear_probe_with_logit_adjustment_is_balanced_on_overlapping_long_tailed_features():
    """Overlapping classes, 300 down to 3 training images: a plain softmax regression leans to the
    head classes; the logit-adjusted one (as the heads' loss) is clearly better on a balanced test
    set."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.tensor([300, 120, 50, 20, 8, 3])
    centres = 1.5 * F.normalize(torch.randn(6, 16, generator=generator), dim=-1)

    def sample(labels):
        return centres[labels] + 0.6 * torch.randn(len(labels), 16, generator=generator)

    labels, test_labels = torch.arange(6).repeat_interleave(counts), torch.arange(6).repeat(300)
    h, test_h = sample(labels), sample(test_labels)
    log_prior = torch.log(counts / counts.sum())

    def balanced(tau):
        probe = report.LinearProbe(h, labels, log_prior, tau)
        return scilt.long_tail_metrics(probe.predict(test_h), test_labels, counts)["balanced_acc"]

    assert balanced(1.0) > balanced(0.0) + 0.03


@pytest.mark.parametrize("blocks", [(-2, -1), (0, 1)])
def test_evaluation_of_a_model_on_a_fake_cuda_device_gives_cpu_results(blocks):
    """The same-device rule in evaluate(): batches from the CPU meet a model "on" cuda (PyTorch's
    fake tensors, no GPU needed), and what it keeps comes back to the CPU, where the metrics and
    the probe read it. With blocks (0, 1) the final block is tapped besides the model's levels.
    The probe itself needs backward, which fake tensors cannot run: tests/test_cuda.py."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    model = scilt.SciLT(tiny_vit(), [50, 20, 5], blocks=blocks)
    images, labels = torch.randn(10, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    batches = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast says it is off without CUDA
        model = model.to_empty(device="cuda")
        evaluation = report.evaluate(model, batches, torch.device("cuda"))
    assert evaluation.level_features.shape == (10, 2, 48) and evaluation.final.shape == (10, 48)
    kept = [evaluation.labels, evaluation.level_features, evaluation.final,
            *evaluation.predicted.values()]
    assert {tensor.device.type for tensor in kept} == {"cpu"}
    assert list(evaluation.predicted) == ["fused", *model.level_names()]


def test_report_png_draws_the_training_curves_and_marks_the_kept_epoch(tmp_path, monkeypatch):
    """report.png's third panel: the loss of history.csv by epoch, each head's val balanced
    accuracy, and a line at the epoch the run kept."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at
    classes = {"a": 50, "b": 5}
    head = {"balanced_acc": 0.5, "per_class_acc": {"a": 0.6, "b": 0.4}}
    metrics = {"class_counts": classes, "heads": {"fused": head, "final": head},
               "fusion_weights": {"a": 0.4, "b": 0.7}, "best_epoch": 2}
    history = [{"epoch": 1, "loss": 2.0, "val_fused": 0.5, "val_final": None},
               {"epoch": 2, "loss": 1.5, "val_fused": 0.7, "val_final": 0.6},
               {"epoch": 3, "loss": 1.2, "val_fused": 0.6, "val_final": 0.65}]
    report.plot_report(metrics, tmp_path / "report.png", history)
    curves = figures[0].axes[2]
    loss = [line for line in curves.lines if line.get_label() == "training loss"][0]
    assert list(loss.get_xdata()) == [1, 2, 3] and list(loss.get_ydata()) == [2.0, 1.5, 1.2]
    kept = [line for line in curves.lines if line.get_label() == "kept: epoch 2"][0]
    assert list(kept.get_xdata()) == [2, 2]
    val = {line.get_label(): list(line.get_ydata()) for line in figures[0].axes[3].lines}
    assert val["val fused"] == pytest.approx([50, 70, 60])
    assert val["val final"][1:] == pytest.approx([60, 65]) and np.isnan(val["val final"][0])
    assert (tmp_path / "report.png").stat().st_size > 0
