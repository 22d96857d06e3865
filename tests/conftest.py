"""Shared test fixtures: `src/` on the path, the hub switched off, a tiny random CLIP, the real
annotation files (when present)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # open_clip/transformers would otherwise retry a hub for ~46 s
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for p in (REPO / "src", REPO / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

torch.set_num_threads(min(2, torch.get_num_threads()))

from logs import setup_logging  # noqa: E402

setup_logging()  # library calls in the tests log as the scripts do: plain lines on (captured) stdout


def annotations_root() -> Path:
    """Where the real FashionIQ / CIRR / CIRCO annotation files are (images are not)."""
    return Path(os.environ.get("FTI4CIR_ANNOTATIONS", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def real_annotations() -> Path:
    root = annotations_root()
    if not (root / "CIRR").is_dir():
        pytest.skip(f"real annotation files not found at {root} (set FTI4CIR_ANNOTATIONS to the folder holding FashionIQ/, CIRR/, CIRCO/)")
    return root


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> Path:
    from clip_loader import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt", seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_path):
    from clip_loader import load_clip

    return load_clip("ViT-L/14", tiny_clip_path, device="cpu")
