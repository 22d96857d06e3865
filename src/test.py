"""Test-server submission files of FTI4CIR (METHOD §12).

    python src/test.py --dataset cirr --cirr-path ./data/CIRR --model-path model_save/checkpoints/epoch_60.pt

CIRR (test1): `<save-path>/cirr/cirr.json` and `<save-path>/cirr/subset_cirr.json`; CIRCO (test):
`<save-path>/circo/circo.json`. FashionIQ has no test server: `--dataset fashioniq` writes the
validation metrics, as the authors' script does. The same flags as evaluate.py. Before anything is
written, the files are checked for what a server would reject; each file is written atomically.
A CIRR gallery of fewer than 51 images (toy data) gives shorter lists, as the authors' code does,
with a warning that a server would reject them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cli import (FlagParser, add_eval_args, dataset_root, eval_config_from_args, eval_setup, script_main,
                 write_validation_metrics)
from evaluation import TEST_SPLITS, retrieve, submission_files
from logs import get_logger
from utils import atomic_write_bytes

log = get_logger("test")


def build_parser() -> FlagParser:
    parser = FlagParser(description="Test-server submission files of FTI4CIR (CIRR test1, CIRCO test).")
    add_eval_args(parser, datasets=("cirr", "circo", "fashioniq"))
    return parser


def write_submission(args, clip, net, device) -> list[Path]:
    """Computes, validates and writes the submission files of args.dataset; returns their paths."""
    split = TEST_SPLITS[args.dataset]
    config = eval_config_from_args(args, device, split=split)
    r = retrieve(net, clip, args.dataset, dataset_root(args, args.dataset), config)
    files = submission_files(args.dataset, r)  # every file validated before the first is written
    out_dir = Path(args.save_path) / args.dataset
    paths = []
    for name, obj in files.items():
        path = out_dir / name
        atomic_write_bytes(json.dumps(obj).encode("utf-8"), path)
        log.info(f"wrote {path}")
        paths.append(path)
    log.info(f"{args.dataset} {split}: {len(r.queries)} queries, submission files in {out_dir}")
    return paths


@script_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    device, clip, net = eval_setup(args)
    if args.dataset == "fashioniq":
        return write_validation_metrics(args, clip, net, device)
    return write_submission(args, clip, net, device)


if __name__ == "__main__":
    main(sys.argv[1:])
