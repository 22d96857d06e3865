"""The web part of the toy world: captioned images for training a small CLIP (scripts/make_toy_clip.py),
in pages of near-duplicates, none of them an image of the world's benchmarks (not written to disk)."""
from __future__ import annotations

import numpy as np

from toy.attributes import (FASHIONIQ_CATEGORIES, GARMENT_CANVASES, KIND_ATTRIBUTES, SCENE_CANVASES, SCENE_DOMAINS,
                            always_valid, attribute_key, garment_domains, image_key, mutate_attributes, pick,
                            random_attributes, random_layout, valid_scene)

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
        kind = "scene" if rng.random() >= garment_share else pick(rng, FASHIONIQ_CATEGORIES)
        domains = SCENE_DOMAINS if kind == "scene" else garment_domains(kind)
        valid = valid_scene if kind == "scene" else always_valid
        canvases = SCENE_CANVASES if kind == "scene" else GARMENT_CANVASES
        base = random_attributes(rng, kind)
        grayscale = kind == "scene" and rng.random() < grayscale_share
        page, keys = [], set()
        for _ in range(20 * page_size):
            if len(page) == page_size:
                break
            attrs = base if not page else mutate_attributes(rng, base, domains, valid, int(rng.integers(1, 3)),
                                                  SCENE_PAGE_WEIGHTS if kind == "scene" else None)
            rec = {"kind": kind, **attrs, **random_layout(rng, canvases), **({"grayscale": True} if grayscale else {})}
            key = image_key(kind, rec)  # a grey copy of a world image counts as that image: it is left out too
            if key not in seen and attribute_key(attrs, KIND_ATTRIBUTES[kind]) not in keys:
                keys.add(attribute_key(attrs, KIND_ATTRIBUTES[kind]))
                seen.add(key)
                page.append(rec)
        if len(page) == page_size:
            pages.append(page)
    return pages
