"""evaluate.py / test.py / evaluation.py / features.py: full runs (generated annotations, and a subset of the real
ones) with a tiny CLIP and a tiny network over generated images; metrics and submission lists
against a plain-loop recomputation; the gallery cache; baselines; clear errors on bad input."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import features
import metrics as M
from checkpoint import save_network
from datasets import CIRRDataset, FashionIQDataset, combine_text_features, load_image
from evaluate import main as evaluate_main
from evaluation import EvalConfig, evaluate, retrieve, submission_files
from features import Counters, Encoding
from models import FTI4CIR, FTI4CIRConfig
from transforms import build_transform

REPO = Path(__file__).resolve().parents[1]
# src/test.py would collide with the standard library's `test` package under its plain name
_spec = importlib.util.spec_from_file_location("fti4cir_test_script", REPO / "src" / "test.py")
test_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_script)

# The keys of the authors' metrics files, written out here independently of evaluate.py.
KEYS = {
    "fashioniq": ["dress_10", "dress_50", "shirt_10", "shirt_50", "toptee_10", "toptee_50", "average_10", "average_50"],
    "cirr": ["cirr_recall_at1", "cirr_recall_at5", "cirr_recall_at10", "cirr_recall_at50",
             "cirr_group_recall_at1", "cirr_group_recall_at2", "cirr_group_recall_at3"],
    "circo": ["circo_map_at5", "circo_map_at10", "circo_map_at25", "circo_map_at50",
              "circo_recall_at5", "circo_recall_at10", "circo_recall_at25", "circo_recall_at50"],
}
ROOT_FLAG = {"fashioniq": "--fashioniq-path", "cirr": "--cirr-path", "circo": "--circo-path"}
WORDS = "red blue dog cat two three bigger smaller remove add shirt sleeves darker brighter outdoor wooden".split()
SIZES = [(40, 30), (32, 32), (26, 44), (36, 20)]


# ---------------------------------------------------------------------------------------------
# generated data

def _image(path: Path, rng: np.random.Generator) -> None:
    """A small noise image (every image distinct, so no two gallery features tie)."""
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _caption(rng) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_cirr(root: Path, split: str, names: list[str], queries: list[dict], rng) -> None:
    """CIRR layout for `split` (val -> dev/): the split file, the captions, an image per name."""
    folder = {"val": "dev", "test1": "test1"}[split]
    _dump({n: f"./{folder}/{n}.png" for n in names}, root / "cirr" / "image_splits" / f"split.rc2.{split}.json")
    _dump(queries, root / "cirr" / "captions" / f"cap.rc2.{split}.json")
    for n in names:
        _image(root / folder / f"{n}.png", rng)


def make_cirr(root: Path, rng, n_images: int = 60, n_queries: int = 12) -> Path:
    for split, prefix in (("val", "dev"), ("test1", "test1")):
        names = [f"{prefix}-{i}-0-img{i % 2}" for i in range(n_images)]
        queries = []
        for q in range(n_queries):
            members = [names[j] for j in rng.choice(n_images, size=6, replace=False)]
            e = {"pairid": 1000 + q, "reference": members[0], "caption": _caption(rng),
                 "img_set": {"id": q, "members": list(rng.permutation(members))}}
            if split == "val":
                e["target_hard"] = members[1]
            queries.append(e)
        write_cirr(root, split, names, queries, rng)
    return root


def write_circo(root: Path, ids: list[int], queries: dict[str, list[dict]], rng) -> None:
    _dump({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]},
          root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    for split, entries in queries.items():
        _dump(entries, root / "annotations" / f"{split}.json")
    for i in ids:
        _image(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg", rng)


def make_circo(root: Path, rng, n_images: int = 54, n_queries: int = 8) -> Path:
    ids = [int(x) for x in rng.choice(10**6, size=n_images, replace=False)]
    queries = {"val": [], "test": []}
    for split in queries:
        for q in range(n_queries):
            pick = [ids[j] for j in rng.choice(n_images, size=1 + int(rng.integers(2, 6)), replace=False)]
            e = {"id": q, "reference_img_id": pick[0], "relative_caption": _caption(rng), "shared_concept": _caption(rng)}
            if split == "val":
                gts = pick[1:]
                e.update(target_img_id=gts[0], gt_img_ids=gts + [""] * (6 - len(gts)))  # the authors' padding
            queries[split].append(e)
    write_circo(root, ids, queries, rng)
    return root


def write_fashioniq(root: Path, cat: str, names: list[str], queries: list[dict], rng) -> None:
    _dump(names, root / "image_splits" / f"split.{cat}.val.json")
    _dump(queries, root / "captions" / f"cap.{cat}.val.json")
    for n in set(names) | {q["candidate"] for q in queries}:
        _image(root / cat / f"{n}.jpg", rng)


def make_fashioniq(root: Path, rng, n_images: int = 16, n_queries: int = 6) -> Path:
    for cat in ("dress", "shirt", "toptee"):
        names = [f"B{cat[:2].upper()}{i:06d}" for i in range(n_images)]
        queries = [{"candidate": names[a], "target": names[b], "captions": [_caption(rng) + ".", _caption(rng)]}
                   for a, b in (rng.choice(n_images, size=2, replace=False) for _ in range(n_queries))]
        write_fashioniq(root, cat, names, queries, rng)
    return root


MAKERS = {"cirr": make_cirr, "circo": make_circo, "fashioniq": make_fashioniq}


# subsets of the real annotation files, with placeholder images --------------------------------

def _read(path: Path):
    return json.loads(path.read_text())


def real_cirr_subset(real: Path, root: Path, rng, n_queries: int = 12, n_images: int = 56) -> Path:
    for split in ("val", "test1"):
        split_map = _read(real / "CIRR" / "cirr" / "image_splits" / f"split.rc2.{split}.json")
        queries = _read(real / "CIRR" / "cirr" / "captions" / f"cap.rc2.{split}.json")[:n_queries]
        used = {n for q in queries for n in [q["reference"], q.get("target_hard"), *q["img_set"]["members"]] if n}
        names = [n for n in split_map if n in used] + [n for n in split_map if n not in used][:max(0, n_images - len(used))]
        folder = {"val": "dev", "test1": "test1"}[split]
        assert all(split_map[n] == f"./{folder}/{n}.png" for n in names)  # the real layout, reproduced
        write_cirr(root, split, names, queries, rng)
    return root


def real_circo_subset(real: Path, root: Path, rng, n_queries: int = 8, n_extra: int = 20) -> Path:
    queries = {s: _read(real / "CIRCO" / "annotations" / f"{s}.json")[:n_queries] for s in ("val", "test")}
    used = sorted({i for es in queries.values() for e in es
                   for i in [e["reference_img_id"], *e.get("gt_img_ids", [])] if i != ""})
    extra = [int(x) for x in rng.choice(10**6, size=n_extra, replace=False) if int(x) not in used]
    write_circo(root, used + extra, queries, rng)
    return root


def real_fashioniq_subset(real: Path, root: Path, rng, n_queries: int = 5, n_gallery: int = 16) -> Path:
    for cat in ("dress", "shirt", "toptee"):
        queries = _read(real / "FashionIQ" / "captions" / f"cap.{cat}.val.json")[:n_queries]
        split = _read(real / "FashionIQ" / "image_splits" / f"split.{cat}.val.json")
        used = {n for q in queries for n in (q["candidate"], q["target"])}
        names = [n for n in split if n in used] + [n for n in split if n not in used][:n_gallery - len(used)]
        write_fashioniq(root, cat, names, queries, rng)
    return root


REAL_SUBSETS = {"cirr": real_cirr_subset, "circo": real_circo_subset, "fashioniq": real_fashioniq_subset}


# ---------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("generated")
    return {name: make(base / name, np.random.default_rng(i)) for i, (name, make) in enumerate(MAKERS.items())}


@pytest.fixture(scope="module")
def net_path(tiny_clip, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("net") / "fti4cir.pt"
    save_network(FTI4CIR.for_clip(tiny_clip), path)
    return path


@pytest.fixture(scope="module")
def net(net_path):
    from checkpoint import load_network

    return load_network(net_path, "cpu")[0]


@pytest.fixture
def base_args(tiny_clip_path, tmp_path) -> list[str]:
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
    seen = Counters()
    real = features.encode_gallery

    def spy(clip, dataset, encoding, keep=None):
        seen.gallery_images_encoded += len(dataset)
        return real(clip, dataset, encoding, keep)

    monkeypatch.setattr(features, "encode_gallery", spy)
    return seen


def config(cache_dir=None, reference_tokens=False, baseline=None, split="val", batch_size=7, counters=None):
    encoding = Encoding(batch_size=batch_size, workers=0, device="cpu", progress=False, counters=counters or Counters())
    return EvalConfig(split=split, encoding=encoding, cache_dir=cache_dir, reference_tokens=reference_tokens,
                      baseline=baseline)


def _args(base, dataset, root, *more) -> list[str]:
    return [*base, "--dataset", dataset, ROOT_FLAG[dataset], str(root), *more]


# ---------------------------------------------------------------------------------------------
# checks of the output files

def check_metrics(metrics: dict, dataset: str, path: Path) -> None:
    assert list(metrics) == KEYS[dataset]
    assert all(isinstance(v, float) and 0.0 <= v <= 100.0 for v in metrics.values())
    assert json.loads(path.read_text()) == metrics
    if dataset == "fashioniq":
        for k in (10, 50):
            assert metrics[f"average_{k}"] == pytest.approx(np.mean([metrics[f"{c}_{k}"] for c in ("dress", "shirt", "toptee")]))


def check_submission(dataset: str, root: Path, save: Path) -> None:
    """The files are complete and pass the server checks, verified here without the validators too."""
    pre = build_transform("targetpad", 32)
    if dataset == "cirr":
        ds = CIRRDataset(root, "test1", "query", pre)
        sub = json.loads((save / "cirr" / "cirr.json").read_text())
        subset = json.loads((save / "cirr" / "subset_cirr.json").read_text())
        M.validate_cirr_submission(sub, subset, ds.queries, CIRRDataset(root, "test1", "gallery", pre).names)
        assert (sub["version"], sub["metric"], subset["metric"]) == ("rc2", "recall", "recall_subset")
        assert set(sub) - {"version", "metric"} == {str(q["pair_id"]) for q in ds.queries} == set(subset) - {"version", "metric"}
        for q in ds.queries:
            top, three = sub[str(q["pair_id"])], subset[str(q["pair_id"])]
            assert len(set(top)) == 50 and len(set(three)) == 3
            assert q["reference_name"] not in top and q["reference_name"] not in three
            assert set(three) <= set(q["group_members"])
    else:
        from datasets import CIRCODataset

        ds = CIRCODataset(root, "test", "query", pre)
        sub = json.loads((save / "circo" / "circo.json").read_text())
        gallery = set(CIRCODataset(root, "test", "gallery", pre).names)
        M.validate_circo_submission(sub, ds.queries, gallery)
        assert set(sub) == {str(q["query_id"]) for q in ds.queries}
        assert all(len(set(v)) == 50 and set(v) <= gallery for v in sub.values())


def _full_run(dataset, root, base, net_path, save: Path, encoded: Counters) -> None:
    base = [a for a in base if a != "--no-cache"] + ["--cache-dir", str(save / "cache")]
    metrics = evaluate_main(_args(base, dataset, root, "--model-path", str(net_path)))
    check_metrics(metrics, dataset, save / f"metrics_{dataset}.json")
    before = encoded.gallery_images_encoded
    out = test_script.main(_args(base, dataset, root, "--model-path", str(net_path)))
    if dataset == "fashioniq":  # no test server: the validation metrics, as the authors' test.py
        assert out == metrics
    else:
        check_submission(dataset, root, save)
    if dataset != "cirr":  # the same galleries (FashionIQ val; CIRCO val and test): served by the cache
        assert encoded.gallery_images_encoded == before


@pytest.mark.parametrize("dataset", ["fashioniq", "cirr", "circo"])
def test_full_run_generated(dataset, data, base_args, net_path, tmp_path, encoded):
    _full_run(dataset, data[dataset], base_args, net_path, tmp_path / "out", encoded)
    if dataset == "fashioniq":  # 16 images a category, every target among them: all in the top 50
        m = json.loads((tmp_path / "out" / "metrics_fashioniq.json").read_text())
        assert [m[f"{c}_50"] for c in ("dress", "shirt", "toptee")] == [100.0] * 3


def test_full_run_real_annotations(real_annotations, base_args, net_path, tmp_path, encoded):
    """The real annotation files (a subset of queries, their images and some more), placeholder images."""
    for i, (dataset, make) in enumerate(REAL_SUBSETS.items()):
        root = make(real_annotations, tmp_path / dataset, np.random.default_rng(10 + i))
        _full_run(dataset, root, base_args, net_path, tmp_path / "out", encoded)


# ---------------------------------------------------------------------------------------------
# the same numbers from a plain loop over single images

def _encode(clip, path: Path, tokens: bool = False):
    x = build_transform("targetpad", clip.image_size)(load_image(path))[None]
    return clip.encode_visual(x) if tokens else F.normalize(clip.encode_image(x), dim=-1)[0]


def _compose(net, clip, g, P, text: str) -> torch.Tensor:
    """One reference image's composed-query feature, L2-normalised."""
    return combine_text_features(net.compose(clip, g, P, [(text,)]))[0]


@torch.no_grad()
def brute_force_cirr(clip, net, root: Path, split: str):
    """(gallery names, per-query rankings over the gallery without the reference, per-query member
    rankings without the reference, queries), each feature computed image by image."""
    folder = {"val": "dev", "test1": "test1"}[split]
    names = list(_read(root / "cirr" / "image_splits" / f"split.rc2.{split}.json"))
    gallery = {n: _encode(clip, root / folder / f"{n}.png") for n in names}
    queries = _read(root / "cirr" / "captions" / f"cap.rc2.{split}.json")
    full, members = [], []
    for q in queries:
        g, P = _encode(clip, root / folder / f"{q['reference']}.png", tokens=True)
        f = _compose(net, clip, g, P, q["caption"])
        sim = {n: float(f @ v) for n, v in gallery.items()}
        full.append([n for n in sorted(names, key=lambda n: -sim[n]) if n != q["reference"]])
        members.append([n for n in sorted(q["img_set"]["members"], key=lambda n: -sim[n]) if n != q["reference"]])
    return names, full, members, queries


@pytest.mark.parametrize("n_images", [60, 20])
def test_cirr_metrics_and_submission_match_plain_loop(n_images, data, tiny_clip, net, tmp_path, capsys):
    """60 images: the real-size path (50-name lists); 20: a toy gallery, whose lists hold all 19 other
    names, as the authors' `[:50]` slice of a shorter ranking gives (with a warning)."""
    root = data["cirr"] if n_images == 60 else make_cirr(tmp_path / "small", np.random.default_rng(5), n_images, 5)
    _, full, members, queries = brute_force_cirr(tiny_clip, net, root, "val")
    expected = {f"cirr_recall_at{k}": 100 * np.mean([q["target_hard"] in r[:k] for q, r in zip(queries, full)])
                for k in (1, 5, 10, 50)}
    expected.update({f"cirr_group_recall_at{k}": 100 * np.mean([q["target_hard"] in r[:k] for q, r in zip(queries, members)])
                     for k in (1, 2, 3)})
    net.train()  # evaluate() must switch dropout off and give the mode back
    got = evaluate(net, tiny_clip, "cirr", root, config(batch_size=5))
    assert net.training
    net.eval()
    assert got == pytest.approx(expected, abs=1e-4)  # float32 means, as the authors' code takes them
    assert 0 < expected["cirr_recall_at10"] < 100 or 0 < expected["cirr_group_recall_at1"] < 100  # not a trivial case

    _, full, members, queries = brute_force_cirr(tiny_clip, net, root, "test1")
    capsys.readouterr()
    files = submission_files("cirr", retrieve(net, tiny_clip, "cirr", root, config(split="test1")))
    sub, subset = files["cirr.json"], files["subset_cirr.json"]
    assert ("warning" in capsys.readouterr().out) == (n_images <= 50)
    assert len(sub) == len(subset) == len(queries) + 2
    for q, r, m in zip(queries, full, members):
        assert len(sub[str(q["pairid"])]) == min(50, n_images - 1)
        assert sub[str(q["pairid"])] == r[:50]
        assert subset[str(q["pairid"])] == m[:3]


@torch.no_grad()
def test_circo_metrics_match_plain_loop(data, tiny_clip, net):
    root = data["circo"]
    info = _read(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")["images"]
    folder = root / "COCO2017_unlabeled" / "unlabeled2017"
    gallery = {str(im["id"]): _encode(tiny_clip, folder / im["file_name"]) for im in info}
    ap = {k: [] for k in (5, 10, 25, 50)}
    rec = {k: [] for k in (5, 10, 25, 50)}
    for q in _read(root / "annotations" / "val.json"):
        g, P = _encode(tiny_clip, folder / f"{q['reference_img_id']:012d}.jpg", tokens=True)
        f = _compose(net, tiny_clip, g, P, q["relative_caption"])
        ranking = sorted(gallery, key=lambda n: -float(f @ gallery[n]))[:50]
        gts = [str(x) for x in q["gt_img_ids"] if x != ""]
        rel = [n in gts for n in ranking]
        for k in ap:
            hits = [sum(rel[:j + 1]) / (j + 1) for j in range(k) if rel[j]]
            ap[k].append(sum(hits) / min(len(gts), k))
            rec[k].append(str(q["target_img_id"]) in ranking[:k])
    expected = {f"circo_map_at{k}": 100 * np.mean(v) for k, v in ap.items()}
    expected.update({f"circo_recall_at{k}": 100 * np.mean(v) for k, v in rec.items()})
    got = evaluate(net, tiny_clip, "circo", root, config(batch_size=4))
    assert got == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# baselines

@torch.no_grad()
def test_baselines(fast_clip, data, tiny_clip, base_args, tmp_path):
    root = data["cirr"]
    for baseline in ("image-only", "text-only"):
        m = evaluate_main(_args(base_args, "cirr", root, "--baseline", baseline))  # no --model-path
        check_metrics(m, "cirr", tmp_path / "out" / f"metrics_cirr_{baseline.replace('-', '_')}.json")
    pre = build_transform("targetpad", tiny_clip.image_size)
    ds = CIRRDataset(root, "val", "query", pre)
    enc = Encoding(batch_size=5, workers=0, device="cpu", progress=False)
    img = features.query_features(None, tiny_clip, ds, enc, baseline="image-only")
    txt = features.query_features(None, tiny_clip, ds, enc, baseline="text-only")
    for i in (0, len(ds) - 1):
        q = ds.queries[i]
        assert torch.allclose(img[i], _encode(tiny_clip, root / "dev" / f"{q['reference_name']}.png"), atol=1e-5)
        t = F.normalize(tiny_clip.encode_text(tiny_clip.tokenize([q["relative_caption"]])), dim=-1)[0]
        assert torch.allclose(txt[i], t, atol=1e-5)
    # FashionIQ text-only: the two caption orders, each normalised, averaged, normalised
    fq = FashionIQDataset(data["fashioniq"], "val", ["shirt"], "query", pre)
    txt = features.query_features(None, tiny_clip, fq, Encoding(batch_size=3, workers=0, device="cpu", progress=False),
                                  baseline="text-only")
    c1, c2 = fq.queries[4]["relative_captions"]
    a, b = c1.strip(".?, "), c2.strip(".?, ")
    f = F.normalize(tiny_clip.encode_text(tiny_clip.tokenize([f"{a.capitalize()} and {b}", f"{b} and {a}"])), dim=-1)
    assert torch.allclose(txt[4], F.normalize(f.mean(0), dim=0), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the gallery cache

def test_gallery_cache(fast_clip, data, tiny_clip, tmp_path, base_args, net_path, capsys, encoded):
    from feature_store import EvalCache

    root = tmp_path / "CIRR"
    shutil.copytree(data["cirr"], root)
    cache = tmp_path / "cache"
    c = encoded
    n_gallery = len(_read(root / "cirr" / "image_splits" / "split.rc2.val.json"))

    def encoded(fn):
        before = c.gallery_images_encoded
        capsys.readouterr()
        out = fn()
        return out, c.gallery_images_encoded - before, capsys.readouterr().out

    # through the script: another checkpoint recomputes only the query side
    args = [a for a in base_args if a != "--no-cache"] + ["--cache-dir", str(cache)]
    torch.manual_seed(1)
    other_net = tmp_path / "other_net.pt"
    save_network(FTI4CIR.for_clip(tiny_clip), other_net)
    first, n, _ = encoded(lambda: evaluate_main(_args(args, "cirr", root, "--model-path", str(net_path))))
    assert n == n_gallery and len(list(cache.iterdir())) == 1
    second, n, log = encoded(lambda: evaluate_main(_args(args, "cirr", root, "--model-path", str(other_net))))
    assert n == 0 and "gallery cache: hit" in log and second != first  # same gallery, other queries

    # the gallery function itself
    pre = build_transform("targetpad", tiny_clip.image_size)
    gallery = lambda: CIRRDataset(root, "val", "gallery", pre)  # noqa: E731
    run = lambda precision="fp32", cache_dir=cache: features.gallery_features(  # noqa: E731
        tiny_clip, gallery(), Encoding(batch_size=16, workers=0, device="cpu", precision=precision, progress=False),
        EvalCache(cache_dir) if cache_dir else None)
    got, n, _ = encoded(run)
    names, feats = got.names, got.features
    assert n == 0 and names == gallery().names
    got, n, _ = encoded(lambda: run(cache_dir=None))
    assert n == n_gallery and torch.equal(feats, got.features)

    # a changed gallery list: stale, recomputed, overwritten
    split_file = root / "cirr" / "image_splits" / "split.rc2.val.json"
    split = _read(split_file)
    split["dev-extra-0-img0"] = "./dev/dev-extra-0-img0.png"
    _image(root / "dev" / "dev-extra-0-img0.png", np.random.default_rng(99))
    _dump(split, split_file)
    got, n, log = encoded(run)
    names, feats = got.names, got.features
    assert n == n_gallery + 1 and "stale" in log and "names_sha256" in log and len(names) == len(feats) == n_gallery + 1
    _, n, _ = encoded(run)
    assert n == 0

    # an image replaced under the same name: stale
    _image(root / "dev" / "dev-extra-0-img0.png", np.random.default_rng(100))
    got, n, log = encoded(run)
    assert n == n_gallery + 1 and "images_sha256" in log and not torch.equal(got.features[-1], feats[-1])

    # a foreign file where the cache should be, then a corrupt one: detected, recomputed
    (path,) = cache.iterdir()
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path / "meta.json")
    _, n, log = encoded(run)
    assert n == n_gallery + 1 and "not used (its meta.json is missing or unreadable)" in log
    (path / "features.npy").write_bytes(b"garbage")
    _, n, log = encoded(run)
    assert n == n_gallery + 1 and "features.npy is not a .npy file" in log
    _, n, _ = encoded(run)
    assert n == 0

    # another precision has its own entry; no cache dir neither reads nor writes
    _, n, _ = encoded(lambda: run("bf16"))
    assert n == n_gallery + 1 and len(list(cache.iterdir())) == 2


# ---------------------------------------------------------------------------------------------
# bad input

def _error(argv, *needles) -> str:
    with pytest.raises(SystemExit) as e:
        evaluate_main(argv)
    msg = str(e.value.code)
    for n in needles:
        assert n in msg, msg
    assert "Traceback" not in msg
    return msg


def test_missing_root(base_args, net_path, tmp_path):
    _error(_args(base_args, "cirr", tmp_path / "nowhere", "--model-path", str(net_path)), str(tmp_path / "nowhere"), "--cirr-path")
    with pytest.raises(SystemExit) as e:
        test_script.main(_args(base_args, "circo", tmp_path / "nowhere", "--model-path", str(net_path)))
    assert "--circo-path" in str(e.value.code)


def test_missing_and_corrupt_images(fast_clip, data, base_args, net_path, tmp_path):
    root = tmp_path / "CIRR"
    shutil.copytree(data["cirr"], root)
    victim = root / "dev" / f"{next(iter(_read(root / 'cirr' / 'image_splits' / 'split.rc2.val.json')))}.png"
    victim.unlink()
    _error(_args(base_args, "cirr", root, "--model-path", str(net_path)), str(victim), "not found")
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    argv = _args(base_args, "cirr", root, "--model-path", str(net_path))
    argv[argv.index("--workers") + 1] = "1"  # raised in a worker process: still one clear line
    _error(argv, str(victim), "cannot decode")


def test_bad_checkpoints(fast_clip, data, base_args, net_path, tiny_clip_path, tmp_path):
    root = data["cirr"]
    _error(_args(base_args, "cirr", root, "--model-path", str(tiny_clip_path)), "not an FTI4CIR checkpoint")
    _error(_args(base_args, "cirr", root, "--model-path", str(tmp_path / "missing.pt")), "missing.pt", "no such file")
    _error(_args(base_args, "cirr", root), "--model-path is required")
    other = tmp_path / "other.pt"  # a network built for a CLIP of other sizes
    save_network(FTI4CIR(FTI4CIRConfig(embed_dim=32, vision_width=48, text_width=32)), other)
    _error(_args(base_args, "cirr", root, "--model-path", str(other)), "does not fit")


def test_bad_precision_and_annotations(fast_clip, data, base_args, net_path, tmp_path):
    _error(_args(base_args, "cirr", data["cirr"], "--model-path", str(net_path), "--precision", "fp16"), "fp16", "cpu")
    root = tmp_path / "CIRR"
    shutil.copytree(data["cirr"], root)
    (root / "cirr" / "captions" / "cap.rc2.val.json").unlink()
    _error(_args(base_args, "cirr", root, "--model-path", str(net_path)), "cap.rc2.val.json")


def test_authors_flag_spellings(fast_clip, data, tiny_clip_path, net_path, tmp_path):
    out = tmp_path / "authors"
    m = evaluate_main(["--dataset", "cirr", "--CIRR_path", str(data["cirr"]), "--model_path", str(net_path),
                       "--clip-weights", str(tiny_clip_path), "--num_workers", "0", "--preprocess_type", "targetpad",
                       "--save_path", str(out), "--device", "cpu", "--no_cache", "--no-progress"])
    check_metrics(m, "cirr", out / "metrics_cirr.json")


@torch.no_grad()
@pytest.mark.parametrize("baseline", [None, "image-only"])
def test_shared_references_are_encoded_once(baseline, tiny_clip, net, tmp_path):
    """Queries that share a reference image: one visual pass per distinct reference, and every
    query's feature equal to a plain per-query computation (batches cut across the groups)."""
    rng = np.random.default_rng(11)
    root = tmp_path / "cirr"
    names = [f"dev-{i}-0-img0" for i in range(20)]
    refs = [names[i] for i in (3, 3, 7, 3, 9, 7, 7, 7, 12, 3, 9)]  # 11 queries, 4 references
    queries = [{"pairid": 500 + k, "reference": r, "caption": _caption(rng), "target_hard": names[k + 1],
                "img_set": {"id": k, "members": [r] + [n for n in names if n != r][k:k + 5]}} for k, r in enumerate(refs)]
    write_cirr(root, "val", names, queries, rng)
    ds = CIRRDataset(root, "val", "query", build_transform("targetpad", tiny_clip.image_size))
    enc = Encoding(batch_size=3, workers=0, device="cpu", progress=False)
    got = features.query_features(net, tiny_clip, ds, enc, baseline=baseline)
    assert enc.counters.query_images_encoded == 4
    assert [q["pair_id"] for q in ds.queries] == [q["pairid"] for q in queries]
    for k, q in enumerate(queries):
        g, P = _encode(tiny_clip, root / "dev" / f"{q['reference']}.png", tokens=True)
        f = F.normalize(g, dim=-1)[0] if baseline else _compose(net, tiny_clip, g, P, q["caption"])
        torch.testing.assert_close(got[k], f, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_reference_tokens_from_the_gallery_pass(data, tiny_clip, net, tmp_path):
    """--cache-reference-tokens: the queries take their references' tower outputs from the gallery
    pass (cold), then from the cache (warm: no image at all), with the same features as the plain path."""
    root, cache = data["cirr"], tmp_path / "cache"
    plain = retrieve(net, tiny_clip, "cirr", root, config())
    names, g, q_plain, queries = plain.names, plain.gallery.features, plain.query_features, plain.queries
    n_refs = len({x["reference_name"] for x in queries})
    runs = []
    for _ in range(2):  # cold, then warm
        c = Counters()
        out = retrieve(net, tiny_clip, "cirr", root, config(cache_dir=cache, reference_tokens=True, counters=c))
        runs.append(c)
        assert out.names == names
        torch.testing.assert_close(out.gallery.features, g)
        torch.testing.assert_close(out.query_features, q_plain, atol=1e-6, rtol=1e-5)
    cold, warm = runs
    assert cold.gallery_images_encoded == len(names) and cold.query_images_encoded == 0
    assert warm.gallery_images_encoded == 0 and warm.query_images_encoded == 0 and warm.token_cache_hits == 1
    # gallery cached but no token file yet (deleted): one pass over the references alone
    for f in cache.glob("*-refs-*"):
        shutil.rmtree(f)
    c = Counters()
    out = retrieve(net, tiny_clip, "cirr", root, config(cache_dir=cache, reference_tokens=True, counters=c))
    assert c.gallery_images_encoded == n_refs
    torch.testing.assert_close(out.query_features, q_plain, atol=1e-6, rtol=1e-5)
    # the image-only baseline from tokens is the reference's own gallery embedding
    img = retrieve(None, tiny_clip, "cirr", root, config(cache_dir=cache, reference_tokens=True, baseline="image-only"))
    index = {n: i for i, n in enumerate(names)}
    torch.testing.assert_close(img.query_features, img.gallery.features[[index[x["reference_name"]] for x in queries]],
                               atol=1e-6, rtol=1e-5)
