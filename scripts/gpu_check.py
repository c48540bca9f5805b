"""The check a maintainer runs on a machine with a GPU before a release, in under ten minutes:

    python scripts/gpu_check.py                  # the CUDA tests, the benchmark, the throughput

1. tests/test_cuda.py: the real job at real size (ViT-B/16, 224 px, bf16, workers, NCCL).
2. scripts/bench.py --device cuda: the speed and size targets, measured side by side.
3. The real job's throughput: train.py's own epoch (its loader, workers and pinned memory, on
   ISIC-sized JPEGs written here) beside the model's step alone on one resident batch and the
   loader alone. The slower of the two is the bottleneck; where it is the loader, more --workers
   or smaller images on disk speed the run up.
Prints one summary and writes it to gpu_check.json. --device cpu with a small --model checks the
script itself where there is no GPU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import scilt  # noqa: E402
import train  # noqa: E402


def run_step(name, command, env=None, timeout=420):
    """A step of the check as a subprocess: (passed, seconds, its last lines)."""
    started = time.time()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                timeout=timeout, env={**os.environ, **(env or {})})
        passed, output = result.returncode == 0, result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        passed, output = False, f"{name}: over {timeout} s\n{expired.stdout or ''}"
    lines = [line for line in output.strip().splitlines() if line.strip()]
    print(f"{name}: {'passed' if passed else 'FAILED'} in {time.time() - started:.0f} s")
    return passed, time.time() - started, lines[-15:]


def write_jpegs(root, images, classes=4, size=(1024, 768)):
    """An image folder of ISIC-sized JPEGs (photo-like, so that they compress as photos do)."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", images // classes), ("test", 4)):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                smooth = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
                image = Image.fromarray(smooth).resize(size, Image.BICUBIC)
                image.save(folder / f"{i}.jpg", quality=90)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(args, weights, root):
    """Images per second of train.py's epoch, of the model's step alone and of the loader alone."""
    flags = train.parse_args(["--data", "folder", "--data-root", str(root), "--model", args.model,
                              "--weights", weights, "--img-size", str(args.img_size),
                              "--device", args.device, "--epochs", "2", "--out", str(root / "run")])
    device = torch.device(args.device)
    data = train.load_run_data(flags)
    model = checkpoint.build_model(flags, data.class_counts).to(device)
    optimizer = model.configure_optimizer(flags.lr)
    loader = train.make_loader(data.train, flags, device, train=True)
    epoch_seconds = [train.train_one_epoch(model, model, optimizer, loader, epoch, flags, device,
                                           lambda *_: None)[0] for epoch in range(2)]
    images = len(loader) * flags.batch_size  # full batches: drop_last
    batch, labels = next(iter(loader))
    batch, labels = batch.to(device), labels.to(device)
    steps = 10
    for repeat in range(2):  # the first round warms up
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            with scilt.autocast(device):
                loss = model.loss(model(batch), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)
        step_seconds = (time.perf_counter() - started) / steps
    started = time.perf_counter()
    for batch, labels in loader:
        batch.to(device, non_blocking=True)
    synchronize(device)
    loader_seconds = time.perf_counter() - started
    return {"train_epoch_img_s": images / epoch_seconds[1],
            "model_step_img_s": flags.batch_size / step_seconds,
            "loader_img_s": images / loader_seconds, "workers": flags.workers,
            "batch_size": flags.batch_size, "images": images}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=2048, help="JPEGs in the throughput's folder")
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here: this check is for a machine with a GPU "
                 "(--device cpu --model vit_tiny_patch16_224 --img-size 32 checks the script)")
    summary = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                        capture_output=True, text=True).stdout.strip()}
    passed, seconds, lines = run_step("tests/test_cuda.py",
                                      [sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"],
                                      env={"SCILT_TEST_DEVICE": args.device})
    summary["cuda_tests"] = {"passed": passed, "seconds": round(seconds), "summary": lines[-1]}
    if not passed:
        print("\n".join(lines))
    passed, seconds, lines = run_step("scripts/bench.py", [sys.executable, "scripts/bench.py",
                                                           "--device", args.device])
    summary["bench"] = json.loads(lines[-1]) if passed else {"failed": lines}
    with tempfile.TemporaryDirectory() as folder:
        import timm
        from safetensors.torch import save_file

        weights = str(Path(folder) / "weights.safetensors")
        save_file(timm.create_model(args.model, num_classes=0).state_dict(), weights)
        write_jpegs(Path(folder) / "jpegs", args.images)
        summary["throughput"] = throughput(args, weights, Path(folder) / "jpegs")
    speed = summary["throughput"]
    slower = "loader" if speed["loader_img_s"] < speed["model_step_img_s"] else "model"
    share = speed["train_epoch_img_s"] / min(speed["loader_img_s"], speed["model_step_img_s"])
    print(f"\n{summary['device']} at commit {summary['commit']}")
    print(f"  CUDA tests        {summary['cuda_tests']['summary']}")
    if "failed" not in summary["bench"]:
        b = summary["bench"]
        print(f"  bench             scilt / final step {b['scilt_over_final']:.3f} (<= 1.05), "
              f"merged / plain inference {b['merged_over_plain']:.3f} (<= 1.02)")
    print(f"  train.py epoch    {speed['train_epoch_img_s']:.0f} img/s ({speed['workers']} "
          f"workers, batch {speed['batch_size']}, 1024 x 768 JPEGs)")
    print(f"  model step alone  {speed['model_step_img_s']:.0f} img/s")
    print(f"  loader alone      {speed['loader_img_s']:.0f} img/s (from the workers' start, "
          "as in each epoch)")
    print(f"  the {slower} is the bottleneck: the epoch runs at {100 * share:.0f}% of its speed")
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    ok = summary["cuda_tests"]["passed"] and "failed" not in summary["bench"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
