"""The fast paths of a warm-cache evaluation (scripts/bench_eval.py) against the plain code they
replace: CIRCO's lazily built gallery paths, its gallery annotation parsed once for both datasets of
an evaluation, the image fingerprint on plain strings, and the gallery store's memory-mapped rows."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import features
from datasets import AnnotationFormatError, CIRCODataset, FileList
from evaluation import open_benchmark
from features import Encoding
from feature_store import EvalCache, images_fingerprint
from helpers import seeded_image, small_circo
from transforms import build_transform


def _info_path(root: Path) -> Path:
    return root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"


def _plain_fingerprint(paths) -> str:
    """images_fingerprint's plain equivalent: one hash update per file, os.stat on each Path."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(b"missing\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# FileList

def test_file_list_is_the_plain_path_list(tmp_path):
    folder = tmp_path / "imgs"
    names = ["a.jpg", "sub/b.jpg", str(tmp_path / "elsewhere" / "c.jpg"), "d.png"]
    plain = [folder / n for n in names]
    fl = FileList(folder, names)
    assert len(fl) == len(plain) and list(fl) == plain and fl == plain and fl == tuple(plain)
    assert [fl[i] for i in range(len(fl))] == plain and fl[-1] == plain[-1] and fl[1:3] == plain[1:3]
    assert fl != plain[:-1] and fl != list(reversed(plain)) and fl.index(plain[2]) == 2 and plain[1] in fl
    # the strings are os.path.join's, and name the same files as the Paths (the absolute one too)
    assert fl.strings() == [os.path.join(str(folder), n) for n in names]
    assert [Path(s) for s in fl.strings()] == plain
    again = pickle.loads(pickle.dumps(fl))  # DataLoader workers get a pickled dataset
    assert again == fl and list(again) == plain
    with pytest.raises(IndexError):
        fl[len(names)]
    names.append("e.jpg")  # the list was copied: the caller's list is not the dataset's
    assert len(fl) == 4


# ---------------------------------------------------------------------------------------------
# the CIRCO gallery annotation, parsed once for a gallery and a query dataset

def test_circo_gallery_parse_shared_by_the_two_datasets(tmp_path, monkeypatch):
    pre = build_transform("targetpad", 32)
    root = small_circo(tmp_path / "CIRCO", [5, 17, 300, 4000, 12], with_images=False)
    image_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
    parses = []  # each decoding of the gallery annotation (the datasets read their JSON files with json.load)
    real = json.load

    def load(f, *args, **kwargs):
        if Path(f.name) == _info_path(root):
            parses.append(f.name)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(json, "load", load)
    g, q = open_benchmark("circo", root, "val", pre)  # the query dataset reuses the gallery's parse
    assert len(parses) == 1
    assert CIRCODataset(root, "val", "query", pre).names == q.names and len(parses) == 2  # alone: its own parse
    for ds in (g, q):
        assert ds.names == ["5", "17", "300", "4000", "12"]
        assert list(ds.gallery_paths) == [image_dir / f"{i:012d}.jpg" for i in (5, 17, 300, 4000, 12)]
    assert q.query_paths == [image_dir / f"{5:012d}.jpg"] and q.queries[0]["gt_img_ids"] == ["17", "300"]
    g.names.append("x")  # each dataset has its own lists
    assert CIRCODataset(root, "val", "gallery", pre).names == q.names and len(q.names) == 5

    # the same size and modification time, other content: a new dataset reads the file again
    info = _info_path(root)
    st = os.stat(info)
    info.write_text(info.read_text().replace('"id": 17', '"id": 71').replace('"id": 300', '"id": 301'))
    os.utime(info, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(info).st_size == st.st_size
    assert CIRCODataset(root, "val", "gallery", pre).names == ["5", "71", "301", "4000", "12"]
    with pytest.raises(AnnotationFormatError, match="not in"):  # the query's ids are gone from the gallery
        CIRCODataset(root, "val", "query", pre)

    # another root with identical bytes: its own folder
    other = small_circo(tmp_path / "other", [5, 71, 301, 4000, 12], with_images=False)
    _info_path(other).write_bytes(info.read_bytes())
    assert CIRCODataset(other, "val", "gallery", pre).gallery_paths[0].parent == \
        other / "COCO2017_unlabeled" / "unlabeled2017"

    # broken files are reported
    info.write_text("{not json")
    with pytest.raises(AnnotationFormatError, match="not valid JSON"):
        CIRCODataset(root, "val", "gallery", pre)
    info.write_text(json.dumps({"images": [{"id": 1, "file_name": 7}]}))
    with pytest.raises(AnnotationFormatError, match="file_name"):
        CIRCODataset(root, "val", "gallery", pre)
    info.write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(AnnotationFormatError, match="lacks"):
        CIRCODataset(root, "val", "gallery", pre)


# ---------------------------------------------------------------------------------------------
# the image fingerprint of the cache key

class _ListGallery:
    def __init__(self, paths):
        self.gallery_paths = list(paths)


def test_images_fingerprint_equals_the_plain_loop(tmp_path):
    ids = [3, 1, 2, 10, 7]
    root = small_circo(tmp_path / "CIRCO", ids)
    g = CIRCODataset(root, "val", "gallery", build_transform("targetpad", 32))
    paths = list(g.gallery_paths)
    (paths[2]).unlink()  # a missing file has its own line
    fp = images_fingerprint(g)
    assert fp == _plain_fingerprint(paths) == images_fingerprint(_ListGallery(paths))
    assert images_fingerprint(_ListGallery(map(str, paths))) == fp
    assert images_fingerprint(object()) is None

    # an image replaced under its name (new mtime), or restored: another fingerprint each time
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed = images_fingerprint(g)
    assert changed != fp and changed == _plain_fingerprint(paths)
    seeded_image(paths[2], 99)
    restored = images_fingerprint(g)
    assert restored not in (fp, changed) and restored == _plain_fingerprint(paths)


# ---------------------------------------------------------------------------------------------
# the gallery store: memory-mapped rows, stale and foreign folders

def test_gallery_cache_names_and_mmap(tmp_path, tiny_clip, capsys):
    root = small_circo(tmp_path / "CIRCO", [4, 8, 15, 16, 23, 42])
    cache = tmp_path / "cache"
    pre = build_transform("targetpad", tiny_clip.image_size)

    def run():
        capsys.readouterr()
        ds = CIRCODataset(root, "val", "gallery", pre)
        enc = Encoding(batch_size=4, workers=0, device="cpu", progress=False)
        got = features.gallery_features(tiny_clip, ds, enc, EvalCache(cache))
        return got.names, got.features, enc.counters.gallery_images_encoded, capsys.readouterr().out

    names, feats, n, _ = run()
    assert n == 6
    (folder,) = cache.iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["key"]["names_sha256"] == hashlib.sha256("\x00".join(names).encode()).hexdigest()
    names2, feats2, n, log = run()
    assert n == 0 and "hit" in log and names2 == names and torch.equal(feats2, feats)

    # writing into the returned (memory-mapped) features changes neither the file nor the next read
    feats2.zero_()
    _, feats3, n, _ = run()
    assert n == 0 and torch.equal(feats3, feats)

    # another name list recorded in the folder: stale; a foreign meta.json, then a corrupt one: not used
    good = (folder / "meta.json").read_text()
    for meta_text, why in ((good.replace(meta["key"]["names_sha256"], "0" * 64), "stale: made for other names_sha256"),
                           (json.dumps({"state_dict": {}}), "not a feature store folder"),
                           ("garbage", "meta.json is missing or unreadable")):
        (folder / "meta.json").write_text(meta_text)
        _, feats4, n, log = run()
        assert n == 6 and why in log and torch.equal(feats4, feats)
    # a data file cut short: not used
    with open(folder / "features.npy", "r+b") as f:
        f.truncate(os.path.getsize(folder / "features.npy") - 4)
    _, _, n, log = run()
    assert n == 6 and "features.npy is truncated" in log

    # an image changed under its name: stale, recomputed
    img = root / "COCO2017_unlabeled" / "unlabeled2017" / f"{15:012d}.jpg"
    seeded_image(img, 1234, size=(30, 20))
    _, feats5, n, log = run()
    assert n == 6 and "images_sha256" in log and not torch.equal(feats5[2], feats[2])
    assert torch.equal(feats5[[0, 1, 3, 4, 5]], feats[[0, 1, 3, 4, 5]])
