"""Shared test helpers. Tests never leave 127.0.0.1: timm models are built with pretrained=False, and data
sets download only from the tests' own local server (test_download.py)."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches the hub: a request for weights fails at once
os.environ["SCILT_MIRROR"] = "http://127.0.0.1:9"  # nor a data set's host: downloads go to a closed local port
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

import scilt  # noqa: E402


TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=2)


def tiny_vit(global_pool="token", **kwargs):
    """A 3-block ViT on 32 x 32 images: 16 patches of 8 x 8, width 48. Built in milliseconds."""
    return scilt.create_backbone("vit_tiny_patch16_224", global_pool=global_pool, **TINY, **kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
