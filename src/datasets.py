"""Datasets of the four benchmarks used by FTI4CIR (METHOD §8, §11): dict samples, clear layout errors.

Every class reads its annotation files once, at construction, and exposes the metadata without
loading any image, so evaluation code never iterates a dataset to collect names:

- `.names`    list[str], the split's gallery names (FashionIQ/CIRR names, CIRCO image ids as str,
              ImageNet pair img_ids), in gallery order (the order of gallery samples);
- `.queries`  (query mode only) list of dicts, the query samples without their image;
- `.query_texts(query)` the text(s) a query's modification is written in (METHOD §10): FashionIQ's
              two sentences built from its two captions, CIRR's and CIRCO's relative caption.

`mode='gallery'` samples are `{"image", "name"}`; `mode='query'` samples are the `.queries` dict plus
`"reference_image"`. Images are opened with PIL and passed as opened to `preprocess` (the targetpad
transform converts to RGB itself after padding, METHOD §9). Folders and annotation files are checked at
construction (`DatasetLayoutError`, with the expected layout); individual image files when loaded
(`ImageLoadError`, naming the file).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from annotation_schema import NONEMPTY, AnnotationFormatError, check_entries, check_inside, report_queries
from errors import UserError
from utils import walk_files

MODES = ("gallery", "query")
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
BENCHMARKS = ("fashioniq", "cirr", "circo")
# the folders every script looks in when no root flag is given
DEFAULT_ROOTS = {"imagenet": "./data/ImageNet", "fashioniq": "./data/FashionIQ", "cirr": "./data/CIRR",
                 "circo": "./data/CIRCO"}
IMAGENET_FILE_RE = re.compile(r"^ILSVRC2012_test_(\d{8})\.JPEG$")
# CIRCO's modification text (--circo-query): the relative caption alone (the authors'), or built from
# both of a query's fields with this template
# how a CIRCO query becomes text: the authors' relative caption (code); the shared concept before it; and
# the form the benchmark's later tables use (MagicLens, MegaPairs)
CIRCO_QUERY_TEMPLATES = {"relative": "{relative_caption}", "shared+relative": "{shared_concept} that {relative_caption}",
                         "find-also": "find a picture that also {shared_concept}, but {relative_caption}"}

FASHIONIQ_LAYOUT = """\
FashionIQ/
├── captions/cap.<dress|shirt|toptee>.<train|val|test>.json
├── image_splits/split.<dress|shirt|toptee>.<train|val|test>.json
├── dress/<name>.jpg
├── shirt/<name>.jpg
└── toptee/<name>.jpg"""

CIRR_LAYOUT = """\
CIRR/
├── train/<0|1|...>/train-*.png
├── dev/dev-*.png
├── test1/test1-*.png
└── cirr/
    ├── captions/cap.rc2.<train|val|test1>.json
    └── image_splits/split.rc2.<train|val|test1>.json"""

CIRCO_LAYOUT = """\
CIRCO/
├── annotations/<val|test>.json
└── COCO2017_unlabeled/
    ├── annotations/image_info_unlabeled2017.json
    └── unlabeled2017/<000000243611.jpg|...>"""

IMAGENET_LAYOUT = """\
ImageNet/
└── test/ILSVRC2012_test_<00000001|...|00100000>.JPEG
(plus the pairs JSON: a list of {"img_id": "00000001", "subject": "...", "attribute": "..."})"""


class DatasetLayoutError(UserError, FileNotFoundError):
    """A dataset root, annotation file or image folder is missing."""


class ImageLoadError(UserError, OSError):
    """An image file is missing or cannot be decoded."""


def imagenet_file_name(img_id: str) -> str:
    """The file of an ImageNet test image: `ILSVRC2012_test_<8-digit id>.JPEG`."""
    return f"ILSVRC2012_test_{img_id}.JPEG"


def fashioniq_texts(caption_1: str, caption_2: str) -> tuple[str, str]:
    """FashionIQ's two modification texts for one query from its two captions (METHOD §10; Python's
    `capitalize`, which also lower-cases the rest, as the authors' code (code))."""
    c1 = caption_1.strip(".?, ")
    c2 = caption_2.strip(".?, ")
    return f"{c1.capitalize()} and {c2}", f"{c2} and {c1}"


def combine_text_features(f: torch.Tensor) -> torch.Tensor:
    """One L2-normalised float32 feature per query from its texts' features f [Q, T, D] (METHOD §10):
    each text's feature normalised; with several texts, their mean normalised again."""
    n = F.normalize(f.float(), dim=-1)
    if n.shape[1] == 1:
        return n[:, 0]
    total = n[:, 0]
    for t in range(1, n.shape[1]):
        total = total + n[:, t]
    return F.normalize(total / n.shape[1], dim=-1)


# PIL refuses an image of over twice Image.MAX_IMAGE_PIXELS pixels as a possible decompression bomb; this
# environment variable sets that limit (pixels; 0: none) for the scripts and their DataLoader workers
PIXEL_LIMIT_ENV = "FTI4CIR_MAX_IMAGE_PIXELS"


@functools.lru_cache(maxsize=None)
def _pixel_limit(value: str) -> int | None:
    try:
        limit = int(value)
    except ValueError:
        raise ImageLoadError(f"{PIXEL_LIMIT_ENV}={value!r} is not a number of pixels; set it to an integer "
                             "(0: no limit) or unset it") from None
    return limit if limit > 0 else None


def load_image(path) -> Image.Image:
    """Open and fully decode an image (mode as stored); ImageLoadError naming the file otherwise."""
    path = Path(path)
    limit = os.environ.get(PIXEL_LIMIT_ENV)
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = _pixel_limit(limit)
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated/corrupt file fails here and not inside a transform
    except FileNotFoundError as e:
        raise ImageLoadError(f"{path}: image file not found; check that the dataset's images are "
                             "downloaded and laid out as the README shows") from e
    except IsADirectoryError as e:
        raise ImageLoadError(f"{path}: is a folder, not an image file; move it out of the dataset's image "
                             "folder or put the image there") from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{path}: refused as a possible decompression bomb ({e}); if you trust the file, "
                             f"raise the limit with the environment variable {PIXEL_LIMIT_ENV}=<pixels> "
                             "(0: no limit), or shrink the image") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{path}: cannot decode the image ({type(e).__name__}: {e}); the file is "
                             "corrupt or truncated, re-download it") from e
    return image


def _require(path: Path, layout: str, root: Path, what: str, is_dir: bool, hint: str = "") -> Path:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        hint = f" ({hint})" if hint else ""
        raise DatasetLayoutError(f"{what} not found: {path}{hint}\nExpected layout (root = {root}):\n{layout}")
    return path


def _read_json(path: Path, layout: str, root: Path, what: str, hint: str = "") -> Any:
    _require(path, layout, root, what, is_dir=False, hint=hint)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationFormatError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise AnnotationFormatError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                                    "save it as UTF-8 JSON") from e


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_preprocess(preprocess) -> None:
    if not callable(preprocess):
        raise TypeError(f"preprocess must be a callable PIL image -> tensor, got {type(preprocess).__name__}")


class _Base(Dataset):
    """Shared gallery/query plumbing: subclasses fill names, _gallery_paths, queries, _query_paths."""

    mode: str
    names: list[str]
    _gallery_paths: list[Path]
    _queries: list[dict]
    _query_paths: list[Path]

    @property
    def queries(self) -> list[dict]:
        """Query metadata (no images); only in query mode."""
        if self.mode != "query":
            raise AttributeError(f"{type(self).__name__} in mode {self.mode!r} has no queries; use mode='query'")
        return self._queries

    @property
    def gallery_paths(self) -> Sequence[Path]:
        """Image file of every gallery name, in the order of `.names` (a list; for CIRCO a FileList,
        the same Paths made when read)."""
        return self._gallery_paths

    @property
    def query_paths(self) -> list[Path]:
        """Reference image file of every query, in the order of `.queries`."""
        return self._query_paths if self.mode == "query" else []

    @property
    def label(self) -> str:
        """e.g. 'cirr-val', 'fashioniq-val-dress', 'circo-test' (for logs and cache file names)."""
        parts = [type(self).__name__.replace("Dataset", "").lower(), self.split]
        parts += ["+".join(getattr(self, "categories", []))]
        return "-".join(p for p in parts if p)

    def query_texts(self, query: dict) -> tuple[str, ...]:
        """The modification text(s) of one of `.queries` (the relative caption)."""
        return (query["relative_caption"],)

    def __len__(self) -> int:
        return len(self.names) if self.mode == "gallery" else len(self._queries)

    def __getitem__(self, i: int) -> dict:
        if self.mode == "gallery":
            return {"image": self.preprocess(load_image(self._gallery_paths[i])), "name": self.names[i]}
        sample = dict(self._queries[i])
        sample["reference_image"] = self.preprocess(load_image(self._query_paths[i]))
        return sample

    def without(self, names: set[str], queries: set[int]):
        """A copy without the gallery entries named in `names` and the queries at the indices in `queries`,
        orders kept, no annotation file read again (the data that is left when images are missing)."""
        out = copy.copy(self)
        keep = [i for i, n in enumerate(self.names) if n not in names]
        out.names = [self.names[i] for i in keep]
        paths = self._gallery_paths
        out._gallery_paths = (FileList(paths.folder, [paths.file_names[i] for i in keep]) if isinstance(paths, FileList)
                              else [paths[i] for i in keep])
        if hasattr(self, "categories_of_names"):
            out.categories_of_names = [self.categories_of_names[i] for i in keep]
        kept = [i for i in range(len(self._queries)) if i not in queries]
        out._queries = [self._queries[i] for i in kept]
        out._query_paths = [self._query_paths[i] for i in kept] if self._query_paths else []
        return out


class FashionIQDataset(_Base):
    """FashionIQ for one or more categories (METHOD §11).

    gallery: names of `image_splits/split.<cat>.<split>.json`, categories concatenated in the order
    given; images `<root>/<cat>/<name>.jpg`. query: `captions/cap.<cat>.<split>.json` entries as
    `{"reference_name" (candidate), "relative_captions": (c1, c2) raw, "target_name" (not in test),
    "category"}`. `.categories_of_names` gives each gallery name's category.
    """

    def __init__(self, root, split: str, categories: Sequence[str], mode: str, preprocess: Callable):
        _check_mode(mode)
        _check_preprocess(preprocess)
        if split not in ("train", "val", "test"):
            raise ValueError(f"FashionIQ split must be train, val or test, got {split!r}")
        if isinstance(categories, str):
            categories = [categories]
        bad = [c for c in categories if c not in FASHIONIQ_CATEGORIES]
        if bad or not categories:
            raise ValueError(f"FashionIQ categories must be a non-empty subset of {FASHIONIQ_CATEGORIES}, got {list(categories)}")
        self.root, self.split, self.mode, self.preprocess = Path(root), split, mode, preprocess
        self.categories = list(categories)
        root = self.root
        _require(root, FASHIONIQ_LAYOUT, root, "FashionIQ root folder", is_dir=True)
        self.names, self.categories_of_names, self._gallery_paths = [], [], []
        self._queries, self._query_paths = [], []
        cap_paths = []
        for cat in self.categories:
            image_dir = _require(root / cat, FASHIONIQ_LAYOUT, root, f"FashionIQ {cat} image folder", is_dir=True)
            split_path = root / "image_splits" / f"split.{cat}.{split}.json"
            names = _read_json(split_path, FASHIONIQ_LAYOUT, root, "FashionIQ image split")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise AnnotationFormatError(f"{split_path}: expected a JSON list of image names")
            check_inside(((i, f"{n}.jpg") for i, n in enumerate(names)), image_dir, split_path)
            self.names += names
            self.categories_of_names += [cat] * len(names)
            self._gallery_paths += [image_dir / f"{n}.jpg" for n in names]
            if mode == "query":
                cap_path = root / "captions" / f"cap.{cat}.{split}.json"
                entries = _read_json(cap_path, FASHIONIQ_LAYOUT, root, "FashionIQ captions")
                check_entries(entries, {"candidate": str, "captions": [str]}
                               | ({"target": str} if split != "test" else {}), cap_path)
                check_inside(((i, f"{e['candidate']}.jpg") for i, e in enumerate(entries)), image_dir, cap_path)
                cap_paths.append(cap_path)
                for i, e in enumerate(entries):
                    if not (isinstance(e["captions"], list) and len(e["captions"]) == 2):
                        raise AnnotationFormatError(f"{cap_path}: entry {i} must have exactly 2 captions: {e}")
                    q = {"reference_name": e["candidate"],
                         "relative_captions": (e["captions"][0], e["captions"][1]),
                         "category": cat}
                    if "target" in e:
                        q["target_name"] = e["target"]
                    self._queries.append(q)
                    self._query_paths.append(image_dir / f"{e['candidate']}.jpg")
        if mode == "query":
            report_queries(self.label, cap_paths, self._queries)

    def query_texts(self, query: dict) -> tuple[str, str]:
        """The two sentences made from the query's two captions; their features are combined (METHOD §10)."""
        return fashioniq_texts(*query["relative_captions"])


CIRR_SPLITS = {"train": "train", "val": "dev", "test1": "test1"}


class CIRRDataset(_Base):
    """CIRR (METHOD §11). split: train, val (images under dev/), test1 ('test' is accepted for test1).

    gallery: keys of `cirr/image_splits/split.rc2.<split>.json`, image = root / value. query:
    `cirr/captions/cap.rc2.<split>.json` as `{"reference_name", "relative_caption", "pair_id",
    "group_members" (6 names incl. the reference), "target_name" (train/val)}`.
    """

    def __init__(self, root, split: str, mode: str, preprocess: Callable, require_images: bool = True):
        _check_mode(mode)
        _check_preprocess(preprocess)
        split = "test1" if split == "test" else split
        if split not in CIRR_SPLITS:
            raise ValueError(f"CIRR split must be one of {tuple(CIRR_SPLITS)} (or 'test'), got {split!r}")
        self.root, self.split, self.mode, self.preprocess = Path(root), split, mode, preprocess
        root = self.root
        _require(root, CIRR_LAYOUT, root, "CIRR root folder", is_dir=True)
        if require_images:  # the annotations alone serve to check a server file
            _require(root / CIRR_SPLITS[split], CIRR_LAYOUT, root, f"CIRR {split} image folder", is_dir=True)
        split_path = root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
        name_to_rel = _read_json(split_path, CIRR_LAYOUT, root, "CIRR image split")
        if not isinstance(name_to_rel, dict):
            raise AnnotationFormatError(f"{split_path}: expected a JSON object name -> relative path")
        bad = next((n for n, rel in name_to_rel.items() if not isinstance(rel, str)), None)
        if bad is not None:
            raise AnnotationFormatError(f"{split_path}: entry {bad!r} maps to {name_to_rel[bad]!r}, not a relative "
                                        "path (a string)")
        check_inside(((repr(n), rel) for n, rel in name_to_rel.items()), root, split_path)
        self.names = list(name_to_rel)
        self._gallery_paths = [root / rel for rel in name_to_rel.values()]
        self._queries, self._query_paths = [], []
        if mode == "query":
            cap_path = root / "cirr" / "captions" / f"cap.rc2.{split}.json"
            entries = _read_json(cap_path, CIRR_LAYOUT, root, "CIRR captions")
            schema = {"pairid": int, "reference": str, "caption": str, "img_set": {"members": [str]}}
            check_entries(entries, schema | ({"target_hard": str} if split != "test1" else {}), cap_path, unique="pairid")
            for e in entries:
                q = {"reference_name": e["reference"], "relative_caption": e["caption"], "pair_id": e["pairid"],
                     "group_members": list(e["img_set"]["members"])}
                if split != "test1":
                    q["target_name"] = e["target_hard"]
                self._queries.append(q)
            # Names the queries use must be in the split, else the reference has no image path and
            # metrics have no gallery column: say so now rather than mid-evaluation.
            used = {q["reference_name"] for q in self._queries}
            used |= {m for q in self._queries for m in q["group_members"]}
            used |= {q["target_name"] for q in self._queries if "target_name" in q}
            unknown = sorted(used - name_to_rel.keys())
            if unknown:
                raise AnnotationFormatError(f"{cap_path}: {len(unknown)} image names are not in {split_path}, "
                                            f"e.g. {unknown[:5]}")
            self._query_paths = [root / name_to_rel[q["reference_name"]] for q in self._queries]
            report_queries(self.label, [cap_path], self._queries)


class FileList(Sequence[Path]):
    """`folder / name` for each of `file_names`, as a read-only sequence of Paths made when read.

    CIRCO's gallery has 123,403 files: building their Path objects up front costs over a second per
    dataset, and a run served by the feature cache reads none of them. `strings()` gives the same
    files as plain strings (what `os.stat` takes), without making Paths.
    """

    __slots__ = ("folder", "file_names")

    def __init__(self, folder, file_names: Sequence[str]):
        self.folder, self.file_names = Path(folder), list(file_names)

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.folder / n for n in self.file_names[i]]
        return self.folder / self.file_names[i]

    def __iter__(self):
        folder = self.folder
        return (folder / n for n in self.file_names)

    def __eq__(self, other) -> bool:
        if isinstance(other, FileList):
            return self.folder == other.folder and self.file_names == other.file_names
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable-looking like the list it stands for

    def __repr__(self) -> str:
        return f"FileList({str(self.folder)!r}, {len(self)} files)"

    def strings(self) -> list[str]:
        """The files as strings, `os.path.join(folder, name)` each (same files as the Paths)."""
        folder = str(self.folder)
        prefix = os.path.join(folder, "")
        isabs = os.path.isabs
        return [n if isabs(n) else prefix + n for n in self.file_names]


def _circo_gallery(info_path: Path, root: Path, image_dir: Path) -> tuple[list[str], list[str]]:
    """(names, file names) of CIRCO's gallery annotation, checked (each file inside `image_dir`)."""
    info = _read_json(info_path, CIRCO_LAYOUT, root, "CIRCO gallery annotation",
                      hint="the COCO 2017 unlabeled image info, from the COCO 2017 'Unlabeled image info' download")
    if not isinstance(info, dict) or "images" not in info:
        raise AnnotationFormatError(f"{info_path}: expected a JSON object with an 'images' list")
    check_entries(info["images"], {"id": (int, str), "file_name": str}, info_path, unique="id")
    file_names = [im["file_name"] for im in info["images"]]
    check_inside(enumerate(file_names), image_dir, info_path)
    return [str(im["id"]) for im in info["images"]], file_names


class CIRCODataset(_Base):
    """CIRCO (METHOD §11). split: val or test.

    gallery: every image of `COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`, name =
    str(id), file under `COCO2017_unlabeled/unlabeled2017/`. query: `annotations/<split>.json` as
    `{"reference_name": str(reference_img_id), "relative_caption", "shared_concept", "query_id",
    and for val "target_name": str(target_img_id), "gt_img_ids": list of str}`.

    `gallery`: a CIRCODataset of the same root whose parse of the 30 MB gallery annotation is reused
    (a gallery-mode and a query-mode dataset of one evaluation read the same file). `query_text`: how
    `query_texts` builds the modification text, a key of CIRCO_QUERY_TEMPLATES.
    """

    def __init__(self, root, split: str, mode: str, preprocess: Callable, gallery: "CIRCODataset | None" = None,
                 query_text: str = "relative", require_images: bool = True):
        if query_text not in CIRCO_QUERY_TEMPLATES:
            raise ValueError(f"CIRCO query_text must be one of {tuple(CIRCO_QUERY_TEMPLATES)}, got {query_text!r}")
        self.query_text = query_text
        _check_mode(mode)
        _check_preprocess(preprocess)
        if split not in ("val", "test"):
            raise ValueError(f"CIRCO split must be val or test, got {split!r}")
        self.root, self.split, self.mode, self.preprocess = Path(root), split, mode, preprocess
        root = self.root
        _require(root, CIRCO_LAYOUT, root, "CIRCO root folder", is_dir=True)
        image_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
        if require_images:  # the annotations alone serve to check a server file
            _require(image_dir, CIRCO_LAYOUT, root, "CIRCO image folder", is_dir=True)
        info_path = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
        if gallery is not None and Path(gallery.root) == root:
            self.names, self._gallery_paths = list(gallery.names), gallery.gallery_paths
        else:
            self.names, file_names = _circo_gallery(info_path, root, image_dir)
            self._gallery_paths = FileList(image_dir, file_names)
        self._queries, self._query_paths = [], []
        if mode == "query":
            ann_path = root / "annotations" / f"{split}.json"
            entries = _read_json(ann_path, CIRCO_LAYOUT, root, "CIRCO query annotation")
            schema = {"id": int, "reference_img_id": (int, str), "relative_caption": str, "shared_concept": str}
            if split == "val":
                schema |= {"target_img_id": (int, str), "gt_img_ids": [(int, str)]}
            check_entries(entries, schema, ann_path, unique="id")
            for e in entries:
                q = {"reference_name": str(e["reference_img_id"]), "relative_caption": e["relative_caption"],
                     "shared_concept": e["shared_concept"], "query_id": e["id"]}
                if split == "val":
                    q["target_name"] = str(e["target_img_id"])
                    # "" entries are the authors' padding to 23; they are not ground truths
                    q["gt_img_ids"] = [str(g) for g in e["gt_img_ids"] if str(g) != ""]
                if isinstance(e.get("semantic_aspects"), list):  # the current CIRCO release lists them
                    q["semantic_aspects"] = [str(a) for a in e["semantic_aspects"]]
                self._queries.append(q)
            index = {n: i for i, n in enumerate(self.names)}
            used = {q["reference_name"] for q in self._queries}
            used |= {g for q in self._queries for g in q.get("gt_img_ids", ())}
            unknown = sorted(used - index.keys())
            if unknown:
                raise AnnotationFormatError(f"{ann_path}: {len(unknown)} image ids are not in {info_path}, "
                                            f"e.g. {unknown[:5]}")
            self._query_paths = [self._gallery_paths[index[q["reference_name"]]] for q in self._queries]
            report_queries(self.label, [ann_path], self._queries)

    def query_texts(self, query: dict) -> tuple[str]:
        """The modification text of one of `.queries`: CIRCO_QUERY_TEMPLATES[self.query_text] filled with its
        relative caption (and shared concept, stripped of spaces and a final full stop)."""
        concept = query.get("shared_concept", "").strip().rstrip(".").strip()
        return (CIRCO_QUERY_TEMPLATES[self.query_text].format(relative_caption=query["relative_caption"],
                                                              shared_concept=concept),)


class ImageNetPairsDataset(Dataset):
    """ImageNet-1K test images with their BLIP subject/attribute pairs, for training (METHOD §8).

    Pairs JSON: list of `{"img_id", "subject", "attribute"}`; image
    `<root>/test/ILSVRC2012_test_<img_id>.JPEG`, converted to RGB (METHOD §8) before `preprocess`.
    Samples `{"image", "img_id", "subject", "attribute"}`; `.pairs` is the metadata, `.names` the ids.
    """

    def __init__(self, root, pairs_path, preprocess: Callable):
        _check_preprocess(preprocess)
        self.root, self.pairs_path, self.preprocess = Path(root), Path(pairs_path), preprocess
        root = self.root
        _require(root, IMAGENET_LAYOUT, root, "ImageNet root folder", is_dir=True)
        self.image_dir = _require(root / "test", IMAGENET_LAYOUT, root, "ImageNet test image folder", is_dir=True)
        pairs = _read_json(self.pairs_path, IMAGENET_LAYOUT, root, "pairs file")
        check_entries(pairs, {"img_id": (int, NONEMPTY), "subject": NONEMPTY, "attribute": NONEMPTY}, self.pairs_path,
                       unique="img_id")
        if not pairs:
            raise AnnotationFormatError(f"{self.pairs_path}: the pairs list is empty; write it with src/caption.py "
                                        "(one entry per ImageNet test image)")
        self.pairs = [{"img_id": str(p["img_id"]), "subject": p["subject"], "attribute": p["attribute"]}
                      for p in pairs]
        self.names = [p["img_id"] for p in self.pairs]
        present = set(os.listdir(self.image_dir))  # one listing instead of a stat per file
        missing = [i for i in self.names if imagenet_file_name(i) not in present]
        if missing:
            raise DatasetLayoutError(
                f"{len(missing)} of {len(self.names)} images listed in {self.pairs_path} are missing from "
                f"{self.image_dir}, e.g. ids {missing[:5]} (expected {self._path(missing[0])}); download the "
                f"missing images or regenerate the pairs file\nExpected layout (root = {root}):\n{IMAGENET_LAYOUT}")

    def _path(self, img_id: str) -> Path:
        return self.image_dir / imagenet_file_name(img_id)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.pairs[i])
        sample["image"] = self.preprocess(load_image(self._path(sample["img_id"])).convert("RGB"))
        return sample


IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def list_images(folder) -> list[str]:
    """Every image file under `folder` (recursive, `utils.walk_files`: hidden files and folders skipped,
    each real folder once; suffixes IMAGE_SUFFIXES in any case), as sorted '/'-separated paths relative to it."""
    return [f for f in walk_files(folder) if f.lower().endswith(IMAGE_SUFFIXES)]


class ImageFolderDataset(_Base):
    """Any folder of images as a retrieval gallery, with composed queries over it (retrieve.py).

    gallery: every image under `root` (`list_images`), named by its path relative to `root`. query:
    `queries` (reference image file, modification text) pairs as `{"reference_name": the file as given,
    "relative_caption": the text}`; a reference may lie anywhere, in the gallery or not.
    """

    split = ""

    def __init__(self, root, mode: str, preprocess: Callable, queries: Sequence[tuple[str, str]] = ()):
        _check_mode(mode)
        _check_preprocess(preprocess)
        self.root, self.mode, self.preprocess = Path(root), mode, preprocess
        if not self.root.is_dir():
            raise DatasetLayoutError(f"image folder not found: {self.root}")
        self.names = list_images(self.root) if mode == "gallery" else []
        if mode == "gallery" and not self.names:
            raise DatasetLayoutError(f"no images ({' '.join(IMAGE_SUFFIXES)}) under {self.root}")
        self._gallery_paths = [self.root / n for n in self.names]
        self._queries, self._query_paths = [], []
        if mode == "query":
            for reference, text in queries:
                path = Path(reference)
                if not path.is_file():
                    raise ImageLoadError(f"{path}: reference image not found")
                if not isinstance(text, str) or not text.strip():
                    raise AnnotationFormatError(f"the query with reference {path} has no modification text")
                self._queries.append({"reference_name": str(reference), "relative_caption": text})
                self._query_paths.append(path)


def collate(batch: Sequence[dict]) -> dict:
    """DataLoader collate_fn for dict samples: tensors are stacked, everything else becomes a list
    (variable-length lists stay lists of lists, FashionIQ caption pairs a list of pairs)."""
    if not batch:
        raise ValueError("collate got an empty batch")
    keys = list(batch[0])
    for i, s in enumerate(batch):
        if set(s) != set(keys):
            raise ValueError(f"sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    out = {}
    for k in keys:
        values = [s[k] for s in batch]
        out[k] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
