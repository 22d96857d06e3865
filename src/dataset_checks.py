"""Checking the benchmark folders before a long run: the library behind check_data.py and behind
evaluate.py / test.py's `--skip-missing-images`.

- `files_present`: which of many files exist, from one listing per folder;
- `image_problem`: why one image does not open (None when it does): a header check (PIL open + verify,
  and a JPEG's end marker) or a full decode;
- `check_benchmark_root`: one benchmark's layout, every image any of its splits refers to, and the
  counts against the official release, as a `BenchmarkReport` (rows for a table, problems that say
  where the data comes from and which folder it belongs in, the full lists for the JSON report);
- `leave_out_missing`: a benchmark split without its missing gallery images and the queries that
  refer to a missing image (`LeftOut` counts what went).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image
from tqdm import tqdm

from datasets import (FASHIONIQ_CATEGORIES, AnnotationFormatError, CIRCODataset, CIRRDataset, DatasetLayoutError,
                      FashionIQDataset, ImageLoadError, imagenet_file_name)
from errors import UserError
from utils import show_progress

CHECKABLE = ("imagenet", "fashioniq", "cirr", "circo")
# the official releases (queries, gallery images) of the splits evaluate.py and test.py read
OFFICIAL_COUNTS = {
    "fashioniq": {("dress", "val"): (2017, 3817), ("shirt", "val"): (2038, 6346), ("toptee", "val"): (1961, 5373)},
    "cirr": {"val": (4181, 2297), "test1": (4148, 2315)},
    "circo": {"val": 220, "test": 800, "gallery": 123403},
    "imagenet": 100000,  # test ids 1 .. 100,000
}
# where each benchmark's files come from
SOURCES = {
    "imagenet": {"images": "the ILSVRC2012 test images (ILSVRC2012_img_test_v10102019.tar from image-net.org, "
                           "after registering)",
                 "annotations": "pairs.json is written by src/caption.py from the test images"},
    "fashioniq": {"images": "the FashionIQ product images (the FashionIQ repository, github.com/XiaoxiaoGuo/fashion-iq, "
                            "lists their URLs; many are gone, so a copy kept by other researchers is the usual source)",
                  "annotations": "captions/ and image_splits/ of the FashionIQ repository (github.com/XiaoxiaoGuo/fashion-iq)"},
    "cirr": {"images": "the NLVR2 images (github.com/lil-lab/nlvr, the nlvr2 image download), which CIRR keeps as "
                       "train/<n>/, dev/ and test1/",
             "annotations": "the cirr/ folder of the CIRR repository (github.com/Cuberick-Orion/CIRR)"},
    "circo": {"images": "the COCO 2017 unlabeled images (images.cocodataset.org/zips/unlabeled2017.zip)",
              "annotations": "annotations/ of the CIRCO repository (github.com/miccunifi/CIRCO); the gallery list "
                             "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json comes from "
                             "images.cocodataset.org/annotations/image_info_unlabeled2017.zip"},
}
OPTIONAL_SPLITS = {"fashioniq": ("train", "test"), "cirr": ("train",)}  # not read by evaluate.py / test.py
CHUNK = 256  # files per task of the thread pool
_SHOWN = 3  # examples named per problem


def metadata_only(image):
    """A dataset's `preprocess` when only its annotations are read (no image is ever loaded)."""
    return image


# ---------------------------------------------------------------------------------------------
# files

def _strings(paths) -> list[str]:
    strings = getattr(paths, "strings", None)  # datasets.FileList: no Path objects for CIRCO's 123,403 files
    return strings() if strings is not None else [os.fspath(p) for p in paths]


def files_present(paths: Sequence) -> list[bool]:
    """Whether each file exists, from one listing per folder rather than a stat per file."""
    listings: dict[str, set[str]] = {}
    out = []
    for s in _strings(paths):
        folder, name = os.path.split(s)
        names = listings.get(folder)
        if names is None:
            try:
                names = set(os.listdir(folder or "."))
            except OSError:
                names = set()
            listings[folder] = names
        out.append(name in names)
    return out


def _jpeg_complete(f) -> bool:
    """An open JPEG file ends with its end-of-image marker (trailing zero padding allowed)."""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 1024))
    return f.read().rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")


# the image modes the preprocessing takes as they are; any other (CMYK, P, I;16, ...) is converted to RGB on load
USUAL_MODES = ("RGB", "RGBA", "L")


def image_check(path: str, decode: bool = False) -> tuple[str | None, str | None]:
    """(why an image file does not open, or None when it does; its PIL mode, or None when it does not
    open). Header check (`decode=False`): PIL opens it and verifies it without decoding (a PNG's chunks and
    checksums; a JPEG's markers and its end marker, so a truncated file is caught); `decode=True`: every
    pixel is decoded."""
    try:
        with open(path, "rb") as f:
            with Image.open(f) as im:
                fmt, mode = im.format, im.mode
                if decode:
                    im.load()
                else:
                    im.verify()
            if not decode and fmt == "JPEG" and not _jpeg_complete(f):
                return "truncated (no JPEG end marker)", None
    except FileNotFoundError:
        return "missing", None
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file cannot be used
        return f"{type(e).__name__}: {e}", None
    return None, mode


def image_problem(path: str, decode: bool = False) -> str | None:
    """Why an image file does not open (`image_check`), or None when it does."""
    return image_check(path, decode)[0]


def image_problems(paths: Sequence[str], decode: bool = False, workers: int = 8, progress: bool = True,
                   desc: str = "images", odd_modes: dict[int, str] | None = None) -> dict[int, str]:
    """{index: reason} of the files in `paths` that do not open (`image_check`), checked by a thread
    pool (the files' reads overlap; PIL decodes with the GIL released) under a progress bar. `odd_modes`,
    when given, receives {index: mode} of the files that open in a mode outside USUAL_MODES."""
    chunks = [range(s, min(s + CHUNK, len(paths))) for s in range(0, len(paths), CHUNK)]

    def run(rows):
        checked = [(i, *image_check(paths[i], decode)) for i in rows]
        return ([(i, r) for i, r, _ in checked if r is not None],
                [(i, m) for i, r, m in checked if r is None and m not in USUAL_MODES])

    out: dict[int, str] = {}
    modes: dict[int, str] = {}
    with tqdm(total=len(paths), desc=desc, unit="file", disable=not show_progress(progress), leave=False) as bar:
        if workers <= 1:
            for rows in chunks:
                bad, odd = run(rows)
                out.update(bad)
                modes.update(odd)
                bar.update(len(rows))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(run, rows): len(rows) for rows in chunks}
                for done in as_completed(futures):
                    bad, odd = done.result()
                    out.update(bad)
                    modes.update(odd)
                    bar.update(futures[done])
    if odd_modes is not None:
        odd_modes.update(sorted(modes.items()))
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# what a query refers to

def referenced_names(query: dict) -> list[str]:
    """The gallery names a query needs besides its reference image: the target, CIRR's set members,
    CIRCO's ground truths (the keys the dataset classes give their queries)."""
    names = [query["target_name"]] if "target_name" in query else []
    return names + list(query.get("group_members", ())) + list(query.get("gt_img_ids", ()))


@dataclass
class LeftOut:
    """What `leave_out_missing` removed from one benchmark split."""

    label: str
    gallery_total: int
    gallery_names: list[str]  # gallery images whose file is missing
    queries_total: int
    query_rows: list[int]  # queries (rows of the full query list) that refer to a missing image

    def counts(self) -> dict:
        return {"gallery_images": self.gallery_total, "gallery_images_left_out": len(self.gallery_names),
                "queries": self.queries_total, "queries_left_out": len(self.query_rows)}

    def line(self) -> str:
        return (f"{self.label}: left out {len(self.query_rows)} of {self.queries_total} queries and "
                f"{len(self.gallery_names)} of {self.gallery_total} gallery images (missing files)")


def leave_out_missing(gallery, query):
    """(gallery, query, LeftOut): the datasets without the gallery images whose file is missing and
    without the queries whose reference, target, CIRR set member or CIRCO ground truth is missing."""
    gone = {n for n, ok in zip(gallery.names, files_present(gallery.gallery_paths)) if not ok}
    ref_ok = files_present(query.query_paths)
    drop = [i for i, q in enumerate(query.queries)
            if not ref_ok[i] or q["reference_name"] in gone or any(n in gone for n in referenced_names(q))]
    left = LeftOut(query.label, len(gallery.names), sorted(gone), len(query.queries), drop)
    if not gone and not drop:
        return gallery, query, left
    if len(gone) == len(gallery.names) or len(drop) == len(query.queries):
        raise ImageLoadError(f"{left.line()}: nothing is left to evaluate under {getattr(query, 'root', '')}; "
                             "python src/check_data.py lists what is missing and where it comes from")
    return gallery.without(gone, set()), query.without(gone, set(drop)), left


# ---------------------------------------------------------------------------------------------
# one benchmark root

@dataclass
class Section:
    """One row of the table: a split's queries (each with the image files it needs) or its images."""

    what: str
    expected: int | None
    queries: list[list[str]] | None = None  # per query, its image files
    images: list[str] | None = None
    unknown: int = 0  # queries naming an image their split does not list


@dataclass
class Row:
    what: str
    expected: int | None
    found: int  # queries in the annotation files / distinct images they list
    missing: int  # of those: images whose file is absent / queries needing such an image
    unreadable: int  # images that do not open / queries needing such an image

    @property
    def count_ok(self) -> bool:
        return self.expected is None or self.expected == self.found


@dataclass
class BenchmarkReport:
    benchmark: str
    root: str
    decode: bool
    rows: list[Row] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)  # {"kind": layout|count|missing|unreadable|annotation, "message"}
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # every missing file, relative to the root
    unreadable: dict[str, str] = field(default_factory=dict)  # file relative to the root -> reason
    other_modes: dict[str, str] = field(default_factory=dict)  # file -> mode outside USUAL_MODES (a note)

    def problem(self, kind: str, message: str) -> None:
        """Records a problem once: the same one found again (another split of the same folder) is not repeated."""
        entry = {"kind": kind, "message": message}
        if entry not in self.problems:
            self.problems.append(entry)

    def failed(self, ignore_counts: bool = False) -> list[dict]:
        return [p for p in self.problems if not (ignore_counts and p["kind"] == "count")]

    def to_dict(self, ignore_counts: bool = False) -> dict:
        d = asdict(self)
        d["ok"] = not self.failed(ignore_counts)
        return d


def _layout_problem(report: BenchmarkReport, error: Exception) -> None:
    """The error's first line as the problem; the expected layout and where the data comes from follow the
    benchmark's first layout problem only, so the same tree is not printed once per split."""
    head, _, layout = str(error).partition("\n")
    layout_found = [p["message"] for p in report.problems if p["kind"] == "layout"]
    if any(m.partition("\n")[0] == head for m in layout_found):
        return
    if layout_found:
        report.problem("layout", head)
        return
    s = SOURCES[report.benchmark]
    source = f"(annotations: {s['annotations']}; images: {s['images']})"
    report.problem("layout", "\n".join([head] + ([layout] if layout else []) + [source]))


def _split_sections(report, what, expected, gallery, query) -> list[Section]:
    """A split's query row and image row; `expected` = (queries, images) or None."""
    path_of = dict(zip(gallery.names, _strings(gallery.gallery_paths)))
    refs = _strings(query.query_paths)
    queries, unknown = [], 0
    for ref, q in zip(refs, query.queries):
        names = referenced_names(q)
        unknown += any(n not in path_of for n in names)
        queries.append([ref] + [path_of[n] for n in names if n in path_of])
    exp_q, exp_g = expected or (None, None)
    images = sorted(set(path_of.values()) | set(refs))
    return [Section(f"{what} queries", exp_q, queries=queries, unknown=unknown),
            Section(f"{what} gallery images", exp_g, images=images)]


def _fashioniq_sections(report: BenchmarkReport, root: Path) -> list[Section]:
    out = []
    for cat in FASHIONIQ_CATEGORIES:
        for split in ("train", "val", "test"):
            files = [root / "captions" / f"cap.{cat}.{split}.json", root / "image_splits" / f"split.{cat}.{split}.json"]
            if split in OPTIONAL_SPLITS["fashioniq"] and not any(f.is_file() for f in files):
                report.notes.append(f"{cat} {split}: no annotation files (not read by evaluate.py or test.py)")
                continue
            try:
                g = FashionIQDataset(root, split, [cat], "gallery", metadata_only)
                q = FashionIQDataset(root, split, [cat], "query", metadata_only)
            except (DatasetLayoutError, AnnotationFormatError) as e:
                _layout_problem(report, e)
                continue
            out += _split_sections(report, f"{cat} {split}", OFFICIAL_COUNTS["fashioniq"].get((cat, split)), g, q)
    return out


def _cirr_sections(report: BenchmarkReport, root: Path) -> list[Section]:
    out = []
    for split in ("train", "val", "test1"):
        if split in OPTIONAL_SPLITS["cirr"] and not (root / "cirr" / "captions" / f"cap.rc2.{split}.json").is_file():
            report.notes.append(f"{split}: no annotation files (not read by evaluate.py or test.py)")
            continue
        try:
            g = CIRRDataset(root, split, "gallery", metadata_only)
            q = CIRRDataset(root, split, "query", metadata_only)
        except (DatasetLayoutError, AnnotationFormatError) as e:
            _layout_problem(report, e)
            continue
        out += _split_sections(report, split, OFFICIAL_COUNTS["cirr"].get(split), g, q)
    return out


def _circo_sections(report: BenchmarkReport, root: Path) -> list[Section]:
    official = OFFICIAL_COUNTS["circo"]
    try:
        g = CIRCODataset(root, "val", "gallery", metadata_only)
    except (DatasetLayoutError, AnnotationFormatError) as e:
        _layout_problem(report, e)
        return []
    out = []
    for split in ("val", "test"):
        try:
            q = CIRCODataset(root, split, "query", metadata_only, gallery=g)
        except (DatasetLayoutError, AnnotationFormatError) as e:
            _layout_problem(report, e)
            continue
        out.append(_split_sections(report, split, (official[split], None), g, q)[0])
    out.append(Section("gallery images (val and test)", official["gallery"], images=_strings(g.gallery_paths)))
    return out


def _imagenet_sections(report: BenchmarkReport, root: Path) -> list[Section]:
    folder = root / "test"
    if not folder.is_dir():
        _layout_problem(report, DatasetLayoutError(f"ImageNet test image folder not found: {folder}"))
        return []
    n = OFFICIAL_COUNTS["imagenet"]
    expected = [imagenet_file_name(f"{i:08d}") for i in range(1, n + 1)]
    other = sorted(set(os.listdir(folder)) - set(expected))
    if other:
        report.notes.append(f"test/ holds {len(other)} other files, e.g. {other[:_SHOWN]}")
    pairs = root / "pairs.json"
    if pairs.is_file():
        # training reads the images the pairs name, so those are checked, not all 100,000 (a subset passes)
        try:
            entries = json.loads(pairs.read_text(encoding="utf-8"))
            ids = [str(e["img_id"]) for e in entries]
        except (ValueError, TypeError, KeyError) as e:
            report.problem("annotation", f"{pairs}: not a pairs file ({type(e).__name__}: {e}); rerun src/caption.py")
            return []
        report.notes.append(f"pairs.json names {len(set(ids)):,} of the {n:,} test images; those are checked")
        return [Section("pairs.json entries", None, queries=[[os.path.join(folder, imagenet_file_name(i))] for i in ids])]
    report.notes.append(f"no {pairs} yet (src/caption.py writes it from the test images; train.py needs it)")
    return [Section("test images (ids 1-100,000)", n, images=[os.path.join(folder, f) for f in expected])]


_SECTIONS = {"fashioniq": _fashioniq_sections, "cirr": _cirr_sections, "circo": _circo_sections,
             "imagenet": _imagenet_sections}


def _by_folder(root: Path, files: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in files:
        out.setdefault(os.path.dirname(f), []).append(os.path.basename(f))
    return out


def _images(n: int) -> str:
    return f"{n:,} image{'s' if n != 1 else ''}"


def _relative(root: Path, path: str) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def check_benchmark_root(benchmark: str, root, decode: bool = False, workers: int = 8,
                         progress: bool = True) -> BenchmarkReport:
    """One benchmark's layout, images and counts (module docstring). Nothing is raised for what is
    wrong with the data: it is all in the report."""
    if benchmark not in CHECKABLE:
        raise UserError(f"unknown benchmark {benchmark!r}; choose one of {CHECKABLE}")
    root = Path(root)
    report = BenchmarkReport(benchmark, str(root), decode)
    if not root.is_dir():
        s = SOURCES[benchmark]
        report.problem("layout", f"{benchmark} root {root} not found (annotations: {s['annotations']}; images: "
                                 f"{s['images']}); the README's data section shows the layout")
        return report
    sections = _SECTIONS[benchmark](report, root)
    files = sorted({f for s in sections for f in (s.images or [f for q in s.queries for f in q])})
    present = dict(zip(files, files_present(files)))
    there = [f for f in files if present[f]]
    odd: dict[int, str] = {}
    bad = {there[i]: r for i, r in image_problems(there, decode, workers, progress, f"{benchmark} images", odd).items()}
    report.other_modes = {_relative(root, there[i]): m for i, m in odd.items()}
    if odd:
        by_mode = {}
        for m in odd.values():
            by_mode[m] = by_mode.get(m, 0) + 1
        shown = ", ".join(f"{Path(there[i]).name} ({m})" for i, m in list(odd.items())[:_SHOWN])
        report.notes.append(f"{_images(len(odd))} not RGB, RGBA or L "
                            f"({', '.join(f'{m}: {c:,}' for m, c in sorted(by_mode.items()))}), converted to RGB on "
                            f"load: e.g. {shown}")
    for s in sections:
        if s.images is not None:
            report.rows.append(Row(s.what, s.expected, len(s.images), sum(not present[f] for f in s.images),
                                   sum(f in bad for f in s.images)))
        else:
            report.rows.append(Row(s.what, s.expected, len(s.queries), sum(not all(present[f] for f in q) for q in s.queries),
                                   sum(any(f in bad for f in q) for q in s.queries)))
            if s.unknown:
                report.problem("annotation", f"{s.what}: {s.unknown} queries name images their split file does not "
                                             f"list; the annotation files do not belong together "
                                             f"({SOURCES[benchmark]['annotations']})")
    differ = [f"{r.what} {r.found:,} (official {r.expected:,})" for r in report.rows if not r.count_ok]
    if differ:
        report.problem("count", f"counts differ from the official release: {'; '.join(differ)} "
                                f"(annotations: {SOURCES[benchmark]['annotations']})")
    missing = [f for f in files if not present[f]]
    report.missing = [_relative(root, f) for f in missing]
    report.unreadable = {_relative(root, f): r for f, r in bad.items()}
    for folder, names in _by_folder(root, missing).items():
        report.problem("missing", f"{_images(len(names))} missing from {folder}/ (e.g. {', '.join(names[:_SHOWN])}): "
                                  f"{SOURCES[benchmark]['images']}; the files belong in {folder}/")
    for folder, names in _by_folder(root, list(bad)).items():
        first = os.path.join(folder, names[0])
        report.problem("unreadable", f"{_images(len(names))} in {folder}/ cannot be read (e.g. {names[0]}: {bad[first]}): "
                                     f"download again from {SOURCES[benchmark]['images']}")
    return report


def format_report(report: BenchmarkReport, ignore_counts: bool = False) -> str:
    """The table (and problems, notes) of one benchmark, for the terminal. `ignore_counts`: a count that
    differs from the official release is a note, left out of the tally, as `failed` leaves it out."""
    lines = [f"{report.benchmark} ({report.root}){', full decode' if report.decode else ''}"]
    if report.rows:
        width = max(len(r.what) for r in report.rows)
        lines.append(f"  {'':<{width}}  {'expected':>9}  {'found':>9}  {'missing':>9}  {'unreadable':>10}")
        for r in report.rows:
            exp = "-" if r.expected is None else f"{r.expected:,}"
            flag = "" if r.count_ok else "  <- count differs"
            lines.append(f"  {r.what:<{width}}  {exp:>9}  {r.found:>9,}  {r.missing:>9,}  {r.unreadable:>10,}{flag}")
    failed = report.failed(ignore_counts)
    lines += [f"  {'problem' if p in failed else 'note'} ({p['kind']}): " + p["message"].replace("\n", "\n    ")
              for p in report.problems]
    lines += [f"  note: {n}" for n in report.notes]
    lines.append("  OK" if not failed else f"  {len(failed)} problem(s)")
    return "\n".join(lines)
