"""On-disk cache of the frozen CLIP visual tower's training outputs (train.py --cache-image-features).

CLIP is frozen and the training transform is deterministic (targetpad or CLIP's own resize/crop), so an
image's `g` [D] and `P` [N+1, W] are the same every epoch. The first time a row is computed it is stored,
rounded to fp16, in memory-mapped `.npy` files; later epochs, runs and resumed runs read it back and never
decode the image nor run the visual tower. Size: (D + (N+1) x W) x 2 bytes per image, about 0.5 MB for
ViT-L/14 (257 x 1024 tokens), about 52 GB for the 100k ImageNet test images.

Layout: `<cache_dir>/<key>/{g.npy, P.npy, filled.npy, meta.json}`, key = hash of what the features depend
on (`cache_meta`). `filled[i]` says row i holds data; it is set only after row i's data is flushed, so an
interrupted run never marks garbage as filled.

The training loop reads its image features through `training.CachedTowerFeatures`, which wraps this cache.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from errors import UserError
from logs import get_logger
from utils import sha256_text

# 2: the CLIP part of the key is FrozenCLIP.fingerprint(), shared with the gallery cache
FORMAT_VERSION = 2
FILES = ("g.npy", "P.npy", "filled.npy")

log = get_logger("train_cache")


class FeatureCacheError(UserError):
    """The feature cache folder cannot be made, read or written (the message says what to do)."""


def cache_meta(clip, preprocess_type: str, image_size: int, names: list[str]) -> dict:
    """Everything the cached rows depend on (the folder's key is its hash), plus the array shapes."""
    tokens = int(clip.model.visual.positional_embedding.shape[0])
    return {"format_version": FORMAT_VERSION, "clip": clip.fingerprint(), "preprocess_type": preprocess_type,
            "image_size": int(image_size), "num_images": len(names), "names_sha256": sha256_text("\x00".join(names)),
            "g_shape": [len(names), int(clip.embed_dim)], "P_shape": [len(names), tokens, int(clip.vision_width)]}


def cache_key(meta: dict) -> str:
    return sha256_text(json.dumps(meta, sort_keys=True))[:24]


def bytes_per_image(meta: dict) -> int:
    return 2 * (meta["g_shape"][1] + meta["P_shape"][1] * meta["P_shape"][2])


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _check_folder(folder: Path, meta: dict) -> str | None:
    """Why `folder` cannot serve `meta` (None when it can)."""
    old = _read_meta(folder)
    if old is None:
        return "no readable meta.json"
    diffs = _differences(old, meta)
    if diffs:
        return f"meta.json differs in {', '.join(diffs)}"
    shapes = {"g.npy": tuple(meta["g_shape"]), "P.npy": tuple(meta["P_shape"]), "filled.npy": (meta["num_images"],)}
    for name, shape in shapes.items():
        try:
            arr = np.load(folder / name, mmap_mode="r")
        except (OSError, ValueError) as e:
            return f"{name} is unreadable ({type(e).__name__})"
        want = np.bool_ if name == "filled.npy" else np.float16
        if arr.shape != shape or arr.dtype != want:
            return f"{name} holds {arr.dtype} {arr.shape}, expected {np.dtype(want)} {shape}"
    return None


def _create(folder: Path, meta: dict) -> None:
    """Make the folder atomically: built under a temporary name, renamed when complete."""
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = meta["num_images"]
    # open_memmap sizes the files by seeking: sparse on common filesystems, disk fills as rows are written
    for name, shape, dtype in (("g.npy", meta["g_shape"], np.float16), ("P.npy", meta["P_shape"], np.float16),
                               ("filled.npy", [n], np.bool_)):
        arr = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dtype, shape=tuple(shape))
        arr.flush()
        del arr
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    try:
        os.rename(tmp, folder)
    except OSError:  # another process made it meanwhile: use theirs (checked by the caller)
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_cache(cache_dir, meta: dict) -> Path:
    """Rank 0: the folder for `meta` under cache_dir, created (or re-created when foreign/stale) as needed.

    Other key folders in cache_dir are left alone; the reason each is not used is printed.
    """
    cache_dir = Path(cache_dir)
    folder = cache_dir / cache_key(meta)
    if folder.is_dir():
        why = _check_folder(folder, meta)
        if why is None:
            return folder
        log.info(f"feature cache: {folder} is not usable ({why}); making a fresh one")
        shutil.rmtree(folder)
    else:
        others = sorted(p for p in cache_dir.glob("*") if p.is_dir() and not p.name.startswith("."))
        for other in others[:10]:
            old = _read_meta(other)
            why = f"made for other {', '.join(_differences(old, meta))}" if old else "no readable meta.json"
            log.info(f"feature cache: {other} not used ({why})")
        log.info(f"feature cache: new cache {folder}: {meta['num_images']} images x {bytes_per_image(meta) / 2**20:.2f} MiB "
            f"= {meta['num_images'] * bytes_per_image(meta) / 2**30:.2f} GiB when full")
    cache_dir.mkdir(parents=True, exist_ok=True)
    _create(folder, meta)
    why = _check_folder(folder, meta)
    if why is not None:
        raise FeatureCacheError(f"feature cache {folder} could not be created ({why}); "
                         "pass another --feature-cache-dir or drop --cache-image-features")
    return folder


class FeatureCache:
    """One process's handle on a prepared cache folder.

    Writes go through a background thread so the training loop never waits on the disk: `write` starts
    the device-to-host copy (pinned memory, non-blocking) and queues it; the thread stores the rows,
    flushes them to disk (msync), and only then sets and flushes `filled` for them, so an interrupted run
    or a crashed machine never marks unwritten rows as filled. `commit` (at every checkpoint, at the end
    of each epoch and when training stops) waits until everything queued is stored, and raises what
    went wrong in the thread. Reads happen in the DataLoader workers (`CacheReader`).
    """

    def __init__(self, folder, meta: dict):
        self.folder = Path(folder)
        why = _check_folder(self.folder, meta)
        if why is not None:
            raise FeatureCacheError(f"feature cache {self.folder} is not usable ({why})")
        self.meta = meta
        self.g = np.load(self.folder / "g.npy", mmap_mode="r+")
        self.P = np.load(self.folder / "P.npy", mmap_mode="r+")
        self.filled = np.load(self.folder / "filled.npy", mmap_mode="r+")
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def num_filled(self) -> int:
        return int(np.count_nonzero(self.filled))

    def write(self, rows: np.ndarray, g: torch.Tensor, P: torch.Tensor) -> None:
        """Queue fp16 rows for storing; returns without waiting for the device or the disk."""
        self._raise_error()
        rows = np.asarray(rows, dtype=np.int64).copy()
        pin = g.device.type == "cuda"
        host = [torch.empty(t.shape, dtype=torch.float16, pin_memory=pin) for t in (g, P)]
        for dst, src in zip(host, (g, P)):
            dst.copy_(src.detach(), non_blocking=pin)
        event = None
        if pin:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(g.device))
        if self._thread is None:
            self._queue = queue.Queue(maxsize=2)  # at most two batches in flight: bounded host memory
            self._thread = threading.Thread(target=self._store_loop, name="feature-cache-writer", daemon=True)
            self._thread.start()
        self._queue.put((rows, host[0], host[1], event))

    def _store_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._store(*item)
            except BaseException as e:  # reported to the training thread by the next write/commit
                self._error = e
            finally:
                self._queue.task_done()

    def _store(self, rows: np.ndarray, g: torch.Tensor, P: torch.Tensor, event) -> None:
        if event is not None:
            event.synchronize()  # the non-blocking copies have landed in host memory
        g, P = g.numpy(), P.numpy()
        if not (np.isfinite(g).all() and np.isfinite(P).all()):
            raise FeatureCacheError(f"CLIP features of training rows {rows.tolist()[:8]} are not finite in fp16 "
                             "(overflow?); train without --cache-image-features")
        order = np.argsort(rows, kind="stable")  # ascending file offsets
        self.g[rows[order]] = g[order]
        self.P[rows[order]] = P[order]
        self.g.flush()  # data first (msync; per batch, so dirty memory stays small)...
        self.P.flush()
        self.filled[rows] = True  # ...then the flags that vouch for it
        self.filled.flush()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, FeatureCacheError):
                raise error
            raise FeatureCacheError(f"writing the feature cache {self.folder} failed: {error!r}; free disk space or "
                             "pass another --feature-cache-dir (rows already marked filled are intact)") from error

    def commit(self) -> None:
        """Wait until every queued batch is stored and marked filled; raise the writer's error if any."""
        if self._queue is not None:
            self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Store what was queued and stop the writer thread."""
        try:
            self.commit()
        finally:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = self._queue = None


class CacheReader:
    """Read-only memory maps of a cache folder, opened lazily in each process that uses them (DataLoader
    workers included: pickling drops the maps). `filled` is read afresh at every call, so rows stored
    since are seen."""

    def __init__(self, folder):
        self.folder, self._maps = Path(folder), None

    def __getstate__(self):
        return {"folder": self.folder, "_maps": None}

    def _arrays(self):
        if self._maps is None:
            self._maps = tuple(np.load(self.folder / name, mmap_mode="r") for name in FILES)
        return self._maps

    def is_filled(self, i: int) -> bool:
        return bool(self._arrays()[2][i])

    def rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp16 (g, P) of filled `rows`, in the order given (one gather per array: pass them ascending
        for sequential reads)."""
        g, P, _ = self._arrays()
        rows = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(g[rows]), torch.from_numpy(P[rows])  # a fancy index copies once, into fresh arrays


class CachedRowsDataset(Dataset):
    """Wraps ImageNetPairsDataset: samples carry `index`; a filled row's sample has no image (the image is
    not decoded), its `g` and `P` are read for the whole batch by `collate_cached` in the same process
    (a DataLoader worker: the reads run in parallel with the training step)."""

    def __init__(self, base, reader: CacheReader):
        self.base, self.reader = base, reader

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.base.pairs[i]) if self.reader.is_filled(i) else self.base[i]
        sample["index"] = i
        return sample


def collate_cached(samples: list[dict], reader: CacheReader) -> dict:
    """Batch of CachedRowsDataset samples: `index` [b]; `image_rows` [k] (batch positions that carry an
    image) with `image` [k, 3, H, W]; `cached_rows` [b - k] with their fp16 `g` [b - k, D] and
    `P` [b - k, N+1, W] read from `reader` (g[j] is the row of batch position cached_rows[j]); empty tensors where there are none; the rest as lists."""
    rows = [j for j, s in enumerate(samples) if "image" in s]
    # cached positions in ascending file row order: sequential reads, and no reordering copy
    cached = sorted((j for j, s in enumerate(samples) if "image" not in s), key=lambda j: samples[j]["index"])
    g, P = reader.rows([samples[j]["index"] for j in cached]) if cached else (torch.empty(0), torch.empty(0))
    out = {"index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
           "image_rows": torch.tensor(rows, dtype=torch.long),
           "image": torch.stack([samples[j]["image"] for j in rows]) if rows else torch.empty(0),
           "cached_rows": torch.tensor(cached, dtype=torch.long), "g": g, "P": P}
    for k in samples[0]:
        if k not in ("index", "image"):
            out[k] = [s[k] for s in samples]
    return out
