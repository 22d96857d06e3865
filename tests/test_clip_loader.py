"""CLIP loading: OpenAI-format files (state dict, TorchScript), architecture inferred, clear errors,
no hanging offline, the CLI spellings."""
from __future__ import annotations

import time

import pytest
import torch

from cli import FlagParser, add_clip_args
from clip_loader import ClipLoadError, build_openai_model, canonical_model_name, load_clip
from toy.tiny_clip import build_tiny_clip


def test_openai_state_dict_loads_with_inferred_architecture(tiny_clip_path):
    clip = load_clip("ViT-B/32", tiny_clip_path)  # the name does not matter for an OpenAI file
    ref = build_tiny_clip(0).half().float()  # OpenAI files hold fp16 weights; loading keeps those values
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clip.encode_image(x), ref.encode_image(x), atol=1e-5, rtol=1e-5)
    assert (clip.embed_dim, clip.vision_width, clip.text_width, clip.image_size) == (64, 128, 64, 32)
    assert not any(p.requires_grad for p in clip.parameters()) and not clip.training
    clip.train()
    assert not clip.model.training  # stays in eval mode
    # QuickGELU, as OpenAI trained it
    assert "QuickGELU" in type(clip.model.visual.transformer.resblocks[0].mlp.gelu).__name__


def test_fast_openai_build_equals_open_clips_build(tiny_clip_path, monkeypatch):
    import clip_loader

    sd = torch.load(tiny_clip_path, weights_only=True)
    sd["input_resolution"] = torch.tensor(32)  # as OpenAI's TorchScript archives carry it
    built_on = []
    original = clip_loader.build_model_from_openai_state_dict
    monkeypatch.setattr(clip_loader, "build_model_from_openai_state_dict",
                        lambda *a, **k: built_on.append(torch.get_default_device().type) or original(*a, **k))
    fast, plain = build_openai_model(dict(sd)), build_openai_model(dict(sd), fast=False)
    assert built_on == ["meta", "cpu"]  # the fast way really skipped the initialisation
    a, b = fast.state_dict(keep_vars=True), plain.state_dict(keep_vars=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype and type(a[k]) is type(b[k]) for k in a)
    assert [p.requires_grad for p in fast.parameters()] == [p.requires_grad for p in plain.parameters()]
    # the non-persistent causal mask, rebuilt rather than loaded
    buffers = dict(fast.named_buffers()), dict(plain.named_buffers())
    assert buffers[0].keys() == buffers[1].keys() and "attn_mask" in buffers[0]
    assert all(torch.equal(buffers[0][k], buffers[1][k]) for k in buffers[0])
    assert not fast.training and all(p.device.type == "cpu" for p in fast.parameters())
    ids = torch.randint(0, 49408, (2, 77))
    torch.testing.assert_close(fast.encode_text(ids), plain.encode_text(ids), rtol=0, atol=0)


def test_torchscript_archive_loads(tmp_path):
    model = build_tiny_clip(1).half().float()
    traced = torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, 32, 32)}, check_trace=False)
    traced.save(str(tmp_path / "jit.pt"))
    clip = load_clip("ViT-L/14", tmp_path / "jit.pt")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clip.encode_image(x), model.encode_image(x), atol=1e-5, rtol=1e-5)


def test_clear_errors(tmp_path, tiny_clip_path):
    with pytest.raises(ClipLoadError, match="no such file"):
        load_clip("ViT-L/14", tmp_path / "missing.pt")
    data = tiny_clip_path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ClipLoadError, match="cut.pt.*truncated"):
        load_clip("ViT-L/14", tmp_path / "cut.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ClipLoadError, match="other.pt"):
        load_clip("ViT-L/14", tmp_path / "other.pt")
    with pytest.raises(ClipLoadError, match="not a CLIP architecture"):
        canonical_model_name("ViT-Q/99")


def test_a_file_without_clip_weights_is_refused_before_a_model_is_built(tmp_path, tiny_clip, monkeypatch):
    import open_clip

    from checkpoint import save_network
    from models import FTI4CIR

    built = []
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: built.append(1))
    save_network(FTI4CIR.for_clip(tiny_clip), tmp_path / "net.pt")
    with pytest.raises(ClipLoadError, match="net.pt: an FTI4CIR checkpoint, not CLIP weights; pass it as --model-path"):
        load_clip("ViT-L/14", tmp_path / "net.pt")
    torch.save({"epoch": 1, "state_dict": {"module.fc.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ClipLoadError, match="other.pt: holds no CLIP weights"):
        load_clip("ViT-L/14", tmp_path / "other.pt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ClipLoadError, match="cut.safetensors.*a damaged safetensors file"):
        load_clip("ViT-L/14", tmp_path / "cut.safetensors")
    assert not built


def test_offline_without_weights_fails_fast_with_what_to_pass(monkeypatch, tmp_path, hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip here, and nothing in the (empty) hub cache
    t = time.time()
    with pytest.raises(ClipLoadError, match="--clip-weights"):
        load_clip("ViT-L/14")
    assert time.time() - t < 5


def test_cli_spellings():
    p = FlagParser()
    add_clip_args(p)
    assert p.parse_args(["--model", "ViT-B/32"]).clip_model == "ViT-B/32"
    assert p.parse_args(["--clip_model_name", "ViT-L-14"]).clip_model == "ViT-L-14"
    assert p.parse_args(["--clip_weights", "x.pt"]).clip_weights == "x.pt"
    assert p.parse_args([]).clip_model == "ViT-L/14"
    assert canonical_model_name("ViT-L/14") == canonical_model_name("ViT-L-14") == "ViT-L-14"


def test_open_clip_training_checkpoint_loads(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32").half().float()  # the smallest ViT config open_clip names
    sd = {f"module.{k}": v.half() for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "epoch_3.pt")  # open_clip's training format
    clip = load_clip("ViT-S-32", tmp_path / "epoch_3.pt")
    assert clip.name == "ViT-S-32" and "QuickGELU" not in type(clip.model.visual.transformer.resblocks[0].mlp.gelu).__name__
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(x), model.encode_image(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ClipLoadError, match="do not fit --clip-model ViT-B-32|not an open_clip ViT-B-32"):
        load_clip("ViT-B-32", tmp_path / "epoch_3.pt")
