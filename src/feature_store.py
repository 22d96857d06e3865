"""One on-disk store for what the frozen CLIP gives per image, used three ways:

- training rows (train.py --cache-image-features): g [n, D] and P [n, N+1, W] of every training image,
  rounded to fp16, stored as training first meets each image and read back by the DataLoader workers
  (train_features.py: its writer thread stores them through `RowFiles`);
- gallery embeddings (evaluate.py, test.py, retrieve.py --cache-dir, training's validation): [G, D]
  L2-normalised fp32 (`EvalCache.read_gallery` / `write_gallery`);
- reference outputs (--cache-reference-tokens): raw g [R, D] and P [R, N+1, W] fp32 of the query
  reference images (`ReferenceOutputs`, `EvalCache.read_references` / `write_references`).

A store is a folder `<root>/<label>-<hash>/` with `meta.json` (its key and its arrays' shapes), one
`.npy` file per array (row i belongs to names[i]) and `filled.npy` (filled[i]: row i holds data). The key
(`store_key`) is everything the rows depend on: FrozenCLIP.fingerprint(), the transform, the precision
the tower ran in and the dtype the rows are kept in, the image list, and the image files themselves,
by size and modification time or, with `hash_contents` (--cache-hash-images), by their bytes. A folder
whose key differs is not used (`why_not_used` says why, the one such message of every cache) and is
replaced. The folder's name covers only what keeps two stores apart (`folder_name`), so a store made
stale by changed images or changed CLIP weights is replaced in place, not left beside the new one.

Writing: the files are made in a temporary folder of this process (O_EXCL, O_NOFOLLOW: no path that a
symbolic link could redirect), their full size reserved (posix_fallocate), and the folder is renamed
into place. Rows are stored with os.pwrite on file descriptors, never through a writable memory map,
so a full disk is an OSError, not a bus error; the data files are flushed (fdatasync) before `filled`
is set for their rows, so a crash never leaves a row marked filled over missing data. Reading:
read-only or copy-on-write memory maps. Temporaries left by processes of this host that are no longer
running are removed when a store's root is opened.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from errors import UserError
from logs import get_logger
from utils import remove_dead_temporaries as _remove_dead_temporaries, remove_path, sha256_text, show_progress, temp_path

DEFAULT_CACHE_DIR = Path(".cache") / "features"
FORMAT = "fti4cir-feature-store"
VERSION = 2  # bump when what a row holds changes: every store made before becomes stale
# what gives a store its own folder; any other key difference makes the folder stale, replaced in place
SLOT_FIELDS = ("format", "version", "rows", "label", "root", "transform", "precision", "dtype", "images_keyed_by")
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)
# Linux's sync_file_range(2), which os does not offer: starts writing a file's dirty pages back without
# waiting, so that the flush that follows (fdatasync) finds little left to write
_sync_file_range = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), "sync_file_range", None)
_SYNC_FILE_RANGE_WRITE = 2

log = get_logger("feature_store")


class FeatureCacheError(UserError):
    """A store folder cannot be made, read or written (the message names it and says what to do)."""


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


# ---------------------------------------------------------------------------------------------
# the key

def describe_transform(transform) -> str:
    """A stable text for a preprocessing pipeline (no memory addresses), for the key."""
    steps = getattr(transform, "transforms", [transform])
    parts = []
    for t in steps:
        if hasattr(t, "__code__"):  # a plain function: its repr holds an address
            parts.append(f"{t.__module__}.{t.__qualname__}")
        else:
            parts.append(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(t)))
    return " | ".join(parts)


def gallery_files(dataset) -> list[str] | None:
    """A gallery-mode dataset's image files as strings (datasets.FileList.strings(): no Path objects)."""
    paths = getattr(dataset, "gallery_paths", None)
    if paths is None:
        return None
    strings = getattr(paths, "strings", None)
    return strings() if strings is not None else [os.fspath(p) for p in paths]


def files_fingerprint(files: Sequence[str]) -> str:
    """Hash of the files' sizes and modification times, in order; a missing file has its own line (its
    error then comes from the encoder, never hidden by a cache hit). One stat per file, hashed as one block."""
    stat_, lines = os.stat, []
    for p in files:
        try:
            st = stat_(p)
            lines.append(f"{st.st_size}:{st.st_mtime_ns}\n")
        except OSError:
            lines.append("missing\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _file_digest(path: str) -> bytes:
    """SHA-256 of a file's bytes, read with plain os.read calls (most image files fit in one; a
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


def files_content_fingerprint(files: Sequence[str], progress: bool = False, threads: int | None = None) -> str:
    """Hash of the files' contents, in order (read and hashed by a thread pool: both release the GIL)."""
    threads = threads or min(32, 4 * (os.cpu_count() or 1))
    h = hashlib.sha256()
    with ThreadPoolExecutor(threads) as pool:
        digests = pool.map(_file_digest, files, chunksize=64)
        for d in tqdm(digests, total=len(files), desc="hashing images", unit="file", disable=not show_progress(progress), leave=False):
            h.update(d)
    return h.hexdigest()


def images_fingerprint(dataset) -> str | None:
    """files_fingerprint of a gallery-mode dataset's images (None for a dataset without gallery paths)."""
    files = gallery_files(dataset)
    return None if files is None else files_fingerprint(files)


def images_content_fingerprint(dataset, progress: bool = False, threads: int | None = None) -> str | None:
    files = gallery_files(dataset)
    return None if files is None else files_content_fingerprint(files, progress, threads)


def store_key(rows: str, clip, transform: str, precision: str, dtype: str, names: Sequence[str],
              files: Sequence[str] | None, root, label: str, hash_contents: bool = False, progress: bool = False) -> dict:
    """Everything a store's rows depend on. `rows`: what a row holds ('training', 'gallery', 'references');
    `files`: the image files of `names`, keyed by their sizes and modification times, or by their bytes
    with `hash_contents`; `label`: the folder name's readable prefix."""
    images = None if files is None else (files_content_fingerprint(files, progress) if hash_contents
                                         else files_fingerprint(files))
    return {"format": FORMAT, "version": VERSION, "rows": rows, "clip": clip.fingerprint(), "transform": transform,
            "precision": precision, "dtype": str(np.dtype(dtype)), "label": label, "root": str(Path(root).resolve()),
            "num_images": len(names), "names_sha256": sha256_text("\x00".join(names)),
            "images_keyed_by": "contents" if hash_contents else "sizes-and-times", "images_sha256": images}


def folder_name(key: dict) -> str:
    """`<label>-<hash>`: the hash covers SLOT_FIELDS and where CLIP's weights came from."""
    slot = {k: key[k] for k in SLOT_FIELDS}
    slot["clip"] = {k: key["clip"].get(k) for k in ("source", "pretrained")}
    if key["rows"] == "training":  # a run on part of the images must not replace the whole set's rows
        slot["names_sha256"] = key["names_sha256"]
    return f"{key['label']}-{sha256_text(json.dumps(slot, sort_keys=True))[:16]}"


def gallery_tag(dataset) -> str:
    """A gallery's label: the dataset's, except that CIRCO's val and test share one gallery (all of COCO
    unlabeled), so one store serves both."""
    label = dataset.label
    return "circo" if label.startswith("circo-") else label


def gallery_key(clip, dataset, precision: str, hash_contents: bool = False, progress: bool = False) -> dict:
    """The key of a gallery-mode dataset's embeddings."""
    return store_key("gallery", clip, describe_transform(dataset.preprocess), precision, "float32", list(dataset.names),
                     gallery_files(dataset), getattr(dataset, "root", ""), gallery_tag(dataset), hash_contents, progress)


def references_key(key: dict, refs: Sequence[str]) -> dict:
    """The key of the reference outputs of gallery images `refs`, from the gallery's key."""
    names = sha256_text("\x00".join(refs))
    return {**key, "rows": "references", "label": f"{key['label']}-refs-{names[:16]}", "num_images": len(refs),
            "names_sha256": names, "gallery_names_sha256": key["names_sha256"]}


# ---------------------------------------------------------------------------------------------
# folders and files

def _size(n: float) -> str:
    units = ((30, 2, "GiB"), (20, 1, "MiB"), (10, 1, "KiB"), (0, 0, "bytes"))
    return next(f"{n / 2**k:.{d}f} {unit}" for k, d, unit in units if n >= 2**k or k == 0)


def remove_dead_temporaries(root) -> None:
    """Remove the temporaries in `root` made on this host by processes no longer running."""
    _remove_dead_temporaries(root, "feature cache")


def _header(shape: tuple, dtype: np.dtype) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                               "shape": tuple(shape)})
    return out.getvalue()


def _read_header(path: Path) -> tuple[tuple, np.dtype, int, int]:
    """(shape, dtype, data offset, file size) of a .npy file; raises OSError (ELOOP for a link) or ValueError."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise ValueError("Fortran order")
        return tuple(shape), dtype, f.tell(), os.fstat(f.fileno()).st_size


def _read_meta(folder: Path) -> dict | None:
    try:
        with os.fdopen(os.open(folder / "meta.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def why_not_used(folder, key: dict, arrays: dict[str, tuple | None], complete: bool = False) -> str | None:
    """Why the store folder cannot serve `key` (None when it can): the one message every cache gives.
    `arrays`: the arrays it must hold, name -> full shape (None: any shape of num_images rows);
    `complete`: every row must be filled."""
    folder = Path(folder)
    try:
        mode = os.lstat(folder).st_mode
    except OSError:
        return "no such folder"
    if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
        return "not a folder this store made (a file or a symbolic link)"
    meta = _read_meta(folder)
    if meta is None:
        return "its meta.json is missing or unreadable"
    old = meta.get("key")
    if not isinstance(old, dict) or old.get("format") != FORMAT or not isinstance(meta.get("arrays"), dict):
        return "not a feature store folder"
    diffs = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    if diffs:
        return f"stale: made for other {', '.join(diffs)}"
    n = key["num_images"]
    want = {name: (shape, np.dtype(key["dtype"])) for name, shape in arrays.items()}
    want["filled"] = ((n,), np.dtype(np.bool_))
    for name, (shape, dtype) in want.items():
        spec = meta["arrays"].get(name, {}) if name != "filled" else {"shape": [n], "dtype": "bool"}
        recorded = (tuple(spec.get("shape", ())), str(spec.get("dtype")))
        if recorded[0][:1] != (n,) or recorded[1] != str(dtype) or (shape is not None and recorded[0] != tuple(shape)):
            return f"meta.json records {name} as {recorded[1]} {list(recorded[0])}, expected {dtype} {list(shape or [n])}"
        try:
            got_shape, got_dtype, offset, size = _read_header(folder / f"{name}.npy")
        except OSError as e:
            return f"{name}.npy is a symbolic link" if e.errno == errno.ELOOP else f"{name}.npy is unreadable ({e.strerror})"
        except ValueError:
            return f"{name}.npy is not a .npy file"
        if got_shape != recorded[0] or got_dtype != dtype:
            return f"{name}.npy holds {got_dtype} {list(got_shape)}, expected {dtype} {list(recorded[0])}"
        if size < offset + int(np.prod(got_shape)) * dtype.itemsize:
            return f"{name}.npy is truncated"
    if complete:
        filled = np.load(folder / "filled.npy", mmap_mode="r")
        if not filled.all():
            return f"{n - int(np.count_nonzero(filled))} of {n} rows are missing"
    return None


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _reserve(fd: int, size: int, path: Path) -> None:
    """The file's full size on disk now, so that a shortage shows before any row is stored."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        log.info(f"feature cache: {path.parent} cannot reserve disk space ({e.strerror}); going on without (a full "
                 "disk then stops the run when a row is written)")
        os.ftruncate(fd, size)


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename the finished temporary folder to `folder`; whatever is there (a stale store, a file, a link)
    is first moved aside, then removed."""
    try:
        os.rename(tmp, folder)
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
    old = temp_path(folder)
    os.rename(folder, old)  # a link is renamed as a link, never followed
    try:
        os.rename(tmp, folder)
    except OSError:  # another process made one meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    remove_path(old)


def _shortage(folder: Path, need: int, key: dict) -> FeatureCacheError:
    return FeatureCacheError(f"{folder} needs {_size(need)} of disk for its {key['num_images']} rows and "
                             f"{folder.parent} has {_size(shutil.disk_usage(folder.parent).free)} free")


def create_store(folder, key: dict, arrays: dict[str, tuple], data: dict[str, np.ndarray] | None = None) -> Path:
    """Make the store folder for `key` with `arrays` (name -> shape), replacing what is there.

    Without `data` every row starts unfilled (the training rows, stored later); with it (name -> the
    whole array) the rows are written and all marked filled before the folder appears under its name.
    Raises FeatureCacheError when the disk lacks room, naming the size needed and the space free."""
    folder = Path(folder)
    dtype = np.dtype(key["dtype"])
    specs = {name: (tuple(shape), dtype) for name, shape in arrays.items()}
    specs["filled"] = ((key["num_images"],), np.dtype(np.bool_))
    headers = {name: _header(*spec) for name, spec in specs.items()}
    sizes = {name: len(headers[name]) + int(np.prod(spec[0])) * spec[1].itemsize for name, spec in specs.items()}
    need = sum(sizes.values())
    if need > shutil.disk_usage(folder.parent).free:
        raise _shortage(folder, need, key)
    tmp = temp_path(folder)
    os.mkdir(tmp)
    try:
        for name, (shape, dt) in specs.items():
            fd = os.open(tmp / f"{name}.npy", _NEW_FILE, 0o666)
            try:
                _pwrite_all(fd, headers[name], 0)
                _reserve(fd, sizes[name], tmp / f"{name}.npy")
                if data is not None:
                    body = np.ones(shape, np.bool_) if name == "filled" else np.ascontiguousarray(data[name], dt)
                    _pwrite_all(fd, body, len(headers[name]))
                    os.fdatasync(fd)  # the rows on disk before the folder that vouches for them appears
            finally:
                os.close(fd)
        meta = {"key": key, "arrays": {name: {"shape": list(s), "dtype": str(dt)} for name, (s, dt) in specs.items()
                                       if name != "filled"}}
        fd = os.open(tmp / "meta.json", _NEW_FILE, 0o666)
        try:
            _pwrite_all(fd, json.dumps(meta, indent=1, sort_keys=True).encode("utf-8"), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        _swap_in(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _shortage(folder, need, key) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def prepare_store(root, key: dict, arrays: dict[str, tuple], suffix: str = "") -> Path:
    """The training store for `key` under `root`, made (or made afresh when stale or foreign) as needed;
    `suffix` ends the folder name (one store per node). Other folders in `root` are left alone; the reason
    each is not used is logged."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(root)
    folder = root / (folder_name(key) + suffix)
    if os.path.lexists(folder):
        why = why_not_used(folder, key, arrays)
        if why is None:
            return folder
        log.info(f"feature cache: {folder} not used ({why}); making a fresh one")
        remove_path(folder)  # first, so that its disk space counts as free for the new one
    else:
        others = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for other in others[:10]:
            why = why_not_used(other, key, arrays)
            if why is not None:  # None: another node's store for the same key
                log.info(f"feature cache: {other} not used ({why})")
    store = create_store(folder, key, arrays)
    n, row = key["num_images"], sum(int(np.prod(s[1:])) for s in arrays.values()) * np.dtype(key["dtype"]).itemsize
    log.info(f"feature cache: new cache {folder}: {n} images x {_size(row)} = {_size(n * row)}")
    return store


# ---------------------------------------------------------------------------------------------
# an opened store

class FeatureStore:
    """A store folder that serves `key` with `arrays` (name -> shape or None, as why_not_used takes)."""

    def __init__(self, folder, key: dict, arrays: dict[str, tuple | None], complete: bool = False, check: bool = True):
        self.folder = Path(folder)
        why = why_not_used(self.folder, key, arrays, complete) if check else None
        if why is not None:
            raise FeatureCacheError(f"feature cache {self.folder} is not usable ({why})")
        self.key = key
        meta = _read_meta(self.folder)["arrays"]
        self.shapes = {name: tuple(meta[name]["shape"]) for name in arrays}
        self.dtype = np.dtype(key["dtype"])

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

    def filled(self) -> np.ndarray:
        return np.load(self.path("filled"), mmap_mode="r")

    def num_filled(self) -> int:
        return int(np.count_nonzero(self.filled()))

    def tensor(self, name: str) -> torch.Tensor:
        """The whole array, memory-mapped copy-on-write: read when used, and writes to the tensor stay in
        memory (the file, and the maps of other processes, never change)."""
        return torch.from_numpy(np.load(self.path(name), mmap_mode="c"))


class RowFiles:
    """A store's files opened for os.pwrite (O_NOFOLLOW: never through a link): rows are written to the
    file, not through a writable memory map, so a full disk raises OSError rather than a bus error."""

    def __init__(self, store: FeatureStore):
        self.fds, self.offsets, self.row_bytes = {}, {}, {}
        for name in (*store.shapes, "filled"):
            shape, dtype, offset, _ = _read_header(store.path(name))
            self.fds[name] = os.open(store.path(name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            self.offsets[name], self.row_bytes[name] = offset, int(np.prod(shape[1:])) * dtype.itemsize

    def write_rows(self, name: str, rows: np.ndarray, data: np.ndarray) -> None:
        """data[j] to row rows[j]: one pwrite per row, in ascending file order (no reordering copy)."""
        fd, offset, size = self.fds[name], self.offsets[name], self.row_bytes[name]
        for j in np.argsort(rows, kind="stable"):
            _pwrite_all(fd, data[j], offset + int(rows[j]) * size)

    def start_writeback(self, name: str) -> None:
        """Start writing the file's dirty pages back, without waiting (nothing where Linux's call is missing)."""
        if _sync_file_range is not None:
            _sync_file_range(self.fds[name], ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)

    def sync(self, name: str) -> None:
        os.fdatasync(self.fds[name])

    def mark_filled(self, rows: np.ndarray) -> None:
        """filled[rows] = True, one pwrite per run of consecutive rows; only these rows' bytes are written,
        so processes filling other rows of the same file never overwrite each other's flags."""
        rows = np.unique(rows)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(rows, breaks):
            if len(run):
                _pwrite_all(self.fds["filled"], b"\x01" * len(run), self.offsets["filled"] + int(run[0]))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


# ---------------------------------------------------------------------------------------------
# evaluation: gallery embeddings and reference outputs

class EvalCache:
    """--cache-dir: the gallery embeddings and reference outputs of evaluation, one store folder each,
    written whole and read memory-mapped; `hash_contents`: the images enter the key by their bytes."""

    def __init__(self, root, hash_contents: bool = False):
        self.root, self.hash_contents = Path(root), hash_contents

    def key(self, clip, dataset, precision: str, progress: bool = False) -> dict:
        return gallery_key(clip, dataset, precision, self.hash_contents, progress)

    def _open(self, key: dict, arrays: tuple[str, ...], what: str) -> FeatureStore | None:
        remove_dead_temporaries(self.root)
        folder = self.root / folder_name(key)
        why = why_not_used(folder, key, dict.fromkeys(arrays), complete=True)
        if why is not None:
            log.info(f"{what}: {folder} not used ({why}); computing")
            return None
        return FeatureStore(folder, key, dict.fromkeys(arrays), check=False)  # just checked

    def _write(self, key: dict, data: dict[str, np.ndarray], what: str) -> bool:
        folder = self.root / folder_name(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_dead_temporaries(self.root)
            create_store(folder, key, {name: a.shape for name, a in data.items()}, data)
        except (OSError, FeatureCacheError) as e:  # a full disk or read-only folder costs the next run time, not this run's
            log.info(f"{what}: could not write {folder} ({e}); continuing without caching")
            return False
        log.info(f"{what}: wrote {folder}")
        return True

    def read_gallery(self, key: dict) -> torch.Tensor | None:
        """The cached [G, D] features (memory-mapped), or None (the reason logged)."""
        store = self._open(key, ("features",), "gallery cache")
        if store is None:
            return None
        how = "their contents" if key["images_keyed_by"] == "contents" else \
            "their sizes and modification times; --cache-hash-images keys it by their contents"
        log.info(f"gallery cache: hit {store.folder} ({key['num_images']} images, keyed by {how})")
        return store.tensor("features")

    def write_gallery(self, key: dict, feats: torch.Tensor) -> bool:
        return self._write(key, {"features": feats.detach().to("cpu", torch.float32).numpy()}, "gallery cache")

    def read_references(self, key: dict, refs: Sequence[str]) -> ReferenceOutputs | None:
        """The cached outputs of the gallery images `refs`, or None (the reason logged)."""
        store = self._open(references_key(key, refs), ("g", "P"), "reference-token cache")
        if store is None:
            return None
        log.info(f"reference-token cache: hit {store.folder} ({len(refs)} reference images)")
        return ReferenceOutputs(refs, store.tensor("g"), store.tensor("P"))

    def write_references(self, key: dict, outputs: ReferenceOutputs) -> bool:
        data = {"g": outputs.g.to(torch.float32).numpy(), "P": outputs.P.to(torch.float32).numpy()}
        return self._write(references_key(key, outputs.names), data, "reference-token cache")
