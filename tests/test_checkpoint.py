"""Checkpoints: this repo's round trip, the authors' pickled module (built here with stand-in classes
under their module names), refusals and clear errors."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

from checkpoint import CheckpointError, load_network, read_authors_checkpoint, save_network
from convert_official_checkpoint import main as convert_main
from models import FTI4CIR, FTI4CIRConfig

CFG = dict(embed_dim=16, vision_width=24, text_width=16, num_k=6, topk=3, epsilon=0.07, temperature=0.3, reg_weight=1.1,
           tf_layer=2, tf_head=1)


def _authors_modules():
    """Throw-away modules `i2t_model` and `MHTransformer` with classes shaped like the authors'."""
    i2t, mht = types.ModuleType("i2t_model"), types.ModuleType("MHTransformer")

    class MultiHeadAttention(nn.Module):
        def __init__(self, w, h):
            super().__init__()
            self.num_heads = h
            self.to_queries = nn.Linear(w, w, bias=False)
            self.to_keys_values = nn.Linear(w, 2 * w, bias=False)
            self.project = nn.Linear(w, w)
            self.dropout = nn.Dropout(0.0)

    class MlpTransformer(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.fc1, self.fc2, self.dropout = nn.Linear(w, 2 * w), nn.Linear(2 * w, w), nn.Dropout(0.0)
            self.act = torch.nn.functional.relu

    class TransformerLayer(nn.Module):
        def __init__(self, w, h):
            super().__init__()
            self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(w), MultiHeadAttention(w, h), nn.LayerNorm(w), MlpTransformer(w)

    class Transformer(nn.Module):
        def __init__(self, w, h, n):
            super().__init__()
            self.layers = nn.ModuleList(TransformerLayer(w, h) for _ in range(n))

    class Phi(nn.Module):
        def __init__(self, d, e):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.5), nn.Linear(4 * d, 4 * d), nn.GELU(),
                                        nn.Dropout(0.5), nn.Linear(4 * d, e))

    class IMG2TEXT(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.num_k, self.topk, self.epsilon = c["num_k"], c["topk"], c["epsilon"]
            self.hy_regLoss, self.temperature = c["reg_weight"], c["temperature"]
            self.criterion_target = torch.tensor([1.0])
            self.templates = nn.Parameter(torch.randn(1, c["num_k"], c["vision_width"]))
            self.phi_s, self.phi_a = Phi(c["embed_dim"], c["text_width"]), Phi(c["embed_dim"], c["text_width"])
            self.local_atte_fc = nn.Sequential(nn.Linear(c["vision_width"], c["text_width"]), nn.Sigmoid())
            self.cosine_criterion, self.ortho_loss = nn.CosineEmbeddingLoss(), nn.MSELoss()
            self.transformer = Transformer(c["vision_width"], c["tf_head"], c["tf_layer"])

    for cls, mod in ((MultiHeadAttention, mht), (MlpTransformer, mht), (TransformerLayer, mht), (Transformer, mht),
                     (Phi, i2t), (IMG2TEXT, i2t)):
        cls.__module__ = mod.__name__
        cls.__qualname__ = cls.__name__
        setattr(mod, cls.__name__, cls)
    return i2t, mht


@pytest.fixture
def authors_file(tmp_path, monkeypatch):
    i2t, mht = _authors_modules()
    monkeypatch.setitem(sys.modules, "i2t_model", i2t)
    monkeypatch.setitem(sys.modules, "MHTransformer", mht)
    torch.manual_seed(0)
    model = i2t.IMG2TEXT(CFG)
    path = tmp_path / "authors.pt"
    torch.save(model, path)
    monkeypatch.delitem(sys.modules, "i2t_model")  # loading must not need their code
    monkeypatch.delitem(sys.modules, "MHTransformer")
    return path, model


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    net = FTI4CIR(FTI4CIRConfig(**CFG))
    save_network(net, tmp_path / "c.pt", epoch=3)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # a plain dict of tensors and numbers
    assert raw["format"] == "fti4cir" and raw["config"]["num_k"] == 6
    back, info = load_network(tmp_path / "c.pt")
    assert info["epoch"] == 3 and back.cfg == net.cfg and not back.training
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_load_network_reports_the_clip_a_checkpoint_records(tmp_path):
    torch.manual_seed(0)
    net = FTI4CIR(FTI4CIRConfig(**CFG))
    save_network(net, tmp_path / "t.pt", global_step=7, clip_fingerprint="0123456789abcdef",
                 hparams={"clip_source": "openai:/clips/ViT-L-14.pt"})
    _, info = load_network(tmp_path / "t.pt")
    assert (info["global_step"], info["clip_fingerprint"], info["clip_source"]) == (
        7, "0123456789abcdef", "openai:/clips/ViT-L-14.pt")
    save_network(net, tmp_path / "plain.pt")  # a network alone: nothing recorded, nothing reported
    _, info = load_network(tmp_path / "plain.pt")
    assert not {"global_step", "clip_fingerprint", "clip_source"} & set(info)


def test_authors_checkpoint_maps_every_weight(authors_file, tmp_path):
    path, model = authors_file
    net, info = load_network(path)
    assert info["format"] == "authors"
    cfg = net.cfg
    assert (cfg.num_k, cfg.topk, cfg.epsilon, cfg.temperature, cfg.reg_weight, cfg.tf_layer, cfg.tf_head, cfg.mlp_ratio) == \
        (6, 3, 0.07, 0.3, 1.1, 2, 1, 2.0)
    theirs, ours = model.state_dict(), net.state_dict()
    assert torch.equal(ours["attributes.templates"], theirs["templates"][0])
    assert torch.equal(ours["attributes.head.weight"], theirs["local_atte_fc.0.weight"])
    assert torch.equal(ours["attributes.layers.1.attn.kv_proj.weight"], theirs["transformer.layers.1.attn.to_keys_values.weight"])
    assert torch.equal(ours["attributes.layers.0.fc2.bias"], theirs["transformer.layers.0.mlp.fc2.bias"])
    assert torch.equal(ours["phi_a.layers.6.weight"], theirs["phi_a.layers.6.weight"])
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in theirs.values())
    # the converter writes this repo's format with the same weights
    convert_main([str(path), str(tmp_path / "converted.pt")])
    conv, info = load_network(tmp_path / "converted.pt")
    assert info["format"] == "fti4cir"
    for k, v in ours.items():
        assert torch.equal(conv.state_dict()[k], v)


def test_unknown_class_in_pickle_is_refused(tmp_path, monkeypatch):
    i2t, mht = _authors_modules()
    monkeypatch.setitem(sys.modules, "i2t_model", i2t)
    monkeypatch.setitem(sys.modules, "MHTransformer", mht)
    model = i2t.IMG2TEXT(CFG)
    model.evil = nn.Bilinear(2, 2, 2)  # a class outside the allowed set
    torch.save(model, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load torch\.nn\.modules\.linear\.Bilinear"):
        read_authors_checkpoint(tmp_path / "bad.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"i2t_model": Payload()}, tmp_path / "payload.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load (__builtin__|builtins)\.print"):
        read_authors_checkpoint(tmp_path / "payload.pt")


def test_clear_errors(tmp_path, authors_file):
    with pytest.raises(CheckpointError, match="no such file"):
        load_network(tmp_path / "missing.pt")
    path, _ = authors_file
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_network(tmp_path / "truncated.pt")
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "clip.pt")  # another model's weights
    with pytest.raises(CheckpointError, match="not an FTI4CIR checkpoint"):
        load_network(tmp_path / "clip.pt")
    net = FTI4CIR(FTI4CIRConfig(**CFG))
    save_network(net, tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    raw["state_dict"]["phi_s.layers.0.weight"] = torch.zeros(3, 3)
    torch.save(raw, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"phi_s.layers.0.weight has shape \(3, 3\)"):
        load_network(tmp_path / "shape.pt")
    with pytest.raises(SystemExit, match="no such file"):
        convert_main([str(tmp_path / "nope.pt"), str(tmp_path / "out.pt")])
