"""data.py: every source in its real on-disk format (tiny files written here), the long-tailed
protocol, split files, transforms, and the promised error for each kind of bad input."""
import csv
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
import predict
from data import DataError, load_data

# the published header's order, between id and subject_id
NIH_CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
               "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
               "Pneumonia", "Pneumothorax", "Pneumoperitoneum", "Pneumomediastinum",
               "Subcutaneous Emphysema", "Tortuous Aorta", "Calcification of the Aorta",
               "No Finding"]
ISIC_PER_CLASS = [300, 600, 250, 200, 220, 170, 160, 180]  # MEL NV BCC AK BKL DF VASC SCC


def image_bytes(size=(20, 16), mode="RGB", fmt="JPEG"):
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (200, 100, 50)).save(buffer, fmt)
    return buffer.getvalue()


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


@pytest.fixture(scope="module")
def isic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("isic")
    (root / "ISIC_2019_Training_Input").mkdir()
    jpeg, rows = image_bytes(), []
    for k, n in enumerate(ISIC_PER_CLASS + [3]):  # three UNK rows, to be dropped
        for i in range(n):
            name = f"ISIC_{k}{i:05d}" + ("_downsampled" if i == 0 else "")
            (root / "ISIC_2019_Training_Input" / f"{name}.jpg").write_bytes(jpeg)
            rows.append([name] + ["1.0" if j == k else "0.0" for j in range(9)])
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv",
              ["image"] + data.ISIC_CLASSES + ["UNK"], rows)
    return root


def class_counts(split, num_classes):
    return np.bincount(split[1], minlength=num_classes).tolist()


def test_isic_long_tail_protocol(isic_root):
    d = load_data("isic", isic_root, img_size=32, imbalance_ratio=100, seed=0)
    assert d.classes == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    # left after holding out 100 test + 50 val per class: NV 450, MEL 150, BCC 100, BKL 70, AK 50,
    # SCC 30, DF 20, VASC 10. Profile from n_max = 450 for r = 100: 450, 233, 120, 62, 32, 16, 8, 4
    # (by that order); MEL and BCC have fewer than their share and keep all they have.
    assert d.class_counts == [150, 450, 100, 32, 62, 8, 4, 16]
    assert class_counts(d.splits["test"], 8) == [100] * 8
    assert class_counts(d.splits["val"], 8) == [50] * 8
    items = {s: set(d.splits[s][0]) for s in d.splits}
    assert not (items["train"] & items["test"]) and not (items["train"] & items["val"])
    assert not (items["val"] & items["test"])
    assert not any("ISIC_8" in item for item in items["train"] | items["test"])  # UNK dropped
    assert any(item.endswith("_downsampled.jpg") for s in items.values() for item in s)
    image, label = d.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 8
    r500 = load_data("isic", isic_root, img_size=32, imbalance_ratio=500, seed=0)
    # 450 * 500^(-k/7) = 450, 185, 76, 31, 12, 5, 2, 0.9: the last class keeps one image
    assert r500.class_counts == [150, 450, 76, 12, 31, 2, 1, 5]
    assert r500.splits["test"] == d.splits["test"]


def test_splits_depend_on_seed_and_read_back(isic_root, tmp_path):
    a = load_data("isic", isic_root, seed=0)
    assert a.splits == load_data("isic", isic_root, seed=0).splits
    b = load_data("isic", isic_root, seed=1)
    assert set(b.splits["test"][0]) != set(a.splits["test"][0]) and b.class_counts == a.class_counts
    data.write_splits(tmp_path / "splits.csv", a)
    c = load_data("isic", isic_root, seed=1, splits=tmp_path / "splits.csv")
    assert c.splits == a.splits and c.class_counts == a.class_counts


@pytest.fixture
def nih_root(tmp_path):
    (tmp_path / "images").mkdir()
    png = image_bytes((24, 24), "L", "PNG")  # X-rays are grayscale
    for split, per_class in (("train", [5, 3] + [1] * 18), ("balanced-val", [1] * 20),
                             ("balanced-test", [2] * 20)):
        rows = []
        for k, n in enumerate(per_class):
            for i in range(n):
                name = f"{split}_{k:02d}_{i}.png"
                (tmp_path / "images" / name).write_bytes(png)
                rows.append([name] + [int(j == k) for j in range(20)] + [f"{100 * k + i:08d}"])
        write_csv(tmp_path / f"nih-cxr-lt_single-label_{split}.csv",
                  ["id"] + NIH_CLASSES + ["subject_id"], rows)
    return tmp_path


def test_nih_reads_its_own_splits_and_makes_grayscale_rgb(nih_root):
    d = load_data("nih", nih_root, img_size=32)
    # subject_id is no class
    assert d.classes == NIH_CLASSES and d.class_counts == [5, 3] + [1] * 18
    assert (len(d.val), len(d.test)) == (20, 40)
    image, label = d.test[0]
    assert image.shape == (3, 32, 32) and label == 0
    torch.testing.assert_close(image[0], image[1])  # grey copied to all three channels


def test_nih_bad_csvs(nih_root):
    path = nih_root / "nih-cxr-lt_single-label_balanced-test.csv"
    write_csv(path, ["id"] + NIH_CLASSES[:-1], [])
    with pytest.raises(DataError, match="lacks the column\\(s\\) No Finding"):
        load_data("nih", nih_root)
    write_csv(path, ["id"] + NIH_CLASSES, [["x.png"] + [1, 1] + [0] * 18])
    with pytest.raises(DataError, match="line 2: expected exactly one 1"):
        load_data("nih", nih_root)
    path.unlink()
    with pytest.raises(DataError, match="missing .*nih-cxr-lt_single-label_balanced-test.csv: "
                                        "the NIH-CXR-LT labels"):
        load_data("nih", nih_root)


def write_class_folders(root, counts, names=None, payload=None):
    payload = payload or image_bytes()
    for k, n in enumerate(counts):
        folder = root / (names[k] if names else f"class{k}")
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i}.jpg").write_bytes(payload)


def test_blood_folders_long_tail(tmp_path):
    write_class_folders(tmp_path, [160, 170, 151, 200, 155, 165, 190, 152], data.BLOOD_CLASSES)
    d = load_data("blood", tmp_path, img_size=32, imbalance_ratio=10)
    assert d.classes == data.BLOOD_CLASSES
    # left after 150 held out: 10, 20, 1, 50, 5, 15, 40, 2. In descending order (ig, neutrophil,
    # eosinophil, monocyte, basophil, lymphocyte, platelet, erythroblast) the profile from n_max =
    # 50 for r = 10 asks 50, 35, 25, 18, 13, 9, 6, 5: ig and neutrophil get theirs, the rest are
    # capped by what is left
    assert d.class_counts == [10, 20, 1, 50, 5, 15, 35, 2]
    assert class_counts(d.splits["test"], 8) == [100] * 8


def test_blood_npz_pools_splits(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 160)[:, None]
    arrays = {}
    for split, part in zip(("train", "val", "test"),
                           np.array_split(rng.permutation(len(labels)), 3)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (len(part), 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[part]
    np.savez(tmp_path / "bloodmnist.npz", **arrays)
    d = load_data("blood", tmp_path, img_size=28, imbalance_ratio=10)
    assert d.classes == data.BLOOD_CLASSES
    assert sorted(d.class_counts) == sorted([10, 7, 5, 3, 2, 1, 1, 1])
    assert d.train[0][0].shape == (3, 28, 28)


def test_npz_keeps_its_splits(tmp_path):
    arrays = {"train_images": np.zeros((7, 28, 28), np.uint8),
              "train_labels": np.array([[0], [0], [0], [1], [1], [2], [0]]),
              "val_images": np.zeros((3, 28, 28), np.uint8),
              "val_labels": np.array([[0], [1], [2]]),
              "test_images": np.full((3, 28, 28), 255, np.uint8),
              "test_labels": np.array([[2], [1], [0]])}
    np.savez(tmp_path / "dermamnist.npz", **arrays)
    d = load_data("npz", tmp_path / "dermamnist.npz", img_size=32)
    assert d.classes == ["0", "1", "2"] and d.class_counts == [4, 2, 1]
    image, label = d.test[0]
    assert label == 2
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image, torch.ones(3, 32, 32))
    np.savez(tmp_path / "named.npz", **arrays, classes=np.array(["akiec", "bcc", "bkl"]))
    assert load_data("npz", tmp_path / "named.npz").classes == ["akiec", "bcc", "bkl"]
    np.savez(tmp_path / "chest.npz", **{**arrays, "train_labels": np.zeros((7, 14), int)})
    with pytest.raises(DataError, match="multi-label .* expected one label per image"):
        load_data("npz", tmp_path / "chest.npz")
    np.savez(tmp_path / "bad.npz", **arrays, classes=np.array(["a", "b"]))
    with pytest.raises(DataError, match="label 2, outside its 2 classes"):
        load_data("npz", tmp_path / "bad.npz")
    np.savez(tmp_path / "partial.npz", train_images=arrays["train_images"])
    with pytest.raises(DataError, match="expected a MedMNIST .npz with the arrays"):
        load_data("npz", tmp_path / "partial.npz")


def test_npz_files_that_do_not_hold_what_medmnist_holds_are_refused(tmp_path):
    """Counts that disagree would read images under other images' labels; negative or fractional
    labels, images other than uint8 or of another shape in one split, and an empty train split
    would train on something else than the user meant: each is one line naming the array."""
    good = {"train_images": np.zeros((30, 28, 28), np.uint8), "train_labels": np.arange(30) % 3,
            "val_images": np.zeros((6, 28, 28), np.uint8), "val_labels": np.arange(6) % 3,
            "test_images": np.zeros((6, 28, 28), np.uint8), "test_labels": np.arange(6) % 3}
    np.savez(tmp_path / "good.npz", **good)
    assert load_data("npz", tmp_path / "good.npz", img_size=32).class_counts == [10, 10, 10]
    cases = {"counts": ({"train_labels": np.arange(20) % 3},
                        "30 train_images but 20 train_labels"),
             "negative": ({"val_labels": np.array([0, 1, 2, -1, 0, 1])},
                          "val_labels are not whole"),
             "float labels": ({"test_labels": np.full(6, 0.5)}, "test_labels are not whole"),
             "float images": ({"train_images": np.zeros((30, 28, 28))}, "float64 images"),
             "uint16 beside rgb": ({"val_images": np.zeros((6, 28, 28, 3), np.uint16)},
                                   "uint16 images"),
             "another size": ({"test_images": np.zeros((6, 32, 32), np.uint8)},
                              "of shape (32, 32)"),
             "empty train": ({"train_images": np.zeros((0, 28, 28), np.uint8),
                              "train_labels": np.zeros(0, int)}, "train_images or test_images is "
                                                                 "empty")}
    for name, (change, message) in cases.items():
        np.savez(tmp_path / "bad.npz", **{**good, **change})
        with pytest.raises(DataError, match=re.escape(message)):
            load_data("npz", tmp_path / "bad.npz", img_size=32)
    (tmp_path / "zero.npz").write_bytes(b"")
    with pytest.raises(DataError, match="expected a MedMNIST .npz"):
        load_data("npz", tmp_path / "zero.npz", img_size=32)


def test_a_set_of_one_class_is_refused(tmp_path):
    write_class_folders(tmp_path / "one" / "train", [5], ["cells"])
    write_class_folders(tmp_path / "one" / "test", [2], ["cells"])
    with pytest.raises(DataError, match=re.escape("holds one class (cells): a classifier needs")):
        load_data("folder", tmp_path / "one", img_size=16)


def test_folder_with_and_without_val(tmp_path):
    write_class_folders(tmp_path / "train", [20, 5, 1], ["cats", "dogs", "eels"])
    write_class_folders(tmp_path / "test", [2, 2], ["cats", "dogs"])
    d = load_data("folder", tmp_path, img_size=32, seed=0)
    assert d.classes == ["cats", "dogs", "eels"]
    # a stratified tenth, one at least; eels has one image
    assert class_counts(d.splits["val"], 3) == [2, 1, 0]
    assert d.class_counts == [18, 4, 1] and len(d.test) == 4
    assert not set(d.splits["val"][0]) & set(d.splits["train"][0])
    assert load_data("folder", tmp_path, seed=1).splits["val"] != d.splits["val"]
    write_class_folders(tmp_path / "val", [1, 1, 1], ["cats", "dogs", "eels"])
    assert load_data("folder", tmp_path).class_counts == [20, 5, 1]
    write_class_folders(tmp_path / "test", [1], ["fish"])
    with pytest.raises(DataError, match="class folder\\(s\\) fish that are not among the "
                                        "training classes"):
        load_data("folder", tmp_path)


def test_folder_test_split_lacking_a_class_keeps_the_training_labels(tmp_path):
    """A test (or val) folder without one of the training classes: every other class keeps the
    training label of its name, not its place among that folder's own classes."""
    write_class_folders(tmp_path / "train", [4, 3, 2], ["cats", "dogs", "eels"])
    write_class_folders(tmp_path / "test", [2, 2], ["cats", "eels"])
    write_class_folders(tmp_path / "val", [1, 1], ["dogs", "eels"])
    d = load_data("folder", tmp_path, img_size=32)
    assert set(zip(*d.splits["test"])) == {("test/cats/0.jpg", 0), ("test/cats/1.jpg", 0),
                                          ("test/eels/0.jpg", 2), ("test/eels/1.jpg", 2)}
    assert set(zip(*d.splits["val"])) == {("val/dogs/0.jpg", 1), ("val/eels/0.jpg", 2)}
    assert [label for _, label in d.test] == [0, 0, 2, 2]


def test_bad_roots_and_names(tmp_path):
    with pytest.raises(DataError, match="unknown data set 'imagenet': expected one of synthetic, "
                                        "isic"):
        load_data("imagenet")
    with pytest.raises(DataError, match="nowhere does not hold the isic data and --no-download "
                                        "forbids fetching it: expected ISIC 2019 .* https://"):
        load_data("isic", tmp_path / "nowhere", download=False)
    with pytest.raises(DataError, match="--data-root .*nowhere does not exist: expected MedMNIST"):
        load_data("npz", tmp_path / "nowhere")
    with pytest.raises(DataError, match="--data-root .*missing.npz does not exist: expected "
                                        "bloodmnist_224.npz"):
        load_data("blood", tmp_path / "missing.npz")
    with pytest.raises(DataError, match="--data folder needs --data-root: expected your own "
                                        "images"):
        load_data("folder")
    (tmp_path / "ISIC_2019_Training_Input").mkdir()  # laid out by hand, but for the CSV
    with pytest.raises(DataError, match="missing CSV .*ISIC_2019_Training_GroundTruth.csv"):
        load_data("isic", tmp_path)
    (tmp_path / "train" / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="class folder .*cats holds no images"):
        load_data("folder", tmp_path)


def test_isic_bad_csv_and_missing_images(tmp_path):
    write_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", ["image", "MEL", "NV"], [])
    with pytest.raises(DataError, match="lacks the column\\(s\\) BCC, AK, BKL, DF, VASC, SCC, UNK"):
        load_data("isic", tmp_path, download=False)  # with downloads, a CSV alone would start one
    write_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv",
              ["image"] + data.ISIC_CLASSES + ["UNK"], [["ISIC_1"] + ["1.0"] + ["0.0"] * 8])
    with pytest.raises(DataError, match="missing image folder"):
        load_data("isic", tmp_path, download=False)
    (tmp_path / "ISIC_2019_Training_Input").mkdir()
    with pytest.raises(DataError, match="1 image\\(s\\) listed for ISIC 2019 are not in .* e.g. "
                                        "ISIC_1.jpg"):
        load_data("isic", tmp_path)
    (tmp_path / "ISIC_2019_Training_Input" / "ISIC_1.jpg").write_bytes(image_bytes())
    with pytest.raises(DataError, match="class MEL .* has 1 images: the long-tailed protocol "
                                        "needs more than 150"):
        load_data("isic", tmp_path)


def test_unreadable_and_truncated_images(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(image_bytes((64, 64))[:200])
    for name in ("text.jpg", "cut.jpg"):
        with pytest.raises(DataError,
                           match=f"cannot read image .*{name} .*expected a readable image file"):
            data.open_image(tmp_path / name)


def test_jpeg_draft_decodes_at_reduced_size(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(image_bytes((1024, 768)))
    assert data.open_image(path).size == (1024, 768)
    # decoded at a power-of-two reduction that still covers the requested size
    assert data.open_image(path, draft_size=256).size == (512, 384)
    assert data.open_image(path, draft_size=100).size == (256, 192)


def test_read_splits_rejects_other_data(tmp_path):
    write_csv(tmp_path / "splits.csv", ["split", "item", "label"], [["train", "0", "MEL"]])
    with pytest.raises(DataError, match="lists train/MEL, which is not .* written for other data"):
        data.read_splits(tmp_path / "splits.csv", ["a", "b"])


def test_synthetic_is_deterministic_long_tailed_and_balanced():
    a = load_data("synthetic", img_size=32, seed=0)
    assert len(a.classes) == 10 and len(set(a.classes)) == 10
    assert a.class_counts == data.long_tail_counts(400, 10, 100) == [400, 239, 143, 86, 51,
                                                                     30, 18, 11, 6, 4]
    assert class_counts(a.splits["val"], 10) == [20] * 10
    assert class_counts(a.splits["test"], 10) == [100] * 10
    b = load_data("synthetic", img_size=32, seed=0)
    torch.manual_seed(0)
    x = a.test[5][0]
    torch.manual_seed(1)
    torch.testing.assert_close(x, b.test[5][0])  # evaluation transforms are deterministic
    labels, draw = np.arange(10).repeat(2), data.draw_cells  # and so are the images drawn
    assert np.array_equal(draw(labels, np.random.default_rng(1)),
                          draw(labels, np.random.default_rng(1)))
    other = data.make_synthetic(seed=1)[1]
    assert other.shape == a.test.source.shape and not np.array_equal(other, a.test.source)
    assert load_data("synthetic", imbalance_ratio=10).class_counts[-1] == 40


def test_augment_policies_and_the_unaugmented_training_view():
    assert data.default_augment(32) == "light" and data.default_augment(224) == "strong"
    d = load_data("synthetic", img_size=32, augment="light")
    plain = d.train_eval[3][0]  # the training image as evaluation sees it: the same on every call
    torch.testing.assert_close(plain, d.train_eval[3][0], rtol=0, atol=0)
    flips = [plain, plain.flip(-1), plain.flip(-2), plain.flip(-1).flip(-2)]
    seen = set()
    for seed in range(12):  # light: that very view, flipped at random, never cropped
        torch.manual_seed(seed)
        augmented = d.train[3][0]
        seen.add(next(i for i, view in enumerate(flips) if torch.equal(view, augmented)))
    assert len(seen) > 1
    strong = load_data("synthetic", img_size=32, augment="strong")
    torch.manual_seed(0)
    assert not any(torch.equal(strong.train[3][0], view) for view in flips)  # a random resized crop
    first = load_data("synthetic", img_size=32).train.transform.transforms[0]
    assert type(first).__name__ == "Resize"


def test_imbalance_ratio_only_where_the_protocol_applies(tmp_path):
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.zeros((2, 8, 8), np.uint8)
        arrays[f"{split}_labels"] = np.array([[0], [1]])
    np.savez(tmp_path / "x.npz", **arrays)
    with pytest.raises(DataError, match="--imbalance-ratio does not apply to --data npz, which "
                                        "keeps its own splits"):
        load_data("npz", tmp_path / "x.npz", imbalance_ratio=10)
    assert load_data("npz", tmp_path / "x.npz").class_counts == [1, 1]


def test_loader_worker_error_arrives_as_one_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "b.jpg").write_bytes(image_bytes((64, 64))[:200])
    images = data.ImageSet(tmp_path, ["a.jpg", "b.jpg"], [0, 1],
                           data.make_transform(16, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(DataError) as error:
        list(data.Loader(images, batch_size=2, num_workers=1))
    assert str(error.value).startswith("cannot read image") and "b.jpg" in str(error.value)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# Real files as they come: what users' folders and the public archives hold.

def test_sixteen_bit_images_are_scaled_by_their_bit_depth(tmp_path):
    """A 12-bit X-ray ramp in a 16-bit PNG spans 0..255, not clipped to white at 255."""
    ramp = np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "xray.png")
    with Image.open(tmp_path / "xray.png") as image:
        assert image.mode.startswith("I")  # Pillow reads it as 16-bit integers
    pixels = np.asarray(data.open_image(tmp_path / "xray.png"))[..., 0].astype(float)
    assert pixels.min() == 0 and pixels.max() == 255 and abs(pixels.mean() - 127.5) < 2
    assert (np.diff(pixels[0]) >= 0).all()  # still a ramp
    full = (ramp.astype(np.uint32) * 16).astype(np.uint16)  # the same ramp at 16 bits
    Image.fromarray(full).save(tmp_path / "full.png")
    sixteen = np.asarray(data.open_image(tmp_path / "full.png"))[..., 0].astype(float)
    assert np.abs(sixteen - pixels).max() <= 1
    eight = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (8, 1))  # 8-bit values stored as 16
    Image.fromarray(eight).save(tmp_path / "eight.png")
    assert (np.asarray(data.open_image(tmp_path / "eight.png"))[..., 0] == eight).all()


def test_an_image_over_pillows_pixel_limit_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "huge.png").write_bytes(image_bytes((64, 64), fmt="PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice this
    with pytest.raises(DataError, match="huge.png is larger than Pillow's limit of 2,000 pixels"):
        data.open_image(tmp_path / "huge.png")
    transform = data.make_transform(16, (0.5,) * 3, (0.5,) * 3)
    files = predict.ImageFiles([tmp_path / "huge.png"], transform, 16)
    image, error = files[0]  # prediction: a row with the error, not the end of the job
    assert image.shape == (3, 16, 16) and "larger than Pillow's limit" in error


def test_a_3d_medmnist_file_is_refused_at_load(tmp_path):
    arrays = {f"{split}_images": np.zeros((4, 28, 28, 28), np.uint8) for split in ("train", "val",
                                                                                  "test")}
    arrays.update({f"{split}_labels": np.array([[0], [1], [0], [1]]) for split in ("train", "val",
                                                                                   "test")})
    np.savez(tmp_path / "organmnist3d.npz", **arrays)
    with pytest.raises(DataError, match=r"images of shape \(28, 28, 28\): expected 2D images"):
        load_data("npz", tmp_path / "organmnist3d.npz")


def test_folders_skip_what_macos_and_notebooks_leave_and_take_torchvisions_suffixes(tmp_path):
    write_class_folders(tmp_path / "train", [2, 2], ["cats", "dogs"])
    write_class_folders(tmp_path / "test", [1, 1], ["cats", "dogs"])
    cats = tmp_path / "train" / "cats"
    (cats / "._0.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # copied from a Mac
    (cats / ".DS_Store").write_bytes(b"\x00")
    (cats / "Thumbs.db").write_bytes(b"\x00")
    for suffix, fmt in ((".webp", "WEBP"), (".ppm", "PPM"), (".pgm", "PPM")):
        mode = "L" if suffix == ".pgm" else "RGB"
        (cats / f"more{suffix}").write_bytes(image_bytes(mode=mode, fmt=fmt))
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / ".ipynb_checkpoints" / "x.jpg").write_bytes(image_bytes())
    (tmp_path / "train" / "__MACOSX").mkdir()
    d = load_data("folder", tmp_path, img_size=16)
    assert d.classes == ["cats", "dogs"]
    train_items = set(d.splits["train"][0]) | set(d.splits["val"][0])
    assert {f"train/cats/more{s}" for s in (".webp", ".ppm", ".pgm")} <= train_items
    assert not any("._" in item or "Thumbs" in item for item in train_items)
    assert all(image.shape == (3, 16, 16) for image, _ in d.train_eval)
    found = {p.name for p in predict.find_images([tmp_path])}
    assert {"more.webp", "more.ppm", "more.pgm"} <= found
    assert not found & {"._0.jpg", "x.jpg", "Thumbs.db", ".DS_Store"}


def test_bloodmnist_takes_the_file_at_the_image_size(tmp_path):
    rng = np.random.default_rng(0)
    for name, size in (("bloodmnist.npz", 28), ("bloodmnist_64.npz", 64)):
        labels = np.repeat(np.arange(8), 152)[:, None]
        arrays = {}
        for split, part in zip(("train", "val", "test"), np.array_split(np.arange(len(labels)), 3)):
            arrays[f"{split}_images"] = rng.integers(0, 255, (len(part), size, size, 3), np.uint8)
            arrays[f"{split}_labels"] = labels[part]
        np.savez(tmp_path / name, **arrays)
    assert load_data("blood", tmp_path, img_size=64).test.source.shape[1:] == (64, 64, 3)
    assert load_data("blood", tmp_path, img_size=28).test.source.shape[1:] == (28, 28, 3)
    with pytest.raises(DataError, match="holds bloodmnist.npz, bloodmnist_64.npz: expected one at "
                                        "--img-size 224 px"):
        load_data("blood", tmp_path, img_size=224)


def test_label_files_that_list_an_image_twice_are_refused(isic_root, nih_root, tmp_path):
    rows = list(csv.reader(open(isic_root / "ISIC_2019_Training_GroundTruth.csv")))
    write_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", rows[0], rows[1:] + [rows[5]])
    (tmp_path / "ISIC_2019_Training_Input").symlink_to(isic_root / "ISIC_2019_Training_Input")
    with pytest.raises(DataError, match=f"lists {rows[5][0]} twice \\(lines 6 and {len(rows) + 1}"):
        load_data("isic", tmp_path, download=False)
    test_csv = nih_root / "nih-cxr-lt_single-label_balanced-test.csv"
    train_rows = list(csv.reader(open(nih_root / "nih-cxr-lt_single-label_train.csv")))
    test_rows = list(csv.reader(open(test_csv)))
    write_csv(test_csv, test_rows[0], test_rows[1:] + [train_rows[1]])  # a train image in test
    with pytest.raises(DataError, match=f"{train_rows[1][0]} is listed in nih-cxr-lt_single-label_"
                                        "train.csv and in .*balanced-test.csv"):
        load_data("nih", nih_root)


def test_a_wrapping_folder_and_the_kaggle_nih_layout_are_found(tmp_path, nih_root):
    # PBC_dataset_normal_DIB.zip unpacks to PBC_dataset_normal_DIB/PBC_dataset_normal_DIB/<types>
    pbc = tmp_path / "PBC_dataset_normal_DIB"
    write_class_folders(pbc / "PBC_dataset_normal_DIB", [152] * 8, data.BLOOD_CLASSES)
    (pbc / "__MACOSX").mkdir()
    d = load_data("blood", pbc, img_size=16, imbalance_ratio=10)
    assert d.classes == data.BLOOD_CLASSES and len(d.test) == 800
    assert d.test[0][0].shape == (3, 16, 16)
    # Kaggle's ChestX-ray14: images_001/images/*.png ... images_012/images/*.png
    names = sorted(p.name for p in (nih_root / "images").iterdir())
    for i, name in enumerate(names):
        folder = nih_root / f"images_{1 + i % 3:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (nih_root / "images" / name).rename(folder / name)
    (nih_root / "images").rmdir()
    d = load_data("nih", nih_root, img_size=16)
    assert len(d.test) == 40 and d.test[0][0].shape == (3, 16, 16)
    assert d.splits["test"][0][0].startswith("images_0") and "/images/" in d.splits["test"][0][0]


def test_class_folders_named_in_decomposed_unicode_match_the_training_classes(tmp_path):
    import unicodedata

    composed = "Zellkern-Ödem"
    write_class_folders(tmp_path / "train", [3, 3], [composed, "Zytoplasma"])
    write_class_folders(tmp_path / "test", [1, 1],
                        [unicodedata.normalize("NFD", composed), "Zytoplasma"])  # as macOS writes
    d = load_data("folder", tmp_path, img_size=16)
    assert d.classes == [composed, "Zytoplasma"] and sorted(d.splits["test"][1]) == [0, 1]
    assert d.test[0][0].shape == (3, 16, 16)  # the files are found under their own names
