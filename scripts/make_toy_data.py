"""Generate a small toy world in the exact folder and JSON layouts of ImageNet (test set + caption
pairs), FashionIQ, CIRR and CIRCO, for the README demo and for tests.

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
- web part (`web_pages`, not written to disk): captioned images for training a small CLIP
  (scripts/make_toy_clip.py), in pages of near-duplicates, none of them an image of the world above.

Besides the real layouts, the output root holds `toy_manifest.json`: the seed, the sizes, every image's
attributes, and the targets that the test splits' annotations leave out (as the real ones do).

`make_placeholder_images` (with `write_circo_image_info`) serves another purpose: it writes small
distinct images at the exact paths the real datasets use for a list of names, so tests can run over a
subset of the REAL annotation files without the real images.

Usage: python scripts/make_toy_data.py [--out data/toy] [--seed 0] [--num-train-images 64]
       [--num-queries 8] [--num-fashioniq-queries N] [--num-distractors 8]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Named colours, far enough apart for CLIP (and a pixel test) to tell them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 40),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 160, 60),
    "blue": (35, 75, 210),
    "purple": (125, 50, 165),
    "pink": (240, 130, 185),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "gray": (130, 130, 130),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")  # outlines far apart even at 32-64 pixels
PATTERNS = ("plain", "striped", "dotted", "checkered")
SIZES = ("small", "large")
SCENE_ATTRIBUTES = ("shape", "colour", "background", "pattern", "size")
SCENE_CANVASES = ((160, 96), (120, 120), (96, 144), (136, 112))

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
GARMENT_COLOURS = tuple(c for c in COLOURS if c not in ("white", "gray"))  # must stand out from the light backdrop
GARMENT_PATTERNS = ("solid", "striped", "dotted", "plaid")
GARMENT_VARIANTS = {"dress": ("short", "long"), "shirt": ("short", "long"), "toptee": ("sleeveless", "short")}
GARMENT_PRINTS = ("none", "graphic")  # a block of ink on the chest, as FashionIQ's "has a graphic" / "no logo"
GARMENT_FITS = ("fitted", "loose")
GARMENT_ATTRIBUTES = ("colour", "pattern", "print", "variant", "fit")
GARMENT_CANVASES = ((96, 128), (120, 120), (100, 150))
GARMENT_BACKDROP = (236, 236, 236)

CIRR_SPLITS = {"train": "train", "val": "dev", "test1": "test1"}  # annotation split -> image folder / name prefix
FASHIONIQ_SPLITS = ("train", "val", "test")
CIRCO_SPLITS = ("val", "test")
MANIFEST_NAME = "toy_manifest.json"
DEFAULT_SIZES = {"num_train_images": 64, "num_queries": 8, "num_distractors": 8}
CIRR_SET_SIZE = 6
CIRR_QUERIES_PER_SET = 6  # every member is once a reference; the real val split asks 9 of most of its sets
PLACEHOLDER_BENCHMARKS = ("imagenet", "fashioniq", "cirr", "circo")

# ----------------------------------------------------------------------------------------------
# Attributes


def _distance(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def _tint(rgb: Sequence[int]) -> tuple[int, int, int]:
    """The second colour of a pattern: lighter for dark colours, darker for light ones."""
    c = np.asarray(rgb, dtype=float)
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    out = c + 0.45 * (255 - c) if lum < 140 else c * 0.65
    return tuple(int(round(v)) for v in out)


def _contrasting_backgrounds(colour: str) -> tuple[str, ...]:
    rgb = COLOURS[colour]
    return tuple(
        bg for bg, bg_rgb in COLOURS.items()
        if _distance(rgb, bg_rgb) >= 100 and _distance(rgb, _tint(bg_rgb)) >= 100
    )


BACKGROUNDS_FOR = {c: _contrasting_backgrounds(c) for c in COLOURS}
SCENE_DOMAINS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(COLOURS),
                 "pattern": PATTERNS, "size": SIZES}


def _garment_domains(category: str) -> dict[str, tuple[str, ...]]:
    return {"colour": GARMENT_COLOURS, "pattern": GARMENT_PATTERNS, "print": GARMENT_PRINTS,
            "variant": GARMENT_VARIANTS[category], "fit": GARMENT_FITS}


def _valid_scene(attrs: dict) -> bool:
    return attrs["background"] in BACKGROUNDS_FOR[attrs["colour"]]


def _always_valid(attrs: dict) -> bool:
    return True


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _sample(rng, domains: dict, valid: Callable[[dict], bool], fixed: dict | None = None) -> dict:
    """Random attributes, `fixed` ones kept, satisfying `valid`."""
    fixed = fixed or {}
    for _ in range(1000):
        attrs = {k: fixed[k] if k in fixed else _pick(rng, v) for k, v in domains.items()}
        if valid(attrs):
            return attrs
    raise ValueError(f"no valid attributes with {fixed}")


def _mutate(rng, attrs: dict, domains: dict, valid, n_changes: int, weights: Sequence[float] | None = None) -> dict:
    """`attrs` with `n_changes` attributes set to other values (chosen with probabilities ∝ `weights`)."""
    names = list(domains)
    p = None if weights is None else np.asarray(weights, dtype=float) / sum(weights)
    for _ in range(1000):
        changed = rng.choice(len(names), size=n_changes, replace=False, p=p)
        new = dict(attrs)
        for i in sorted(int(i) for i in changed):
            name = names[i]
            new[name] = _pick(rng, [v for v in domains[name] if v != attrs[name]])
        if valid(new):
            return new
    raise ValueError(f"cannot change {n_changes} attributes of {attrs}")


def _key(attrs: dict, names: Sequence[str]) -> tuple:
    return tuple(attrs[n] for n in names)


def _unique(make: Callable[[], dict], taken: set, names: Sequence[str], what: str) -> dict:
    """Call `make` until its attributes differ from every image in `taken`; records them."""
    for _ in range(2000):
        attrs = make()
        key = _key(attrs, names)
        if key not in taken:
            taken.add(key)
            return attrs
    raise ValueError(
        f"cannot find {what} with attributes different from the {len(taken)} images already drawn; "
        "lower --num-queries / --num-distractors"
    )


def _layout(rng, canvases) -> dict:
    """Canvas size and a small jitter of the object's centre (not an attribute: texts ignore it)."""
    w, h = _pick(rng, canvases)
    return {"canvas": [int(w), int(h)], "center": [int(w // 2 + rng.integers(-4, 5)), int(h // 2 + rng.integers(-4, 5))]}


# ----------------------------------------------------------------------------------------------
# Texts


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def scene_subject(attrs: dict) -> str:
    """'a small red circle' (METHOD §8 subject: up to the first noun)."""
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']}"


def _background_words(background: str | None, pattern: str | None) -> str:
    if background and pattern:
        return f"plain {background}" if pattern == "plain" else f"{background} {pattern}"
    return background or pattern


def scene_attribute(attrs: dict) -> str:
    """'on a blue background' / 'on a blue striped background' (METHOD §8 attribute: the rest)."""
    words = attrs["background"] if attrs["pattern"] == "plain" else f"{attrs['background']} {attrs['pattern']}"
    return f"on {_with_article(words)} background"


def _join_clauses(clauses: list[str]) -> str:
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _background_clause(rng, background: str | None, pattern: str | None) -> str:
    words = _background_words(background, pattern)
    return f"{_pick(rng, ('with', 'has', 'is on'))} {_with_article(words)} background"


# Captions of the web part: alt-text-like descriptions of one image, in many phrasings, full or partial
# (any attribute may go unmentioned), so that a CLIP trained on them knows every word the benchmark
# texts use about the toy world without ever seeing a benchmark text.
_SIZE_WORDS = {"small": ("small", "little", "tiny", "smaller"), "large": ("large", "big", "bigger", "larger")}
_SCENE_PATTERN_ADJ = {"plain": ("plain",), "striped": ("striped",), "dotted": ("dotted", "polka dot"),
                      "checkered": ("checkered", "checked")}
# A web text also holds words that say nothing of the picture ("make it yours"): a real CLIP has met
# every word of the benchmarks' texts, "it", "make" and "instead" too, and so must the toy one, or their
# embeddings stay at their random start and blur every query that uses them.
_WEB_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ", "it is ",
                 "make it yours: ", "turn it into art: ", "use this one instead: ")
_GRAYSCALE_PREFIXES = ("a grayscale photo of ", "a monochrome picture of ", "a grayscale image of ")


def _mentioned(rng, keys: Sequence[str], always: float, each: float) -> set:
    """Which attributes a caption names: all of them with probability `always`, else each with
    probability `each` (at least one)."""
    if rng.random() < always:
        return set(keys)
    chosen = {k for k in keys if rng.random() < each}
    return chosen or {_pick(rng, list(keys))}


def _shuffled_words(rng, words: list[str], keep_order: float = 0.7) -> list[str]:
    return words if rng.random() < keep_order else [words[i] for i in rng.permutation(len(words))]


def web_scene_caption(rng, attrs: dict) -> str:
    """'a small red circle on a blue striped background', 'a circle that is red', 'a picture of a
    checked green background with a big star', 'a tiny shape in pink', ..."""
    if rng.random() < 0.2:  # many alt texts only name the thing: "a star", "a photo of a heart"
        return _pick(rng, _WEB_PREFIXES) + _with_article(attrs["shape"])
    if attrs.get("grayscale"):  # no colour to be seen, none named
        said = _mentioned(rng, ("shape", "size", "pattern"), always=0.5, each=0.6)
        bg = f" on a {_pick(rng, _SCENE_PATTERN_ADJ[attrs['pattern']])} background" if "pattern" in said else ""
        size = _pick(rng, _SIZE_WORDS[attrs["size"]]) + " " if "size" in said else ""
        noun = attrs["shape"] if "shape" in said else _pick(rng, ("shape", "object", "figure"))
        return f"{_pick(rng, _GRAYSCALE_PREFIXES)}{_with_article(size + noun)}{bg}"
    said = _mentioned(rng, SCENE_ATTRIBUTES, always=0.4, each=0.55)
    colour = attrs["colour"] if "colour" in said else None
    size = _pick(rng, _SIZE_WORDS[attrs["size"]]) if "size" in said else None
    noun = attrs["shape"] if "shape" in said else _pick(rng, ("shape", "object", "figure"))
    obj = None
    if {"shape", "colour", "size"} & said:
        form = rng.random()
        if colour and form < 0.25:
            obj = _with_article(" ".join(w for w in (size, noun) if w) + f" that is {colour}")
        elif colour and form < 0.4:
            obj = _with_article(" ".join(w for w in (size, noun) if w) + f" in {colour}")
        else:
            obj = _with_article(" ".join(_shuffled_words(rng, [w for w in (size, colour) if w]) + [noun]))
    bg = None
    if {"background", "pattern"} & said:
        words = [w for w in (attrs["background"] if "background" in said else None,
                             _pick(rng, _SCENE_PATTERN_ADJ[attrs["pattern"]]) if "pattern" in said else None) if w]
        bg = _with_article(" ".join(_shuffled_words(rng, words)) + " background")
    prefix = _pick(rng, _WEB_PREFIXES)
    if obj and bg:
        form = rng.random()
        if form < 0.2:
            return f"{prefix}{bg} with {obj}"
        if form < 0.3:
            return f"{obj}, {_pick(rng, ('on', 'with'))} {bg}"
        if form < 0.4:
            return f"{prefix}{obj} that has {bg}"
        return f"{prefix}{obj} {_pick(rng, ('on', 'on', 'with', 'against'))} {bg}"
    return prefix + (obj or bg)


def web_garment_caption(rng, category: str, attrs: dict) -> str:
    """'a loose long red striped dress', 'a blue shirt with long sleeves', 'a tee that is green and
    plaid', 'a photo of a slim sleeveless top', 'a graphic tee', 'a pink shirt with no logo', ..."""
    said = _mentioned(rng, GARMENT_ATTRIBUTES, always=0.35, each=0.5)
    noun = _pick(rng, _GARMENT_NOUNS[category])
    adjectives, after = [], []
    if "fit" in said:
        adjectives.append(_pick(rng, _WEB_FIT_ADJ[attrs["fit"]]))
    if "variant" in said:
        if category == "dress":
            adjectives.append(_pick(rng, _WEB_DRESS_LENGTH[attrs["variant"]]))
        else:
            sleeves = _pick(rng, _SLEEVES_WITH[attrs["variant"]])
            (after if sleeves.startswith("with") else adjectives).append(sleeves)
    colour = attrs["colour"] if "colour" in said else None
    if colour and rng.random() < 0.15:
        colour += " colored"
    pattern = None
    if "pattern" in said:
        if rng.random() < 0.35:
            after.append(_GARMENT_PATTERN_WITH[attrs["pattern"]])
        else:
            pattern = _pick(rng, _GARMENT_PATTERN_ADJ[attrs["pattern"]])
    if "print" in said:
        if attrs["print"] == "graphic" and rng.random() < 0.3:
            adjectives.append("graphic")  # "a graphic tee"
        else:
            after.append(_pick(rng, _PRINT_WITH[attrs["print"]]))
    if after and all(a.startswith("with ") for a in after) and rng.random() < 0.3:  # "a top that has a logo"
        after = ["that has " + _join_clauses([a[len("with "):] for a in after])]
    prefix = _pick(rng, _WEB_PREFIXES)
    if colour and rng.random() < 0.25:  # "a loose dress that is red and striped"
        rest = " and ".join(w for w in (colour, pattern) if w)
        return prefix + _with_article(" ".join(_shuffled_words(rng, adjectives) + [noun])) + \
            " " + " ".join(after + [f"that is {rest}"])
    words = _shuffled_words(rng, adjectives + [w for w in (colour, pattern) if w]) + [noun]
    return prefix + " ".join([_with_article(" ".join(words))] + ([_join_clauses(after)] if after else []))


def _scene_change_text(rng, ref: dict, tgt: dict) -> str:
    """CIRR modification: names every attribute in which `tgt` differs from `ref`."""
    clauses = []
    c, s = tgt["colour"], tgt["shape"]
    if ref["colour"] != c and ref["shape"] != s:
        clauses.append(_pick(rng, (f"is {c} and {_with_article(s)} instead", f"make it {_with_article(c + ' ' + s)}")))
    elif ref["colour"] != c:
        clauses.append(_pick(rng, (f"is {c} instead", f"make it {c}")))
    elif ref["shape"] != s:
        clauses.append(_pick(rng, (f"is {_with_article(s)} instead", f"turn it into {_with_article(s)}")))
    if ref["size"] != tgt["size"]:
        bigger = tgt["size"] == "large"
        clauses.append(_pick(rng, ("make it bigger", "is larger") if bigger else ("make it smaller", "is smaller")))
    new_bg = tgt["background"] if ref["background"] != tgt["background"] else None
    new_pattern = tgt["pattern"] if ref["pattern"] != tgt["pattern"] else None
    if new_bg or new_pattern:
        clauses.append(_background_clause(rng, new_bg, new_pattern))
    if not clauses:
        raise ValueError("reference and target are identical")
    return _join_clauses(clauses)


_GARMENT_NOUNS = {"dress": ("dress",), "shirt": ("shirt",), "toptee": ("top", "tee")}
# how the garment attributes are worded: as adjectives (descriptions) and as changes (relative captions,
# in the style of FashionIQ's: "is darker", "has no sleeves", "is looser")
_GARMENT_PATTERN_ADJ = {"solid": ("solid", "plain"), "striped": ("striped",), "dotted": ("dotted", "polka dot"),
                        "plaid": ("plaid", "checked")}
_GARMENT_PATTERN_WITH = {"solid": "in a solid color", "striped": "with stripes", "dotted": "with dots",
                         "plaid": "with a plaid pattern"}
_PRINT_WITH = {"graphic": ("with a graphic", "with a logo", "with a print on the front"),
               "none": ("with no graphic", "without a logo", "with no print")}
_FIT_ADJ = {"fitted": ("fitted", "tight", "slim"), "loose": ("loose", "baggy", "flowy")}
# the web's words for fit and a dress's length also hold comparatives, as "bigger" is one of "large"
_WEB_FIT_ADJ = {"fitted": _FIT_ADJ["fitted"] + ("tighter", "more fitted"), "loose": _FIT_ADJ["loose"] + ("looser", "more loose")}
_WEB_DRESS_LENGTH = {"short": ("short", "shorter"), "long": ("long", "longer")}
_SLEEVES_WITH = {"short": ("with short sleeves", "short-sleeved"), "long": ("with long sleeves", "long-sleeved"),
                 "sleeveless": ("sleeveless", "with no sleeves")}
_COLOUR_CHANGE = ("is {}", "is {} in color", "is {} colored")
_PATTERN_CHANGE = {"solid": ("is solid", "is plain", "is a solid color"), "striped": ("has stripes", "is striped"),
                   "dotted": ("has dots", "has polka dots", "is dotted"),
                   "plaid": ("is plaid", "has a plaid pattern", "is checked")}
_VARIANT_CHANGE = {
    "dress": {"short": ("is shorter", "is short"), "long": ("is longer", "is long")},
    "shirt": {"short": ("has short sleeves", "has shorter sleeves"), "long": ("has long sleeves", "has longer sleeves")},
    "toptee": {"sleeveless": ("has no sleeves", "is sleeveless"), "short": ("has short sleeves", "has sleeves")},
}
_PRINT_CHANGE = {"graphic": ("has a graphic", "has a logo", "has a print on the front"),
                 "none": ("has no graphic", "has no logo", "is without a print")}
_FIT_CHANGE = {"fitted": ("is tighter", "is more fitted", "is fitted"), "loose": ("is looser", "is more loose", "is loose")}


def garment_pair(category: str, attrs: dict) -> tuple[str, str]:
    """A caption of a garment split as the ImageNet pairs are (subject up to the first noun, attribute
    the rest): ('a loose long red dress', 'with stripes'), ('a fitted blue top', 'with no sleeves and dots'),
    ('a loose green shirt', 'with long sleeves, stripes and a graphic'); a garment without a graphic is
    said no more about, as a plain background is not."""
    c, p, v, f = attrs["colour"], attrs["pattern"], attrs["variant"], attrs["fit"]
    noun = _GARMENT_NOUNS[category][0]
    graphic = ["a graphic"] if attrs["print"] == "graphic" else []
    pattern = _GARMENT_PATTERN_WITH[p]
    if category == "dress":
        subject = f"a {f} {v} {c} {noun}"
        things = []
    else:
        subject = f"a {f} {c} {noun}"
        things = ["no sleeves" if v == "sleeveless" else f"{v} sleeves"]
    if pattern.startswith("with "):
        return subject, "with " + _join_clauses(things + [pattern[5:]] + graphic)
    # "in a solid color": the other things follow with their own "with"
    rest = " with " + _join_clauses(things + graphic) if things or graphic else ""
    return subject, pattern + rest


def _garment_change_clause(rng, category: str, key: str, tgt: dict) -> str:
    """One relative clause naming the target's value of `key`."""
    if key == "colour":
        return _pick(rng, _COLOUR_CHANGE).format(tgt["colour"])
    if key == "pattern":
        return _pick(rng, _PATTERN_CHANGE[tgt["pattern"]])
    if key == "variant":
        return _pick(rng, _VARIANT_CHANGE[category][tgt["variant"]])
    if key == "print":
        return _pick(rng, _PRINT_CHANGE[tgt["print"]])
    return _pick(rng, _FIT_CHANGE[tgt["fit"]])


def fashioniq_captions(rng, category: str, ref: dict, tgt: dict) -> list[str]:
    """Two annotators' relative captions, as in FashionIQ: each names some of the changes (a change
    may be named by both, in other words), together they name every change; now and then one also
    names the target's colour with the garment ("is a blue dress") although the colour is kept."""
    changed = [k for k in GARMENT_ATTRIBUTES if ref[k] != tgt[k]]
    if not changed:
        raise ValueError("reference and target are identical")
    order = [changed[i] for i in rng.permutation(len(changed))]
    cut = int(rng.integers(1, len(order) + 1))
    first, second = order[:cut], order[cut:]
    if not second or rng.random() < 0.4:  # the second annotator also names one the first did
        second = second + [_pick(rng, first)]
    texts = []
    for keys in (first, second):
        keys = [k for k in GARMENT_ATTRIBUTES if k in keys]  # annotators name colour first, fit last
        clauses = [_garment_change_clause(rng, category, k, tgt) for k in keys]
        if "colour" not in keys and rng.random() < 0.15:
            clauses.insert(0, f"is {_with_article(tgt['colour'] + ' ' + _pick(rng, _GARMENT_NOUNS[category]))}")
        texts.append(_join_clauses(clauses) if rng.random() < 0.5 else " and ".join(clauses))
    return texts


# ----------------------------------------------------------------------------------------------
# Drawing


def _pattern_array(w: int, h: int, base: Sequence[int], pattern: str, period: int) -> np.ndarray:
    """[h, w, 3] uint8: `base` with its tint in bands, dots or checks; the top-left corner is `base`."""
    yy, xx = np.ogrid[0:h, 0:w]  # broadcast, not materialised
    half = period // 2
    if pattern in ("plain", "solid"):
        mask = np.zeros((h, w), dtype=bool)
    elif pattern == "striped":
        mask = (yy % period) >= period - max(2, period * 3 // 8)  # thin tinted bands: the base colour dominates
    elif pattern == "dotted":
        mask = ((xx % period) - half) ** 2 + ((yy % period) - half) ** 2 <= max(2, period // 4) ** 2
    elif pattern == "checkered":
        mask = ((xx // half) + (yy // half)) % 2 == 1
    elif pattern == "plaid":  # thin bands both ways: the base colour still covers most of the cloth
        band = max(2, period // 4)
        mask = ((yy % period) >= period - band) | ((xx % period) >= period - band)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[...] = base
    out[np.broadcast_to(mask, (h, w))] = _tint(base)
    return out


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n, radius, start=-90.0):
        return [(cx + radius * math.cos(math.radians(start + 360 * i / n)),
                 cy + radius * math.sin(math.radians(start + 360 * i / n))) for i in range(n)]

    if shape == "square":
        a = r * 0.8
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "triangle":
        return ring(3, r)  # centroid at the centre, so the centre pixel is inside
    if shape == "cross":
        a = r * 0.32
        arm = [(a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r)]
        return [(cx + x, cy + y) for x, y in arm] + [(cx - x, cy - y) for x, y in arm]
    if shape == "heart":  # the classic parametric heart, its bounding box centred on (cx, cy)
        ts = [2 * math.pi * i / 48 for i in range(48)]
        xs = [16 * math.sin(t) ** 3 for t in ts]
        ys = [-(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) for t in ts]
        k, mid = r / 16.0, (max(ys) + min(ys)) / 2
        return [(cx + k * x, cy + k * (y - mid)) for x, y in zip(xs, ys)]
    if shape == "star":
        outer, inner = ring(5, r), ring(5, r * 0.45, start=-54.0)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(record: dict) -> Image.Image:
    """The image of a shape-world record (attributes + canvas + center)."""
    w, h = record["canvas"]
    cx, cy = record["center"]
    img = Image.fromarray(_pattern_array(w, h, COLOURS[record["background"]], record["pattern"], period=16))
    r = min(w, h) * (0.38 if record["size"] == "large" else 0.22)  # keeps a margin clear of the object
    draw = ImageDraw.Draw(img)
    fill = COLOURS[record["colour"]]
    if record["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_points(record["shape"], cx, cy, r), fill=fill)
    return img


def _garment_polygons(category: str, variant: str, fit: str = "fitted") -> list[list[tuple[float, float]]]:
    """Silhouette polygons in unit coordinates (x right, y down); (0.5, 0.5) is always inside.
    A loose garment is the fitted one widened about the centre line."""
    polygons = _fitted_polygons(category, variant)
    if fit == "fitted":
        return polygons
    if fit != "loose":
        raise ValueError(f"unknown fit {fit!r}")
    return [[(0.5 + 1.22 * (x - 0.5), y) for x, y in poly] for poly in polygons]


def _fitted_polygons(category: str, variant: str) -> list[list[tuple[float, float]]]:
    if category == "dress":
        hem = 0.62 if variant == "short" else 1.0
        return [[(0.36, 0.0), (0.64, 0.0), (0.68, 0.34), (0.32, 0.34)],
                [(0.32, 0.34), (0.68, 0.34), (0.86, hem), (0.14, hem)]]
    if category == "shirt":
        body = [(0.25, 0.08), (0.75, 0.08), (0.75, 1.0), (0.25, 1.0)]
        if variant == "short":
            left = [(0.25, 0.08), (0.04, 0.30), (0.13, 0.40), (0.25, 0.26)]
        else:
            left = [(0.25, 0.08), (0.0, 0.86), (0.11, 0.90), (0.25, 0.32)]
        return [body, left, [(1 - x, y) for x, y in left]]
    if category == "toptee":
        body = [(0.28, 0.16), (0.72, 0.16), (0.72, 0.96), (0.28, 0.96)]
        if variant == "sleeveless":
            left = [(0.32, 0.0), (0.37, 0.0), (0.37, 0.16), (0.32, 0.16)]
        else:
            left = [(0.28, 0.16), (0.10, 0.32), (0.18, 0.42), (0.28, 0.32)]
        return [body, left, [(1 - x, y) for x, y in left]]
    raise ValueError(f"unknown FashionIQ category {category!r}")


GRAPHIC_BOX = ((0.40, 0.18), (0.60, 0.38))  # unit coordinates of a graphic, inside every cut's chest


def graphic_ink(colour: str) -> tuple[int, int, int]:
    """A graphic's colour: black on light cloth, yellow on dark (white would vanish into the backdrop);
    neither is the tint of a pattern."""
    c = COLOURS[colour]
    return COLOURS["black"] if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] >= 100 else COLOURS["yellow"]


def render_garment(category: str, record: dict) -> Image.Image:
    """The image of a FashionIQ record (attributes + canvas + center) on a light backdrop."""
    w, h = record["canvas"]
    cx, cy = record["center"]
    bw, bh = 0.72 * min(w, h), 0.86 * h  # a loose garment's long sleeves still stay clear of the edges
    x0, y0 = cx - bw / 2, cy - bh / 2
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for poly in _garment_polygons(category, record["variant"], record["fit"]):
        draw.polygon([(x0 + u * bw, y0 + v * bh) for u, v in poly], fill=255)
    # the scenes' period: at the toy CLIP's 48 pixels a stripe or a dot is 2-3 pixels across, a plaid line 1-2
    cloth = Image.fromarray(_pattern_array(w, h, COLOURS[record["colour"]], record["pattern"], period=16))
    if record["print"] == "graphic":  # on the chest, above the centre (so (0.5, 0.5) keeps the cloth's colour)
        (u0, v0), (u1, v1) = GRAPHIC_BOX
        ImageDraw.Draw(cloth).rectangle([x0 + u0 * bw, y0 + v0 * bh, x0 + u1 * bw, y0 + v1 * bh],
                                        fill=graphic_ink(record["colour"]))
    img = Image.new("RGB", (w, h), GARMENT_BACKDROP)
    img.paste(cloth, (0, 0), mask)
    return img


KINDS = ("scene",) + FASHIONIQ_CATEGORIES  # what an image shows: a shape scene or a garment of a category
KIND_ATTRIBUTES = {"scene": SCENE_ATTRIBUTES, **{c: GARMENT_ATTRIBUTES for c in FASHIONIQ_CATEGORIES}}


def random_attributes(rng, kind: str) -> dict:
    if kind == "scene":
        return _sample(rng, SCENE_DOMAINS, _valid_scene)
    return _sample(rng, _garment_domains(kind), _always_valid)


def render_record(record: dict) -> Image.Image:
    """The image of any record that carries its `kind` (ImageNet and web records do)."""
    kind = record["kind"]
    img = render_scene(record) if kind == "scene" else render_garment(kind, record)
    return img.convert("L").convert("RGB") if record.get("grayscale") else img


def _save_image(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".png":
        img.save(path, format="PNG")
    elif suffix in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=95, subsampling=0)  # 4:4:4 keeps colours checkable per pixel
    else:
        raise ValueError(f"{path}: unsupported image suffix {path.suffix!r} (use .png, .jpg or .JPEG)")


def _write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# The four benchmarks


def _make_imagenet(root: Path, rng, n: int, garment_share: float = 0.25) -> dict:
    """ImageNet test images with caption pairs: mostly shape scenes, and a share of garments (ImageNet
    holds clothes too: jerseys, gowns, cardigans...), so the network learns to invert both kinds."""
    taken: set = set()
    records, pairs = {}, []
    for i in range(1, n + 1):
        img_id = f"{i:08d}"
        kind = "scene" if rng.random() >= garment_share else _pick(rng, FASHIONIQ_CATEGORIES)
        # unique while the attribute space allows it; repeats only for very large --num-train-images
        for _ in range(50):
            attrs = random_attributes(rng, kind)
            if (kind, *_key(attrs, KIND_ATTRIBUTES[kind])) not in taken:
                break
        taken.add((kind, *_key(attrs, KIND_ATTRIBUTES[kind])))
        rec = {"kind": kind, **attrs, **_layout(rng, SCENE_CANVASES if kind == "scene" else GARMENT_CANVASES)}
        _save_image(render_record(rec), root / "test" / f"ILSVRC2012_test_{img_id}.JPEG")
        records[img_id] = rec
        subject, attribute = (scene_subject(attrs), scene_attribute(attrs)) if kind == "scene" else garment_pair(kind, attrs)
        pairs.append({"img_id": img_id, "subject": subject, "attribute": attribute})
    _write_json(pairs, root / "pairs.json")
    return records


def _asin(rng, used: set) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    while True:
        name = "B0" + "".join(alphabet[int(i)] for i in rng.integers(len(alphabet), size=8))
        if name not in used:
            used.add(name)
            return name


def _make_fashioniq(root: Path, seed: int, num_queries: int, num_distractors: int) -> tuple[dict, dict]:
    records: dict = {c: {} for c in FASHIONIQ_CATEGORIES}
    hidden: dict = {c: {} for c in FASHIONIQ_CATEGORIES}
    used_names: set = set()
    for ci, cat in enumerate(FASHIONIQ_CATEGORIES):
        domains = _garment_domains(cat)
        space = math.prod(len(v) for v in domains.values())
        if 2 * num_queries + num_distractors > space:
            raise ValueError(
                f"FashionIQ {cat}: {2 * num_queries + num_distractors} distinct images per split requested "
                f"but only {space} attribute combinations exist; lower --num-fashioniq-queries / --num-distractors"
            )
        for si, split in enumerate(FASHIONIQ_SPLITS):
            rng = np.random.default_rng([seed, 1, ci, si])
            taken: set = set()
            gallery, captions, targets = [], [], []

            def add(attrs):
                name = _asin(rng, used_names)
                rec = {**attrs, **_layout(rng, GARMENT_CANVASES)}
                records[cat][name] = rec
                _save_image(render_garment(cat, rec), root / cat / f"{name}.jpg")
                gallery.append(name)
                return name

            for _ in range(num_queries):
                ref = _unique(lambda: _sample(rng, domains, _always_valid), taken, GARMENT_ATTRIBUTES, "a reference")
                tgt = _unique(lambda: _mutate(rng, ref, domains, _always_valid, int(rng.integers(1, 4))),
                              taken, GARMENT_ATTRIBUTES, "a target")
                ref_name, tgt_name = add(ref), add(tgt)
                texts = fashioniq_captions(rng, cat, ref, tgt)
                texts = [t + "." if rng.random() < 0.25 else t for t in texts]  # real captions carry stray dots
                entry = {"candidate": ref_name, "captions": texts} if split == "test" else \
                    {"target": tgt_name, "candidate": ref_name, "captions": texts}
                captions.append(entry)
                targets.append(tgt_name)
            for _ in range(num_distractors):
                add(_unique(lambda: _sample(rng, domains, _always_valid), taken, GARMENT_ATTRIBUTES, "a distractor"))
            order = rng.permutation(len(gallery))
            _write_json([gallery[i] for i in order], root / "image_splits" / f"split.{cat}.{split}.json")
            _write_json(captions, root / "captions" / f"cap.{cat}.{split}.json")
            if split == "test":
                hidden[cat]["test"] = targets
    return records, hidden


def _make_cirr(root: Path, seed: int, num_queries: int, num_distractors: int) -> tuple[dict, dict]:
    records: dict = {}
    hidden: dict = {}
    pairid = 0
    for si, (split, folder) in enumerate(CIRR_SPLITS.items()):
        rng = np.random.default_rng([seed, 2, si])
        n_sets = math.ceil(num_queries / CIRR_QUERIES_PER_SET)
        n_images = n_sets * CIRR_SET_SIZE + num_distractors
        numbers = iter(int(a) for a in rng.permutation(10 * n_images + 100)[:n_images])
        taken: set = set()
        split_map: dict = {}

        def add(attrs):
            a = next(numbers)
            name = f"{folder}-{a}-{int(rng.integers(4))}-img{int(rng.integers(2))}"
            sub = f"{folder}/{a % 4}" if split == "train" else folder  # the real train images sit in numbered folders
            rel = f"./{sub}/{name}.png"
            rec = {**attrs, **_layout(rng, SCENE_CANVASES)}
            records[name] = rec
            _save_image(render_scene(rec), root / rel[2:])
            split_map[name] = rel
            return name

        captions = []
        left = num_queries
        for set_id in range(n_sets):
            # a chain of 6 images, each a 1-2 attribute edit of the previous: hard in-set distractors
            chain_attrs = [_unique(lambda: _sample(rng, SCENE_DOMAINS, _valid_scene), taken, SCENE_ATTRIBUTES, "an image")]
            while len(chain_attrs) < CIRR_SET_SIZE:
                prev = chain_attrs[-1]
                chain_attrs.append(_unique(
                    lambda: _mutate(rng, prev, SCENE_DOMAINS, _valid_scene, int(rng.integers(1, 3))),
                    taken, SCENE_ATTRIBUTES, "an image"))
            chain = [add(a) for a in chain_attrs]
            members = [chain[i] for i in rng.permutation(CIRR_SET_SIZE)]
            n_q = min(CIRR_QUERIES_PER_SET, left)
            left -= n_q
            for rank in sorted(int(r) for r in rng.choice(CIRR_SET_SIZE, size=n_q, replace=False)):
                t_rank = (rank + 1) % CIRR_SET_SIZE
                ref, tgt = chain[rank], chain[t_rank]
                text = _scene_change_text(rng, chain_attrs[rank], chain_attrs[t_rank])
                img_set = {"id": set_id, "members": members, "reference_rank": rank}
                if split == "test1":
                    entry = {"pairid": pairid, "reference": ref, "caption": text, "img_set": img_set}
                    hidden.setdefault("test1", {})[str(pairid)] = tgt
                else:
                    img_set["target_rank"] = t_rank
                    entry = {"pairid": pairid, "reference": ref, "target_hard": tgt, "target_soft": {tgt: 1.0},
                             "caption": text, "img_set": img_set}
                captions.append(entry)
                pairid += 1
        for _ in range(num_distractors):
            add(_unique(lambda: _sample(rng, SCENE_DOMAINS, _valid_scene), taken, SCENE_ATTRIBUTES, "a distractor"))
        names = list(split_map)
        ordered = {names[i]: split_map[names[i]] for i in rng.permutation(len(names))}
        _write_json(ordered, root / "cirr" / "image_splits" / f"split.rc2.{split}.json")
        _write_json(captions, root / "cirr" / "captions" / f"cap.rc2.{split}.json")
    return records, hidden


def _circo_change_text(rng, changes: dict) -> str:
    clauses = []
    if "colour" in changes:
        clauses.append(_pick(rng, (f"is {changes['colour']}", f"is {changes['colour']} instead")))
    if "background" in changes or "pattern" in changes:
        clauses.append(_background_clause(rng, changes.get("background"), changes.get("pattern")))
    return _join_clauses(clauses)


def circo_matches(columns: dict[str, np.ndarray], constraints: dict) -> np.ndarray:
    """Which images (attribute `columns`: name -> one value per image) have every value a CIRCO query asks for."""
    match = np.ones(len(next(iter(columns.values()))), dtype=bool)
    for k, v in constraints.items():
        match &= columns[k] == v
    return match


def _make_circo(root: Path, seed: int, num_queries: int, num_distractors: int) -> tuple[dict, dict]:
    rng = np.random.default_rng([seed, 3])
    taken: set = set()
    gallery: list[dict] = []  # attribute dicts, in creation order

    def add(attrs):
        gallery.append(attrs)
        return len(gallery) - 1

    queries: dict = {}
    for split in CIRCO_SPLITS:
        queries[split] = []
        for _ in range(num_queries):
            ref = _unique(lambda: _sample(rng, SCENE_DOMAINS, _valid_scene), taken, SCENE_ATTRIBUTES, "a reference")
            changed = [("colour", "background", "pattern")[int(i)] for i in
                       sorted(rng.choice(3, size=int(rng.integers(1, 3)), replace=False))]
            for _ in range(1000):  # new values for the changed attributes that still contrast
                changes = {k: _pick(rng, [v for v in SCENE_DOMAINS[k] if v != ref[k]]) for k in changed}
                trial = {**ref, **changes}
                if _valid_scene(trial):
                    break
            else:
                raise ValueError(f"no valid change of {changed} for {ref}")
            # The shared concept is the object as the reference shows it (its size, its colour unless the
            # caption changes it, its shape); the caption says what else the targets have; whatever neither
            # names is free.
            concept = {k: ref[k] for k in ("size", "colour", "shape") if k not in changes}
            constraints = {**concept, **changes}
            # Every gallery image that matches is a ground truth, so images may repeat attributes (as COCO's
            # near-duplicates do): only the references are kept distinct.
            members = [add(ref)] + [add(_sample(rng, SCENE_DOMAINS, _valid_scene, fixed=constraints))
                                    for _ in range(int(rng.integers(2, 5)))]  # the target and further ground truths
            # a hard negative: all but one of the concept's and the caption's attributes
            broken = _pick(rng, list(constraints))
            near = dict(constraints)
            near.pop(broken)
            add(_mutate_until(rng, near, broken, constraints))
            queries[split].append({"ref": members[0], "target": members[1], "constraints": constraints,
                                   "caption": _circo_change_text(rng, changes),
                                   "concept": _with_article(" ".join(concept.values()))})
    for _ in range(num_distractors):
        add(_sample(rng, SCENE_DOMAINS, _valid_scene))

    ids = [int(i) + 1 for i in rng.choice(581929, size=len(gallery), replace=False)]  # COCO-like ids
    records, images = {}, []
    for idx in rng.permutation(len(gallery)):
        img_id = ids[idx]
        rec = {**gallery[idx], **_layout(rng, SCENE_CANVASES)}
        file_name = f"{img_id:012d}.jpg"
        _save_image(render_scene(rec), root / "COCO2017_unlabeled" / "unlabeled2017" / file_name)
        records[str(img_id)] = rec
        images.append(_coco_image_entry(img_id, file_name, rec["canvas"]))
    _write_json(_coco_image_info(images), root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")

    hidden: dict = {"test": {}}
    columns = {k: np.array([a[k] for a in gallery]) for k in SCENE_ATTRIBUTES}
    for split in CIRCO_SPLITS:
        entries = []
        for qid, q in enumerate(queries[split]):
            target_id = ids[q["target"]]
            # every gallery image with the concept's and the caption's attributes is a ground truth
            others = [ids[i] for i in np.flatnonzero(circo_matches(columns, q["constraints"])) if ids[i] != target_id]
            gt = [target_id] + [others[i] for i in rng.permutation(len(others))]
            ref_id = ids[q["ref"]]
            if split == "val":
                entries.append({"reference_img_id": ref_id, "target_img_id": target_id,
                                "relative_caption": q["caption"], "shared_concept": q["concept"],
                                "gt_img_ids": gt, "id": qid})
            else:
                entries.append({"reference_img_id": ref_id, "relative_caption": q["caption"],
                                "shared_concept": q["concept"], "id": qid})
                hidden["test"][str(qid)] = {"target_img_id": target_id, "gt_img_ids": gt}
        _write_json(entries, root / "annotations" / f"{split}.json")
    return records, hidden


def _mutate_until(rng, keep: dict, broken: str, constraints: dict) -> dict:
    """Random valid attributes with `keep` fixed and `broken` set to anything but its asked-for value."""
    for _ in range(1000):
        attrs = _sample(rng, SCENE_DOMAINS, _valid_scene, fixed=keep)
        if attrs[broken] != constraints[broken]:
            return attrs
    raise ValueError(f"cannot break {broken} of {constraints}")


def _coco_image_entry(img_id: int, file_name: str, canvas: Sequence[int]) -> dict:
    w, h = canvas
    return {"license": 1, "file_name": file_name, "coco_url": f"http://images.cocodataset.org/unlabeled2017/{file_name}",
            "height": int(h), "width": int(w), "date_captured": "2017-01-01 00:00:00", "id": int(img_id)}


def _coco_image_info(images: list[dict]) -> dict:
    return {
        "info": {"description": "fti4cir toy stand-in for COCO 2017 Unlabeled Image Info", "version": "1.0",
                 "year": 2017, "contributor": "scripts/make_toy_data.py", "date_created": "2017-01-01"},
        "licenses": [{"id": 1, "name": "toy images, generated", "url": ""}],
        "images": images,
        "categories": [],
    }


# ----------------------------------------------------------------------------------------------
# The web part: image-caption pairs for training a small CLIP (scripts/make_toy_clip.py)


def image_key(kind: str, record: dict) -> tuple:
    """What decides an image's pixels: its kind, attributes, canvas and centre."""
    return (kind, *_key(record, KIND_ATTRIBUTES[kind]), *record["canvas"], *record["center"])


def world_image_keys(manifest: dict) -> set:
    """The image keys of every image of a toy world (its toy_manifest.json): ImageNet and all benchmarks."""
    images = manifest["images"]
    keys = {image_key(r["kind"], r) for r in images["ImageNet"].values()}
    keys |= {image_key(cat, r) for cat, recs in images["FashionIQ"].items() for r in recs.values()}
    keys |= {image_key("scene", r) for part in ("CIRR", "CIRCO") for r in images[part].values()}
    return keys


SCENE_PAGE_WEIGHTS = (0.4, 0.15, 0.15, 0.1, 0.2)  # shape, colour, background, pattern, size: sheets of shapes


def web_pages(seed: int, num_pages: int, page_size: int = 4, exclude: set = frozenset(),
              garment_share: float = 0.4, grayscale_share: float = 0.25) -> list[list[dict]]:
    """The web part: `num_pages` pages of `page_size` distinct images each (records with their `kind`),
    none of whose keys is in `exclude`. A page shows variants of one thing, each one or two attributes
    away from the page's first image (a shop page of one dress in several colours, a sheet of shapes in
    one colour), as the web is full of near-duplicates; a page is a scene page or, with probability
    `garment_share`, a garment page of any category; a share `grayscale_share` of the scene pages are
    black-and-white photos (their captions name no colour), where only the outlines tell things apart.
    Deterministic."""
    rng = np.random.default_rng([seed, 4])
    seen = set(exclude)
    pages = []
    while len(pages) < num_pages:
        kind = "scene" if rng.random() >= garment_share else _pick(rng, FASHIONIQ_CATEGORIES)
        domains = SCENE_DOMAINS if kind == "scene" else _garment_domains(kind)
        valid = _valid_scene if kind == "scene" else _always_valid
        canvases = SCENE_CANVASES if kind == "scene" else GARMENT_CANVASES
        base = random_attributes(rng, kind)
        grayscale = kind == "scene" and rng.random() < grayscale_share
        page, keys = [], set()
        for _ in range(20 * page_size):
            if len(page) == page_size:
                break
            attrs = base if not page else _mutate(rng, base, domains, valid, int(rng.integers(1, 3)),
                                                  SCENE_PAGE_WEIGHTS if kind == "scene" else None)
            rec = {"kind": kind, **attrs, **_layout(rng, canvases), **({"grayscale": True} if grayscale else {})}
            key = image_key(kind, rec)  # a grey copy of a world image counts as that image: it is left out too
            if key not in seen and _key(attrs, KIND_ATTRIBUTES[kind]) not in keys:
                keys.add(_key(attrs, KIND_ATTRIBUTES[kind]))
                seen.add(key)
                page.append(rec)
        if len(page) == page_size:
            pages.append(page)
    return pages


def web_caption(rng, record: dict) -> str:
    kind = record["kind"]
    return web_scene_caption(rng, record) if kind == "scene" else web_garment_caption(rng, kind, record)


# ----------------------------------------------------------------------------------------------
# Public entry points


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
        images["ImageNet"] = _make_imagenet(tmp / "ImageNet", np.random.default_rng([seed, 0]), num_train_images)
        images["FashionIQ"], hidden["FashionIQ"] = _make_fashioniq(tmp / "FashionIQ", seed, num_fashioniq_queries,
                                                                   num_distractors)
        images["CIRR"], hidden["CIRR"] = _make_cirr(tmp / "CIRR", seed, num_cirr_queries, num_distractors)
        images["CIRCO"], hidden["CIRCO"] = _make_circo(tmp / "CIRCO", seed, num_queries, num_distractors)
        manifest = {
            "generator": "scripts/make_toy_data.py",
            "seed": seed,
            "sizes": {"num_train_images": num_train_images, "num_queries": num_queries,
                      "num_fashioniq_queries": num_fashioniq_queries, "num_cirr_queries": num_cirr_queries,
                      "num_distractors": num_distractors},
            "images": images,
            "hidden_targets": hidden,
        }
        _write_json(manifest, tmp / MANIFEST_NAME)
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


# ----------------------------------------------------------------------------------------------
# Placeholder images for the real annotation files


def _relative_image_paths(dataset_root: Path, benchmark: str, items: Iterable, category: str | None) -> list[str]:
    benchmark = benchmark.lower()
    if benchmark not in PLACEHOLDER_BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {PLACEHOLDER_BENCHMARKS}")
    cirr_index = None
    rels = []
    for item in items:
        text = str(item).strip()
        if benchmark == "imagenet":
            if re.fullmatch(r"\d+", text):
                rel = f"test/ILSVRC2012_test_{int(text):08d}.JPEG"
            else:
                rel = text
        elif benchmark == "fashioniq":
            if "/" in text:
                rel = text if text.lower().endswith(".jpg") else text + ".jpg"
            elif category is not None:
                rel = f"{category}/{text}.jpg"
            else:
                raise ValueError(f"FashionIQ name {text!r} has no category: pass 'dress/{text}' or category='dress'")
            if rel.split("/")[0] not in FASHIONIQ_CATEGORIES:
                raise ValueError(f"{rel}: FashionIQ images live under one of {FASHIONIQ_CATEGORIES}")
        elif benchmark == "cirr":
            if "/" in text:
                rel = text[2:] if text.startswith("./") else text
            else:
                if cirr_index is None:
                    cirr_index = _cirr_name_index(dataset_root)
                if text not in cirr_index:
                    raise ValueError(f"CIRR name {text!r} is in no {dataset_root / 'cirr/image_splits'}/split.rc2.*.json; "
                                     "pass its relative path ('./dev/<name>.png') or put the split file there")
                rel = cirr_index[text][2:]
        else:  # circo
            if text.lower().endswith(".jpg"):
                rel = "COCO2017_unlabeled/unlabeled2017/" + text.split("/")[-1]
            elif re.fullmatch(r"\d+", text):
                rel = f"COCO2017_unlabeled/unlabeled2017/{int(text):012d}.jpg"
            else:
                raise ValueError(f"CIRCO item {item!r} is neither an image id nor a '<12 digits>.jpg' file name")
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise ValueError(f"{item!r}: image paths must be relative to the dataset root without '..'")
        rels.append(rel)
    return rels


def _cirr_name_index(dataset_root: Path) -> dict[str, str]:
    split_dir = dataset_root / "cirr" / "image_splits"
    files = sorted(split_dir.glob("split.rc2.*.json"))
    if not files:
        raise FileNotFoundError(f"no split.rc2.*.json in {split_dir}; copy the CIRR split files there "
                                "or pass relative paths ('./dev/<name>.png') instead of bare names")
    index: dict = {}
    for f in files:
        index.update(json.loads(f.read_text()))
    return index


def placeholder_image(rel_path: str, size: tuple[int, int] = (48, 32)) -> Image.Image:
    """A plain colour with a centred block of another colour, both from a hash of `rel_path`."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    bg = np.frombuffer(digest[:3], dtype=np.uint8)
    fg = np.frombuffer(digest[3:6], dtype=np.uint8)
    if _distance(bg, fg) < 100:
        fg = 255 - bg  # keep the block visible
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[...] = bg
    arr[h // 4: h - h // 4, w // 4: w - w // 4] = fg
    return Image.fromarray(arr)


def make_placeholder_images(dataset_root, benchmark: str, names_or_paths: Iterable, size: tuple[int, int] = (48, 32),
                            *, category: str | None = None) -> list[Path]:
    """Write small generated images where the real dataset keeps the named images; return their paths.

    dataset_root: the benchmark's root folder (the one holding captions/, cirr/, annotations/, test/ ...).
    benchmark: 'imagenet' | 'fashioniq' | 'cirr' | 'circo' (any case). Items of `names_or_paths`:
      imagenet:  an id (1 or '00000001') -> test/ILSVRC2012_test_00000001.JPEG, or a relative path;
      fashioniq: '<cat>/<name>' (or with .jpg) -> <cat>/<name>.jpg; a bare '<name>' needs category=;
      cirr:      a split-json value ('./dev/dev-244-0-img0.png'), or a bare name, looked up in
                 <dataset_root>/cirr/image_splits/split.rc2.*.json (copy the real ones there first);
      circo:     an image id (int or digits) or a file name -> COCO2017_unlabeled/unlabeled2017/<12 digits>.jpg.
    Each image (size = (width, height)) is distinct per path and identical across runs; existing
    files are overwritten; the format follows the suffix (.png, .jpg, .JPEG).
    For CIRCO also call `write_circo_image_info` so the gallery file lists the same ids.
    """
    root = Path(dataset_root)
    written = []
    seen = set()
    for rel in _relative_image_paths(root, benchmark, names_or_paths, category):
        path = root / rel
        if rel not in seen:
            seen.add(rel)
            _save_image(placeholder_image(rel, size), path)
        written.append(path)
    return written


def write_circo_image_info(dataset_root, image_ids: Iterable, size: tuple[int, int] = (48, 32)) -> Path:
    """Write COCO2017_unlabeled/annotations/image_info_unlabeled2017.json listing `image_ids` (the CIRCO
    gallery), in the real file's shape, with width/height = `size`; return its path."""
    ids = sorted({int(i) for i in image_ids})
    images = [_coco_image_entry(i, f"{i:012d}.jpg", size) for i in ids]
    path = Path(dataset_root) / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    _write_json(_coco_image_info(images), path)
    return path


if __name__ == "__main__":
    main()
