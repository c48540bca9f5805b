"""Downloads, without network: a local HTTP server on 127.0.0.1 serves small fixture files in each
source's real format at the real addresses' paths, and SCILT_MIRROR points the downloads at it.
Also: CIFAR-100-LT's counts, and the ImageNet-LT / Places-LT / iNaturalist 2018 list readers."""
import hashlib
import io
import pickle
import tarfile
import threading
import time
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import data
import download
import train
from data import DataError, load_data
from download import Remote


class Server:
    """Serves {url path: bytes} with HTTP Range; a path in `cut` gets half its bytes, once, then the
    connection closes. Records each request's path and Range header."""

    def __init__(self):
        self.files, self.cut, self.requests = {}, set(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = urllib.parse.urlsplit(self.path).path
                server.requests.append((path, self.headers.get("Range")))
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                asked = self.headers.get("Range")  # bytes=START-
                start = int(asked.split("=")[1].split("-")[0]) if asked else 0
                if start >= len(body) > 0:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if path in server.cut:
                    server.cut.discard(path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def put(self, remote, body):
        """Serve `body` where the mirror will ask for `remote`; returns its md5."""
        self.files[urllib.parse.urlsplit(remote.url).path] = body
        return hashlib.md5(body).hexdigest()


@pytest.fixture
def server(monkeypatch):
    s = Server()
    monkeypatch.setenv("SCILT_MIRROR", s.url + "/")
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def jpeg(colour=(200, 100, 50), size=8, fmt="JPEG"):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, fmt)
    return buffer.getvalue()


def archive(files, kind="tar.gz"):
    """{name: bytes} packed as a zip or a tar(.gz)."""
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as z:
            for name, body in files.items():
                z.writestr(name, body)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz" if kind == "tar.gz" else "w") as t:
            for name, body in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(body)
                t.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def serve_set(server, monkeypatch, name, bodies):
    """Serve one body per remote of set `name`, with that set's checksums and counts made the
    fixtures'."""
    remotes = []
    for remote, (body, count) in zip(download.REMOTE[name], bodies):
        md5 = server.put(remote, body)
        remotes.append(remote._replace(md5=md5 if remote.md5 else None,
                                       count=count if remote.count else None))
    monkeypatch.setitem(download.REMOTE, name, remotes)


def run_train(argv, capsys):
    """train.main in this process: (exit status, stdout, stderr)."""
    try:
        train.main(argv)
        status = 0
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def one_error_line(err):
    """The error is one line, the last; before it only the download's own lines."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: ")
    assert all(line.startswith(("downloading ", "  ")) or not line for line in lines[:-1]), lines
    return lines[-1]


# --------------------------------------------------------------------------------------------------
# fetch(): resume, checksum, no network.

def test_fetch_resumes_after_a_cut_and_names_the_file_only_when_whole(server, tmp_path):
    body = np.random.default_rng(0).bytes(3_000_000)
    remote = Remote("https://example.org/files/big.bin", hashlib.md5(body).hexdigest())
    server.put(remote, body)
    server.cut.add("/files/big.bin")
    with pytest.raises(DataError, match=r"stopped at 1,500,000 of 3,000,000 bytes: run again to "
                                        r"resume"):
        download.fetch(remote, tmp_path)
    assert not (tmp_path / "big.bin").exists()
    assert (tmp_path / "big.bin.part").stat().st_size == 1_500_000
    assert download.fetch(remote, tmp_path).read_bytes() == body
    # the second request asked for the rest
    assert server.requests[-1] == ("/files/big.bin", "bytes=1500000-")
    assert not (tmp_path / "big.bin.part").exists()


def test_checksum_mismatch_is_one_line_and_leaves_nothing_that_looks_complete(server, tmp_path,
                                                                             capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server.put(download.REMOTE["blood"][0], b"not the published file")
    status, out, err = run_train(["--data", "blood", "--model", "tiny", "--out", "run"], capsys)
    line = one_error_line(err)
    assert status == 2
    assert "does not match its published md5 b718ff6835fcbdb22ba9eacccd7b2601" in line
    assert f"{server.url}/records/10519652/files/bloodmnist_224.npz?download=1" in line
    assert "data/bloodmnist/bloodmnist_224.npz" in line  # where to put it by hand
    root = tmp_path / "data" / "bloodmnist"
    assert not (root / ".complete").exists() and not (root / "bloodmnist_224.npz").exists()
    assert not (root / "bloodmnist_224.npz.part").exists()


def test_no_network_is_one_line_within_seconds(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # a port on which nothing listens once this block ends
    monkeypatch.setenv("SCILT_MIRROR", f"http://127.0.0.1:{port}")
    started = time.time()
    status, out, err = run_train(["--data", "isic", "--model", "tiny", "--out", "run"], capsys)
    assert status == 2 and time.time() - started < 10
    line = one_error_line(err)
    assert line.startswith("error: cannot download") and "ISIC_2019_Training_Input.zip" in line
    assert "data/isic2019/ISIC_2019_Training_Input.zip" in line
    assert not (tmp_path / "data" / "isic2019" / ".complete").exists()
    # said before it fetched
    assert "downloading isic into data/isic2019: 2 file(s), about 9.1 GB" in err


def test_no_download_forbids_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_train(["--data", "cifar100-lt", "--no-download",
                                  "--model", "tiny"], capsys)
    line = one_error_line(err)
    assert status == 2
    assert "--no-download forbids fetching it" in line
    assert "cifar-100-python.tar.gz" in line
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------------------------------
# Each source through the mirror into its default root.

def isic_fixture():
    """151 .. 221 images a class: the ISIC-2019-LT protocol holds out 150 of each."""
    names, rows, image = [], [], jpeg()
    for k in range(len(data.ISIC_CLASSES)):
        for i in range(151 + 10 * k):
            names.append(f"ISIC_{k}{i:05d}")
            one_hot = ",".join("1.0" if j == k else "0.0" for j in range(9))
            rows.append(f"ISIC_{k}{i:05d},{one_hot}")
    csv = "\n".join(["image," + ",".join(data.ISIC_CLASSES) + ",UNK", *rows]).encode()
    images = archive({f"ISIC_2019_Training_Input/{n}.jpg": image for n in names}, "zip")
    return images, len(names), csv


def test_isic_downloads_into_its_default_root_and_trains(server, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, count, csv = isic_fixture()
    serve_set(server, monkeypatch, "isic", [(images, count), (csv, count + 1)])
    server.cut.add("/2019/ISIC_2019_Training_Input.zip")  # the first try is cut off half way
    argv = ["--data", "isic", "--model", "tiny", "--img-size", "16", "--epochs", "1",
            "--imbalance-ratio", "10", "--out", "run"]
    status, out, err = run_train(argv, capsys)
    assert status == 2 and "stopped at" in err and "run again to resume" in err
    root = tmp_path / "data" / "isic2019"
    assert (root / ".downloading").exists() and not (root / ".complete").exists()
    status, out, err = run_train(argv, capsys)  # resumes, checks, unpacks, trains
    assert status == 0, err
    assert "ISIC_2019_Training_Input.zip: 100% of" in err and "MB/s" in err  # the progress line
    assert (root / ".complete").exists() and not (root / ".downloading").exists()
    assert not (root / "ISIC_2019_Training_Input.zip").exists()  # unpacked, then deleted
    assert len(list((root / "ISIC_2019_Training_Input").iterdir())) == count
    assert "balanced accuracy" in out and (tmp_path / "run" / "metrics.json").exists()
    requests = len(server.requests)
    load_data("isic", root, img_size=32)  # a complete set: nothing is fetched again
    assert len(server.requests) == requests and "downloading" not in capsys.readouterr().err


def test_an_archive_with_the_wrong_image_count_is_refused(server, tmp_path, monkeypatch):
    images, count, csv = isic_fixture()
    serve_set(server, monkeypatch, "isic", [(images, count + 1), (csv, count + 1)])
    with pytest.raises(DataError, match=rf"holds {count} images, expected {count + 1}"):
        load_data("isic", tmp_path / "isic", img_size=32)
    assert not (tmp_path / "isic" / ".complete").exists()


def test_a_damaged_zip_is_deleted_and_named(server, tmp_path, monkeypatch):
    images, count, csv = isic_fixture()
    damaged = bytearray(images)
    damaged[200:260] = bytes(60)  # inside the first member's data: its CRC fails
    serve_set(server, monkeypatch, "isic", [(bytes(damaged), count), (csv, count + 1)])
    with pytest.raises(DataError, match=r"ISIC_2019_Training_Input.zip is damaged .*run again to "
                                        r"download it anew"):
        load_data("isic", tmp_path / "isic", img_size=32)
    assert not (tmp_path / "isic" / "ISIC_2019_Training_Input.zip").exists()


def test_blood_fetches_the_224_px_bloodmnist_file(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng, buffer = np.random.default_rng(0), io.BytesIO()
    labels = {split: np.repeat(np.arange(8), n)[:, None]
              for split, n in (("train", 120), ("val", 20), ("test", 40))}
    images = {f"{s}_images": rng.integers(0, 255, (len(y), 8, 8, 3), dtype=np.uint8)
              for s, y in labels.items()}
    np.savez(buffer, **images, **{f"{s}_labels": y for s, y in labels.items()})
    serve_set(server, monkeypatch, "blood", [(buffer.getvalue(), None)])
    d = load_data("blood", img_size=32)  # the default root, data/bloodmnist
    root = tmp_path / "data" / "bloodmnist"
    # an .npz is kept as it is
    assert (root / ".complete").exists() and (root / "bloodmnist_224.npz").exists()
    assert d.classes == data.BLOOD_CLASSES and sum(d.class_counts) + 8 * 150 <= 8 * 180
    assert len(d.test) == 800 and len(d.val) == 400


def test_nih_fetches_the_images_and_says_where_the_labels_are(server, tmp_path, monkeypatch):
    png = jpeg(fmt="PNG")
    monkeypatch.setitem(download.REMOTE, "nih", download.REMOTE["nih"][:2])
    names = [[f"0000{a}_00{i}.png" for i in range(3)] for a in (1, 2)]
    serve_set(server, monkeypatch, "nih",
              [(archive({f"images/{n}": png for n in part}), 3) for part in names])
    root = tmp_path / "nih"
    root.mkdir()
    classes = ["Effusion", "No Finding"]
    for split, rows in (("train", names[0]), ("balanced-val", names[1][:1]),
                        ("balanced-test", names[1][1:])):
        lines = ["id,subject_id," + ",".join(classes)] + [f"{n},1,{i % 2},{1 - i % 2}"
                                                          for i, n in enumerate(rows)]
        # the published names
        (root / f"nih-cxr-lt_single-label_{split}.csv").write_text("\n".join(lines))
    # label CSVs alone do not count as a set laid out by hand
    d = load_data("nih", root, img_size=32)
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(names[0] + names[1])
    assert d.classes == classes and d.class_counts == [1, 2] and len(d.test) == 2
    for path in root.glob("*.csv"):
        path.unlink()
    with pytest.raises(DataError, match=r"no direct address; download "
                                        r"nih-cxr-lt_single-label_\{train,"):
        load_data("nih", root, img_size=32)


def cifar_fixture(per_class=6, classes=100):
    rng = np.random.default_rng(0)
    train_labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(train_labels)
    def pack(labels):
        pixels = rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8)
        return pickle.dumps({"data": pixels, "fine_labels": labels.tolist()})

    names = [f"c{k:02d}" for k in range(classes)]
    return {"cifar-100-python/train": pack(train_labels),
            "cifar-100-python/test": pack(np.arange(classes)),
            "cifar-100-python/meta": pickle.dumps({"fine_label_names": names})}


def test_cifar100_lt_downloads_and_trains(server, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    serve_set(server, monkeypatch, "cifar100-lt", [(archive(cifar_fixture()), None)])
    status, out, err = run_train(["--data", "cifar100-lt", "--model", "tiny", "--img-size", "16",
                                  "--epochs", "1", "--out", "run"], capsys)
    assert status == 0, err
    assert "no val images" in out and "cifar100-lt: 596 train / 0 val / 100 test images" in out
    assert (tmp_path / "data" / "cifar100" / ".complete").exists()


def test_cifar100_lt_counts_follow_lifts_protocol(tmp_path):
    root = tmp_path / "cifar100"
    # the real training set's shape: 500 a class
    for name, body in cifar_fixture(per_class=500).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    (root / ".complete").touch()
    for r, total in ((100, 10847), (50, 12608), (10, 19573)):
        d = load_data("cifar100-lt", root, img_size=32, imbalance_ratio=r)
        assert sum(d.class_counts) == total and d.class_counts[0] == 500
        assert d.group_counts == data.lift_counts(100)  # many / medium / few as at r = 100
    assert d.class_counts[-1] == 50 and len(d.test) == 100 and len(d.val) == 0
    # one shuffle per class, classes in order, one generator seeded 0: LIFT's subset, whatever
    # --seed says
    labels = np.asarray(pickle.loads((root / "cifar-100-python/train").read_bytes())["fine_labels"])
    rng = np.random.RandomState(0)
    expected = []
    for k, n in enumerate(data.lift_counts(10)):
        indices = np.flatnonzero(labels == k)
        rng.shuffle(indices)
        expected += indices[:n].tolist()
    assert d.splits["train"][0] == [str(i) for i in expected]
    assert load_data("cifar100-lt", root, img_size=32,
                     imbalance_ratio=10, seed=3).splits == d.splits


# --------------------------------------------------------------------------------------------------
# The natural-image benchmarks' list readers.

def write_lists(server, monkeypatch, name, lists):
    """Serve one list per split of set `name` ({split: [(path, label)]}); returns the lines per
    file."""
    folder, files = data.LISTS[name]
    bodies = {file: "".join(f"{p} {y}\n" for p, y in lists[split]).encode()
              for split, (file, _) in files.items()}
    remotes = [r._replace(count=len(lists[split]))
               for r, split in zip(download.REMOTE[name], files)]
    for remote in remotes:
        server.put(remote, bodies[remote.filename])
    # then the image archives
    monkeypatch.setitem(download.REMOTE, name, remotes + download.REMOTE[name][len(files):])


def test_imagenet_lt_fetches_its_lists_into_a_root_laid_out_by_hand(server, tmp_path, monkeypatch):
    root = tmp_path / "imagenet"
    lists = {"train": [(f"train/n0{k}/n0{k}_{i}.JPEG", k)
                       for k in range(3) for i in range(5 - 2 * k)],
             "val": [(f"train/n0{k}/n0{k}_v.JPEG", k) for k in range(3)],
             "test": [(f"val/n0{k}/ILSVRC2012_val_{k}.JPEG", k) for k in range(3)]}
    for path, _ in sum(lists.values(), []):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(jpeg())
    write_lists(server, monkeypatch, "imagenet-lt", lists)
    d = load_data("imagenet-lt", root, img_size=32)
    assert d.classes == ["n00", "n01", "n02"] and d.class_counts == [5, 3, 1]
    assert len(d.val) == 3 and len(d.test) == 3 and d.test[0][0].shape == (3, 32, 32)
    # the images are the user's: the set is not ours to mark
    assert not (root / ".complete").exists()
    (root / lists["test"][2][0]).unlink()
    with pytest.raises(DataError, match=r"ILSVRC2012_val_2.JPEG of the imagenet-lt lists is "
                                        r"missing: expected ImageNet"):
        load_data("imagenet-lt", root, img_size=32)


def test_places_lt_downloads_and_reads_the_places365_archive_layout(server, tmp_path, monkeypatch):
    """LIFT's lists write a sub-category with a hyphen (apartment_building-outdoor); the Places365
    archive has it as a sub-folder (data_256/a/apartment_building/outdoor). The archive below is
    written in that real layout by hand, not from the list paths."""
    lists = {"train": [("train/airfield/00000001.jpg", 0), ("train/airfield/00000002.jpg", 0),
                       ("train/airfield/00000003.jpg", 0),
                       ("train/apartment_building-outdoor/00000794.jpg", 1),
                       ("train/apartment_building-outdoor/00000795.jpg", 1),
                       ("train/zen_garden/00000005.jpg", 2)],
             "val": [("train/airfield/00000009.jpg", 0),
                     ("train/apartment_building-outdoor/00000009.jpg", 1),
                     ("train/zen_garden/00000009.jpg", 2)],
             "test": [("val/airfield/Places365_val_00000001.jpg", 0),
                      ("val/apartment_building-outdoor/Places365_val_00000002.jpg", 1),
                      ("val/zen_garden/Places365_val_00000003.jpg", 2)]}
    write_lists(server, monkeypatch, "places-lt", lists)
    in_archive = ["data_256/a/airfield/00000001.jpg", "data_256/a/airfield/00000002.jpg",
                  "data_256/a/airfield/00000003.jpg", "data_256/a/airfield/00000009.jpg",
                  "data_256/a/apartment_building/outdoor/00000794.jpg",
                  "data_256/a/apartment_building/outdoor/00000795.jpg",
                  "data_256/a/apartment_building/outdoor/00000009.jpg",
                  "data_256/z/zen_garden/00000005.jpg", "data_256/z/zen_garden/00000009.jpg"]
    train_tar = archive({path: jpeg() for path in in_archive}, "tar")
    val_tar = archive({f"val_256/Places365_val_0000000{i}.jpg": jpeg() for i in (1, 2, 3)}, "tar")
    lists_, archives = download.REMOTE["places-lt"][:3], download.REMOTE["places-lt"][3:]
    monkeypatch.setitem(download.REMOTE, "places-lt", lists_ + [
        r._replace(md5=server.put(r, body)) for r, body in zip(archives, (train_tar, val_tar))])
    root = tmp_path / "places"
    d = load_data("places-lt", root, img_size=32)
    assert d.classes == ["airfield",
                         "apartment_building-outdoor", "zen_garden"] and d.class_counts == [3, 2, 1]
    # an image of the hyphenated class, read from its sub-folder
    assert len(d.test) == 3 and d.train[3][1] == 1
    assert (root / ".complete").exists() and not (root / "val_256.tar").exists()
    # one image of every class is checked up front, not only the lists' first and last
    (root / "data_256/a/apartment_building/outdoor/00000794.jpg").unlink()
    with pytest.raises(DataError, match="apartment_building/outdoor/00000794.jpg of the "
                                        "places-lt lists is missing"):
        load_data("places-lt", root, img_size=32)


def test_inat2018_tests_on_its_val_list_and_bad_lines_are_named(server, tmp_path, monkeypatch):
    lists = {"train": [(f"train_val2018/Plantae/{k}/{i}.jpg", k)
                       for k in range(2) for i in range(3 - k)],
             "test": [(f"train_val2018/Plantae/{k}/v.jpg", k) for k in range(2)]}
    write_lists(server, monkeypatch, "inat2018", lists)
    images = archive({p: jpeg() for p, _ in lists["train"] + lists["test"]})
    remote = download.REMOTE["inat2018"][-1]
    monkeypatch.setitem(download.REMOTE, "inat2018", download.REMOTE["inat2018"][:2] + [
        remote._replace(md5=server.put(remote, images), count=len(lists["train"]) + 2)])
    root = tmp_path / "inat"
    d = load_data("inat2018", root, img_size=32)
    assert d.classes == ["Plantae/0", "Plantae/1"] and d.class_counts == [3, 2] and len(d.val) == 0
    assert d.splits["test"][0] == [p for p, _ in lists["test"]]
    (root / "iNaturalist18_train.txt").write_text("train_val2018/Plantae/0/0.jpg zero\n")
    with pytest.raises(DataError, match=r"iNaturalist18_train.txt line 1: expected '<relative "
                                        r"path> <label>'"):
        load_data("inat2018", root, img_size=32)
