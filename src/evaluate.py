"""Validation metrics of FTI4CIR on FashionIQ, CIRR or CIRCO (SPEC 10-11).

    python src/evaluate.py --dataset cirr --cirr-path ./data/CIRR --model-path model_save/checkpoints/epoch_60.pt

Prints a table and writes `<save-path>/metrics_<dataset>.json` (the authors' keys, percent).
`evaluate(...)` is the same computation as a function (training's validation calls it).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from statistics import mean
from typing import Sequence

import torch

from checkpoint import CheckpointError, load_network
from cli import FlagParser, add_clip_args, add_device_arg, clip_from_args
from datasets import (FASHIONIQ_CATEGORIES, AnnotationFormatError, CIRCODataset, CIRRDataset, DatasetLayoutError,
                      FashionIQDataset, ImageLoadError)
from features import (BASELINES, DEFAULT_CACHE_DIR, PRECISIONS, check_precision, gallery_features, log,
                      query_features)
import metrics as M
from transforms import PREPROCESS_TYPES, build_transform
from utils import atomic_write_json, resolve_device

DATASETS = ("fashioniq", "cirr", "circo")
DEFAULT_ROOTS = {"fashioniq": "./data/FashionIQ", "cirr": "./data/CIRR", "circo": "./data/CIRCO"}
ROOT_FLAGS = {"fashioniq": "--fashioniq-path", "cirr": "--cirr-path", "circo": "--circo-path"}
METRIC_KEYS = {
    "fashioniq": [f"{c}_{k}" for c in FASHIONIQ_CATEGORIES + ("average",) for k in (10, 50)],
    "cirr": [f"cirr_recall_at{k}" for k in (1, 5, 10, 50)] + [f"cirr_group_recall_at{k}" for k in (1, 2, 3)],
    "circo": [f"circo_map_at{k}" for k in (5, 10, 25, 50)] + [f"circo_recall_at{k}" for k in (5, 10, 25, 50)],
}
# errors that are the user's data or files, reported as one line without a traceback
USER_ERRORS = (DatasetLayoutError, AnnotationFormatError, ImageLoadError, CheckpointError)


# ---------------------------------------------------------------------------------------------
# command line (shared with test.py)

def add_eval_args(parser: argparse.ArgumentParser, datasets: Sequence[str] = DATASETS,
                  default_save_path: str = "./results") -> None:
    """The flags evaluate.py and test.py share (authors' spellings accepted as aliases)."""
    parser.add_argument("--dataset", required=True, type=str.lower, choices=list(datasets), help="benchmark")
    paths = parser.add_argument_group("dataset roots (layouts: README)")
    paths.add_argument("--fashioniq-path", "--Fashion_IQ_path", dest="fashioniq_path", default=DEFAULT_ROOTS["fashioniq"],
                       help="FashionIQ root (captions/, image_splits/, dress/, shirt/, toptee/)")
    paths.add_argument("--cirr-path", "--CIRR_path", dest="cirr_path", default=DEFAULT_ROOTS["cirr"],
                       help="CIRR root (dev/, test1/, cirr/captions, cirr/image_splits)")
    paths.add_argument("--circo-path", "--CIRCO_path", dest="circo_path", default=DEFAULT_ROOTS["circo"],
                       help="CIRCO root (annotations/, COCO2017_unlabeled/)")
    parser.add_argument("--categories", nargs="+", choices=list(FASHIONIQ_CATEGORIES), default=list(FASHIONIQ_CATEGORIES),
                        help="FashionIQ categories, each evaluated on its own gallery; 'average' is their mean")
    parser.add_argument("--save-examples", type=int, default=0, metavar="N",
                        help="also draw N queries per benchmark (reference, text, top-5, target framed) as a PNG grid "
                             "in <save-path>/examples/")
    parser.add_argument("--model-path", default=None,
                        help="FTI4CIR checkpoint: this repo's (src/train.py) or the authors' released file")
    parser.add_argument("--baseline", choices=list(BASELINES), default=None,
                        help="instead of the model: the reference image's CLIP embedding (image-only) or CLIP's "
                             "embedding of the modification text (text-only); no --model-path needed")
    add_clip_args(parser)
    parser.add_argument("--preprocess-type", choices=list(PREPROCESS_TYPES), default="targetpad",
                        help="image preprocessing: targetpad (ratio 1.25, the authors') or CLIP's own")
    parser.add_argument("--save-path", default=default_save_path, help="folder for the output files")
    add_device_arg(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", "--num-workers", dest="workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes (0: load in the main process); default min(8, CPUs)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="fp32: no autocast, the authors' inference; tf32: TF32 tensor cores (CUDA); "
                             "bf16 (CUDA, CPU) / fp16 (CUDA): autocast, faster, rankings may differ slightly")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="gallery features are cached here, keyed by CLIP weights, preprocessing, gallery "
                             "and precision")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the gallery cache")
    parser.add_argument("--cache-reference-tokens", action="store_true",
                        help="keep the reference images' visual-tower outputs (g and the last block's tokens, fp32: "
                             "~1 MB per reference for ViT-L/14, 2.2 GB for CIRR val) from the gallery pass, in memory and "
                             "in --cache-dir, so composing the queries needs no visual pass (the next checkpoint: none at all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> FlagParser:
    parser = FlagParser(description="Validation metrics of FTI4CIR (recall / mAP in percent).")
    add_eval_args(parser)
    return parser


def dataset_root(args) -> Path:
    root = Path(getattr(args, f"{args.dataset}_path"))
    if not root.is_dir():
        raise SystemExit(f"error: {args.dataset} root {root} not found; pass {ROOT_FLAGS[args.dataset]} "
                         f"(the layout is in the README)")
    return root


def load_model(args, clip, device):
    """The FTI4CIR network of --model-path, checked against CLIP; None for a baseline."""
    if args.baseline is not None:
        if args.model_path:
            log(f"--baseline {args.baseline}: --model-path {args.model_path} is not used")
        return None
    if not args.model_path:
        raise SystemExit("error: --model-path is required (an FTI4CIR checkpoint), unless --baseline "
                         "image-only|text-only is given")
    try:
        net, info = load_network(args.model_path, device)
        net.check_clip(clip)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    except ValueError as e:
        raise SystemExit(f"error: --model-path {args.model_path} does not fit the CLIP loaded ({clip.source}): {e}. "
                         f"Pass the --clip-model/--clip-weights it was trained with")
    extra = "".join(f", {k.replace('_', ' ')} {info[k]}" for k in ("epoch", "global_step") if k in info)
    log(f"model: {args.model_path} ({info['format']} format{extra})")
    return net


def user_error_message(e: BaseException) -> str:
    """One line for a data/checkpoint error; errors raised in a DataLoader worker carry the worker's
    traceback in their message, of which only the last line (the error itself) is kept."""
    msg = str(e)
    if "Traceback" in msg:
        lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
        msg = lines[-1].split(": ", 1)[-1] if lines else msg
    return f"error: {msg}"


def common_kwargs(args, device) -> dict:
    return dict(preprocess_type=args.preprocess_type, batch_size=args.batch_size, workers=args.workers,
                device=device, precision=args.precision, cache_dir=None if args.no_cache else args.cache_dir,
                baseline=args.baseline, progress=not args.no_progress, reference_tokens=args.cache_reference_tokens)


# ---------------------------------------------------------------------------------------------
# datasets and features

def open_dataset(name: str, root, split: str, mode: str, preprocess, category: str | None = None):
    if name == "fashioniq":
        return FashionIQDataset(root, split, [category], mode, preprocess)
    if name == "cirr":
        return CIRRDataset(root, split, mode, preprocess)
    if name == "circo":
        return CIRCODataset(root, split, mode, preprocess)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def compute_features(net, clip, dataset_name: str, data_path, split: str, category: str | None = None, *,
                     preprocess_type: str = "targetpad", batch_size: int = 32, workers: int = 8, device=None,
                     precision: str = "fp32", cache_dir=None, baseline: str | None = None, progress: bool = True,
                     reference_tokens: bool = False):
    """(gallery names, gallery feats, query feats, queries) of one benchmark split (one FashionIQ category).

    `reference_tokens`: keep the reference images' tower outputs from the gallery pass (and in
    `cache_dir`), so the queries need no visual pass of their own.
    """
    device = torch.device(device) if device is not None else clip.device
    preprocess = build_transform(preprocess_type, clip.image_size)
    gallery = open_dataset(dataset_name, data_path, split, "gallery", preprocess, category)
    query = open_dataset(dataset_name, data_path, split, "query", preprocess, category)
    tokens = None
    if reference_tokens and baseline != "text-only":
        refs = [x["reference_name"] for x in query.queries]
        names, g, tokens = gallery_features(clip, gallery, batch_size, workers, device, precision, cache_dir, progress,
                                            reference_names=refs)
    else:
        names, g = gallery_features(clip, gallery, batch_size, workers, device, precision, cache_dir, progress)
    q, queries = query_features(net, clip, query, batch_size, workers, device, precision, baseline, progress,
                                reference_tokens=tokens)
    return names, g, q, queries


def _clipped(ks: Sequence[int], available: int) -> dict[int, int]:
    """K -> min(K, available): with fewer candidates than K, Recall@K is Recall@available (the
    authors' code slices a shorter ranking the same way)."""
    return {k: max(1, min(k, available)) for k in ks}


def _missing_targets(queries: list[dict], what: str) -> None:
    lacking = sum("target_name" not in q for q in queries)
    if lacking:
        raise ValueError(f"{lacking} of {len(queries)} {what} queries have no target: metrics need the val split")


def fashioniq_metrics(names, g, q, queries) -> dict[int, float]:
    _missing_targets(queries, "FashionIQ")
    ks = _clipped((10, 50), len(names))
    r = M.fashioniq_recall(q, g, names, [x["target_name"] for x in queries], ks=sorted(set(ks.values())))
    return {k: r[c] for k, c in ks.items()}


def cirr_metrics(names, g, q, queries) -> dict[str, float]:
    _missing_targets(queries, "CIRR")
    ks = _clipped((1, 5, 10, 50), len(names) - 1)  # the reference is removed from every ranking
    r = M.cirr_recall(q, g, names, [x["reference_name"] for x in queries], [x["target_name"] for x in queries],
                      [x["group_members"] for x in queries], ks=sorted(set(ks.values())))
    out = {f"cirr_recall_at{k}": r[f"cirr_recall_at{c}"] for k, c in ks.items()}
    out.update({k: v for k, v in r.items() if k.startswith("cirr_group_recall_at")})
    return out


def circo_metrics(names, g, q, queries) -> dict[str, float]:
    if any("gt_img_ids" not in x for x in queries):
        raise ValueError("CIRCO queries have no ground truths: metrics need the val split")
    return M.circo_map_recall(q, g, names, [x["gt_img_ids"] for x in queries])


def save_examples(dataset_name: str, data_path, split: str, category: str | None, names, g, q, queries,
                  count: int, out_dir, top: int = 5) -> Path:
    """Draws `count` evenly spaced queries: reference, modification text, top results, targets framed."""
    from examples import ExampleRow, save_example_grid
    from prompts import fashioniq_texts

    gallery = open_dataset(dataset_name, data_path, split, "gallery", _no_preprocess, category)
    query = open_dataset(dataset_name, data_path, split, "query", _no_preprocess, category)
    pick = sorted({round(i * (len(queries) - 1) / max(1, count - 1)) for i in range(min(count, len(queries)))})
    index = {n: i for i, n in enumerate(names)}
    exclude = None
    if dataset_name == "cirr":  # the reference is not a result on CIRR
        exclude = torch.tensor([index[queries[i]["reference_name"]] for i in pick])
    top = min(top, len(names) - (exclude is not None))
    ranked = M.topk_indices(q[pick], g, top, exclude)
    rows = []
    for row, i in zip(ranked.tolist(), pick):
        x = queries[i]
        targets = set(x.get("gt_img_ids") or []) | ({x["target_name"]} if "target_name" in x else set())
        text = fashioniq_texts(*x["relative_captions"])[0] if dataset_name == "fashioniq" else x["relative_caption"]
        rows.append(ExampleRow(reference=query.query_paths[i], text=text, caption=f"query {i}",
                               results=[gallery.gallery_paths[j] for j in row], is_target=[names[j] in targets for j in row]))
    label = dataset_name + (f"_{category}" if category else "")
    return save_example_grid(rows, Path(out_dir) / f"examples_{label}_{split}.png",
                             title=f"{label} {split}: reference | text | top {top} (green: target)")


def _no_preprocess(image):
    return image


def evaluate(net, clip, dataset_name: str, data_path, *, split: str = "val",
             categories: Sequence[str] = FASHIONIQ_CATEGORIES, preprocess_type: str = "targetpad",
             batch_size: int = 32, workers: int = 8, device=None, precision: str = "fp32", cache_dir=None,
             baseline: str | None = None, progress: bool = True, examples: int = 0,
             examples_dir=None, reference_tokens: bool = False) -> dict[str, float]:
    """Validation metrics (percent) with the authors' keys (see METRIC_KEYS).

    `net`: an FTI4CIR network (a DDP wrapper is unwrapped; its train/eval mode is restored after),
    or None with `baseline` 'image-only' / 'text-only'. `cache_dir=None`: no gallery cache.
    FashionIQ: each of `categories` on its own gallery; `average_*` is the mean over them.
    `examples` > 0: also draw that many queries per split (per category) into `examples_dir`.
    """
    dataset_name = dataset_name.lower()
    if dataset_name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset_name!r}; choose one of {DATASETS}")
    device = torch.device(device) if device is not None else clip.device
    check_precision(precision, device)
    net = getattr(net, "module", net)
    was_training = net is not None and net.training
    if net is not None:
        net.eval()
    kw = dict(preprocess_type=preprocess_type, batch_size=batch_size, workers=workers, device=device,
              precision=precision, cache_dir=cache_dir, baseline=baseline, progress=progress,
              reference_tokens=reference_tokens)
    try:
        if dataset_name == "fashioniq":
            out: dict[str, float] = {}
            if not categories:
                raise ValueError("no FashionIQ category to evaluate")
            for cat in categories:
                feats = compute_features(net, clip, "fashioniq", data_path, split, cat, **kw)
                if examples:
                    save_examples("fashioniq", data_path, split, cat, *feats, examples, examples_dir)
                r = fashioniq_metrics(*feats)
                out[f"{cat}_10"], out[f"{cat}_50"] = r[10], r[50]
            out["average_10"] = mean(out[f"{c}_10"] for c in categories)
            out["average_50"] = mean(out[f"{c}_50"] for c in categories)
            return out
        feats = compute_features(net, clip, dataset_name, data_path, split, None, **kw)
        if examples:
            save_examples(dataset_name, data_path, split, None, *feats, examples, examples_dir)
        return cirr_metrics(*feats) if dataset_name == "cirr" else circo_metrics(*feats)
    finally:
        if was_training:
            net.train()


evaluate_network = evaluate  # the name training's validation imports


# ---------------------------------------------------------------------------------------------
# output

def format_table(dataset_name: str, metrics: dict[str, float]) -> str:
    if dataset_name == "fashioniq":
        rows = [c for c in FASHIONIQ_CATEGORIES + ("average",) if f"{c}_10" in metrics]
        lines = [f"{'FashionIQ':<10} {'R@10':>7} {'R@50':>7}"]
        lines += [f"{c:<10} {metrics[f'{c}_10']:7.2f} {metrics[f'{c}_50']:7.2f}" for c in rows]
        return "\n".join(lines)
    if dataset_name == "cirr":
        heads = [f"R@{k}" for k in (1, 5, 10, 50)] + [f"Rs@{k}" for k in (1, 2, 3)]
    else:
        heads = [f"mAP@{k}" for k in (5, 10, 25, 50)] + [f"R@{k}" for k in (5, 10, 25, 50)]
    keys = METRIC_KEYS[dataset_name]
    return "\n".join([" ".join(f"{h:>7}" for h in heads), " ".join(f"{metrics[k]:7.2f}" for k in keys)])


def metrics_path(save_path, dataset_name: str, baseline: str | None) -> Path:
    suffix = f"_{baseline.replace('-', '_')}" if baseline else ""
    return Path(save_path) / f"metrics_{dataset_name}{suffix}.json"


def run_validation(args, clip, net, device) -> dict[str, float]:
    """evaluate() from parsed flags; prints the table and writes the JSON file."""
    root = dataset_root(args)
    kw = common_kwargs(args, device)
    try:
        metrics = evaluate(net, clip, args.dataset, root, split="val", categories=args.categories, **kw,
                           examples=args.save_examples, examples_dir=Path(args.save_path) / "examples")
    except USER_ERRORS + (ValueError,) as e:  # ValueError: annotations the metrics cannot use
        raise SystemExit(user_error_message(e))
    what = f"baseline {args.baseline}" if args.baseline else f"model {args.model_path}"
    print(f"\n{args.dataset} val, {what}, precision {args.precision}\n{format_table(args.dataset, metrics)}", flush=True)
    path = metrics_path(args.save_path, args.dataset, args.baseline)
    atomic_write_json(metrics, path)
    log(f"wrote {path}")
    return metrics


def setup(args):
    """Device, precision check, CLIP, network (or None for a baseline) from parsed flags."""
    device = resolve_device(args.device)
    try:
        check_precision(args.precision, device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.batch_size < 1 or args.workers < 0:
        raise SystemExit("error: --batch-size must be >= 1 and --workers >= 0")
    dataset_root(args)  # fail before loading CLIP when the root is wrong
    clip = clip_from_args(args, device)
    net = load_model(args, clip, device)
    return device, clip, net


def main(argv=None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    device, clip, net = setup(args)
    return run_validation(args, clip, net, device)


if __name__ == "__main__":
    main(sys.argv[1:])
