"""The scripts beside train.py: the per-block analysis, prediction, export, the post-hoc fusions
and the scale check."""
import csv
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import checkpoint
import export
import fusions
import predict
import report
import scilt
import train
from conftest import FAST, ROOT, TINY, fails, tiny_vit
from data import Loader, load_data, make_transform


def run(*argv):
    out = train.main(list(argv))
    return json.loads((out / "metrics.json").read_text())


def test_analyze_per_block_and_its_last_block_is_the_start_row(tmp_path, capsys, finished_run):
    final_run = finished_run(*FAST, "--method", "final")[0]
    final = json.loads((final_run / "metrics.json").read_text())
    analyze.main([*FAST, "--out", str(tmp_path / "analysis")])
    printed = capsys.readouterr().out
    analysis = json.loads((tmp_path / "analysis" / "layers.json").read_text())
    layers = analysis["layers"]
    assert [layer["block"] for layer in layers] == [1, 2, 3, 4, 5, 6]
    for layer in layers:
        assert set(layer["ncm"]) == set(layer["probe"]) == set(final["heads"]["start"])
    # the last block's class means are the final head at step 0
    assert layers[-1]["ncm"] == final["heads"]["start"]
    assert "best block per column" in printed
    assert "penultimate block's frozen features serve the few" in printed
    chosen = analysis["recommended"]
    assert analysis["default"]["blocks"] == [5, 6]
    assert 1 <= chosen["blocks"][0] < chosen["blocks"][1] <= 6
    assert chosen["val"]["balanced_acc"] >= analysis["default"]["val"]["balanced_acc"]
    assert f"Recommended on val: --blocks {chosen['blocks'][0]} {chosen['blocks'][1]}" in printed
    assert not (tmp_path / "analysis" / "checkpoint.pt").exists()
    with Image.open(tmp_path / "analysis" / "layers.png") as image:
        assert image.format == "PNG"


def test_analyze_a_two_class_folder(tmp_path, capsys):
    """Binary sets (PneumoniaMNIST, BreastMNIST): the rarer class is the tail third."""
    rng = np.random.default_rng(0)
    for split, sizes in (("train", (30, 8)), ("test", (6, 6))):
        for k, (name, n) in enumerate(zip(("normal", "pneumonia"), sizes)):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 200, (20, 20, 3)) + 50 * k
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                image.save(tmp_path / split / name / f"{i}.png")
    analyze.main(["--data", "folder", "--data-root", str(tmp_path), "--model", "tiny",
                  "--img-size", "16", "--out", str(tmp_path / "analysis")])
    analysis = json.loads((tmp_path / "analysis" / "layers.json").read_text())
    assert analysis["tail"] == "tail" and len(analysis["layers"]) == 6
    assert all(layer["probe"]["tail"] is not None for layer in analysis["layers"])
    assert "Recommended on val: --blocks" in capsys.readouterr().out


def test_analysis_table_marks_the_best_block_per_column(capsys):
    keys = ("overall_acc", "balanced_acc", "macro_f1", "many", "medium", "few", "head", "middle",
            "tail")

    def metrics(balanced, few):
        return {**dict.fromkeys(keys, 0.5), "balanced_acc": balanced, "few": few}

    layers = [{"block": 1, "ncm": metrics(0.3, 0.1), "probe": metrics(0.4, 0.2)},
              {"block": 2, "ncm": metrics(0.6, 0.5), "probe": metrics(0.7, 0.6)},
              {"block": 3, "ncm": metrics(0.7, 0.4), "probe": metrics(0.65, 0.3)}]
    pick = {"blocks": [2, 3], "val": {"balanced_acc": 0.5, "few": 0.4}}
    analyze.print_layers({"layers": layers, "tail": "few", "recommended": pick, "default": pick})
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines if line[:1].isdigit()}
    # columns: ncm balanced many medium few, probe balanced many medium few
    assert rows["3"][0] == "70.0*" and rows["2"][0] == "60.0" and rows["2"][3] == "50.0*"
    assert rows["2"][4] == "70.0*" and rows["2"][7] == "60.0*" and rows["3"][7] == "30.0"
    assert rows["1"][1] == "50.0*"  # ties are all marked


def write_image_folder(root, seed=0):
    """Three colour classes, weakly separated by noise: 12 / 9 / 6 training, 5 test images each."""
    rng = np.random.default_rng(seed)
    for split, sizes in (("train", (12, 9, 6)), ("test", (5, 5, 5))):
        for k, (name, n) in enumerate(zip(("red", "green", "blue"), sizes)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 200, (20, 20, 3))
                pixels[..., k] += 40
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")


def test_predict_and_export_give_the_evaluations_predictions(tmp_path, capsys):
    from torchvision.transforms import v2

    root, out = tmp_path / "images", tmp_path / "run"
    write_image_folder(root)
    metrics = run("--data", "folder", "--data-root", str(root), "--model", "tiny", *FAST,
                  "--out", str(out))
    (root / "test" / "red" / "broken.png").write_bytes(b"not an image")  # among 15 good ones
    target = predict.main(["--out", str(out), str(root / "test")])
    rows = {Path(row["path"]).relative_to(root).as_posix(): row
            for row in csv.DictReader(target.open())}
    assert len(rows) == 16 and "cannot read image" in rows["test/red/broken.png"]["error"]
    assert rows["test/red/broken.png"]["predicted"] == ""
    assert "15 images classified, 1 could not be read" in capsys.readouterr().out
    # image by image, the classes the run's evaluation predicts (unmerged LoRA, its test split)
    model, trained, classes = predict.load_run(out, torch.device("cpu"))
    data = load_data("folder", root, img_size=16, splits=out / "splits.csv")
    evaluated = report.evaluate(model, Loader(data.test, batch_size=64), torch.device("cpu"))
    assert len(data.test.items) == 15
    for item, k in zip(data.test.items, evaluated.predicted["fused"]):  # test/<class>/<file>
        assert rows[item]["predicted"] == classes[k]
    per_class = {}
    for c in classes:
        said = [row["predicted"] == c for path, row in rows.items()
                if path.split("/")[1] == c and not row["error"]]
        per_class[c] = np.mean(said)
    assert per_class == pytest.approx(metrics["per_class_acc"])
    # the exported file, loaded with scilt.py, timm and load_exported() as the README shows,
    # predicts the same
    exported = export.main(["--out", str(out), str(tmp_path / "model.safetensors")])
    loaded, meta = export.load_exported(exported)
    size = meta["img_size"]
    preprocess = v2.Compose([v2.Resize(round(size / 0.875)), v2.CenterCrop(size), v2.PILToTensor(),
                             v2.ToDtype(torch.float32, scale=True),
                             v2.Normalize(meta["mean"], meta["std"])])
    for path, row in rows.items():
        if not row["error"]:
            with torch.no_grad():
                image = preprocess(Image.open(root / path).convert("RGB"))[None]
                p = loaded(image).logits.softmax(-1)[0]
            assert meta["classes"][p.argmax()] == row["predicted"]
            assert p.max().item() == pytest.approx(float(row["probability"]), abs=1e-4)
    (tmp_path / "empty").mkdir()
    assert "no image under" in fails(capsys, predict.main, "--out", str(out),
                                     str(tmp_path / "empty"))


def disagreeing_model(blocks=(-2, -1)):
    """A tiny SciLT whose LoRA update, heads and gate are set so that the backbone with and without
    LoRA, the fused scores and each head's all differ."""
    model = scilt.SciLT(tiny_vit(), [30, 10, 3], blocks=blocks)
    with torch.no_grad():
        for layer in scilt.lora_layers(model):
            layer.lora_B.normal_(std=0.2)
        for head in model.heads:
            head.weight.normal_()
            head.scale.fill_(5.0)
        model.gate.normal_(std=3)
    return model.eval()


@pytest.mark.parametrize("blocks", [(-2, -1), (0, 2)])
def test_export_writes_the_adapted_model_and_load_exported_rebuilds_it(tmp_path, blocks):
    model = disagreeing_model(blocks)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "model.safetensors"
    given = {name: tensor.clone() for name, tensor in model.state_dict().items()
             if isinstance(tensor, torch.Tensor)}
    export.export(model, path, model="vit_tiny_patch16_224", model_kwargs=TINY)
    # the caller's model is left bitwise as it was given: merged beside it, not in place
    assert not any(layer.merged for layer in scilt.lora_layers(model))
    assert all(torch.equal(tensor, given[name]) for name, tensor in model.state_dict().items()
               if isinstance(tensor, torch.Tensor))
    loaded, meta = export.load_exported(path)
    assert loaded.blocks == model.blocks and meta["blocks"] == [b % 3 + 1 for b in blocks]
    with torch.no_grad():
        got = loaded(x)
        for layer in scilt.lora_layers(model):
            layer.lora_B.zero_()
        without_lora = model(x)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    for level, want in zip(got.level_scores, expected.level_scores):
        torch.testing.assert_close(level, want, rtol=1e-4, atol=1e-4)
    assert (without_lora.logits - expected.logits).abs().max() > 1e-2  # the update matters here
    # a model merged by its caller stays merged
    scilt.merge_lora(loaded)
    export.export(loaded, tmp_path / "again.safetensors", model="vit_tiny_patch16_224",
                  model_kwargs=TINY)
    assert all(layer.merged for layer in scilt.lora_layers(loaded))


def test_predicted_probabilities_are_the_softmax_of_the_fused_scores(tmp_path):
    root, out = tmp_path / "images", tmp_path / "run"
    write_image_folder(root)
    run("--data", "folder", "--data-root", str(root), "--model", "tiny", *FAST, "--out", str(out))
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for state in (saved["model"], saved["state"]["best"]):  # heads and gate that disagree
        for name in ("heads.0.weight", "heads.1.weight"):
            state[name] = torch.randn(state[name].shape, generator=generator)
        state["gate"] = 3 * torch.randn(state["gate"].shape, generator=generator)
    torch.save(saved, out / "checkpoint.pt")
    target = predict.main(["--out", str(out), str(root / "test")])
    rows = list(csv.DictReader(target.open()))
    model, trained, classes = predict.load_run(out, torch.device("cpu"))
    transform = make_transform(16, *checkpoint.normalisation("tiny"))
    images = torch.stack([transform(Image.open(row["path"]).convert("RGB")) for row in rows])
    with torch.no_grad():
        out = model(images)
    fused, final = out.logits.softmax(-1), out.level_scores[-1].softmax(-1)
    written = torch.tensor([[float(row[c]) for c in classes] for row in rows])
    torch.testing.assert_close(written, fused, rtol=0, atol=2e-6)
    assert (written - final).abs().max() > 1e-2  # the final head's would differ
    assert [row["predicted"] for row in rows] == [classes[k] for k in fused.argmax(1)]


def test_predict_takes_what_a_folder_holds(tmp_path, monkeypatch):
    """webp, ppm and pgm files get rows; AppleDouble files and hidden folders none; an image over
    Pillow's pixel limit a row with its error."""
    root, out = tmp_path / "images", tmp_path / "run"
    write_image_folder(root)
    run("--data", "folder", "--data-root", str(root), "--model", "tiny", *FAST, "--out", str(out))
    new = tmp_path / "new"
    (new / ".ipynb_checkpoints").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 255, (20, 20, 3)).astype(np.uint8)
    for name in ("a.webp", "b.ppm", ".ipynb_checkpoints/c.png"):
        Image.fromarray(pixels).save(new / name)
    Image.fromarray(pixels[..., 0]).save(new / "d.pgm")
    (new / "._a.webp").write_bytes(b"\x00\x05\x16\x07")
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(new / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60 x 60 is over twice this
    rows = {Path(row["path"]).name: row
            for row in csv.DictReader(predict.main(["--out", str(out), str(new)]).open())}
    assert set(rows) == {"a.webp", "b.ppm", "d.pgm", "huge.png"}
    assert all(rows[name]["predicted"] and not rows[name]["error"] for name in ("a.webp", "b.ppm",
                                                                                 "d.pgm"))
    assert "larger than Pillow's limit" in rows["huge.png"]["error"]


def test_predict_and_export_refuse_torchrun_and_need_a_run(tmp_path, capsys, monkeypatch):
    assert "no checkpoint at" in fails(capsys, export.main, "--out", str(tmp_path),
                                       str(tmp_path / "m.safetensors"))
    assert "no checkpoint at" in fails(capsys, predict.main, "--out", str(tmp_path), str(ROOT))
    monkeypatch.setenv("RANK", "0")
    assert "runs in one process" in fails(capsys, predict.main, "--out", str(tmp_path),
                                          str(tmp_path))
    assert "runs in one process" in fails(capsys, export.main, "--out", str(tmp_path),
                                          str(tmp_path / "m.safetensors"))


def test_predict_and_export_never_write_onto_the_runs_files_and_check_their_flags(
        tmp_path, capsys, finished_run):
    """Export refuses a folder, a missing folder and the run's own files (checkpoint.pt would have
    been replaced by the export); prediction checks its flags before any work and says when it
    replaces an earlier predictions.csv."""
    out = tmp_path / "run"
    shutil.copytree(finished_run(*FAST)[0], out)
    files = {path.name: path.read_bytes() for path in out.iterdir()}
    for target in (out / "checkpoint.pt", out / "metrics.json", out, tmp_path / "no" / "m.st"):
        error = fails(capsys, export.main, "--out", str(out), str(target))
        assert "cannot write" in error or "lies in the run's own folder" in error
    assert {path.name: path.read_bytes() for path in out.iterdir()} == files
    assert not list(tmp_path.glob("**/*.tmp"))
    for flags, message in ((["--batch-size", "0"], "--batch-size must be 1 or more"),
                           (["--workers", "-1"], "--workers must be 0 or more"),
                           (["--device", "banana"], "--device banana: expected cpu")):
        assert message in fails(capsys, predict.main, "--out", str(out), *flags, str(ROOT))
    images = tmp_path / "images"
    write_image_folder(images)
    def read_only(path):  # the run's folder cannot be written to: found before any image is read
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), f"{path}.tmp")

    read = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "replacing", read_only)
        patch.setattr(predict, "open_image", lambda *args: read.append(args))
        error = fails(capsys, predict.main, "--out", str(out), "--workers", "0", str(images))
    assert "Permission denied" in error and read == []
    predict.main(["--out", str(out), str(images / "test" / "red")])
    predict.main(["--out", str(out), str(images / "test")])
    printed = capsys.readouterr().out
    assert "(it replaces the earlier one): 15 images classified" in printed
    assert not list(out.glob("*.tmp"))


def test_scale_script_runs_train_py_functions_on_random_features():
    command = [sys.executable, "scripts/scale.py", "--images", "2000", "--classes", "20",
               "--dim", "48", "--val", "200", "--test", "200", "--probe-steps", "5"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(line["seconds"]) == {"init_heads", "classify",
                                    "start_metrics (step 0 and the probe)",
                                    "report (with the Rademacher check)"}
    assert 0 < line["peak_rss_gb"] < 8 and line["images"] == 2000


def test_post_hoc_fusions_fit_on_one_half_of_val_and_score_on_the_other():
    labels = torch.arange(4).repeat(10)  # 40 images, 4 classes
    right = torch.nn.functional.one_hot(labels, 4).float()
    wrong = torch.nn.functional.one_hot((labels + 1) % 4, 4).float()
    logits = torch.stack([wrong, right, wrong], 1)  # (N, gate + 2 heads, K): the penultimate right
    assert fusions.fit("head on val", logits, labels) == 1
    assert fusions.fit("shared a on val", logits, labels) > 0.5  # leans on the right head
    assert fusions.balanced(fusions.fused("gate", logits, None), labels) == 0.0
    assert fusions.two_fold("head on val", logits, labels) == 1.0
    average = fusions.fused("average", logits, None)
    torch.testing.assert_close(average, (right + wrong) / 2)
    # each head right on one half of val: fitted on one half, a fusion is scored on the other
    first = torch.zeros(len(labels), dtype=torch.bool)
    first[np.random.default_rng(0).permutation(len(labels))[:20]] = True  # two_fold's halves
    on_first, on_second = (torch.where(m[:, None], right, wrong) for m in (first, ~first))
    logits = torch.stack([wrong, on_first, on_second], 1)
    assert fusions.two_fold("head on val", logits, labels) == 0.0  # fitted and scored on one: 1.0


def test_the_variants_table_pairs_each_variant_with_scilt_by_seed(tmp_path, monkeypatch, capsys):
    import table
    monkeypatch.setattr(table, "OUT", tmp_path)
    runs = table.Runs({"set": ["--data", "npz"]}, "", ["--weights", "w.safetensors"])
    table.plan(runs, ["set"], [0, 1], ["rank1"])
    planned = [command[command.index("--out") + 1:] for command in runs.missing]
    labels = {"scilt-class": [], "rank1": ["--lora-rank", "1"]}  # each run's own flags
    assert planned == [[str(tmp_path / "default" / "set" / f"{label}-{seed}"), *flags,
                        "--weights", "w.safetensors"] for seed in (0, 1)
                       for label, flags in labels.items()]
    scores = {"scilt-class": [(0.50, 0.60), (0.70, 0.80)], "rank1": [(0.55, 0.50), (0.60, 0.90)]}
    bars = {"start": 0.3, "probe": 0.4, "probe_levels": 0.45}
    for label, by_seed in scores.items():  # (val, test) by seed
        for seed, (val, test) in enumerate(by_seed):
            out = runs.folder("set", label, seed)
            out.mkdir(parents=True)
            heads = {bar: {"balanced_acc": value + seed / 100} for bar, value in bars.items()}
            metrics = {"balanced_acc": test, "heads": heads}
            (out / "metrics.json").write_text(json.dumps(metrics))
            torch.save({"state": {"best_val": val}}, out / "checkpoint.pt")
    row, gains = table.print_variants("set", runs, [0, 1], ["rank1"])
    printed = capsys.readouterr().out
    # val: +5 and -10 points; test: -10 and +10
    assert "| rank1 | 57.5 ± 3.5 | 70.0 ± 28.3 | -2.5 ± 10.6 | 0.0 ± 14.1 |" in printed
    assert row == ["30.5 ± 0.7", "40.5 ± 0.7", "45.5 ± 0.7", "70.0 ± 14.1", "70.0 ± 28.3 [-2.5]"]
    assert list(gains) == ["rank1"]
    np.testing.assert_allclose(gains["rank1"], [(0.05, -0.1), (-0.1, 0.1)])
    table.print_means([gains, gains], ["rank1"])
    assert "rank1 − scilt, mean over 4 runs: val -2.50, test +0.00" in capsys.readouterr().out
