"""The on-disk cache of gallery features for evaluation (evaluate.py, test.py, training's validation).

A gallery's CLIP embeddings depend only on CLIP, the preprocessing, the gallery's images and the
precision, so they are stored once and evaluating another checkpoint recomputes only the queries.
One file per (benchmark gallery, CLIP source, preprocessing, precision, dataset root) in the cache
folder; the file holds its key (a hash of `gallery_meta`): a file whose key, names or shape differ from
what is asked for (stale) or that is not one of ours (foreign) is reported, recomputed and replaced.

By default the key covers each image file's size and modification time, not its contents: an image
replaced by another of the same size and time is not noticed. `contents=True` (`--cache-hash-images`)
keys the cache on a hash of every image file's bytes instead (read by a thread pool).

Beside a gallery file, `--cache-reference-tokens` keeps the reference images' visual-tower outputs
(`ReferenceOutputs`) under the same key.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from logs import get_logger
from utils import atomic_torch_save, sha256_text

DEFAULT_CACHE_DIR = Path(".cache") / "features"
CACHE_FORMAT = "fti4cir-gallery-features"
TOKEN_CACHE_FORMAT = "fti4cir-reference-tokens"
# Bump when the way gallery features are computed changes: every older cache file becomes stale.
CACHE_VERSION = 1

log = get_logger("gallery_cache")


@dataclass
class ReferenceOutputs:
    """What the visual tower gives for the reference images: raw `g` [R, D] (not normalised) and the
    visual tokens `P` [R, N+1, W], float32 on the CPU, row r for `names[r]`. With these, composed
    queries need no visual pass of their own."""

    names: list[str]
    g: torch.Tensor
    P: torch.Tensor

    def __post_init__(self):
        self.names = list(self.names)
        self.row = {n: i for i, n in enumerate(self.names)}


def describe_transform(transform) -> str:
    """A stable text for a preprocessing pipeline (no memory addresses), for the cache key."""
    steps = getattr(transform, "transforms", [transform])
    parts = []
    for t in steps:
        if hasattr(t, "__code__"):  # a plain function: its repr holds an address
            parts.append(f"{t.__module__}.{t.__qualname__}")
        else:
            parts.append(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(t)))
    return " | ".join(parts)


def _gallery_files(dataset) -> list[str] | None:
    paths = getattr(dataset, "gallery_paths", None)
    if paths is None:
        return None
    strings = getattr(paths, "strings", None)
    return strings() if strings is not None else [os.fspath(p) for p in paths]


def _file_digest(path: str) -> bytes:
    """SHA-256 of a file's bytes, read with plain os.read calls (most gallery files fit in one; a
    hashlib.file_digest call allocates a 256 KiB buffer per file, which costs more than the hash here)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b"missing"
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.digest()
    except OSError:
        return b"unreadable"
    finally:
        os.close(fd)


def images_content_fingerprint(dataset, progress: bool = False, threads: int | None = None) -> str | None:
    """Hash of the gallery image files' contents, in gallery order (a missing file counts as changed).
    The files are read and hashed by a thread pool (hashing and reading release the GIL)."""
    files = _gallery_files(dataset)
    if files is None:
        return None
    threads = threads or min(32, 4 * (os.cpu_count() or 1))
    h = hashlib.sha256()
    with ThreadPoolExecutor(threads) as pool:
        digests = pool.map(_file_digest, files, chunksize=64)
        for d in tqdm(digests, total=len(files), desc="hashing gallery images", unit="file", disable=not progress,
                      leave=False):
            h.update(d)
    return h.hexdigest()


def images_fingerprint(dataset) -> str | None:
    """Hash of the gallery image files' sizes and modification times: images regenerated or replaced
    under the same names make the cache stale. A missing file counts as changed (its error then
    comes from the encoder, never hidden by a cache hit).

    One stat per file, on plain strings (datasets.FileList.strings(): no Path objects for CIRCO's
    123,403 files), hashed as one block; the same digest as hashing each file's line in turn."""
    files = _gallery_files(dataset)
    if files is None:
        return None
    stat = os.stat
    lines = []
    for p in files:
        try:
            st = stat(p)
            lines.append(f"{st.st_size}:{st.st_mtime_ns}\n")
        except OSError:
            lines.append("missing\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def gallery_tag(dataset) -> str:
    """The cache file's readable prefix: the dataset's label, except that CIRCO's val and test share one
    gallery (all of COCO unlabeled), so one cache entry serves both."""
    label = dataset.label
    return "circo" if label.startswith("circo-") else label


def gallery_meta(clip, dataset, precision: str, contents: bool = False, progress: bool = False) -> dict:
    """Everything gallery features depend on; the cache key is its hash. `contents`: the images enter the
    key by their bytes, not by their sizes and modification times."""
    names = list(dataset.names)
    images = {"images_keyed_by": "contents", "images_sha256": images_content_fingerprint(dataset, progress)} \
        if contents else {"images_sha256": images_fingerprint(dataset)}
    return {
        "code_version": CACHE_VERSION,
        "clip": clip.fingerprint(),
        "preprocess": describe_transform(dataset.preprocess),
        "precision": precision,
        "dataset": gallery_tag(dataset),
        "root": str(Path(getattr(dataset, "root", "")).resolve()),
        "num_images": len(names),
        "names_sha256": sha256_text("\x00".join(names)),
        **images,
    }


def _key(meta: dict) -> str:
    return sha256_text(json.dumps(meta, sort_keys=True))


def _joined(names: Sequence[str]) -> str:
    """The gallery names as one string (NUL-separated), as a cache file stores them: unpickling one
    string is instant where 123,403 strings take the weights-only unpickler over a second."""
    return "\x00".join(names)


def _load(path: Path, fmt: str, what: str) -> dict | None:
    """A cache file's dict when it exists, reads and has format `fmt`; else None, the reason logged."""
    if not path.is_file():
        log.info(f"{what}: no file {path}; computing")
        return None
    try:
        # mmap: tensors are read when used (a CPU run's similarity, the copy to a GPU), not first
        # copied into fresh memory (the ViT-L/14 CIRCO cache is 380 MB); a private mapping, so
        # writes go to memory and an atomically replaced file leaves the mapping intact
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is simply not a usable cache
        log.info(f"{what}: {path} is unreadable ({type(e).__name__}); recomputing and overwriting it")
        return None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        log.info(f"{what}: {path} is not a {what} file; recomputing and overwriting it")
        return None
    return obj


def _write(path: Path, obj: dict, what: str) -> bool:
    try:
        atomic_torch_save(obj, path)
    except OSError as e:  # a full disk or read-only folder costs the next run time, not this run's result
        log.info(f"{what}: could not write {path} ({e}); continuing without caching")
        return False
    log.info(f"{what}: wrote {path}")
    return True


class GalleryCache:
    """The cache folder: gallery features and reference outputs, each file keyed by `gallery_meta`
    (`hash_contents`: the images by their bytes)."""

    def __init__(self, folder, hash_contents: bool = False):
        self.folder = Path(folder)
        self.hash_contents = hash_contents

    def meta(self, clip, dataset, precision: str, progress: bool = False) -> dict:
        return gallery_meta(clip, dataset, precision, contents=self.hash_contents, progress=progress)

    def path(self, meta: dict) -> Path:
        """One file per (dataset, CLIP, preprocessing, precision, root): another gallery list or changed
        images overwrite it (stale), another CLIP or precision gets its own file."""
        stable = {k: meta[k] for k in ("dataset", "preprocess", "precision", "root")}
        stable["clip"] = meta["clip"]["source"]
        if "images_keyed_by" in meta:  # the contents-keyed entry lives beside the default one
            stable["images_keyed_by"] = meta["images_keyed_by"]
        return self.folder / f"{meta['dataset']}-{sha256_text(json.dumps(stable, sort_keys=True))[:16]}.pt"

    def references_path(self, meta: dict, refs: Sequence[str]) -> Path:
        gallery = self.path(meta)
        return gallery.with_name(f"{gallery.stem}-refs-{sha256_text(chr(0).join(refs))[:16]}.pt")

    def read(self, meta: dict, names: list[str]) -> torch.Tensor | None:
        """The cached [G, D] features, or None (the reason logged) when absent, foreign or stale."""
        path = self.path(meta)
        obj = _load(path, CACHE_FORMAT, "gallery cache")
        if obj is None:
            return None
        if obj.get("key") != _key(meta):
            old = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
            changed = sorted(k for k in set(meta) | set(old) if old.get(k) != meta.get(k)) or ["key"]
            log.info(f"gallery cache: {path} is stale ({', '.join(changed)} changed); recomputing")
            return None
        feats = obj.get("features")
        joined = obj.get("joined_names")
        same = joined == _joined(names) if isinstance(joined, str) else obj.get("names") == names  # older files: a list
        if not same or not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != len(names):
            log.info(f"gallery cache: {path} does not hold features for these {len(names)} names; recomputing")
            return None
        how = "their contents" if meta.get("images_keyed_by") == "contents" else \
            "their sizes and modification times; --cache-hash-images keys it by their contents"
        log.info(f"gallery cache: hit {path} ({len(names)} images, keyed by {how})")
        return feats

    def write(self, meta: dict, names: list[str], feats: torch.Tensor) -> bool:
        return _write(self.path(meta), {"format": CACHE_FORMAT, "key": _key(meta), "meta": meta,
                                        "joined_names": _joined(names), "features": feats.cpu()}, "gallery cache")

    def read_references(self, meta: dict, refs: list[str]) -> ReferenceOutputs | None:
        """The cached reference outputs, or None (the reason logged) when absent, foreign or stale."""
        path = self.references_path(meta, refs)
        obj = _load(path, TOKEN_CACHE_FORMAT, "reference-token cache")
        if obj is None:
            return None
        ok = (obj.get("key") == _key(meta) and obj.get("names") == refs and isinstance(obj.get("g"), torch.Tensor)
              and isinstance(obj.get("P"), torch.Tensor) and obj["g"].shape[0] == obj["P"].shape[0] == len(refs))
        if not ok:
            log.info(f"reference-token cache: {path} is stale or not ours; recomputing")
            return None
        log.info(f"reference-token cache: hit {path} ({len(refs)} reference images)")
        return ReferenceOutputs(refs, obj["g"], obj["P"])

    def write_references(self, meta: dict, outputs: ReferenceOutputs) -> bool:
        return _write(self.references_path(meta, outputs.names),
                      {"format": TOKEN_CACHE_FORMAT, "key": _key(meta), "names": outputs.names,
                       "g": outputs.g, "P": outputs.P}, "reference-token cache")
