"""Feature extraction for evaluation and test submissions (SPEC 10), with an on-disk gallery cache.

One code path for `evaluate.py`, `test.py` and the validation inside training:

- `gallery_features(clip, dataset, ...)`: L2-normalised CLIP image embeddings of a gallery-mode
  dataset, in the dataset's order. They depend only on CLIP, the preprocessing, the gallery and the
  precision, so they are cached on disk (`cache_dir`) and evaluating another checkpoint recomputes
  only the query side. A cache file holds its key; a file whose key, names or shape differ from
  what is asked for (stale) or that is not one of ours (foreign) is reported and recomputed.
- `query_features(net, clip, dataset, ...)`: composed-query features of a query-mode dataset (each
  distinct reference image through the visual tower once, however many queries share it: `g` and the
  last block's tokens together), or the image-only / text-only baselines.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets import collate
from prompts import fashioniq_texts
from utils import atomic_torch_save

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
BASELINES = ("image-only", "text-only")
DEFAULT_CACHE_DIR = Path(".cache") / "features"
CACHE_FORMAT = "fti4cir-gallery-features"
TOKEN_CACHE_FORMAT = "fti4cir-reference-tokens"
# Bump when the way gallery features are computed changes: every older cache file becomes stale.
CACHE_VERSION = 1

# How much work was done, for logs and tests (reset freely).
counters = {"gallery_images_encoded": 0, "query_images_encoded": 0, "cache_hits": 0, "cache_writes": 0,
            "token_cache_hits": 0}


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# precision

def check_precision(precision: str, device: torch.device) -> None:
    """ValueError for a precision that does not exist or makes no sense on `device`."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {PRECISIONS}")
    if device.type == "cuda" or precision == "fp32":
        return
    if device.type == "cpu" and precision == "bf16":
        return
    raise ValueError(f"--precision {precision} is not available on {device.type}: "
                     f"use fp32{' or bf16' if device.type == 'cpu' else ''} there (fp16 and tf32 need CUDA)")


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """fp32: plain float32 (autocast off, full-precision matmuls, PyTorch's default cuDNN settings: the
    authors' inference); tf32: float32 tensors, TF32 tensor-core matmuls and convolutions (CUDA);
    bf16/fp16: autocast to that type."""
    device = torch.device(device)
    check_precision(precision, device)
    if precision in ("bf16", "fp16"):
        with torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16):
            yield
        return
    # Set the matmul precision explicitly for the duration, so a caller (training with TF32 on)
    # cannot change what "fp32" means; restore afterwards.
    old_matmul = torch.get_float32_matmul_precision()
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default, so also what the authors' fp32 run used
    try:
        with torch.autocast(device.type, enabled=False):  # fp32 even inside a caller's autocast region
            yield
    finally:
        torch.set_float32_matmul_precision(old_matmul)
        torch.backends.cudnn.allow_tf32 = old_cudnn


# ---------------------------------------------------------------------------------------------
# loading

def make_loader(dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """In-order loader: `workers` processes, pinned memory when the features go to a GPU."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda", collate_fn=collate,
                      persistent_workers=False)


def batches(loader: DataLoader, desc: str, progress: bool):
    """The loader's batches under a progress bar. When the loop ends early (an image that cannot be
    read), worker processes are shut down at once rather than by the garbage collector, which waits
    5 s for each of them."""
    it = iter(loader)
    try:
        yield from tqdm(it, total=len(loader), desc=desc, unit="batch", disable=not progress, leave=False)
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# ---------------------------------------------------------------------------------------------
# the gallery cache

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


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _clip_fingerprint(clip) -> dict:
    """Where CLIP's weights came from, the file's size and mtime when it is a file, and a hash of a
    few of its visual weights (cheap, and catches weights swapped under an unchanged name)."""
    source = str(getattr(clip, "source", "") or getattr(clip, "name", ""))
    info = {"source": source}
    _, _, rest = source.partition(":")
    if rest and os.path.isfile(rest):
        st = os.stat(rest)
        info.update(weights_size=st.st_size, weights_mtime_ns=st.st_mtime_ns)
    v = clip.model.visual
    h = hashlib.sha256()
    for t in (v.proj, v.class_embedding, v.conv1.weight, v.ln_post.weight):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    info["visual_weights_sha256"] = h.hexdigest()
    info["image_size"] = int(clip.image_size)
    return info


def _images_fingerprint(dataset) -> str | None:
    """Hash of the gallery image files' sizes and modification times: images regenerated or replaced
    under the same names make the cache stale. A missing file counts as changed (its error then
    comes from the encoder, never hidden by a cache hit).

    One stat per file, on plain strings (datasets.FileList.strings(): no Path objects for CIRCO's
    123,403 files), hashed as one block; the same digest as hashing each file's line in turn."""
    paths = getattr(dataset, "gallery_paths", None)
    if paths is None:
        return None
    strings = getattr(paths, "strings", None)
    files = strings() if strings is not None else [os.fspath(p) for p in paths]
    stat = os.stat
    lines = []
    for p in files:
        try:
            st = stat(p)
            lines.append(f"{st.st_size}:{st.st_mtime_ns}\n")
        except OSError:
            lines.append("missing\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def dataset_label(dataset) -> str:
    """e.g. 'cirr-val', 'fashioniq-val-dress', 'circo-test' (for logs)."""
    parts = [type(dataset).__name__.replace("Dataset", "").lower(), str(getattr(dataset, "split", ""))]
    cats = getattr(dataset, "categories", None)
    if cats:
        parts.append("+".join(cats))
    return "-".join(p for p in parts if p)


def gallery_tag(dataset) -> str:
    """The cache file's readable prefix: the label, except that CIRCO's val and test share one gallery
    (all of COCO unlabeled), so one cache entry serves both."""
    label = dataset_label(dataset)
    return "circo" if label.startswith("circo-") else label


def gallery_cache_meta(clip, dataset, precision: str) -> dict:
    """Everything gallery features depend on; the cache key is its hash."""
    names = list(dataset.names)
    return {
        "code_version": CACHE_VERSION,
        "clip": _clip_fingerprint(clip),
        "preprocess": describe_transform(dataset.preprocess),
        "precision": precision,
        "dataset": gallery_tag(dataset),
        "root": str(Path(getattr(dataset, "root", "")).resolve()),
        "num_images": len(names),
        "names_sha256": _sha("\x00".join(names)),
        "images_sha256": _images_fingerprint(dataset),
    }


def gallery_cache_path(cache_dir, meta: dict) -> Path:
    """One file per (dataset, CLIP, preprocessing, precision, root): another gallery list or changed
    images overwrite it (stale), another CLIP or precision gets its own file."""
    stable = {k: meta[k] for k in ("dataset", "preprocess", "precision", "root")}
    stable["clip"] = meta["clip"]["source"]
    return Path(cache_dir) / f"{meta['dataset']}-{_sha(json.dumps(stable, sort_keys=True))[:16]}.pt"


def _cache_key(meta: dict) -> str:
    return _sha(json.dumps(meta, sort_keys=True))


def _load_cache_file(path: Path, fmt: str, what: str) -> dict | None:
    """A cache file's dict when it exists, reads and has format `fmt`; else None, the reason printed."""
    if not path.is_file():
        log(f"{what}: no file {path}; computing")
        return None
    try:
        # mmap: tensors are read when used (a CPU run's similarity, the copy to a GPU), not first
        # copied into fresh memory (the ViT-L/14 CIRCO cache is 380 MB); a private mapping, so
        # writes go to memory and an atomically replaced file leaves the mapping intact
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is simply not a usable cache
        log(f"{what}: {path} is unreadable ({type(e).__name__}); recomputing and overwriting it")
        return None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        log(f"{what}: {path} is not a {what} file; recomputing and overwriting it")
        return None
    return obj


def _joined(names: Sequence[str]) -> str:
    """The gallery names as one string (NUL-separated), as a cache file stores them: unpickling one
    string is instant where 123,403 strings take the weights-only unpickler over a second."""
    return "\x00".join(names)


def _same_names(obj: dict, names: list[str]) -> bool:
    """Whether a gallery cache file holds `names`: as one joined string, or (older files) a list."""
    joined = obj.get("joined_names")
    if isinstance(joined, str):
        return joined == _joined(names)
    return obj.get("names") == names


def _read_cache(path: Path, meta: dict, names: list[str]) -> torch.Tensor | None:
    """The cached features, or None (with the reason printed) when absent, foreign or stale."""
    obj = _load_cache_file(path, CACHE_FORMAT, "gallery cache")
    if obj is None:
        return None
    if obj.get("key") != _cache_key(meta):
        old = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        changed = sorted(k for k in set(meta) | set(old) if old.get(k) != meta.get(k)) or ["key"]
        log(f"gallery cache: {path} is stale ({', '.join(changed)} changed); recomputing")
        return None
    feats = obj.get("features")
    if not _same_names(obj, names) or not isinstance(feats, torch.Tensor) or feats.dim() != 2 \
            or feats.shape[0] != len(names):
        log(f"gallery cache: {path} does not hold features for these {len(names)} names; recomputing")
        return None
    return feats


# ---------------------------------------------------------------------------------------------
# features

def _check_nonempty(n: int, dataset, what: str) -> None:
    if n == 0:
        raise ValueError(f"{dataset_label(dataset)} at {getattr(dataset, 'root', '?')}: the annotation files list no {what}")


class ReferenceTokens:
    """What the visual tower gives for the reference images: raw `g` [R, D] (not normalised) and the
    last block's tokens `P` [R, N+1, W], float32 on the CPU, row r for `names[r]`. With these, composed
    queries need no visual pass (`query_features(..., reference_tokens=...)`)."""

    def __init__(self, names: list[str], g: torch.Tensor, P: torch.Tensor):
        self.names, self.g, self.P = list(names), g, P
        self.row = {n: i for i, n in enumerate(self.names)}


@torch.no_grad()
def encode_gallery(clip, dataset, batch_size: int = 32, workers: int = 8, device=None, precision: str = "fp32",
                   progress: bool = True, keep: Sequence[str] | None = None):
    """[G, D] L2-normalised float32 image embeddings of a gallery-mode dataset, on `device`.

    With `keep` (gallery names), returns (embeddings, ReferenceTokens of those names) collected from
    the same pass, so images that are also references go through the tower once.
    """
    device = torch.device(device) if device is not None else clip.device
    n = len(dataset)
    _check_nonempty(n, dataset, "gallery images")
    out = torch.empty((n, clip.embed_dim), dtype=torch.float32, device=device)
    if keep is not None:
        index = {name: i for i, name in enumerate(dataset.names)}
        missing = [k for k in keep if k not in index]
        if missing:
            raise ValueError(f"{dataset_label(dataset)}: reference images not in the gallery: {missing[:5]}")
        rows = torch.tensor([index[k] for k in keep], dtype=torch.long)
        order = torch.argsort(rows)  # keep-positions sorted by gallery row
        sorted_rows = rows[order]
        ref_g = torch.empty((len(keep), clip.embed_dim), dtype=torch.float32)
        ref_P = None
    i = 0
    loader = make_loader(dataset, batch_size, workers, device)
    for batch in batches(loader, f"gallery {dataset_label(dataset)}", progress):
        images = batch["image"].to(device, non_blocking=True)
        with precision_context(precision, device):
            g, tokens = clip.encode_image_tokens(images)  # encode_image is this pass's g
        out[i:i + len(images)] = F.normalize(g.float(), dim=-1)
        if keep is not None:
            lo, hi = (int(x) for x in torch.searchsorted(sorted_rows, torch.tensor([i, i + len(images)])))
            if hi > lo:
                local = (sorted_rows[lo:hi] - i).to(device)
                if ref_P is None:
                    ref_P = torch.empty((len(keep),) + tuple(tokens.shape[1:]), dtype=torch.float32)
                ref_g[order[lo:hi]] = g[local].float().cpu()
                ref_P[order[lo:hi]] = tokens[local].float().cpu()
        i += len(images)
    counters["gallery_images_encoded"] += n
    if keep is None:
        return out
    return out, ReferenceTokens(list(keep), ref_g, ref_P)


def gallery_features(clip, dataset, batch_size: int = 32, workers: int = 8, device=None, precision: str = "fp32",
                     cache_dir=None, progress: bool = True, reference_names: Sequence[str] | None = None):
    """(gallery names, [G, D] L2-normalised float32 features on `device`), from the cache when valid.

    `cache_dir=None` disables the cache. With `reference_names` (gallery images that are query
    references), also returns their ReferenceTokens: taken from the gallery pass when the gallery is
    encoded, else from their own cache file beside the gallery's, else from one pass over just those
    images; written to `cache_dir` for the next run.
    """
    device = torch.device(device) if device is not None else clip.device
    names = list(dataset.names)
    refs = None if reference_names is None else list(dict.fromkeys(reference_names))
    meta = path = feats = tokens = None
    if cache_dir is not None:
        meta = gallery_cache_meta(clip, dataset, precision)
        path = gallery_cache_path(cache_dir, meta)
        feats = _read_cache(path, meta, names)
        if refs is not None:
            tokens = _read_token_cache(_token_cache_path(path, refs), meta, refs)
    fresh_tokens = refs is not None and tokens is None
    if feats is None:
        got = encode_gallery(clip, dataset, batch_size, workers, device, precision, progress,
                             keep=refs if fresh_tokens else None)
        feats, tokens = got if fresh_tokens else (got, tokens)
        if cache_dir is not None and _write(path, {"format": CACHE_FORMAT, "key": _cache_key(meta), "meta": meta,
                                                   "joined_names": _joined(names), "features": feats.cpu()}, "gallery cache"):
            counters["cache_writes"] += 1
    else:
        counters["cache_hits"] += 1
        log(f"gallery cache: hit {path} ({len(names)} images)")
        feats = feats.to(device=device, dtype=torch.float32)
        if fresh_tokens:  # the gallery came from the cache: one pass over the reference images alone
            where = {n: i for i, n in enumerate(names)}
            rows = [where.get(r, -1) for r in refs]
            subset = _Rows(dataset, rows, refs)
            _, tokens = encode_gallery(clip, subset, batch_size, workers, device, precision, progress, keep=refs)
    if fresh_tokens and cache_dir is not None:
        _write(_token_cache_path(path, refs), {"format": TOKEN_CACHE_FORMAT, "key": _cache_key(meta), "names": refs,
                                               "g": tokens.g, "P": tokens.P}, "reference-token cache")
    return (names, feats) if refs is None else (names, feats, tokens)


class _Rows(torch.utils.data.Dataset):
    """Some rows of a gallery-mode dataset, with their names (a reference that is missing from the
    gallery gets row -1 and is reported by encode_gallery's name check)."""

    def __init__(self, dataset, rows: list[int], names: list[str]):
        missing = [n for n, r in zip(names, rows) if r < 0]
        if missing:
            raise ValueError(f"{dataset_label(dataset)}: reference images not in the gallery: {missing[:5]}")
        self.dataset, self.rows, self.names = dataset, rows, names
        self.root, self.split = getattr(dataset, "root", ""), getattr(dataset, "split", "")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.dataset[self.rows[i]]


def _write(path: Path, obj: dict, what: str) -> bool:
    try:
        atomic_torch_save(obj, path)
    except OSError as e:  # a full disk or read-only folder costs the next run time, not this run's result
        log(f"{what}: could not write {path} ({e}); continuing without caching")
        return False
    log(f"{what}: wrote {path}")
    return True


def _token_cache_path(gallery_path: Path, refs: list[str]) -> Path:
    return gallery_path.with_name(f"{gallery_path.stem}-refs-{_sha(chr(0).join(refs))[:16]}.pt")


def _read_token_cache(path: Path, meta: dict, refs: list[str]) -> ReferenceTokens | None:
    """The cached reference tokens, or None (reason printed) when absent, foreign or stale."""
    obj = _load_cache_file(path, TOKEN_CACHE_FORMAT, "reference-token cache")
    if obj is None:
        return None
    ok = (obj.get("key") == _cache_key(meta) and obj.get("names") == refs and isinstance(obj.get("g"), torch.Tensor) and isinstance(obj.get("P"), torch.Tensor)
          and obj["g"].shape[0] == obj["P"].shape[0] == len(refs))
    if not ok:
        log(f"reference-token cache: {path} is stale or not ours; recomputing")
        return None
    counters["token_cache_hits"] += 1
    log(f"reference-token cache: hit {path} ({len(refs)} reference images)")
    return ReferenceTokens(refs, obj["g"], obj["P"])


def _text_features(clip, texts: Sequence[str], device) -> torch.Tensor:
    return F.normalize(clip.encode_text(clip.tokenize(list(texts)).to(device)).float(), dim=-1)


@torch.no_grad()
def _text_only(clip, queries: list[dict], batch_size: int, device, precision: str, progress: bool) -> torch.Tensor:
    """Plain CLIP text features of the modification text. FashionIQ: the two texts of SPEC 10,
    each normalised, averaged and normalised again, as the model's queries are."""
    fashioniq = "relative_captions" in queries[0]
    out = torch.empty((len(queries), clip.embed_dim), dtype=torch.float32, device=device)
    starts = range(0, len(queries), batch_size)
    for s in tqdm(starts, desc="queries (text-only)", unit="batch", disable=not progress, leave=False):
        chunk = queries[s:s + batch_size]
        with precision_context(precision, device):
            if fashioniq:
                pairs = [fashioniq_texts(*q["relative_captions"]) for q in chunk]
                f = _text_features(clip, [p[0] for p in pairs] + [p[1] for p in pairs], device)
                f = F.normalize((f[:len(chunk)] + f[len(chunk):]) / 2, dim=-1)
            else:
                f = _text_features(clip, [q["relative_caption"] for q in chunk], device)
        out[s:s + len(chunk)] = f
    return out


@torch.no_grad()
def query_features(net, clip, dataset, batch_size: int = 32, workers: int = 8, device=None, precision: str = "fp32",
                   baseline: str | None = None, progress: bool = True,
                   reference_tokens: ReferenceTokens | None = None) -> tuple[torch.Tensor, list[dict]]:
    """([Q, D] L2-normalised float32 query features on `device`, the queries' metadata in that order).

    `baseline=None`: FTI4CIR's composed query (SPEC 10; `net` in eval mode). 'image-only': the
    reference image's CLIP embedding. 'text-only': CLIP's embedding of the modification text(s).
    `reference_tokens` (from `gallery_features(..., reference_names=...)`): the references' tower
    outputs, so no image is read here.
    """
    device = torch.device(device) if device is not None else clip.device
    queries = dataset.queries
    _check_nonempty(len(queries), dataset, "queries")
    if baseline not in (None,) + BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES} or None, got {baseline!r}")
    if baseline == "text-only":  # no image is needed: read the captions from the metadata
        return _text_only(clip, queries, batch_size, device, precision, progress), queries
    if baseline is None and net is None:
        raise ValueError("query_features needs the FTI4CIR network (or a baseline)")
    fashioniq = "relative_captions" in queries[0]
    # Each distinct reference image goes through the visual tower once, however many queries use
    # it (CIRR val: 4,181 queries, 2,165 references); its (g, tokens) then serve all of them.
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
    for g_all, tokens_all in _reference_outputs(clip, dataset, representative, list(first), reference_tokens,
                                               batch_size, workers, device, precision, progress):
        u1 = u0 + len(g_all)
        rows = by_ref[bounds[u0]:bounds[u1]]  # the queries of these references
        local = (ref_of_query[rows] - u0).to(device)
        for c in range(0, len(rows), batch_size):  # compose at most batch_size queries at a time
            sel, idx = rows[c:c + batch_size], local[c:c + batch_size]
            with precision_context(precision, device):
                g, tokens = g_all[idx], tokens_all[idx]
                if baseline == "image-only":
                    f = g
                elif fashioniq:
                    f = net.query_features(clip, g, tokens, None,
                                           fashioniq_captions=[queries[i]["relative_captions"] for i in sel.tolist()])
                else:
                    f = net.query_features(clip, g, tokens, [queries[i]["relative_caption"] for i in sel.tolist()])
            out[sel.to(device)] = F.normalize(f.float(), dim=-1)
        u0 = u1
    return out, queries


def _reference_outputs(clip, dataset, representative: list[int], paths: list[str], reference_tokens, batch_size: int,
                       workers: int, device, precision: str, progress: bool):
    """(g, P) of the distinct reference images, in order, batch by batch: from `reference_tokens`
    when given (no image is read), else from one visual pass over the images."""
    if reference_tokens is not None:
        names = [dataset.queries[i]["reference_name"] for i in representative]
        rows = torch.tensor([reference_tokens.row[n] for n in names])
        for s in range(0, len(rows), batch_size):
            r = rows[s:s + batch_size]
            yield reference_tokens.g[r].to(device), reference_tokens.P[r].to(device)
        return
    loader = make_loader(Subset(dataset, representative), batch_size, workers, device)
    for batch in batches(loader, f"queries {dataset_label(dataset)}", progress):
        images = batch["reference_image"].to(device, non_blocking=True)
        with precision_context(precision, device):
            g, tokens = clip.encode_image_tokens(images)  # one visual pass gives both
        counters["query_images_encoded"] += len(images)
        yield g, tokens
