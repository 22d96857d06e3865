"""fti4cir_api and hubconf.py: torch.hub.load from a process with nothing on its path, search ranking a
folder as retrieve.py does (same files, same scores, the gallery from retrieve.py's cache), explain's
pseudo-words against the network's own selection and attention, and one-line errors."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import draw_gallery
from fti4cir_api import FTI4CIRModel, InputError, load
from models import FTI4CIR, select_attributes
from retrieve import main as retrieve_main
from transforms import build_transform

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["is red and a circle instead", "has a striped background"]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return draw_gallery(tmp_path_factory.mktemp("gallery") / "photos")


@pytest.fixture(scope="module")
def model(net_path, tiny_clip):
    from checkpoint import load_network

    return FTI4CIRModel(load_network(net_path)[0], tiny_clip, batch_size=5, workers=0, cache_dir=None, progress=False)


def test_hub_search_equals_retrieve(gallery, net_path, tiny_clip_path, tmp_path):
    """retrieve.py's top 5, then the same queries through torch.hub.load in a fresh process (nothing on its
    path, another working folder), whose index comes from retrieve.py's gallery cache."""
    cache = tmp_path / "cache"
    refs = [str(gallery / "img03.jpg"), str(gallery / "img08.png")]
    argv = ["--clip-weights", str(tiny_clip_path), "--device", "cpu", "--batch-size", "5", "--workers", "0",
            "--no-progress", "--save-path", str(tmp_path / "out"), "--cache-dir", str(cache),
            "--model-path", str(net_path), "--gallery", str(gallery), "--top", "5"]
    for ref, text in zip(refs, TEXTS):
        argv += ["--reference", ref, "--text", text]
    want = retrieve_main(argv)["queries"]
    script = f"""
import json, sys, torch
model = torch.hub.load({str(REPO)!r}, "fti4cir", source="local", checkpoint={str(net_path)!r},
                       clip_weights={str(tiny_clip_path)!r}, device="cpu", batch_size=5, workers=0,
                       cache_dir={str(cache)!r}, progress=False)
index = model.index({str(gallery)!r})
queries = {list(zip(refs, TEXTS))!r}
hits = [model.search(index, reference=r, text=t, top=5) for r, t in queries]
ranked = model.rank(index, queries, top=5).to_dict()["queries"]
print(json.dumps({{"hits": hits, "ranked": ranked, "encoded": model.counters.gallery_images_encoded,
                  "cache_hits": model.counters.cache_hits, "src_on_path": {str(REPO / "src")!r} in sys.path}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["encoded"] == 0 and got["cache_hits"] == 1 and got["src_on_path"]
    assert got["ranked"] == want  # both queries in one batch, as retrieve.py composes them: the same numbers
    for hits, q in zip(got["hits"], want):  # one query at a time: the same ranking, scores to float rounding
        assert [p for p, _ in hits] == [r["path"] for r in q["results"]]
        assert [s for _, s in hits] == pytest.approx([r["score"] for r in q["results"]], abs=2e-6)


def test_search_baselines_and_exclusion(model, gallery):
    index = model.index(gallery)
    assert len(index) == 12 and index.paths[0] == gallery / "img00.jpg"
    ref = str(gallery / "img05.png")
    image_only = model.search(index, ref, "x", top=3, baseline="image-only")
    assert image_only[0][0] == ref and image_only[0][1] == pytest.approx(1.0, abs=1e-5)
    kept = model.search(index, ref, TEXTS[0], top=12)
    left = model.search(index, ref, TEXTS[0], top=12, exclude_reference=True)
    assert len(left) == 11 and [p for p, _ in left] == [p for p, _ in kept if p != ref]
    assert [s for _, s in left] == pytest.approx([s for p, s in kept if p != ref], abs=1e-6)
    scores = [s for _, s in kept]
    assert scores == sorted(scores, reverse=True)
    text_only = model.search(index, ref, TEXTS[0], top=12, baseline="text-only")
    assert text_only != kept and sorted(p for p, _ in text_only) == sorted(p for p, _ in kept)


def _attention_rows(net, P: torch.Tensor) -> torch.Tensor:
    """[B, K, N] the last attribute layer's attention from each template to each patch token, heads averaged,
    computed layer by layer from the module's weights (not through the API)."""
    ext = net.attributes
    K = ext.templates.shape[0]
    x = torch.cat([ext.templates.expand(P.shape[0], -1, -1), P], dim=1)
    for layer in ext.layers[:-1]:
        x = layer(x)
    attn = ext.layers[-1].attn
    h = ext.layers[-1].norm1(x)
    B, M, W = h.shape
    H, d = attn.heads, W // attn.heads
    q = attn.q_proj(h).view(B, M, H, d).permute(0, 2, 1, 3)
    k = attn.kv_proj(h).view(B, M, 2, H, d)[:, :, 0].permute(0, 2, 1, 3)
    w = torch.softmax(torch.einsum("bhmd,bhnd->bhmn", q, k) / d ** 0.5, dim=-1).mean(dim=1)
    return w[:, :K, K + 1:]


def test_explain_matches_the_network(tiny_clip, gallery):
    with torch.no_grad():
        _check_explain(tiny_clip, gallery)


def _check_explain(tiny_clip, gallery):
    torch.manual_seed(3)
    net = FTI4CIR.for_clip(tiny_clip, tf_head=2).eval()  # two heads: the maps average them
    model = FTI4CIRModel(net, tiny_clip, batch_size=2, workers=0, cache_dir=None, progress=False)
    paths = [str(gallery / f"img{i:02d}.{'png' if i % 3 else 'jpg'}") for i in (1, 3, 4)]
    got = model.explain(paths, words=4)
    assert model.explain(paths[1], words=4).sentence("x") == got[1].sentence("x")

    pre = build_transform("targetpad", tiny_clip.image_size)
    images = torch.stack([pre(Image.open(p)) for p in paths])
    g, P = tiny_clip.encode_visual(images)
    A = net.attributes(P)
    A_sel, r = select_attributes(A, g, net.cfg.topk, net.cfg.epsilon)
    scores = torch.softmax(torch.einsum("bke,be->bk", A, g), dim=-1)
    v_a = net.phi_a(A_sel)
    rows = _attention_rows(net, P)
    grid = int(round((P.shape[1] - 1) ** 0.5))
    vocab = F.normalize(tiny_clip.model.token_embedding.weight, dim=-1)
    assert (r > 1).any()
    for b, e in enumerate(got):
        assert e.r == int(r[b]) and e.reference == paths[b]
        templates = [a.template for a in e.attributes]
        assert templates == sorted(templates)
        # the words are the network's first r selected rows, their templates the ones those rows come from
        assert torch.allclose(F.normalize(A[b, templates], dim=-1), A_sel[b, :e.r], atol=1e-6)
        assert torch.allclose(torch.stack([a.vector for a in e.attributes]), v_a[b, :e.r], atol=1e-5)
        assert torch.allclose(e.subject.vector, net.phi_s(g)[b], atol=1e-5)
        assert [a.score for a in e.attributes] == pytest.approx(scores[b, templates].tolist(), abs=1e-6)
        assert torch.allclose(e.scores, scores[b], atol=1e-6)
        assert all(a.score > net.cfg.epsilon for a in e.attributes) or e.r == 1
        for a in e.attributes:
            assert a.patch_map.shape == (grid, grid)
            assert float(a.patch_map.sum()) == pytest.approx(1.0, abs=1e-5)
            want = rows[b, a.template] / rows[b, a.template].sum()
            assert torch.allclose(a.patch_map.flatten(), want, atol=1e-5)
        # nearest tokens: cosine in the token-embedding space, best first, start/end tokens left out
        sims = F.normalize(e.subject.vector, dim=0) @ vocab.T
        sims[[tiny_clip.prompts.sot, tiny_clip.prompts.eot]] = -2
        assert len(e.subject.nearest) == 4 and e.subject.nearest[0][1] == pytest.approx(float(sims.max()), abs=1e-4)
        assert e.sentence("is red").startswith(f"a photo of [{e.subject.word}] with [{e.attributes[0].word}]")
        assert e.sentence("is red").endswith(" but is red") and e.view.size == (tiny_clip.image_size,) * 2


def test_one_line_errors(model, gallery, net_path, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    index = model.index(gallery)
    ref = str(gallery / "img01.png")
    cases = [
        (lambda: model.index(tmp_path / "nowhere"), "no such folder"),
        (lambda: model.index(tmp_path / "empty"), "holds no images"),
        (lambda: model.search(index, tmp_path / "broken.png", "is red"), "cannot be read as an image"),
        (lambda: model.explain(str(tmp_path / "broken.png")), "cannot be read as an image"),
        (lambda: model.search(index, tmp_path / "missing.png", "is red"), "no such file"),
        (lambda: model.search(index, ref, "  "), "is empty"),
        (lambda: model.search(index, ref, "x", top=0), "top=0"),
        (lambda: model.search(index, ref, "x", baseline="both"), "baseline='both'"),
        (lambda: FTI4CIRModel(None, model.clip, cache_dir=None).search(index, ref, "x"), "without a checkpoint"),
        (lambda: load(tmp_path / "nope.pt", "x.pt"), "checkpoint="),
    ]
    for call, words in cases:
        with pytest.raises(InputError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value)


def test_hubconf_refuses_a_clashing_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("fti4cir_hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert {"torch", "open_clip"} <= set(hubconf.dependencies)
    other = types.ModuleType("metrics")
    other.__file__ = "/elsewhere/metrics.py"
    monkeypatch.setitem(sys.modules, "metrics", other)
    with pytest.raises(ImportError, match=r"metrics \(/elsewhere/metrics.py\)"):
        hubconf.fti4cir(checkpoint="x.pt")


def test_explain_refuses_an_ablation_in_one_line(tiny_clip, gallery):
    model = FTI4CIRModel(FTI4CIR.for_clip(tiny_clip, ablation="no-attributes"), tiny_clip, cache_dir=None, workers=0,
                         progress=False)
    with pytest.raises(InputError, match="ablation 'no-attributes'"):
        model.explain(sorted(gallery.iterdir())[0])
