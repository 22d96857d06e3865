"""Encoding a benchmark for retrieval (METHOD §10): gallery embeddings and composed-query features.

- `gallery_features(clip, dataset, encoding, cache)`: L2-normalised CLIP image embeddings of a
  gallery-mode dataset, in its order, from the feature store (feature_store.EvalCache) when it holds them.
- `query_features(net, clip, dataset, encoding)`: one L2-normalised feature per query of a query-mode
  dataset: FTI4CIR's composed query, or the image-only / text-only baseline. Each distinct reference
  image goes through the visual tower once, however many queries share it (`g` and `P` together).

`Encoding` says how (batch size, workers, device, precision, progress bars) and counts the work done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets import AnnotationFormatError, collate, combine_text_features
from errors import ConfigError
from feature_store import EvalCache, ReferenceOutputs
from precision import PRECISIONS, check_precision, inference
from stop_signals import ignore_stop_signals
from utils import show_progress

BASELINES = ("image-only", "text-only")


@dataclass
class Counters:
    """How much work an evaluation did (for logs, benchmarks and tests)."""

    gallery_images_encoded: int = 0
    query_images_encoded: int = 0
    cache_hits: int = 0
    cache_writes: int = 0
    token_cache_hits: int = 0


class EncodingStopped(Exception):
    """`Encoding.stop` asked for the encoding to end (a stop signal during training's validation)."""


@dataclass
class Encoding:
    """How images and texts are encoded. `device=None`: CLIP's device. `stop`, when given, is asked
    before each batch; once it answers True the encoding ends with `EncodingStopped`."""

    batch_size: int = 32
    workers: int = 8
    device: torch.device | str | None = None
    precision: str = "fp32"
    progress: bool = True
    counters: Counters = field(default_factory=Counters)
    stop: Callable[[], bool] | None = None

    def check_stop(self) -> None:
        if self.stop is not None and self.stop():
            raise EncodingStopped()

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: choose one of {PRECISIONS}")

    def on(self, clip) -> torch.device:
        """The device to encode on, checked against the precision."""
        device = torch.device(self.device) if self.device is not None else clip.device
        check_precision(self.precision, device)
        return device


@dataclass
class Gallery:
    """A gallery's names and [G, D] L2-normalised float32 features; `references` only when asked for."""

    names: list[str]
    features: torch.Tensor
    references: ReferenceOutputs | None = None


# ---------------------------------------------------------------------------------------------
# loading

def make_loader(dataset, encoding: Encoding, device: torch.device) -> DataLoader:
    """In-order loader: `workers` processes (none for a single batch, which would only wait for them to
    start: a query or two of retrieve.py), pinned memory when the features go to a GPU. The workers
    ignore SIGTERM and SIGINT: the main process decides what a stop means (Ctrl-C reaches the whole
    process group), so a worker's traceback never hides the main process's own message."""
    workers = encoding.workers if len(dataset) > encoding.batch_size else 0
    return DataLoader(dataset, batch_size=encoding.batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", collate_fn=collate, persistent_workers=False,
                      worker_init_fn=ignore_stop_signals if workers else None)


def batches(loader: DataLoader, desc: str, encoding: Encoding):
    """The loader's batches under a progress bar, `encoding.stop` asked before each. When the loop ends
    early (an image that cannot be read, a stop), worker processes are shut down at once rather than by
    the garbage collector, which waits 5 s for each of them."""
    it = iter(loader)
    try:
        for batch in tqdm(it, total=len(loader), desc=desc, unit="batch", leave=False,
                          disable=not show_progress(encoding.progress)):
            encoding.check_stop()
            yield batch
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _check_nonempty(n: int, dataset, what: str) -> None:
    if n == 0:
        raise AnnotationFormatError(f"{dataset.label} at {getattr(dataset, 'root', '?')}: the annotation files list no {what}")


# ---------------------------------------------------------------------------------------------
# the gallery

@torch.no_grad()
def encode_gallery(clip, dataset, encoding: Encoding, keep: Sequence[str] | None = None
                   ) -> tuple[torch.Tensor, ReferenceOutputs | None]:
    """([G, D] L2-normalised float32 image embeddings of a gallery-mode dataset on the encoding device,
    the ReferenceOutputs of the gallery names in `keep`, collected from the same pass, or None).

    Images that are also query references thus go through the tower once."""
    device = encoding.on(clip)
    n = len(dataset)
    _check_nonempty(n, dataset, "gallery images")
    out = torch.empty((n, clip.embed_dim), dtype=torch.float32, device=device)
    if keep is not None:
        index = {name: i for i, name in enumerate(dataset.names)}
        missing = [k for k in keep if k not in index]
        if missing:
            raise AnnotationFormatError(f"{dataset.label}: reference images not in the gallery: {missing[:5]}")
        rows = torch.tensor([index[k] for k in keep], dtype=torch.long)
        order = torch.argsort(rows)  # keep-positions sorted by gallery row
        sorted_rows = rows[order]
        ref_g = torch.empty((len(keep), clip.embed_dim), dtype=torch.float32)
        ref_P = None
    i = 0
    for batch in batches(make_loader(dataset, encoding, device), f"gallery {dataset.label}", encoding):
        images = batch["image"].to(device, non_blocking=True)
        with inference(encoding.precision, device):
            g, P = clip.encode_visual(images)  # encode_image is this pass's g
        out[i:i + len(images)] = F.normalize(g.float(), dim=-1)
        if keep is not None:
            lo, hi = (int(x) for x in torch.searchsorted(sorted_rows, torch.tensor([i, i + len(images)])))
            if hi > lo:
                local = (sorted_rows[lo:hi] - i).to(device)
                if ref_P is None:
                    ref_P = torch.empty((len(keep),) + tuple(P.shape[1:]), dtype=torch.float32)
                ref_g[order[lo:hi]] = g[local].float().cpu()
                ref_P[order[lo:hi]] = P[local].float().cpu()
        i += len(images)
    encoding.counters.gallery_images_encoded += n
    return out, (None if keep is None else ReferenceOutputs(keep, ref_g, ref_P))


class _Rows(torch.utils.data.Dataset):
    """Some rows of a gallery-mode dataset, with their names."""

    def __init__(self, dataset, names: list[str]):
        where = {n: i for i, n in enumerate(dataset.names)}
        missing = [n for n in names if n not in where]
        if missing:
            raise AnnotationFormatError(f"{dataset.label}: reference images not in the gallery: {missing[:5]}")
        self.dataset, self.rows, self.names = dataset, [where[n] for n in names], list(names)
        self.root, self.label = getattr(dataset, "root", ""), dataset.label

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.dataset[self.rows[i]]


def gallery_features(clip, dataset, encoding: Encoding, cache: EvalCache | None = None,
                     reference_names: Sequence[str] | None = None) -> Gallery:
    """The gallery's features, from `cache` when it holds them (`cache=None`: no cache).

    With `reference_names` (gallery images that are query references), also their ReferenceOutputs:
    taken from the gallery pass when the gallery is encoded, else from their own store beside the
    gallery's, else from one pass over just those images; written to the cache for the next run.
    """
    device = encoding.on(clip)
    counters = encoding.counters
    names = list(dataset.names)
    refs = None if reference_names is None else list(dict.fromkeys(reference_names))
    key = feats = outputs = None
    if cache is not None:
        key = cache.key(clip, dataset, encoding.precision, progress=encoding.progress)
        feats = cache.read_gallery(key)
        if refs is not None:
            outputs = cache.read_references(key, refs)
            counters.token_cache_hits += outputs is not None
    fresh = refs is not None and outputs is None
    if feats is None:
        feats, got = encode_gallery(clip, dataset, encoding, keep=refs if fresh else None)
        outputs = got if fresh else outputs
        if cache is not None and cache.write_gallery(key, feats):
            counters.cache_writes += 1
    else:
        counters.cache_hits += 1
        feats = feats.to(device=device, dtype=torch.float32)
        if fresh:  # the gallery came from the cache: one pass over the reference images alone
            _, outputs = encode_gallery(clip, _Rows(dataset, refs), encoding, keep=refs)
    if fresh and cache is not None:
        cache.write_references(key, outputs)
    return Gallery(names, feats, outputs)


# ---------------------------------------------------------------------------------------------
# the queries

def _check_baseline(baseline: str | None) -> None:
    if baseline not in (None,) + BASELINES:
        raise ConfigError(f"--baseline must be one of {BASELINES} (or none), got {baseline!r}")


@torch.no_grad()
def _text_only(clip, dataset, encoding: Encoding, device) -> torch.Tensor:
    """Plain CLIP text features of each query's modification text(s), combined as the composed
    queries' are (METHOD §10)."""
    queries = dataset.queries
    out = torch.empty((len(queries), clip.embed_dim), dtype=torch.float32, device=device)
    starts = range(0, len(queries), encoding.batch_size)
    for s in tqdm(starts, desc="queries (text-only)", unit="batch", disable=not show_progress(encoding.progress), leave=False):
        encoding.check_stop()
        texts = [dataset.query_texts(q) for q in queries[s:s + encoding.batch_size]]
        T = len(texts[0])
        with inference(encoding.precision, device):
            ids = clip.tokenize([row[t] for t in range(T) for row in texts]).to(device)
            f = clip.encode_text(ids).view(T, len(texts), -1).transpose(0, 1)
        out[s:s + len(texts)] = combine_text_features(f)
    return out


@torch.no_grad()
def query_features(net, clip, dataset, encoding: Encoding, baseline: str | None = None,
                   references: ReferenceOutputs | None = None) -> torch.Tensor:
    """[Q, D] L2-normalised float32 query features on the encoding device, in the order of `dataset.queries`.

    `baseline=None`: FTI4CIR's composed query (`net` in eval mode). 'image-only': the reference image's
    CLIP embedding. 'text-only': CLIP's embedding of the modification text(s). `references` (from
    `gallery_features(..., reference_names=...)`): the references' tower outputs, so no image is read.
    """
    _check_baseline(baseline)
    device = encoding.on(clip)
    queries = dataset.queries
    _check_nonempty(len(queries), dataset, "queries")
    if baseline == "text-only":  # no image is needed: the texts are in the annotations
        return _text_only(clip, dataset, encoding, device)
    if baseline is None and net is None:
        raise ValueError("query_features needs the FTI4CIR network (or a baseline)")
    # Each distinct reference image goes through the visual tower once, however many queries use
    # it (CIRR val: 4,181 queries, 2,165 references); its (g, P) then serve all of them.
    first: dict[str, int] = {}  # reference path -> its number, in order of first use
    representative = []  # the first query of each reference: its sample carries the image
    for i, p in enumerate(map(str, dataset.query_paths)):
        if p not in first:
            first[p] = len(first)
            representative.append(i)
    ref_of_query = torch.tensor([first[str(p)] for p in dataset.query_paths])
    by_ref = torch.argsort(ref_of_query, stable=True)  # queries grouped by reference, in reference order
    bounds = torch.searchsorted(ref_of_query[by_ref], torch.arange(len(first) + 1))
    out = torch.empty((len(queries), clip.embed_dim), dtype=torch.float32, device=device)
    u0 = 0
    for g_all, P_all in reference_outputs(clip, dataset, representative, references, encoding, device):
        u1 = u0 + len(g_all)
        rows = by_ref[bounds[u0]:bounds[u1]]  # the queries of these references
        local = (ref_of_query[rows] - u0).to(device)
        for c in range(0, len(rows), encoding.batch_size):  # compose at most batch_size queries at a time
            encoding.check_stop()
            sel, idx = rows[c:c + encoding.batch_size], local[c:c + encoding.batch_size]
            with inference(encoding.precision, device):
                g, P = g_all[idx], P_all[idx]
                if baseline == "image-only":
                    f = g[:, None]
                else:
                    f = net.compose(clip, g, P, [dataset.query_texts(queries[i]) for i in sel.tolist()])
            out[sel.to(device)] = combine_text_features(f)
        u0 = u1
    return out


def reference_outputs(clip, dataset, representative: list[int], references: ReferenceOutputs | None,
                      encoding: Encoding, device):
    """(g, P) of the distinct reference images, in order, batch by batch: from `references` when given
    (no image is read), else from one visual pass over the images."""
    if references is not None:
        names = [dataset.queries[i]["reference_name"] for i in representative]
        rows = torch.tensor([references.row[n] for n in names], device=device)
        # to the device once (P is ~1 MB per reference at ViT-L/14), not one pageable copy per batch
        g_all, P_all = references.g.to(device), references.P.to(device)
        for s in range(0, len(rows), encoding.batch_size):
            r = rows[s:s + encoding.batch_size]
            yield g_all[r], P_all[r]
        return
    loader = make_loader(Subset(dataset, representative), encoding, device)
    for batch in batches(loader, f"queries {dataset.label}", encoding):
        images = batch["reference_image"].to(device, non_blocking=True)
        with inference(encoding.precision, device):
            g, P = clip.encode_visual(images)  # one visual pass gives both
        encoding.counters.query_images_encoded += len(images)
        yield g, P
