"""Composed retrieval over any folder of images: the library behind retrieve.py (METHOD §10).

The folder is a gallery like a benchmark's (datasets.ImageFolderDataset), encoded by the same code
(`evaluation.encode_benchmark`: the gallery cache, composed queries, baselines), so the same query
ranks a benchmark's gallery here exactly as evaluate.py ranks it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

import metrics as M
from datasets import ImageFolderDataset, list_images
from errors import ConfigError
from evaluation import EvalConfig, Retrieval, draw_rankings, encode_benchmark
from transforms import build_transform


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
            raise ConfigError(f'{path}:{n}: expected {{"reference": "<image file>", "text": "<modification>"}}, got {line[:200]}')
        out.append((entry["reference"], entry["text"]))
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


def search_folder(net, clip, folder, queries: Sequence[tuple[str, str]], config: EvalConfig, top: int = 10,
                  exclude_reference: bool = False) -> FolderResults:
    """Ranks every image under `folder` for each (reference, text) query: FTI4CIR's composed query (or
    config.baseline), cosine similarity to the gallery's CLIP embeddings. `exclude_reference`: a
    reference that is itself in the folder is left out of its own ranking (as CIRR does)."""
    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    preprocess = build_transform(config.preprocess_type, clip.image_size)
    gallery = ImageFolderDataset(folder, "gallery", preprocess)
    query = ImageFolderDataset(folder, "query", preprocess, queries)
    r = encode_benchmark(net, clip, gallery, query, config)
    exclude = None
    if exclude_reference:
        row = {os.path.realpath(p): j for j, p in enumerate(gallery.gallery_paths)}
        exclude = torch.tensor([row.get(os.path.realpath(p), -1) for p in query.query_paths])
    k = min(top, len(r.names) - int(exclude is not None and bool((exclude >= 0).any())))
    ranked = M.topk_indices(r.query_features, r.gallery.features, k, exclude)
    g = r.gallery.features[ranked.to(r.gallery.features.device)]  # [Q, K, D]
    scores = torch.einsum("qd,qkd->qk", r.query_features.to(g.device, g.dtype), g).cpu()
    return FolderResults(r, ranked, scores)


def save_grid(results: FolderResults, path) -> Path:
    """The PNG grid of every query: reference, text, its top results (as evaluate.py's --save-examples)."""
    r = results.retrieval
    return draw_rankings(r, range(len(r.queries)), results.ranked, path,
                         title=f"{r.gallery_dataset.root}: reference | text | top {results.ranked.shape[1]}")
