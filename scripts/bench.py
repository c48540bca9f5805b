"""Speed and size of SciLT, measured side by side in one run:

    python scripts/bench.py [--device cuda]

1. Time per training step on a ViT-S/16 (random weights): `scilt` vs `final` vs full fine-tuning.
   Target: scilt <= 1.05 x final (the second head and the tap cost next to nothing).
2. Inference of the merged SciLT model vs the plain timm model. Target: <= 1.02 x.
3. Trainable parameters of ViT-B/16 at the defaults (LoRA r=8 on qkv and proj). Target: < 1%.
4. JPEG decoding of ISIC-sized (1024 x 768) images by one worker, with and without draft mode.
Configurations are timed in interleaved rounds and summarised by their medians, so that a noisy
neighbour slows all of them alike. Prints a table, then one JSON line.
"""
import argparse
import functools
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import data  # noqa: E402
import scilt  # noqa: E402


def timer(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def training_step(model, loss_fn, optimizer, images, labels, device):
    with scilt.autocast(device):
        loss = loss_fn(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def interleaved(jobs, rounds, warmup, device):
    """jobs: name -> zero-argument callable. Returns name -> median seconds."""
    times = {name: [] for name in jobs}
    for r in range(warmup + rounds):
        for name, job in jobs.items():
            start = timer(device)
            job()
            if r >= warmup:
                times[name].append(timer(device) - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_training(images, labels, counts, rounds, device):
    """1. A training step of scilt, of final (each with the method's optimizer) and of full
    fine-tuning: name -> median seconds."""
    steps = {}
    for method in ("scilt", "final"):
        backbone = scilt.create_backbone("vit_small_patch16_224")
        model = scilt.SciLT(backbone, counts, method=method).to(device)
        steps[method] = functools.partial(training_step, model, model.loss,
                                          model.configure_optimizer(1e-4), images, labels, device)
    full = timm.create_model("vit_small_patch16_224", num_classes=10).to(device)
    full_optimizer = torch.optim.AdamW(full.parameters(), lr=1e-4)
    steps["full fine-tuning"] = functools.partial(training_step, full, F.cross_entropy,
                                                  full_optimizer, images, labels, device)
    return interleaved(steps, rounds, 2, device)


def measure_inference(images, counts, rounds, device):
    """2. Inference of the merged SciLT model and of the plain timm model (with its own linear
    head): name -> median seconds."""
    merged = scilt.SciLT(scilt.create_backbone("vit_small_patch16_224"), counts).to(device).eval()
    for layer in scilt.lora_layers(merged):
        torch.nn.init.normal_(layer.lora_B, std=0.01)
    scilt.merge_lora(merged)
    plain = timm.create_model("vit_small_patch16_224", num_classes=10).to(device).eval()

    @torch.no_grad()
    def infer(model):
        with scilt.autocast(device):
            model(images)

    jobs = {"merged scilt": functools.partial(infer, merged),
            "plain timm": functools.partial(infer, plain)}
    return interleaved(jobs, rounds * 2, 2, device)


def measure_decoding(device, images=8):
    """4. JPEG decoding of ISIC-sized images by one process, in full and in draft mode: images per
    second of each."""
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(images):
        buffer = io.BytesIO()
        smooth = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)  # photo-like, not white noise
        Image.fromarray(smooth).resize((1024, 768), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())

    def decode(draft):
        return [data.open_image(io.BytesIO(b), draft) for b in jpegs]

    jobs = {"full": functools.partial(decode, None), "draft": functools.partial(decode, 256)}
    return {name: images / seconds for name, seconds in interleaved(jobs, 5, 1, device).items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--rounds", type=int)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # on a GPU, a batch that keeps it busy: at 128, a ViT-S step on an H200 waits on Python's
    # kernel launches (~25 ms for ~3 ms of arithmetic), and the ratios would measure the interpreter
    batch, rounds = args.batch_size or (512 if cuda else 8), args.rounds or (20 if cuda else 5)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    counts = torch.logspace(3, 1, 10).long().tolist()  # 1000 .. 10 images: a long-tailed profile
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "batch_size": batch}
    step_times = results["train_step_s"] = measure_training(images, labels, counts, rounds, device)
    results["scilt_over_final"] = step_times["scilt"] / step_times["final"]
    results["scilt_over_full"] = step_times["scilt"] / step_times["full fine-tuning"]
    infer_times = results["inference_s"] = measure_inference(images, counts, rounds, device)
    results["merged_over_plain"] = infer_times["merged scilt"] / infer_times["plain timm"]
    # 3. the trainable fraction of ViT-B/16, as train.py prints it: trainable / all
    base = scilt.SciLT(scilt.create_backbone("vit_base_patch16_224"), [1] * 8)
    trainable, total = checkpoint.count_parameters(base)
    results["vit_b16_trainable"] = trainable
    results["vit_b16_trainable_fraction"] = trainable / total
    speed = results["jpeg_images_per_s"] = measure_decoding(device)
    results["draft_speedup"] = speed["draft"] / speed["full"]
    start = time.perf_counter()
    data.make_synthetic.__wrapped__()  # drawn, not the process's cached copy
    results["synthetic_seconds"] = time.perf_counter() - start
    print_results(results, step_times, infer_times, batch, rounds)


def print_results(results, step_times, infer_times, batch, rounds):
    def ms(seconds):
        return f"{1000 * seconds:9.1f} ms"

    print(f"device: {results['device']}, batch {batch}, ViT-S/16 at 224 px, medians of {rounds} "
          "interleaved rounds")
    for name, t in step_times.items():
        print(f"  train step  {name:18s}{ms(t)}")
    print(f"  scilt / final step          {results['scilt_over_final']:.3f}   (target <= 1.05)")
    print(f"  scilt / full fine-tuning    {results['scilt_over_full']:.3f}")
    for name, t in infer_times.items():
        print(f"  inference   {name:18s}{ms(t)}")
    print(f"  merged / plain inference    {results['merged_over_plain']:.3f}   (target <= 1.02)")
    fraction = 100 * results["vit_b16_trainable_fraction"]
    print(f"  ViT-B/16 trainable          {results['vit_b16_trainable']:,} = {fraction:.3f}% of "
          "all parameters   (target < 1%)")
    speed = results["jpeg_images_per_s"]
    print(f"  JPEG 1024x768 decode        {speed['full']:.0f} img/s full, {speed['draft']:.0f} "
          f"img/s draft ({results['draft_speedup']:.2f}x)")
    print(f"  synthetic data set          {results['synthetic_seconds']:.1f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
