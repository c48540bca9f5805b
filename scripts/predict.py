"""Classify new images with a trained run:

    python scripts/predict.py --out runs/isic new_scans/ more.jpg     # -> runs/isic/predictions.csv

Files, and folders searched recursively, preprocessed as in evaluation. One row per image: its
path, the predicted class, that class's probability, every class's probability (the softmax of the
fused scores s: calibrated for a balanced prior) and the error if the file could not be read.
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import data  # noqa: E402
import scilt  # noqa: E402
import train  # noqa: E402
from checkpoint import replacing  # noqa: E402
from data import (IMAGE_SUFFIXES, DataError, Loader, is_image, make_transform,  # noqa: E402
                  open_image)


def hidden(path, top):
    """Whether `path` lies in a hidden or __MACOSX folder below `top`."""
    folders = path.relative_to(top).parts[:-1]
    return any(data.hidden(part) for part in folders)


def find_images(paths):
    """The files named in `paths` and every image file (by suffix) under the folders among them,
    sorted."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"{path} does not exist: expected image files or folders of them")
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if is_image(p) and not hidden(p, path))
        else:
            found.append(path)
    if not found:
        raise DataError(f"no image under {' '.join(map(str, paths))}: expected files ending in "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))}")
    return found


class ImageFiles(torch.utils.data.Dataset):
    """Images to classify: (image, error). A file that cannot be read gives a blank image and its
    one-line error, so that it becomes one row of the result rather than the end of a long job."""

    def __init__(self, paths, transform, img_size):
        self.paths, self.transform, self.img_size = list(paths), transform, img_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = open_image(self.paths[i], data.evaluation_resize(self.img_size))
            return self.transform(image), ""
        except DataError as error:
            return torch.zeros(3, self.img_size, self.img_size), str(error)


def parse_args(argv=None):
    p = train.Parser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of them")
    p.add_argument("--out", required=True, help="the run's folder (train.py's --out)")
    p.add_argument("--weights", help="the backbone's weights file, if not where the run had it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be 1 or more, got {args.batch_size}")
    train.check_device_and_workers(p, args)
    return args


def load_run(out, device, weights=None):
    """The model a run's evaluation used (the epoch it kept), rebuilt from its checkpoint and
    arguments, in eval mode, with the arguments and classes; `weights` replaces the backbone's
    file (it must hold the same weights)."""
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        raise checkpoint.Abort(f"no checkpoint at {path}: train into that --out first")
    saved = checkpoint.load(path)
    trained = argparse.Namespace(**saved["args"])
    trained.weights = weights or trained.weights
    trained.eval_only = True
    model = checkpoint.build_model(trained, saved["class_counts"])
    weights_sha256 = checkpoint.sha256(checkpoint.weights_file(trained))
    checkpoint.restore(model, saved, path, trained, weights_sha256, kept=True)
    return model.to(device).eval(), trained, saved["classes"]


def row(path, probabilities, error, classes):
    if error:
        return [path, "", "", *[""] * len(classes), error]
    k = int(probabilities.argmax())
    shown = [f"{p:.6f}" for p in probabilities.tolist()]
    return [path, classes[k], shown[k], *shown, ""]


@torch.no_grad()
def predict_images(args):
    """predictions.csv in --out (replacing an earlier one once it is whole), written a row at a time
    into a file opened first, so that a folder it cannot write to stops it before the work."""
    if "RANK" in os.environ:
        raise checkpoint.Abort("prediction runs in one process: start it with python, not torchrun")
    device = torch.device(args.device)
    model, trained, classes = load_run(args.out, device, args.weights)
    paths = find_images(args.paths)
    scilt.merge_lora(model)  # inference at the plain model's speed, the same outputs
    transform = make_transform(trained.img_size, *checkpoint.normalisation(trained.model))
    batches = Loader(ImageFiles(paths, transform, trained.img_size), batch_size=args.batch_size,
                     num_workers=args.workers, pin_memory=device.type == "cuda")
    target = Path(args.out) / "predictions.csv"
    replaced = " (it replaces the earlier one)" if target.exists() else ""
    done, started, failed = 0, time.time(), 0
    with replacing(target) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "predicted", "probability", *classes, "error"])
        for i, (x, errors) in enumerate(batches):
            with scilt.autocast(device):
                scores = model(x.to(device, non_blocking=True)).logits
            for probabilities, error in zip(scores.float().softmax(-1).cpu(), errors):
                writer.writerow(row(paths[done], probabilities, error, classes))
                done, failed = done + 1, failed + bool(error)
            if (i + 1) % 50 == 0:
                speed = done / (time.time() - started)
                print(f"predicted {done:,} / {len(paths):,} images, {speed:.0f} img/s")
    unread = f", {failed:,} could not be read (their rows give the error)" if failed else ""
    print(f"wrote {target}{replaced}: {done - failed:,} images classified{unread}")
    return target


def main(argv=None):
    return train.run_program(predict_images, parse_args(argv))


if __name__ == "__main__":
    main()
