"""Train a small CLIP that knows the toy world, to stand in for OpenAI's CLIP where it cannot be had.

The model is an open_clip `CLIP` in OpenAI's layout (QuickGELU, vocabulary 49408, context 77), with text
width == embedding size as FTI4CIR needs, trained contrastively on image-caption pairs of the toy world's
*web* part only (scripts/toy/clip_training.py says how): shape scenes and garments, none of them an image
of the benchmarks or of the toy ImageNet. It never sees a benchmark annotation. The file written is an
OpenAI-format state dict, stored in fp16 as OpenAI ships its weights, which every script loads through
`--clip-weights`.

    python scripts/make_toy_clip.py --world data/toy --out data/toy_clip.pt

Same flags, same seed: the same file, byte for byte (fixed thread count, seeded data order).
At the end it prints its own image->text and text->image recall on held-out web pairs beside chance.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

from toy.clip_training import RECALL_KS, ToyClipConfig, train_toy_clip  # noqa: E402
from utils import atomic_torch_save  # noqa: E402

DEFAULTS = ToyClipConfig()


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("./data/toy_clip.pt"), help="the CLIP file to write (default %(default)s)")
    p.add_argument("--world", type=Path, default=None,
                   help="a toy world (scripts/make_toy_data.py) whose images the web part must not contain; "
                        "without it the web part is drawn without that check")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the web part, the initialisation and the data order")
    p.add_argument("--num-web-images", type=int, default=d.num_web_images,
                   help="web images to train on (default %(default)s)")
    p.add_argument("--num-held-out", type=int, default=d.num_held_out,
                   help="further web pairs for the recall check (default %(default)s)")
    p.add_argument("--page-size", type=int, default=d.page_size,
                   help="images per web page (variants of one thing; a batch holds whole pages) (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step (default %(default)s)")
    p.add_argument("--captions-per-image", type=int, default=d.captions_per_image,
                   help="captions drawn for every image each epoch; a step's loss is the mean of CLIP's loss over "
                        "them (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak AdamW learning rate, cosine decay after warm-up (default %(default)s)")
    p.add_argument("--wd", type=float, default=d.wd, help="AdamW weight decay of the weight matrices (default %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="input resolution (default %(default)s)")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="ViT patch size (default %(default)s)")
    p.add_argument("--vision-width", type=int, default=d.vision_width, help="ViT width (default %(default)s)")
    p.add_argument("--vision-layers", type=int, default=d.vision_layers, help="ViT blocks (default %(default)s)")
    p.add_argument("--text-width", type=int, default=d.text_width,
                   help="text transformer width, also the embedding size (default %(default)s)")
    p.add_argument("--text-layers", type=int, default=d.text_layers, help="text transformer blocks (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads; the file is reproducible for a fixed value (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.text_width % 64 or args.vision_width % 64:
        raise SystemExit("error: --text-width and --vision-width must be multiples of 64 (OpenAI's layout: width // 64 heads)")
    if args.captions_per_image < 1:
        raise SystemExit("error: --captions-per-image must be at least 1")
    names = {f.name for f in dataclasses.fields(ToyClipConfig)} - {"progress"}
    config = ToyClipConfig(**{k: getattr(args, k) for k in names}, progress=not args.no_progress)
    t0 = time.time()
    threads = torch.get_num_threads()
    try:
        sd, recall = train_toy_clip(config)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the demo) keeps its own setting
    # OpenAI's format: a plain state dict in fp16, read back by clip_loader.load_clip like the real file
    atomic_torch_save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, args.out)
    n = args.num_held_out
    print(f"toy CLIP -> {args.out} ({time.time() - t0:.0f} s)")
    chance = ", ".join("R@%d %.1f" % (k, recall[f"chance_r{k}"]) for k in RECALL_KS)
    for name, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        figures = ", ".join("R@%d %5.1f" % (k, recall[f"{name}_r{k}"]) for k in RECALL_KS)
        print(f"  held-out web pairs ({n}), {label}: {figures}   (chance {chance})")
    return {"path": str(args.out), "recall": recall}


if __name__ == "__main__":
    main()
