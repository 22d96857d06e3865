"""--clip-pretrained and hf-hub: references: loaded offline from a prepared Hugging Face cache (laid out
as huggingface_hub lays it out: refs/main -> a commit, snapshots/<commit>/FILE linked to blobs/), and
one clear, immediate error when the file is not cached; the tag in the name, fingerprint and cache key;
the text width check."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import feature_store
from checkpoint import load_model, save_network
from clip_loader import ClipLoadError, load_clip, qualifying_backbones
from hub import HubError, hub_file
from evaluate import main as evaluate_main
from helpers import KEYS, make_cirr
from models import FTI4CIR
from toy.tiny_clip import save_tiny_clip

REPO = Path(__file__).resolve().parents[1]
TINY = "fti4cir-tiny-vit"  # an open_clip config registered for these tests
TINY_CFG = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
TINY_REPO = "fti4cir-test/tiny-open-clip"


def put_in_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """Files of `repo` as huggingface_hub caches them: blobs/<sha256>, snapshots/<commit>/<name> a
    relative link to its blob, refs/main naming the commit."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def tiny_open_clip(monkeypatch, tmp_path) -> Path:
    """A tiny open_clip config with one pretrained tag on the hub; returns its weights file."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY, json.loads(json.dumps(TINY_CFG)))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"tinytag": {"url": "", "hf_hub": TINY_REPO + "/"}})
    torch.manual_seed(0)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(open_clip.create_model(TINY).state_dict(), path)
    return path


def test_hf_hub_references_load_from_the_cache(hub_cache, tiny_clip_path, tiny_clip, tmp_path):
    torch.manual_seed(0)
    net_file = tmp_path / "net.pt"
    save_network(FTI4CIR.for_clip(tiny_clip), net_file)
    put_in_hub_cache(hub_cache, "someone/tiny-clip", {"tiny_clip.pt": tiny_clip_path})
    put_in_hub_cache(hub_cache, "someone/fti4cir", {"checkpoints/epoch_1.pt": net_file})
    clip = load_clip("ViT-L/14", "hf-hub:someone/tiny-clip/tiny_clip.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(x), tiny_clip.encode_image(x), rtol=0, atol=0)
    assert "models--someone--tiny-clip" in str(hub_file("hf-hub:someone/tiny-clip/tiny_clip.pt", "--clip-weights"))
    loaded = load_model("hf-hub:someone/fti4cir/checkpoints/epoch_1.pt", tiny_clip, "cpu")
    want = FTI4CIR.for_clip(tiny_clip)
    want.load_state_dict(torch.load(net_file, weights_only=True)["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), want.state_dict().values()))


def test_hf_hub_reference_not_cached_fails_at_once(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # no network here: the hub does not answer, the same message
    monkeypatch.setattr("hub.HF_HUB_HOST", ("127.0.0.1", 9))  # a port nothing listens on: refused at once
    t = time.time()
    with pytest.raises(HubError) as e:
        load_clip("ViT-L/14", "hf-hub:someone/tiny-clip/tiny_clip.pt")
    msg = str(e.value)
    assert time.time() - t < 5
    assert "hf download someone/tiny-clip tiny_clip.pt" in msg and str(hub_cache) in msg
    assert "models--someone--tiny-clip" in msg and "--clip-weights" in msg
    with pytest.raises(HubError, match="expected hf-hub:OWNER/REPO/FILE"):
        hub_file("hf-hub:someone/tiny-clip", "--model-path")


def test_clip_pretrained_from_the_hub_cache(hub_cache, tiny_open_clip, tmp_path):
    put_in_hub_cache(hub_cache, TINY_REPO, {"open_clip_pytorch_model.bin": tiny_open_clip})
    assert TINY in qualifying_backbones()
    clip = load_clip(TINY, pretrained="tinytag")
    model = open_clip.create_model(TINY)
    model.load_state_dict(torch.load(tiny_open_clip, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(x), model.encode_image(x), atol=1e-5, rtol=1e-5)
    assert (clip.name, clip.pretrained) == (f"{TINY}:tinytag", "tinytag")
    assert FTI4CIR.for_clip(clip).cfg.clip_model == f"{TINY}:tinytag"  # what checkpoints record
    assert clip.fingerprint()["pretrained"] == "tinytag" and f"models--{TINY_REPO.replace('/', '--')}/blobs/" in clip.source
    # the same file without the tag: same weights, another cache key
    plain = load_clip(TINY, tiny_open_clip, clip_format="open_clip")
    assert "pretrained" not in plain.fingerprint() and plain.name == TINY
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    ds = argparse.Namespace(names=["a"], gallery_paths=[tmp_path / "a.png"], preprocess=None, label="one", root=tmp_path)
    keys = {json.dumps(feature_store.gallery_key(c, ds, "fp32"), sort_keys=True) for c in (clip, plain)}
    assert len(keys) == 2
    # --clip-weights FILE --clip-pretrained TAG: the tag's settings, that file
    again = load_clip(TINY, str(tiny_open_clip), pretrained="TinyTag")
    assert again.name == f"{TINY}:tinytag"


def test_clip_pretrained_absent_or_unsuitable_fails_clearly(hub_cache, tiny_open_clip):
    t = time.time()
    with pytest.raises(ClipLoadError) as e:
        load_clip(TINY, pretrained="tinytag")
    assert time.time() - t < 5
    msg = str(e.value)
    assert f"hf download {TINY_REPO} open_clip_pytorch_model.bin" in msg and str(hub_cache) in msg
    assert "--clip-weights FILE --clip-pretrained tinytag" in msg
    with pytest.raises(ClipLoadError, match="its tags: tinytag"):
        load_clip(TINY, pretrained="othertag")
    with pytest.raises(ClipLoadError, match="cannot run over this backbone(.|\n)*ViT-H-14: laion2b_s32b_b79k"):
        load_clip("RN50", pretrained="yfcc15m")


def test_text_width_must_equal_the_embedding_size(tmp_path):
    path = save_tiny_clip(tmp_path / "wide_text.pt", text_width=128)
    with pytest.raises(ClipLoadError, match="text width 128 and embedding size 64(.|\n)*ViT-L-14: openai"):
        load_clip("ViT-L/14", path)


def test_scripts_read_hub_references_from_hf_home(tmp_path, tiny_clip_path, tiny_clip):
    """A fresh process with only HF_HOME pointing at the cache and HF_HUB_OFFLINE=1: evaluate.py loads
    CLIP and the network from hf-hub: references."""
    torch.manual_seed(0)
    net_file = tmp_path / "net.pt"
    save_network(FTI4CIR.for_clip(tiny_clip), net_file)
    cache = tmp_path / "home" / "hub"
    put_in_hub_cache(cache, "someone/tiny-clip", {"tiny_clip.pt": tiny_clip_path})
    put_in_hub_cache(cache, "someone/fti4cir", {"fti4cir.pt": net_file})
    root = make_cirr(tmp_path / "CIRR", np.random.default_rng(0), n_images=8, n_queries=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "src/evaluate.py", "--dataset", "cirr", "--cirr-path", str(root), "--clip-weights",
           "hf-hub:someone/tiny-clip/tiny_clip.pt", "--model-path", "hf-hub:someone/fti4cir/fti4cir.pt", "--device",
           "cpu", "--workers", "0", "--no-progress", "--no-cache", "--save-path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(json.loads((tmp_path / "out" / "metrics_cirr.json").read_text())) == KEYS["cirr"]
    assert "models--someone--fti4cir" in proc.stdout  # the model line names the cached file


def test_scripts_stop_on_an_uncached_model_path(hub_cache, fast_clip, eval_args, tmp_path):
    with pytest.raises(SystemExit) as e:
        evaluate_main(eval_args + ["--dataset", "cirr", "--cirr-path", str(tmp_path), "--model-path",
                                   "hf-hub:someone/fti4cir/fti4cir.pt"])
    msg = str(e.value.code)
    assert msg.startswith("error: --model-path hf-hub:someone/fti4cir/fti4cir.pt") and "\n" not in msg.split(". ")[0]
    assert "hf download someone/fti4cir fti4cir.pt" in msg and str(hub_cache) in msg
