"""Shared test helpers. Tests never leave 127.0.0.1: timm models are built with pretrained=False,
and data sets download only from the tests' own local server (test_download.py)."""
import contextlib
import io
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches the hub: a request for weights fails at once
# nor a data set's host: downloads go to a closed local port
os.environ["SCILT_MIRROR"] = "http://127.0.0.1:9"
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # the modules, and the scripts beside them

import pytest  # noqa: E402
import torch  # noqa: E402

import scilt  # noqa: E402


FAST = ["--img-size", "16", "--epochs", "1"]  # train.py on the embedded default in seconds
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=2)


def tiny_vit(global_pool="token", **kwargs):
    """A 3-block ViT on 32 x 32 images: 16 patches of 8 x 8, width 48. Built in milliseconds."""
    return scilt.create_backbone("vit_tiny_patch16_224", global_pool=global_pool, **TINY, **kwargs)


def fails(capsys, main, *argv):
    """The promised failure of a program's main(argv): exit status 2 and one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1, error
    return error


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """finished_run(*flags): the folder and printed output of a train.py run with these flags, run
    once a session and shared by the tests that only read it (copy the folder to change it)."""
    import train

    runs = {}

    def get(*flags):
        if flags not in runs:
            out = tmp_path_factory.mktemp("run") / "run"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                train.main([*flags, "--out", str(out)])
            runs[flags] = out, printed.getvalue()
        return runs[flags]

    return get
