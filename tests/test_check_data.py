"""check_data.py / dataset_checks.py: a deleted image, a truncated PNG, a JPEG cut short and a wrong count
are found and reported (table, JSON report, exit status); the official counts are those of the real
annotation files; the fast existence check equals a stat per file."""
from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import check_data
import dataset_checks as D
from check_data import main as check_main
from helpers import dump_json, make_circo, make_cirr, read_json
from toy.placeholders import make_placeholder_images, write_circo_image_info
from toy.world import make_toy_world

CAPS = ("cirr", "captions")


def _run(argv, capsys):
    """(report dict, printed text, error line or None) of one check_data.py run."""
    error = None
    try:
        check_main(argv + ["--no-progress"])
    except SystemExit as e:
        error = str(e.code)
    out = capsys.readouterr().out
    report = json.loads(open(argv[argv.index("--report") + 1]).read())
    return report, out, error


def _cirr_uses(q: dict) -> set[str]:
    return {q["reference"], q.get("target_hard"), *q["img_set"]["members"]} - {None}


def test_files_present_equals_a_stat_per_file(tmp_path):
    (tmp_path / "a").mkdir()
    files = [tmp_path / "a" / f"{i}.png" for i in range(6)]
    for f in files[::2]:
        f.write_bytes(b"x")
    paths = files + [tmp_path / "nowhere" / "x.png", tmp_path / "a"]
    assert D.files_present(paths) == [os.path.exists(p) for p in paths]
    assert D.files_present([str(p) for p in paths]) == [os.path.exists(p) for p in paths]


def test_finds_deleted_truncated_and_miscounted(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(4)
    cirr, circo = make_cirr(tmp_path / "CIRR", rng), make_circo(tmp_path / "CIRCO", rng)
    split = read_json(cirr / "cirr" / "image_splits" / "split.rc2.val.json")
    caps = read_json(cirr.joinpath(*CAPS, "cap.rc2.val.json"))
    deleted = caps[0]["reference"]
    truncated = next(n for n in split if n != deleted)
    (cirr / split[deleted]).unlink()
    png = cirr / split[truncated]
    png.write_bytes(png.read_bytes()[:-40])  # the end of the PNG is gone: verify fails, open alone would not
    folder = circo / "COCO2017_unlabeled" / "unlabeled2017"
    jpg = sorted(folder.iterdir())[5]
    jpg.write_bytes(jpg.read_bytes()[:-60])  # scan data cut short: only the end marker tells
    # official counts equal to the generated layout, then one test1 query removed: exactly one count differs
    monkeypatch.setitem(D.OFFICIAL_COUNTS, "cirr", {"val": (12, 60), "test1": (12, 60)})
    test1 = cirr.joinpath(*CAPS, "cap.rc2.test1.json")
    dump_json(read_json(test1)[1:], test1)

    report, out, error = _run(["--cirr-path", str(cirr), "--circo-path", str(circo), "--report",
                               str(tmp_path / "report.json")], capsys)
    assert error.startswith("error: ") and "cirr" in error and "report.json" in error
    r = report["benchmarks"]["cirr"]
    assert not report["ok"] and r["missing"] == [f"dev/{deleted}.png"]
    assert list(r["unreadable"]) == [f"dev/{truncated}.png"]
    rows = {row["what"]: row for row in r["rows"]}
    assert rows["val gallery images"] == {"what": "val gallery images", "expected": 60, "found": 60, "missing": 1,
                                          "unreadable": 1}
    assert rows["val queries"]["missing"] == sum(deleted in _cirr_uses(q) for q in caps) > 0
    assert rows["val queries"]["unreadable"] == sum(truncated in _cirr_uses(q) for q in caps)
    assert rows["test1 queries"]["found"] == 11 and rows["test1 gallery images"]["missing"] == 0
    kinds = [p["kind"] for p in r["problems"]]
    assert sorted(kinds) == ["count", "missing", "unreadable"]
    count = next(p["message"] for p in r["problems"] if p["kind"] == "count")
    assert "test1 queries 11 (official 12)" in count and "val" not in count.split("(annotations")[0]
    missing = next(p["message"] for p in r["problems"] if p["kind"] == "missing")
    assert f"{cirr / 'dev'}/" in missing and "NLVR2" in missing and deleted in missing
    assert out.count("<- count differs") == 1 + 3  # CIRR test1 queries; CIRCO's generated counts (not patched)
    c = report["benchmarks"]["circo"]
    assert c["missing"] == [] and list(c["unreadable"]) == [f"COCO2017_unlabeled/unlabeled2017/{jpg.name}"]
    assert "end marker" in c["unreadable"][f"COCO2017_unlabeled/unlabeled2017/{jpg.name}"]
    assert "cocodataset.org" in next(p["message"] for p in c["problems"] if p["kind"] == "unreadable")

    # a full decode finds the same files
    report, _, _ = _run(["--cirr-path", str(cirr), "--circo-path", str(circo), "--decode", "--workers", "1",
                         "--report", str(tmp_path / "decoded.json")], capsys)
    assert list(report["benchmarks"]["cirr"]["unreadable"]) == [f"dev/{truncated}.png"]
    assert list(report["benchmarks"]["circo"]["unreadable"]) == [f"COCO2017_unlabeled/unlabeled2017/{jpg.name}"]


def test_clean_data_and_ignored_counts_pass(tmp_path, capsys):
    rng = np.random.default_rng(5)
    cirr = make_cirr(tmp_path / "CIRR", rng)
    argv = ["--cirr-path", str(cirr), "--report", str(tmp_path / "r.json")]
    report, out, error = _run(argv, capsys)
    assert error is not None and [p["kind"] for p in report["benchmarks"]["cirr"]["problems"]] == ["count"]
    report, out, error = _run(argv + ["--ignore-counts"], capsys)
    assert error is None and report["ok"] and "count differs" in out
    # the differing counts are a note, out of the tally: the printed count is the one the exit status gives
    assert "note (count): counts differ" in out and "problem" not in out and out.rstrip().splitlines()[-3] == "  OK"
    assert report["benchmarks"]["cirr"]["ok"]
    split = read_json(cirr / "cirr" / "image_splits" / "split.rc2.val.json")
    png = cirr / split[sorted(split)[0]]
    png.write_bytes(png.read_bytes()[:-40])
    report, out, error = _run(argv + ["--ignore-counts"], capsys)
    assert "  1 problem(s)" in out and "note (count)" in out and "problem (unreadable)" in out
    assert error.startswith("error: 1 problem(s) in cirr") and not report["ok"]


def test_the_report_path_is_checked_before_the_data(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(5)
    cirr = make_cirr(tmp_path / "CIRR", rng)
    checked = []
    real_check = check_data.check_benchmark_root
    monkeypatch.setattr(check_data, "check_benchmark_root", lambda *a: checked.append(1) or real_check(*a))
    (tmp_path / "a-file").write_text("x")
    for report, why in ((tmp_path, "is a folder"), (tmp_path / "a-file" / "r.json", "cannot create or write")):
        with pytest.raises(SystemExit) as e:
            check_main(["--cirr-path", str(cirr), "--report", str(report), "--no-progress"])
        message = str(e.value)
        assert message.startswith(f"error: --report {report}: ") and why in message and "\n" not in message
        assert "pass --report a file path in a folder you can write to" in message and ".tmp" not in message
    assert not checked and capsys.readouterr().out == ""
    # a write that fails at the end (a full disk) names the flag and the path, not a temporary file

    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", f"{path}.host.1.tmp")

    monkeypatch.setattr(check_data, "atomic_write_json", full_disk)
    report = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        check_main(["--cirr-path", str(cirr), "--report", str(report), "--no-progress", "--ignore-counts"])
    assert str(e.value) == (f"error: --report {report}: cannot write it (No space left on device); free disk space "
                            "there or pass --report a file path in a folder you can write to")
    assert checked


def test_imagenet_ids_and_pairs(tmp_path, capsys):
    root = tmp_path / "ImageNet"
    make_placeholder_images(root, "imagenet", [1, 2, 100000])
    (root / "test" / "notes.txt").write_text("x")
    # no pairs file: all 100,000 test images are checked
    report, out, error = _run(["--imagenet-path", str(root), "--report", str(tmp_path / "r0.json")], capsys)
    rows = {row["what"]: row for row in report["benchmarks"]["imagenet"]["rows"]}
    assert rows == {"test images (ids 1-100,000)": {"what": "test images (ids 1-100,000)", "expected": 100000,
                                                    "found": 100000, "missing": 100000 - 3, "unreadable": 0}}
    assert error is not None and "image-net.org" in out
    # a pairs file: the images it names, and only those
    dump_json([{"img_id": f"{i:08d}", "subject": "a dog", "attribute": "on grass"} for i in (1, 2, 3)], root / "pairs.json")
    report, out, error = _run(["--imagenet-path", str(root), "--report", str(tmp_path / "r.json")], capsys)
    r = report["benchmarks"]["imagenet"]
    assert r["rows"] == [{"what": "pairs.json entries", "expected": None, "found": 3, "missing": 1, "unreadable": 0}]
    assert r["missing"] == ["test/ILSVRC2012_test_00000003.JPEG"] and "notes.txt" in " ".join(r["notes"])
    assert error is not None and "image-net.org" in out
    dump_json([{"img_id": f"{i:08d}", "subject": "a dog", "attribute": "on grass"} for i in (1, 100000)],
              root / "pairs.json")
    report, out, error = _run(["--imagenet-path", str(root), "--report", str(tmp_path / "r2.json")], capsys)
    assert error is None and report["ok"] and "pairs.json names 2 of the 100,000 test images" in out


def test_the_demo_world_and_a_subset_pass_with_ignored_counts(tmp_path, capsys):
    world = make_toy_world(tmp_path / "world", seed=2, num_train_images=6, num_queries=4, num_distractors=2)
    argv = [x for b, flag in (("ImageNet", "--imagenet-path"), ("FashionIQ", "--fashioniq-path"), ("CIRR", "--cirr-path"),
                              ("CIRCO", "--circo-path")) for x in (flag, str(world / b))]
    report, out, error = _run(argv + ["--report", str(tmp_path / "r.json")], capsys)
    assert error is not None and {p["kind"] for r in report["benchmarks"].values() for p in r["problems"]} == {"count"}
    report, out, error = _run(argv + ["--ignore-counts", "--report", str(tmp_path / "r.json")], capsys)
    assert error is None and report["ok"], out
    # a subset: half the pairs, one CIRR val query, its images only
    pairs = read_json(world / "ImageNet" / "pairs.json")
    dump_json(pairs[::2], world / "ImageNet" / "pairs.json")
    caps = world.joinpath("CIRR", *CAPS, "cap.rc2.val.json")
    dump_json(read_json(caps)[:1], caps)
    report, out, error = _run(argv + ["--ignore-counts", "--report", str(tmp_path / "r2.json")], capsys)
    assert error is None and report["ok"], out
    rows = {row["what"]: row for row in report["benchmarks"]["cirr"]["rows"]}
    assert rows["val queries"]["found"] == 1 and report["benchmarks"]["imagenet"]["rows"][0]["found"] == len(pairs[::2])


def test_annotations_only_fashioniq_reports_each_problem_once(tmp_path, capsys):
    root = tmp_path / "FashionIQ"
    for sub in ("captions", "image_splits"):
        (root / sub).mkdir(parents=True)
    for cat in ("dress", "shirt", "toptee"):
        for split in ("train", "val", "test"):
            dump_json(["a", "b"], root / "image_splits" / f"split.{cat}.{split}.json")
            dump_json([{"candidate": "a", "target": "b", "captions": ["x", "y"]}], root / "captions" / f"cap.{cat}.{split}.json")
    report, out, error = _run(["--fashioniq-path", str(root), "--report", str(tmp_path / "r.json")], capsys)
    messages = [p["message"] for p in report["benchmarks"]["fashioniq"]["problems"]]
    assert len(messages) == 3 and len({m.splitlines()[0] for m in messages}) == 3  # one per missing folder
    assert all(f"{root / cat}" in m for cat, m in zip(("dress", "shirt", "toptee"), messages))
    assert out.count("Expected layout") == 1 and error is not None


def test_images_in_other_modes_are_a_note_with_a_count_and_names(tmp_path, capsys):
    rng = np.random.default_rng(6)
    cirr = make_cirr(tmp_path / "CIRR", rng)
    split = read_json(cirr / "cirr" / "image_splits" / "split.rc2.val.json")
    names = sorted(split)[:3]
    Image.new("RGB", (20, 16), (200, 10, 10)).convert("P").save(cirr / split[names[0]])
    Image.new("RGB", (20, 16), (10, 200, 10)).convert("P").save(cirr / split[names[1]])
    Image.new("L", (20, 16), 7).save(cirr / split[names[2]])  # L is taken as it is: not counted
    report, out, error = _run(["--cirr-path", str(cirr), "--ignore-counts", "--report", str(tmp_path / "r.json")], capsys)
    r = report["benchmarks"]["cirr"]
    assert error is None and r["other_modes"] == {f"dev/{names[0]}.png": "P", f"dev/{names[1]}.png": "P"}
    note = next(n for n in r["notes"] if "converted to RGB" in n)
    assert "2 images not RGB, RGBA or L (P: 2)" in note and f"{names[0]}.png (P)" in note


def test_official_counts_match_the_real_annotations(real_annotations, tmp_path, capsys):
    """The real annotation files (val/test), placeholder images for CIRR val: the counts agree with
    OFFICIAL_COUNTS, and every image without a file is reported missing."""
    for rel in ("FashionIQ/captions", "FashionIQ/image_splits"):
        (tmp_path / rel).mkdir(parents=True)
        for f in (real_annotations / rel).glob("*.val.json"):
            shutil.copy(f, tmp_path / rel / f.name)
    for cat in ("dress", "shirt", "toptee"):
        (tmp_path / "FashionIQ" / cat).mkdir()
    shutil.copytree(real_annotations / "CIRR" / "cirr", tmp_path / "CIRR" / "cirr")
    (tmp_path / "CIRR" / "test1").mkdir()
    names = read_json(tmp_path / "CIRR" / "cirr" / "image_splits" / "split.rc2.val.json")
    make_placeholder_images(tmp_path / "CIRR", "cirr", list(names.values()), size=(8, 8))
    shutil.copytree(real_annotations / "CIRCO" / "annotations", tmp_path / "CIRCO" / "annotations")
    used = {int(i) for s in ("val", "test") for e in read_json(tmp_path / "CIRCO" / "annotations" / f"{s}.json")
            for i in [e["reference_img_id"], *e.get("gt_img_ids", [])] if i != ""}
    extra = iter(i for i in range(1, 10**7) if i not in used)
    write_circo_image_info(tmp_path / "CIRCO", sorted(used) + [next(extra) for _ in range(123403 - len(used))])
    (tmp_path / "CIRCO" / "COCO2017_unlabeled" / "unlabeled2017").mkdir()
    argv = [f"--{b}-path" for b in ("fashioniq", "cirr", "circo")]
    argv = [x for b, flag in zip(("FashionIQ", "CIRR", "CIRCO"), argv) for x in (flag, str(tmp_path / b))]
    report, out, error = _run(argv + ["--report", str(tmp_path / "r.json")], capsys)
    for name, r in report["benchmarks"].items():
        assert "count" not in [p["kind"] for p in r["problems"]], (name, r["problems"])
        for row in r["rows"]:
            assert row["expected"] is None or row["found"] == row["expected"], row
    rows = {row["what"]: row for row in report["benchmarks"]["cirr"]["rows"]}
    assert rows["val gallery images"]["missing"] == 0 and rows["val queries"]["missing"] == 0
    assert rows["test1 gallery images"]["missing"] == 2315
    fiq = {row["what"]: row for row in report["benchmarks"]["fashioniq"]["rows"]}
    assert fiq["shirt val gallery images"]["missing"] == 6346 and fiq["shirt val queries"]["missing"] == 2038
    assert report["benchmarks"]["circo"]["rows"][-1]["missing"] == 123403
