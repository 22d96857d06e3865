"""Command-line pieces shared by every script: one parser class, the CLIP flags, the device flag."""
from __future__ import annotations

import argparse
import sys

from clip_loader import CLIP_FORMATS, ClipLoadError, load_clip


class FlagParser(argparse.ArgumentParser):
    """argparse that also takes the underscore spelling of every kebab-case flag
    (`--batch_size` for `--batch-size`), as the authors' scripts spelled them; abbreviations are off."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
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


def add_clip_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("CLIP")
    g.add_argument("--clip-model", "--model", "--clip_model_name", dest="clip_model", default="ViT-L/14",
                   help="CLIP architecture: OpenAI spelling (ViT-L/14, ViT-B/32) or open_clip's (ViT-L-14, ViT-B-32)")
    g.add_argument("--clip-weights", default=None,
                   help="local CLIP weights: OpenAI's file (state dict or TorchScript archive, e.g. ~/.cache/clip/ViT-L-14.pt; "
                        "architecture read from the weights) or an open_clip checkpoint. Default: open_clip's 'openai' weights")
    g.add_argument("--clip-format", default="auto", choices=CLIP_FORMATS,
                   help="how to read --clip-weights: auto (OpenAI layout -> openai, with QuickGELU), openai, or open_clip")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available)")


def clip_from_args(args, device):
    """load_clip from the CLIP flags; a loading problem exits with its message (no traceback)."""
    try:
        return load_clip(args.clip_model, args.clip_weights, device=device, clip_format=args.clip_format)
    except ClipLoadError as e:
        raise SystemExit(f"error: {e}")
