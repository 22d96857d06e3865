"""Checks the benchmark folders: layout, every image the annotation files refer to, official counts.

    python src/check_data.py                                   # the four default roots under ./data/
    python src/check_data.py --cirr-path /data/CIRR --decode   # one root, every image fully decoded

Prints a table per benchmark (expected, found, missing, unreadable) with each problem, where its data
comes from and which folder it belongs in; writes every missing and unreadable file to the JSON
report (`--report`); exits with status 1 when anything is wrong. The checks are `dataset_checks`'s.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cli import FlagParser, add_root_args, script_main
from dataset_checks import CHECKABLE, check_benchmark_root, format_report
from datasets import DEFAULT_ROOTS
from errors import ConfigError, UserError
from logs import get_logger
from utils import atomic_write_json, check_output_folder

log = get_logger("check_data")
DEFAULT_REPORT = "./results/check_data.json"


class DataCheckFailed(UserError):
    """The data has problems; the tables above and the JSON report list them."""


def build_parser() -> FlagParser:
    parser = FlagParser(description="Check the benchmark folders: layout, images, official counts. With no root "
                                    "flag, the four default roots are checked; with some, only those.")
    add_root_args(parser, CHECKABLE, defaults={})
    parser.add_argument("--decode", action="store_true",
                        help="decode every image fully (slower) instead of the header check (PIL open + verify, "
                             "and a JPEG's end marker)")
    parser.add_argument("--workers", type=int, default=min(16, 4 * (os.cpu_count() or 1)),
                        help="threads reading the images")
    parser.add_argument("--report", default=DEFAULT_REPORT,
                        help="JSON report: per benchmark the table, the problems and every missing and unreadable file")
    parser.add_argument("--ignore-counts", action="store_true",
                        help="counts that differ from the official release (toy data, subsets) are shown but do not "
                             "make the exit status non-zero")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


REPORT_FIX = "pass --report a file path in a folder you can write to"


def check_report_path(report) -> None:
    """--report is written after every image is read: a path it cannot be written to is named first."""
    path = Path(report)
    if path.is_dir():
        raise ConfigError(f"--report {report}: is a folder; {REPORT_FIX}, such as {path / 'check_data.json'}")
    check_output_folder(path.parent, f"--report {report}: its folder", REPORT_FIX)


def write_report(out: dict, report) -> None:
    try:
        atomic_write_json(out, report)
    except OSError as e:  # a temporary file's name would not tell which flag to change
        raise ConfigError(f"--report {report}: cannot write it ({e.strerror or e}); free disk space there or "
                          f"{REPORT_FIX}") from None


@script_main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise UserError("--workers must be >= 1")
    check_report_path(args.report)
    given = {b: getattr(args, f"{b}_path") for b in CHECKABLE if getattr(args, f"{b}_path") is not None}
    roots = given or dict(DEFAULT_ROOTS)
    reports = {}
    for benchmark, root in roots.items():
        t = time.perf_counter()
        report = check_benchmark_root(benchmark, root, args.decode, args.workers, not args.no_progress)
        reports[benchmark] = report
        print(f"\n{format_report(report, args.ignore_counts)}\n  ({time.perf_counter() - t:.1f} s)", flush=True)
    failed = {b: r.failed(args.ignore_counts) for b, r in reports.items()}
    out = {"ok": not any(failed.values()), "decode": args.decode, "ignore_counts": args.ignore_counts,
           "benchmarks": {b: r.to_dict(args.ignore_counts) for b, r in reports.items()}}
    write_report(out, args.report)
    log.info(f"wrote {args.report}")
    bad = {b: len(p) for b, p in failed.items() if p}
    if bad:
        raise DataCheckFailed(f"{sum(bad.values())} problem(s) in {', '.join(bad)}, listed above; every missing and "
                              f"unreadable file is in {args.report}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
