"""Shared test fixtures: `src/` and `scripts/` on the path (so `import toy...` works), the hub switched
off, a tiny random CLIP, the real annotation files (when present), and the fixtures several test files
use (generated ImageNet pairs, one thread, the evaluation scripts' arguments, a network file, a hub
cache). Plain helper functions are in helpers.py."""
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

from helpers import make_pairs_data  # noqa: E402
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
    from toy.tiny_clip import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip.pt", seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_path):
    from clip_loader import load_clip

    return load_clip("ViT-L/14", tiny_clip_path, device="cpu")


# ---------------------------------------------------------------------------------------------
# training runs

@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's spinning
    threads slow every step many times over. A module of training runs asks for it in its `pytestmark`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data8(tmp_path_factory) -> Path:
    """Eight generated ImageNet images with their caption pairs (helpers.make_pairs_data)."""
    return make_pairs_data(tmp_path_factory.mktemp("imagenet8"), n=8)


# ---------------------------------------------------------------------------------------------
# evaluation runs

@pytest.fixture(scope="module")
def net_path(tiny_clip, tmp_path_factory) -> Path:
    from checkpoint import save_network
    from models import FTI4CIR

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("net") / "fti4cir.pt"
    save_network(FTI4CIR.for_clip(tiny_clip), path)
    return path


@pytest.fixture(scope="module")
def net(net_path):
    from checkpoint import load_network

    return load_network(net_path, "cpu")[0]


@pytest.fixture
def eval_args(tiny_clip_path, tmp_path) -> list[str]:
    """The flags every evaluation script run of the tests starts with (helpers.dataset_args adds a dataset)."""
    return ["--clip-weights", str(tiny_clip_path), "--device", "cpu", "--batch-size", "8", "--workers", "0",
            "--no-progress", "--save-path", str(tmp_path / "out"), "--no-cache"]


@pytest.fixture
def fast_clip(monkeypatch, tiny_clip, tiny_clip_path):
    """The scripts get the session's tiny CLIP instead of reading the same file again (the full-run
    tests load it through the flags)."""
    import evaluate
    import retrieve

    def load(model_name, weights, device, **kwargs):
        assert Path(weights) == tiny_clip_path and str(device) == "cpu"
        return tiny_clip

    for module in (evaluate, retrieve):
        monkeypatch.setattr(module, "load_clip", load)


@pytest.fixture
def encoded(monkeypatch):
    """Counts the gallery images the code under test sends through CLIP, whatever the entry point."""
    import features

    seen = features.Counters()
    real = features.encode_gallery

    def spy(clip, dataset, encoding, keep=None):
        seen.gallery_images_encoded += len(dataset)
        return real(clip, dataset, encoding, keep)

    monkeypatch.setattr(features, "encode_gallery", spy)
    return seen


# ---------------------------------------------------------------------------------------------
# the Hugging Face hub

@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub (already imported) looks in, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache
