"""Data for SciLT: the embedded synthetic benchmark, the long-tailed scientific image sets and the
natural-image long-tail benchmarks.

    load_data(name, root) -> Data(train, val, test, train_eval, classes, class_counts, ...)

Each set yields (image tensor (3, H, W), label). Where a source is not long-tailed by itself (ISIC
2019, PBC blood cells) we follow ISIC-2019-LT (Ju et al. 2022): hold out a balanced test set (100
per class) and val set (50 per class), then keep n_k = n_max * r^(-k / (K - 1)) training images of
the k-th most frequent class (n_max = min(5000, largest class), r the imbalance ratio). Splits are
deterministic for a seed; write_splits() / read_splits() store them so that a later run evaluates
exactly the same images. Every problem with the user's data raises DataError with one line naming
the path and what was expected. This file reads: images, the long-tailed protocol and splits, each
source's reader, the synthetic set, load_data(). A set missing from its root is fetched by
download.py first.
"""
import csv
import functools
import os
import pickle
import unicodedata
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data.dataloader import default_collate

from checkpoint import replacing
from download import IMAGE_SUFFIXES, LISTS, LISTS_URL, WHERE_TO_GET, DataError, ensure_downloaded

DEFAULT_ROOTS = {"isic": "data/isic2019", "nih": "data/nih-cxr-lt", "blood": "data/bloodmnist",
                 "cifar100-lt": "data/cifar100", "imagenet-lt": "data/imagenet-lt",
                 "places-lt": "data/places-lt", "inat2018": "data/inat2018"}
ISIC_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]  # UNK (no images) dropped
BLOOD_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
                 "neutrophil", "platelet"]  # PBC folder names; BloodMNIST's label order
NPZ_KEYS = ["train_images", "train_labels", "val_images", "val_labels", "test_images",
            "test_labels"]
TEST_PER_CLASS, VAL_PER_CLASS, MAX_PER_CLASS = 100, 50, 5000
AUGMENTS = ("none", "light", "strong")


class Source(NamedTuple):
    """What each source's reader returns."""
    classes: list        # class names, in label order
    images: object       # a folder (items: paths relative to it) or an array (items: row numbers)
    splits: dict         # split -> (items, labels)
    vertical_flip: bool  # whether up and down carry no meaning (microscopy, dermoscopy)
    group_counts: Optional[list] = None  # what defines many / medium / few, if not training counts


class Data(NamedTuple):
    train: Dataset       # with the training augmentation
    val: Dataset
    test: Dataset
    train_eval: Dataset  # the training images as evaluation sees them: class means, probes
    classes: list        # class names, in label order
    class_counts: list   # training images per class
    group_counts: list   # what defines many / medium / few: the training counts but in CIFAR-100-LT
    splits: dict         # split -> (items, labels): what write_splits() stores


# --------------------------------------------------------------------------------------------------
# Images and transforms.

def open_image(path, draft_size=None):
    """Decode to 8-bit RGB. JPEGs decode directly at 1/2, 1/4 or 1/8 scale when that still covers
    draft_size (PIL's draft mode): a 1024 x 768 ISIC image for a 224 model decodes at 512 x 384.
    Images of more than 16-bit greyscale pass through to_8_bits()."""
    try:
        with Image.open(path) as image:
            if draft_size:
                image.draft("RGB", (draft_size, draft_size))
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):
                image = to_8_bits(image)
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise DataError(f"image {path} is larger than Pillow's limit of "
                        f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels: expected a smaller image (crop or "
                        "downscale it)") from None
    except (OSError, SyntaxError, ValueError, TypeError) as error:
        raise DataError(f"cannot read image {path} ({error}): expected a readable image "
                        "file") from None


def to_8_bits(image):
    """An image of 16-bit integers, as X-rays and microscopy often are, scaled to 8 bits by its bit
    depth: the smallest of 8, 10, 12, 14 and 16 bits that holds its largest value (a 12-bit scan
    stored in a 16-bit PNG is scaled by 4095, not clipped at 255)."""
    pixels = np.asarray(image, dtype=np.float64).clip(0, 65535)
    depth = next(bits for bits in (8, 10, 12, 14, 16) if pixels.max() < 2 ** bits)
    return Image.fromarray((pixels * 255 / (2 ** depth - 1)).round().astype(np.uint8))


def is_image(path):
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def hidden(name):  # a folder no user made by hand: .ipynb_checkpoints, .git, macOS's __MACOSX
    return name.startswith(".") or name == "__MACOSX"


def visible_folders(folder):
    """The sub-folders of `folder` a user made: not hidden, not macOS's __MACOSX."""
    return sorted(d for d in folder.iterdir()
                  if d.is_dir() and not hidden(d.name))


def default_augment(img_size):
    """strong for images of 128 px and more, light below: a crop to 35% of a 32 px scan leaves a
    few pixels of the object."""
    return "strong" if img_size >= 128 else "light"


def evaluation_resize(img_size):
    """The side an image is resized to before its centre crop of img_size, as timm evaluates."""
    return round(img_size / 0.875)


def make_transform(img_size, mean, std, augment="none", vertical_flip=False):
    """none (evaluation): resize to img_size / 0.875, centre crop. light: the same view, flipped at
    random (vertically too where orientation means nothing, as in dermoscopy and microscopy).
    strong: random resized crops down to 35% of the area, and the flips."""
    from torchvision.transforms import v2

    assert augment in AUGMENTS, f"augment must be one of {AUGMENTS}, got {augment!r}"
    if augment == "strong":
        ops = [v2.RandomResizedCrop(img_size, scale=(0.35, 1.0))]
    else:
        ops = [v2.Resize(evaluation_resize(img_size)), v2.CenterCrop(img_size)]
    if augment != "none":
        ops.append(v2.RandomHorizontalFlip())
        if vertical_flip:
            ops.append(v2.RandomVerticalFlip())
    to_tensor = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops + to_tensor)


class ImageSet(Dataset):
    """(image, label) pairs. `source` is a folder (items are file paths relative to it) or an array
    of images (N, H, W[, 3]) (items are row numbers)."""

    def __init__(self, source, items, labels, transform, draft_size=None):
        self.source, self.items, self.labels = source, list(items), list(labels)
        self.transform, self.draft_size = transform, draft_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            if isinstance(self.source, np.ndarray):
                image = Image.fromarray(self.source[int(self.items[i])]).convert("RGB")
            else:
                image = open_image(self.source / self.items[i], self.draft_size)
        except DataError as error:
            if get_worker_info() is None:
                raise
            return error  # a loader worker passes it on whole (see Loader), not as a traceback
        return self.transform(image), self.labels[i]


def collate(batch):
    errors = [item for item in batch if isinstance(item, DataError)]
    return errors[0] if errors else default_collate(batch)


class Loader(DataLoader):
    """A DataLoader that raises a DataError met in a worker process as itself, with its one-line
    message (torch would re-raise it with the worker's whole traceback as the message)."""

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, collate_fn=collate, **kwargs)

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, DataError):
                raise batch
            yield batch


# --------------------------------------------------------------------------------------------------
# The long-tailed protocol and the splits.

def long_tail_counts(n_max, num_classes, imbalance_ratio):
    """n_k = n_max * r^(-k / (K - 1)), k = 0 .. K-1, the exponential profile of Cao et al. / Ju et
    al.; at least one image, so that every class can be learnt."""
    exponents = [-k / max(num_classes - 1, 1) for k in range(num_classes)]
    return [max(1, int(n_max * imbalance_ratio ** e)) for e in exponents]


def long_tail_split(labels, classes, *, imbalance_ratio, seed, test_per_class=TEST_PER_CLASS,
                    val_per_class=VAL_PER_CLASS, max_per_class=MAX_PER_CLASS, where=""):
    """Balanced test and val sets held out first, then the long-tailed training set from the rest,
    in descending order of what is left per class. Returns split -> indices into `labels`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = test_per_class + val_per_class
    shuffled = [rng.permutation(np.flatnonzero(labels == k)) for k in range(len(classes))]
    for k, indices in enumerate(shuffled):
        if len(indices) <= held:
            raise DataError(f"class {classes[k]} in {where} has {len(indices)} images: the "
                            f"long-tailed protocol needs more than {held} ({test_per_class} test "
                            f"+ {val_per_class} val)")
    rest = [indices[held:] for indices in shuffled]
    order = sorted(range(len(classes)), key=lambda k: -len(rest[k]))  # most frequent first, stable
    n_max = min(max_per_class, len(rest[order[0]]))
    targets = long_tail_counts(n_max, len(classes), imbalance_ratio)
    train = [rest[k][:n] for k, n in zip(order, targets)]  # one short of its target keeps all
    return {"train": np.concatenate(train),
            "val": np.concatenate([s[test_per_class:held] for s in shuffled]),
            "test": np.concatenate([s[:test_per_class] for s in shuffled])}


def take(items, labels, indices):
    return [items[i] for i in indices], [int(labels[i]) for i in indices]


def write_splits(path, data):
    """One row per image: split, item (file path or array row), class name."""
    with replacing(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["split", "item", "label"])
        for split, (items, labels) in data.splits.items():
            for item, label in zip(items, labels):
                writer.writerow((split, item, data.classes[label]))


def read_splits(path, classes):
    index = {name: k for k, name in enumerate(classes)}
    splits = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for row in read_csv(path, ["split", "item", "label"]):
        if row["label"] not in index or row["split"] not in splits:
            raise DataError(f"split file {path} lists {row['split']}/{row['label']}, which is "
                            "not a split (train, val, test) and class of this data set: it was "
                            "written for other data")
        splits[row["split"]][0].append(row["item"])
        splits[row["split"]][1].append(index[row["label"]])
    unlisted = sorted(set(classes) - {classes[k] for k in splits["train"][1]})
    if unlisted:  # a class folder added after the run began
        raise DataError(f"{', '.join(unlisted)} is not among the classes split file {path} was "
                        "written for: expected the data the run began with (a new class needs a "
                        "new run)")
    return splits


# --------------------------------------------------------------------------------------------------
# The readers: each returns a Source.

def read_csv(path, required):
    if not Path(path).is_file():
        raise DataError(f"missing CSV {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"CSV {path} lacks the column(s) {', '.join(missing)}: expected "
                            f"{', '.join(required)}")
        return list(reader)


def one_hot_label(row, columns, path, line):
    try:
        hot = [k for k, c in enumerate(columns) if float(row[c]) == 1.0]
    except (TypeError, ValueError):
        hot = []
    if len(hot) != 1:
        raise DataError(f"{path} line {line}: expected exactly one 1 among the columns "
                        f"{', '.join(columns)}")
    return hot[0]


def check_files(folder, names, what):
    if not folder.is_dir():
        raise DataError(f"missing image folder {folder}: expected the {what} images there")
    present = set(os.listdir(folder))
    missing = [n for n in names if n not in present]
    if missing:
        raise DataError(f"{len(missing)} image(s) listed for {what} are not in {folder}, e.g. "
                        f"{missing[0]}")


def refuse_repeats(names, path, first_line=2):
    """One line naming an image a label file lists twice: it could land in train and in test."""
    seen = {}
    for line, name in enumerate(names, start=first_line):
        if name in seen:
            raise DataError(f"{path} lists {name} twice (lines {seen[name]} and {line}): expected "
                            "each image once")
        seen[name] = line


def protocol_splits(items, labels, classes, imbalance_ratio, seed, where):
    """The ISIC-2019-LT protocol on a pool of (items, labels): split -> (items, labels)."""
    split = long_tail_split(labels, classes, imbalance_ratio=imbalance_ratio, seed=seed,
                            where=where)
    return {name: take(items, labels, indices) for name, indices in split.items()}


def isic(root, seed, imbalance_ratio, img_size):
    path = root / "ISIC_2019_Training_GroundTruth.csv"
    rows = read_csv(path, ["image"] + ISIC_CLASSES + ["UNK"])
    refuse_repeats([row["image"] for row in rows], path)
    items, labels = [], []
    for line, row in enumerate(rows, start=2):
        label = one_hot_label(row, ISIC_CLASSES + ["UNK"], path, line)
        if label < len(ISIC_CLASSES):
            items.append(row["image"] + ".jpg")  # names verbatim: some end in _downsampled
            labels.append(label)
    check_files(root / "ISIC_2019_Training_Input", items, "ISIC 2019")
    items = [f"ISIC_2019_Training_Input/{name}" for name in items]
    splits = protocol_splits(items, labels, ISIC_CLASSES, imbalance_ratio, seed, path)
    return Source(ISIC_CLASSES, root, splits, vertical_flip=True)


NIH_SPLITS = {"train": "train", "val": "balanced-val", "test": "balanced-test"}


def nih_images(root):
    """image name -> path under root: images/ as NIH's archives unpack, or images_001/images/ ..
    images_012/images/ as Kaggle's copy of ChestX-ray14 lays them out."""
    folders = sorted(root.glob("images_*/images"))
    if (root / "images").is_dir():
        folders = [root / "images"]
    if not folders:
        raise DataError(f"missing image folder {root / 'images'}: expected the ChestX-ray14 images "
                        "there (or in images_001/images/ ... as Kaggle's copy has them)")
    return {name: f"{folder.relative_to(root).as_posix()}/{name}"
            for folder in folders for name in os.listdir(folder)}


def nih(root, seed, imbalance_ratio, img_size):
    splits, classes, found, listed = {}, None, nih_images(root), {}
    for split, name in NIH_SPLITS.items():
        names = [f"nih-cxr-lt_single-label_{name}.csv",  # as published
                 f"nih-lt_single-label_{name}.csv"]       # an older name
        path = next((root / n for n in names if (root / n).is_file()), None)
        if path is None:
            raise DataError(f"missing {root / names[0]}: the NIH-CXR-LT labels sit in a NIH Box "
                            "folder with no direct address; download nih-cxr-lt_single-label_"
                            "{train,balanced-val,balanced-test}.csv from the folder linked at "
                            f"https://github.com/VITA-Group/LongTailCXR into {root}")
        rows = read_csv(path, ["id"] + (classes or []))
        if classes is None:  # every column but the id (and a subject id, if present) is a class
            with open(path, newline="") as f:
                classes = [c for c in next(csv.reader(f)) if c not in ("id", "subject_id")]
        labels = [one_hot_label(row, classes, path, line) for line, row in enumerate(rows, start=2)]
        ids = [row["id"] for row in rows]
        refuse_repeats(ids, path)
        for image in ids:
            if image in listed:
                raise DataError(f"{image} is listed in {listed[image]} and in {path}: expected "
                                "each image in one split")
            listed[image] = path.name
        missing = [image for image in ids if image not in found]
        if missing:
            raise DataError(f"{len(missing)} image(s) listed in {path.name} are not under {root}, "
                            f"e.g. {missing[0]}: expected them in images/")
        splits[split] = ([found[image] for image in ids], labels)
    return Source(classes, root, splits, vertical_flip=False)  # an X-ray's up and down mean much


def unwrap(folder):
    """A folder that only wraps another (an archive unpacked as PBC_dataset_normal_DIB/
    PBC_dataset_normal_DIB/<classes>): the inner one."""
    while folder.is_dir() and not any(is_image(p) for p in folder.iterdir()):
        inside = visible_folders(folder)
        if len(inside) != 1:
            break
        folder = inside[0]
    return folder


def nfc(name):
    """A folder name as a class name: macOS writes accents decomposed (NFD), Linux as typed."""
    return unicodedata.normalize("NFC", name)


def scan_class_folders(folder, classes=None):
    """folder/<class>/<image>: returns (classes, items relative to folder's parent, labels)."""
    if not folder.is_dir():
        raise DataError(f"missing folder {folder}: expected one sub-folder of images per class")
    folders = visible_folders(folder)
    if not folders:
        raise DataError(f"no class sub-folders in {folder}: expected {folder}/<class>/<image>")
    names = [nfc(d.name) for d in folders]
    unknown = sorted(set(names) - set(classes or names))
    if unknown:
        raise DataError(f"{folder} has class folder(s) {', '.join(unknown)} that are not among "
                        f"the training classes {', '.join(classes)}")
    classes = classes or names
    items, labels = [], []
    for name, class_folder in zip(names, folders):
        files = sorted(p for p in class_folder.iterdir() if is_image(p))
        if not files:
            raise DataError(f"class folder {class_folder} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        items += [f"{folder.name}/{class_folder.name}/{p.name}" for p in files]
        labels += [classes.index(name)] * len(files)
    return classes, items, labels


def load_npz(path, keys):
    """The arrays `keys` of a MedMNIST file: 2D images, (N, H, W) or (N, H, W, C)."""
    try:
        arrays = np.load(path)
        found = [arrays[key] for key in keys]
    except (OSError, ValueError, KeyError, EOFError) as error:  # EOFError: a file of 0 bytes
        raise DataError(f"cannot read {path} ({error}): expected a MedMNIST .npz with the arrays "
                        f"{', '.join(keys)}") from None
    images = found[0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"{path} holds images of shape {images.shape[1:]}: expected 2D images, "
                        "(H, W) or (H, W, 3); 3D MedMNIST volumes are not supported")
    check_npz(found, keys, path)
    return found, arrays


def check_npz(arrays, keys, path):
    """MedMNIST's layout, split by split: uint8 images of one shape, and as many labels, whole
    numbers of 0 or more; images in the first split and the last (train, test)."""
    for i in range(0, len(keys), 2):
        images, labels, name = arrays[i], arrays[i + 1], keys[i]
        if images.dtype != np.uint8 or images.shape[1:] != arrays[0].shape[1:]:
            raise DataError(f"{path}: {name} holds {images.dtype} images of shape "
                            f"{images.shape[1:]}: expected uint8 images, as MedMNIST stores them, "
                            f"of one shape in every split ({keys[0]}: {arrays[0].shape[1:]})")
        if len(labels) != len(images):
            raise DataError(f"{path}: {len(images)} {name} but {len(labels)} {keys[i + 1]}: "
                            "expected one label per image")
        if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
            raise DataError(f"{path}: {keys[i + 1]} are not whole numbers of 0 or more: expected "
                            "class indices")
    if not len(arrays[0]) or not len(arrays[-2]):
        raise DataError(f"{path}: {keys[0]} or {keys[-2]} is empty: expected images in both")


def npz_labels(labels, path):
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(f"{path} has multi-label labels of shape {labels.shape}: expected one "
                        "label per image (N, 1)")
    return labels.reshape(-1).astype(int)


def npz_size(path):
    """MedMNIST's images are 28 px in name.npz, S px in name_S.npz."""
    size = path.stem.rpartition("_")[2]
    return int(size) if size.isdigit() else 28


def blood_file(root, img_size):
    """The bloodmnist*.npz in root to use: the only one, or the one at --img-size."""
    files = sorted(root.glob("bloodmnist*.npz"))
    matching = [f for f in files if npz_size(f) == img_size]
    if len(files) > 1 and len(matching) != 1:
        raise DataError(f"{root} holds {', '.join(f.name for f in files)}: expected one at "
                        f"--img-size {img_size} px (bloodmnist_{img_size}.npz), or name the file "
                        "with --data-root")
    return matching[0] if len(files) > 1 else files[0] if files else None


def blood(root, seed, imbalance_ratio, img_size):
    file = root if root.suffix == ".npz" else blood_file(root, img_size)
    if file:  # BloodMNIST: pool its own splits, then apply the long-tailed protocol
        arrays, _ = load_npz(file, NPZ_KEYS)
        images = np.concatenate(arrays[0::2])
        labels = np.concatenate([npz_labels(a, file) for a in arrays[1::2]])
        classes, items = BLOOD_CLASSES, [str(i) for i in range(len(images))]
    else:  # PBC: one folder per cell type
        images = unwrap(root)
        classes, items, labels = scan_class_folders(images)
        items = [item.split("/", 1)[1] for item in items]
    if np.max(labels) >= len(classes):
        raise DataError(f"label {np.max(labels)} in {root} is outside the {len(classes)} classes")
    splits = protocol_splits(items, labels, classes, imbalance_ratio, seed, root)
    return Source(classes, images, splits, vertical_flip=True)


def medmnist(root, seed, imbalance_ratio, img_size):
    if not root.is_file():
        raise DataError(f"{root} is not a .npz file: expected a MedMNIST file such as "
                        "dermamnist.npz")
    arrays, stored = load_npz(root, NPZ_KEYS)
    labels = [npz_labels(a, root) for a in arrays[1::2]]
    num_classes = int(max(split_labels.max() for split_labels in labels)) + 1
    if "classes" in stored:
        classes = [str(c) for c in stored["classes"]]
    else:
        classes = [str(k) for k in range(num_classes)]
    if num_classes > len(classes):
        raise DataError(f"{root} has label {num_classes - 1}, outside its {len(classes)} classes")
    starts = np.cumsum([0] + [len(split_labels) for split_labels in labels])
    splits = {}
    for j, split in enumerate(("train", "val", "test")):
        rows = [str(i) for i in range(starts[j], starts[j + 1])]
        splits[split] = (rows, labels[j].tolist())
    return Source(classes, np.concatenate(arrays[0::2]), splits, vertical_flip=False)


def image_folders(root, seed, imbalance_ratio, img_size):
    if not (root / "train").is_dir():  # a folder that wraps the data set's
        root = unwrap(root)
    classes, items, labels = scan_class_folders(root / "train")
    splits = {"train": (items, labels)}
    _, *splits["test"] = scan_class_folders(root / "test", classes)
    if (root / "val").is_dir():
        _, *splits["val"] = scan_class_folders(root / "val", classes)
        return Source(classes, root, splits, vertical_flip=False)
    # no val folder: carve a stratified 10% of train, one image at least of a class with two or more
    rng, val = np.random.default_rng(seed), []
    for k in range(len(classes)):
        indices = rng.permutation(np.flatnonzero(np.asarray(labels) == k))
        if len(indices) > 1:
            val += indices[:max(1, len(indices) // 10)].tolist()
    train = sorted(set(range(len(items))) - set(val))
    splits = {"train": take(items, labels, train), "val": take(items, labels, sorted(val)),
              "test": splits["test"]}
    return Source(classes, root, splits, vertical_flip=False)


def lift_counts(imbalance_ratio, num_classes=100, n_max=500):
    """n_k = int(n_max (1/r)^(k / (K - 1))), as LDAM-DRW and LIFT compute them: 10,847 images at
    r = 100."""
    return [int(n_max * (1 / imbalance_ratio) ** (k / (num_classes - 1.0)))
            for k in range(num_classes)]


def cifar100_lt(root, seed, imbalance_ratio, img_size):
    """CIFAR-100-LT by LIFT's protocol: class k keeps the first lift_counts(r)[k] of its training
    images after one shuffle per class, classes in order, from one generator seeded 0
    (np.random.seed(0) in LIFT), so that every run sees the subset the papers used; the balanced
    10,000-image test set; no val set (the last epoch is tested, as in LIFT). many / medium / few
    are defined by the counts at r = 100."""
    folder = root / "cifar-100-python"

    def load(name):
        try:
            with open(folder / name, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except (OSError, EOFError, pickle.UnpicklingError) as error:
            raise DataError(f"cannot read {folder / name} ({error}): expected CIFAR-100's python "
                            f"version, {WHERE_TO_GET['cifar100-lt']}") from None

    train, test, meta = load("train"), load("test"), load("meta")
    labels, classes = np.asarray(train["fine_labels"]), meta["fine_label_names"]
    rng, keep = np.random.RandomState(0), []
    for k, n in enumerate(lift_counts(imbalance_ratio, len(classes))):
        indices = np.flatnonzero(labels == k)
        rng.shuffle(indices)
        keep += indices[:n].tolist()
    pixels = np.concatenate([train["data"], test["data"]])
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    test_rows = range(len(labels), len(images))
    splits = {"train": ([str(i) for i in keep], labels[keep].tolist()), "val": ([], []),
              "test": ([str(i) for i in test_rows], list(test["fine_labels"]))}
    return Source(classes, images, splits, vertical_flip=False,
                  group_counts=lift_counts(100, len(classes)))


def places_path(item):
    """Places-LT's lists say train/<class>/<file> and val/<class>/<file>, a class with a
    sub-category hyphenated (apartment_building-outdoor); the Places365 256 px archives unpack to
    data_256/<initial>/<class>/<sub-category>/<file> and val_256/<file>."""
    split, rest = item.split("/", 1)
    category, file = rest.rsplit("/", 1)
    if split == "train":
        return f"data_256/{rest[0]}/{category.replace('-', '/')}/{file}"
    return f"val_256/{file}"


def read_list(path):
    """A published split list: '<path under root> <label>' a line -> (items, labels)."""
    items, labels = [], []
    for number, line in enumerate(open(path), start=1):
        if not (parts := line.split()):
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{path} line {number}: expected '<relative path> <label>', got "
                            f"{line.strip()[:80]!r}")
        items.append(parts[0])
        labels.append(int(parts[1]))
    return items, labels


def split_lists(root, seed, imbalance_ratio, img_size, name):
    """ImageNet-LT, Places-LT, iNaturalist 2018: the published lists. A class is named by the
    folder of its first training image."""
    folder, files = LISTS[name]
    splits = {"val": ([], [])}
    for split, (file, _) in files.items():
        if not (root / file).is_file():
            raise DataError(f"missing split list {root / file}: expected {file} from "
                            f"{LISTS_URL}{folder}/")
        splits[split] = read_list(root / file)
    names = {}
    for item, label in zip(*splits["train"]):
        names.setdefault(label, item.split("/", 1)[-1].rsplit("/", 1)[0])
    num_classes = 1 + max(max(labels) for _, labels in splits.values() if labels)
    classes = [names.get(k, str(k)) for k in range(num_classes)]
    if name == "places-lt" and not (root / "train").is_dir():
        splits = {s: ([places_path(item) for item in items], labels)
                  for s, (items, labels) in splits.items()}
    firsts = {}  # (split, class) -> its first image: one of every class of every list is checked
    for split, (items, labels) in splits.items():  # now, so a wrong layout shows at once
        for item, label in zip(items, labels):
            firsts.setdefault((split, label), item)
    missing = [item for item in firsts.values() if not (root / item).is_file()]
    if missing:
        raise DataError(f"image {root / missing[0]} of the {name} lists is missing: expected "
                        f"{WHERE_TO_GET[name]} in {root}")
    return Source(classes, root, splits, vertical_flip=False)


def synthetic(root, seed, imbalance_ratio, img_size):
    return Source(*make_synthetic(seed, imbalance_ratio), vertical_flip=True)


# --------------------------------------------------------------------------------------------------
# The embedded benchmark: stained cells under a microscope. scripts/pretrain_tiny.py draws its
# pretraining images with draw_cells() too, of the 14 other cell types and in the original stain.

# Each class is a combination of four factors, and each factor varies within a class and overlaps
# with its neighbours, so no single cue separates all classes. (stain, nuclei, elongated, granular):
CELL_TYPES = [(0, 1, 0, 0), (0, 2, 0, 1), (1, 1, 1, 0), (1, 3, 0, 0), (0, 3, 1, 1),
              (1, 2, 1, 1), (0, 1, 1, 1), (1, 1, 0, 1), (0, 2, 1, 0), (1, 3, 1, 0)]
SYNTHETIC_SIZE, SYNTHETIC_MAX, SYNTHETIC_VAL, SYNTHETIC_TEST = 48, 400, 20, 100


def cell_name(stain, nuclei, elongated, granular):
    shape, texture = "oval" if elongated else "round", "grainy" if granular else "smooth"
    return f"{shape}-{nuclei}n-{texture}-{'pink' if stain == 0 else 'blue'}"


def draw_cells(labels, rng, size=SYNTHETIC_SIZE):
    """One cell per image on a stained, noisy background: (N, size, size, 3) uint8."""
    n = len(labels)
    stain, nuclei, elongated, granular = (np.array(f)[labels] for f in zip(*CELL_TYPES))

    def uniform(low, high):  # one draw per image, (N, 1, 1)
        return rng.uniform(low, high, (n, 1, 1))

    y, x = np.mgrid[0:size, 0:size] / size
    dx, dy = x - uniform(0.38, 0.62), y - uniform(0.38, 0.62)
    angle = uniform(0, np.pi)
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    aspect = 1.0 + 0.45 * elongated[:, None, None] + rng.normal(0, 0.18, (n, 1, 1))
    radius = uniform(0.17, 0.27)
    distance = np.hypot(along / aspect, across * aspect) / radius
    cell = 1 / (1 + np.exp((distance - 1) * 12))  # a soft edge
    # granules: a random-phase interference pattern, stronger in granular classes
    grain = np.sin(along * uniform(50, 80) + uniform(0, 6))
    grain = grain * np.sin(across * uniform(50, 80) + uniform(0, 6))
    grain *= (0.08 + 0.22 * granular[:, None, None] + rng.normal(0, 0.09, (n, 1, 1))).clip(0)
    # nuclei: dark blobs spread around the cell's centre; the count is off by one in a fifth
    count = np.clip(nuclei + rng.choice([-1, 0, 0, 0, 0, 0, 0, 0, 0, 1], n), 1, 4)
    nucleus = np.zeros_like(cell)
    for j in range(4):
        offset = (count > 1)[:, None, None] * radius * 0.45
        phase = 2 * np.pi * j / count[:, None, None] + angle
        blob = np.hypot(along / aspect - offset * np.cos(phase),
                        across * aspect - offset * np.sin(phase))
        shown = (j < count)[:, None, None] / (1 + np.exp((blob / (radius * 0.32) - 1) * 10))
        nucleus = np.maximum(nucleus, shown)
    hue = np.where(stain[:, None] == 0, [[0.85, 0.45, 0.65]], [[0.45, 0.55, 0.9]])
    hue = (hue + rng.normal(0, 0.12, (n, 3)))[:, None, None, :]
    background = np.array([0.93, 0.88, 0.9]) + rng.normal(0, 0.04, (n, 1, 1, 3))
    image = background * (1 - cell[..., None]) + hue * (cell * (1 + grain))[..., None]
    dark = 0.25 * nucleus[..., None] * np.array([0.35, 0.1, 0.4])
    image = image * (1 - 0.75 * nucleus[..., None]) + dark
    image += rng.normal(0, 0.06, image.shape)
    return (image.clip(0, 1) * 255).astype(np.uint8)


@functools.lru_cache(maxsize=2)  # drawn once a process: a resume or a re-evaluation reuses it
def make_synthetic(seed=0, imbalance_ratio=100):
    """Long-tailed train (SYNTHETIC_MAX images of class 0 down to / imbalance_ratio), balanced val
    and test. The images are read-only: every caller shares them."""
    rng = np.random.default_rng(seed)
    classes = [cell_name(*t) for t in CELL_TYPES]
    counts = {"train": long_tail_counts(SYNTHETIC_MAX, len(classes), imbalance_ratio),
              "val": [SYNTHETIC_VAL] * len(classes), "test": [SYNTHETIC_TEST] * len(classes)}
    labels = {s: np.repeat(np.arange(len(classes)), c) for s, c in counts.items()}
    everything = np.concatenate(list(labels.values()))
    # a domain gap, as between a foundation model's data and scientific images: the benchmark's
    # slides are stained with other dyes (colour channels permuted) than the pretraining's
    images = draw_cells(everything, rng)[..., [1, 2, 0]]
    images.flags.writeable = False
    starts = np.cumsum([0] + [len(split_labels) for split_labels in labels.values()])
    splits = {s: ([str(i) for i in range(starts[j], starts[j + 1])], labels[s].tolist())
              for j, s in enumerate(labels)}
    return classes, images, splits


# --------------------------------------------------------------------------------------------------

SOURCES = {"synthetic": synthetic, "isic": isic, "nih": nih, "blood": blood, "npz": medmnist,
           "folder": image_folders, "cifar100-lt": cifar100_lt,
           **{name: functools.partial(split_lists, name=name) for name in LISTS}}
PUBLISHED_SPLITS = {"nih", "npz", "folder", *LISTS}  # kept as published: no long-tailed subsampling


def load_data(name, root=None, *, img_size=224, augment=None, imbalance_ratio=None, seed=0,
              mean=(0.5,) * 3, std=(0.5,) * 3, splits=None, download=True):
    """The train, val and test sets of data set `name`, from `root` (default DEFAULT_ROOTS[name]),
    fetched there first if missing and `download`. `augment`: none, light or strong (default: by
    img_size, see default_augment). `imbalance_ratio`: r of the long-tailed protocol (default 100),
    for the sets it applies to. `splits`, a CSV from write_splits(), replaces the split this call
    would make, so that a resumed or repeated evaluation sees exactly the same images."""
    if name not in SOURCES:
        raise DataError(f"unknown data set {name!r}: expected one of {', '.join(SOURCES)}")
    if name in PUBLISHED_SPLITS and imbalance_ratio is not None:
        raise DataError(f"--imbalance-ratio does not apply to --data {name}, which keeps its own "
                        "splits: expected it only with "
                        f"{', '.join(sorted(set(SOURCES) - PUBLISHED_SPLITS))}")
    if name != "synthetic":
        if root is None and name not in DEFAULT_ROOTS:
            raise DataError(f"--data {name} needs --data-root: expected {WHERE_TO_GET[name]}")
        root = Path(root or DEFAULT_ROOTS[name])
        if root.suffix != ".npz":  # a file named by the user is never a folder to download into
            ensure_downloaded(name, root, download)
        if not root.exists():
            raise DataError(f"--data-root {root} does not exist: expected {WHERE_TO_GET[name]}")
    ratio = 100 if imbalance_ratio is None else imbalance_ratio
    source = SOURCES[name](root, seed, ratio, img_size)
    splits = read_splits(splits, source.classes) if splits else source.splits
    if len(source.classes) < 2:
        raise DataError(f"{root or name} holds one class ({source.classes[0]}): a classifier "
                        "needs at least two")
    counts = np.bincount(splits["train"][1], minlength=len(source.classes)).tolist()
    if 0 in counts:
        raise DataError(f"class {source.classes[counts.index(0)]} has no training images in "
                        f"{root}: every class needs one")
    augment = augment or default_augment(img_size)

    def image_set(split, policy):
        transform = make_transform(img_size, mean, std, policy, source.vertical_flip)
        draft = evaluation_resize(img_size)
        return ImageSet(source.images, *splits[split], transform, draft_size=draft)

    return Data(image_set("train", augment), image_set("val", "none"), image_set("test", "none"),
                image_set("train", "none"), source.classes, counts, source.group_counts or counts,
                splits)
