"""The command line's shared pieces, imported by the scripts alone: the parser class, the script boundary
(a `UserError` becomes one `error: ...` line), the flag groups several scripts take (CLIP, device,
dataset roots, evaluation and inference) and the conversion of parsed flags into the library's plain
values and config objects. Each script holds its own parser, set-up and body."""
from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from clip_loader import CLIP_FORMATS
from datasets import BENCHMARKS, CIRCO_QUERY_TEMPLATES, DEFAULT_ROOTS, FASHIONIQ_CATEGORIES
from errors import WRITE_ERRNOS, ConfigError, UserError, write_error
from evaluation import EvalConfig
from feature_store import DEFAULT_CACHE_DIR
from features import BASELINES, Encoding
from logs import setup_logging
from precision import PRECISIONS, check_precision
from transforms import PREPROCESS_TYPES
from utils import check_output_folder, resolve_device


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds `(default: ...)` to a flag's help, unless the help already says what the default is, the flag
    is required, or its default is None (the help says what leaving it out does)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower() or action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


class FlagParser(argparse.ArgumentParser):
    """argparse that also takes the underscore spelling of every kebab-case flag
    (`--batch_size` for `--batch-size`), as the authors' scripts spelled them; abbreviations are off; a
    flag it cannot parse ends the script with one `error:` line."""

    def __init__(self, *args, **kwargs):
        # the script that builds the parser names itself in --help and errors, however it was started
        kwargs.setdefault("prog", Path(sys._getframe(1).f_code.co_filename).name)
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsOnceFormatter)
        super().__init__(*args, **kwargs)

    def _normalise(self, argv):
        known = set(self._option_string_actions)
        out = []
        for a in argv:
            flag, eq, value = a.partition("=")
            if flag.startswith("--") and flag not in known and flag.replace("_", "-") in known:
                a = flag.replace("_", "-") + eq + value
            out.append(a)
        return out

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._normalise(args), namespace)

    def error(self, message):
        """A flag argparse cannot parse: one `error:` line and exit status 1, as every other bad value."""
        raise SystemExit(f"error: {message} (see {self.prog} --help)")


def script_main(main):
    """The script boundary: a `UserError` raised anywhere below `main` ends the script with
    `error: <message>` (exit status 1) instead of a traceback, and so do the machine's own refusals (a full
    disk, a permission, memory); Ctrl-C outside training's clean stop exits with status 130. The log goes
    to stdout."""

    @functools.wraps(main)
    def run(argv=None, *args, **kwargs):
        setup_logging()
        try:
            return main(argv, *args, **kwargs)
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
        except torch.OutOfMemoryError:
            raise SystemExit("error: out of memory on the device; lower --batch-size (and --workers)") from None
        except (OSError, RuntimeError) as e:
            found = write_error(e)  # torch.save's writer wraps the system's refusal in a RuntimeError
            if found is None:
                raise
            where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
            if found.errno is not None and found.errno not in WRITE_ERRNOS:  # not a write: no advice about disks
                advice = ("; check the path and rerun" if found.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
                          else "; lower --workers or --batch-size" if found.errno == errno.ENOMEM
                          else "; raise `ulimit -n` or lower --workers" if found.errno in (errno.EMFILE, errno.ENFILE)
                          else "")
                raise SystemExit(f"error: {where}{found.strerror or found}{advice}") from None
            fix = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (a quota is full)",
                   errno.EACCES: "fix the permissions", errno.EPERM: "fix the permissions",
                   errno.EROFS: "pass a folder on a writable file system"}.get(found.errno, "free disk space or fix the permissions")
            raise SystemExit(f"error: {where}{found.strerror or found}; {fix}, then rerun (files are written whole "
                             "or not at all, so none is half-written)") from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return run


# ---------------------------------------------------------------------------------------------
# CLIP and device

def add_clip_args(parser: argparse.ArgumentParser) -> None:
    """--clip-model, --clip-weights, --clip-format, --clip-pretrained: `clip_loader.load_clip`'s arguments."""
    g = parser.add_argument_group("CLIP")
    g.add_argument("--clip-model", "--model", "--clip_model_name", dest="clip_model", default="ViT-L/14",
                   help="CLIP architecture: OpenAI spelling (ViT-L/14, ViT-B/32) or open_clip's (ViT-L-14, ViT-B-32)")
    g.add_argument("--clip-weights", default=None,
                   help="local CLIP weights: OpenAI's file (state dict or TorchScript archive, e.g. ~/.cache/clip/ViT-L-14.pt; "
                        "architecture read from the weights) or an open_clip checkpoint, or hf-hub:OWNER/REPO/FILE (from the "
                        "Hugging Face cache, else downloaded). Default: open_clip's 'openai' weights")
    g.add_argument("--clip-format", default="auto", choices=CLIP_FORMATS,
                   help="how to read --clip-weights: auto (OpenAI layout -> openai, with QuickGELU), openai, or open_clip")
    g.add_argument("--clip-pretrained", default=None, metavar="TAG",
                   help="open_clip's pretrained weights TAG of --clip-model (e.g. --clip-model ViT-H-14 --clip-pretrained "
                        "laion2b_s32b_b79k), from the Hugging Face cache or, with --clip-weights, that file; default: "
                        "OpenAI's weights (openai)")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available)")


# ---------------------------------------------------------------------------------------------
# the authors' train.py flags that change nothing here

def add_authors_train_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the authors' train.py that had no effect there or none that differs here: accepted, so
    their commands run unchanged, each answered by one notice (`authors_train_notices`)."""
    g = parser.add_argument_group("the authors' flags that change nothing here (each prints a notice)")
    g.add_argument("--optimizer", default=None, metavar="NAME",
                   help="accepted for the authors' commands: their train.py never read it and always used AdamW, "
                        "as train.py does")
    g.add_argument("--pre-dataset", default=None, metavar="NAME",
                   help="accepted for the authors' commands: ImageNetDataset, the one training set their code took "
                        "(ImageNet test images with BLIP captions), which train.py reads")
    g.add_argument("--save-training", default=None, metavar="BOOL",
                   help="accepted for the authors' commands: their code wrote checkpoints when it was true; here "
                        "--save-frequency decides (0: no epoch checkpoints)")
    g.add_argument("--eps", type=float, default=None,
                   help="accepted for the authors' commands: their code never passed it to AdamW, which used its "
                        "default eps (1e-8), as train.py does")


def authors_train_notices(args) -> list[str]:
    """Removes add_authors_train_args' flags from the parsed `args` (they are no TrainConfig fields) and
    returns one notice per flag given: what it did in the authors' train.py and why it changes nothing here.
    A --pre-dataset other than theirs stops, as it stopped their script."""
    given = {k: vars(args).pop(k) for k in ("optimizer", "pre_dataset", "save_training", "eps")}
    out = []
    if given["optimizer"] is not None:
        out.append(f"--optimizer {given['optimizer']}: the authors' train.py never read it and always built AdamW; "
                   "so does this one (docs/METHOD.md §7)")
    if given["pre_dataset"] is not None:
        if given["pre_dataset"] != "ImageNetDataset":
            raise ConfigError(f"--pre-dataset {given['pre_dataset']}: the only training set is ImageNetDataset (ImageNet "
                              "test images with BLIP captions, --imagenet-path and --pairs-path), as in the authors' "
                              "code; pass --pre-dataset ImageNetDataset or leave it out")
        out.append("--pre-dataset ImageNetDataset: the one training set the authors' code took, and the one train.py "
                   "reads (--imagenet-path, --pairs-path)")
    if given["save_training"] is not None:
        out.append(f"--save-training {given['save_training']}: the authors' code wrote checkpoints when it was true "
                   "(and read any non-empty value, 'False' too, as true); here --save-frequency decides (0: no epoch "
                   "checkpoints)")
    if given["eps"] is not None:
        out.append(f"--eps {given['eps']:g}: the authors' train.py never passed it to AdamW, which used its default "
                   "eps 1e-8; so does this one (docs/METHOD.md §7)")
    return out


# ---------------------------------------------------------------------------------------------
# dataset roots

ROOT_FLAGS = {"imagenet": ("--imagenet-path", "--ImageNetPath"), "fashioniq": ("--fashioniq-path", "--Fashion_IQ_path"),
              "cirr": ("--cirr-path", "--CIRR_path"), "circo": ("--circo-path", "--CIRCO_path")}
ROOT_HELP = {"imagenet": "ImageNet root (test/ILSVRC2012_test_XXXXXXXX.JPEG)",
             "fashioniq": "FashionIQ root (captions/, image_splits/, dress/, shirt/, toptee/)",
             "cirr": "CIRR root (dev/, test1/, cirr/captions, cirr/image_splits)",
             "circo": "CIRCO root (annotations/, COCO2017_unlabeled/)"}


def add_root_args(parser, names: Sequence[str] = BENCHMARKS, defaults: dict | None = None) -> None:
    """`--<name>-path` for each dataset in `names` (the authors' spellings as aliases)."""
    group = parser.add_argument_group("dataset roots (layouts: README)")
    for name in names:
        default = DEFAULT_ROOTS[name] if defaults is None else defaults.get(name)
        group.add_argument(*ROOT_FLAGS[name], dest=f"{name}_path", default=default, help=ROOT_HELP[name])


def dataset_root(args, name: str) -> Path:
    """The root folder `args` give for dataset `name`, which must exist."""
    root = Path(getattr(args, f"{name}_path"))
    if not root.is_dir():
        raise ConfigError(f"{name} root {root} not found; pass {ROOT_FLAGS[name][0]} (the layout is in the README)")
    return root


# ---------------------------------------------------------------------------------------------
# encoding a gallery and composed queries (evaluate.py, test.py, retrieve.py)

def add_eval_args(parser: argparse.ArgumentParser, datasets: Sequence[str] = BENCHMARKS,
                  default_save_path: str = "./results") -> None:
    """The flags evaluate.py and test.py share (the authors' spellings accepted as aliases)."""
    parser.add_argument("--dataset", required=True, type=str.lower, choices=list(datasets), help="benchmark")
    add_root_args(parser)
    parser.add_argument("--categories", nargs="+", choices=list(FASHIONIQ_CATEGORIES), default=list(FASHIONIQ_CATEGORIES),
                        help="FashionIQ categories, each evaluated on its own gallery; 'average' is their mean")
    parser.add_argument("--save-examples", type=int, default=0, metavar="N",
                        help="also draw N queries per benchmark (reference, text, top-5, target framed) as a PNG grid "
                             "in <save-path>/examples/")
    add_model_args(parser, default_save_path)
    parser.add_argument("--cache-reference-tokens", action="store_true",
                        help="keep the reference images' visual-tower outputs (g and the last block's tokens, fp32: "
                             "~1 MB per reference for ViT-L/14, 2.2 GB for CIRR val) from the gallery pass, in memory and "
                             "in --cache-dir, so composing the queries needs no visual pass (the next checkpoint: none at all)")
    parser.add_argument("--skip-missing-images", action="store_true",
                        help="leave out gallery images whose file is missing and the queries that refer to a missing image "
                             "(reference, target, CIRR set member, CIRCO ground truth), print how many, and record them in "
                             "the metrics file under 'incomplete_data' (not comparable with full-data numbers). Default: stop "
                             "at the first missing image")
    templates = "; ".join(f"{k}: '{v}'" for k, v in CIRCO_QUERY_TEMPLATES.items())
    parser.add_argument("--circo-query", choices=list(CIRCO_QUERY_TEMPLATES), default="relative",
                        help=f"CIRCO's modification text ({templates}); relative is the authors' protocol, the other is "
                             "recorded in the metrics file as 'circo_query'")


def add_model_args(parser: argparse.ArgumentParser, default_save_path: str) -> None:
    """The flags of a script that encodes a gallery and composed queries (evaluate.py, test.py, retrieve.py):
    the network or a baseline, CLIP, preprocessing, output folder, device, batching, precision, cache."""
    parser.add_argument("--model-path", default=None,
                        help="FTI4CIR checkpoint: this repo's (src/train.py) or the authors' released file; or "
                             "hf-hub:OWNER/REPO/FILE (from the Hugging Face cache, else downloaded)")
    parser.add_argument("--baseline", choices=list(BASELINES), default=None,
                        help="instead of the model: the reference image's CLIP embedding (image-only) or CLIP's "
                             "embedding of the modification text (text-only); no --model-path needed")
    add_clip_args(parser)
    parser.add_argument("--preprocess-type", choices=list(PREPROCESS_TYPES), default="targetpad",
                        help="image preprocessing: targetpad (ratio 1.25, the authors') or CLIP's own")
    parser.add_argument("--save-path", default=default_save_path, help="folder for the output files")
    add_device_arg(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", "--num-workers", dest="workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader worker processes (0: load in the main process); default min(8, CPUs)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="fp32: no autocast, the authors' inference; tf32: TF32 tensor cores (CUDA); "
                             "bf16 (CUDA, CPU) / fp16 (CUDA): autocast, faster, rankings may differ slightly")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="gallery features (and --cache-reference-tokens' outputs) are stored here, one folder each, "
                             "keyed by CLIP weights, preprocessing, precision, the gallery's names and its image files")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the gallery cache")
    parser.add_argument("--cache-hash-images", action="store_true",
                        help="key the gallery cache on the images' contents (each file read and hashed, in threads) "
                             "instead of their sizes and modification times, so an image replaced in place by one of "
                             "the same size and time is noticed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def model_device(args) -> torch.device:
    """The device add_model_args' flags ask for, with their precision and sizes checked (before anything slow)."""
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    bad = [f"{flag} {value} (must be >= {least})" for flag, value, least in
           (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
            ("--save-examples", getattr(args, "save_examples", 0), 0), ("--top", getattr(args, "top", 1), 1))
           if value < least]
    if bad:
        raise ConfigError("invalid value: " + "; ".join(bad))
    return device


def check_model_outputs(args, save_flag: str = "--save-path") -> None:
    """The output folder (`save_flag`, stored as args.save_path) and (unless --no-cache) --cache-dir created
    and writable, before CLIP is loaded."""
    check_output_folder(args.save_path, save_flag)
    if not args.no_cache:
        check_output_folder(args.cache_dir, "--cache-dir", "pass a folder you can write to, or --no-cache")


def clip_args(args) -> dict:
    """`clip_loader.load_clip`'s keyword arguments from add_clip_args' flags."""
    return dict(model_name=args.clip_model, weights=args.clip_weights, clip_format=args.clip_format,
                pretrained=args.clip_pretrained)


def encoding_from_args(args, device) -> Encoding:
    """How add_model_args' flags say to encode."""
    return Encoding(batch_size=args.batch_size, workers=args.workers, device=device, precision=args.precision,
                    progress=not args.no_progress)


def eval_config_from_args(args, device, split: str = "val") -> EvalConfig:
    """The EvalConfig that add_eval_args' flags describe."""
    return EvalConfig(split=split, categories=args.categories, preprocess_type=args.preprocess_type,
                      encoding=encoding_from_args(args, device), cache_dir=None if args.no_cache else args.cache_dir,
                      cache_hash_images=args.cache_hash_images, baseline=args.baseline,
                      reference_tokens=args.cache_reference_tokens, examples=args.save_examples,
                      examples_dir=Path(args.save_path) / "examples", skip_missing_images=args.skip_missing_images,
                      circo_query=args.circo_query)
