"""Scores server files of the val split with the benchmark owners' metric definitions.

    .venv/bin/python src/test.py --dataset circo --split val --model-path CKPT          # results/circo/circo_val.json
    .venv/bin/python scripts/score_server_file.py --dataset circo --circo-path ./data/CIRCO results/circo/circo_val.json

CIRCO: mAP@K and Recall@K as the CIRCO server's code (miccunifi/CIRCO src/evaluation.py) computes them,
re-implemented here with plain loops over the raw annotation file: a query's AP@K is the sum over the
first K positions of precision-at-that-position at every ground truth, divided by min(number of ground
truths, K); Recall@K counts the one target image among the first K; both are means over the queries,
and mAP@10 per semantic aspect is the mean AP@10 of the queries listing it. Like that code, a list holding
an id twice is refused. CIRR: Recall@K is the share of queries whose target is among the first K names
of cirr_val.json (the reference is never listed), Recall_subset@K the same over subset_cirr_val.json's
3 names, as CIRR's evaluation defines them. Figures in percent, with evaluate.py's keys, printed and
returned. Only the val annotations hold targets: test files are scored by the servers.

Nothing here uses the project's metric or dataset code, so its figures check evaluate.py's
(tests/test_server_rules.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cli import FlagParser, script_main  # noqa: E402
from errors import UserError  # noqa: E402

CIRCO_RANKS = (5, 10, 25, 50)
CIRR_RANKS = (1, 5, 10, 50)
CIRR_SUBSET_RANKS = (1, 2, 3)


class ScoreError(UserError, ValueError):
    """A file or annotation the scorer cannot read (the message names it and what to do)."""


def read_json(path: Path, what: str):
    if not path.is_file():
        raise ScoreError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScoreError(f"{what} {path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ScoreError(f"{what} {path}: JSON nested too deep to read") from None


# ---------------------------------------------------------------------------------------------
# CIRCO

def circo_scores(predictions: dict, annotations: list[dict], ranks=CIRCO_RANKS) -> dict[str, float]:
    """CIRCO mAP@K, Recall@K and mAP@10 per semantic aspect (percent) of `predictions` {query id: ranked
    image ids} against the val annotation entries, query id i being entry i, as the server reads them."""
    keys = sorted(int(k) for k in predictions)
    if keys != list(range(len(keys))):
        raise ScoreError("the keys must be all the query ids 0..n-1, as the CIRCO server requires")
    aps = {k: [] for k in ranks}
    recalls = {k: [] for k in ranks}
    aspect_aps: dict[str, list[float]] = {}
    for query_id, ranked in predictions.items():
        entry = annotations[int(query_id)]
        if "gt_img_ids" not in entry:
            raise ScoreError("these annotations hold no ground truths (the test split): the CIRCO server scores test files")
        gts = [int(x) for x in entry["gt_img_ids"] if x != ""]  # "" pads some copies' lists
        target = int(entry["target_img_id"])
        ids = [int(x) for x in ranked]
        if len(set(ids)) != len(ids):
            raise ScoreError(f"query {query_id} lists an id twice; the CIRCO server refuses such a file")
        precisions = []  # precision at each position holding a ground truth, 0 elsewhere
        found = 0
        for position, image_id in enumerate(ids, start=1):
            hit = image_id in gts
            found += hit
            precisions.append(found / position if hit else 0.0)
        for k in ranks:
            aps[k].append(sum(precisions[:k]) / min(len(gts), k))
            recalls[k].append(float(target in ids[:k]))
        for aspect in entry.get("semantic_aspects", []):
            aspect_aps.setdefault(aspect, []).append(sum(precisions[:10]) / min(len(gts), 10))
    out = {f"circo_map_at{k}": 100 * sum(aps[k]) / len(aps[k]) for k in ranks}
    out.update({f"circo_recall_at{k}": 100 * sum(recalls[k]) / len(recalls[k]) for k in ranks})
    out.update({f"circo_map_at10_{a}": 100 * sum(v) / len(v) for a, v in aspect_aps.items()})
    return out


# ---------------------------------------------------------------------------------------------
# CIRR

def cirr_scores(files: list[dict], captions: list[dict], ranks=CIRR_RANKS,
                subset_ranks=CIRR_SUBSET_RANKS) -> dict[str, float]:
    """CIRR Recall@K (from the file whose "metric" is "recall") and Recall_subset@K ("recall_subset"), in
    percent, over every query of the val captions (their "pairid" and "target_hard")."""
    out = {}
    for sub in files:
        metric = sub.get("metric") if isinstance(sub, dict) else None
        if metric not in ("recall", "recall_subset"):
            raise ScoreError(f"a CIRR file's \"metric\" must be \"recall\" or \"recall_subset\", got {metric!r}")
        key, ks = ("cirr_recall_at", ranks) if metric == "recall" else ("cirr_group_recall_at", subset_ranks)
        hits = {k: 0 for k in ks}
        for entry in captions:
            if "target_hard" not in entry:
                raise ScoreError("these captions hold no targets (the test split): the CIRR server scores test files")
            ranked = sub.get(str(entry["pairid"]))
            if ranked is None:
                raise ScoreError(f"pair id {entry['pairid']} is missing from the {metric} file")
            for k in ks:
                hits[k] += entry["target_hard"] in ranked[:k]
        out.update({f"{key}{k}": 100 * hits[k] / len(captions) for k in ks})
    return out


# ---------------------------------------------------------------------------------------------
# the script

def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description="Score val-split server files (test.py --split val) with the benchmark "
                                    "owners' metric definitions.")
    parser.add_argument("--dataset", required=True, choices=["cirr", "circo"], help="benchmark of the files")
    parser.add_argument("--cirr-path", default="./data/CIRR", help="CIRR root (cirr/captions/cap.rc2.val.json)")
    parser.add_argument("--circo-path", default="./data/CIRCO", help="CIRCO root (annotations/val.json)")
    parser.add_argument("files", nargs="+", type=Path,
                        help="CIRR: cirr_val.json and/or subset_cirr_val.json; CIRCO: circo_val.json")
    return parser


def score(dataset: str, root, files) -> dict[str, float]:
    """The owners' figures of `files` against the val annotations under `root`."""
    root = Path(root)
    subs = [read_json(Path(f), "server file") for f in files]
    if dataset == "circo":
        if len(subs) != 1 or not isinstance(subs[0], dict):
            raise ScoreError("CIRCO: pass one circo_val.json, a JSON object")
        return circo_scores(subs[0], read_json(root / "annotations" / "val.json", "--circo-path annotations"))
    return cirr_scores(subs, read_json(root / "cirr" / "captions" / "cap.rc2.val.json", "--cirr-path captions"))


@script_main
def main(argv=None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    out = score(args.dataset, args.cirr_path if args.dataset == "cirr" else args.circo_path, args.files)
    for key, value in out.items():
        print(f"{key}: {value:.2f}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
