"""Validation metrics of FTI4CIR on FashionIQ, CIRR or CIRCO (METHOD §10-11).

    python src/evaluate.py --dataset cirr --cirr-path ./data/CIRR --model-path model_save/checkpoints/epoch_60.pt

Prints a table and writes `<save-path>/metrics_<dataset>.json` (the authors' keys, percent); with
`--baseline`, `metrics_<dataset>_image_only.json` / `_text_only.json`. The computation is
`evaluation.evaluate`.
"""
from __future__ import annotations

import sys

from cli import FlagParser, add_eval_args, eval_setup, script_main, write_validation_metrics


def build_parser() -> FlagParser:
    parser = FlagParser(description="Validation metrics of FTI4CIR (recall / mAP in percent).")
    add_eval_args(parser)
    return parser


@script_main
def main(argv=None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    device, clip, net = eval_setup(args)
    return write_validation_metrics(args, clip, net, device)


if __name__ == "__main__":
    main(sys.argv[1:])
