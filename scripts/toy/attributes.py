"""What a toy image is: the named attributes of the shape world (a coloured shape on a patterned
background) and of the garment world (a dress, shirt or top), their domains, and the seeded draws and
edits of attribute sets that every part of the toy world is built from."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

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


def colour_distance(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def tint(rgb: Sequence[int]) -> tuple[int, int, int]:
    """The second colour of a pattern: lighter for dark colours, darker for light ones."""
    c = np.asarray(rgb, dtype=float)
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    out = c + 0.45 * (255 - c) if lum < 140 else c * 0.65
    return tuple(int(round(v)) for v in out)


def _contrasting_backgrounds(colour: str) -> tuple[str, ...]:
    rgb = COLOURS[colour]
    return tuple(
        bg for bg, bg_rgb in COLOURS.items()
        if colour_distance(rgb, bg_rgb) >= 100 and colour_distance(rgb, tint(bg_rgb)) >= 100
    )


BACKGROUNDS_FOR = {c: _contrasting_backgrounds(c) for c in COLOURS}
SCENE_DOMAINS = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(COLOURS),
                 "pattern": PATTERNS, "size": SIZES}


def garment_domains(category: str) -> dict[str, tuple[str, ...]]:
    return {"colour": GARMENT_COLOURS, "pattern": GARMENT_PATTERNS, "print": GARMENT_PRINTS,
            "variant": GARMENT_VARIANTS[category], "fit": GARMENT_FITS}


def valid_scene(attrs: dict) -> bool:
    return attrs["background"] in BACKGROUNDS_FOR[attrs["colour"]]


def always_valid(attrs: dict) -> bool:
    return True


def pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def sample_attributes(rng, domains: dict, valid: Callable[[dict], bool], fixed: dict | None = None) -> dict:
    """Random attributes, `fixed` ones kept, satisfying `valid`."""
    fixed = fixed or {}
    for _ in range(1000):
        attrs = {k: fixed[k] if k in fixed else pick(rng, v) for k, v in domains.items()}
        if valid(attrs):
            return attrs
    raise ValueError(f"no valid attributes with {fixed}")


def mutate_attributes(rng, attrs: dict, domains: dict, valid, n_changes: int,
                      weights: Sequence[float] | None = None) -> dict:
    """`attrs` with `n_changes` attributes set to other values (chosen with probabilities ∝ `weights`)."""
    names = list(domains)
    p = None if weights is None else np.asarray(weights, dtype=float) / sum(weights)
    for _ in range(1000):
        changed = rng.choice(len(names), size=n_changes, replace=False, p=p)
        new = dict(attrs)
        for i in sorted(int(i) for i in changed):
            name = names[i]
            new[name] = pick(rng, [v for v in domains[name] if v != attrs[name]])
        if valid(new):
            return new
    raise ValueError(f"cannot change {n_changes} attributes of {attrs}")


def attribute_key(attrs: dict, names: Sequence[str]) -> tuple:
    return tuple(attrs[n] for n in names)


def draw_distinct(make: Callable[[], dict], taken: set, names: Sequence[str], what: str) -> dict:
    """Call `make` until its attributes differ from every image in `taken`; records them."""
    for _ in range(2000):
        attrs = make()
        key = attribute_key(attrs, names)
        if key not in taken:
            taken.add(key)
            return attrs
    raise ValueError(
        f"cannot find {what} with attributes different from the {len(taken)} images already drawn; "
        "lower --num-queries / --num-distractors"
    )


def random_layout(rng, canvases) -> dict:
    """Canvas size and a small jitter of the object's centre (not an attribute: texts ignore it)."""
    w, h = pick(rng, canvases)
    return {"canvas": [int(w), int(h)], "center": [int(w // 2 + rng.integers(-4, 5)), int(h // 2 + rng.integers(-4, 5))]}


KINDS = ("scene",) + FASHIONIQ_CATEGORIES  # what an image shows: a shape scene or a garment of a category
KIND_ATTRIBUTES = {"scene": SCENE_ATTRIBUTES, **{c: GARMENT_ATTRIBUTES for c in FASHIONIQ_CATEGORIES}}


def random_attributes(rng, kind: str) -> dict:
    if kind == "scene":
        return sample_attributes(rng, SCENE_DOMAINS, valid_scene)
    return sample_attributes(rng, garment_domains(kind), always_valid)


def image_key(kind: str, record: dict) -> tuple:
    """What decides an image's pixels: its kind, attributes, canvas and centre."""
    return (kind, *attribute_key(record, KIND_ATTRIBUTES[kind]), *record["canvas"], *record["center"])
