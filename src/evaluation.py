"""Evaluation on FashionIQ, CIRR and CIRCO: the library behind evaluate.py, test.py and training's
validation (METHOD §10-12).

- `open_benchmark`: a benchmark split's gallery-mode and query-mode datasets;
- `retrieve`: both sides encoded (`Retrieval`: gallery names and features, query features);
- the metric adapters (`fashioniq_metrics`, `cirr_metrics`, `circo_metrics`) and the server files
  (`submission_files`), pure functions of a `Retrieval`;
- `evaluate`: the validation metrics of one benchmark with the authors' keys (`METRIC_KEYS`), plus
  `incomplete_data` (images left out) and `circo_query` (the other CIRCO protocol) entries only when
  a run departs from the authors' protocol;
- `check_submission_file`: an existing server file against the annotations and the servers' limits.

`EvalConfig` holds everything that is not the network, CLIP or the benchmark.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Sequence

import torch

import metrics as M
from dataset_checks import LeftOut, leave_out_missing, metadata_only
from datasets import CIRCO_QUERY_TEMPLATES, FASHIONIQ_CATEGORIES, CIRCODataset, CIRRDataset, FashionIQDataset
from errors import ConfigError
from examples import ExampleRow, save_example_grid
from feature_store import EvalCache
from features import Encoding, Gallery, gallery_features, query_features
from logs import get_logger
from transforms import build_transform

METRIC_KEYS = {
    "fashioniq": [f"{c}_{k}" for c in FASHIONIQ_CATEGORIES + ("average",) for k in (10, 50)],
    "cirr": [f"cirr_recall_at{k}" for k in (1, 5, 10, 50)] + [f"cirr_group_recall_at{k}" for k in (1, 2, 3)],
    "circo": [f"circo_map_at{k}" for k in (5, 10, 25, 50)] + [f"circo_recall_at{k}" for k in (5, 10, 25, 50)],
}
TEST_SPLITS = {"cirr": "test1", "circo": "test"}  # the splits the test servers score
# test.py --split: the annotation split behind each benchmark's server files (val: files the val annotations score)
SERVER_SPLITS = {name: {"test": split, "val": "val"} for name, split in TEST_SPLITS.items()}

log = get_logger("evaluation")


@dataclass
class EvalConfig:
    """How to evaluate: the split, FashionIQ's categories, preprocessing, encoding, caches, baselines,
    example grids. `cache_dir=None`: no gallery cache."""

    split: str = "val"
    categories: Sequence[str] = FASHIONIQ_CATEGORIES
    preprocess_type: str = "targetpad"
    encoding: Encoding = field(default_factory=Encoding)
    cache_dir: str | Path | None = None
    cache_hash_images: bool = False  # key the gallery cache on the images' contents, not sizes and times
    baseline: str | None = None
    reference_tokens: bool = False  # keep the references' tower outputs from the gallery pass (and cache them)
    examples: int = 0  # queries per split drawn as a PNG grid into examples_dir
    examples_dir: str | Path | None = None
    skip_missing_images: bool = False  # leave out missing gallery images and the queries that need a missing image
    circo_query: str = "relative"  # CIRCO's modification text: a key of datasets.CIRCO_QUERY_TEMPLATES


@dataclass
class Retrieval:
    """One benchmark split encoded: the gallery (names, features), the query features in the order of
    `query.queries`, and the two datasets they came from."""

    gallery: Gallery
    query_features: torch.Tensor
    gallery_dataset: object
    query_dataset: object
    left_out: LeftOut | None = None  # with skip_missing_images: what was left out

    @property
    def names(self) -> list[str]:
        return self.gallery.names

    @property
    def queries(self) -> list[dict]:
        return self.query_dataset.queries


def check_benchmark(name: str) -> str:
    name = name.lower()
    if name not in METRIC_KEYS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {tuple(METRIC_KEYS)}")
    return name


def open_benchmark(name: str, root, split: str, preprocess, category: str | None = None,
                   circo_query: str = "relative", require_images: bool = True):
    """(gallery-mode, query-mode) datasets of one benchmark split (one FashionIQ category); `circo_query`:
    how CIRCO's queries are turned into text (datasets.CIRCO_QUERY_TEMPLATES); `require_images=False`:
    the annotation files alone (CIRR and CIRCO), for checking server files."""
    name = check_benchmark(name)
    if name == "fashioniq":
        return (FashionIQDataset(root, split, [category], "gallery", preprocess),
                FashionIQDataset(root, split, [category], "query", preprocess))
    if name == "cirr":
        return (CIRRDataset(root, split, "gallery", preprocess, require_images=require_images),
                CIRRDataset(root, split, "query", preprocess, require_images=require_images))
    gallery = CIRCODataset(root, split, "gallery", preprocess, require_images=require_images)
    return gallery, CIRCODataset(root, split, "query", preprocess, gallery=gallery, query_text=circo_query,
                                 require_images=require_images)


def check_layout(name: str, root, split: str, categories=None) -> None:
    """Reads the split's annotation files and image folders as `retrieve` does, opening no image (FashionIQ:
    each of `categories`, default all three), so a wrong root fails before any model loads."""
    name = check_benchmark(name)
    for category in (categories or FASHIONIQ_CATEGORIES) if name == "fashioniq" else (None,):
        open_benchmark(name, root, split, lambda image: image, category)


def retrieve(net, clip, name: str, root, config: EvalConfig, category: str | None = None,
             split: str | None = None) -> Retrieval:
    """Gallery and query features of one benchmark split (`split`, default config.split).

    `config.reference_tokens`: the reference images' tower outputs come from the gallery pass (and the
    cache), so the queries need no visual pass of their own. `config.skip_missing_images`: missing gallery
    images and the queries that need a missing image are left out first (`Retrieval.left_out`).
    """
    if config.circo_query not in CIRCO_QUERY_TEMPLATES:
        raise ConfigError(f"--circo-query {config.circo_query!r}: choose one of {tuple(CIRCO_QUERY_TEMPLATES)}")
    preprocess = build_transform(config.preprocess_type, clip.image_size)
    gallery_ds, query_ds = open_benchmark(name, root, split or config.split, preprocess, category, config.circo_query)
    left = None
    if config.skip_missing_images:
        gallery_ds, query_ds, left = leave_out_missing(gallery_ds, query_ds)
        log.info(left.line())
    r = encode_benchmark(net, clip, gallery_ds, query_ds, config)
    r.left_out = left
    return r


def encode_benchmark(net, clip, gallery_ds, query_ds, config: EvalConfig) -> Retrieval:
    """Both sides of a gallery-mode and a query-mode dataset encoded (any datasets with the benchmark
    classes' interface: retrieve.py's image folders too); the gallery cache and reference tokens as in
    `retrieve`."""
    cache = EvalCache(config.cache_dir, config.cache_hash_images) if config.cache_dir is not None else None
    refs = None
    if config.reference_tokens and config.baseline != "text-only":
        refs = [q["reference_name"] for q in query_ds.queries]
    gallery = gallery_features(clip, gallery_ds, config.encoding, cache, reference_names=refs)
    q = query_features(net, clip, query_ds, config.encoding, config.baseline, references=gallery.references)
    return Retrieval(gallery, q, gallery_ds, query_ds)


# ---------------------------------------------------------------------------------------------
# metric adapters

def _clipped(ks: Sequence[int], available: int) -> dict[int, int]:
    """K -> min(K, available): with fewer candidates than K, Recall@K is Recall@available (the
    authors' code slices a shorter ranking the same way)."""
    return {k: max(1, min(k, available)) for k in ks}


def _need_targets(r: Retrieval, key: str, benchmark: str) -> None:
    lacking = sum(key not in q for q in r.queries)
    if lacking:
        raise ConfigError(f"{lacking} of {len(r.queries)} {benchmark} queries have no {key}: metrics need the val split")


def fashioniq_metrics(r: Retrieval) -> dict[int, float]:
    """Recall@{10, 50} of one FashionIQ category (reference kept in the ranking)."""
    _need_targets(r, "target_name", "FashionIQ")
    ks = _clipped((10, 50), len(r.names))
    got = M.fashioniq_recall(r.query_features, r.gallery.features, r.names, [x["target_name"] for x in r.queries],
                             ks=sorted(set(ks.values())))
    return {k: got[c] for k, c in ks.items()}


def cirr_metrics(r: Retrieval) -> dict[str, float]:
    """Recall@{1,5,10,50} (reference removed) and Recall_subset@{1,2,3}."""
    _need_targets(r, "target_name", "CIRR")
    ks = _clipped((1, 5, 10, 50), len(r.names) - 1)  # the reference is removed from every ranking
    q = r.queries
    got = M.cirr_recall(r.query_features, r.gallery.features, r.names, [x["reference_name"] for x in q],
                        [x["target_name"] for x in q], [x["group_members"] for x in q], ks=sorted(set(ks.values())))
    out = {f"cirr_recall_at{k}": got[f"cirr_recall_at{c}"] for k, c in ks.items()}
    out.update({k: v for k, v in got.items() if k.startswith("cirr_group_recall_at")})
    return out


def circo_metrics(r: Retrieval) -> dict[str, float]:
    """mAP@{5,10,25,50} and Recall@{5,10,25,50} over the top 50 (reference kept); where the annotations list
    each query's semantic aspects (the current CIRCO release does), mAP@10 per aspect after them, as the
    CIRCO server reports it."""
    _need_targets(r, "gt_img_ids", "CIRCO")
    per_query = M.circo_per_query(r.query_features, r.gallery.features, r.names, [x["gt_img_ids"] for x in r.queries])
    out = {key: float(v.mean().item() * 100.0) for key, v in per_query.items()}
    out = {k: out[k] for k in METRIC_KEYS["circo"]}
    if all("semantic_aspects" in x for x in r.queries):
        out.update(M.circo_aspect_map10(per_query["circo_map_at10"], [x["semantic_aspects"] for x in r.queries]))
    else:
        log.info("CIRCO: these annotations list no semantic aspects (copies older than the current release "
                 "lack them): no mAP@10 per aspect")
    return out


# ---------------------------------------------------------------------------------------------
# test-server files

def _list_length(server_top: int, available: int, what: str) -> int:
    """The server's list length, or all `available` names of a gallery too small for it (toy data)."""
    if available >= server_top:
        return server_top
    log.warning(f"the {what} gallery offers only {available} candidates per query, so each list has "
                f"{available} names, not {server_top}: the server rejects such files; written for toy data (the "
                f"authors' [:{server_top}] slice gives the same)")
    return available


def _refuse_incomplete(name: str, r: Retrieval) -> None:
    """A server file must hold every test query: queries left out for missing images make it one the
    server rejects; a gallery with images left out still gives a file it accepts (with other scores)."""
    left = r.left_out
    if left is not None and left.query_rows:
        raise M.SubmissionError(
            f"{left.line()}: the {name.upper()} server scores every test query and rejects a file without them, "
            f"so none is written. Get the missing images (python src/check_data.py lists them and where they come "
            f"from) and run again without --skip-missing-images")
    if left is not None and left.gallery_names:
        log.warning(f"{left.line()}: every query is in the file, but its rankings leave out those images, "
                    "so the server's scores are not comparable with full-data results")


SERVER_FILES = {"cirr": ("cirr.json", "subset_cirr.json"), "circo": ("circo.json",)}  # each test server's files


def submission_files(name: str, r: Retrieval) -> dict[str, dict]:
    """{file name: content} of a benchmark's test-server submission, validated (METHOD §12):
    CIRR `cirr.json` and `subset_cirr.json`, CIRCO `circo.json`."""
    q = r.queries
    _refuse_incomplete(name, r)
    if name == "cirr":
        top = _list_length(M.CIRR_TOP, len(r.names) - 1, "CIRR")  # the reference never appears
        sub, subset = M.cirr_submission(r.query_features, r.gallery.features, r.names, [x["reference_name"] for x in q],
                                        [x["group_members"] for x in q], [x["pair_id"] for x in q], top=top)
        M.validate_cirr_submission(sub, subset, q, gallery_names=r.names, top=top)
        return dict(zip(SERVER_FILES["cirr"], (sub, subset)))
    if name == "circo":
        top = _list_length(M.CIRCO_TOP, len(r.names), "CIRCO")
        sub = M.circo_submission(r.query_features, r.gallery.features, r.names, [x["query_id"] for x in q], top=top)
        M.validate_circo_submission(sub, q, gallery_ids=r.names, top=top)
        return dict(zip(SERVER_FILES["circo"], (sub,)))
    raise ConfigError(f"{name} has no test server; choose one of {tuple(TEST_SPLITS)}")


def submission_bytes(name: str, files: dict[str, dict]) -> dict[str, bytes]:
    """The files' JSON bytes, checked against the server's upload limit (metrics.SERVER_MAX_BYTES)."""
    out = {f: json.dumps(obj).encode("utf-8") for f, obj in files.items()}
    problems = [p for f, b in out.items() for p in M.size_problems(name, f, len(b))]
    if problems:
        raise M.SubmissionError("; ".join(problems))
    return out


@dataclass
class FileCheck:
    """One existing submission file checked: its size, what the server rejects (its code or documents say
    so), and notes (conventions, and what to know)."""

    path: Path
    size: int
    problems: list[str]
    warnings: list[str]


def read_server_json(path: Path, data: bytes):
    """A server file's JSON; a SubmissionError naming the file for what cannot be read (a JSON nested
    deeper than Python's parser recurses is one line, not a traceback)."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise M.SubmissionError(f"{path.name}: not valid JSON ({e})") from None
    except RecursionError:
        raise M.SubmissionError(f"{path.name}: JSON nested too deep to read; a server file is one object of "
                                "lists") from None


def check_submission_files(name: str, root, paths: Sequence, split: str | None = None) -> list[FileCheck]:
    """Existing server files (CIRR: cirr.json and/or subset_cirr.json, told apart by their "metric";
    CIRCO: circo.json) checked against the `split` annotations (default: the test server's split) under
    `root` and the server's limits, as test.py checks the files it writes. Nothing is raised for a bad
    file: it is all in the result."""
    if name not in TEST_SPLITS:
        raise ConfigError(f"{name} has no test server; choose one of {tuple(TEST_SPLITS)}")
    split = split or TEST_SPLITS[name]
    gallery, query = open_benchmark(name, root, split, metadata_only, require_images=False)
    queries, names = query.queries, gallery.names
    note = M.query_count_note(name, len(queries)) if split == TEST_SPLITS[name] else None
    if name == "cirr":
        top = _list_length(M.CIRR_TOP, len(names) - 1, "CIRR")  # the reference never appears
    else:
        top = _list_length(M.CIRCO_TOP, len(names), "CIRCO")
    out = []
    for path in map(Path, paths):
        if not path.is_file():
            out.append(FileCheck(path, 0, [f"{path}: no such file"], []))
            continue
        data = path.read_bytes()
        problems = M.size_problems(name, path.name, len(data))
        try:
            sub = read_server_json(path, data)
        except M.SubmissionError as e:
            out.append(FileCheck(path, len(data), problems + [str(e)], []))
            continue
        if name == "cirr":
            if isinstance(sub, dict) and sub.get("metric") in ("recall", "recall_subset"):
                subset = sub["metric"] == "recall_subset"
            else:  # no usable "metric": the file's name says which it was meant to be
                subset = path.name.startswith("subset")
            found = M.cirr_file_findings(sub, queries, names, top, subset=subset)
        else:
            found = M.circo_file_findings(sub, queries, names, top)
        problems += [str(f) for f in found if f.rejects]
        notes = [str(f) for f in found if not f.rejects] + ([note] if note else [])
        out.append(FileCheck(path, len(data), problems, notes))
    return out


# ---------------------------------------------------------------------------------------------
# example grids

def example_rankings(r: Retrieval, count: int, top: int = 5) -> tuple[list[int], torch.Tensor]:
    """The `count` evenly spaced queries that example grids show, and each one's top results [len, top']
    (CIRR: the reference left out; top' = top, or fewer in a smaller gallery)."""
    queries, names = r.queries, r.names
    rows = sorted({round(i * (len(queries) - 1) / max(1, count - 1)) for i in range(min(count, len(queries)))})
    exclude = None
    if isinstance(r.query_dataset, CIRRDataset):  # the reference is not a result on CIRR
        index = {n: i for i, n in enumerate(names)}
        exclude = torch.tensor([index[queries[i]["reference_name"]] for i in rows])
    top = min(top, len(names) - (exclude is not None))
    return rows, M.topk_indices(r.query_features[rows], r.gallery.features, top, exclude)


def query_targets(query: dict) -> set[str]:
    """The gallery names that count as a query's target: CIRCO's ground truths, or the one target."""
    return set(query.get("gt_img_ids") or []) | ({query["target_name"]} if "target_name" in query else set())


def save_examples(r: Retrieval, count: int, out_dir, label: str, top: int = 5) -> Path:
    """Draws `count` evenly spaced queries: reference, modification text, top results, targets framed."""
    rows, ranked = example_rankings(r, count, top)
    split = r.query_dataset.split
    return draw_rankings(r, rows, ranked, Path(out_dir) / f"examples_{label}_{split}.png",
                         title=f"{label} {split}: reference | text | top {ranked.shape[1]} (green: target)")


def draw_rankings(r: Retrieval, rows: Sequence[int], ranked: torch.Tensor, path, title: str) -> Path:
    """A PNG grid (examples.py) of the queries `rows` of `r`: each one's reference, modification text and
    the gallery images of its row of `ranked` [len(rows), K], best first, its targets framed."""
    out = []
    for row, i in zip(ranked.tolist(), rows):
        x = r.queries[i]
        targets = query_targets(x)
        out.append(ExampleRow(reference=r.query_dataset.query_paths[i], text=r.query_dataset.query_texts(x)[0],
                              caption=f"query {i}", results=[r.gallery_dataset.gallery_paths[j] for j in row],
                              is_target=[r.names[j] in targets for j in row]))
    return save_example_grid(out, path, title=title)


# ---------------------------------------------------------------------------------------------
# evaluate

def evaluate(net, clip, name: str, root, config: EvalConfig | None = None) -> dict[str, float]:
    """Validation metrics (percent) of one benchmark with the authors' keys (METRIC_KEYS[name]), followed
    by the `protocol_entries` of a run that departs from the authors' protocol (none by default).

    `net`: an FTI4CIR network (a DDP wrapper is unwrapped; its train/eval mode is restored after),
    or None with `config.baseline` 'image-only' / 'text-only'. FashionIQ: each of `config.categories`
    on its own gallery; `average_*` is the mean over them.
    """
    name = check_benchmark(name)
    config = config or EvalConfig()
    net = getattr(net, "module", net)
    was_training = net is not None and net.training
    if net is not None:
        net.eval()
    left: list[LeftOut] = []
    try:
        if name != "fashioniq":
            r = retrieve(net, clip, name, root, config)
            left.append(r.left_out)
            if config.examples:
                save_examples(r, config.examples, config.examples_dir, name)
            out = cirr_metrics(r) if name == "cirr" else circo_metrics(r)
        else:
            if not config.categories:
                raise ConfigError("no FashionIQ category to evaluate")
            out = {}
            for cat in config.categories:
                r = retrieve(net, clip, name, root, config, category=cat)
                left.append(r.left_out)
                if config.examples:
                    save_examples(r, config.examples, config.examples_dir, f"fashioniq_{cat}")
                got = fashioniq_metrics(r)
                out[f"{cat}_10"], out[f"{cat}_50"] = got[10], got[50]
            out["average_10"] = mean(out[f"{c}_10"] for c in config.categories)
            out["average_50"] = mean(out[f"{c}_50"] for c in config.categories)
        return {**out, **protocol_entries(name, config, left)}
    finally:
        if was_training:
            net.train()


INCOMPLETE_WARNING = ("images were missing: the gallery images and queries that need them were left out "
                      "(--skip-missing-images), so these numbers are not comparable with full-data results")


def protocol_entries(name: str, config: EvalConfig, left: Sequence[LeftOut | None]) -> dict:
    """The entries a metrics dict gets beside the metric keys when a run departs from the authors'
    protocol, and only then: `incomplete_data` (counts of what was left out, in total and per split)
    when images were missing, `circo_query` when CIRCO's queries were not the relative captions."""
    out = {}
    left = [x for x in left if x is not None and (x.gallery_names or x.query_rows)]
    if left:
        total = {k: sum(x.counts()[k] for x in left) for k in left[0].counts()}
        out["incomplete_data"] = {"warning": INCOMPLETE_WARNING, **total, "splits": {x.label: x.counts() for x in left}}
    if name == "circo" and config.circo_query != "relative":
        out["circo_query"] = config.circo_query
    return out


# ---------------------------------------------------------------------------------------------
# output

def format_table(name: str, metrics: dict) -> str:
    """The metrics as a table, with the protocol entries (`protocol_entries`) spelled out below it."""
    if name == "fashioniq":
        rows = [c for c in FASHIONIQ_CATEGORIES + ("average",) if f"{c}_10" in metrics]
        lines = [f"{'FashionIQ':<10} {'R@10':>7} {'R@50':>7}"]
        lines += [f"{c:<10} {metrics[f'{c}_10']:7.2f} {metrics[f'{c}_50']:7.2f}" for c in rows]
    else:
        if name == "cirr":
            heads = [f"R@{k}" for k in (1, 5, 10, 50)] + [f"Rs@{k}" for k in (1, 2, 3)]
        else:
            heads = [f"mAP@{k}" for k in (5, 10, 25, 50)] + [f"R@{k}" for k in (5, 10, 25, 50)]
        lines = [" ".join(f"{h:>7}" for h in heads), " ".join(f"{metrics[k]:7.2f}" for k in METRIC_KEYS[name])]
        lines += [f"mAP@10 {k[len('circo_map_at10_'):]}: {v:.2f}" for k, v in metrics.items()
                  if k.startswith("circo_map_at10_")]
    gap = metrics.get("incomplete_data")
    if gap:
        lines.append(f"INCOMPLETE DATA: {gap['queries_left_out']:,} of {gap['queries']:,} queries and "
                     f"{gap['gallery_images_left_out']:,} of {gap['gallery_images']:,} gallery images left out; "
                     "not comparable with full-data numbers")
    if "circo_query" in metrics:
        lines.append(f"CIRCO queries: {metrics['circo_query']} ('{CIRCO_QUERY_TEMPLATES[metrics['circo_query']]}'), "
                     "not the authors' relative captions")
    return "\n".join(lines)


def metrics_path(save_path, name: str, baseline: str | None) -> Path:
    suffix = f"_{baseline.replace('-', '_')}" if baseline else ""
    return Path(save_path) / f"metrics_{name}{suffix}.json"

