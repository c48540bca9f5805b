"""train.py end to end on the embedded default at a reduced size (16 px images, a few epochs)."""
import argparse
import errno
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import export
import predict
import report
import scilt
import train
import conftest
from conftest import FAST, tiny_vit
from data import load_data

ROOT = Path(__file__).resolve().parents[1]
SPEC_KEYS = {"overall_acc", "balanced_acc", "macro_f1", "many", "medium", "few", "head", "middle",
             "tail", "per_class_acc", "class_counts", "heads", "fusion_weights", "rademacher",
             "trainable_params", "total_params", "train_seconds"}


def run(*argv):
    out = train.main(list(argv))
    return json.loads((out / "metrics.json").read_text())


def fails(capsys, *argv):
    """train.py's promised failure: exit status 2 and one line on stderr."""
    return conftest.fails(capsys, train.main, *argv)


def comparable(metrics):
    return {k: v for k, v in metrics.items() if k not in ("train_seconds", "args")}


def metrics_of(out):
    return json.loads((out / "metrics.json").read_text())


def test_default_run_writes_the_report(finished_run):
    out, printed = finished_run(*FAST)
    metrics = metrics_of(out)
    assert SPEC_KEYS <= set(metrics)
    for key in ("overall_acc", "balanced_acc", "macro_f1", "head", "middle", "tail", "many",
                "medium", "few"):
        assert 0 <= metrics[key] <= 1
    assert len(metrics["per_class_acc"]) == len(metrics["fusion_weights"]) == 10
    assert list(metrics["class_counts"].values()) == [400, 239, 143, 86, 51, 30, 18, 11, 6, 4]
    a = list(metrics["fusion_weights"].values())
    assert all(0 < w < 1 for w in a)
    assert max(abs(w - 0.5) for w in a) > 0.02 and len(set(a)) == 10  # the gate learns, by class
    for head in ("start", "probe", "probe_levels", "penultimate", "final", "fused"):
        assert {"balanced_acc", "many", "medium", "few"} <= set(metrics["heads"][head])
    assert metrics["heads"]["fused"]["balanced_acc"] == metrics["balanced_acc"]
    r = metrics["rademacher"]
    assert r["n"] == 988  # the training sample
    assert r["gap"] == pytest.approx(r["train_balanced_acc"] - metrics["balanced_acc"])
    assert r["level_weights"] == pytest.approx([np.mean(a), 1 - np.mean(a)])
    for c, w in metrics["level_weights"].items():
        assert w["penultimate"] == pytest.approx(metrics["fusion_weights"][c])
        assert sum(w.values()) == pytest.approx(1)
    estimates = {name: c["estimate"] for name, c in r["classes"].items()}
    assert estimates["fused"] == pytest.approx(np.mean(a) * estimates["penultimate"]
                                               + (1 - np.mean(a)) * estimates["final"])
    assert estimates["sum"] == pytest.approx(estimates["penultimate"] + estimates["final"])
    assert all(0.75 < c["fraction"] < 1.05 for c in r["classes"].values())
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert "penultimate head" in printed
    assert "Rademacher complexity" in printed
    assert "img/s" in printed
    assert "start (step 0)" in printed and "linear probe" in printed
    # history.csv: the epoch's row holds the mean loss the loop printed at its last step, its
    # terms, the val score printed after it and the gate's mean weights
    [row] = report.read_history(out)
    last_step = [line for line in printed.splitlines() if "step 15/15" in line][0]
    assert f"loss {row['loss']:.4f}" in last_step
    assert row["loss"] == pytest.approx(row["loss_fused"] + 0.5 * (row["loss_penultimate"]
                                                                   + row["loss_final"]), rel=1e-4)
    assert f"epoch 1: val balanced acc {100 * row['val_fused']:.1f}%" in printed
    assert 0 < row["val_penultimate"] <= 1 and 0 < row["val_final"] <= 1
    assert row["weight_penultimate"] == pytest.approx(np.mean(a), abs=1e-5)
    assert row["weight_penultimate"] + row["weight_final"] == pytest.approx(1, abs=1e-5)
    assert row["lr"] > 0 and row["images_per_s"] > 0 and row["epoch"] == 1
    # the checkpoint holds what learns and the heads' scale fitted at step 0, not the frozen
    # backbone, and loads without pickled code
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    scales = {k: v.item() for k, v in checkpoint["model"].items() if k.endswith(".scale")}
    assert set(scales) == {"heads.0.scale", "heads.1.scale"}
    assert set(scales.values()) == {r["scale"]}
    assert 1 < r["scale"] < 25  # class means on these features do not support 25's confidence
    assert sum(v.numel() for k, v in checkpoint["model"].items()
               if k not in scales) == metrics["trainable_params"]
    assert checkpoint["args"]["method"] == "scilt" and checkpoint["state"]["epoch"] == 1
    # the run's optimizer is the method's: the gate alone in a group without weight decay, at
    # GATE_LR_SCALE x the others' learning rate at every step
    others, gate = checkpoint["optimizer"]["param_groups"]
    assert len(gate["params"]) == 1 and gate["weight_decay"] == 0.0
    assert others["weight_decay"] == scilt.WEIGHT_DECAY
    assert gate["lr"] == pytest.approx(scilt.GATE_LR_SCALE * others["lr"]) and others["lr"] > 0
    assert (out / "splits.csv").read_text().count("\n") == 988 + 200 + 1000 + 1
    for head in metrics["heads"].values():  # what report.png draws
        assert list(head["per_class_acc"]) == list(metrics["class_counts"])
    with Image.open(out / "report.png") as image:
        assert image.format == "PNG" and image.size[0] > 600


@pytest.mark.parametrize("method", ["final", "penultimate"])
def test_ablations(finished_run, method):
    metrics = metrics_of(finished_run(*FAST, "--method", method)[0])
    other = "penultimate" if method == "final" else "final"
    assert metrics["heads"][other] is None
    assert metrics["heads"][method]["balanced_acc"] == metrics["balanced_acc"]
    assert set(metrics["fusion_weights"].values()) == {0.0 if method == "final" else 1.0}


def test_feature_fusion_runs_end_to_end(finished_run):
    out = finished_run(*FAST, "--fusion", "feature")[0]
    metrics = metrics_of(out)
    assert metrics["heads"]["fused"]["balanced_acc"] == metrics["balanced_acc"]
    assert len(set(metrics["fusion_weights"].values())) == 1  # the channels' mean, every class
    assert metrics["fusion_val_correlation"] is None  # no per-class a to correlate
    r = metrics["rademacher"]["classes"]
    assert r["fused"]["estimate"] != pytest.approx(r["penultimate"]["estimate"])  # its own class
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"]["gate"].shape == (96, 2)
    assert "fused_head.weight" in checkpoint["model"]
    assert checkpoint["model"]["fused_head.scale"] == checkpoint["model"]["heads.0.scale"]


def test_blocks_fuses_any_set_of_levels(tmp_path, capsys):
    metrics = run(*FAST, "--blocks", "1", "-2", "-1", "--out", str(tmp_path / "three"))
    assert [name for name, head in metrics["heads"].items() if head] == \
        ["start", "probe", "probe_levels", "block1", "penultimate", "final", "fused"]
    assert all(list(w) == ["block1", "penultimate", "final"] and sum(w.values()) == pytest.approx(1)
               for w in metrics["level_weights"].values())
    levels = {"block1", "penultimate", "final", "sum", "fused"}
    assert set(metrics["rademacher"]["classes"]) == levels
    checkpoint = torch.load(tmp_path / "three" / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"]["gate"].shape == (10, 3)
    assert checkpoint["args"]["blocks"] == [1, -2, -1]
    # levels without the final block: the probe still reads the final block's features
    two = run(*FAST, "--blocks", "2", "4", "--out", str(tmp_path / "two"))
    assert two["heads"]["probe"] == metrics["heads"]["probe"] and two["heads"]["final"] is None
    assert two["heads"]["probe_levels"] != two["heads"]["probe"]  # blocks 2 and 4, not the last
    assert set(two["fusion_weights"].values()) == {1.0}  # no weight on the final block
    error = fails(capsys, *FAST, "--blocks", "7", "--out", str(tmp_path / "bad"))
    assert "--blocks 7: tiny has 6 blocks, expected numbers in 1..6 or -6..-1" in error
    error = fails(capsys, *FAST, "--out", str(tmp_path / "three"), "--eval-only")
    assert "was trained with --blocks 1 5 6, but this run asks for --blocks 5 6" in error


THREE_EPOCHS = ("--img-size", "16", "--epochs", "3")


@pytest.fixture(scope="session")
def cut_run(tmp_path_factory):
    """A three-epoch run killed as it was about to save its checkpoint of epoch 2, after that
    epoch's row of history.csv: its checkpoint holds epoch 1 (copy the folder to go on)."""
    out, save, saves = tmp_path_factory.mktemp("cut") / "run", checkpoint.save_atomically, []

    def stop_at_second_checkpoint(obj, path):
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
        save(obj, path)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit):  # Ctrl-C: exit 2
        patch.setattr(checkpoint, "save_atomically", stop_at_second_checkpoint)
        train.main([*THREE_EPOCHS, "--out", str(out)])
    assert not (out / "metrics.json").exists()
    assert len(report.read_history(out)) == 2  # one row more than the checkpoint holds
    return out


def test_resume_ends_like_an_uninterrupted_run(tmp_path, cut_run, capsys):
    """The resumed run's metrics are the uninterrupted run's, and so is its history: a row per
    epoch, the second written again rather than doubled."""
    whole = run(*THREE_EPOCHS, "--out", str(tmp_path / "whole"))
    shutil.copytree(cut_run, tmp_path / "cut")
    resumed = run(*THREE_EPOCHS, "--out", str(tmp_path / "cut"), "--resume")
    assert "1 of 3 epoch(s) done" in capsys.readouterr().out
    assert comparable(resumed) == comparable(whole)

    def history(out):  # less the columns of time
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
                for row in report.read_history(out)]

    assert [row["epoch"] for row in history(tmp_path / "cut")] == [1, 2, 3]
    assert history(tmp_path / "cut") == history(tmp_path / "whole")
    # --eval-only re-evaluates the saved model and reproduces its metrics
    again = run(*THREE_EPOCHS, "--out", str(tmp_path / "cut"), "--eval-only")
    assert comparable(again) == comparable(whole)
    assert len(report.read_history(tmp_path / "cut")) == 3


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert "does not hold the isic data and --no-download forbids" in fails(
        capsys, "--data", "isic", "--data-root", str(tmp_path / "x"), "--no-download")
    assert "does not exist: expected MedMNIST" in fails(capsys, "--data", "npz", "--data-root",
                                                        str(tmp_path / "x"))
    assert "invalid choice: 'imagenet'" in fails(capsys, "--data", "imagenet")
    assert "unknown model 'vit_nope'" in fails(capsys, *FAST, "--model", "vit_nope",
                                               "--out", str(tmp_path / "m"))
    error = fails(capsys, *FAST, "--model", "vit_base_patch16_224.nosuchtag", "--out",
                  str(tmp_path / "m"))
    assert "--model vit_base_patch16_224.nosuchtag: Invalid pretrained tag (nosuchtag)" in error
    assert "timm.list_pretrained('vit_base_patch16_224*')" in error
    assert "--epochs must be a positive number" in fails(capsys, "--epochs", "0")
    assert "no checkpoint at" in fails(capsys, "--out", str(tmp_path / "none"), "--eval-only")
    assert "weights file" in fails(capsys, *FAST, "--weights", str(tmp_path / "w.pth"),
                                   "--out", str(tmp_path / "w"))
    assert not (tmp_path / "m").exists() and not (tmp_path / "w").exists()


def test_every_flag_is_checked_as_it_enters(tmp_path, capsys, monkeypatch):
    """Values of the right type that would still train on the wrong thing, or fail deep inside a
    run (NaN passes every comparison, a ratio below 1 reverses the profile)."""
    cases = {("--lr", "nan"): "--lr must be a positive number, got nan",
             ("--imbalance-ratio", "0.5"): "--imbalance-ratio must be a number of at least 1",
             ("--imbalance-ratio", "nan"): "--imbalance-ratio must be a number of at least 1",
             ("--seed", "-1"): "--seed must be 0 or more", ("--workers", "-1"): "--workers must",
             ("--device", "banana"): "--device banana: expected cpu, cuda or cuda:N"}
    for flags, message in cases.items():
        assert message in fails(capsys, *FAST, *flags, "--out", str(tmp_path / "x"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "PyTorch sees no CUDA device here" in fails(capsys, *FAST, "--device", "cuda")
    assert not (tmp_path / "x").exists()

    def out_of_memory(*args):  # what torch raises on a CPU, --img-size 1000 say
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")

    monkeypatch.setattr(report, "step_zero", out_of_memory)
    error = fails(capsys, *FAST, "--out", str(tmp_path / "big"))
    assert error == "error: out of memory: expected a smaller --batch-size or --img-size"


def test_a_class_added_before_resume_is_named(tmp_path, capsys):
    images = colour_folder(tmp_path / "images")
    out = tmp_path / "run"
    flags = ("--data", "folder", "--data-root", str(images), *SMALL, "--epochs", "1")
    run(*flags, "--out", str(out))
    shutil.copytree(images / "train" / "red", images / "train" / "violet")
    error = fails(capsys, *flags, "--out", str(out), "--eval-only")
    assert "violet is not among the classes split file" in error and "new run" in error


def test_real_data_defaults_to_hub_weights_and_says_how_to_go_offline(tmp_path, capsys):
    write_npz(tmp_path / "three.npz", 3)
    args = train.parse_args(["--data", "npz", "--data-root", str(tmp_path / "three.npz")])
    assert args.model == "vit_base_patch16_224.augreg_in21k"
    assert (args.img_size, args.epochs) == (224, 20)
    tiny = train.parse_args(["--data", "npz", "--data-root", str(tmp_path / "three.npz"),
                             "--model", "tiny"])
    assert (tiny.img_size, tiny.lr) == (32, 3e-3)  # the bundled tiny model, at its own size
    # the tests never reach the hub (HF_HUB_OFFLINE=1), as on a machine without internet
    error = fails(capsys, "--data", "npz", "--data-root", str(tmp_path / "three.npz"), "--out",
                  str(tmp_path / "r"))
    assert "could not fetch pretrained weights for vit_base_patch16_224.augreg_in21k" in error
    assert "pass --weights FILE" in error and not (tmp_path / "r").exists()
    error = fails(capsys, "--data", "npz", "--data-root", str(tmp_path / "three.npz"),
                  "--imbalance-ratio", "10")
    assert "--imbalance-ratio does not apply to --data npz" in error


def write_npz(path, num_classes):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 16, 16), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % num_classes)[:, None]
    np.savez(path, **arrays)


def test_checkpoint_of_another_class_count_and_no_overwrite(tmp_path, capsys):
    write_npz(tmp_path / "three.npz", 3)
    write_npz(tmp_path / "four.npz", 4)
    three, four = str(tmp_path / "three"), str(tmp_path / "four")
    run("--data", "npz", "--data-root", str(tmp_path / "three.npz"), "--model", "tiny",
        *FAST, "--out", three)
    saved = (tmp_path / "three" / "checkpoint.pt").read_bytes()
    on_four = ("--data", "npz", "--data-root", str(tmp_path / "four.npz"), "--model", "tiny", *FAST)
    # the 3-class run's split file already disagrees with 4-class data
    error = fails(capsys, *on_four, "--out", three, "--eval-only")
    assert "3 is not among the classes split file" in error
    # and with a split file that fits, the checkpoint itself is refused
    run(*on_four, "--out", four)
    (tmp_path / "three" / "splits.csv").write_bytes((tmp_path / "four" / "splits.csv").read_bytes())
    error = fails(capsys, *on_four, "--out", three, "--eval-only")
    assert "was trained on 3 classes" in error and "this data set has 4" in error
    assert "already holds a run" in fails(capsys, *FAST, "--out", three)
    assert (tmp_path / "three" / "checkpoint.pt").read_bytes() == saved


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch,
                                                             cut_run):
    out = str(tmp_path / "run")
    shutil.copytree(cut_run, out)
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    def nan_loss(self, output, target, terms=False):
        loss = output.logits.sum() * float("nan")
        return (loss, loss.detach()[None]) if terms else loss

    monkeypatch.setattr(scilt.SciLT, "loss", nan_loss)
    error = fails(capsys, *THREE_EPOCHS, "--out", out, "--resume")
    assert "the loss became nan in epoch 2" in error
    assert f"the last good checkpoint is {tmp_path / 'run' / 'checkpoint.pt'}" in error
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved
    # in the first epoch there is none yet, and the message says so
    images = colour_folder(tmp_path / "images")
    error = fails(capsys, "--data", "folder", "--data-root", str(images), *SMALL, "--epochs", "2",
                  "--out", str(tmp_path / "new"))
    assert "the loss became nan in epoch 1; no checkpoint was written yet" in error
    assert not (tmp_path / "new" / "checkpoint.pt").exists()


def test_unreadable_image_in_a_loader_worker_is_one_line(tmp_path, capsys):
    image = io.BytesIO()
    Image.new("RGB", (20, 20)).save(image, "PNG")
    for split in ("train", "test"):
        for name in ("cats", "dogs"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                (tmp_path / split / name / f"{i}.png").write_bytes(image.getvalue())
    (tmp_path / "train" / "dogs" / "1.png").write_bytes(image.getvalue()[:40])  # truncated
    error = fails(capsys, "--data", "folder", "--data-root", str(tmp_path), "--model", "tiny",
                  *FAST, "--workers", "1", "--out", str(tmp_path / "run"))
    assert error.startswith("error: cannot read image") and "dogs/1.png" in error


def test_subprocess_error_has_no_traceback(tmp_path):
    command = [sys.executable, "train.py", "--data", "npz", "--data-root", str(tmp_path / "no")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: --data-root")
    assert len(result.stderr.strip().splitlines()) == 1


SLOW_STEP_ZERO = """import sys, time
from datetime import timedelta
sys.path.insert(0, {root!r})
import report, train
train.TIMEOUT = timedelta(seconds=15)  # a collective that waits longer than this fails
fit = report.start_metrics
def slow_fit(*args, **kwargs):  # a probe that takes long, as at iNaturalist size
    time.sleep(25)
    return fit(*args, **kwargs)
report.start_metrics = slow_fit
train.main()
"""


def test_torchrun_two_processes(tmp_path, capsys):
    """Two processes train as one: every image once, the report once. The step-0 probe takes
    longer than the processes may wait for each other (25 s against 15 s): every process fits it,
    so none waits. The 1,027 training images (r = 80) do not split evenly: the shares, padded to be
    gathered, are cut back, so that one process evaluating the same checkpoint finds every figure
    the same. A resume by another number of processes is refused."""
    out, program = tmp_path / "ddp", tmp_path / "slow_step_zero.py"
    program.write_text(SLOW_STEP_ZERO.format(root=str(ROOT)))
    uneven = [*FAST, "--imbalance-ratio", "80"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(program),
               *uneven, "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Rademacher complexity") == 1  # only rank 0 reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rademacher"]["n"] == 1027  # the whole training set's features, once each
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "history.csv", "metrics.json",
                                                     "report.png", "splits.csv"]
    assert len(report.read_history(out)) == 1  # written once, by the first process
    # the two processes' shares, gathered, are each set once: one process re-evaluating the same
    # checkpoint gets every figure the same, of the test set and of the training set
    alone = run(*uneven, "--out", str(out), "--eval-only")
    assert comparable(alone) == comparable(metrics)
    # the schedule's steps per epoch depend on the number of processes
    error = fails(capsys, *uneven, "--out", str(out), "--resume")
    assert "was trained by 2 process(es), but this run has 1" in error
    assert "torchrun --nproc_per_node=2" in error


def test_tiny_default_is_the_bundled_foundation_model():
    from safetensors.torch import load_file

    backbone = checkpoint.load_backbone(train.parse_args([]))
    stored = load_file(checkpoint.TINY_WEIGHTS)
    assert set(stored) == set(backbone.state_dict())
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(tensor, stored[name].float(), rtol=0, atol=0)
    kwargs = {k: v for k, v in checkpoint.TINY.items() if k != "name"}
    random = scilt.create_backbone(checkpoint.TINY["name"], **kwargs)  # timm's own initialisation
    assert not torch.equal(random.blocks[0].attn.qkv.weight, backbone.blocks[0].attn.qkv.weight)
    # the stand-in pretrained across a domain gap, on fractals, loads the same way
    fractal = checkpoint.load_backbone(train.parse_args(["--weights",
                                                    str(ROOT / "fractal_vit.safetensors")]))
    for name, tensor in load_file(ROOT / "fractal_vit.safetensors").items():
        torch.testing.assert_close(fractal.state_dict()[name], tensor.float(), rtol=0, atol=0)
    assert not torch.equal(fractal.blocks[0].attn.qkv.weight, backbone.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_from_a_local_weights_file(tmp_path, suffix):
    """Weights of a timm ViT with its classifier head, as a downloaded checkpoint has, loaded as
    timm loads the hub's; a missing file, a file of another shape and an unknown model: one line."""
    source = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(source.state_dict(), path)
    args = argparse.Namespace(model="vit_tiny_patch16_224", weights=str(path), img_size=32)
    loaded = checkpoint.load_backbone(args).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.forward_head(loaded.forward_features(x), pre_logits=True),
                               source.eval().forward_head(source.forward_features(x),
                                                          pre_logits=True))
    with pytest.raises(checkpoint.Abort, match="missing.pth not found"):
        checkpoint.load_backbone(argparse.Namespace(**{**vars(args),
                                                  "weights": tmp_path / "missing.pth"}))
    refused = "could not load weights file .* into vit_small_patch16"
    with pytest.raises(checkpoint.Abort, match=refused):
        checkpoint.load_backbone(argparse.Namespace(**{**vars(args),
                                                       "model": "vit_small_patch16_224"}))
    with pytest.raises(checkpoint.Abort, match="unknown model 'vit_nonexistent'"):
        checkpoint.load_backbone(argparse.Namespace(**{**vars(args), "model": "vit_nonexistent"}))


@pytest.mark.parametrize("method", ["final", "scilt", "feature"])
def test_start_row_is_the_class_mean_model_at_step_0(finished_run, method):
    """heads.start, computed here independently: cosine nearest class mean on the frozen features
    of each level, fused as at step 0 (equal weights, one scale), per class; with the feature
    fusion, cosine nearest class mean on the mean of the levels' unit features."""
    flags = {"final": ["--method", "final"], "scilt": [], "feature": ["--fusion", "feature"]}
    metrics = metrics_of(finished_run(*FAST, *flags[method])[0])
    data = load_data("synthetic", img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    backbone = checkpoint.load_backbone(train.parse_args(FAST)).eval()

    def cosines(images):  # each level's unit features, (N, D)
        with torch.no_grad():
            x = torch.stack([image for image, _ in images])
            return [F.normalize(h, dim=-1) for h in scilt.tap(backbone, x)]

    train_h, test_h = cosines(data.train_eval), cosines(data.test)
    train_labels, test_labels = torch.tensor(data.train_eval.labels), torch.tensor(data.test.labels)
    scores = []
    for level_train, level_test in zip(train_h, test_h):
        means = torch.stack([level_train[train_labels == k].mean(0) for k in range(10)])
        scores.append(level_test @ F.normalize(means, dim=-1).T)
    fused_train, fused_test = (F.normalize(sum(h) / 2, dim=-1) for h in (train_h, test_h))
    fused_means = torch.stack([fused_train[train_labels == k].mean(0) for k in range(10)])
    feature = fused_test @ F.normalize(fused_means, dim=-1).T
    expected = {}
    for name, s in (("final", scores[1]), ("scilt", scores[0] + scores[1]), ("feature", feature)):
        predictions = s.argmax(1).numpy()
        expected[name] = scilt.long_tail_metrics(predictions, test_labels.numpy(),
                                                 data.class_counts, data.classes)
    for other in ("final", "feature"):  # the test can tell them apart
        assert expected[other]["per_class_acc"] != expected["scilt"]["per_class_acc"]
    start = metrics["heads"]["start"]
    assert start["per_class_acc"] == pytest.approx(expected[method]["per_class_acc"])
    assert start["balanced_acc"] == pytest.approx(expected[method]["balanced_acc"])
    assert start["few"] == pytest.approx(expected[method]["few"])


def test_probe_on_the_levels_reads_the_models_own_levels_at_step_0(finished_run):
    """heads.probe_levels, computed here independently: the pretrained backbone's penultimate and
    final features, concatenated, and the probe fitted and chosen on val as the run fits it. With
    --method final the model's one level is the final block: that probe is the final-layer one."""
    out, printed = finished_run(*FAST)
    metrics = metrics_of(out)
    data = load_data("synthetic", img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    backbone = checkpoint.load_backbone(train.parse_args(FAST)).eval()

    def levels(dataset):  # (N, 2 * D), in batches as evaluation runs them
        with torch.no_grad():
            batches = torch.stack([image for image, _ in dataset]).split(64)
            return torch.cat([torch.cat(scilt.tap(backbone, x), dim=1) for x in batches])

    labels = [torch.tensor(d.labels) for d in (data.train_eval, data.val, data.test)]
    probe = report.fit_probe(levels(data.train_eval), labels[0], levels(data.val), labels[1],
                             data.class_counts)
    expected = report.head_metrics(probe.predict(levels(data.test)), labels[2],
                                   data.group_counts, data.classes)
    got = metrics["heads"]["probe_levels"]
    assert got["per_class_acc"] == pytest.approx(expected["per_class_acc"])
    assert got["balanced_acc"] == pytest.approx(expected["balanced_acc"])
    assert metrics["heads"]["probe_levels"] != metrics["heads"]["probe"]
    assert "probe penultimate+final" in printed
    final = metrics_of(finished_run(*FAST, "--method", "final")[0])["heads"]
    assert final["probe_levels"] == final["probe"]


def test_training_lowers_the_loss_and_beats_step_0(tmp_path, capsys):
    metrics = run("--img-size", "16", "--epochs", "4", "--out", str(tmp_path))
    printed = capsys.readouterr().out.splitlines()
    losses = [float(line.split(" loss ")[1].split()[0]) for line in printed if " loss " in line]
    assert losses[-1] < 0.7 * losses[0]
    assert metrics["balanced_acc"] > metrics["heads"]["start"]["balanced_acc"]


def test_checkpoint_of_another_rank_or_truncated_is_one_line(tmp_path, capsys, finished_run,
                                                             monkeypatch):
    out = str(tmp_path / "run")
    shutil.copytree(finished_run(*FAST)[0], out)
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    error = fails(capsys, *FAST, "--out", out, "--lora-rank", "4", "--eval-only")
    assert "was trained with --lora-rank 8, but this run asks for --lora-rank 4" in error
    error = fails(capsys, *FAST, "--out", out, "--fusion", "fixed", "--method", "final", "--resume")
    assert ("trained with --method scilt --fusion class, but this run asks for --method final "
            "--fusion fixed") in error
    # what bends the learning-rate schedule is refused on --resume, and does not matter to
    # --eval-only
    error = fails(capsys, *FAST, "--out", out, "--lr", "0.01", "--resume")
    assert "was trained with --lr 0.003, but this run asks for --lr 0.01" in error
    error = fails(capsys, "--img-size", "16", "--epochs", "2", "--batch-size", "32", "--out", out,
                  "--resume")
    assert "--epochs 1 --batch-size 64" in error

    def accepted(*flags):  # the checkpoint is restored: the run goes on to its report
        reports = []
        monkeypatch.setattr(report, "finish", lambda *args: reports.append(args))
        train.main([*FAST, "--out", out, *flags, "--eval-only"])
        assert len(reports) == 1

    accepted("--lr", "0.01")
    # the same levels however spelled
    accepted("--blocks", "5", "6")
    assert "--blocks 5 6, but this run asks for --blocks 4 6" in fails(
        capsys, *FAST, "--out", out, "--blocks", "4", "-1", "--eval-only")
    # the backbone's weights are compared by content: another file is refused, a copy is not
    error = fails(capsys, *FAST, "--out", out, "--weights", str(ROOT / "fractal_vit.safetensors"),
                  "--eval-only")
    assert "was trained on backbone weights with SHA-256" in error
    assert "fractal_vit.safetensors" in error
    assert "SHA-256" in fails(capsys, *FAST, "--out", out, "--resume", "--weights",
                              str(ROOT / "fractal_vit.safetensors"))
    shutil.copy(train.checkpoint.TINY_WEIGHTS, tmp_path / "moved.safetensors")
    accepted("--weights", str(tmp_path / "moved.safetensors"))
    (tmp_path / "run" / "checkpoint.pt").write_bytes(saved[: len(saved) // 2])  # a copy cut short
    error = fails(capsys, *FAST, "--out", out, "--resume")
    assert error.startswith(f"error: cannot read checkpoint {tmp_path / 'run' / 'checkpoint.pt'}")
    assert "it may be truncated" in error
    # a file that loads but is not ours, one written by an older train.py (without the levels it
    # read), and one with pickled code: refused in one line, and never run
    checkpoint = torch.load(io.BytesIO(saved), weights_only=True)
    del checkpoint["levels"]
    for content in ({}, torch.zeros(3), {**checkpoint, "optimizer": None} | {"state": 1},
                    checkpoint):
        torch.save(content, tmp_path / "run" / "checkpoint.pt")
        error = fails(capsys, *FAST, "--out", out, "--eval-only")
        assert "is not a checkpoint written by train.py" in error
    torch.save({"payload": argparse.Namespace()}, tmp_path / "run" / "checkpoint.pt")
    assert "pickled objects, which are never run" in fails(capsys, *FAST, "--out", out,
                                                           "--eval-only")


def test_folder_without_val_images_trains_and_reports(tmp_path, capsys):
    image = io.BytesIO()
    Image.new("RGB", (20, 20), (90, 30, 60)).save(image, "PNG")
    for split in ("train", "test"):
        for name in ("cats", "dogs"):
            (tmp_path / split / name).mkdir(parents=True)
            # one image: no val carved
            (tmp_path / split / name / "0.png").write_bytes(image.getvalue())
    metrics = run("--data", "folder", "--data-root", str(tmp_path), "--model", "tiny",
                  "--img-size", "16", "--epochs", "2", "--out", str(tmp_path / "run"))
    printed = capsys.readouterr().out
    assert "no val images: the last epoch is kept" in printed and "val balanced acc" not in printed
    assert metrics["best_epoch"] == 2 and metrics["fusion_val_correlation"] is None


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_zero():
    args = argparse.Namespace(lr=2.0)
    lr = lambda step: train.get_lr(step, 105, args)  # warm-up: round(0.05 * 105) = 5 steps
    assert [lr(step) for step in range(5)] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])
    # half way through the decay: lr / 2
    assert lr(5) == pytest.approx(2.0) and lr(55) == pytest.approx(1.0)
    assert lr(104) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr(104) < 1e-3


def colour_folder(root):
    """Three colours in noise, 20 / 5 / 10 train / val / test images each: a set that trains in
    seconds."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("val", 5), ("test", 10)):
        for k, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 200, (20, 20, 3))
                pixels[..., k] += 20
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


SMALL = ("--model", "tiny", "--img-size", "16")


@pytest.mark.parametrize("enough_val", [True, False])
def test_the_epoch_a_run_keeps_is_the_one_evaluated(tmp_path, monkeypatch, enough_val):
    """Val peaks at epoch 1 of 2. With enough val images of every class the run keeps epoch 1; with
    fewer, val picks noise and the run keeps its last epoch. Either way what it reports is that
    epoch's model's: its test metrics, and its gate (which moves every step, so that the epochs
    differ there even where their predictions on these few images agree)."""
    images = colour_folder(tmp_path / "images")
    scores = iter([0.9, 0.1])
    monkeypatch.setattr(train, "val_scores", lambda *args: ({"fused": next(scores)}, enough_val))
    save, first = checkpoint.save_atomically, tmp_path / "epoch1"

    def keep_first_checkpoint(obj, path):
        save(obj, path)
        if not first.exists():  # the checkpoint written after epoch 1, kept as it was
            first.mkdir()
            shutil.copy(path, first / "checkpoint.pt")

    monkeypatch.setattr(checkpoint, "save_atomically", keep_first_checkpoint)
    two = ("--data", "folder", "--data-root", str(images), *SMALL, "--epochs", "2")
    metrics = run(*two, "--out", str(tmp_path / "run"))
    assert metrics["best_epoch"] == (1 if enough_val else 2) and metrics["epochs"] == 2
    shutil.copy(tmp_path / "run" / "splits.csv", first / "splits.csv")
    epoch1 = run(*two, "--out", str(first), "--eval-only")
    assert (epoch1["fusion_weights"] == metrics["fusion_weights"]) == enough_val
    if enough_val:
        assert epoch1["per_class_acc"] == metrics["per_class_acc"]
        assert epoch1["heads"] == metrics["heads"]
    # prediction and export use the model the report describes: the kept epoch's, not the last's
    kept = torch.load(first / "checkpoint.pt", weights_only=True)["model"]
    last = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert not torch.equal(kept["gate"], last["gate"])
    expected = kept if enough_val else last
    model, _, _ = predict.load_run(tmp_path / "run", torch.device("cpu"))
    assert torch.equal(model.gate, expected["gate"])
    exported = export.export_run(tmp_path / "run", tmp_path / "model.safetensors")
    assert torch.equal(export.load_exported(exported)[0].gate, expected["gate"])


class RandomImages(torch.utils.data.Dataset):
    """12 items, each an "augmentation" drawn from torch's generator as the transforms draw theirs;
    `drawn` keeps them in the order drawn."""

    def __init__(self):
        self.drawn = []

    def __len__(self):
        return 12

    def __getitem__(self, i):
        self.drawn.append(torch.rand(3, 32, 32))
        return self.drawn[-1], i % 3


def test_each_epoch_draws_new_augmentations_and_a_resumed_epoch_the_same():
    """Each epoch seeds the generator by the seed and the epoch: the second epoch draws none of the
    first's augmentations (a generator seeded alike would draw the same ones, only dealt to other
    images by the shuffle), and an epoch run again from a fresh start, as --resume runs it, draws
    exactly what it drew in the uninterrupted run."""
    args = argparse.Namespace(epochs=3, batch_size=4, lr=1e-3, seed=0, workers=0, out="unused")
    model, images = scilt.SciLT(tiny_vit(), [4, 4, 4]), RandomImages()
    optimizer = model.configure_optimizer(args.lr)
    loader = train.make_loader(images, args, torch.device("cpu"), train=True)
    for epoch in (0, 1):
        train.train_one_epoch(model, model, optimizer, loader, epoch, args, torch.device("cpu"),
                              lambda *_: None)
    torch.manual_seed(123)  # whatever the generator did before: a new process
    train.train_one_epoch(model, model, optimizer, loader, 1, args, torch.device("cpu"),
                          lambda *_: None)
    first, second, resumed = images.drawn[:12], images.drawn[12:24], images.drawn[24:]
    assert not any(torch.equal(a, b) for a in first for b in second)
    assert all(torch.equal(a, b) for a, b in zip(second, resumed)) and len(resumed) == 12


def test_val_scores_are_each_heads_balanced_accuracy():
    """The epoch a run keeps is chosen by the fused prediction, not by one of its heads: with heads
    and a gate that make the three disagree, val_scores gives each its own balanced accuracy."""
    model = scilt.SciLT(tiny_vit(), [5, 3, 2]).eval()
    labels = torch.arange(3).repeat(20)
    images = torch.randn(60, 3, 32, 32) + labels[:, None, None, None] * torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.init_heads(model.features(images), labels)
        model.heads[1].weight.copy_(model.heads[1].weight[[1, 2, 0]])  # a head that is wrong
        model.gate.normal_(std=2)
    args = argparse.Namespace(batch_size=16, workers=0)
    val = train.make_loader(torch.utils.data.TensorDataset(images, labels), args,
                            torch.device("cpu"))
    scores, _ = train.val_scores(model, val, [5, 3, 2], torch.device("cpu"))
    with torch.no_grad():
        out = model.eval()(images)
    balanced = [scilt.long_tail_metrics(s.argmax(1), labels, [5, 3, 2])["balanced_acc"]
                for s in (out.logits, *out.level_scores)]
    assert len(set(balanced)) == 3  # the heads disagree: the test can tell them apart
    assert list(scores.values()) == pytest.approx(balanced)
    assert list(scores) == ["fused", "penultimate", "final"]


def test_val_can_choose_the_epoch_only_with_enough_images_of_every_class():
    model = scilt.SciLT(tiny_vit(), [5, 3])
    args = argparse.Namespace(batch_size=8, workers=0)
    images = lambda per_class: torch.utils.data.TensorDataset(
        torch.randn(2 * per_class, 3, 32, 32), torch.arange(2).repeat_interleave(per_class))
    for per_class in (train.MIN_VAL_PER_CLASS - 1, train.MIN_VAL_PER_CLASS):
        val = train.make_loader(images(per_class), args, torch.device("cpu"))
        scores, enough = train.val_scores(model, val, [5, 3], torch.device("cpu"))
        assert 0 <= scores["fused"] <= 1 and enough == (per_class == train.MIN_VAL_PER_CLASS)


# --------------------------------------------------------------------------------------------------
# What a careless user or a failing machine does: the right result, or one line, exit status 2,
# and nothing written before lost.

def test_weights_that_do_not_fit_the_backbone_are_refused(tmp_path, capsys, finished_run):
    """timm loads a weights file leniently (the backbone has no classifier): a file of other names
    would load nothing and train a random backbone. Each is refused, naming how many tensors fit;
    DDP's module. prefix, which timm strips, loads."""
    from safetensors.torch import load_file, save_file

    state = load_file(checkpoint.TINY_WEIGHTS)
    files = {"prefixed": {f"model.{k}": v for k, v in state.items()},
             "partial": {k: v for k, v in state.items() if k != "norm.weight"}}
    for name, content in files.items():
        save_file(content, tmp_path / f"{name}.safetensors")
    exported = export.main(["--out", str(finished_run(*FAST)[0]), str(tmp_path / "x.safetensors")])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    expected = {"prefixed": "holds 0 of the 78 tensors of vit_tiny_patch16_224",
                "partial": "holds 77 of the 78 tensors", "x": "its names start with 'backbone.'",
                "empty": "cannot read weights file"}
    for name, message in expected.items():
        error = fails(capsys, *FAST, "--weights", str(tmp_path / f"{name}.safetensors"),
                      "--out", str(tmp_path / name))
        assert message in error and not (tmp_path / name).exists()
    assert "start with 'model.'" in fails(capsys, *FAST, "--weights", str(tmp_path / "prefixed"
                                                                        ".safetensors"))
    assert exported.exists()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    loaded = checkpoint.load_backbone(train.parse_args([*FAST, "--weights",
                                                        str(tmp_path / "ddp.pth")]))
    for name, tensor in loaded.state_dict().items():
        if name != "pos_embed":  # resized to 16 px
            assert torch.equal(tensor, state[name].float()), name


def test_a_run_writes_only_into_a_new_or_empty_folder_and_one_run_at_a_time(tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    held = ["metrics.json", "splits.csv", "report.png", "checkpoint.pt.tmp"]  # no checkpoint.pt
    for name in held:
        (out / name).write_text(name)
    error = fails(capsys, *FAST, "--out", str(out))
    assert "already holds checkpoint.pt.tmp, metrics.json, report.png, splits.csv" in error
    assert all((out / name).read_text() == name for name in held)
    (tmp_path / "file").write_text("mine")
    assert "is a file: expected a folder" in fails(capsys, *FAST, "--out", str(tmp_path / "file"))
    assert "Not a directory" in fails(capsys, *FAST, "--out", str(tmp_path / "file" / "run"))
    assert (tmp_path / "file").read_text() == "mine"
    busy = tmp_path / "busy"  # a run is writing there: the second stops before it writes
    busy.mkdir()
    lock = os.open(busy, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        assert f"another run is writing into {busy}" in fails(capsys, *FAST, "--out", str(busy))
    finally:
        os.close(lock)
    assert not any(busy.iterdir())


def test_a_full_disk_ctrl_c_and_non_finite_weights_keep_the_last_checkpoint(
        tmp_path, capsys, monkeypatch, cut_run, finished_run):
    out = tmp_path / "run"
    shutil.copytree(cut_run, out)
    saved = (out / "checkpoint.pt").read_bytes()

    def no_space(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with monkeypatch.context() as patch:  # the disk fills as the next checkpoint is written
        patch.setattr(torch, "save", no_space)
        error = fails(capsys, *THREE_EPOCHS, "--out", str(out), "--resume")
    assert "No space left on device" in error and "every file written before is intact" in error
    assert (out / "checkpoint.pt").read_bytes() == saved
    assert not (out / "checkpoint.pt.tmp").exists()
    # and as metrics.json is written, at the end of a re-evaluation: the earlier one stays
    done = tmp_path / "done"
    shutil.copytree(finished_run(*FAST)[0], done)
    metrics = (done / "metrics.json").read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", lambda self, *a, **k: no_space(None, self))
        error = fails(capsys, *FAST, "--out", str(done), "--eval-only")
    assert "No space left on device" in error and (done / "metrics.json").read_bytes() == metrics
    assert not list(done.glob("*.tmp"))
    epochs = iter([None, KeyboardInterrupt])
    real = train.train_one_epoch

    def interrupted_in_second_epoch(*args):
        if next(epochs):
            raise KeyboardInterrupt
        return real(*args)

    with monkeypatch.context() as patch:  # Ctrl-C during the second epoch of this resumption
        patch.setattr(train, "train_one_epoch", interrupted_in_second_epoch)
        error = fails(capsys, *THREE_EPOCHS, "--out", str(out), "--resume")
    assert error == (f"error: interrupted; every file written before is intact; --resume --out "
                     f"{out} goes on from its last checkpoint")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 2
    step, steps = torch.optim.AdamW.step, []

    def poisoned(self, *args, **kwargs):  # the epoch's last update, after its last loss: NaN
        result = step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 15:
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return result

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", poisoned)
        error = fails(capsys, *FAST, "--out", str(tmp_path / "nan"))
    assert "the weights became non-finite in epoch 1; no checkpoint was written yet" in error
    assert sorted(p.name for p in (tmp_path / "nan").iterdir()) == ["splits.csv"]
