"""Time the toy CLIP's training step (scripts/make_toy_clip.py) in several set-ups, side by side.

Each set-up trains a toy CLIP on 48-pixel images (batch 128, text width 64) with the toy CLIP's own step
(scripts/toy/clip_training.py); they differ in the captions per image, the text blocks, whether the
captions go through the text tower in one pass cut at the longest or in groups of similar length, and
the ViT (width and patch size; 3 blocks). The set-ups take turns, `--repeats` rounds of `--steps` timed
steps after `--warmup` untimed ones, so that a machine whose speed drifts slows them all alike; the
median round counts. Printed: ms per step, images per second, and each set-up's time against the first
one's.

    python scripts/bench_toy_clip.py [--steps 20] [--warmup 3] [--repeats 3] [--threads 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402

from toy.clip_training import (ToyClipConfig, WordCachedTokenizer, epoch_plan, make_trainable,  # noqa: E402
                               render_images, train_step)
from toy.web import web_pages  # noqa: E402

# name -> (captions per image, text blocks, text groups, ViT width, ViT patch size)
SETUPS = {
    "1 caption, 2 text blocks, one pass, ViT 192/16": (1, 2, 1, 192, 16),
    "4 captions, 2 text blocks, by length, ViT 192/16": (4, 2, 4, 192, 16),
    "4 captions, 1 text block, by length, ViT 192/16": (4, 1, 4, 192, 16),
    "4 captions, 1 text block, by length, ViT 128/12 (default)": (4, 1, 4, 128, 12),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the first round (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the median counts (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    return p


class Setup:
    """One set-up's model, optimisers and batches, stepping on demand."""

    def __init__(self, captions: int, text_layers: int, groups: int, width: int, patch: int, images: torch.Tensor,
                 records: list[dict], batch: int):
        config = ToyClipConfig(captions_per_image=captions, text_layers=text_layers, vision_width=width, patch_size=patch)
        self.clip, self.optimizers = make_trainable(config)
        self.loss_fn, self.groups, self.batch, self.images = ClipLoss(), groups, batch, images
        _, self.tokens = epoch_plan(config, 0, records, WordCachedTokenizer(self.clip))
        self.i = 0

    def step(self) -> None:
        n = len(self.images) // self.batch
        idx = torch.arange(self.batch) + (self.i % n) * self.batch
        self.i += 1
        train_step(self.clip, self.optimizers, self.loss_fn, self.images[idx].float(), self.tokens[idx], lr=1e-3,
                   groups=self.groups)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = 128
    records = [r for page in web_pages(0, 8 * batch // 4, 4) for r in page]
    images = render_images(records, 48)
    setups = {name: Setup(*cfg, images, records, batch) for name, cfg in SETUPS.items()}
    for s in setups.values():
        for _ in range(args.warmup):
            s.step()
    rounds: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.repeats):
        for name, s in setups.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                s.step()
            rounds[name].append((time.perf_counter() - t) / args.steps)
    out = {name: sorted(v)[len(v) // 2] for name, v in rounds.items()}
    first = next(iter(out.values()))
    print(f"toy CLIP training step, batch {batch}, {args.threads} threads, median of {args.repeats} rounds of "
          f"{args.steps} steps")
    for name, sec in out.items():
        print(f"  {name:<58} {1000 * sec:7.1f} ms/step  {batch / sec:7.1f} images/s  {sec / first:5.2f}x the first")
    result = {"threads": args.threads, "batch": batch, "seconds_per_step": out, "rounds": rounds}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
