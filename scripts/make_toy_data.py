"""Generate a small toy world in the exact folder and JSON layouts of ImageNet (test set + caption
pairs), FashionIQ, CIRR and CIRCO, for the README demo and for tests: coloured shapes on patterned
backgrounds and garments, every text true of its image, and toy_manifest.json beside them. The world
itself is the package scripts/toy/ (toy/world.py describes it; make_toy_world writes it).

Usage: python scripts/make_toy_data.py [--out data/toy] [--seed 0] [--num-train-images 64]
       [--num-queries 8] [--num-cirr-queries N] [--num-fashioniq-queries N] [--num-distractors 8]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from toy.world import DEFAULT_SIZES, make_toy_world


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description="Generate a toy ImageNet/FashionIQ/CIRR/CIRCO world in the real folder layouts.")
    parser.add_argument("--out", default="./data/toy",
                        help="output folder (replaced if it already holds a toy world; default ./data/toy)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--num-train-images", type=int, default=DEFAULT_SIZES["num_train_images"],
                        help="ImageNet test images with caption pairs (default %(default)s)")
    parser.add_argument("--num-queries", type=int, default=DEFAULT_SIZES["num_queries"],
                        help="queries per CIRR and CIRCO split (default %(default)s)")
    parser.add_argument("--num-cirr-queries", type=int, default=None,
                        help="queries per CIRR split, six to a 6-image set (default: --num-queries)")
    parser.add_argument("--num-fashioniq-queries", type=int, default=None,
                        help="queries per FashionIQ category and split (default: --num-queries; at most "
                             "(288 - --num-distractors) / 2)")
    parser.add_argument("--num-distractors", type=int, default=DEFAULT_SIZES["num_distractors"],
                        help="gallery images per split that no query uses (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = make_toy_world(args.out, seed=args.seed, num_train_images=args.num_train_images,
                             num_queries=args.num_queries, num_distractors=args.num_distractors,
                             num_fashioniq_queries=args.num_fashioniq_queries,
                             num_cirr_queries=args.num_cirr_queries)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    counts = {b: sum(1 for p in (out / b).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
              for b in ("ImageNet", "FashionIQ", "CIRR", "CIRCO")}
    print(f"toy world written to {out}: " + ", ".join(f"{b} {n} images" for b, n in counts.items()))
    return out


if __name__ == "__main__":
    main()
