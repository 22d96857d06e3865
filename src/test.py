"""Test-server submission files of FTI4CIR (METHOD §12).

    python src/test.py --dataset cirr --cirr-path ./data/CIRR --model-path model_save/checkpoints/epoch_60.pt

CIRR (test1): `<save-path>/cirr/cirr.json` and `<save-path>/cirr/subset_cirr.json`; CIRCO (test):
`<save-path>/circo/circo.json`. `--split val`: the same files for the validation split, named with
`_val` (`cirr_val.json`, `subset_cirr_val.json`, `circo_val.json`), which the val annotations can score
(scripts/score_server_file.py). FashionIQ has no test server: `--dataset fashioniq` writes the
validation metrics, as the authors' script does. The same flags as evaluate.py. Before anything is
written, the files are checked for what a server would reject (lists, the upload limit); every file's
temporary is written before any is renamed into place, so a failure leaves the earlier files as they
were, and each size is printed. A CIRR gallery of fewer than 51 images (toy data) gives shorter lists,
as the authors' code does, with a warning that a server would reject them.

    python src/test.py --dataset cirr --validate results/cirr/cirr.json results/cirr/subset_cirr.json

checks existing files against the test annotations (with `--split val`, the val annotations) the same
way, without a model.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from cli import FlagParser, add_eval_args, dataset_root, eval_config_from_args, script_main
from errors import ConfigError
from evaluate import setup, write_validation_metrics
from evaluation import SERVER_FILES, SERVER_SPLITS, TEST_SPLITS, check_submission_files, retrieve, submission_bytes, submission_files
from logs import get_logger
from metrics import SERVER_MAX_BYTES, SubmissionError, query_count_note
from utils import new_temporary

log = get_logger("test")


def build_parser() -> FlagParser:
    parser = FlagParser(description="Test-server submission files of FTI4CIR (CIRR test1, CIRCO test).")
    add_eval_args(parser, datasets=("cirr", "circo", "fashioniq"))
    parser.add_argument("--validate", nargs="+", default=None, metavar="FILE",
                        help="instead of computing: check existing server files (CIRR: cirr.json and/or subset_cirr.json; "
                             "CIRCO: circo.json) against the --split annotations and the server's limits, without a model")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="test: the files the test servers score (CIRR test1, CIRCO test); val: the same files for "
                             "the validation split, named *_val.json, which the val annotations can score")
    return parser


def size_text(name: str, n_bytes: int) -> str:
    limit = SERVER_MAX_BYTES.get(name)
    return f"{n_bytes / 1e6:.2f} MB" + (f", the server takes up to {limit / 1e6:.0f} MB" if limit else "")


def file_name(name: str, split: str) -> str:
    """A server file's name for `split`: the test server's own name, or with `_val` for the val split."""
    return name if split == "test" else name.replace(".json", f"_{split}.json")


def write_temporary(data: bytes, path: Path) -> Path:
    """`data` in a new temporary file beside `path` (utils.new_temporary), flushed to disk; its path."""
    return new_temporary(path, lambda f: f.write(data))


def write_all(files: dict[Path, bytes]) -> None:
    """Every file's temporary written before the first is renamed into place: a failure (a full disk)
    leaves every earlier file as it was, never one model's cirr.json beside another's subset_cirr.json."""
    written = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            written.append(write_temporary(data, path))
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in zip(written, files):
        os.replace(tmp, path)


def write_submission(args, clip, net, device) -> list[Path]:
    """Computes, validates and writes the submission files of args.dataset; returns their paths."""
    split = SERVER_SPLITS[args.dataset][args.split]
    config = eval_config_from_args(args, device, split=split)
    r = retrieve(net, clip, args.dataset, dataset_root(args, args.dataset), config)
    # every file validated (lists, upload limit) before the first is written
    files = submission_bytes(args.dataset, submission_files(args.dataset, r))
    note = query_count_note(args.dataset, len(r.queries)) if args.split == "test" else None
    if note:
        log.warning(note)
    if args.dataset == "circo" and args.circo_query != "relative":
        log.warning(f"queries built with --circo-query {args.circo_query}, not the authors' relative captions")
    out_dir = Path(args.save_path) / args.dataset
    out = {out_dir / file_name(name, args.split): data for name, data in files.items()}
    write_all(out)
    for path, data in out.items():
        log.info(f"wrote {path} ({size_text(args.dataset, len(data))})")
    log.info(f"{args.dataset} {split}: {len(r.queries)} queries, submission files in {out_dir}")
    return list(out)


def validate_files(args) -> list:
    """--validate: what the server would reject in each file, printed; SubmissionError when anything."""
    if args.dataset not in TEST_SPLITS:
        raise SubmissionError(f"--validate: {args.dataset} has no test server; pass --dataset cirr or circo")
    missing = [f for f in args.validate if not Path(f).is_file()]
    if missing:  # nothing to weigh or parse: no verdict line, one error
        names = " and/or ".join(file_name(n, args.split) for n in SERVER_FILES[args.dataset])
        what = "is a folder, not a file" if all(Path(f).is_dir() for f in missing) else "no such file"
        raise ConfigError(f"--validate {' '.join(missing)}: {what}; pass the files test.py wrote ({names})")
    checks = check_submission_files(args.dataset, dataset_root(args, args.dataset), args.validate,
                                    split=SERVER_SPLITS[args.dataset][args.split])
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
        first = "; ".join(f"{c.path} ({c.problems[0]}" + (", and more above)" if len(c.problems) > 1 else ")")
                          for c in bad)
        raise SubmissionError(f"{len(bad)} of {len(checks)} file(s) would be rejected: {first}")
    return checks


@script_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.validate:
        return validate_files(args)
    device, clip, net = setup(args)  # evaluate.py's: the same flags
    if args.dataset == "fashioniq":  # no server, so no server files of any split: its metrics instead
        if args.split == "val":
            log.info("FashionIQ has no evaluation server, so no server files: its validation metrics instead")
        return write_validation_metrics(args, clip, net, device)
    return write_submission(args, clip, net, device)


if __name__ == "__main__":
    main(sys.argv[1:])
