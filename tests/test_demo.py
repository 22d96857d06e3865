"""The embedded default: toy layouts load in every dataset class; a shortened demo runs end to end
and its outputs are valid; the chance levels it prints are right."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import demo
from datasets import CIRCODataset, CIRRDataset, FashionIQDataset, ImageNetPairsDataset, collate
from evaluation import METRIC_KEYS
from examples import grid_size
from toy.world import make_toy_world
from metrics import validate_circo_submission, validate_cirr_submission
from transforms import build_transform


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_world(tmp_path_factory.mktemp("toy") / "world", seed=3, num_train_images=12, num_queries=4,
                          num_distractors=4)


def test_toy_world_folder_gets_the_umask_permissions(toy):
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert toy.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def _check(ds, n_expected, image_key):
    assert len(ds) == n_expected > 0
    batch = collate([ds[0], ds[len(ds) - 1]])
    assert batch[image_key].shape == (2, 3, 32, 32)


def test_toy_layouts_load_in_every_dataset_class(toy):
    tf = build_transform("targetpad", 32)
    for split in ("train", "val", "test"):
        for cat in ("dress", "shirt", "toptee"):
            names = json.loads((toy / "FashionIQ" / "image_splits" / f"split.{cat}.{split}.json").read_text())
            caps = json.loads((toy / "FashionIQ" / "captions" / f"cap.{cat}.{split}.json").read_text())
            _check(FashionIQDataset(toy / "FashionIQ", split, [cat], "gallery", tf), len(names), "image")
            _check(FashionIQDataset(toy / "FashionIQ", split, [cat], "query", tf), len(caps), "reference_image")
    for split, file in (("train", "train"), ("val", "val"), ("test1", "test1")):
        names = json.loads((toy / "CIRR" / "cirr" / "image_splits" / f"split.rc2.{file}.json").read_text())
        caps = json.loads((toy / "CIRR" / "cirr" / "captions" / f"cap.rc2.{file}.json").read_text())
        _check(CIRRDataset(toy / "CIRR", split, "gallery", tf), len(names), "image")
        _check(CIRRDataset(toy / "CIRR", split, "query", tf), len(caps), "reference_image")
    info = json.loads((toy / "CIRCO" / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").read_text())
    for split in ("val", "test"):
        queries = json.loads((toy / "CIRCO" / "annotations" / f"{split}.json").read_text())
        _check(CIRCODataset(toy / "CIRCO", split, "gallery", tf), len(info["images"]), "image")
        _check(CIRCODataset(toy / "CIRCO", split, "query", tf), len(queries), "reference_image")
    pairs = json.loads((toy / "ImageNet" / "pairs.json").read_text())
    _check(ImageNetPairsDataset(toy / "ImageNet", toy / "ImageNet" / "pairs.json", tf), len(pairs), "image")


def test_ap_chance_equals_enumeration():
    # every placement of n relevant items among G positions is equally likely under a random ranking
    for G, n, K in ((6, 2, 3), (7, 3, 5), (5, 1, 5), (8, 4, 2)):
        total, count = 0.0, 0
        for rel in itertools.combinations(range(G), n):
            hits, ap = 0, 0.0
            for j in range(1, K + 1):
                if j - 1 in rel:
                    hits += 1
                    ap += hits / j
            total += ap / min(n, K)
            count += 1
        assert demo.ap_chance(K, n, G) == pytest.approx(100 * total / count)
    assert demo.recall_chance(10, 40) == 25.0 and demo.recall_chance(50, 40) == 100.0


SHORT = ["--epochs", "1", "--batch-size", "8", "--num-train-images", "16", "--num-queries", "4", "--num-cirr-queries", "6",
         "--num-fashioniq-queries", "4", "--num-distractors", "20", "--examples", "2"]


def _check_summary(summary, out):
    """The summary holds every method on every benchmark with the metric files' keys, a spread beside
    each figure, and the query counts; what it reports matches the files written."""
    assert list(summary["metrics"]) == ["fti4cir", "image-only", "text-only", "chance"]
    for method in summary["metrics"]:
        assert list(summary["metrics"][method]) == list(METRIC_KEYS) == list(summary["spread"][method])
        for name, keys in METRIC_KEYS.items():
            values, spread = summary["metrics"][method][name], summary["spread"][method][name]
            assert list(values) == keys == list(spread), (method, name)
            assert all(0.0 <= v <= 100.0 for v in values.values())
            assert all(0.0 <= e <= 50.0 for e in spread.values())
    for method, suffix in (("fti4cir", ""), ("image-only", "_image_only"), ("text-only", "_text_only")):
        for name in METRIC_KEYS:  # every method was evaluated on every benchmark by evaluate.py
            assert json.loads((out / "eval" / f"metrics_{name}{suffix}.json").read_text()) == summary["metrics"][method][name]
    counts = summary["queries"]
    assert counts == {"fashioniq": {"dress": 4, "shirt": 4, "toptee": 4}, "cirr": 6, "circo": 4}
    p = summary["metrics"]["fti4cir"]["cirr"]["cirr_recall_at1"] / 100
    assert summary["spread"]["fti4cir"]["cirr"]["cirr_recall_at1"] == pytest.approx(100 * (p * (1 - p) / 6) ** 0.5)
    assert {(v["benchmark"], v["metric"], v["baseline"]) for v in summary["headline"]} == {
        (b, m, base) for b, ms in demo.HEADLINE.items() for m in ms for base in ("image-only", "text-only")}
    hits = summary["examples"]["target_in_top"]
    assert list(hits) == ["fashioniq_dress", "fashioniq_shirt", "fashioniq_toptee", "cirr", "circo"]
    assert all(len(h) == 2 for h in hits.values())
    assert list(summary["examples"]["top_rate_percent"]) == list(hits)
    _check_kinds(summary, out)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))


def _check_kinds(summary, out):
    """Recall per kind of change: every method on CIRR and FashionIQ; the CIRR rows hold the queries that the
    annotations and the manifest's records say, counted here from the files; "all" is evaluate.py's figure."""
    by_kind = summary["recall_by_kind"]
    assert list(by_kind) == ["grouping", "cirr", "fashioniq"] and isinstance(by_kind["grouping"], str)
    manifest = json.loads((out / "data" / "toy_manifest.json").read_text())
    recs = manifest["images"]["CIRR"]
    expected = {}
    for cap in json.loads((out / "data" / "CIRR" / "cirr" / "captions" / "cap.rc2.val.json").read_text()):
        ref, tgt = recs[cap["reference"]], recs[cap["target_hard"]]
        for a in ("colour", "shape", "size", "pattern", "background"):
            expected[a] = expected.get(a, 0) + (ref[a] != tgt[a])
    for bench, n in (("cirr", 6), ("fashioniq", 12)):
        assert list(by_kind[bench]) == ["fti4cir", "image-only", "text-only"]
        for method, table in by_kind[bench].items():
            assert table["all"]["queries"] == n
            assert sum(e["queries"] for label, e in table.items() if label.endswith(("change", "changes"))) == n
            assert all(0.0 <= e[f"recall_at{k}"] <= 100.0 for e in table.values() for k in (1, 5, 10))
            if bench == "cirr":
                assert {a: e["queries"] for a, e in table.items() if a in expected} == {a: c for a, c in expected.items() if c}
                for k in (1, 5, 10):
                    assert table["all"][f"recall_at{k}"] == pytest.approx(summary["metrics"][method]["cirr"][f"cirr_recall_at{k}"])


def test_spreads_of_a_method():
    counts = {"fashioniq": {"dress": 100, "shirt": 25, "toptee": 4}, "cirr": 16, "circo": 9}
    metrics = {"fashioniq": {"dress_10": 50.0, "shirt_10": 20.0, "toptee_10": 0.0, "average_10": 70 / 3},
               "cirr": {"cirr_recall_at1": 50.0}, "circo": {"circo_map_at5": 10.0}}
    se = demo.spreads(metrics, counts)
    assert se["cirr"]["cirr_recall_at1"] == pytest.approx(12.5)  # sqrt(.25 / 16)
    assert se["circo"]["circo_map_at5"] == pytest.approx(10.0)  # sqrt(.1 * .9 / 9), the Bhatia-Davis bound
    assert se["fashioniq"]["toptee_10"] == 0.0
    assert se["fashioniq"]["average_10"] == pytest.approx((5.0 ** 2 + 8.0 ** 2) ** 0.5 / 3)
    assert list(se["fashioniq"]) == list(metrics["fashioniq"])
    # per-query values: the standard error of their mean; 0/1 hits give the binomial figure again
    per_query = {"circo": {"circo_map_at5": [0.5, 0.5, 0.1, 0.1], "circo_recall_at5": [0.0, 1.0, 1.0, 0.0]}}
    metrics = {"circo": {"circo_map_at5": 30.0, "circo_recall_at5": 50.0}}
    se = demo.spreads(metrics, {"circo": 4}, per_query)
    assert se["circo"]["circo_map_at5"] == pytest.approx(100 * (0.04 / 4) ** 0.5)  # variance 0.04, not .3 * .7
    binomial = demo.spreads(metrics, {"circo": 4})["circo"]["circo_recall_at5"]
    assert se["circo"]["circo_recall_at5"] == pytest.approx(25.0) == pytest.approx(binomial)


def plain_top_rates(summary: dict, run: Path) -> dict[str, float]:
    """The percent of each grid split's validation queries with a target in their top 5, a query at a time:
    its similarity to every gallery image, the reference left out on CIRR, the five best names."""
    net, clip = demo.load_models(summary["checkpoint"], "ViT-L/14", summary["clip_weights"], "cpu")
    rates = {}
    for label, r in demo.fti4cir_retrievals(run / "data", net, clip, run / "cache").items():
        hits = 0
        for i, q in enumerate(r.queries):
            sims = r.gallery.features @ r.query_features[i]
            if label == "cirr":
                sims[r.names.index(q["reference_name"])] = -float("inf")
            best = {r.names[j] for j in sims.argsort(descending=True)[:5].tolist()}
            targets = set(q.get("gt_img_ids") or []) | {q.get("target_name")}
            hits += bool(best & targets)
        rates[label] = 100.0 * hits / len(r.queries)
    return rates


def test_short_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    summary = demo.main(["--out", str(out), "--toy-clip-steps", "3", "--num-web-images", "64"] + SHORT)
    assert (out / "clip" / "toy_clip.pt").is_file() and summary["clip_weights"] == str(out / "clip" / "toy_clip.pt")
    assert set(summary["toy_clip"]["recall"]) >= {"image_to_text_r1", "text_to_image_r1"}
    assert (out / "model" / "checkpoints" / "epoch_1.pt").is_file()
    assert (out / "model" / "hyperparameters.json").is_file()
    assert any((out / "model" / "tensorboard").iterdir())
    _check_summary(summary, out)
    for name, keys in METRIC_KEYS.items():
        assert set(summary["metrics"]["chance"][name]) == set(keys)
    data = out / "data"
    circo_q = CIRCODataset(data / "CIRCO", "test", "query", lambda im: im).queries
    circo_g = CIRCODataset(data / "CIRCO", "test", "gallery", lambda im: im).names
    validate_circo_submission(json.loads((out / "submissions" / "circo" / "circo.json").read_text()), circo_q, circo_g)
    cirr = json.loads((out / "submissions" / "cirr" / "cirr.json").read_text())
    subset = json.loads((out / "submissions" / "cirr" / "subset_cirr.json").read_text())
    cirr_q = CIRRDataset(data / "CIRR", "test1", "query", lambda im: im).queries
    gallery = CIRRDataset(data / "CIRR", "test1", "gallery", lambda im: im).names
    if len(gallery) > 50:
        validate_cirr_submission(cirr, subset, cirr_q, gallery)
    else:  # a toy gallery this small gives every other name, reference excluded
        assert all(len(cirr[str(q["pair_id"])]) == len(gallery) - 1 for q in cirr_q)
        assert all(q["reference_name"] not in cirr[str(q["pair_id"])] for q in cirr_q)
        assert all(set(subset[str(q["pair_id"])]) <= set(q["group_members"]) for q in cirr_q)
    assert summary["examples"]["top_rate_percent"] == pytest.approx(plain_top_rates(summary, out))
    pngs = sorted((out / "eval" / "examples").glob("*.png"))
    assert [p.name for p in pngs] == ["examples_circo_val.png", "examples_cirr_val.png", "examples_fashioniq_dress_val.png",
                                      "examples_fashioniq_shirt_val.png", "examples_fashioniq_toptee_val.png"]
    with Image.open(pngs[1]) as im:
        assert im.size == grid_size(2, 5)  # 2 queries x (reference + text + top 5)
    # a rerun replaces the folder cleanly; a folder the demo did not make is refused
    (out / "stray.txt").write_text("x")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not made by the demo"):
        demo.main(["--out", str(other)])
    assert (other / "keep.txt").exists()


def test_a_folder_the_demo_did_not_make_is_refused_in_one_error_line(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(other)])
    assert str(e.value) == f"error: --out {other} exists and was not made by the demo; pass another --out"
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    # a step that fails: one error line naming the step, the step's own message without a second prefix
    log = tmp_path / "demo.log"
    with pytest.raises(SystemExit) as e:
        demo.run("scripts/check_data.py", ["--workers", "0"], log)
    assert str(e.value) == f"error: demo step scripts/check_data.py failed (--workers must be >= 1); full output in {log}"


def test_short_demo_over_a_given_clip_file(tmp_path, tiny_clip_path):
    out = tmp_path / "demo"
    summary = demo.main(["--out", str(out), "--clip-weights", str(tiny_clip_path), "--ablations"] + SHORT)
    assert not (out / "clip").exists() and summary["toy_clip"] is None  # no toy CLIP trained
    # --ablations: both trained with their flag, recorded in their checkpoints, evaluated on every benchmark
    assert set(summary["ablations"]) == {"subject-only", "attributes-only"} and set(summary["metrics"]) == set(demo.METHODS)
    for label, flag in (("subject-only", "no-attributes"), ("attributes-only", "no-subject")):
        entry = summary["ablations"][label]
        assert torch.load(entry["checkpoint"], weights_only=True)["config"]["ablation"] == flag
        for name, keys in METRIC_KEYS.items():
            assert list(entry["metrics"][name]) == keys and set(entry["spread"][name]) == set(keys)
            written = json.loads((out / "eval" / label / f"metrics_{name}.json").read_text())
            assert {k: written[k] for k in keys} == entry["metrics"][name]
    assert summary["clip_weights"] == str(tiny_clip_path.resolve())
    _check_summary(summary, out)
    log = (out / "demo.log").read_text()
    assert "make_toy_clip.py" not in log and f"--clip-weights {tiny_clip_path.resolve()}" in log
