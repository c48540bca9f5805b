"""The real job on a GPU, at real size and without downloads: a ViT-B/16 with random weights saved
to a local file and loaded by --weights, 224 px images, bf16 autocast, pinned memory and loader
workers, NCCL under torchrun. Each test asserts what its CPU twin (named in its docstring)
asserts, within bf16's tolerance where the twin's equality is exact in float32. Skipped without a
CUDA device; `python scripts/gpu_check.py` runs them with the benchmark.

SCILT_TEST_DEVICE=cpu runs the same tests on the CPU with a small ViT at 32 px: a check of the
tests themselves where there is no GPU (a few minutes), not of the GPU path.
"""
import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import checkpoint
import report
import scilt
import train
from data import Loader, evaluation_resize, load_data, make_transform, open_image

DEVICE = os.environ.get("SCILT_TEST_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                reason="needs a CUDA device (SCILT_TEST_DEVICE=cpu: a dry run)")
MODEL, IMG_SIZE = ("vit_base_patch16_224", 224) if ON_GPU else ("vit_tiny_patch16_224", 32)
ROOT = Path(__file__).resolve().parents[1]


def autocast():
    return scilt.autocast(torch.device(DEVICE))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A ViT-B/16 with timm's random initialisation, saved as a local weights file."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "vit_b16.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model(MODEL, num_classes=0).state_dict(), str(path))
    return str(path)


def flags(weights, *more):
    return ["--model", MODEL, "--weights", weights, "--img-size", str(IMG_SIZE),
            "--device", DEVICE, "--workers", "2", "--batch-size", "64", *more]


def metrics_of(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def comparable(metrics):
    return {k: v for k, v in metrics.items() if k not in ("train_seconds", "args")}


@pytest.fixture(scope="module")
def real_run(weights, tmp_path_factory):
    """The embedded set at real size, two epochs: the whole run, and one cut after its first
    checkpoint (as a crash would), each (folder, printed output)."""
    base = tmp_path_factory.mktemp("real")
    whole, cut = base / "whole", base / "cut"
    train.main(flags(weights, "--epochs", "2", "--out", str(whole)))
    save = checkpoint.save_atomically

    def stop_after_first_checkpoint(saved, path):
        save(saved, path)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit):  # Ctrl-C: exit 2
        patch.setattr(checkpoint, "save_atomically", stop_after_first_checkpoint)
        train.main(flags(weights, "--epochs", "2", "--out", str(cut)))
    return whole, cut


def test_step_zero_is_the_pretrained_model(weights):
    """Twin: test_tap_equals_timm_intermediates_and_model_starts_pretrained. Under bf16 autocast
    too, B = 0 adds exact zeros: the adapted model's levels are timm's own, bit for bit."""
    args = train.parse_args(flags(weights))
    backbone = checkpoint.load_backbone(args).to(DEVICE).eval()
    model = scilt.SciLT(checkpoint.load_backbone(args), [50, 20, 5]).to(DEVICE).eval()
    x = torch.randn(8, 3, IMG_SIZE, IMG_SIZE, device=DEVICE)
    with torch.no_grad(), autocast():
        for got, want in zip(model.features(x), scilt.tap(backbone, x)):
            assert torch.equal(got, want)
        _, intermediates = backbone.forward_intermediates(x, indices=[len(backbone.blocks) - 2],
                                                         norm=True, return_prefix_tokens=True,
                                                         output_fmt="NLC")
        spatial, prefix = intermediates[0]
        h_pen = backbone.forward_head(torch.cat([prefix, spatial], 1), pre_logits=True)
        assert torch.equal(model.features(x)[0], h_pen)


def test_merged_equals_unmerged_and_gradients_reach_what_learns():
    """Twins: test_merged_model_equals_unmerged, test_gradients_reach_exactly_the_trainable_
    parameters and test_configure_optimizer_gives_the_gate_its_learning_rate_and_no_weight_decay,
    through LoRA and the cosine heads under bf16 autocast."""
    torch.manual_seed(0)
    model = scilt.SciLT(scilt.create_backbone(MODEL, img_size=IMG_SIZE), [50, 20, 5, 3]).to(DEVICE)
    for layer in scilt.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    x, y = torch.randn(8, 3, IMG_SIZE, IMG_SIZE, device=DEVICE), torch.tensor([0, 1, 2, 3] * 2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = model.configure_optimizer(1e-3)
    with autocast():
        out = model(x)
        loss = model.loss(out, y.to(DEVICE))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters()
                 if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable and "gate" in trainable
    assert all(model.get_parameter(n).grad.dtype == torch.float32 for n in trainable)
    optimizer.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name])
    assert optimizer.param_groups[1]["params"] == [model.gate]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    model.eval()
    with torch.no_grad(), autocast():
        before, before_h = model(x), model.features(x)
        scilt.merge_lora(model)
        merged, merged_h = model(x), model.features(x)
    # bf16 rounds W + B A otherwise than W x + B A x, to about 1% of a feature after 12 blocks
    for got, want in zip(merged_h, before_h):
        assert F.cosine_similarity(got.float(), want.float()).min() > 0.99
    difference = (merged.logits.float() - before.logits.float()).abs().max()
    assert difference <= 0.05 * model.heads[0].scale  # of scores bounded by the scale
    scilt.merge_lora(model, False)
    with torch.no_grad():  # and in float32 the two agree as on the CPU
        unmerged = model(x)
        scilt.merge_lora(model)
        torch.testing.assert_close(model(x).logits, unmerged.logits, rtol=1e-3, atol=1e-3)


def test_step_zero_scale_search_on_the_gpu_fits_the_cpus_scale():
    """Twin: test_init_heads_fits_the_scale_that_minimises_the_step_0_loss_and_changes_no_
    prediction. The search that crashed on every GPU (a CPU tensor collected CUDA losses) runs
    there and finds the CPU's scale, to one step of its grid."""
    labels = torch.arange(5).repeat_interleave(torch.tensor([400, 200, 100, 50, 30]))
    centres = F.normalize(torch.randn(5, 768), dim=-1)
    h = [centres[labels] + 0.3 * torch.randn(len(labels), 768) for _ in range(2)]
    scales = []
    for device in ("cpu", DEVICE):
        model = scilt.SciLT(scilt.create_backbone("vit_base_patch16_224"), [400, 200, 100, 50, 30])
        model = model.to(device)
        model.init_heads([h_l.to(device) for h_l in h], labels.to(device))
        assert {head.scale.device.type for head in model.heads} == {torch.device(device).type}
        scales.append(model.scale)
    assert scales[1] == pytest.approx(scales[0], rel=0.03)


def test_real_size_run_writes_the_report(real_run):
    """Twin: test_default_run_writes_the_report."""
    whole, _ = real_run
    metrics = metrics_of(whole)
    assert metrics["args"]["device"] == DEVICE and metrics["epochs"] == 2
    for key in ("overall_acc", "balanced_acc", "macro_f1", "many", "medium", "few"):
        assert 0 <= metrics[key] <= 1
    a = list(metrics["fusion_weights"].values())
    assert all(0 < w < 1 for w in a) and len(set(a)) == 10  # the gate learns, by class
    r = metrics["rademacher"]
    assert r["n"] == 988 and all(0.75 < c["fraction"] < 1.05 for c in r["classes"].values())
    saved = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert all(tensor.device.type == "cpu" for tensor in saved["model"].values())
    assert {k: v.item() for k, v in saved["model"].items() if k.endswith(".scale")} == \
        {"heads.0.scale": r["scale"], "heads.1.scale": r["scale"]}
    others, gate = saved["optimizer"]["param_groups"]
    assert gate["lr"] == pytest.approx(scilt.GATE_LR_SCALE * others["lr"])
    assert (gate["weight_decay"], others["weight_decay"]) == (0.0, scilt.WEIGHT_DECAY)


def test_start_row_is_the_class_mean_model_at_step_0(real_run, weights):
    """Twin: test_start_row_is_the_class_mean_model_at_step_0, computed here independently on the
    same device and in the same dtype; a class may differ by one test image, where the GPU's
    sums in another order break a near tie."""
    metrics = metrics_of(real_run[0])
    args = train.parse_args(flags(weights))
    backbone = checkpoint.load_backbone(args).to(DEVICE).eval()
    data = load_data("synthetic", img_size=IMG_SIZE, mean=checkpoint.normalisation(MODEL)[0],
                     std=checkpoint.normalisation(MODEL)[1])

    def unit_features(dataset):  # each level's, (N, D), and the labels
        levels, labels = [], []
        for x, y in Loader(dataset, batch_size=64, num_workers=2, pin_memory=ON_GPU):
            with torch.no_grad(), autocast():
                levels.append([F.normalize(h.float(), dim=-1).cpu()
                               for h in scilt.tap(backbone, x.to(DEVICE))])
            labels.append(y)
        return [torch.cat(level) for level in zip(*levels)], torch.cat(labels)

    (train_h, train_labels), (test_h, test_labels) = map(unit_features, (data.train_eval,
                                                                          data.test))
    scores = 0
    for level_train, level_test in zip(train_h, test_h):
        means = torch.stack([level_train[train_labels == k].mean(0) for k in range(10)])
        scores = scores + level_test @ F.normalize(means, dim=-1).T
    expected = scilt.long_tail_metrics(scores.argmax(1).numpy(), test_labels.numpy(),
                                       data.class_counts, data.classes)
    start = metrics["heads"]["start"]
    assert start["per_class_acc"] == pytest.approx(expected["per_class_acc"], abs=0.011)


def test_resume_ends_like_an_uninterrupted_run_and_eval_only_repeats_it(real_run, weights):
    """Twin: test_resume_ends_like_an_uninterrupted_run. The GPU sums in no fixed order (class
    means, backward), so a resumed run ends near, not bitwise at, the uninterrupted one; a
    re-evaluation of the same checkpoint repeats every figure exactly."""
    whole, cut = real_run
    assert not (cut / "metrics.json").exists()
    train.main(flags(weights, "--epochs", "2", "--out", str(cut), "--resume"))
    resumed, uninterrupted = metrics_of(cut), metrics_of(whole)
    assert resumed["epochs"] == uninterrupted["epochs"] == 2
    for head in ("start", "fused"):
        assert resumed["heads"][head]["balanced_acc"] == pytest.approx(
            uninterrupted["heads"][head]["balanced_acc"], abs=0.03 if ON_GPU else 0)
    assert resumed["balanced_acc"] == pytest.approx(uninterrupted["balanced_acc"],
                                                    abs=0.03 if ON_GPU else 0)
    train.main(flags(weights, "--epochs", "2", "--out", str(cut), "--eval-only"))
    assert comparable(metrics_of(cut)) == comparable(resumed)


def write_image_folder(root, size=IMG_SIZE):
    """Three colour classes with noise: 12 / 9 / 6 training and 5 test images each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, sizes in (("train", (12, 9, 6)), ("test", (5, 5, 5))):
        for k, (name, n) in enumerate(zip(("red", "green", "blue"), sizes)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 200, (size, size, 3))
                pixels[..., k] += 50
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")


def test_predict_and_export_on_the_gpu(tmp_path, weights):
    """Twin: test_predict_and_export_give_the_evaluations_predictions. Prediction on the GPU (LoRA
    merged, bf16) gives the evaluation's classes (LoRA unmerged) within bf16's rounding, and the
    exported file, moved to the GPU, the prediction's probabilities."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import export
    import predict

    root, out = tmp_path / "images", tmp_path / "run"
    write_image_folder(root)
    train.main(flags(weights, "--data", "folder", "--data-root", str(root), "--epochs", "2",
                     "--batch-size", "8", "--out", str(out)))
    target = predict.main(["--out", str(out), "--device", DEVICE, "--workers", "2",
                           str(root / "test")])
    rows = {Path(row["path"]).relative_to(root).as_posix(): row
            for row in csv.DictReader(target.open())}
    assert len(rows) == 15 and not any(row["error"] for row in rows.values())
    model, trained, classes = predict.load_run(out, torch.device(DEVICE))
    data = load_data("folder", root, img_size=IMG_SIZE, mean=checkpoint.normalisation(MODEL)[0],
                     std=checkpoint.normalisation(MODEL)[1], splits=out / "splits.csv")
    evaluated = report.evaluate(model, Loader(data.test, batch_size=64), torch.device(DEVICE))
    agree = [rows[item]["predicted"] == classes[k]
             for item, k in zip(data.test.items, evaluated.predicted["fused"])]
    assert sum(agree) >= 14  # one near tie may fall the other way in bf16
    exported = export.main(["--out", str(out), str(tmp_path / "model.safetensors")])
    loaded, meta = export.load_exported(exported)
    loaded = loaded.to(DEVICE)
    transform = make_transform(IMG_SIZE, meta["mean"], meta["std"])
    for path, row in rows.items():
        image = open_image(root / path, evaluation_resize(IMG_SIZE))
        with torch.no_grad(), autocast():
            p = loaded(transform(image)[None].to(DEVICE)).logits.float().softmax(-1)[0]
        assert p.max().item() == pytest.approx(float(row["probability"]), abs=0.02)


def test_torchrun_one_process_per_gpu(tmp_path, weights):
    """Twin: test_torchrun_two_processes: NCCL, DDP with the gate, the report once, and every test
    image evaluated once (one process re-evaluating the checkpoint finds the same figures)."""
    processes = torch.cuda.device_count() if ON_GPU else 2
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               str(ROOT / "train.py"), *flags(weights, "--epochs", "1", "--out", str(out))]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Rademacher complexity") == 1
    metrics = metrics_of(out)
    assert metrics["rademacher"]["n"] == 988
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.main(flags(weights, "--epochs", "1", "--out", str(out), "--eval-only"))
    alone = metrics_of(out)
    assert alone["heads"]["fused"]["per_class_acc"] == pytest.approx(
        metrics["heads"]["fused"]["per_class_acc"], abs=0.011 if ON_GPU else 0)


def test_analyze_on_the_gpu_and_its_last_block_is_the_start_row(tmp_path, weights):
    """Twin: test_analyze_per_block_and_its_last_block_is_the_start_row: every block's features
    in one pass on the GPU; the last block's class means are the final head at step 0."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import analyze

    final = tmp_path / "final"
    train.main(flags(weights, "--method", "final", "--epochs", "1", "--out", str(final)))
    analyze.main(flags(weights, "--out", str(tmp_path / "analysis")))
    layers = json.loads((tmp_path / "analysis" / "layers.json").read_text())["layers"]
    assert [layer["block"] for layer in layers] == list(range(1, 13))
    start = metrics_of(final)["heads"]["start"]["per_class_acc"]
    assert layers[-1]["ncm"]["per_class_acc"] == pytest.approx(start, abs=0.011 if ON_GPU else 0)
