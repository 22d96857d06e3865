"""The paper's table from a checkpoint, in one command (METHOD §10-12).

    python src/reproduce.py --model-path FTI4CIR_released.pt --out reproduce

Evaluates FashionIQ val (dress, shirt, toptee), CIRR val and CIRCO val, and writes the CIRR test1 and
CIRCO test server files (validated, as test.py writes them). Prints the sha256 of the checkpoint and one
table: every metric computed, with a bootstrap standard error over the queries, beside the figure the
paper publishes for the released ViT-L/14 model and the difference; test-split metrics are "server
only", with the file to upload. The same table goes into `<out>/reproduce.json` and `<out>/reproduce.md`.
A benchmark (or split) whose data is absent is left out with one line.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from statistics import mean

import numpy as np
import torch

import metrics as M
from checkpoint import load_model, model_file
from cli import (ROOT_FLAGS, FlagParser, add_model_args, add_root_args, check_model_outputs, clip_args,
                 eval_config_from_args, model_device, script_main)
from clip_loader import load_clip
from datasets import BENCHMARKS, FASHIONIQ_CATEGORIES, DatasetLayoutError
from dataset_checks import metadata_only
from errors import ConfigError
from evaluation import (METRIC_KEYS, TEST_SPLITS, Retrieval, _clipped, circo_metrics, cirr_metrics,
                        fashioniq_metrics, open_benchmark, retrieve, submission_bytes, submission_files)
from logs import get_logger
from utils import atomic_write_bytes, atomic_write_json

log = get_logger("reproduce")

# The published figures of the released ViT-L/14 model, in percent (Lin et al., SIGIR 2024; the README's
# "Expected numbers" table): {(benchmark, split): {metric key: value}}.
PAPER = {
    ("fashioniq", "val"): {"average_10": 29.39, "average_50": 50.88},
    ("cirr", "test1"): {"cirr_recall_at1": 25.90, "cirr_recall_at5": 55.61, "cirr_recall_at10": 67.66,
                        "cirr_recall_at50": 89.66, "cirr_group_recall_at1": 55.21},
    ("circo", "test"): {"circo_map_at5": 15.05, "circo_map_at10": 16.32, "circo_map_at25": 18.06,
                        "circo_map_at50": 19.05},
}
TITLES = {"fashioniq": "FashionIQ", "cirr": "CIRR", "circo": "CIRCO"}
REPORT_NAME = "reproduce"


def metric_label(key: str) -> str:
    """`cirr_recall_at5` -> `R@5`, `dress_10` -> `dress R@10`, `circo_map_at10_negation` -> `mAP@10 negation`."""
    for prefix, label in (("cirr_group_recall_at", "Rs@"), ("cirr_recall_at", "R@"), ("circo_recall_at", "R@"),
                          ("circo_map_at", "mAP@")):
        if key.startswith(prefix):
            k, _, aspect = key[len(prefix):].partition("_")
            return f"{label}{k}" + (f" {aspect}" if aspect else "")
    cat, _, k = key.rpartition("_")
    return f"{cat} R@{k}"


# ---------------------------------------------------------------------------------------------
# per-query values and the bootstrap

class ValResult:
    """One benchmark's val metrics (percent, evaluation's adapters) and, per metric, the per-query values
    whose means give it: one group per FashionIQ category (their average: the mean of the groups' means)."""

    def __init__(self, metrics: dict[str, float], per_query: dict[str, list[torch.Tensor]] | None = None):
        self.metrics, self.per_query = metrics, per_query or {}


def _check_agrees(key: str, value: float, groups: list[torch.Tensor]) -> None:
    # the per-query values must be the metric's own, or the standard error describes another number
    again = mean(float(g.float().mean().item() * 100.0) for g in groups)
    if abs(again - value) > 1e-9:
        raise M.MetricsError(f"{key}: per-query values average to {again}, the metric is {value}")


def fashioniq_val(net, clip, root, config) -> ValResult:
    out = ValResult({})
    for cat in FASHIONIQ_CATEGORIES:
        r = retrieve(net, clip, "fashioniq", root, config, category=cat)
        got = fashioniq_metrics(r)
        ks = _clipped((10, 50), len(r.names))
        hits = M.fashioniq_hits(r.query_features, r.gallery.features, r.names, [q["target_name"] for q in r.queries],
                                ks=sorted(set(ks.values())))
        for k, c in ks.items():
            out.metrics[f"{cat}_{k}"] = got[k]
            out.per_query[f"{cat}_{k}"] = [hits[c]]
    for k in (10, 50):  # evaluate's average: the categories' mean
        out.metrics[f"average_{k}"] = mean(out.metrics[f"{c}_{k}"] for c in FASHIONIQ_CATEGORIES)
        out.per_query[f"average_{k}"] = [out.per_query[f"{c}_{k}"][0] for c in FASHIONIQ_CATEGORIES]
    return out


def cirr_val(r: Retrieval) -> ValResult:
    got = cirr_metrics(r)
    ks = _clipped((1, 5, 10, 50), len(r.names) - 1)  # the reference is removed from every ranking
    q = r.queries
    hits = M.cirr_hits(r.query_features, r.gallery.features, r.names, [x["reference_name"] for x in q],
                       [x["target_name"] for x in q], [x["group_members"] for x in q], ks=sorted(set(ks.values())))
    per_query = {f"cirr_recall_at{k}": [hits[f"cirr_recall_at{c}"]] for k, c in ks.items()}
    per_query.update({k: [v] for k, v in hits.items() if k.startswith("cirr_group_recall_at")})
    return ValResult(got, per_query)


def circo_val(r: Retrieval) -> ValResult:
    got = circo_metrics(r)
    pq = M.circo_per_query(r.query_features, r.gallery.features, r.names, [x["gt_img_ids"] for x in r.queries])
    per_query = {k: [v] for k, v in pq.items()}
    for key in got:
        if key.startswith("circo_map_at10_"):  # mAP@10 over the queries that list the aspect
            aspect = key[len("circo_map_at10_"):]
            rows = torch.tensor([aspect in x["semantic_aspects"] for x in r.queries])
            per_query[key] = [pq["circo_map_at10"][rows]]
    return ValResult(got, per_query)


def bootstrap_se(groups: list[torch.Tensor], resamples: int, seed: int) -> float:
    """Standard error (percent) of the mean of the groups' means, by the bootstrap over queries: each group's
    queries resampled with replacement `resamples` times (one matrix of draws per group), seeded."""
    rng = np.random.default_rng(seed)
    draws = np.zeros(resamples)
    for g in groups:
        values = g.double().numpy()
        draws += values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    draws /= len(groups)
    return float(draws.std(ddof=1) * 100.0) if resamples > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# the report

def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def val_rows(name: str, result: ValResult, resamples: int, seed: int) -> list[dict]:
    paper = PAPER.get((name, "val"), {})
    keys = [k for k in METRIC_KEYS[name] if k in result.metrics]
    keys += [k for k in result.metrics if k not in keys and isinstance(result.metrics[k], float)]
    rows = []
    for key in keys:
        value, groups = result.metrics[key], result.per_query[key]
        _check_agrees(key, value, groups)
        p = paper.get(key)
        rows.append({"benchmark": name, "split": "val", "key": key, "metric": metric_label(key), "value": value,
                     "se": bootstrap_se(groups, resamples, seed), "paper": p,
                     "difference": None if p is None else value - p, "server_file": None})
    return rows


def server_rows(name: str, split: str, files: list[Path]) -> list[dict]:
    """The paper's test-split figures, each "server only" with the file that the server scores."""
    by_metric = {"cirr_group_recall_at": "subset_cirr.json"}
    rows = []
    for key, p in PAPER.get((name, split), {}).items():
        want = next((f for prefix, f in by_metric.items() if key.startswith(prefix)), None)
        file = next((f for f in files if f.name == want), None) if want else files[0]
        rows.append({"benchmark": name, "split": split, "key": key, "metric": metric_label(key), "value": None,
                     "se": None, "paper": p, "difference": None, "server_file": str(file)})
    return rows


def _cells(row: dict) -> list[str]:
    if row["server_file"] is not None:
        this = f"server only: upload {row['server_file']}"
    else:
        this = f"{row['value']:.2f} ± {row['se']:.2f}"
    paper = "-" if row["paper"] is None else f"{row['paper']:.2f}"
    diff = "-" if row["difference"] is None else f"{row['difference']:+.2f}"
    return [TITLES[row["benchmark"]], row["split"], row["metric"], this, paper, diff]


HEADER = ["benchmark", "split", "metric", "this run ± s.e.", "paper", "difference"]


def format_table(rows: list[dict]) -> str:
    cells = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in cells)


def markdown(report: dict) -> str:
    lines = ["# FTI4CIR: this run beside the paper", "",
             f"Checkpoint `{report['checkpoint']['path']}`, sha256 `{report['checkpoint']['sha256']}`.",
             f"Standard errors: bootstrap over queries, {report['bootstrap']['resamples']} resamples, seed "
             f"{report['bootstrap']['seed']}. Percent; paper: Lin et al., SIGIR 2024, the released ViT-L/14 model.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in report["rows"]]
    if report["left_out"]:
        lines += ["", "Left out (no data):", ""] + [f"- {x}" for x in report["left_out"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the runs

def split_absent(name: str, root: Path, split: str) -> str | None:
    """Why `split` of benchmark `name` under `root` cannot be read (its annotation files are absent), or None."""
    try:
        cats = FASHIONIQ_CATEGORIES if name == "fashioniq" else (None,)
        for cat in cats:
            if name == "fashioniq":
                open_benchmark(name, root, split, metadata_only, category=cat)
            else:
                open_benchmark(name, root, split, metadata_only, require_images=False)
    except DatasetLayoutError as e:
        return f"{TITLES[name]} {split}: {str(e).splitlines()[0]}"
    return None


def write_server_files(net, clip, name: str, root: Path, config, out: Path) -> list[Path]:
    """test.py's files of benchmark `name`: computed and validated (metrics.validate_*_submission, the
    upload limit) before any is written, then written under `out/<name>/`."""
    r = retrieve(net, clip, name, root, config)
    files = submission_bytes(name, submission_files(name, r))
    note = M.query_count_note(name, len(r.queries))
    if note:
        log.warning(note)
    paths = []
    for file, data in files.items():
        path = out / name / file
        atomic_write_bytes(data, path)
        paths.append(path)
    log.info(f"wrote {', '.join(map(str, paths))} (validated)")
    return paths


def build_parser() -> FlagParser:
    parser = FlagParser(description="The paper's table from a checkpoint: FashionIQ, CIRR and CIRCO val metrics with "
                                    "bootstrap standard errors beside the published figures, and the CIRR / CIRCO "
                                    "test-server files.")
    parser.add_argument("--out", dest="save_path", default="./reproduce",
                        help="folder for reproduce.json, reproduce.md and the server files (<out>/cirr/, <out>/circo/)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the queries")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    add_root_args(parser, BENCHMARKS)
    add_model_args(parser, default_save_path="./reproduce")
    for action in parser._actions:  # evaluate.py's spelling of --out; no baselines: the paper's column is the model's
        if "--save-path" in action.option_strings or "--baseline" in action.option_strings:
            action.help = argparse.SUPPRESS
    parser.set_defaults(categories=list(FASHIONIQ_CATEGORIES), cache_reference_tokens=False, save_examples=0,
                        skip_missing_images=False, circo_query="relative")
    return parser


@script_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.baseline:
        raise ConfigError("--baseline: reproduce.py sets a checkpoint beside the paper; for a baseline run "
                          "src/evaluate.py --baseline")
    if not args.model_path:
        raise ConfigError("--model-path is required: the released checkpoint (README, 'Quick start') or your own")
    if args.resamples < 1:
        raise ConfigError("--resamples must be >= 1")
    device = model_device(args)
    roots = {name: Path(getattr(args, f"{name}_path")) for name in BENCHMARKS}
    left_out, plan = [], []
    for name in BENCHMARKS:
        if not roots[name].is_dir():  # one line for the benchmark, not one per split
            left_out.append(f"{TITLES[name]}: no folder {roots[name]} ({ROOT_FLAGS[name][0]})")
            print(f"left out: {left_out[-1]}", flush=True)
            continue
        for split in ("val",) + ((TEST_SPLITS[name],) if name in TEST_SPLITS else ()):
            why = split_absent(name, roots[name], split)
            if why:
                left_out.append(why)
                print(f"left out: {why}", flush=True)
            else:
                plan.append((name, split))
    if not plan:
        raise ConfigError("no benchmark data found: pass --fashioniq-path, --cirr-path and/or --circo-path "
                          "(the layouts are in the README)")
    path = model_file(args.model_path)
    check_model_outputs(args, "--out")
    out = Path(args.save_path)
    digest = sha256_of(path)
    print(f"checkpoint {path}: sha256 {digest}", flush=True)
    clip = load_clip(**clip_args(args), device=device)
    net = load_model(args.model_path, clip, device)

    rows = []
    for name, split in plan:
        config = eval_config_from_args(args, device, split=split)
        if split == "val":
            result = (fashioniq_val(net, clip, roots[name], config) if name == "fashioniq" else
                      (cirr_val if name == "cirr" else circo_val)(retrieve(net, clip, name, roots[name], config)))
            rows += val_rows(name, result, args.resamples, args.seed)
        else:
            rows += server_rows(name, split, write_server_files(net, clip, name, roots[name], config, out))

    report = {"checkpoint": {"path": str(args.model_path), "file": str(path), "sha256": digest},
              "clip": {"model": args.clip_model, "weights": args.clip_weights, "pretrained": args.clip_pretrained},
              "precision": args.precision, "bootstrap": {"resamples": args.resamples, "seed": args.seed},
              "rows": rows, "left_out": left_out}
    print("\n" + format_table(rows), flush=True)
    atomic_write_json(report, out / f"{REPORT_NAME}.json")
    atomic_write_bytes(markdown(report).encode("utf-8"), out / f"{REPORT_NAME}.md")
    log.info(f"wrote {out / f'{REPORT_NAME}.json'} and {out / f'{REPORT_NAME}.md'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
