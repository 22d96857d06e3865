"""evaluate.py / test.py beyond the authors' protocol: --skip-missing-images (the metrics of the data
without those entries, recorded as incomplete; test.py refuses a file that would miss queries),
--circo-query shared+relative (the template applied and recorded), the servers' limits and
test.py --validate (each kind of damaged file rejected, or noted where only a convention is broken)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metrics as M
from dataset_checks import metadata_only
from datasets import CIRCODataset
from evaluate import main as evaluate_main
from evaluation import retrieve
from helpers import KEYS, dataset_args, dump_json, eval_config, load_test_script, make_circo, make_cirr, read_json
from toy.placeholders import write_circo_image_info

test_script = load_test_script()

SPLIT = ("cirr", "image_splits")
CAPS = ("cirr", "captions")


def _uses(q: dict) -> set[str]:
    return {q["reference"], q.get("target_hard"), *q["img_set"]["members"]} - {None}


def _cirr_with_gaps(root, split: str, gone: list[str]):
    """Deletes the images of `gone` from a CIRR split; returns the queries that need none of them."""
    names = read_json(root.joinpath(*SPLIT, f"split.rc2.{split}.json"))
    for n in gone:
        (root / names[n]).unlink()
    return [q for q in read_json(root.joinpath(*CAPS, f"cap.rc2.{split}.json")) if not _uses(q) & set(gone)]


def test_skip_missing_images_equals_the_data_without_them(fast_clip, eval_args, net_path, tmp_path, capsys):
    root = make_cirr(tmp_path / "CIRR", np.random.default_rng(7))
    caps = read_json(root.joinpath(*CAPS, "cap.rc2.val.json"))
    names = list(read_json(root.joinpath(*SPLIT, "split.rc2.val.json")))
    unused = [n for n in names if all(n not in _uses(q) for q in caps)]
    gone = [caps[0]["reference"], caps[3]["target_hard"], unused[0]]
    kept = _cirr_with_gaps(root, "val", gone)
    # the same annotations written without those images and the queries that need them
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    split = read_json(clean.joinpath(*SPLIT, "split.rc2.val.json"))
    dump_json({n: v for n, v in split.items() if n not in gone}, clean.joinpath(*SPLIT, "split.rc2.val.json"))
    dump_json(kept, clean.joinpath(*CAPS, "cap.rc2.val.json"))

    model = ["--model-path", str(net_path)]
    with pytest.raises(SystemExit, match="not found"):  # the default stops at the first missing image
        evaluate_main(dataset_args(eval_args, "cirr", root, *model))
    capsys.readouterr()
    got = evaluate_main(dataset_args(eval_args, "cirr", root, *model, "--skip-missing-images"))
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "metrics_cirr.json").read_text())
    want = evaluate_main(dataset_args(eval_args, "cirr", clean, *model))
    assert list(want) == KEYS["cirr"] and list(got)[:len(KEYS["cirr"])] == KEYS["cirr"]
    assert {k: got[k] for k in KEYS["cirr"]} == want
    gap = got["incomplete_data"]
    assert gap["queries"] == len(caps) and gap["queries_left_out"] == len(caps) - len(kept) > 0
    assert (gap["gallery_images"], gap["gallery_images_left_out"]) == (len(names), 3)
    assert "not comparable" in gap["warning"] and gap["splits"]["cirr-val"]["queries_left_out"] == gap["queries_left_out"]
    assert written == got and "INCOMPLETE DATA" in out and f"left out {len(caps) - len(kept)} of {len(caps)} queries" in out


def test_test_py_refuses_a_file_that_would_miss_queries(fast_clip, eval_args, net_path, tmp_path, capsys):
    root = make_cirr(tmp_path / "CIRR", np.random.default_rng(8))
    caps = read_json(root.joinpath(*CAPS, "cap.rc2.test1.json"))
    names = list(read_json(root.joinpath(*SPLIT, "split.rc2.test1.json")))
    unused = [n for n in names if all(n not in _uses(q) for q in caps)]
    other = tmp_path / "other"
    shutil.copytree(root, other)
    argv = ["--model-path", str(net_path), "--skip-missing-images"]
    _cirr_with_gaps(root, "test1", [caps[2]["img_set"]["members"][1]])
    with pytest.raises(SystemExit) as e:
        test_script.main(dataset_args(eval_args, "cirr", root, *argv))
    assert "rejects a file without them" in str(e.value.code) and "check_data.py" in str(e.value.code)
    assert not (tmp_path / "out" / "cirr").exists()
    # only a gallery image nobody needs is missing: every query is there, with a warning
    _cirr_with_gaps(other, "test1", unused[:1])
    capsys.readouterr()
    paths = test_script.main(dataset_args(eval_args, "cirr", other, *argv))
    out = capsys.readouterr().out
    assert "not comparable" in out and out.count(" MB, the server takes up to 5 MB") == 2
    sub = json.loads(paths[0].read_text())
    assert set(sub) - {"version", "metric"} == {str(q["pairid"]) for q in caps}
    assert all(unused[0] not in v for k, v in sub.items() if k not in ("version", "metric"))


def test_circo_shared_relative_template(fast_clip, tiny_clip, eval_args, tmp_path):
    root = make_circo(tmp_path / "CIRCO", np.random.default_rng(9))
    raw = read_json(root / "annotations" / "val.json")
    ds = CIRCODataset(root, "val", "query", metadata_only, query_text="shared+relative")
    assert [ds.query_texts(q) for q in ds.queries] == [(f"{e['shared_concept']} that {e['relative_caption']}",) for e in raw]
    assert CIRCODataset(root, "val", "query", metadata_only).query_texts(ds.queries[0]) == (raw[0]["relative_caption"],)
    assert ds.query_texts({"relative_caption": "is red", "shared_concept": " a dog. "}) == ("a dog that is red",)
    with pytest.raises(ValueError, match="query_text"):
        CIRCODataset(root, "val", "query", metadata_only, query_text="shared")
    # through the pipeline: the text-only baseline's queries are CLIP's features of the template
    r = retrieve(None, tiny_clip, "circo", root, _circo_config("shared+relative"))
    with torch.no_grad():
        f = tiny_clip.encode_text(tiny_clip.tokenize([f"{e['shared_concept']} that {e['relative_caption']}" for e in raw]))
    torch.testing.assert_close(r.query_features, F.normalize(f, dim=-1), atol=1e-5, rtol=1e-5)
    # and recorded beside the unchanged metric keys, only when it is not the default
    m = evaluate_main(dataset_args(eval_args, "circo", root, "--baseline", "text-only", "--circo-query", "shared+relative"))
    assert list(m) == KEYS["circo"] + ["circo_query"] and m["circo_query"] == "shared+relative"
    assert list(evaluate_main(dataset_args(eval_args, "circo", root, "--baseline", "text-only"))) == KEYS["circo"]


def _circo_config(query: str):
    c = eval_config(baseline="text-only")
    c.circo_query = query
    return c


# ---------------------------------------------------------------------------------------------
# the servers' limits and the validator

def _cirr_files(root):
    """A valid cirr.json / subset_cirr.json for the test1 annotations under `root`, and the queries."""
    names = list(read_json(root.joinpath(*SPLIT, "split.rc2.test1.json")))
    caps = read_json(root.joinpath(*CAPS, "cap.rc2.test1.json"))
    sub, subset = {"version": "rc2", "metric": "recall"}, {"version": "rc2", "metric": "recall_subset"}
    for q in caps:
        sub[str(q["pairid"])] = [n for n in names if n != q["reference"]][:50]
        subset[str(q["pairid"])] = [m for m in q["img_set"]["members"] if m != q["reference"]][:3]
    return sub, subset, caps


def _damaged_cirr(sub, subset, caps):
    """{what the check says: (file name, content, whether the server rejects it)} of one damage each:
    rejections are what CIRR's server instructions state, notes the conventions its checks may or may not
    hold."""
    a, b = str(caps[0]["pairid"]), str(caps[1]["pairid"])
    out = {}

    def variant(reason, which, change, rejects=True):
        obj = json.loads(json.dumps(sub if which == "cirr.json" else subset))
        change(obj)
        out[reason] = (which, obj, rejects)

    variant("queries missing", "cirr.json", lambda o: o.pop(a))
    variant("49 entries, expected exactly 50", "cirr.json", lambda o: o[a].pop())
    variant("entries must be strings", "cirr.json", lambda o: o[a].__setitem__(0, 7))
    variant("without '.png'", "cirr.json", lambda o: o[a].__setitem__(0, o[a][0] + ".png"))
    variant("'version' must be 'rc2'", "cirr.json", lambda o: o.update(version="rc1"))
    variant("'metric' must be 'recall_subset'", "subset_cirr.json", lambda o: o.update(metric="recall_sub"))
    variant("keys that are not query ids", "cirr.json", lambda o: o.update({"999999": o[a]}), rejects=False)
    variant("repeated entries", "cirr.json", lambda o: o[a].__setitem__(1, o[a][0]), rejects=False)
    variant("unknown gallery names", "cirr.json", lambda o: o[a].__setitem__(0, "dev-0-0-img0-nowhere"), rejects=False)
    variant("holds the reference image", "cirr.json", lambda o: o[b].__setitem__(0, caps[1]["reference"]),
            rejects=False)
    variant("not members of the query's img_set", "subset_cirr.json",
            lambda o: o[a].__setitem__(0, next(n for n in sub[b] if n not in caps[0]["img_set"]["members"])),
            rejects=False)
    return out


def _validate(root, flag, files, capsys):
    """(error line or None, printed text) of test.py --validate."""
    error = None
    try:
        test_script.main(["--dataset", flag[2:-5], flag, str(root), "--validate", *map(str, files)])
    except SystemExit as e:
        error = str(e.code)
    return error, capsys.readouterr().out


def _check_validator_on_cirr(root, tmp_path, capsys, monkeypatch, damages=None):
    sub, subset, caps = _cirr_files(root)
    good = [tmp_path / "cirr.json", tmp_path / "subset_cirr.json"]
    dump_json(sub, good[0])
    dump_json(subset, good[1])
    error, out = _validate(root, "--cirr-path", good, capsys)
    assert error is None and out.count(": accepted") == 2
    damaged = _damaged_cirr(sub, subset, caps)
    for reason, (name, obj, rejects) in damaged.items() if damages is None else [(k, damaged[k]) for k in damages]:
        bad = tmp_path / "damaged" / name
        dump_json(obj, bad)
        error, out = _validate(root, "--cirr-path", [bad], capsys)
        line = next(x for x in out.splitlines() if reason in x)
        if rejects:
            assert error is not None and "would be rejected" in error and ": rejected" in out, reason
            assert "CIRR's server instructions" in line, line
        else:  # a note: the verdict stays "accepted"
            assert error is None and ": accepted" in out and line.strip().startswith("note: "), (reason, out)
            assert "the CIRR server's checks are not public" in line, line
    bad.write_text('{"version": "rc2", ')
    assert "not valid JSON" in _validate(root, "--cirr-path", [bad], capsys)[1]
    bad.write_text("[]")
    assert "must be a JSON object" in _validate(root, "--cirr-path", [bad], capsys)[1]
    monkeypatch.setitem(M.SERVER_MAX_BYTES, "cirr", good[0].stat().st_size - 1)
    error, out = _validate(root, "--cirr-path", good, capsys)
    assert error is not None and out.count("over the CIRR server's upload limit") == 1  # subset_cirr.json is smaller
    return good[0].stat().st_size


def test_validator_rejects_each_kind_of_damage(tmp_path, capsys, monkeypatch):
    root = make_cirr(tmp_path / "CIRR", np.random.default_rng(10), n_images=60, n_queries=6)
    _check_validator_on_cirr(root, tmp_path, capsys, monkeypatch)
    # CIRCO
    circo = make_circo(tmp_path / "CIRCO", np.random.default_rng(11), n_images=54, n_queries=5)
    info = read_json(circo / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    ids = [str(i["id"]) for i in info["images"]]
    queries = read_json(circo / "annotations" / "test.json")
    sub = {str(q["id"]): ids[:50] for q in queries}
    dump_json(sub, tmp_path / "circo.json")
    error, out = _validate(circo, "--circo-path", [tmp_path / "circo.json"], capsys)
    assert error is None and ": accepted" in out and "official split 800" in out
    for reason, change in {"queries missing": lambda o: o.pop("0"), "49 entries": lambda o: o["1"].pop(),
                           "repeated entries": lambda o: o["2"].__setitem__(3, o["2"][4]),
                           "integer ids or numeric strings": lambda o: o["2"].__setitem__(3, "COCO_12")}.items():
        obj = json.loads(json.dumps(sub))
        change(obj)
        dump_json(obj, tmp_path / "bad_circo.json")
        error, out = _validate(circo, "--circo-path", [tmp_path / "bad_circo.json"], capsys)
        assert error is not None and reason in out, reason
    obj = {k: [int(x) for x in v] for k, v in sub.items()}  # integer ids, as the owners' example file has them
    obj["1"][3] = 12  # not in the gallery: a note, not a rejection
    dump_json(obj, tmp_path / "int_circo.json")
    error, out = _validate(circo, "--circo-path", [tmp_path / "int_circo.json"], capsys)
    assert error is None and ": accepted" in out and "note: circo.json query id 1: unknown gallery names [12]" in out


def test_validate_names_a_missing_file_in_one_line(tmp_path, capsys):
    root = make_cirr(tmp_path / "CIRR", np.random.default_rng(10), n_images=60, n_queries=6)
    error, out = _validate(root, "--cirr-path", [tmp_path / "nope.json"], capsys)
    assert error == (f"error: --validate {tmp_path / 'nope.json'}: no such file; pass the files test.py wrote "
                     "(cirr.json and/or subset_cirr.json)")
    assert out == ""  # no size line, no verdict for a file that is not there


def test_validator_on_the_real_test_annotations(real_annotations, tmp_path, capsys, monkeypatch):
    """The real CIRR test1 annotations: a file of the real size fits the upload limit; damage is found."""
    shutil.copytree(real_annotations / "CIRR" / "cirr", tmp_path / "CIRR" / "cirr")  # the annotations alone
    limit = M.SERVER_MAX_BYTES["cirr"]
    size = _check_validator_on_cirr(tmp_path / "CIRR", tmp_path, capsys, monkeypatch,
                                    damages=["queries missing", "not members of the query's img_set"])
    assert 3_000_000 < size < limit
    # CIRCO test: 800 queries over a gallery list holding their references
    shutil.copytree(real_annotations / "CIRCO" / "annotations", tmp_path / "CIRCO" / "annotations")
    queries = read_json(tmp_path / "CIRCO" / "annotations" / "test.json")
    val = read_json(tmp_path / "CIRCO" / "annotations" / "val.json")
    used = sorted({int(e["reference_img_id"]) for e in queries} | {int(e["reference_img_id"]) for e in val}
                  | {int(g) for e in val for g in e["gt_img_ids"] if g != ""})
    write_circo_image_info(tmp_path / "CIRCO", used)  # no image folder: the annotation files alone
    sub = {str(q["id"]): [str(i) for i in used[:50]] for q in queries}
    dump_json(sub, tmp_path / "circo.json")
    error, out = _validate(tmp_path / "CIRCO", "--circo-path", [tmp_path / "circo.json"], capsys)
    assert len(sub) == 800 and error is None and "official split" not in out
    sub.pop("799")
    dump_json(sub, tmp_path / "circo.json")
    error, out = _validate(tmp_path / "CIRCO", "--circo-path", [tmp_path / "circo.json"], capsys)
    assert error is not None and "1 queries missing" in out
