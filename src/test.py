"""Test-server submission files of FTI4CIR (SPEC 12).

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

import metrics as M
from cli import FlagParser
from evaluate import (USER_ERRORS, add_eval_args, common_kwargs, compute_features, dataset_root, run_validation,
                      setup, user_error_message)
from features import log
from utils import atomic_write_bytes

TEST_SPLITS = {"cirr": "test1", "circo": "test"}


def build_parser() -> FlagParser:
    parser = FlagParser(description="Test-server submission files of FTI4CIR (CIRR test1, CIRCO test).")
    add_eval_args(parser, datasets=("cirr", "circo", "fashioniq"))
    return parser


def _write_json(obj: dict, path: Path) -> None:
    atomic_write_bytes(json.dumps(obj).encode("utf-8"), path)
    log(f"wrote {path}")


def _list_length(server_top: int, available: int, what: str) -> int:
    """The server's list length, or all `available` names of a gallery too small for it (toy data)."""
    if available >= server_top:
        return server_top
    log(f"warning: the {what} gallery offers only {available} candidates per query, so each list has {available} "
        f"names, not {server_top}: the server rejects such files; written for toy data (the authors' [:{server_top}] "
        "slice gives the same)")
    return available


def cirr_files(names, g, q, queries) -> tuple[dict, dict]:
    """(cirr.json, subset_cirr.json), validated."""
    top = _list_length(M.CIRR_TOP, len(names) - 1, "CIRR")  # the reference never appears
    sub, subset = M.cirr_submission(q, g, names, [x["reference_name"] for x in queries],
                                    [x["group_members"] for x in queries], [x["pair_id"] for x in queries], top=top)
    M.validate_cirr_submission(sub, subset, queries, gallery_names=names, top=top)
    return sub, subset


def circo_file(names, g, q, queries) -> dict:
    """circo.json, validated."""
    top = _list_length(M.CIRCO_TOP, len(names), "CIRCO")
    sub = M.circo_submission(q, g, names, [x["query_id"] for x in queries], top=top)
    M.validate_circo_submission(sub, queries, gallery_ids=names, top=top)
    return sub


def write_submission(args, clip, net, device) -> list[Path]:
    """Computes, validates and writes the submission files of args.dataset; returns their paths."""
    root = dataset_root(args)
    kw = common_kwargs(args, device)
    split = TEST_SPLITS[args.dataset]
    try:
        feats = compute_features(net, clip, args.dataset, root, split, **kw)
        if args.dataset == "cirr":
            sub, subset = cirr_files(*feats)
            files = {"cirr.json": sub, "subset_cirr.json": subset}
        else:
            files = {"circo.json": circo_file(*feats)}
    except USER_ERRORS + (ValueError,) as e:  # ValueError: a submission the server would reject
        raise SystemExit(user_error_message(e))
    out_dir = Path(args.save_path) / args.dataset
    paths = []
    for fname, obj in files.items():  # every file validated before the first is written
        _write_json(obj, out_dir / fname)
        paths.append(out_dir / fname)
    log(f"{args.dataset} {split}: {len(feats[3])} queries, submission files in {out_dir}")
    return paths


def main(argv=None):
    args = build_parser().parse_args(argv)
    device, clip, net = setup(args)
    if args.dataset == "fashioniq":
        return run_validation(args, clip, net, device)
    return write_submission(args, clip, net, device)


if __name__ == "__main__":
    main(sys.argv[1:])
