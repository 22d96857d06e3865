"""Validation metrics of FTI4CIR on FashionIQ, CIRR or CIRCO (METHOD §10-11).

    python src/evaluate.py --dataset cirr --cirr-path ./data/CIRR --model-path model_save/checkpoints/epoch_60.pt

Prints a table and writes `<save-path>/metrics_<dataset>.json` (the authors' keys, percent); with
`--baseline`, `metrics_<dataset>_image_only.json` / `_text_only.json`. The computation is
`evaluation.evaluate`. With a model, `metrics_<dataset>.checkpoint.json` beside it records what was
evaluated (`checkpoint.loaded_from`: the checkpoint's path, epoch and global step, and the fingerprints of
the CLIP it was trained over and of the CLIP loaded); the metrics file itself keeps the authors' keys alone.
"""
from __future__ import annotations

import sys

from checkpoint import load_model, model_file
from cli import (FlagParser, add_eval_args, check_model_outputs, clip_args, dataset_root, eval_config_from_args,
                 model_device, script_main)
from clip_loader import load_clip
from errors import naming_written_file
from evaluation import check_layout, evaluate, format_table, metrics_path
from logs import get_logger
from utils import atomic_write_json

log = get_logger("evaluate")


def build_parser() -> FlagParser:
    parser = FlagParser(description="Validation metrics of FTI4CIR (recall / mAP in percent).")
    add_eval_args(parser)
    return parser


def setup(args, split: str | None = None):
    """(device, CLIP, network or None for a baseline) from add_eval_args' flags; every flag, the dataset
    root (with `split`, also that split's layout), the checkpoint file and the output folders are checked
    before CLIP is loaded."""
    device = model_device(args)
    root = dataset_root(args, args.dataset)
    if not args.baseline:
        model_file(args.model_path)
    check_model_outputs(args)
    if split is not None:
        check_layout(args.dataset, root, split, args.categories)
    clip = load_clip(**clip_args(args), device=device)
    return device, clip, load_model(args.model_path, clip, device, args.baseline)


def write_validation_metrics(args, clip, net, device) -> dict[str, float]:
    """The validation metrics the flags ask for, printed as a table and written as
    `<save-path>/metrics_<dataset>[_<baseline>].json`."""
    metrics = evaluate(net, clip, args.dataset, dataset_root(args, args.dataset), eval_config_from_args(args, device))
    what = f"baseline {args.baseline}" if args.baseline else f"model {args.model_path}"
    print(f"\n{args.dataset} val, {what}, precision {args.precision}\n{format_table(args.dataset, metrics)}", flush=True)
    path = metrics_path(args.save_path, args.dataset, args.baseline)
    with naming_written_file(path):
        atomic_write_json(metrics, path)
    log.info(f"wrote {path}")
    record = getattr(net, "loaded_from", None)
    if record is not None:
        record_path = path.with_suffix(".checkpoint.json")
        with naming_written_file(record_path):
            atomic_write_json({"metrics": path.name, **record}, record_path)
    return metrics


@script_main
def main(argv=None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    device, clip, net = setup(args, split="val")
    return write_validation_metrics(args, clip, net, device)


if __name__ == "__main__":
    main(sys.argv[1:])
