"""Small distinct images at the exact paths the real datasets use, so that tests can run over a subset of
the REAL annotation files without the real images."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from toy.attributes import FASHIONIQ_CATEGORIES, colour_distance
from toy.drawing import save_image
from toy.writers import coco_image_entry, coco_image_info, write_json

PLACEHOLDER_BENCHMARKS = ("imagenet", "fashioniq", "cirr", "circo")


def _relative_image_paths(dataset_root: Path, benchmark: str, items: Iterable, category: str | None) -> list[str]:
    benchmark = benchmark.lower()
    if benchmark not in PLACEHOLDER_BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {PLACEHOLDER_BENCHMARKS}")
    cirr_index = None
    rels = []
    for item in items:
        text = str(item).strip()
        if benchmark == "imagenet":
            if re.fullmatch(r"\d+", text):
                rel = f"test/ILSVRC2012_test_{int(text):08d}.JPEG"
            else:
                rel = text
        elif benchmark == "fashioniq":
            if "/" in text:
                rel = text if text.lower().endswith(".jpg") else text + ".jpg"
            elif category is not None:
                rel = f"{category}/{text}.jpg"
            else:
                raise ValueError(f"FashionIQ name {text!r} has no category: pass 'dress/{text}' or category='dress'")
            if rel.split("/")[0] not in FASHIONIQ_CATEGORIES:
                raise ValueError(f"{rel}: FashionIQ images live under one of {FASHIONIQ_CATEGORIES}")
        elif benchmark == "cirr":
            if "/" in text:
                rel = text[2:] if text.startswith("./") else text
            else:
                if cirr_index is None:
                    cirr_index = _cirr_name_index(dataset_root)
                if text not in cirr_index:
                    raise ValueError(f"CIRR name {text!r} is in no {dataset_root / 'cirr/image_splits'}/split.rc2.*.json; "
                                     "pass its relative path ('./dev/<name>.png') or put the split file there")
                rel = cirr_index[text][2:]
        else:  # circo
            if text.lower().endswith(".jpg"):
                rel = "COCO2017_unlabeled/unlabeled2017/" + text.split("/")[-1]
            elif re.fullmatch(r"\d+", text):
                rel = f"COCO2017_unlabeled/unlabeled2017/{int(text):012d}.jpg"
            else:
                raise ValueError(f"CIRCO item {item!r} is neither an image id nor a '<12 digits>.jpg' file name")
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise ValueError(f"{item!r}: image paths must be relative to the dataset root without '..'")
        rels.append(rel)
    return rels


def _cirr_name_index(dataset_root: Path) -> dict[str, str]:
    split_dir = dataset_root / "cirr" / "image_splits"
    files = sorted(split_dir.glob("split.rc2.*.json"))
    if not files:
        raise FileNotFoundError(f"no split.rc2.*.json in {split_dir}; copy the CIRR split files there "
                                "or pass relative paths ('./dev/<name>.png') instead of bare names")
    index: dict = {}
    for f in files:
        index.update(json.loads(f.read_text()))
    return index


def placeholder_image(rel_path: str, size: tuple[int, int] = (48, 32)) -> Image.Image:
    """A plain colour with a centred block of another colour, both from a hash of `rel_path`."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    bg = np.frombuffer(digest[:3], dtype=np.uint8)
    fg = np.frombuffer(digest[3:6], dtype=np.uint8)
    if colour_distance(bg, fg) < 100:
        fg = 255 - bg  # keep the block visible
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[...] = bg
    arr[h // 4: h - h // 4, w // 4: w - w // 4] = fg
    return Image.fromarray(arr)


def make_placeholder_images(dataset_root, benchmark: str, names_or_paths: Iterable, size: tuple[int, int] = (48, 32),
                            *, category: str | None = None) -> list[Path]:
    """Write small generated images where the real dataset keeps the named images; return their paths.

    dataset_root: the benchmark's root folder (the one holding captions/, cirr/, annotations/, test/ ...).
    benchmark: 'imagenet' | 'fashioniq' | 'cirr' | 'circo' (any case). Items of `names_or_paths`:
      imagenet:  an id (1 or '00000001') -> test/ILSVRC2012_test_00000001.JPEG, or a relative path;
      fashioniq: '<cat>/<name>' (or with .jpg) -> <cat>/<name>.jpg; a bare '<name>' needs category=;
      cirr:      a split-json value ('./dev/dev-244-0-img0.png'), or a bare name, looked up in
                 <dataset_root>/cirr/image_splits/split.rc2.*.json (copy the real ones there first);
      circo:     an image id (int or digits) or a file name -> COCO2017_unlabeled/unlabeled2017/<12 digits>.jpg.
    Each image (size = (width, height)) is distinct per path and identical across runs; existing
    files are overwritten; the format follows the suffix (.png, .jpg, .JPEG).
    For CIRCO also call `write_circo_image_info` so the gallery file lists the same ids.
    """
    root = Path(dataset_root)
    written = []
    seen = set()
    for rel in _relative_image_paths(root, benchmark, names_or_paths, category):
        path = root / rel
        if rel not in seen:
            seen.add(rel)
            save_image(placeholder_image(rel, size), path)
        written.append(path)
    return written


def write_circo_image_info(dataset_root, image_ids: Iterable, size: tuple[int, int] = (48, 32)) -> Path:
    """Write COCO2017_unlabeled/annotations/image_info_unlabeled2017.json listing `image_ids` (the CIRCO
    gallery), in the real file's shape, with width/height = `size`; return its path."""
    ids = sorted({int(i) for i in image_ids})
    images = [coco_image_entry(i, f"{i:012d}.jpg", size) for i in ids]
    path = Path(dataset_root) / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    write_json(coco_image_info(images), path)
    return path
