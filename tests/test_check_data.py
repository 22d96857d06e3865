"""check_data.py / dataset_checks.py: a deleted image, a truncated PNG, a JPEG cut short and a wrong count
are found and reported (table, JSON report, exit status); the official counts are those of the real
annotation files; the fast existence check equals a stat per file."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

import dataset_checks as D
from check_data import main as check_main
from helpers import dump_json, make_circo, make_cirr, read_json
from toy.placeholders import make_placeholder_images, write_circo_image_info

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


def test_imagenet_ids_and_pairs(tmp_path, capsys):
    root = tmp_path / "ImageNet"
    make_placeholder_images(root, "imagenet", [1, 2, 100000])
    (root / "test" / "notes.txt").write_text("x")
    dump_json([{"img_id": f"{i:08d}", "subject": "a dog", "attribute": "on grass"} for i in (1, 2, 3)], root / "pairs.json")
    report, out, error = _run(["--imagenet-path", str(root), "--report", str(tmp_path / "r.json")], capsys)
    r = report["benchmarks"]["imagenet"]
    rows = {row["what"]: row for row in r["rows"]}
    assert rows["test images (ids 1-100,000)"]["missing"] == 100000 - 3
    assert rows["pairs.json entries"] == {"what": "pairs.json entries", "expected": None, "found": 3, "missing": 1,
                                          "unreadable": 0}
    assert "test/ILSVRC2012_test_00000003.JPEG" in r["missing"] and "notes.txt" in " ".join(r["notes"])
    assert error is not None and "image-net.org" in out


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
