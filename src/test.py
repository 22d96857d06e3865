"""Test-server submission files of FTI4CIR (METHOD §12).

    python src/test.py --dataset cirr --cirr-path ./data/CIRR --model-path model_save/checkpoints/epoch_60.pt

CIRR (test1): `<save-path>/cirr/cirr.json` and `<save-path>/cirr/subset_cirr.json`; CIRCO (test):
`<save-path>/circo/circo.json`. FashionIQ has no test server: `--dataset fashioniq` writes the
validation metrics, as the authors' script does. The same flags as evaluate.py. Before anything is
written, the files are checked for what a server would reject (lists, the upload limit); each file is
written atomically and its size printed. A CIRR gallery of fewer than 51 images (toy data) gives
shorter lists, as the authors' code does, with a warning that a server would reject them.

    python src/test.py --dataset cirr --validate results/cirr/cirr.json results/cirr/subset_cirr.json

checks existing files against the test annotations the same way, without a model.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cli import FlagParser, add_eval_args, dataset_root, eval_config_from_args, script_main
from evaluate import setup, write_validation_metrics
from evaluation import TEST_SPLITS, check_submission_files, retrieve, submission_bytes, submission_files
from logs import get_logger
from metrics import SERVER_MAX_BYTES, SubmissionError, query_count_note
from utils import atomic_write_bytes

log = get_logger("test")


def build_parser() -> FlagParser:
    parser = FlagParser(description="Test-server submission files of FTI4CIR (CIRR test1, CIRCO test).")
    add_eval_args(parser, datasets=("cirr", "circo", "fashioniq"))
    parser.add_argument("--validate", nargs="+", default=None, metavar="FILE",
                        help="instead of computing: check existing server files (CIRR: cirr.json and/or subset_cirr.json; "
                             "CIRCO: circo.json) against the test annotations and the server's limits, without a model")
    return parser


def size_text(name: str, n_bytes: int) -> str:
    limit = SERVER_MAX_BYTES.get(name)
    return f"{n_bytes / 1e6:.2f} MB" + (f", the server takes up to {limit / 1e6:.0f} MB" if limit else "")


def write_submission(args, clip, net, device) -> list[Path]:
    """Computes, validates and writes the submission files of args.dataset; returns their paths."""
    split = TEST_SPLITS[args.dataset]
    config = eval_config_from_args(args, device, split=split)
    r = retrieve(net, clip, args.dataset, dataset_root(args, args.dataset), config)
    # every file validated (lists, upload limit) before the first is written
    files = submission_bytes(args.dataset, submission_files(args.dataset, r))
    note = query_count_note(args.dataset, len(r.queries))
    if note:
        log.warning(note)
    if args.dataset == "circo" and args.circo_query != "relative":
        log.warning(f"queries built with --circo-query {args.circo_query}, not the authors' relative captions")
    out_dir = Path(args.save_path) / args.dataset
    paths = []
    for name, data in files.items():
        path = out_dir / name
        atomic_write_bytes(data, path)
        log.info(f"wrote {path} ({size_text(args.dataset, len(data))})")
        paths.append(path)
    log.info(f"{args.dataset} {split}: {len(r.queries)} queries, submission files in {out_dir}")
    return paths


def validate_files(args) -> list:
    """--validate: what the server would reject in each file, printed; SubmissionError when anything."""
    if args.dataset not in TEST_SPLITS:
        raise SubmissionError(f"--validate: {args.dataset} has no test server; pass --dataset cirr or circo")
    checks = check_submission_files(args.dataset, dataset_root(args, args.dataset), args.validate)
    for c in checks:
        verdict = "accepted" if not c.problems else f"rejected: {len(c.problems)} problem(s)"
        print(f"{c.path} ({size_text(args.dataset, c.size)}): {verdict}", flush=True)
        for line in c.problems[:20]:
            print(f"  {line}")
        if len(c.problems) > 20:
            print(f"  ... and {len(c.problems) - 20} more")
        for line in c.warnings[:20]:  # conventions: they do not change the verdict
            print(f"  note: {line}")
        if len(c.warnings) > 20:
            print(f"  note: ... and {len(c.warnings) - 20} more")
    bad = [c for c in checks if c.problems]
    if bad:
        raise SubmissionError(f"{len(bad)} of {len(checks)} file(s) would be rejected: {', '.join(str(c.path) for c in bad)}")
    return checks


@script_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.validate:
        return validate_files(args)
    device, clip, net = setup(args)  # evaluate.py's: the same flags
    if args.dataset == "fashioniq":
        return write_validation_metrics(args, clip, net, device)
    return write_submission(args, clip, net, device)


if __name__ == "__main__":
    main(sys.argv[1:])
