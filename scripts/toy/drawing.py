"""How a record of attributes (plus its canvas and centre) becomes an image, and how images are saved."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from toy.attributes import COLOURS, tint

GARMENT_BACKDROP = (236, 236, 236)


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
    out[np.broadcast_to(mask, (h, w))] = tint(base)
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


def render_record(record: dict) -> Image.Image:
    """The image of any record that carries its `kind` (ImageNet and web records do)."""
    kind = record["kind"]
    img = render_scene(record) if kind == "scene" else render_garment(kind, record)
    return img.convert("L").convert("RGB") if record.get("grayscale") else img


def save_image(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".png":
        img.save(path, format="PNG")
    elif suffix in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=95, subsampling=0)  # 4:4:4 keeps colours checkable per pixel
    else:
        raise ValueError(f"{path}: unsupported image suffix {path.suffix!r} (use .png, .jpg or .JPEG)")
