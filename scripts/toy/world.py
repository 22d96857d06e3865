"""make_toy_world: a small toy world in the exact folder and JSON layouts of ImageNet (test set + caption
pairs), FashionIQ, CIRR and CIRCO, under one folder.

Every image is drawn from a few named attributes, and every text describes its image truthfully:

- shape world (ImageNet, CIRR, CIRCO): one coloured shape (circle, square, triangle, star, cross,
  heart; small or large) on a plain, striped, dotted or checkered background of another colour;
  canvases of 160x96, 96x144 (elongated: targetpad pads them), 120x120 and 136x112 (it does not).
  ImageNet pairs: subject "a small red circle", attribute "on a blue striped background"; a quarter
  of the ImageNet images are garments instead ("a loose long red dress", "with stripes").
  CIRR captions name every attribute that changes from reference to target ("is green and a square
  instead, make it bigger and with a yellow background"); the target is the only image of its split
  with the resulting attributes; the other members of its 6-image set are near-duplicates. A set is a
  chain of small edits; each member is a reference, its target the next member (the last one's the
  first), so a set holds six queries (the real val split asks nine of most of its sets).
  CIRCO: `shared_concept` names the object that reference and targets share ("a small red star"; its
  colour only when the caption keeps it), `relative_caption` the attributes the targets have ("is
  green and has a dotted background"); `gt_img_ids` is every gallery image with the concept's and the
  caption's attributes, the target first; images may repeat attributes, as COCO's near-duplicates do.
- garment world (FashionIQ): a dress, shirt or top silhouette of one colour, solid, striped, dotted or
  plaid, with or without a graphic on the chest, fitted or loose, in two cuts per category (dress
  short/long, shirt short/long sleeves, top sleeveless/short sleeves): 288 garments per category. The
  two relative captions are two annotators' ("is blue and is looser", "has stripes and is blue"): each
  names some of the 1-3 changes, together they name all of them.
- web part (toy/web.py, not written to disk): captioned images for training a small CLIP
  (scripts/make_toy_clip.py), in pages of near-duplicates, none of them an image of the world above.

Besides the real layouts, the output root holds `toy_manifest.json`: the seed, the sizes, every image's
attributes, and the targets that the test splits' annotations leave out (as the real ones do).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from toy.attributes import image_key
from toy.writers import write_circo, write_cirr, write_fashioniq, write_imagenet, write_json

MANIFEST_NAME = "toy_manifest.json"
DEFAULT_SIZES = {"num_train_images": 64, "num_queries": 8, "num_distractors": 8}


def world_image_keys(manifest: dict) -> set:
    """The image keys of every image of a toy world (its toy_manifest.json): ImageNet and all benchmarks."""
    images = manifest["images"]
    keys = {image_key(r["kind"], r) for r in images["ImageNet"].values()}
    keys |= {image_key(cat, r) for cat, recs in images["FashionIQ"].items() for r in recs.values()}
    keys |= {image_key("scene", r) for part in ("CIRR", "CIRCO") for r in images[part].values()}
    return keys


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; pass another --out")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"{out} is a non-empty folder without {MANIFEST_NAME}, so it is not a toy world this script made; "
            "refusing to replace it. Pass another --out, or remove that folder yourself."
        )


def make_toy_world(out, seed: int = 0, *, num_train_images: int = DEFAULT_SIZES["num_train_images"],
                   num_queries: int = DEFAULT_SIZES["num_queries"],
                   num_distractors: int = DEFAULT_SIZES["num_distractors"],
                   num_fashioniq_queries: int | None = None, num_cirr_queries: int | None = None) -> Path:
    """Write ImageNet/, FashionIQ/, CIRR/, CIRCO/ and toy_manifest.json under `out`; return `out`.

    num_train_images: ImageNet test images (one caption pair each).
    num_queries: queries per split of CIRCO (val and test), and of CIRR unless num_cirr_queries is given.
    num_fashioniq_queries: queries per FashionIQ category and split (default: num_queries).
    num_cirr_queries: queries per CIRR split (default: num_queries), 6 to a 6-image set.
    num_distractors: images per gallery that no query uses.
    Gallery images of one split differ in their attributes (so each target is the only right answer);
    FashionIQ has 288 combinations per category, hence 2 * num_fashioniq_queries + num_distractors <= 288.
    Deterministic given the arguments. An existing toy world at `out` is replaced in one rename
    (built in a temporary sibling first); any other non-empty folder there is refused.
    """
    num_fashioniq_queries = num_queries if num_fashioniq_queries is None else num_fashioniq_queries
    num_cirr_queries = num_queries if num_cirr_queries is None else num_cirr_queries
    if min(num_train_images, num_queries, num_fashioniq_queries, num_cirr_queries) < 1 or num_distractors < 0:
        raise ValueError("need --num-train-images >= 1, --num-queries >= 1, --num-fashioniq-queries >= 1, "
                         "--num-cirr-queries >= 1 and --num-distractors >= 0; got "
                         f"{num_train_images}, {num_queries}, {num_fashioniq_queries}, {num_cirr_queries}, "
                         f"{num_distractors}")
    out = Path(out).absolute()
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        images: dict = {}
        hidden: dict = {}
        images["ImageNet"] = write_imagenet(tmp / "ImageNet", np.random.default_rng([seed, 0]), num_train_images)
        images["FashionIQ"], hidden["FashionIQ"] = write_fashioniq(tmp / "FashionIQ", seed, num_fashioniq_queries,
                                                                   num_distractors)
        images["CIRR"], hidden["CIRR"] = write_cirr(tmp / "CIRR", seed, num_cirr_queries, num_distractors)
        images["CIRCO"], hidden["CIRCO"] = write_circo(tmp / "CIRCO", seed, num_queries, num_distractors)
        manifest = {
            "generator": "scripts/make_toy_data.py",
            "seed": seed,
            "sizes": {"num_train_images": num_train_images, "num_queries": num_queries,
                      "num_fashioniq_queries": num_fashioniq_queries, "num_cirr_queries": num_cirr_queries,
                      "num_distractors": num_distractors},
            "images": images,
            "hidden_targets": hidden,
        }
        write_json(manifest, tmp / MANIFEST_NAME)
        # mkdtemp makes the folder private (0700); the world gets the permissions a plain mkdir would give it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        _check_replaceable(out)  # again: something may have appeared there meanwhile
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:  # put the previous world back
                os.replace(old / out.name, out)
                shutil.rmtree(old)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
    return out
