"""Where a training batch's image features come from (training.py's `features(batch) -> (g, P)`).

- `TowerFeatures`: one frozen visual pass per batch, under the training precision's autocast.
- `CachedTowerFeatures` (--cache-image-features): rows stored by an earlier epoch or run are read from
  the feature store (feature_store.py) by the DataLoader workers (`RowReader`, `CachedRowsDataset`,
  `collate_cached`); only the other rows go through the tower, and their outputs are queued for storing
  (`RowWriter`, a background thread).

Both are called the same way: `features(batch) -> (g, P)`, `commit()` before a checkpoint, `close()` at
the end. `TrainCollate` builds a batch (and its token ids) in the DataLoader workers. `open_feature_cache`
prepares and opens the store on every rank: one per node when the run spans nodes.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

import precision as prec
from datasets import collate, imagenet_file_name
from distributed import DistInfo, all_gather_object
from errors import ConfigError, UserError
from feature_store import FeatureCacheError, FeatureStore, RowFiles, describe_transform, prepare_store, store_key
from logs import get_logger

log = get_logger("train_features")
FLUSH_EVERY = 8  # batches stored between two flushes (fdatasync of the data, then of `filled`)
PER_NODE = ("feature cache: one per node (the folder name ends in -node<k>; each node's local rank 0 makes it): rows "
            "written from two nodes into one file on a shared file system can overwrite each other's pages, and a "
            "folder on a node's local disk is seen by that node alone")


class TrainCollate:
    """Stacks images and builds the regularisation loss's token ids in the DataLoader workers."""

    def __init__(self, prompts, cache_reader: RowReader | None = None):
        self.prompts, self.cache_reader = prompts, cache_reader

    def __call__(self, samples):
        batch = collate(samples) if self.cache_reader is None else collate_cached(samples, self.cache_reader)
        batch["texts"] = self.prompts.training_texts(batch["subject"], batch["attribute"])
        return batch


class TowerFeatures:
    """(g, P) of a batch from one frozen visual pass (under the training precision's autocast)."""

    def __init__(self, clip, device: torch.device, precision: str):
        self.clip, self.device, self.precision = clip, device, precision

    def wrap_dataset(self, base):
        """The dataset the loader reads."""
        return base

    def collate(self, prompts) -> TrainCollate:
        return TrainCollate(prompts)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        with prec.autocast(self.precision, self.device), torch.no_grad():
            return self.clip.train_visual(images)  # compiled with --compile

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(batch["image"])

    failed = False  # whether storing features failed (`commit` raises why); never without a cache

    def commit(self) -> None:
        """Everything computed so far is durable (nothing to do without a cache)."""

    def close(self) -> None:
        """Stop background work."""


class CachedTowerFeatures(TowerFeatures):
    """--cache-image-features: rows whose sample came with cached fp16 (g, P) (read by the DataLoader
    workers) skip the visual pass; it runs only on the others, whose fp16 outputs are queued for storing.
    Every row's g and P are the fp16-rounded values (read, or just rounded), so the loss is
    net(clip, g16.float(), P16.float(), texts) whether a row was cached or not."""

    def __init__(self, clip, device: torch.device, precision: str, cache: RowWriter):
        super().__init__(clip, device, precision)
        self.cache = cache
        self.reader = RowReader(cache.folder)

    def wrap_dataset(self, base):
        return CachedRowsDataset(base, self.reader)

    def collate(self, prompts) -> TrainCollate:
        return TrainCollate(prompts, self.reader)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        index, image_rows, cached_rows = batch["index"], batch["image_rows"], batch["cached_rows"]
        b, device, shapes = len(index), self.device, self.cache.store.shapes
        g16 = torch.empty((b,) + shapes["g"][1:], dtype=torch.float16, device=device)
        P16 = torch.empty((b,) + shapes["P"][1:], dtype=torch.float16, device=device)
        if len(cached_rows):
            rows = cached_rows.to(device, non_blocking=True)
            g16[rows] = batch["g"].to(device, non_blocking=True)
            P16[rows] = batch["P"].to(device, non_blocking=True)
        if len(image_rows):
            g, P = self.encode(batch["image"])
            g, P = g.half(), P.half()
            self.cache.write(index[image_rows].numpy(), g, P)
            rows = image_rows.to(device, non_blocking=True)
            g16[rows], P16[rows] = g, P
        return g16.float(), P16.float()

    @property
    def failed(self) -> bool:
        return self.cache.failed

    def commit(self) -> None:
        self.cache.commit()  # every queued row stored and marked filled

    def close(self) -> None:
        self.cache.close()  # what was queued is stored, even when training stopped on an error


# ---------------------------------------------------------------------------------------------
# the writer thread

def _all_finite(g: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """On the device of g and P, one bool: every value finite."""
    return torch.isfinite(g).all() & torch.isfinite(P).all()


def finite_fp16(a: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Every value of an fp16 array finite, by its bits (an exponent of all ones is inf or NaN), a chunk at a
    time: several times faster on a CPU than isfinite, which converts each value first."""
    bits = np.ascontiguousarray(a).reshape(-1).view(np.uint16)
    scratch = np.empty(min(chunk, len(bits)), np.uint16)
    for s in range(0, len(bits), chunk):
        part = bits[s:s + chunk]
        if np.bitwise_and(part, 0x7C00, out=scratch[:len(part)]).max() == 0x7C00:
            return False
    return True


class _Staging:
    """Host buffers that a queued batch is copied into (pinned for a CUDA device), reused from batch to batch."""

    def __init__(self, rows: int, g_shape: tuple, P_shape: tuple, pin: bool):
        self.g = torch.empty((rows, *g_shape), dtype=torch.float16, pin_memory=pin)
        self.P = torch.empty((rows, *P_shape), dtype=torch.float16, pin_memory=pin)
        self.finite = torch.empty((), dtype=torch.bool, pin_memory=pin)
        self.pin = pin

    def fits(self, k: int, g_shape: tuple, P_shape: tuple, pin: bool) -> bool:
        return len(self.g) >= k and self.g.shape[1:] == g_shape and self.P.shape[1:] == P_shape and self.pin == pin


@dataclass
class _Batch:
    rows: np.ndarray
    staging: _Staging
    k: int
    event: object  # torch.cuda.Event, or None for rows that started on the CPU


_FLUSH = object()


class RowWriter:
    """The training rows of a store, written by a background thread so that the training loop never waits
    on the disk.

    `write` starts the copy of a batch's fp16 rows to host memory (pinned and asynchronous from a CUDA
    device, where their finiteness is also checked, into one flag copied with them) and queues it. The
    thread waits for the copy (a blocking event: it sleeps), stores each row with pwrite, and every
    FLUSH_EVERY batches (and at `commit`) flushes the data files and only then sets and flushes `filled`
    for the rows stored since. `commit` (at every checkpoint, at the end of each epoch and when training
    stops) waits until everything queued is stored and marked, and raises what went wrong in the thread;
    `failed` says so sooner, without waiting.
    """

    POOL = 3  # staging buffers: one being copied into, two queued; more batches in flight wait for one
    flush_every = FLUSH_EVERY

    def __init__(self, store: FeatureStore):
        self.store, self.folder = store, store.folder
        self._files: RowFiles | None = None
        self._queue: queue.Queue = queue.Queue()
        self._free: queue.Queue = queue.Queue()
        self._made = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: list[np.ndarray] = []

    def num_filled(self) -> int:
        return self.store.num_filled()

    @property
    def writing(self) -> bool:
        """Whether the writer thread runs (from the first write until `close`)."""
        return self._thread is not None

    def drain(self) -> None:
        """Waits until every batch queued so far is stored (marked filled only at the next flush)."""
        self._queue.join()

    def _staging(self, k: int, g_shape: tuple, P_shape: tuple, pin: bool) -> _Staging:
        try:
            s = self._free.get_nowait()
        except queue.Empty:
            if self._made < self.POOL:
                self._made, s = self._made + 1, None
            else:
                s = self._free.get()  # every buffer is queued: the disk is behind, wait for the writer
        if s is None or not s.fits(k, g_shape, P_shape, pin):
            s = _Staging(max(k, 0 if s is None else len(s.g)), g_shape, P_shape, pin)
        return s

    @property
    def failed(self) -> bool:
        """Whether the writer thread failed; `commit` raises its error. Training reads it into the flags of
        the step's all-reduce, so every process stops together, not the one whose disk filled alone."""
        return self._error is not None

    def write(self, rows, g: torch.Tensor, P: torch.Tensor) -> None:
        """Queue the fp16 rows g [k, D], P [k, N+1, W] of store rows `rows`; returns without waiting for
        the device or the disk. The caller may reuse g and P at once. Once the thread has failed, rows are
        no longer queued (`failed`)."""
        if self.failed:
            return
        rows = np.asarray(rows, dtype=np.int64).copy()
        k, device = len(rows), g.device
        cuda = device.type == "cuda"
        s = self._staging(k, tuple(g.shape[1:]), tuple(P.shape[1:]), cuda)
        s.g[:k].copy_(g.detach(), non_blocking=cuda)
        s.P[:k].copy_(P.detach(), non_blocking=cuda)
        event = None
        if cuda:  # checked where the rows are: the thread then reads one flag, not every value
            s.finite.copy_(_all_finite(g.detach().half(), P.detach().half()), non_blocking=True)
            event = torch.cuda.Event(blocking=True)
            event.record(torch.cuda.current_stream(device))
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(device,), name="feature-cache-writer", daemon=True)
            self._thread.start()
        self._queue.put(_Batch(rows, s, k, event))

    def _loop(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this thread's CUDA calls go to the training device
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._flush() if item is _FLUSH else self._store(item)
            except BaseException as e:  # reported to the training thread by the next write/commit
                self._error = e
            finally:
                if isinstance(item, _Batch):
                    self._free.put(item.staging)
                self._queue.task_done()

    def _store(self, item: _Batch) -> None:
        if item.event is not None:
            item.event.synchronize()  # the copies (and the flag) have landed in host memory
        g, P = item.staging.g[:item.k].numpy(), item.staging.P[:item.k].numpy()
        finite = bool(item.staging.finite) if item.event is not None else finite_fp16(g) and finite_fp16(P)
        if not finite:
            raise FeatureCacheError(f"CLIP features of training rows {item.rows.tolist()[:8]} are not finite in fp16 "
                                    "(overflow?); train without --cache-image-features")
        if self._files is None:
            self._files = RowFiles(self.store)
        self._files.write_rows("g", item.rows, g)
        self._files.write_rows("P", item.rows, P)
        for name in self.store.shapes:  # on its way to the disk now: the flush then waits for little
            self._files.start_writeback(name)
        self._pending.append(item.rows)
        if len(self._pending) >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        for name in self.store.shapes:  # the rows' data on disk first...
            self._files.sync(name)
        self._files.mark_filled(np.concatenate(self._pending))  # ...then the flags that vouch for it
        self._files.sync("filled")
        self._pending = []

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, FeatureCacheError):
                raise error
            raise FeatureCacheError(f"writing the feature cache {self.folder} failed: {error}; free disk space or "
                                    "pass another --feature-cache-dir (rows already marked filled are intact)") from error

    def commit(self) -> None:
        """Wait until every queued batch is stored and marked filled; raise the writer's error if any."""
        if self._thread is not None:
            self._queue.put(_FLUSH)
            self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Store and mark what was queued, stop the thread, close the files."""
        try:
            self.commit()
        finally:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = None
            if self._files is not None:
                self._files.close()
                self._files = None


class RowReader:
    """Read-only memory maps of a store's g and P rows, opened lazily in each process that uses them
    (DataLoader workers included: pickling drops the maps). `filled` is read afresh at every call, so
    rows stored since are seen."""

    def __init__(self, folder):
        self.folder, self._maps = Path(folder), None

    def __getstate__(self):
        return {"folder": self.folder, "_maps": None}

    def _arrays(self):
        if self._maps is None:
            self._maps = tuple(np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in ("g", "P", "filled"))
        return self._maps

    def is_filled(self, i: int) -> bool:
        return bool(self._arrays()[2][i])

    def rows(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp16 (g, P) of filled `rows`, in the order given (one gather per array: pass them ascending for
        sequential reads)."""
        g, P, _ = self._arrays()
        rows = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(g[rows]), torch.from_numpy(P[rows])  # a fancy index copies once, into fresh arrays


# ---------------------------------------------------------------------------------------------
# reads in the DataLoader workers

class CachedRowsDataset(Dataset):
    """Wraps ImageNetPairsDataset: samples carry `index`; a filled row's sample has no image (the image is
    not decoded), its `g` and `P` are read for the whole batch by `collate_cached` in the same process
    (a DataLoader worker: the reads run in parallel with the training step)."""

    def __init__(self, base, reader: RowReader):
        self.base, self.reader = base, reader

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.base.pairs[i]) if self.reader.is_filled(i) else self.base[i]
        sample["index"] = i
        return sample


def collate_cached(samples: list[dict], reader: RowReader) -> dict:
    """Batch of CachedRowsDataset samples: `index` [b]; `image_rows` [k] (batch positions that carry an
    image) with `image` [k, 3, H, W]; `cached_rows` [b - k] with their fp16 `g` [b - k, D] and
    `P` [b - k, N+1, W] read from `reader` (g[j] is the row of batch position cached_rows[j]); empty
    tensors where there are none; the rest as lists."""
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


# ---------------------------------------------------------------------------------------------
# opening the store on every rank

def training_key(clip, dataset, precision: str, hash_contents: bool = False) -> dict:
    """The store key of an ImageNetPairsDataset's rows: its images by size and modification time, or by
    their contents with `hash_contents`."""
    folder = str(dataset.image_dir)
    files = [os.path.join(folder, imagenet_file_name(n)) for n in dataset.names]
    return store_key("training", clip, describe_transform(dataset.preprocess), precision, "float16", dataset.names,
                     files, dataset.root, "train", hash_contents)


def training_arrays(clip, n: int) -> dict[str, tuple]:
    tokens = int(clip.model.visual.positional_embedding.shape[0])
    return {"g": (n, int(clip.embed_dim)), "P": (n, tokens, int(clip.vision_width))}


def _gathered_error(errors: list) -> None:
    """Raise the first of the ranks' error lines on every rank (the list is all ranks', so all raise alike)."""
    errors = [e for e in errors if e]
    if errors:
        more = f" (and {len(errors) - 1} other rank(s))" if len(errors) > 1 else ""
        raise ConfigError(errors[0] + more)


def open_feature_cache(cache_dir, clip, dataset, precision: str, info: DistInfo, hash_contents: bool = False) -> RowWriter:
    """The training store of `dataset` (an ImageNetPairsDataset) under `cache_dir`, opened on every rank.

    Local rank 0 of each node prepares the folder (creating or replacing it); the others wait. On one node
    that is rank 0 and every rank shares the folder, each writing its own rows. A run over several nodes
    has one folder per node (PER_NODE says why). `hash_contents`: the images enter the key by their bytes
    (--cache-hash-images), so an image replaced in place by one of the same size and time is noticed.
    Any rank's failure stops every rank with the same one-line ConfigError."""
    cache_dir = Path(cache_dir)
    suffix = f"-node{info.node_rank}" if info.multi_node else ""
    where = f"node {info.node_rank}: " if info.multi_node else ""
    fix = "pass another --feature-cache-dir (writable, with room for the rows) or drop --cache-image-features"
    if info.multi_node and info.is_main:
        log.info(PER_NODE)
    prepared = error = None
    if info.local_rank == 0:
        try:
            if hash_contents:
                log.info(f"feature cache: hashing the contents of {len(dataset.names)} training images")
            key = training_key(clip, dataset, precision, hash_contents)
            arrays = training_arrays(clip, len(dataset.names))
            prepared = (str(prepare_store(cache_dir, key, arrays, suffix)), key, arrays)
        except (OSError, UserError) as e:
            error = f"--feature-cache-dir {cache_dir}: {where}{_line(e)}; {fix}"
    # collective, so it is also the barrier: no rank opens a folder before its node's local rank 0 made it,
    # and a failure on any node stops every rank instead of leaving them waiting
    gathered = all_gather_object((info.node_rank, info.local_rank, prepared, error), info)
    _gathered_error([e for *_, e in gathered])
    mine = [p for node, local, p, _ in gathered if node == info.node_rank and local == 0]
    if not mine:
        raise ConfigError(f"no process of node {info.node_rank} has LOCAL_RANK 0, so none prepares its feature cache; "
                          "launch with torchrun or srun, which number the processes of each node from 0")
    folder, key, arrays = mine[0]
    writer = error = None
    try:
        writer = RowWriter(FeatureStore(folder, key, arrays))
    except (OSError, UserError) as e:  # e.g. a node-local folder that this process does not see
        error = f"--feature-cache-dir {cache_dir}: {where}{_line(e)}; {fix}"
    _gathered_error(all_gather_object(error, info))
    log.info(f"feature cache: {folder}: {writer.num_filled()} of {len(dataset.names)} images cached")
    return writer


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
