"""The whole FTI4CIR pipeline on a built-in toy world, on a CPU, in a few minutes.

1. generates a small world of coloured shapes and garments in the exact layouts of ImageNet,
   FashionIQ, CIRR and CIRCO, plus a separate "web" part of captioned images (scripts/make_toy_data.py);
2. trains a small CLIP on the web part only (scripts/make_toy_clip.py), which stands in for OpenAI's
   CLIP: it knows the toy world's words and pictures but has never seen a benchmark annotation;
3. trains FTI4CIR on the toy ImageNet images and their caption pairs over that frozen CLIP;
4. evaluates FTI4CIR and the image-only and text-only baselines on the three benchmarks, writes the
   CIRR / CIRCO test submissions and draws retrieval examples (reference, text, top 5, target framed);
5. prints one table per benchmark: FTI4CIR, image-only, text-only and chance, each figure with its
   standard error over the queries, how many drawn example queries have a target in their top 5 and
   each example split's top-5 rate over all its validation queries, then CIRR's and FashionIQ's
   Recall@1/5/10 per kind of change (toy/kinds.py), and writes everything to <out>/summary.json.

`--ablations` also trains the paper's two ablations (train.py --no-attributes: subject-only;
--no-subject: attributes-only) with FTI4CIR's flags on the same world, evaluates them with it and prints
one table of the three, each figure with its standard error (summary.json: "ablations").

Each step runs one of the real scripts (src/train.py, src/evaluate.py, src/test.py, scripts/...) with
flags, in this process (so the libraries are imported once), printing its command: run from the
repository root after the README's setup, it reruns the step by hand (`.venv/bin/python ...`: the
setup installs into .venv without activating it). Everything goes under --out, which a rerun replaces.
`--clip-weights FILE` runs the same demo over a real CLIP file instead of the toy one.

Spreads: a recall is a mean of per-query hits, so its standard error is sqrt(p(1-p)/n) over the n queries.
CIRCO's mAP is a mean of per-query APs, which the summary recomputes (metrics.circo_per_query, checked
equal to evaluate.py's figures): its standard error is sqrt(var/n) of those APs. For chance, where no
per-query values exist, the Bhatia-Davis inequality (an AP lies in [0, 1], so its variance is at most
mAP(1-mAP)) gives the binomial formula as an upper bound. FashionIQ's average combines the three
categories' errors (sqrt of the sum of squares, over 3).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

MARKER = ".fti4cir-demo"
METHODS = ("fti4cir", "image-only", "text-only", "chance")
# --ablations: the paper's two ablations (METHOD §14), each trained like FTI4CIR with one train.py flag more
ABLATIONS = {"subject-only": "--no-attributes", "attributes-only": "--no-subject"}
BENCHMARKS = ("fashioniq", "cirr", "circo")
# the figures the demo is about: FTI4CIR should beat both baselines on each by more than their spreads
HEADLINE = {"fashioniq": ("average_10",), "cirr": ("cirr_recall_at1", "cirr_group_recall_at1"),
            "circo": ("circo_map_at5",)}
KIND_KS = (1, 5, 10)  # the recalls of the tables per kind of change (toy/kinds.py)
KIND_GROUPING = ("one row per attribute, counting every query that changes it (rows overlap); one row per "
                 "number of attributes changed; all")
EXAMPLE_TOP = 5  # results per query in the example grids (evaluate.py draws the top 5)
EVAL_BATCH = 32  # --batch-size of every evaluation, and of the summary's own retrievals
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
# the printed commands name the README setup's environment, relative to the repository root: it is never activated
VENV_BIN = ".venv/bin"
VENV_PYTHON = f"{VENV_BIN}/python"


class _Tee(io.TextIOBase):
    """Writes to a log file and keeps the text; echoes to the terminal too when `echo`."""

    def __init__(self, log, echo: bool):
        self.log, self.echo, self.text = log, echo, []

    def write(self, s: str) -> int:
        self.log.write(s)
        self.text.append(s)
        if self.echo:
            sys.__stdout__.write(s)
        return len(s)

    def flush(self) -> None:
        self.log.flush()
        if self.echo:
            sys.__stdout__.flush()


def run(script: str, args: list[str], log: Path, live: bool = False):
    """Runs `.venv/bin/python <script> <args>` as a call of the script's main(argv) in this process, echoing the
    command and logging its output; prints the output's tail (all of it, as it comes, when `live`: its
    progress bar then goes to the terminal). Returns what main returned."""
    shown = " ".join(shlex.quote(a) for a in [VENV_PYTHON, script] + args)
    print(f"\n$ {shown}", flush=True)
    t = time.time()
    module = importlib.import_module(Path(script).stem)
    with open(log, "a") as f:
        f.write(f"$ {shown}\n")
        tee = _Tee(f, echo=live)
        failure = None
        with contextlib.redirect_stdout(tee), (contextlib.nullcontext() if live else contextlib.redirect_stderr(tee)):
            try:
                result = module.main(args)
            except SystemExit as e:  # the scripts report user errors this way
                failure = e.code if e.code not in (None, 0) else None
    if not live:
        tail = "".join(tee.text).strip().splitlines()[-12:]
        print("\n".join("  " + line for line in tail))
    if failure is not None:
        raise SystemExit(f"error: demo step {script} failed ({str(failure).removeprefix('error: ')}); "
                         f"full output in {log}")
    print(f"  ({time.time() - t:.1f} s)", flush=True)
    return result


def _figures(benchmark: str, result: dict) -> dict[str, float]:
    """The metric figures of an evaluate.py result, in the metric files' order; entries that describe a
    departure from the protocol (evaluation.protocol_entries: not numbers) are not figures."""
    from evaluation import METRIC_KEYS

    return {k: result[k] for k in METRIC_KEYS[benchmark]}


# chance levels: what a random ranking scores on the same annotations ---------------------------

def recall_chance(k: int, gallery: int) -> float:
    return 100.0 * min(1.0, k / gallery)


def ap_chance(k: int, n_rel: int, gallery: int) -> float:
    """E[AP@K] of a random ranking with n_rel relevant items among `gallery` (docs/METHOD.md §11's AP@K)."""
    total = 0.0
    for j in range(1, min(k, gallery) + 1):
        # P(item j relevant) * E[precision@j | item j relevant]
        total += (n_rel / gallery) * (1 + (j - 1) * (n_rel - 1) / max(1, gallery - 1)) / j
    return 100.0 * total / min(n_rel, k)


def _ident(image):
    return image  # metadata only: no image is loaded


def val_splits(data: Path) -> dict[str, tuple]:
    """The validation (gallery, query) datasets of every example grid's split, metadata only, opened once
    for the chance levels, the query counts and the gallery sizes: keys fashioniq_<category>, cirr, circo."""
    from datasets import CIRCODataset, CIRRDataset, FashionIQDataset

    out = {f"fashioniq_{c}": (FashionIQDataset(data / "FashionIQ", "val", [c], "gallery", _ident),
                              FashionIQDataset(data / "FashionIQ", "val", [c], "query", _ident))
           for c in FASHIONIQ_CATEGORIES}
    out["cirr"] = (CIRRDataset(data / "CIRR", "val", "gallery", _ident), CIRRDataset(data / "CIRR", "val", "query", _ident))
    out["circo"] = (CIRCODataset(data / "CIRCO", "val", "gallery", _ident), CIRCODataset(data / "CIRCO", "val", "query", _ident))
    return out


def chance_levels(splits: dict) -> dict[str, dict[str, float]]:
    from evaluation import METRIC_KEYS

    out = {"fashioniq": {}, "cirr": {}, "circo": {}}
    per_cat = {}
    for cat in FASHIONIQ_CATEGORIES:
        g = len(splits[f"fashioniq_{cat}"][0].names)
        per_cat[cat] = {k: recall_chance(k, g) for k in (10, 50)}
        for k in (10, 50):
            out["fashioniq"][f"{cat}_{k}"] = per_cat[cat][k]
    for k in (10, 50):
        out["fashioniq"][f"average_{k}"] = sum(per_cat[c][k] for c in per_cat) / 3
    g = len(splits["cirr"][0].names)
    for k in (1, 5, 10, 50):
        out["cirr"][f"cirr_recall_at{k}"] = recall_chance(k, g - 1)  # the reference is removed
    for k in (1, 2, 3):
        out["cirr"][f"cirr_group_recall_at{k}"] = 100.0 * k / 5
    gallery = len(splits["circo"][0].names)
    queries = splits["circo"][1].queries
    for k in (5, 10, 25, 50):
        out["circo"][f"circo_recall_at{k}"] = recall_chance(k, gallery)
        out["circo"][f"circo_map_at{k}"] = sum(ap_chance(k, len([i for i in q["gt_img_ids"] if i]), gallery)
                                              for q in queries) / len(queries)
    return {b: {k: out[b][k] for k in METRIC_KEYS[b]} for b in out}  # in the metric files' order


# spreads ---------------------------------------------------------------------------------------

def query_counts(splits: dict) -> dict:
    """Validation queries per benchmark (FashionIQ: per category)."""
    return {"fashioniq": {c: len(splits[f"fashioniq_{c}"][1].queries) for c in FASHIONIQ_CATEGORIES},
            "cirr": len(splits["cirr"][1].queries), "circo": len(splits["circo"][1].queries)}


def _standard_error(percent: float, n: int) -> float:
    p = min(max(percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1 - p) / n)


def spreads(metrics: dict[str, dict[str, float]], counts: dict,
            per_query: dict[str, dict[str, list[float]]] | None = None) -> dict[str, dict[str, float]]:
    """Standard errors (percent points) of every figure of one method, keyed as `metrics`.

    A figure with its per-query values in `per_query` (benchmark -> key -> one value in [0, 1] per
    query: CIRCO's APs and hits) gets the standard error of their mean, sqrt(var / n). Otherwise a recall
    gets the binomial sqrt(p(1-p)/n), the same number for 0/1 hits, and an mAP that bound, which no
    per-query AP in [0, 1] can exceed (Bhatia-Davis); FashionIQ's average combines its three categories'.
    """
    out = {}
    for bench, values in metrics.items():
        se = {}
        for key, v in values.items():
            values_of_queries = (per_query or {}).get(bench, {}).get(key)
            if values_of_queries is not None:
                se[key] = 100.0 * math.sqrt(statistics.pvariance(values_of_queries) / len(values_of_queries))
                continue
            if bench != "fashioniq":
                se[key] = _standard_error(v, counts[bench])
                continue
            cat, k = key.rsplit("_", 1)
            if cat == "average":  # the mean of independent per-category figures
                cats = [_standard_error(values[f"{c}_{k}"], n) for c, n in counts["fashioniq"].items()]
                se[key] = math.sqrt(sum(e * e for e in cats)) / len(cats)
            else:
                se[key] = _standard_error(v, counts["fashioniq"][cat])
        out[bench] = se
    return out


# examples --------------------------------------------------------------------------------------

def load_models(checkpoint: Path, clip_model: str, clip_weights: str, device: str):
    """(FTI4CIR network in eval mode, frozen CLIP) for the summary's own retrievals."""
    from checkpoint import load_network
    from clip_loader import load_clip

    clip = load_clip(clip_model, clip_weights, device=device)
    net, _ = load_network(checkpoint, device)
    return net.eval(), clip


def _summary_config(cache: Path, baseline: str | None = None):
    """evaluate.py's configuration for the demo's flags (its batch size, no workers, the same gallery cache)."""
    from evaluation import EvalConfig
    from features import Encoding

    return EvalConfig(encoding=Encoding(batch_size=EVAL_BATCH, workers=0, progress=False), cache_dir=cache,
                      baseline=baseline)


def fti4cir_retrievals(data: Path, net, clip, cache: Path) -> dict:
    """FTI4CIR's evaluation.Retrieval of every example grid's validation split (the galleries come from the
    evaluations' cache), keyed as `val_splits`."""
    from evaluation import retrieve

    config = _summary_config(cache)
    out = {f"fashioniq_{c}": retrieve(net, clip, "fashioniq", data / "FashionIQ", config, c) for c in FASHIONIQ_CATEGORIES}
    out["cirr"] = retrieve(net, clip, "cirr", data / "CIRR", config)
    out["circo"] = retrieve(net, clip, "circo", data / "CIRCO", config)
    return out


def _target_in_top(r, count: int) -> list[bool]:
    """Whether each of `count` evenly spaced queries of the evaluation.Retrieval `r` has a target among its
    top 5 results (the queries and rankings `evaluate.py --save-examples` draws: evaluation.example_rankings)."""
    from evaluation import example_rankings, query_targets

    rows, ranked = example_rankings(r, count, EXAMPLE_TOP)
    return [bool(query_targets(r.queries[i]) & {r.names[j] for j in row}) for row, i in zip(ranked.tolist(), rows)]


def example_hits(retrievals: dict, count: int) -> dict[str, list[bool]]:
    """For every example grid: whether each drawn query has a target among its top 5 results."""
    return {label: _target_in_top(r, count) for label, r in retrievals.items()}


def top_rates(retrievals: dict) -> dict[str, float]:
    """For every example grid's split: the percent of all its validation queries with a target among their
    top 5 results, the rate that the grid's drawn queries sample."""
    return {label: 100.0 * statistics.fmean(_target_in_top(r, len(r.queries))) if r.queries else math.nan
            for label, r in retrievals.items()}


def circo_per_query_values(fti4cir, clip, data: Path, cache: Path, metrics: dict) -> dict[str, dict[str, list[float]]]:
    """method -> CIRCO key -> each validation query's AP@K / target hit@K (metrics.circo_per_query), for
    FTI4CIR (`fti4cir`: its evaluation.Retrieval of CIRCO val) and both baselines; their means must be the figures evaluate.py reported
    (`metrics`)."""
    import metrics as M
    from evaluation import retrieve

    out = {}
    for method in ("fti4cir", "image-only", "text-only"):
        r = fti4cir if method == "fti4cir" else retrieve(None, clip, "circo", data / "CIRCO", _summary_config(cache, method))
        values = M.circo_per_query(r.query_features, r.gallery.features, r.names, [x["gt_img_ids"] for x in r.queries])
        for key, v in values.items():
            if abs(100.0 * float(v.mean()) - metrics[method]["circo"][key]) > 1e-3:
                raise RuntimeError(f"the summary's CIRCO {key} of {method} ({100 * float(v.mean()):.4f}) differs from "
                                   f"evaluate.py's ({metrics[method]['circo'][key]:.4f})")
        out[method] = {key: v.tolist() for key, v in values.items()}
    return out


def _ranked_names(r, top: int = max(KIND_KS)) -> list[list[str]]:
    """Each query's first `top` gallery names (fewer in a smaller gallery), best first; CIRR: the reference
    left out, as its recall leaves it out."""
    import torch

    import metrics as M
    from datasets import CIRRDataset

    exclude = None
    if isinstance(r.query_dataset, CIRRDataset):
        index = {n: i for i, n in enumerate(r.names)}
        exclude = torch.tensor([index[q["reference_name"]] for q in r.queries], dtype=torch.long)
    top = min(top, len(r.names) - (exclude is not None))
    return [[r.names[j] for j in row] for row in M.topk_indices(r.query_features, r.gallery.features, top, exclude).tolist()]


def recall_by_kind(fti4cir: dict, clip, data: Path, cache: Path, metrics: dict) -> dict:
    """benchmark (cirr, fashioniq) -> method -> kind of change -> {"queries", "recall_at1/5/10"}
    (toy/kinds.py), from FTI4CIR's retrievals (`fti4cir`, keyed as `val_splits`) and both baselines'
    (the galleries come from the evaluations' cache) and toy_manifest.json's records. FashionIQ pools its
    three categories, each query ranked in its own category's gallery. The "all" rows must agree with
    evaluate.py's figures (`metrics`): CIRR R@1/5/10 and FashionIQ's R@10, a mean weighted by queries."""
    from evaluation import retrieve
    from toy import kinds
    from toy.world import MANIFEST_NAME

    manifest = json.loads((data / MANIFEST_NAME).read_text())
    splits = [("cirr", None, "cirr"), *(("fashioniq", c, f"fashioniq_{c}") for c in FASHIONIQ_CATEGORIES)]
    roots = {"cirr": data / "CIRR", "fashioniq": data / "FashionIQ"}
    out = {}
    for bench in ("cirr", "fashioniq"):
        out[bench] = {}
        for method in ("fti4cir", "image-only", "text-only"):
            ranked, targets, changes = [], [], []
            for name, cat, label in (s for s in splits if s[0] == bench):
                r = fti4cir[label] if method == "fti4cir" else retrieve(None, clip, name, roots[name],
                                                                        _summary_config(cache, method), cat)
                ranked += _ranked_names(r)
                targets += [q["target_name"] for q in r.queries]
                changes += kinds.query_changes(r.queries, kinds.records(manifest, name, cat))
            table = kinds.recall_by_kind(ranked, targets, changes, KIND_KS)
            figures = metrics[method][bench]
            expected = ({f"recall_at{k}": figures[f"cirr_recall_at{k}"] for k in KIND_KS} if bench == "cirr" else
                        {"recall_at10": sum(figures[f"{c}_10"] * n for c, n in _fiq_counts(fti4cir).items())
                         / sum(_fiq_counts(fti4cir).values())})
            for key, v in expected.items():
                if abs(table["all"][key] - v) > 1e-3:
                    raise RuntimeError(f"the summary's {bench} {key} of {method} over all queries "
                                       f"({table['all'][key]:.4f}) differs from evaluate.py's ({v:.4f})")
            out[bench][method] = table
    return out


def _fiq_counts(retrievals: dict) -> dict[str, int]:
    return {c: len(retrievals[f"fashioniq_{c}"].queries) for c in FASHIONIQ_CATEGORIES}


# the printed summary ---------------------------------------------------------------------------

def _label(bench: str, key: str) -> str:
    if bench == "fashioniq":
        cat, k = key.rsplit("_", 1)
        return f"{cat} R@{k}"
    name, k = key.rsplit("_at", 1)
    return {"cirr_recall": "R@", "cirr_group_recall": "R_subset@", "circo_map": "mAP@", "circo_recall": "R@"}[name] + k


def format_tables(metrics: dict, spread: dict, counts: dict, galleries: dict) -> str:
    titles = {"fashioniq": f"FashionIQ val ({' / '.join(str(n) for n in counts['fashioniq'].values())} queries "
                           f"per category dress / shirt / toptee; gallery {galleries['fashioniq']}, reference kept)",
              "cirr": f"CIRR val ({counts['cirr']} queries; gallery {galleries['cirr']}, reference removed; "
                      "R_subset over each query's 6-image set)",
              "circo": f"CIRCO val ({counts['circo']} queries; gallery {galleries['circo']}, reference kept; "
                       "mAP over every ground truth)"}
    lines = []
    for bench in BENCHMARKS:
        lines += ["", titles[bench], f"  {'':<13}" + "".join(f"{m:>16}" for m in METHODS)]
        for key in metrics["fti4cir"][bench]:
            cells = [f"{metrics[m][bench][key]:7.2f} ± {spread[m][bench][key]:5.2f}" for m in METHODS]
            lines.append(f"  {_label(bench, key):<13}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def format_ablation_table(metrics: dict, spread: dict) -> str:
    """FTI4CIR and its ablations side by side on every figure, each with its standard error."""
    methods = ("fti4cir", *ABLATIONS)
    lines = [f"  {'':<22}" + "".join(f"{m:>17}" for m in methods)]
    for bench in BENCHMARKS:
        for key in metrics["fti4cir"][bench]:
            cells = [f"{metrics[m][bench][key]:7.2f} ± {spread[m][bench][key]:5.2f}" for m in methods]
            lines.append(f"  {bench + ' ' + _label(bench, key):<22}" + "".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def format_kind_tables(by_kind: dict, counts: dict) -> str:
    """The tables of recall per kind of change, CIRR's then FashionIQ's."""
    from toy.kinds import format_kind_table

    titles = {"cirr": f"CIRR val by kind of change ({counts['cirr']} queries; reference removed)",
              "fashioniq": f"FashionIQ val by kind of change ({sum(counts['fashioniq'].values())} queries of the "
                           "three categories, each ranked in its category's gallery)"}
    return "\n".join(["", f"Recall@{'/'.join(map(str, KIND_KS))} per kind of change ({KIND_GROUPING})"]
                     + ["\n" + format_kind_table(titles[b], by_kind[b], KIND_KS) for b in ("cirr", "fashioniq")])


def headline_verdicts(metrics: dict, spread: dict) -> list[dict]:
    """FTI4CIR against each baseline on the headline figures: ahead by more than the sum of both spreads?"""
    out = []
    for bench, keys in HEADLINE.items():
        for key in keys:
            for base in ("image-only", "text-only"):
                diff = metrics["fti4cir"][bench][key] - metrics[base][bench][key]
                margin = spread["fti4cir"][bench][key] + spread[base][bench][key]
                out.append({"benchmark": bench, "metric": key, "baseline": base, "difference": diff,
                            "spread_sum": margin, "ahead": diff > margin})
    return out


def gallery_sizes(splits: dict) -> dict:
    fiq = [len(splits[f"fashioniq_{c}"][0].names) for c in FASHIONIQ_CATEGORIES]
    return {"fashioniq": " / ".join(map(str, fiq)), "cirr": len(splits["cirr"][0].names),
            "circo": len(splits["circo"][0].names)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="output folder (replaced on rerun)")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy world, the toy CLIP and the training run (default %(default)s)")
    w = p.add_argument_group("toy world")
    w.add_argument("--num-train-images", type=int, default=1000, help="toy ImageNet images to train FTI4CIR on (default %(default)s)")
    w.add_argument("--num-queries", type=int, default=300, help="queries per CIRCO split (default %(default)s)")
    w.add_argument("--num-cirr-queries", type=int, default=600,
                   help="queries per CIRR split, six to a 6-image set (default %(default)s)")
    w.add_argument("--num-fashioniq-queries", type=int, default=120,
                   help="queries per FashionIQ category and split (default %(default)s)")
    w.add_argument("--num-distractors", type=int, default=20,
                   help="extra gallery images per split that no query uses (default %(default)s)")
    c = p.add_argument_group("toy CLIP (skipped with --clip-weights)")
    c.add_argument("--toy-clip-steps", type=int, default=1000, help="training steps of the toy CLIP (default %(default)s)")
    c.add_argument("--num-web-images", type=int, default=12000, help="web images the toy CLIP trains on (default %(default)s)")
    c.add_argument("--clip-model", default="ViT-L/14", help="CLIP architecture when --clip-weights is given (default %(default)s)")
    c.add_argument("--clip-weights", default=None, help="a real CLIP file to use instead of training the toy one")
    t = p.add_argument_group("FTI4CIR training (src/train.py)")
    t.add_argument("--epochs", type=int, default=5, help="training epochs (default %(default)s)")
    t.add_argument("--batch-size", type=int, default=64, help="training batch size (default %(default)s)")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate (default %(default)s)")
    p.add_argument("--examples", type=int, default=8,
                   help="queries drawn per benchmark in the example grids, evenly spaced (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for every step (default %(default)s)")
    p.add_argument("--ablations", action="store_true",
                   help="also train and evaluate the paper's two ablations on the same world, with the same flags: "
                        "subject-only and attributes-only (train.py's two ablation flags), and print them beside "
                        "FTI4CIR (docs/METHOD.md §14)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    out = args.out.resolve()
    if out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise SystemExit(f"error: --out {out} exists and was not made by the demo; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by scripts/demo.py; replaced on every run\n")
    log = out / "demo.log"
    data, model_dir, evals, subs, cache = out / "data", out / "model", out / "eval", out / "submissions", out / "cache"
    timings = {}

    def step(name, script, flags, live=False):
        t = time.time()
        result = run(script, [str(f) for f in flags], log, live=live)
        timings[name] = timings.get(name, 0.0) + time.time() - t
        return result

    print(f"[1/6] toy world -> {data}")
    step("toy world", "scripts/make_toy_data.py",
         ["--out", data, "--seed", args.seed, "--num-train-images", args.num_train_images,
          "--num-queries", args.num_queries, "--num-cirr-queries", args.num_cirr_queries,
          "--num-fashioniq-queries", args.num_fashioniq_queries,
          "--num-distractors", args.num_distractors])

    if args.clip_weights:
        print("\n[2/6] CLIP: the file given (no toy CLIP trained)")
        clip_model, clip_weights = args.clip_model, str(Path(args.clip_weights).resolve())
        clip_flags = ["--clip-model", clip_model, "--clip-weights", clip_weights]
        toy_clip = None
    else:
        clip_model, clip_weights = "ViT-L/14", str(out / "clip" / "toy_clip.pt")  # the architecture is read from the file
        print(f"\n[2/6] toy CLIP, trained on the web part only -> {clip_weights}")
        toy_clip = step("toy CLIP", "scripts/make_toy_clip.py",
                        ["--out", clip_weights, "--world", data, "--seed", args.seed, "--steps", args.toy_clip_steps,
                         "--num-web-images", args.num_web_images], live=True)
        clip_flags = ["--clip-weights", clip_weights]
    common = clip_flags + ["--device", args.device, "--workers", "0"]

    print(f"\n[3/6] FTI4CIR training -> {model_dir}")
    train_flags = ["--imagenet-path", data / "ImageNet", "--pairs-path", data / "ImageNet" / "pairs.json",
                   "--epochs", args.epochs, "--batch-size", args.batch_size, "--save-frequency", args.epochs,
                   "--lr", args.lr, "--seed", args.seed, "--precision", "fp32", "--no-progress"] + common
    step("FTI4CIR training", "src/train.py", ["--model-dir", model_dir] + train_flags)
    checkpoint = model_dir / "checkpoints" / f"epoch_{args.epochs}.pt"
    ablations = {}  # label -> its checkpoint
    for label, flag in (ABLATIONS.items() if args.ablations else ()):
        folder = out / f"model_{label}"
        print(f"\n[3/6] ablation {label} ({flag}) training -> {folder}")
        step("ablation training", "src/train.py", ["--model-dir", folder, flag] + train_flags)
        ablations[label] = folder / "checkpoints" / f"epoch_{args.epochs}.pt"

    roots = {"fashioniq": ("--fashioniq-path", data / "FashionIQ"), "cirr": ("--cirr-path", data / "CIRR"),
             "circo": ("--circo-path", data / "CIRCO")}
    eval_flags = ["--save-path", evals, "--cache-dir", cache, "--batch-size", EVAL_BATCH, "--no-progress"] + common
    print(f"\n[4/6] validation metrics of FTI4CIR and both baselines -> {evals}")
    metrics = {m: {} for m in METHODS}
    for name, (flag, root) in roots.items():
        base = ["--dataset", name, flag, root]
        metrics["fti4cir"][name] = _figures(name, step("evaluation", "src/evaluate.py", base + [
            "--model-path", checkpoint, "--save-examples", args.examples] + eval_flags))
        for baseline in ("image-only", "text-only"):
            metrics[baseline][name] = _figures(name, step("evaluation", "src/evaluate.py",
                                                          base + ["--baseline", baseline] + eval_flags))
        for label, path in ablations.items():
            metrics.setdefault(label, {})[name] = _figures(name, step(
                "ablation evaluation", "src/evaluate.py", base + ["--model-path", path, "--save-path", evals / label]
                + eval_flags[2:]))  # eval_flags without its --save-path
    print(f"\n[5/6] test-server submissions -> {subs}")
    for name in ("cirr", "circo"):
        flag, root = roots[name]
        step("submissions", "src/test.py", ["--dataset", name, flag, root, "--model-path", checkpoint,
                                            "--save-path", subs, "--cache-dir", cache, "--batch-size", EVAL_BATCH,
                                            "--no-progress"] + common)

    print("\n[6/6] summary")
    t = time.time()
    splits = val_splits(data)
    metrics["chance"] = chance_levels(splits)
    counts = query_counts(splits)
    net, clip = load_models(checkpoint, clip_model, clip_weights, args.device)
    retrievals = fti4cir_retrievals(data, net, clip, cache)
    per_query = circo_per_query_values(retrievals["circo"], clip, data, cache, metrics)
    spread = {m: spreads(metrics[m], counts, {"circo": per_query[m]} if m in per_query else None)
              for m in (*METHODS, *ablations)}
    hits, rates = example_hits(retrievals, args.examples), top_rates(retrievals)
    by_kind = recall_by_kind(retrievals, clip, data, cache, metrics)
    timings["summary"] = time.time() - t
    what = "a toy CLIP trained on the web part" if toy_clip else f"CLIP {clip_weights}"
    print(f"\nresults in percent, each ± its standard error over the queries (CIRCO: over its per-query values; chance mAP: an upper bound); "
          f"FTI4CIR and both baselines over {what}")
    print(format_tables(metrics, spread, counts, gallery_sizes(splits)))
    if ablations:
        print("\nFTI4CIR and its ablations, trained alike on the same world (each ± its standard error; the "
              "ablations' CIRCO mAP: the binomial upper bound):")
        print(format_ablation_table(metrics, spread))
    verdicts = headline_verdicts(metrics, spread)
    print("\nFTI4CIR against the baselines (ahead = difference larger than the two standard errors together):")
    for v in verdicts:
        print(f"  {v['benchmark']:<9} {_label(v['benchmark'], v['metric']):<12} vs {v['baseline']:<10} "
              f"{v['difference']:+7.2f} (spreads {v['spread_sum']:5.2f}): {'ahead' if v['ahead'] else 'NOT ahead'}")
    drawn = sum(len(h) for h in hits.values())
    shown = sum(sum(h) for h in hits.values())
    print(f"\nexample grids: {shown} of {drawn} drawn queries have a target in their top {EXAMPLE_TOP} ("
          + ", ".join(f"{k} {sum(h)}/{len(h)}" for k, h in hits.items()) + ")")
    print("  over all the validation queries of those splits: " + ", ".join(f"{k} {v:.1f}%" for k, v in rates.items())
          + f"; mean {statistics.fmean(rates.values()):.1f}%")
    print(format_kind_tables(by_kind, counts))
    pngs = sorted(evals.glob("**/*.png"))
    print("\nwhere everything went:")
    print(f"  toy data          {data}")
    print(f"  CLIP              {clip_weights}")
    print(f"  checkpoints       {model_dir / 'checkpoints'} (latest.pt, epoch_{args.epochs}.pt)")
    print(f"  hyper-parameters  {model_dir / 'hyperparameters.json'}")
    print(f"  TensorBoard       {VENV_BIN}/tensorboard --logdir {model_dir / 'tensorboard'}")
    print(f"  metrics           {evals}/metrics_<dataset>[_image_only|_text_only].json")
    print(f"  submissions       {subs / 'cirr'}/cirr.json, subset_cirr.json; {subs / 'circo'}/circo.json")
    for png in pngs:
        print(f"  examples          {png}")
    print(f"  summary           {out / 'summary.json'}")
    print(f"  full log          {log}")
    timings["total"] = time.time() - t0
    print(f"\ndemo finished in {timings['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()
                                                             if k != "total") + ")")
    summary = {"metrics": metrics, "spread": spread, "queries": counts, "headline": verdicts,
               "examples": {"top": EXAMPLE_TOP, "target_in_top": hits, "top_rate_percent": rates,
                            "files": [str(p) for p in pngs]},
               "toy_clip": toy_clip, "clip_weights": clip_weights, "checkpoint": str(checkpoint),
               "seed": args.seed, "timings_s": timings,
               "recall_by_kind": {"grouping": KIND_GROUPING, **by_kind}}
    if ablations:  # FTI4CIR's own figures stay under "metrics"; the ablations' beside them
        summary["ablations"] = {label: {"flag": ABLATIONS[label], "checkpoint": str(path), "metrics": metrics.pop(label),
                                        "spread": spread.pop(label)} for label, path in ablations.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
