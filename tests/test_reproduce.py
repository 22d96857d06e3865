"""reproduce.py: the per-query hits average to the metrics exactly; the bootstrap's standard error; the whole
run on the toy world (the table with the paper's column and the difference, validated server files, the
JSON / Markdown report, a missing benchmark in one line); the paper's figures are the README's."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metrics as M
import reproduce
from evaluation import EvalConfig, check_submission_files, evaluate
from features import Encoding
from toy.world import make_toy_world

REPO = Path(__file__).resolve().parents[1]


def _feats(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_fashioniq_hits_average_to_the_recall_exactly():
    q, g = _feats(37, seed=1), _feats(60, seed=2)
    names = [f"img{i}" for i in range(60)]
    targets = [names[(7 * i) % 60] for i in range(37)]
    q = F.normalize(g[[(7 * i) % 60 for i in range(37)]] + 0.35 * q * 16 ** 0.5, dim=-1)
    hits = M.fashioniq_hits(q, g, names, targets, ks=(1, 10, 50))
    recall = M.fashioniq_recall(q, g, names, targets, ks=(1, 10, 50))
    for k in (1, 10, 50):
        assert hits[k].shape == (37,) and hits[k].dtype == torch.bool
        assert float(hits[k].float().mean().item() * 100.0) == recall[k]
    assert 0 < recall[10] < 100  # not a trivial case


def test_cirr_hits_average_to_the_recall_exactly():
    rng = np.random.default_rng(0)
    q, g = _feats(41, seed=3), _feats(70, seed=4)
    names = [f"dev-{i}" for i in range(70)]
    refs, targets, groups = [], [], []
    for i in range(41):
        members = [names[j] for j in rng.choice(70, size=6, replace=False)]
        refs.append(members[0])
        targets.append(members[1 + i % 5])
        groups.append(members)
    # each query near its target, with noise: some found at once, some lower, some missed
    q = F.normalize(g[[names.index(t) for t in targets]] + 0.35 * q * 16 ** 0.5, dim=-1)
    hits = M.cirr_hits(q, g, names, refs, targets, groups)
    recall = M.cirr_recall(q, g, names, refs, targets, groups)
    assert set(hits) == set(recall)
    for key, value in recall.items():
        assert float(hits[key].float().mean().item() * 100.0) == value
    assert 0 < recall["cirr_recall_at5"] < 100 and 0 < recall["cirr_group_recall_at1"] < 100


def test_bootstrap_standard_error_matches_the_binomial_one():
    hits = torch.tensor([True] * 30 + [False] * 70)
    se = reproduce.bootstrap_se([hits], resamples=2000, seed=0)
    assert se == pytest.approx(100 * (0.3 * 0.7 / 100) ** 0.5, rel=0.08)  # sqrt(p(1-p)/n), percent
    assert reproduce.bootstrap_se([hits], resamples=2000, seed=0) == se  # seeded
    assert reproduce.bootstrap_se([torch.ones(50, dtype=torch.bool)], resamples=100, seed=0) == 0.0
    # the mean of two groups' means: the variance halves per group, sqrt((v1 + v2) / 4)
    two = reproduce.bootstrap_se([hits, hits], resamples=2000, seed=0)
    assert two == pytest.approx(se / 2 ** 0.5, rel=0.1)


def test_paper_figures_are_the_readme_table():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = {}
    for line in text.splitlines():
        m = re.match(r"\| (FashionIQ val|CIRR test1|CIRCO test)[^|]*\| ([^|]+) \| ([\d. /]+) \|", line)
        if m:
            for metric, value in zip(m.group(2).split(" / "), m.group(3).split(" / ")):
                table[(m.group(1), metric.strip())] = float(value)
    assert table == {("FashionIQ val", "R@10"): 29.39, ("FashionIQ val", "R@50"): 50.88,
                     ("CIRR test1", "R@1"): 25.90, ("CIRR test1", "R@5"): 55.61, ("CIRR test1", "R@10"): 67.66,
                     ("CIRR test1", "R@50"): 89.66, ("CIRR test1", "R_subset@1"): 55.21,
                     ("CIRCO test", "mAP@5"): 15.05, ("CIRCO test", "mAP@10"): 16.32,
                     ("CIRCO test", "mAP@25"): 18.06, ("CIRCO test", "mAP@50"): 19.05}
    flat = {k: v for figures in reproduce.PAPER.values() for k, v in figures.items()}
    assert flat == {"average_10": 29.39, "average_50": 50.88, "cirr_recall_at1": 25.90, "cirr_recall_at5": 55.61,
                    "cirr_recall_at10": 67.66, "cirr_recall_at50": 89.66, "cirr_group_recall_at1": 55.21,
                    "circo_map_at5": 15.05, "circo_map_at10": 16.32, "circo_map_at25": 18.06, "circo_map_at50": 19.05}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_toy_world(tmp_path_factory.mktemp("toy") / "world", seed=3, num_train_images=4, num_queries=6,
                          num_distractors=4)


@pytest.fixture
def run_args(tiny_clip_path, net_path, tmp_path) -> list[str]:
    return ["--model-path", str(net_path), "--clip-weights", str(tiny_clip_path), "--device", "cpu",
            "--batch-size", "16", "--workers", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out")]


def test_reproduce_on_the_toy_world(world, run_args, tiny_clip, net, net_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reproduce, "load_clip", lambda **kwargs: tiny_clip)
    report = reproduce.main(run_args + ["--fashioniq-path", str(world / "FashionIQ"), "--cirr-path", str(world / "CIRR"),
                                        "--circo-path", str(tmp_path / "no_circo"), "--resamples", "200"])
    out = capsys.readouterr().out
    # the missing benchmark: one line, not an error, not one per split
    assert out.count("left out:") == 1 and f"CIRCO: no folder {tmp_path / 'no_circo'}" in out
    assert re.search(r"sha256 [0-9a-f]{64}", out).group(0) == "sha256 " + __import__("hashlib").sha256(
        net_path.read_bytes()).hexdigest()
    assert re.search(r"benchmark +split +metric +this run ± s\.e\. +paper +difference", out)

    # the values are evaluate's; the difference is the value minus the paper's figure
    # evaluate.py's computation, from the galleries the run cached (the queries encoded again)
    config = EvalConfig(encoding=Encoding(batch_size=16, workers=0, device=torch.device("cpu"), progress=False),
                        cache_dir=tmp_path / "cache")
    want = {"fashioniq": evaluate(net, tiny_clip, "fashioniq", world / "FashionIQ", config),
            "cirr": evaluate(net, tiny_clip, "cirr", world / "CIRR", config)}
    rows = {(r["benchmark"], r["split"], r["key"]): r for r in report["rows"]}
    for name, metrics in want.items():
        for key, value in metrics.items():
            assert rows[(name, "val", key)]["value"] == value
            assert rows[(name, "val", key)]["se"] >= 0
    avg = rows[("fashioniq", "val", "average_10")]
    assert avg["paper"] == 29.39 and avg["difference"] == pytest.approx(want["fashioniq"]["average_10"] - 29.39)
    line = next(x for x in out.splitlines() if "average R@10" in x)
    assert line.split()[-2:] == ["29.39", f"{want['fashioniq']['average_10'] - 29.39:+.2f}"]
    assert rows[("cirr", "val", "cirr_recall_at1")]["paper"] is None  # the paper reports test1
    assert not any(r["benchmark"] == "circo" for r in report["rows"])

    # test1: server only, with the files to upload, which pass the server checks
    cirr_dir = tmp_path / "out" / "cirr"
    r1 = rows[("cirr", "test1", "cirr_recall_at1")]
    assert r1["value"] is None and r1["paper"] == 25.90 and r1["server_file"] == str(cirr_dir / "cirr.json")
    assert rows[("cirr", "test1", "cirr_group_recall_at1")]["server_file"] == str(cirr_dir / "subset_cirr.json")
    assert f"server only: upload {cirr_dir / 'cirr.json'}" in out
    checks = check_submission_files("cirr", world / "CIRR", [cirr_dir / "cirr.json", cirr_dir / "subset_cirr.json"])
    assert [c.problems for c in checks] == [[], []]

    # the report files
    saved = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"])) and saved["bootstrap"] == {"resamples": 200, "seed": 0}
    assert saved["checkpoint"]["sha256"] in out
    md = (tmp_path / "out" / "reproduce.md").read_text()
    assert "| FashionIQ | val | average R@10 |" in md and "| 29.39 |" in md and "CIRCO: no folder" in md


def test_reproduce_circo_alone(world, run_args, tiny_clip, net, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reproduce, "load_clip", lambda **kwargs: tiny_clip)
    report = reproduce.main(run_args + ["--fashioniq-path", str(tmp_path / "a"), "--cirr-path", str(tmp_path / "b"),
                                        "--circo-path", str(world / "CIRCO"), "--resamples", "50"])
    assert capsys.readouterr().out.count("left out:") == 2 and len(report["left_out"]) == 2
    # evaluate.py's computation, from the galleries the run cached (the queries encoded again)
    config = EvalConfig(encoding=Encoding(batch_size=16, workers=0, device=torch.device("cpu"), progress=False),
                        cache_dir=tmp_path / "cache")
    want = evaluate(net, tiny_clip, "circo", world / "CIRCO", config)
    rows = {(r["split"], r["key"]): r for r in report["rows"]}
    assert {k: rows[("val", k)]["value"] for k in want} == want
    circo_json = tmp_path / "out" / "circo" / "circo.json"
    assert rows[("test", "circo_map_at10")] == {"benchmark": "circo", "split": "test", "key": "circo_map_at10",
                                                "metric": "mAP@10", "value": None, "se": None, "paper": 16.32,
                                                "difference": None, "server_file": str(circo_json)}
    assert [c.problems for c in check_submission_files("circo", world / "CIRCO", [circo_json])] == [[]]


def test_circo_aspects_get_standard_errors_over_their_queries():
    rng = np.random.default_rng(1)
    g = _feats(30, seed=5)
    names = [str(100 + i) for i in range(30)]
    aspects = [["addition"], ["negation", "addition"], ["viewpoint"], ["negation"]] * 3
    queries = [{"gt_img_ids": [names[j] for j in rng.choice(30, size=3, replace=False)], "semantic_aspects": a}
               for a in aspects]
    q = F.normalize(g[[names.index(x["gt_img_ids"][0]) for x in queries]] + 0.5 * _feats(12, seed=6) * 4, dim=-1)
    r = SimpleNamespace(queries=queries, names=names, query_features=q, gallery=SimpleNamespace(features=g))
    rows = {x["key"]: x for x in reproduce.val_rows("circo", reproduce.circo_val(r), resamples=200, seed=0)}
    ap10 = M.circo_per_query(q, g, names, [x["gt_img_ids"] for x in queries])["circo_map_at10"]
    negation = [i for i, a in enumerate(aspects) if "negation" in a]
    assert rows["circo_map_at10_negation"]["value"] == pytest.approx(float(ap10[negation].mean()) * 100, abs=1e-9)
    assert rows["circo_map_at10_negation"]["metric"] == "mAP@10 negation"
    assert rows["circo_map_at10_negation"]["se"] > 0 and rows["circo_map_at10"]["se"] > 0


def test_no_benchmark_data_is_one_error_line(run_args, tmp_path, capsys):
    none = [f"--{n}-path" for n in ("fashioniq", "cirr", "circo")]
    argv = run_args + [x for flag in none for x in (flag, str(tmp_path / flag[2:]))]
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv)
    assert str(e.value).startswith("error: no benchmark data found") and "\n" not in str(e.value)
    assert capsys.readouterr().out.count("left out:") == 3


def test_a_missing_checkpoint_or_unwritable_out_names_the_flag(world, run_args, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(reproduce, "load_clip", lambda *a, **k: loaded.append(1))
    argv = run_args + ["--cirr-path", str(world / "CIRR")]
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv + ["--model-path", str(tmp_path / "nope.pt")])
    msg = str(e.value)
    assert msg.startswith(f"error: --model-path {tmp_path / 'nope.pt'}: no such file;") and "disk" not in msg
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv + ["--out", str(blocker / "out")])
    assert str(e.value).startswith(f"error: --out {blocker / 'out'}") and "--save-path" not in str(e.value)
    assert not loaded  # both found before CLIP loads


def test_readme_quick_start_runs_as_written(world, tiny_clip_path, net_path, tmp_path):
    """The README's quick-start command, character for character, in a folder laid out as the README says:
    the setup's `.venv/bin/python`, the data under ./data/ (here the toy world), the released model's file
    name, and CLIP where the `clip` package caches it (here the tiny CLIP in a fresh HOME)."""
    import os
    import shutil
    import subprocess
    import sys

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick = readme[readme.index("## Quick start"):readme.index("## Expected numbers")]
    [line] = [x.strip() for x in quick.splitlines() if x.strip().startswith(".venv/bin/python src/reproduce.py")]
    clone = tmp_path / "clone"
    (clone / ".venv" / "bin").mkdir(parents=True)
    shim = clone / ".venv" / "bin" / "python"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    shim.chmod(0o755)
    (clone / "src").symlink_to(REPO / "src")
    (clone / "data").symlink_to(world)
    shutil.copy(net_path, clone / "FTI4CIR_released.pt")
    home = tmp_path / "home"
    (home / ".cache" / "clip").mkdir(parents=True)
    shutil.copy(tiny_clip_path, home / ".cache" / "clip" / "ViT-L-14.pt")
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    md = (clone / "reproduce" / "reproduce.md").read_text()
    for figure in ("29.39", "25.90", "15.05"):  # FashionIQ val, CIRR test1, CIRCO test rows
        assert figure in proc.stdout and figure in md
    assert (clone / "reproduce" / "cirr" / "cirr.json").is_file() and (clone / "reproduce" / "circo" / "circo.json").is_file()
