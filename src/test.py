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

import numpy as np
import torch

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


def cirr_files(names, g, q, queries) -> tuple[dict, dict]:
    """(cirr.json, subset_cirr.json), validated."""
    refs = [x["reference_name"] for x in queries]
    members = [x["group_members"] for x in queries]
    pair_ids = [x["pair_id"] for x in queries]
    top = min(M.CIRR_TOP, len(names) - 1)
    if top == M.CIRR_TOP:
        sub, subset = M.cirr_submission(q, g, names, refs, members, pair_ids)
        M.validate_cirr_submission(sub, subset, queries, gallery_names=names)
        return sub, subset
    log(f"warning: the CIRR gallery holds only {len(names)} images, so each list has {top} names, not "
        f"{M.CIRR_TOP}: the server rejects such files (real test1 has 2315 images); written for toy data")
    sub, subset = short_cirr_submission(q, g, names, refs, members, pair_ids, top)
    check_short_cirr_submission(sub, subset, queries, names, top)
    return sub, subset


def short_cirr_submission(q, g, names, refs, members, pair_ids, top: int) -> tuple[dict, dict]:
    """CIRR files for a gallery of fewer than 51 images: the whole ranking without the reference
    (as the authors' code writes it: its `[:50]` slice of a shorter ranking), and the first three
    members of the query's set in that ranking."""
    lookup = {n: i for i, n in enumerate(names)}
    ref = torch.tensor([lookup[r] for r in refs])
    order = M.topk_indices(q, g, top, exclude=ref)                                # [Q, G-1]
    mem = torch.tensor([[lookup[m] for m in ms] for ms in members])               # [Q, 6]
    is_member = (order[:, :, None] == mem[:, None, :]).any(dim=2)                 # never the reference
    if int(is_member.sum(dim=1).min()) < M.CIRR_SUBSET_TOP:
        raise ValueError(f"a CIRR query has fewer than {M.CIRR_SUBSET_TOP} set members besides its reference")
    first = is_member & (is_member.cumsum(dim=1) <= M.CIRR_SUBSET_TOP)
    picked = order[first].view(len(refs), M.CIRR_SUBSET_TOP)
    arr = np.asarray(names, dtype=object)
    keys = [str(p) for p in pair_ids]
    sub = {"version": "rc2", "metric": "recall", **dict(zip(keys, arr[order.numpy()].tolist()))}
    subset = {"version": "rc2", "metric": "recall_subset", **dict(zip(keys, arr[picked.numpy()].tolist()))}
    return sub, subset


def check_short_cirr_submission(sub, subset, queries, names, top: int) -> None:
    """The server's checks of validate_cirr_submission, with `top` names per list instead of 50."""
    known = set(names)
    problems = []
    for q in queries:
        key = str(q["pair_id"])
        full, three = sub.get(key), subset.get(key)
        if full is None or three is None:
            problems.append(f"pair id {key}: missing")
            continue
        if len(set(full)) != top or len(full) != top or not set(full) <= known or q["reference_name"] in full:
            problems.append(f"cirr.json pair id {key}: not {top} distinct gallery names without the reference")
        if len(set(three)) != M.CIRR_SUBSET_TOP or not set(three) <= set(q["group_members"]) - {q["reference_name"]}:
            problems.append(f"subset_cirr.json pair id {key}: not 3 distinct set members without the reference")
    if len(sub) != len(queries) + 2 or len(subset) != len(queries) + 2:
        problems.append("the files hold keys that are not this split's pair ids")
    if problems:
        raise ValueError(f"CIRR submission: {len(problems)} problem(s), e.g. {problems[:3]}")


def circo_file(names, g, q, queries) -> dict:
    """circo.json, validated."""
    sub = M.circo_submission(q, g, names, [x["query_id"] for x in queries])
    M.validate_circo_submission(sub, queries, gallery_ids=names)
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
