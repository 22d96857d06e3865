"""Composed retrieval over any folder of images: the library behind retrieve.py (METHOD §10).

The folder is a gallery like a benchmark's (datasets.ImageFolderDataset), encoded by the same code
as evaluate.py's benchmarks (`features.gallery_features` with the gallery cache, `features.query_features`
for composed queries and baselines), so the same query ranks a benchmark's gallery here exactly as
evaluate.py ranks it. `index_folder` encodes the gallery once; `rank_folder` answers queries over it.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

import metrics as M
from datasets import DatasetLayoutError, ImageFolderDataset, ImageLoadError, list_images, load_image
from errors import ConfigError
from evaluation import EvalConfig, Retrieval, draw_rankings
from feature_store import EvalCache, folder_name, why_not_used
from features import Gallery, gallery_features, query_features
from logs import get_logger
from transforms import build_transform

log = get_logger("folder_search")
# how many unreadable images the warning of `skip_bad_images` names
NAMED = 5


QUERY_LINE = '{"reference": "<image file>", "text": "<modification>"}'  # one line of a --queries file


def read_queries(path) -> list[tuple[str, str]]:
    """(reference, text) pairs of a JSON-lines file, one `{"reference": IMAGE, "text": "..."}` a line
    (blank lines skipped); the line number of anything else is named."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--queries {path}: no such file (JSON lines, one {{\"reference\": ..., \"text\": ...}} a line)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not a JSON object ({e})") from e
        if not (isinstance(entry, dict) and isinstance(entry.get("reference"), str) and isinstance(entry.get("text"), str)):
            raise ConfigError(f"{path}:{n}: expected {QUERY_LINE}, got {line[:200]}")
        out.append((entry["reference"], entry["text"]))
    if not out:  # else collect_queries would say no --queries was given
        raise ConfigError(f"--queries {path} holds no query (one JSON object per line: {QUERY_LINE})")
    return out


def collect_queries(references: Sequence[str], texts: Sequence[str], queries_file=None) -> list[tuple[str, str]]:
    """The --reference/--text pairs (in order), then the --queries file's; each reference must exist."""
    if len(references) != len(texts):
        raise ConfigError(f"{len(references)} --reference and {len(texts)} --text: give them in pairs, one text per "
                          "reference image")
    pairs = list(zip(references, texts)) + (read_queries(queries_file) if queries_file else [])
    if not pairs:
        raise ConfigError("no query: pass --reference IMAGE --text \"...\" (repeatable) or --queries FILE.jsonl")
    for reference, _ in pairs:
        if not Path(reference).is_file():
            raise ConfigError(f"reference image {reference}: no such file")
    return pairs


def check_gallery(folder) -> None:
    if not Path(folder).is_dir():
        raise ConfigError(f"--gallery {folder}: no such folder")
    if not list_images(folder):
        raise ConfigError(f"--gallery {folder}: holds no images")


@dataclass
class FolderResults:
    """The encoded folder and queries, and each query's best gallery rows with their cosine similarities."""

    retrieval: Retrieval
    ranked: torch.Tensor  # [Q, K] gallery rows, best first
    scores: torch.Tensor  # [Q, K]

    def to_dict(self) -> dict:
        r = self.retrieval
        out = []
        for i, q in enumerate(r.queries):
            results = [{"rank": k + 1, "file": r.names[j], "path": str(r.gallery_dataset.gallery_paths[j]),
                        "score": round(float(s), 6)}
                       for k, (j, s) in enumerate(zip(self.ranked[i].tolist(), self.scores[i].tolist()))]
            out.append({"reference": q["reference_name"], "text": q["relative_caption"], "results": results})
        return {"gallery": str(r.gallery_dataset.root), "gallery_images": len(r.names), "top": self.ranked.shape[1],
                "queries": out}


@dataclass
class FolderIndex:
    """A folder encoded as a gallery: its gallery-mode dataset (names, paths, preprocessing) and features."""

    dataset: ImageFolderDataset
    gallery: Gallery

    @property
    def paths(self) -> list[Path]:
        return self.dataset.gallery_paths

    def __len__(self) -> int:
        return len(self.gallery.names)


def _check_top(top: int) -> None:
    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")


def _problem(path) -> str | None:
    """Why the image file cannot be read (None when it can)."""
    try:
        load_image(path).close()
    except ImageLoadError as e:
        return str(e).splitlines()[0]
    return None


def without_unreadable(dataset: ImageFolderDataset) -> ImageFolderDataset:
    """The gallery without the images that cannot be read (each decoded once, by a pool of threads: PIL's
    decoders release the GIL), counted in one warning line that names the first few."""
    with ThreadPoolExecutor(min(16, 2 * (os.cpu_count() or 1))) as pool:
        problems = list(pool.map(_problem, dataset.gallery_paths))
    bad = [(name, why) for name, why in zip(dataset.names, problems) if why is not None]
    if not bad:
        return dataset
    if len(bad) == len(dataset.names):
        raise DatasetLayoutError(f"none of the {len(bad)} images under {dataset.root} can be read (the first: {bad[0][1]})")
    names = ", ".join(name for name, _ in bad[:NAMED]) + (", ..." if len(bad) > NAMED else "")
    log.warning(f"left out {len(bad)} of the {len(dataset.names)} images under {dataset.root} that cannot be read: "
                f"{names} (the first: {bad[0][1]})")
    return dataset.without({name for name, _ in bad}, set())


def _cached(clip, dataset, config: EvalConfig, cache: EvalCache | None) -> bool:
    """Whether the gallery cache holds every image of `dataset` (images unchanged since: all readable)."""
    if cache is None:
        return False
    key = cache.key(clip, dataset, config.encoding.precision)
    return why_not_used(cache.root / folder_name(key), key, {"features": None}, complete=True) is None


def index_folder(clip, folder, config: EvalConfig, skip_bad_images: bool = False) -> FolderIndex:
    """Every image under `folder` as a gallery: CLIP embeddings from `config.cache_dir` (the gallery cache
    evaluate.py uses) when it holds them, else encoded and written there. `skip_bad_images`: images that
    cannot be read are left out (`without_unreadable`; the images are then read once more before they are
    encoded, unless the cache holds the whole folder); else the first one stops the encoding."""
    preprocess = build_transform(config.preprocess_type, clip.image_size)
    dataset = ImageFolderDataset(folder, "gallery", preprocess)
    cache = EvalCache(config.cache_dir, config.cache_hash_images) if config.cache_dir is not None else None
    if skip_bad_images and not _cached(clip, dataset, config, cache):
        dataset = without_unreadable(dataset)
    return FolderIndex(dataset, gallery_features(clip, dataset, config.encoding, cache))


def rank_folder(net, clip, index: FolderIndex, queries: Sequence[tuple[str, str]], config: EvalConfig,
                top: int = 10, exclude_reference: bool = False) -> FolderResults:
    """Ranks the indexed folder for each (reference, text) query: FTI4CIR's composed query (or
    config.baseline), cosine similarity to the gallery's CLIP embeddings. `exclude_reference`: a
    reference that is itself in the folder is left out of its own ranking (as CIRR does)."""
    _check_top(top)
    gallery = index.dataset
    query = ImageFolderDataset(gallery.root, "query", gallery.preprocess, queries)
    r = Retrieval(index.gallery, query_features(net, clip, query, config.encoding, config.baseline), gallery, query)
    exclude = None
    if exclude_reference:
        row = {os.path.realpath(p): j for j, p in enumerate(gallery.gallery_paths)}
        exclude = torch.tensor([row.get(os.path.realpath(p), -1) for p in query.query_paths])
    k = min(top, len(r.names) - int(exclude is not None and bool((exclude >= 0).any())))
    ranked = M.topk_indices(r.query_features, r.gallery.features, k, exclude)
    g = r.gallery.features[ranked.to(r.gallery.features.device)]  # [Q, K, D]
    scores = torch.einsum("qd,qkd->qk", r.query_features.to(g.device, g.dtype), g).cpu()
    return FolderResults(r, ranked, scores)


def search_folder(net, clip, folder, queries: Sequence[tuple[str, str]], config: EvalConfig, top: int = 10,
                  exclude_reference: bool = False) -> FolderResults:
    """`index_folder`, then `rank_folder`."""
    _check_top(top)
    return rank_folder(net, clip, index_folder(clip, folder, config), queries, config, top, exclude_reference)


def save_grid(results: FolderResults, path) -> Path:
    """The PNG grid of every query: reference, text, its top results (as evaluate.py's --save-examples)."""
    r = results.retrieval
    return draw_rankings(r, range(len(r.queries)), results.ranked, path,
                         title=f"{r.gallery_dataset.root}: reference | text | top {results.ranked.shape[1]}")
