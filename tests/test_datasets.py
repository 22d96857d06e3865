"""Datasets on the real annotation files (counts, fields), generated images (samples, collate),
the layout / image errors, and the targetpad transform."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets import (AnnotationFormatError, CIRCODataset, CIRRDataset, DatasetLayoutError, FashionIQDataset,
                      ImageLoadError, ImageNetPairsDataset, collate, load_image)
from transforms import TargetPad, build_transform

SIZE = 32


@pytest.fixture(scope="module")
def preprocess():
    return build_transform("targetpad", SIZE)


def _read(path):
    with open(path) as f:
        return json.load(f)


def _image(path: Path, size=(7, 5), mode="RGB", color=(200, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


@pytest.fixture
def cirr_root(real_annotations, tmp_path):
    root = tmp_path / "CIRR"
    root.mkdir()
    (root / "cirr").symlink_to(real_annotations / "CIRR" / "cirr")
    for d in ("dev", "test1"):
        (root / d).mkdir()
    return root


@pytest.fixture
def fiq_root(real_annotations, tmp_path):
    root = tmp_path / "FashionIQ"
    root.mkdir()
    for d in ("captions", "image_splits"):
        (root / d).symlink_to(real_annotations / "FashionIQ" / d)
    for d in ("dress", "shirt", "toptee"):
        (root / d).mkdir()
    return root


@pytest.fixture
def circo_root(real_annotations, tmp_path):
    """Real query annotations; a generated gallery annotation holding every id they use, plus 5."""
    root = tmp_path / "CIRCO"
    root.mkdir()
    (root / "annotations").symlink_to(real_annotations / "CIRCO" / "annotations")
    ids = set()
    for split in ("val", "test"):
        for e in _read(real_annotations / "CIRCO" / "annotations" / f"{split}.json"):
            ids.add(e["reference_img_id"])
            ids.update(e.get("gt_img_ids", []))
    ids = sorted(ids) + [10**9 + j for j in range(5)]
    info = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]}
    ann = root / "COCO2017_unlabeled" / "annotations"
    ann.mkdir(parents=True)
    (ann / "image_info_unlabeled2017.json").write_text(json.dumps(info))
    (root / "COCO2017_unlabeled" / "unlabeled2017").mkdir()
    return root


# ---------------------------------------------------------------------------------------------
# counts and fields on the real annotation files

@pytest.mark.parametrize("split,n_q,n_g", [("val", 4181, 2297), ("test1", 4148, 2315), ("test", 4148, 2315)])
def test_cirr_counts(cirr_root, preprocess, split, n_q, n_g):
    q = CIRRDataset(cirr_root, split, "query", preprocess)
    g = CIRRDataset(cirr_root, split, "gallery", preprocess)
    assert len(q) == len(q.queries) == n_q
    assert len(g) == len(g.names) == n_g
    real_split = "test1" if split == "test" else split
    raw = _read(cirr_root / "cirr" / "captions" / f"cap.rc2.{real_split}.json")
    for i in (0, n_q - 1):
        e, got = raw[i], q.queries[i]
        assert got["reference_name"] == e["reference"] and got["pair_id"] == e["pairid"]
        assert got["relative_caption"] == e["caption"] and got["group_members"] == e["img_set"]["members"]
        assert got.get("target_name") == e.get("target_hard")
    assert ("target_name" in q.queries[0]) == (split == "val")
    assert g.names == list(_read(cirr_root / "cirr" / "image_splits" / f"split.rc2.{real_split}.json"))


@pytest.mark.parametrize("split,n_q", [("val", 220), ("test", 800)])
def test_circo_counts(circo_root, preprocess, split, n_q):
    q = CIRCODataset(circo_root, split, "query", preprocess)
    assert len(q) == len(q.queries) == n_q
    raw = _read(circo_root / "annotations" / f"{split}.json")
    e, got = raw[-1], q.queries[-1]
    assert got["reference_name"] == str(e["reference_img_id"]) and got["query_id"] == e["id"]
    assert got["relative_caption"] == e["relative_caption"] and got["shared_concept"] == e["shared_concept"]
    if split == "val":
        assert got["target_name"] == str(e["target_img_id"]) == got["gt_img_ids"][0]
        assert got["gt_img_ids"] == [str(x) for x in e["gt_img_ids"]]
    else:
        assert "target_name" not in got and "gt_img_ids" not in got
    info = _read(circo_root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    g = CIRCODataset(circo_root, split, "gallery", preprocess)
    assert g.names == [str(im["id"]) for im in info["images"]]


@pytest.mark.parametrize("cat,n_q,n_g", [("dress", 2017, 3817), ("shirt", 2038, 6346), ("toptee", 1961, 5373)])
def test_fashioniq_val_counts(fiq_root, preprocess, cat, n_q, n_g):
    q = FashionIQDataset(fiq_root, "val", [cat], "query", preprocess)
    g = FashionIQDataset(fiq_root, "val", [cat], "gallery", preprocess)
    assert len(q) == n_q and len(g) == n_g
    e = _read(fiq_root / "captions" / f"cap.{cat}.val.json")[0]
    assert q.queries[0] == {"reference_name": e["candidate"], "relative_captions": tuple(e["captions"]),
                            "target_name": e["target"], "category": cat}


def test_fashioniq_several_categories_and_test_split(fiq_root, preprocess):
    g = FashionIQDataset(fiq_root, "val", ["dress", "shirt", "toptee"], "gallery", preprocess)
    assert len(g) == 3817 + 6346 + 5373
    assert g.categories_of_names[0] == "dress" and g.categories_of_names[-1] == "toptee"
    q = FashionIQDataset(fiq_root, "test", ["shirt"], "query", preprocess)
    assert len(q) == len(_read(fiq_root / "captions" / "cap.shirt.test.json"))
    assert all("target_name" not in x for x in q.queries)


def test_queries_only_in_query_mode(cirr_root, preprocess):
    with pytest.raises(AttributeError, match="mode='query'"):
        CIRRDataset(cirr_root, "val", "gallery", preprocess).queries


# ---------------------------------------------------------------------------------------------
# samples with generated images

def test_cirr_samples_and_collate(cirr_root, preprocess):
    q = CIRRDataset(cirr_root, "val", "query", preprocess)
    g = CIRRDataset(cirr_root, "val", "gallery", preprocess)
    split = _read(cirr_root / "cirr" / "image_splits" / "split.rc2.val.json")
    for name in [q.queries[0]["reference_name"], q.queries[1]["reference_name"], g.names[0]]:
        _image(cirr_root / split[name], size=(9, 4))
    s = g[0]
    assert set(s) == {"image", "name"} and s["name"] == g.names[0] and s["image"].shape == (3, SIZE, SIZE)
    batch = next(iter(DataLoader(torch.utils.data.Subset(q, [0, 1]), batch_size=2, collate_fn=collate)))
    assert set(batch) == {"reference_image", "reference_name", "relative_caption", "pair_id", "group_members",
                          "target_name"}
    assert batch["reference_image"].shape == (2, 3, SIZE, SIZE)
    assert batch["group_members"] == [q.queries[0]["group_members"], q.queries[1]["group_members"]]
    assert batch["pair_id"] == [q.queries[0]["pair_id"], q.queries[1]["pair_id"]]


def test_fashioniq_samples_keep_caption_pairs(fiq_root, preprocess):
    q = FashionIQDataset(fiq_root, "val", ["toptee"], "query", preprocess)
    for i in (0, 1):
        _image(fiq_root / "toptee" / f"{q.queries[i]['reference_name']}.jpg", size=(40, 100))
    batch = collate([q[0], q[1]])
    assert batch["relative_captions"] == [q.queries[0]["relative_captions"], q.queries[1]["relative_captions"]]
    assert batch["category"] == ["toptee", "toptee"]
    assert batch["reference_image"].shape == (2, 3, SIZE, SIZE)


def test_circo_samples(circo_root, preprocess):
    q = CIRCODataset(circo_root, "val", "query", preprocess)
    g = CIRCODataset(circo_root, "val", "gallery", preprocess)
    images = circo_root / "COCO2017_unlabeled" / "unlabeled2017"
    for ident in [q.queries[0]["reference_name"], q.queries[1]["reference_name"], g.names[3]]:
        _image(images / f"{int(ident):012d}.jpg")
    batch = collate([q[0], q[1]])
    assert batch["gt_img_ids"] == [q.queries[0]["gt_img_ids"], q.queries[1]["gt_img_ids"]]
    assert batch["reference_image"].shape == (2, 3, SIZE, SIZE)
    assert g[3]["name"] == g.names[3] and g[3]["image"].shape == (3, SIZE, SIZE)


def test_image_reaches_preprocess_as_opened(cirr_root):
    """Grey images stay grey until the transform (it converts to RGB after padding, METHOD §9)."""
    seen = []
    g = CIRRDataset(cirr_root, "val", "gallery", lambda im: seen.append(im.mode) or torch.zeros(1))
    split = _read(cirr_root / "cirr" / "image_splits" / "split.rc2.val.json")
    _image(cirr_root / split[g.names[0]], mode="L")
    g[0]
    assert seen == ["L"]


# ---------------------------------------------------------------------------------------------
# errors

def test_missing_root(tmp_path, preprocess):
    for cls, args, tree_line in [(CIRRDataset, ("val", "query"), "image_splits/split.rc2"),
                                 (CIRCODataset, ("val", "query"), "image_info_unlabeled2017.json"),
                                 (FashionIQDataset, ("val", ["dress"], "query"), "captions/cap.")]:
        with pytest.raises(DatasetLayoutError) as err:
            cls(tmp_path / "nowhere", *args, preprocess)
        assert str(tmp_path / "nowhere") in str(err.value) and tree_line in str(err.value)


def test_missing_annotation_file(real_annotations, tmp_path, preprocess):
    root = tmp_path / "FashionIQ"
    root.mkdir()
    (root / "image_splits").symlink_to(real_annotations / "FashionIQ" / "image_splits")
    (root / "dress").mkdir()
    with pytest.raises(DatasetLayoutError) as err:
        FashionIQDataset(root, "val", ["dress"], "query", preprocess)
    assert str(root / "captions" / "cap.dress.val.json") in str(err.value)
    assert "Expected layout" in str(err.value)


def test_missing_gallery_annotation_circo(circo_root, preprocess):
    info = circo_root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info.unlink()
    with pytest.raises(DatasetLayoutError) as err:
        CIRCODataset(circo_root, "test", "gallery", preprocess)
    assert f"not found: {info}" in str(err.value)


def test_missing_image_folder(cirr_root, preprocess):
    (cirr_root / "dev").rmdir()
    with pytest.raises(DatasetLayoutError) as err:
        CIRRDataset(cirr_root, "val", "gallery", preprocess)
    assert str(cirr_root / "dev") in str(err.value)


def test_missing_and_corrupt_images(cirr_root, preprocess):
    g = CIRRDataset(cirr_root, "val", "gallery", preprocess)
    split = _read(cirr_root / "cirr" / "image_splits" / "split.rc2.val.json")
    missing = cirr_root / split[g.names[0]]
    with pytest.raises(ImageLoadError) as err:
        g[0]
    assert str(missing) in str(err.value) and "not found" in str(err.value)

    garbage = cirr_root / split[g.names[1]]
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(ImageLoadError) as err:
        g[1]
    assert str(garbage) in str(err.value) and "corrupt" in str(err.value)

    truncated = cirr_root / split[g.names[2]]
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, format="JPEG")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a download cut in half
    with pytest.raises(ImageLoadError, match="truncated|corrupt"):
        load_image(truncated)


def test_circo_unknown_reference_id(circo_root, preprocess):
    info = circo_root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info.write_text(json.dumps({"images": [{"id": 1, "file_name": "000000000001.jpg"}]}))
    with pytest.raises(AnnotationFormatError, match="are not in"):
        CIRCODataset(circo_root, "val", "query", preprocess)


def test_bad_arguments(cirr_root, fiq_root, preprocess):
    with pytest.raises(ValueError, match="mode"):
        CIRRDataset(cirr_root, "val", "both", preprocess)
    with pytest.raises(ValueError, match="split"):
        CIRRDataset(cirr_root, "dev", "query", preprocess)
    with pytest.raises(ValueError, match="categories"):
        FashionIQDataset(fiq_root, "val", ["hat"], "query", preprocess)


# ---------------------------------------------------------------------------------------------
# ImageNet pairs

def _imagenet(tmp_path, ids, present):
    root = tmp_path / "ImageNet"
    (root / "test").mkdir(parents=True)
    for i in present:
        _image(root / "test" / f"ILSVRC2012_test_{i}.JPEG", mode="L")
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"img_id": i, "subject": f"a dog {i}", "attribute": "on grass"} for i in ids]))
    return root, pairs


def test_imagenet_pairs(tmp_path, preprocess):
    ids = ["00000001", "00000002", "00000003"]
    root, pairs = _imagenet(tmp_path, ids, ids)
    ds = ImageNetPairsDataset(root, pairs, preprocess)
    assert len(ds) == 3 and ds.names == ids
    batch = collate([ds[0], ds[2]])
    assert batch["image"].shape == (2, 3, SIZE, SIZE)
    assert batch["img_id"] == ["00000001", "00000003"] and batch["subject"] == ["a dog 00000001", "a dog 00000003"]
    assert batch["attribute"] == ["on grass", "on grass"]


def test_imagenet_pairs_missing_ids(tmp_path, preprocess):
    ids = [f"{j:08d}" for j in range(1, 9)]
    root, pairs = _imagenet(tmp_path, ids, ids[:5])
    with pytest.raises(DatasetLayoutError) as err:
        ImageNetPairsDataset(root, pairs, preprocess)
    msg = str(err.value)
    assert "3 of 8" in msg and "00000006" in msg and "00000008" in msg and str(root / "test") in msg


# ---------------------------------------------------------------------------------------------
# TargetPad (METHOD §9)

def test_targetpad_wide_image():
    # 100x40: ratio 2.5 >= 1.25 -> m = 100 / 1.25 = 80, hp = max(int((80-100)/2), 0) = 0,
    # vp = int((80-40)/2) = 20 -> 100x80, black bands of 20 rows above and below.
    out = TargetPad(1.25)(Image.new("RGB", (100, 40), (255, 255, 255)))
    assert out.size == (100, 80)
    assert out.getpixel((50, 0)) == (0, 0, 0) and out.getpixel((50, 19)) == (0, 0, 0)
    assert out.getpixel((50, 20)) == (255, 255, 255) and out.getpixel((50, 59)) == (255, 255, 255)
    assert out.getpixel((50, 60)) == (0, 0, 0) and out.getpixel((0, 40)) == (255, 255, 255)


def test_targetpad_tall_image_and_truncation():
    # 40x100 -> hp = 20 left and right -> 80x100.
    assert TargetPad(1.25)(Image.new("RGB", (40, 100))).size == (80, 100)
    # 101x40: m = 80.8, vp = int(40.8 / 2) = int(20.4) = 20 -> 101x80 (truncation, not rounding).
    assert TargetPad(1.25)(Image.new("RGB", (101, 40))).size == (101, 80)


def test_targetpad_leaves_near_square_images():
    image = Image.new("RGB", (50, 45))  # ratio 1.11 < 1.25
    assert TargetPad(1.25)(image).size == (50, 45)
