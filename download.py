"""Where each data set comes from, and its download: a set missing from its root (default
data/<set>) is fetched there, as torchvision does. data.py imports this file (the addresses, the
image suffixes, DataError), and this file imports nothing of the repository's.

One line first says what (files, total size, host, destination), then a progress line per file
with speed and time left. A cut download leaves FILE.part and resumes with an HTTP Range request; a
file gets its final name only once its size and md5 (where one is published; otherwise the
archive's image count, a zip's CRCs, a list's line count) are checked. Archives are unpacked in
place, then deleted; each finished file leaves .FILE.done, and the set counts as complete only when
<root>/.complete exists. No network or a wrong checksum: one line naming the file, its address and
the folder to put it in by hand. A folder the user laid out (an image folder or data file in it) is
used as it is; only missing split lists are fetched. SCILT_MIRROR=https://host/base replaces each
address's scheme and host, keeping its path.
"""
import hashlib
import os
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional


class DataError(Exception):
    """Bad or missing data, here or in data.py: the message is one line for the user."""


WHERE_TO_GET = {  # where each set comes from, for the messages that ask a user to fetch it by hand
    "isic": "ISIC 2019 training data from https://challenge.isic-archive.com/data/#2019",
    "nih": "NIH ChestX-ray14 images from https://nihcc.app.box.com/v/ChestXray-NIHCC and the "
           "NIH-CXR-LT label CSVs linked from https://github.com/VITA-Group/LongTailCXR",
    "blood": "bloodmnist_224.npz from https://zenodo.org/records/10519652, or the PBC images from "
             "https://data.mendeley.com/datasets/snkd93bnjr/1 (one folder per cell type)",
    "npz": "MedMNIST .npz files from https://zenodo.org/records/10519652",
    "folder": "your own images laid out as train/<class>/*, test/<class>/* and optionally "
              "val/<class>/*",
    "cifar100-lt": "cifar-100-python/ from "
                   "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "imagenet-lt": "ImageNet 2012 (login at https://image-net.org) as train/<wnid>/*.JPEG and "
                   "val/<wnid>/*.JPEG",
    "places-lt": "Places365-Standard 256 px (http://places2.csail.mit.edu/download.html) as "
                 "data_256/ and val_256/",
    "inat2018": "iNaturalist 2018 (https://github.com/visipedia/inat_comp/tree/master/2018) as "
                "train_val2018/",
}
LISTS_URL = "https://raw.githubusercontent.com/shijxcs/LIFT/main/datasets/"  # LIFT's split lists
LISTS = {  # set -> (folder in LISTS_URL, split -> (file, lines)); iNaturalist 2018 tests on val
    "imagenet-lt": ("ImageNet_LT", {"train": ("ImageNet_LT_train.txt", 115846),
                                    "val": ("ImageNet_LT_val.txt", 20000),
                                    "test": ("ImageNet_LT_test.txt", 50000)}),
    "places-lt": ("Places_LT", {"train": ("Places_LT_train.txt", 62500),
                                "val": ("Places_LT_val.txt", 7300),
                                "test": ("Places_LT_test.txt", 36500)}),
    "inat2018": ("iNaturalist18", {"train": ("iNaturalist18_train.txt", 437513),
                                   "test": ("iNaturalist18_val.txt", 24426)}),
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}  # as
# torchvision's ImageFolder; never AppleDouble files (._name.jpg, left by copying from a Mac), and
# never anything in a hidden or __MACOSX folder (.ipynb_checkpoints, ...)


class Remote(NamedTuple):
    url: str
    md5: Optional[str] = None    # the published checksum, where there is one
    size: float = 0.0            # bytes, roughly: for the line that says what will be fetched
    count: Optional[int] = None  # images in an archive, or lines in a list: checked if no md5
    name: Optional[str] = None   # the file's name, if not the last part of the address

    @property
    def filename(self):
        return self.name or urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1]


ISIC_URL = "https://isic-challenge-data.s3.amazonaws.com/2019/"
PLACES_URL = "http://data.csail.mit.edu/places/places365/"
INAT_URL = "https://ml-inat-competition-datasets.s3.amazonaws.com/2018/"
NIH_KEYS = ["vfk49d74nhbxq3nqjg0900w5nvkorp5c", "i28rlmbvmfjbl8p2n3ril0pptcmcu9d1",
            "f1t00wrtdk94satdfb9olcolqx20z2jp", "0aowwzs5lhjrceb3qp67ahp0rd1l1etg",
            "v5e3goj22zr6h8tzualxfsqlqaygfbsn", "asi7ikud9jwnkrnkj99jnpfkjdes7l6l",
            "jn1b4mw4n6lnh74ovmcjb8y48h8xj07n", "tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j",
            "upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj", "l6nilvfa9cg3s28tqv1qc1olm3gnz54p",
            "hhq8fkdgvcari67vfhs7ppg2w6ni4jze", "ioqwiy20ihqwyr8pf4c24eazhh281pbu"]
NIH_MD5 = ["fe8ed0a6961412fddcbb3603c11b3698", "ab07a2d7cbe6f65ddd97b4ed7bde10bf",
           "2301d03bde4c246388bad3876965d574", "9f1b7f5aae01b13f4bc8e2c44a4b8ef6",
           "1861f3cd0ef7734df8104f2b0309023b", "456b53a8b351afd92a35bc41444c58c8",
           "1075121ea20a137b87f290d6a4a5965e", "b61f34cec3aa69f295fbb593cbd9d443",
           "442a3caa61ae9b64e61c561294d1e183", "09ec81c4c31e32858ad8cf965c494b74",
           "499aefc67207a5a97692424cf5dbeed5", "dc9fda1757c2de0032b63347a7d2895c"]
NIH_IMAGES = [4999] + [10000] * 10 + [7121]  # PNGs in images_001 .. images_012.tar.gz: 112,120
NIH_SIZES = [2.008e9] + [4.016e9] * 10 + [2.914e9]  # bytes: 45.08 GB (NIH's FAQ gives the md5s)
REMOTE = {
    "isic": [Remote(ISIC_URL + "ISIC_2019_Training_Input.zip", size=9.1e9, count=25331),
             Remote(ISIC_URL + "ISIC_2019_Training_GroundTruth.csv", size=1.2e6, count=25332)],
    "blood": [Remote("https://zenodo.org/records/10519652/files/bloodmnist_224.npz?download=1",
                     "b718ff6835fcbdb22ba9eacccd7b2601", size=2e9)],
    "nih": [Remote(f"https://nihcc.box.com/shared/static/{key}.gz", md5, size, n,
                   f"images_{i:03d}.tar.gz")
            for i, (key, md5, size, n)
            in enumerate(zip(NIH_KEYS, NIH_MD5, NIH_SIZES, NIH_IMAGES), start=1)],
    "cifar100-lt": [Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                           "eb9058c3a382ffc7106e4002c42a8d85", size=1.69e8)],
}
for name, (folder, files) in LISTS.items():  # LIFT's split lists, checked by their line counts
    REMOTE[name] = [Remote(LISTS_URL + f"{folder}/{file}", size=lines * 60, count=lines)
                    for file, lines in files.values()]
REMOTE["places-lt"] += [
    Remote(PLACES_URL + "train_256_places365standard.tar", "53ca1c756c3d1e7809517cc47c5561c5",
           2.6e10),
    Remote(PLACES_URL + "val_256.tar", "e27b17d8d44f4af9a78502beb927f808", 5.0e8)]
REMOTE["inat2018"] += [
    Remote(INAT_URL + "train_val2018.tar.gz", "b1c6952ce38f31868cc50ea72d066cc3", 1.2e11)]
TIMEOUT = 30  # seconds a connection may stay silent before the download is given up


def mirrored(url):
    mirror = os.environ.get("SCILT_MIRROR")
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def show_progress(name, done, total, started, resumed_at, end=False):
    rate = (done - resumed_at) / max(time.time() - started, 1e-6)
    left = (total - done) / rate if total and rate > 0 else 0
    if total:
        amount = f"{100 * done / total:3.0f}% of {total / 1e6:,.1f} MB"
    else:
        amount = f"{done / 1e6:,.1f} MB"
    print(f"\r  {name}: {amount}, {rate / 1e6:.1f} MB/s, {int(left // 60)}m{int(left % 60):02d}s "
          "left   ", end="\n" if end else "", file=sys.stderr, flush=True)


def md5sum(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(remote, folder):
    """Download `remote` into `folder` (resuming FILE.part), check it, only then name it FILE."""
    path, url = folder / remote.filename, mirrored(remote.url)
    if path.exists():  # only a complete, checked file carries its final name
        return path
    part = path.with_name(path.name + ".part")
    by_hand = (f"fetch it by hand into {folder}/{remote.filename}, or set SCILT_MIRROR to a "
               "mirror's base URL")
    done = part.stat().st_size if part.exists() else 0
    try:
        request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            if response.status != 206:  # the whole file: start over
                done = 0
            total = done + int(response.headers.get("Content-Length") or 0) or None
            started, resumed_at, shown = time.time(), done, 0.0
            with open(part, "ab" if done else "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if time.time() - shown > 0.5:
                        show_progress(remote.filename, done, total, started, resumed_at)
                        shown = time.time()
            show_progress(remote.filename, done, total, started, resumed_at, end=True)
    except urllib.error.HTTPError as error:
        if error.code != 416:  # 416: nothing left to send, the partial file is whole
            raise DataError(f"cannot download {url} (HTTP {error.code} {error.reason}): "
                            f"{by_hand}") from None
        total = done
    except (urllib.error.URLError, OSError) as error:  # no network, refused, timed out, cut off
        reason = getattr(error, "reason", None) or error
        kept = ""
        if part.exists():
            kept = f"; what arrived is kept in {part} and resumes when run again"
        raise DataError(f"cannot download {url} ({reason}): {by_hand}{kept}") from None
    if total and done != total:
        raise DataError(f"the download of {url} stopped at {done:,} of {total:,} bytes: run again "
                        f"to resume it from {part}")
    if remote.md5 and md5sum(part) != remote.md5:
        part.unlink()
        raise DataError(f"{remote.filename} from {url} does not match its published md5 "
                        f"{remote.md5}: deleted it; run again to download it anew, or {by_hand}")
    os.replace(part, path)
    return path


def unpack(path, root, remote):
    """Unpack an archive into root (a zip's members checked against their CRCs first), count what
    it held against remote.count, delete it. A list file is counted in lines."""
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                if (bad := archive.testzip()) is not None:
                    raise OSError(f"member {bad} fails its CRC check")
                archive.extractall(root)
                names = archive.namelist()
        elif path.name.endswith((".tar", ".tar.gz", ".tgz")):
            with tarfile.open(path) as archive:
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                archive.extractall(root, **safe)
                names = archive.getnames()
        else:  # a CSV, an .npz, a list
            names = None
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as error:
        path.unlink()
        raise DataError(f"{path} is damaged ({error}): deleted it; run again to download it "
                        "anew") from None
    found = None
    if names is not None:
        found = sum(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in names)
    elif remote.count:
        found = sum(1 for line in open(path, "rb") if line.strip())
    wrong = remote.count and found != remote.count
    if names is not None or wrong:  # unpacked (the archive would double the space), or not the file
        path.unlink()
    if wrong:
        what = "images" if names else "lines"
        raise DataError(f"{path.name} from {mirrored(remote.url)} holds {found} {what}, expected "
                        f"{remote.count}: not the published file; deleted it, run again to "
                        "download it anew")


def laid_out_by_hand(root):
    """Whether root holds the user's own copy: files beyond the label lists (which may come
    first)."""
    if root.is_file():
        return True
    return root.exists() and any(not p.name.startswith(".") and p.suffix not in (".csv", ".txt")
                                 for p in root.iterdir())


def ensure_downloaded(name, root, allowed=True):
    """Fetch set `name` into root unless it is complete there (ROOT/.complete) or laid out by hand
    (root holds files and no download was begun there)."""
    complete, begun = root / ".complete", root / ".downloading"
    if complete.exists():
        return
    by_hand = not begun.exists() and laid_out_by_hand(root)
    todo = [r for r in REMOTE.get(name, []) if not (root / f".{r.filename}.done").exists()]
    if by_hand:  # the user's own copy: only the split lists it lacks are fetched
        todo = [r for r in todo if r.filename.endswith(".txt") and not (root / r.filename).exists()]
    if not todo or (not allowed and root.exists()):  # the reader checks what is there
        return
    files = ", ".join(r.filename for r in todo)
    if not allowed:
        raise DataError(f"{root} does not hold the {name} data and --no-download forbids fetching "
                        f"it: expected {WHERE_TO_GET[name]} (or drop --no-download to fetch "
                        f"{files})")
    hosts = ", ".join(sorted({urllib.parse.urlsplit(mirrored(r.url)).netloc for r in todo}))
    first = ", ".join(r.filename for r in todo[:3]) + (", ..." if len(todo) > 3 else "")
    print(f"downloading {name} into {root}: {len(todo)} file(s), about "
          f"{sum(r.size for r in todo) / 1e9:.1f} GB from {hosts} ({first})", file=sys.stderr,
          flush=True)
    root.mkdir(parents=True, exist_ok=True)
    if not by_hand:
        begun.touch()
    for remote in todo:
        unpack(fetch(remote, root), root, remote)
        (root / f".{remote.filename}.done").touch()
    if not by_hand:
        os.replace(begun, complete)
