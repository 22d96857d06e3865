"""The toy world of scripts/make_toy_data.py: real layouts and JSON shapes, determinism, truthful texts,
clean reruns; and the placeholder images written for the real annotation files."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import make_toy_data
from helpers import parse_garment_text, parse_scene_text
from toy.attributes import COLOURS, FASHIONIQ_CATEGORIES, GARMENT_FITS, KINDS
from toy.captions import GARMENT_NOUNS
from toy.drawing import GARMENT_BACKDROP, graphic_ink
from toy.placeholders import make_placeholder_images, write_circo_image_info
from toy.world import MANIFEST_NAME, make_toy_world
from toy.writers import CIRCO_SPLITS, CIRR_SPLITS, FASHIONIQ_SPLITS

SMALL = {"num_train_images": 6, "num_queries": 3, "num_distractors": 2}
WORLD_SIZES = {"num_cirr_queries": 10}  # CIRR's count apart from CIRCO's (8): two sets, one of them partly asked
SCENE_KEYS = ("shape", "colour", "background", "pattern", "size")
GARMENT_KEYS = ("colour", "pattern", "print", "variant", "fit")
CIRR_NAME = re.compile(r"(train|dev|test1)-\d+-\d+-img[01]")
CIRR_PATH = re.compile(r"\./(dev|test1|train/\d+)/(?P<name>[^/]+)\.png")


def load(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    return make_toy_world(tmp_path_factory.mktemp("toy") / "toy", seed=0, **WORLD_SIZES)


@pytest.fixture(scope="session")
def manifest(world) -> dict:
    return load(world / MANIFEST_NAME)


# --------------------------------------------------------------------------------------------
# What an image shows (the readers of the texts, parse_scene_text and parse_garment_text, are in helpers.py)

def attrs(record: dict, keys=SCENE_KEYS) -> dict:
    return {k: record[k] for k in keys}


def nearest_colour(rgb) -> str:
    names = list(COLOURS)
    d = np.abs(np.array([COLOURS[n] for n in names]) - np.asarray(rgb, dtype=float)).sum(1)
    return names[int(d.argmin())]


def check_scene_image(path: Path, record: dict) -> None:
    img = Image.open(path)
    assert img.size == tuple(record["canvas"])
    a = np.asarray(img.convert("RGB")).astype(int)
    cx, cy = record["center"]
    assert nearest_colour(a[cy, cx]) == record["colour"], f"{path}: the object's colour is not {record['colour']}"
    assert nearest_colour(a[1, 1]) == record["background"], f"{path}: the background is not {record['background']}"
    whole_bg = a[:, :6].reshape(-1, 3)  # the left strip never holds the object; 30 allows JPEG ringing from it
    assert (np.abs(whole_bg - whole_bg[0]).max() <= 30) == (record["pattern"] == "plain"), \
        f"{path}: background pattern is not {record['pattern']}"


# --------------------------------------------------------------------------------------------
# Layouts, references, shapes


def _image_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")}


def test_every_referenced_file_exists_and_every_image_is_referenced(world):
    referenced: set[Path] = set()
    # ImageNet
    pairs = load(world / "ImageNet" / "pairs.json")
    for p in pairs:
        referenced.add(world / "ImageNet" / "test" / f"ILSVRC2012_test_{p['img_id']}.JPEG")
    assert [p["img_id"] for p in pairs] == [f"{i:08d}" for i in range(1, len(pairs) + 1)]
    # FashionIQ
    fiq = world / "FashionIQ"
    for cat in FASHIONIQ_CATEGORIES:
        for split in FASHIONIQ_SPLITS:
            names = load(fiq / "image_splits" / f"split.{cat}.{split}.json")
            assert len(set(names)) == len(names)
            referenced |= {fiq / cat / f"{n}.jpg" for n in names}
            for q in load(fiq / "captions" / f"cap.{cat}.{split}.json"):
                assert q["candidate"] in names and q.get("target", q["candidate"]) in names
    # CIRR
    cirr = world / "CIRR"
    for split in CIRR_SPLITS:
        smap = load(cirr / "cirr" / "image_splits" / f"split.rc2.{split}.json")
        for name, rel in smap.items():
            m = CIRR_PATH.fullmatch(rel)
            assert m and m["name"] == name and m.group(1).split("/")[0] == CIRR_SPLITS[split], rel
            referenced.add(cirr / rel[2:])
        for q in load(cirr / "cirr" / "captions" / f"cap.rc2.{split}.json"):
            assert {q["reference"], *q["img_set"]["members"], q.get("target_hard", q["reference"])} <= set(smap)
    # CIRCO
    circo = world / "CIRCO"
    info = load(circo / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    ids = {im["id"] for im in info["images"]}
    assert len(ids) == len(info["images"])
    referenced |= {circo / "COCO2017_unlabeled" / "unlabeled2017" / im["file_name"] for im in info["images"]}
    for split in CIRCO_SPLITS:
        for q in load(circo / "annotations" / f"{split}.json"):
            assert {q["reference_img_id"], *q.get("gt_img_ids", [])} <= ids

    missing = sorted(str(p) for p in referenced if not p.is_file())
    assert not missing, missing[:5]
    assert _image_files(world) == referenced, "image files that no annotation names"


def _schemas(entries) -> set:
    """The key -> type-name map of every entry (and of its img_set), as a set of frozen forms."""
    out = set()
    for e in entries:
        out.add(tuple(sorted((k, type(v).__name__) for k, v in e.items())))
        if "img_set" in e:
            out.add(("img_set",) + tuple(sorted((k, type(v).__name__) for k, v in e["img_set"].items())))
    return out


def _value_types(entries, key) -> set:
    types = set()
    for e in entries:
        v = e[key]
        items = v.items() if isinstance(v, dict) else enumerate(v)
        types |= {(type(k).__name__ if isinstance(v, dict) else "idx", type(x).__name__) for k, x in items}
    return types


def test_json_shapes_match_the_real_files(world, real_annotations):
    # FashionIQ: captions and split lists, every category and split
    for cat in FASHIONIQ_CATEGORIES:
        for split in FASHIONIQ_SPLITS:
            real = load(real_annotations / "FashionIQ" / "captions" / f"cap.{cat}.{split}.json")
            toy = load(world / "FashionIQ" / "captions" / f"cap.{cat}.{split}.json")
            assert _schemas(toy) == _schemas(real), (cat, split)
            assert _value_types(toy, "captions") == _value_types(real, "captions") == {("idx", "str")}
            assert {len(q["captions"]) for q in toy} == {len(q["captions"]) for q in real} == {2}
            real_names = load(real_annotations / "FashionIQ" / "image_splits" / f"split.{cat}.{split}.json")
            toy_names = load(world / "FashionIQ" / "image_splits" / f"split.{cat}.{split}.json")
            for names in (real_names, toy_names):
                assert isinstance(names, list) and all(re.fullmatch(r"[0-9A-Z]{10}", n) for n in names)
            assert all(n.startswith("B0") for n in toy_names)
    # CIRR: val and test1 against the real ones; train (no real captions here) against val
    cirr_real = real_annotations / "CIRR" / "cirr"
    for split, real_split in (("val", "val"), ("test1", "test1"), ("train", "val")):
        real = load(cirr_real / "captions" / f"cap.rc2.{real_split}.json")
        toy = load(world / "CIRR" / "cirr" / "captions" / f"cap.rc2.{split}.json")
        assert _schemas(toy) == _schemas(real), split
        for entries in (real, toy):
            assert {len(q["img_set"]["members"]) for q in entries} == {6}
            assert all(all(isinstance(m, str) and CIRR_NAME.fullmatch(m) for m in q["img_set"]["members"]) for q in entries)
        if "target_soft" in real[0]:
            assert _value_types(toy, "target_soft") <= _value_types(real, "target_soft")
    for split in CIRR_SPLITS:
        real = load(cirr_real / "image_splits" / f"split.rc2.{split}.json")
        toy = load(world / "CIRR" / "cirr" / "image_splits" / f"split.rc2.{split}.json")
        for smap in (real, toy):  # the real paths follow the pattern the toy one is checked against
            assert isinstance(smap, dict)
            assert all(CIRR_NAME.fullmatch(k) and CIRR_PATH.fullmatch(v)["name"] == k for k, v in smap.items())
    # CIRCO
    for split in CIRCO_SPLITS:
        real = load(real_annotations / "CIRCO" / "annotations" / f"{split}.json")
        toy = load(world / "CIRCO" / "annotations" / f"{split}.json")
        assert _schemas(toy) == _schemas(real), split
        if split == "val":
            assert _value_types(toy, "gt_img_ids") == _value_types(real, "gt_img_ids") == {("idx", "int")}
    info = load(world / "CIRCO" / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    assert {"info", "licenses", "images"} <= set(info)
    for im in info["images"]:
        assert isinstance(im["id"], int) and im["file_name"] == f"{im['id']:012d}.jpg"
        assert isinstance(im["width"], int) and isinstance(im["height"], int)
    # ImageNet pairs (METHOD §8 format)
    for p in load(world / "ImageNet" / "pairs.json"):
        assert set(p) == {"img_id", "subject", "attribute"} and all(isinstance(v, str) for v in p.values())
        assert re.fullmatch(r"\d{8}", p["img_id"])


# --------------------------------------------------------------------------------------------
# Texts tell the truth about the images


def test_imagenet_pairs_describe_their_images(world, manifest):
    records = manifest["images"]["ImageNet"]
    pairs = load(world / "ImageNet" / "pairs.json")
    assert len(pairs) == len(records) == manifest["sizes"]["num_train_images"]
    canvases, kinds = set(), set()
    for p in pairs:
        rec = records[p["img_id"]]
        path = world / "ImageNet" / "test" / f"ILSVRC2012_test_{p['img_id']}.JPEG"
        assert p["subject"] != p["attribute"]
        kinds.add(rec["kind"])
        if rec["kind"] == "scene":
            assert parse_scene_text(p["subject"]) == attrs(rec, ("shape", "colour", "size"))
            # a background named without a pattern ("on an orange background") is a plain one
            assert {"pattern": "plain", **parse_scene_text(p["attribute"])} == attrs(rec, ("background", "pattern"))
            assert p["subject"].split()[-1] == rec["shape"]  # subject = words up to the first noun
            check_scene_image(path, rec)
        else:  # ImageNet holds clothes too: "a loose long red dress" + "with stripes"
            # a garment without a graphic is not said to lack one ("a loose long red dress with stripes")
            said = {"print": "none", **parse_garment_text(rec["kind"], f"{p['subject']} {p['attribute']}")}
            assert said == attrs(rec, GARMENT_KEYS)
            assert p["subject"].split()[-1] == GARMENT_NOUNS[rec["kind"]][0]
            check_garment_image(path, rec)
        canvases.add(tuple(rec["canvas"]))
    assert kinds == set(KINDS)
    ratios = {max(w, h) / min(w, h) for w, h in canvases}
    assert any(r >= 1.25 for r in ratios) and any(r < 1.25 for r in ratios), "targetpad should be both on and off"


def test_cirr_modifications_lead_from_reference_to_target(world, manifest):
    records = manifest["images"]["CIRR"]
    for split in CIRR_SPLITS:
        smap = load(world / "CIRR" / "cirr" / "image_splits" / f"split.rc2.{split}.json")
        caps = load(world / "CIRR" / "cirr" / "captions" / f"cap.rc2.{split}.json")
        assert len(caps) == manifest["sizes"]["num_cirr_queries"]
        for name, rel in smap.items():
            check_scene_image(world / "CIRR" / rel[2:], records[name])
        for q in caps:
            target = q["target_hard"] if split != "test1" else manifest["hidden_targets"]["CIRR"]["test1"][str(q["pairid"])]
            ref = attrs(records[q["reference"]])
            changes = parse_scene_text(q["caption"])
            assert changes and all(ref[k] != v for k, v in changes.items()), q["caption"]
            wanted = {**ref, **changes}
            assert attrs(records[target]) == wanted, (q["caption"], ref, records[target])
            assert [n for n in smap if attrs(records[n]) == wanted] == [target]  # the only right answer
            members = q["img_set"]["members"]
            assert len(set(members)) == 6 and q["reference"] in members and target in members
            if split != "test1":
                assert q["target_soft"][target] == 1.0
                assert q["img_set"]["target_rank"] != q["img_set"]["reference_rank"]
        pairids = [q["pairid"] for q in caps]
        assert len(set(pairids)) == len(pairids)


def test_fashioniq_captions_lead_from_candidate_to_target(world, manifest):
    hidden = manifest["hidden_targets"]["FashionIQ"]
    both_partial = 0
    for cat in FASHIONIQ_CATEGORIES:
        records = manifest["images"]["FashionIQ"][cat]
        for split in FASHIONIQ_SPLITS:
            gallery = load(world / "FashionIQ" / "image_splits" / f"split.{cat}.{split}.json")
            caps = load(world / "FashionIQ" / "captions" / f"cap.{cat}.{split}.json")
            targets = hidden[cat]["test"] if split == "test" else [q["target"] for q in caps]
            assert len(targets) == len(caps) == manifest["sizes"]["num_fashioniq_queries"]
            for q, target in zip(caps, targets):
                ref, tgt = attrs(records[q["candidate"]], GARMENT_KEYS), attrs(records[target], GARMENT_KEYS)
                assert ref != tgt
                parsed = [parse_garment_text(cat, c) for c in q["captions"]]
                for c, p in zip(q["captions"], parsed):  # each caption tells only the truth about the target
                    assert p and all(tgt[k] == v for k, v in p.items()), (cat, c, ref, tgt)
                # each names some changes, as FashionIQ's annotators do; together they name every one
                assert {**ref, **parsed[0], **parsed[1]} == tgt, (cat, q["captions"], ref, tgt)
                both_partial += all({**ref, **p} != tgt for p in parsed)
                assert [n for n in gallery if attrs(records[n], GARMENT_KEYS) == tgt] == [target]
    assert both_partial > 0  # queries where neither caption alone leads to the target exist


def check_garment_image(path: Path, rec: dict) -> float:
    """The garment's colour and pattern show; returns its cloth area relative to the canvas."""
    img = Image.open(path)
    assert img.size == tuple(rec["canvas"])
    a = np.asarray(img.convert("RGB")).astype(int)
    cloth = np.abs(a - np.array(GARMENT_BACKDROP)).max(-1) > 40
    inner = cloth.copy()  # one pixel in from the outline, where JPEG blends cloth and backdrop
    inner[1:-1, 1:-1] &= cloth[:-2, 1:-1] & cloth[2:, 1:-1] & cloth[1:-1, :-2] & cloth[1:-1, 2:]
    below = a[rec["center"][1]:][inner[rec["center"][1]:]]  # the cloth under the centre: a graphic sits above it
    ink = np.abs(a - np.array(graphic_ink(rec["colour"]))).max(-1) <= 40
    # most of the cloth shows the garment's own colour (a pattern's bands or dots take the rest)
    on_base = np.abs(a[inner & ~ink] - np.array(COLOURS[rec["colour"]])).max(-1) <= 30
    assert on_base.mean() > 0.4, (path, rec, on_base.mean())
    off_base = (np.abs(below - np.array(COLOURS[rec["colour"]])).max(-1) > 30).mean()
    assert (off_base > 0.05) == (rec["pattern"] != "solid"), (path, rec, off_base)
    # a graphic: a patch of ink (black or yellow, neither a pattern's tint) on the chest, and nowhere else
    ink_rows = np.nonzero(ink.any(1))[0]
    assert (ink.sum() > 40) == (rec["print"] == "graphic"), (path, rec, int(ink.sum()))
    if rec["print"] == "graphic":
        assert ink_rows.max() < rec["center"][1], (path, rec)
    w, h = rec["canvas"]
    return cloth.sum() / (min(w, h) * h)


def test_fashioniq_images_show_their_attributes(world, manifest):
    areas: dict = {}
    for cat in FASHIONIQ_CATEGORIES:
        for name, rec in manifest["images"]["FashionIQ"][cat].items():
            area = check_garment_image(world / "FashionIQ" / cat / f"{name}.jpg", rec)
            areas.setdefault((cat, rec["variant"], rec["fit"]), []).append(area)
    # the cut shows: more cloth for long dresses, long-sleeved shirts, tops with sleeves, and loose garments
    for cat, (small, big) in {"dress": ("short", "long"), "shirt": ("short", "long"), "toptee": ("sleeveless", "short")}.items():
        for fit in GARMENT_FITS:
            assert max(areas[(cat, small, fit)]) < min(areas[(cat, big, fit)]), (cat, fit)
        for variant in (small, big):
            assert max(areas[(cat, variant, "fitted")]) < min(areas[(cat, variant, "loose")]), (cat, variant)


def test_circo_ground_truths_are_exactly_the_matching_images(world, manifest):
    records = manifest["images"]["CIRCO"]
    info = load(world / "CIRCO" / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    gallery = [im["id"] for im in info["images"]]
    assert sorted(map(int, records)) == sorted(gallery)
    for im in info["images"]:
        check_scene_image(world / "CIRCO" / "COCO2017_unlabeled" / "unlabeled2017" / im["file_name"], records[str(im["id"])])
        assert [im["width"], im["height"]] == records[str(im["id"])]["canvas"]
    for split in CIRCO_SPLITS:
        queries = load(world / "CIRCO" / "annotations" / f"{split}.json")
        assert [q["id"] for q in queries] == list(range(manifest["sizes"]["num_queries"]))
        for q in queries:
            truth = q if split == "val" else manifest["hidden_targets"]["CIRCO"]["test"][str(q["id"])]
            gt, target = truth["gt_img_ids"], truth["target_img_id"]
            ref = attrs(records[str(q["reference_img_id"])])
            concept = parse_scene_text(q["shared_concept"])
            changes = parse_scene_text(q["relative_caption"])
            assert changes and all(ref[k] != v for k, v in changes.items()), q["relative_caption"]
            # the concept is the reference's object: its shape, size and, unless the caption changes it, colour
            assert concept == {k: ref[k] for k in ("shape", "size", "colour") if k not in changes}
            wanted = {**concept, **changes}
            matching = {i for i in gallery if all(records[str(i)][k] == v for k, v in wanted.items())}
            assert gt[0] == target and len(set(gt)) == len(gt) >= 2
            assert set(gt) == matching, q
            assert q["reference_img_id"] not in gt


# --------------------------------------------------------------------------------------------
# Determinism and reruns


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_different(world, tmp_path):
    again = _tree(make_toy_world(tmp_path / "again", seed=0, **WORLD_SIZES))
    first = _tree(world)
    assert again.keys() == first.keys() and all(again[k] == first[k] for k in first)
    other = _tree(make_toy_world(tmp_path / "other", seed=1, **WORLD_SIZES))
    assert load(world / "ImageNet" / "pairs.json") != json.loads(other["ImageNet/pairs.json"])
    for rel in ("ImageNet/test/ILSVRC2012_test_00000001.JPEG", "CIRR/cirr/captions/cap.rc2.val.json",
                "CIRCO/annotations/val.json", "FashionIQ/captions/cap.dress.val.json"):
        assert other[rel] != first[rel], rel


def test_rerun_replaces_the_folder_cleanly(tmp_path):
    out = tmp_path / "toy"
    make_toy_world(out, seed=0, **SMALL)
    (out / "stray.txt").write_text("left over")
    old_pairs = load(out / "ImageNet" / "pairs.json")
    make_toy_world(out, seed=5, **SMALL)
    assert not (out / "stray.txt").exists()
    assert load(out / MANIFEST_NAME)["seed"] == 5
    assert load(out / "ImageNet" / "pairs.json") != old_pairs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no temporary siblings left
    # a failing run (too many FashionIQ images for the attribute space) leaves the old world as it was
    before = _tree(out)
    with pytest.raises(ValueError, match="num-fashioniq-queries"):
        make_toy_world(out, seed=6, num_train_images=2, num_queries=2, num_fashioniq_queries=150, num_distractors=0)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a toy world"):
        make_toy_world(precious, seed=0, **SMALL)
    assert (precious / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        make_toy_world(a_file, seed=0, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file"]


def test_main_cli(tmp_path, capsys):
    out = make_toy_data.main(["--out", str(tmp_path / "w"), "--seed", "3", "--num-train-images", "4",
                    "--num-queries", "2", "--num-distractors", "1"])
    assert out == (tmp_path / "w").absolute()
    assert len(load(out / "ImageNet" / "pairs.json")) == 4
    assert len(load(out / "CIRR" / "cirr" / "captions" / "cap.rc2.val.json")) == 2
    assert len(load(out / "FashionIQ" / "image_splits" / "split.shirt.val.json")) == 2 * 2 + 1
    assert str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        make_toy_data.main(["--out", str(tmp_path / "bad"), "--num-queries", "0"])
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------
# Placeholder images for the real annotation files


def test_placeholder_images_for_real_fashioniq_and_imagenet(tmp_path, real_annotations):
    names = load(real_annotations / "FashionIQ" / "image_splits" / "split.dress.val.json")[:4]
    paths = make_placeholder_images(tmp_path, "FashionIQ", names, category="dress")
    assert paths == [tmp_path / "dress" / f"{n}.jpg" for n in names]
    shirt = load(real_annotations / "FashionIQ" / "image_splits" / "split.shirt.val.json")[0]
    assert make_placeholder_images(tmp_path, "fashioniq", [f"shirt/{shirt}"]) == [tmp_path / "shirt" / f"{shirt}.jpg"]
    blobs = [p.read_bytes() for p in paths]
    assert len(set(blobs)) == len(blobs)
    for p in paths:
        with Image.open(p) as img:
            assert img.size == (48, 32) and img.format == "JPEG"
    assert make_placeholder_images(tmp_path, "fashioniq", names, category="dress") == paths
    assert [p.read_bytes() for p in paths] == blobs  # identical across runs
    with pytest.raises(ValueError, match="category"):
        make_placeholder_images(tmp_path, "fashioniq", names[:1])

    img_paths = make_placeholder_images(tmp_path / "ImageNet", "imagenet", [1, "00000002"], size=(40, 60))
    assert [p.name for p in img_paths] == ["ILSVRC2012_test_00000001.JPEG", "ILSVRC2012_test_00000002.JPEG"]
    assert Image.open(img_paths[0]).size == (40, 60)


def test_placeholder_images_for_real_cirr(tmp_path, real_annotations):
    caps = load(real_annotations / "CIRR" / "cirr" / "captions" / "cap.rc2.val.json")[:3]
    names = sorted({m for q in caps for m in q["img_set"]["members"]} | {q["target_hard"] for q in caps})
    with pytest.raises(FileNotFoundError, match="split.rc2"):
        make_placeholder_images(tmp_path, "cirr", names)
    split_dir = tmp_path / "cirr" / "image_splits"
    split_dir.mkdir(parents=True)
    shutil.copy(real_annotations / "CIRR" / "cirr" / "image_splits" / "split.rc2.val.json", split_dir)
    smap = load(split_dir / "split.rc2.val.json")
    paths = make_placeholder_images(tmp_path, "cirr", names)
    assert paths == [tmp_path / smap[n][2:] for n in names]
    assert all(p.is_file() and Image.open(p).format == "PNG" for p in paths)
    train = load(real_annotations / "CIRR" / "cirr" / "image_splits" / "split.rc2.train.json")
    rel = next(iter(train.values()))
    assert make_placeholder_images(tmp_path, "cirr", [rel]) == [tmp_path / rel[2:]]
    with pytest.raises(ValueError, match="no split.rc2|in no"):
        make_placeholder_images(tmp_path, "cirr", ["dev-0-0-imgX"])
    with pytest.raises(ValueError, match=r"\.\."):
        make_placeholder_images(tmp_path, "cirr", ["../outside.png"])
    with pytest.raises(ValueError, match="unknown benchmark"):
        make_placeholder_images(tmp_path, "coco", names)


def test_placeholder_images_for_real_circo(tmp_path, real_annotations):
    queries = load(real_annotations / "CIRCO" / "annotations" / "val.json")[:5]
    ids = sorted({q["reference_img_id"] for q in queries} | {i for q in queries for i in q["gt_img_ids"]})
    paths = make_placeholder_images(tmp_path, "circo", ids)
    assert paths == [tmp_path / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg" for i in ids]
    assert make_placeholder_images(tmp_path, "circo", [f"{ids[0]:012d}.jpg"]) == paths[:1]
    info = load(write_circo_image_info(tmp_path, ids + ids[:1]))
    assert [im["id"] for im in info["images"]] == ids
    for im in info["images"]:
        assert (tmp_path / "COCO2017_unlabeled" / "unlabeled2017" / im["file_name"]).is_file()
        assert (im["width"], im["height"]) == Image.open(tmp_path / "COCO2017_unlabeled" / "unlabeled2017" / im["file_name"]).size
