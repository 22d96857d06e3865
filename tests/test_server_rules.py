"""The benchmark owners' rules: what the CIRCO server's code and CIRR's server instructions reject, as
rejections with their source; this repository's conventions as notes; CIRCO's mAP@10 per semantic
aspect, as the CIRCO server reports it; the field's other CIRCO query."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import metrics as M
from datasets import CIRCO_QUERY_TEMPLATES, CIRCODataset


def _circo(n_queries: int = 3, gallery: int = 120):
    ids = list(range(1000, 1000 + gallery))
    sub = {str(q): [str(i) for i in ids[q:q + 50]] for q in range(n_queries)}
    return sub, [{"query_id": q} for q in range(n_queries)], ids


def _rejections(found):
    return [str(f) for f in found if f.rejects]


def _notes(found):
    return [str(f) for f in found if not f.rejects]


def test_circo_server_reads_integer_ids_and_numeric_strings():
    sub, queries, ids = _circo()
    assert M.circo_file_findings(sub, queries, ids) == []
    as_ints = {k: [int(x) for x in v] for k, v in sub.items()}  # the owners' example file writes ints
    assert M.circo_file_findings(as_ints, queries, ids) == []
    mixed = {**sub, "1": [int(x) if j % 2 else x for j, x in enumerate(sub["1"])]}
    assert M.circo_file_findings(mixed, queries, ids) == []


def test_circo_repeated_id_is_one_line_naming_the_query():
    sub, queries, ids = _circo()
    sub["2"][7] = sub["2"][3]
    with pytest.raises(M.SubmissionError) as err:
        M.validate_circo_submission(sub, queries, ids)
    lines = [x for x in str(err.value).splitlines() if "repeated" in x]
    assert len(lines) == 1 and "circo.json query id 2: repeated entries" in lines[0]
    assert "the CIRCO server's code" in lines[0]


@pytest.mark.parametrize("damage,found,source", [
    (lambda s: s["0"].__setitem__(4, "COCO_1004"), "integer ids or numeric strings", "server's code"),
    (lambda s: s["0"].__setitem__(4, [1004]), "integer ids or numeric strings", "server's code"),
    (lambda s: s["0"].pop(), "49 entries, expected exactly 50", "CIRCO's submission instructions"),
    (lambda s: s["0"].append("1110"), "51 entries, expected exactly 50", "CIRCO's submission instructions"),
    (lambda s: s.pop("1"), "1 queries missing", "server's code"),
    (lambda s: s.update({"x": s["0"]}), "keys that are not query ids", "server's code"),
    (lambda s: s.update({"0": "1000 1001"}), "expected a list", "server's code"),
])
def test_circo_rejections_cite_the_server(damage, found, source):
    sub, queries, ids = _circo()
    damage(sub)
    rejected = _rejections(M.circo_file_findings(sub, queries, ids))
    assert len(rejected) == 1 and found in rejected[0] and source in rejected[0], rejected


@pytest.mark.parametrize("damage,found", [
    (lambda s: s["0"].__setitem__(4, "999"), "unknown gallery names ['999']"),
    (lambda s: s["0"].__setitem__(4, 1060.0), "float ids [1060.0]"),
    (lambda s: s["0"].__setitem__(4, 1003), "written once as a number and once as a string"),
])
def test_circo_conventions_are_notes(damage, found):
    sub, queries, ids = _circo()
    damage(sub)
    findings = M.circo_file_findings(sub, queries, ids)
    assert _rejections(findings) == []
    notes = _notes(findings)
    assert len(notes) == 1 and found in notes[0] and "the CIRCO server does not check it" in notes[0], notes
    with pytest.raises(M.SubmissionError, match="query id 0"):  # the files written here keep the conventions too
        M.validate_circo_submission(sub, queries, ids)


def _cirr(n_queries: int = 2):
    names = [f"test1-{i}-0-img0" for i in range(80)]
    queries = [{"pair_id": 10 + q, "reference_name": names[q], "group_members": names[q:q + 6]} for q in range(n_queries)]
    sub = {"version": "rc2", "metric": "recall"}
    subset = {"version": "rc2", "metric": "recall_subset"}
    for q in queries:
        sub[str(q["pair_id"])] = [n for n in names if n != q["reference_name"]][:50]
        subset[str(q["pair_id"])] = q["group_members"][1:4]
    return sub, subset, queries, names


@pytest.mark.parametrize("damage,found", [
    (lambda s, t: s.pop("version"), "'version' must be 'rc2'"),
    (lambda s, t: s.update(metric="map"), "'metric' must be 'recall'"),
    (lambda s, t: s.pop("11"), "1 queries missing"),
    (lambda s, t: s["10"].pop(), "49 entries, expected exactly 50"),
    (lambda s, t: s["10"].__setitem__(0, s["10"][0] + ".png"), "without '.png'"),
    (lambda s, t: s["10"].__setitem__(0, 5), "entries must be strings"),
])
def test_cirr_documented_rules_reject(damage, found):
    sub, subset, queries, names = _cirr()
    damage(sub, subset)
    rejected = _rejections(M.cirr_file_findings(sub, queries, names))
    assert len(rejected) == 1 and found in rejected[0] and "CIRR's server instructions" in rejected[0], rejected


@pytest.mark.parametrize("damage,found,subset_file", [
    (lambda s, t, q: s["10"].__setitem__(3, q[0]["reference_name"]), "holds the reference image", False),
    (lambda s, t, q: s["10"].__setitem__(3, s["10"][2]), "repeated entries", False),
    (lambda s, t, q: s["10"].__setitem__(3, "test1-999-0-img1"), "unknown gallery names", False),
    (lambda s, t, q: s.update({"77": s["10"]}), "keys that are not query ids", False),
    (lambda s, t, q: t["10"].__setitem__(0, "test1-70-0-img0"), "not members of the query's img_set", True),
])
def test_cirr_conventions_are_notes(damage, found, subset_file):
    sub, subset, queries, names = _cirr()
    damage(sub, subset, queries)
    findings = M.cirr_file_findings(subset if subset_file else sub, queries, names, subset=subset_file)
    assert _rejections(findings) == []
    notes = _notes(findings)
    assert any(found in n and "the CIRR server's checks are not public" in n for n in notes), notes


# ---------------------------------------------------------------------------------------------
# mAP@10 per semantic aspect

def circo_with_aspects(root, rng, n_images: int = 40, n_queries: int = 10, aspects: bool = True):
    """A CIRCO root (val and test annotations, the gallery list, small noise images) whose val queries
    list semantic aspects, as the current CIRCO release does (`aspects=False`: as older copies, none)."""
    import json

    from PIL import Image

    ids = sorted(int(x) for x in rng.choice(10**6, size=n_images, replace=False))
    info = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]}))
    folder = root / "COCO2017_unlabeled" / "unlabeled2017"
    folder.mkdir(parents=True)
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"{i:012d}.jpg")
    val, test = [], []
    for q in range(n_queries):
        pick = [ids[j] for j in rng.choice(n_images, size=1 + int(rng.integers(2, 5)), replace=False)]
        e = {"id": q, "reference_img_id": pick[0], "relative_caption": f"has {q} more", "shared_concept": f"thing {q}."}
        test.append(dict(e))
        e.update(target_img_id=pick[1], gt_img_ids=pick[1:] + [""] * (5 - len(pick)))
        if aspects:
            e["semantic_aspects"] = sorted(rng.choice(M.CIRCO_ASPECTS[:4], size=int(rng.integers(1, 3)), replace=False))
        val.append(e)
    (root / "annotations").mkdir()
    (root / "annotations" / "val.json").write_text(json.dumps(val, default=str))
    (root / "annotations" / "test.json").write_text(json.dumps(test))
    return root


def test_aspect_map10_is_the_mean_over_the_queries_listing_it():
    ap10 = torch.tensor([0.5, 0.25, 1.0, 0.0])
    aspects = [["cardinality", "negation"], ["negation"], ["viewpoint", "my_aspect"], []]
    got = M.circo_aspect_map10(ap10, aspects)
    assert list(got) == ["circo_map_at10_cardinality", "circo_map_at10_negation", "circo_map_at10_viewpoint",
                         "circo_map_at10_my_aspect"]  # the server's order, others after
    assert got["circo_map_at10_cardinality"] == pytest.approx(50.0)
    assert got["circo_map_at10_negation"] == pytest.approx((50.0 + 25.0) / 2)
    assert got["circo_map_at10_viewpoint"] == pytest.approx(100.0)
    with pytest.raises(M.MetricsError):
        M.circo_aspect_map10(ap10, aspects[:3])


def test_evaluation_reports_each_aspect(tmp_path, tiny_clip, capsys):
    """Generated CIRCO val annotations with semantic aspects: one mAP@10 per aspect, each the plain mean
    of AP@10 over the queries that list it (AP recomputed here with a loop), and a table line each."""
    import json

    from evaluation import EvalConfig, evaluate, format_table, retrieve
    from features import Encoding

    root = circo_with_aspects(tmp_path / "CIRCO", np.random.default_rng(5))
    encoding = Encoding(batch_size=8, workers=0, device="cpu", progress=False)
    config = EvalConfig(split="val", encoding=encoding, baseline="image-only")
    metrics = evaluate(None, tiny_clip, "circo", root, config)
    r = retrieve(None, tiny_clip, "circo", root, config)
    sims = r.query_features @ r.gallery.features.T
    entries = json.loads((root / "annotations" / "val.json").read_text())
    per_aspect: dict[str, list[float]] = {}
    for i, e in enumerate(entries):
        order = [r.names[j] for j in torch.argsort(sims[i], descending=True, stable=True)[:10].tolist()]
        gts = [str(g) for g in e["gt_img_ids"] if g != ""]
        hits, total = 0, 0.0
        for rank, name in enumerate(order, start=1):
            if name in gts:
                hits += 1
                total += hits / rank
        for a in e["semantic_aspects"]:
            per_aspect.setdefault(a, []).append(total / min(len(gts), 10))
    for a, values in per_aspect.items():
        assert metrics[f"circo_map_at10_{a}"] == pytest.approx(100 * sum(values) / len(values), abs=1e-4), a
    table = format_table("circo", metrics)
    assert all(f"mAP@10 {a}:" in table for a in per_aspect)


def test_without_aspects_evaluation_says_so(tmp_path, tiny_clip, capsys):
    from evaluation import EvalConfig, evaluate
    from features import Encoding

    root = circo_with_aspects(tmp_path / "CIRCO", np.random.default_rng(5), aspects=False)
    encoding = Encoding(batch_size=8, workers=0, device="cpu", progress=False)
    metrics = evaluate(None, tiny_clip, "circo", root, EvalConfig(split="val", encoding=encoding, baseline="image-only"))
    assert not [k for k in metrics if k.startswith("circo_map_at10_")]
    assert "list no semantic aspects" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the field's other CIRCO query

def test_find_also_query_text(tmp_path):

    root = circo_with_aspects(tmp_path / "CIRCO", np.random.default_rng(6))
    ds = CIRCODataset(root, "val", "query", lambda im: im, query_text="find-also")
    q = ds.queries[0]
    concept = q["shared_concept"].strip().rstrip(".").strip()
    assert ds.query_texts(q) == (f"find a picture that also {concept}, but {q['relative_caption']}",)
    assert "find-also" in CIRCO_QUERY_TEMPLATES


# ---------------------------------------------------------------------------------------------
# test.py --split val, all-or-nothing writes, files too deep to read

def _test_py(argv, capsys):
    """(error line or None, printed text) of src/test.py."""
    from helpers import load_test_script

    error = None
    try:
        load_test_script().main(argv)
    except SystemExit as e:
        error = str(e.code)
    return error, capsys.readouterr().out


def test_val_files_have_the_test_format_and_pass_validate(fast_clip, eval_args, net_path, tmp_path, capsys):
    from helpers import dataset_args, make_circo, make_cirr, read_json

    cirr = make_cirr(tmp_path / "CIRR", np.random.default_rng(21), n_images=56, n_queries=5)
    circo = make_circo(tmp_path / "CIRCO", np.random.default_rng(22), n_images=54, n_queries=5)
    model = ["--model-path", str(net_path)]
    error, _ = _test_py(dataset_args(eval_args, "cirr", cirr, *model, "--split", "val"), capsys)
    assert error is None
    out = tmp_path / "out"
    val_files = [out / "cirr" / "cirr_val.json", out / "cirr" / "subset_cirr_val.json"]
    sub, subset = read_json(val_files[0]), read_json(val_files[1])
    caps = read_json(cirr / "cirr" / "captions" / "cap.rc2.val.json")
    assert (sub["version"], sub["metric"], subset["metric"]) == ("rc2", "recall", "recall_subset")
    assert set(sub) - {"version", "metric"} == {str(q["pairid"]) for q in caps}
    assert all(len(v) == 50 for k, v in sub.items() if k not in ("version", "metric"))
    assert all(len(v) == 3 for k, v in subset.items() if k not in ("version", "metric"))
    assert not (out / "cirr" / "cirr.json").exists()  # the test files keep their own names
    error, text = _test_py(["--dataset", "cirr", "--cirr-path", str(cirr), "--split", "val", "--validate",
                            *map(str, val_files)], capsys)
    assert error is None and text.count(": accepted") == 2 and "official split" not in text
    # against the test annotations (the generated ones reuse the pair ids) the dev- names are unknown
    error, text = _test_py(["--dataset", "cirr", "--cirr-path", str(cirr), "--validate", *map(str, val_files)], capsys)
    assert "note: cirr.json pair id 1000: unknown gallery names ['dev-" in text
    error, _ = _test_py(dataset_args(eval_args, "circo", circo, *model, "--split", "val"), capsys)
    assert error is None
    circo_val = out / "circo" / "circo_val.json"
    assert set(read_json(circo_val)) == {str(e["id"]) for e in read_json(circo / "annotations" / "val.json")}
    error, text = _test_py(["--dataset", "circo", "--circo-path", str(circo), "--split", "val", "--validate",
                            str(circo_val)], capsys)
    assert error is None and ": accepted" in text


def test_a_failed_write_leaves_every_file_as_it_was(fast_clip, eval_args, net_path, tmp_path, capsys, monkeypatch):
    from helpers import dataset_args, load_test_script, make_cirr

    test_script = load_test_script()
    root = make_cirr(tmp_path / "CIRR", np.random.default_rng(23), n_images=56, n_queries=4)
    folder = tmp_path / "out" / "cirr"
    folder.mkdir(parents=True)
    before = {name: f"another model's {name}".encode() for name in ("cirr.json", "subset_cirr.json")}
    for name, data in before.items():
        (folder / name).write_bytes(data)
    real, calls = test_script.write_temporary, []

    def second_fails(data, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(data, path)

    monkeypatch.setattr(test_script, "write_temporary", second_fails)
    error, _ = _test_py(dataset_args(eval_args, "cirr", root, "--model-path", str(net_path)), capsys)
    assert len(calls) == 2 and error is not None and "No space left on device" in error
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # unchanged, no temporary left behind
    monkeypatch.setattr(test_script, "write_temporary", real)
    error, _ = _test_py(dataset_args(eval_args, "cirr", root, "--model-path", str(net_path)), capsys)
    assert error is None and all((folder / name).read_bytes() != data for name, data in before.items())
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)


def test_json_nested_too_deep_is_one_line_naming_the_file(tmp_path, capsys):
    from helpers import make_cirr

    root = make_cirr(tmp_path / "CIRR", np.random.default_rng(24), n_images=56, n_queries=3)
    deep = tmp_path / "deep_cirr.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    error, text = _test_py(["--dataset", "cirr", "--cirr-path", str(root), "--validate", str(deep)], capsys)
    assert error is not None and len(error.splitlines()) == 1 and "Traceback" not in error + text
    assert "nested too deep" in error and str(deep) in error
    assert "deep_cirr.json: JSON nested too deep" in text


# ---------------------------------------------------------------------------------------------
# the owners' metric definitions applied to the val files

def _score_script():
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("score_server_file", REPO / "scripts" / "score_server_file.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_equals_the_owners_metrics_of_the_val_files(fast_clip, eval_args, net_path, tmp_path, capsys):
    """On the toy world, evaluate.py's val metrics equal what the owners' definitions give for test.py
    --split val's files: CIRCO mAP@K and Recall@K to 1e-4, CIRR R@K and Rs@K to 1e-3."""
    from evaluate import main as evaluate_main
    from helpers import dataset_args
    from toy.world import make_toy_world

    world = make_toy_world(tmp_path / "world", seed=4, num_train_images=4, num_queries=12, num_distractors=30)
    scorer = _score_script()
    model = ["--model-path", str(net_path)]
    out = tmp_path / "out"
    for dataset, tol in (("circo", 1e-4), ("cirr", 1e-3)):
        root = world / dataset.upper()
        want = evaluate_main(dataset_args(eval_args, dataset, root, *model))
        paths = load_test_script_main(dataset_args(eval_args, dataset, root, *model, "--split", "val"))
        assert [p.name for p in paths] == (["circo_val.json"] if dataset == "circo" else
                                           ["cirr_val.json", "subset_cirr_val.json"])
        got = scorer.main(["--dataset", dataset, f"--{dataset}-path", str(root), *map(str, paths)])
        keys = [k for k in want if not k.startswith("circo_map_at10_")]
        assert len(keys) == (8 if dataset == "circo" else 7)
        for k in keys:
            assert got[k] == pytest.approx(want[k], abs=tol), (dataset, k)
    # a file holding an id twice is refused, as the CIRCO server's code does
    sub = json.loads((out / "circo" / "circo_val.json").read_text())
    sub["0"][1] = sub["0"][0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(sub))
    with pytest.raises(SystemExit, match="query 0 lists an id twice"):
        scorer.main(["--dataset", "circo", "--circo-path", str(world / "CIRCO"), str(bad)])


def load_test_script_main(argv):
    from helpers import load_test_script

    return load_test_script().main(argv)


def test_scorer_on_hand_made_lists():
    """The owners' definitions on lists small enough to check by hand."""
    scorer = _score_script()
    annotations = [{"id": 0, "target_img_id": 7, "gt_img_ids": [7, 9], "semantic_aspects": ["negation"]},
                   {"id": 1, "target_img_id": 3, "gt_img_ids": [3, 4, 5, 6, 8, 10, 11], "semantic_aspects": []}]
    predictions = {"0": ["1", "9", "7", "2", "5"], "1": [3, 1, 2, 4, 9]}
    got = scorer.circo_scores(predictions, annotations, ranks=(1, 5))
    ap0_5 = (1 / 2 + 2 / 3) / 2          # ground truths at positions 2 and 3, of 2
    ap1_5 = (1 / 1 + 2 / 4) / 5          # at positions 1 and 4, of min(7, 5)
    assert got["circo_map_at5"] == pytest.approx(100 * (ap0_5 + ap1_5) / 2)
    assert got["circo_map_at1"] == pytest.approx(100 * (0 + 1) / 2)
    assert got["circo_recall_at1"] == pytest.approx(50.0) and got["circo_recall_at5"] == pytest.approx(100.0)
    assert got["circo_map_at10_negation"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    captions = [{"pairid": 5, "target_hard": "b"}, {"pairid": 6, "target_hard": "z"}]
    files = [{"version": "rc2", "metric": "recall", "5": ["a", "b", "c"], "6": ["c", "d", "z"]},
             {"version": "rc2", "metric": "recall_subset", "5": ["b", "a", "c"], "6": ["a", "z", "c"]}]
    got = scorer.cirr_scores(files, captions, ranks=(1, 2, 3), subset_ranks=(1, 2))
    assert (got["cirr_recall_at1"], got["cirr_recall_at2"], got["cirr_recall_at3"]) == (0.0, 50.0, 100.0)
    assert (got["cirr_group_recall_at1"], got["cirr_group_recall_at2"]) == (50.0, 100.0)
