"""Retrieval examples to look at: one row per query with the reference image, the modification text
and the top results, the target(s) framed in green. Written as one PNG grid per benchmark."""
from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from utils import atomic_write_bytes

TILE = 128  # pixels per image tile
TEXT_W = 200  # width of the text column
PAD = 6
TARGET_COLOUR = (30, 170, 60)
REFERENCE_COLOUR = (60, 90, 200)


@dataclass
class ExampleRow:
    reference: Path
    text: str
    results: list[Path]  # best first
    is_target: list[bool] = field(default_factory=list)  # one flag per result
    caption: str = ""  # e.g. the query id


def _tile(path: Path, frame=None) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((TILE - 2 * PAD, TILE - 2 * PAD))
    tile = Image.new("RGB", (TILE, TILE), (255, 255, 255))
    tile.paste(im, ((TILE - im.width) // 2, (TILE - im.height) // 2))
    if frame is not None:
        ImageDraw.Draw(tile).rectangle([1, 1, TILE - 2, TILE - 2], outline=frame, width=4)
    return tile


def grid_size(rows: int, top: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid for `rows` queries with `top` results each."""
    return TILE * (1 + top) + TEXT_W, TILE * rows + 24


def save_example_grid(rows: list[ExampleRow], path, title: str = "") -> Path:
    """Writes the PNG grid atomically and returns its path. Columns: reference, text, results."""
    if not rows:
        raise ValueError("no example rows to draw")
    top = max(len(r.results) for r in rows)
    width, height = grid_size(len(rows), top)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)  # Pillow's embedded TrueType font; the bitmap one swallows spaces
    draw.text((PAD, 4), title or "reference | modification | top results (green frame: target)", fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = 24 + i * TILE
        canvas.paste(_tile(row.reference, REFERENCE_COLOUR), (0, y))
        text = (row.caption + "\n" if row.caption else "") + "\n".join(textwrap.wrap(row.text, 26)[:7])
        draw.multiline_text((TILE + PAD, y + PAD), text, fill=(0, 0, 0), font=font, spacing=2)
        flags = row.is_target or [False] * len(row.results)
        for j, (res, hit) in enumerate(zip(row.results, flags)):
            canvas.paste(_tile(res, TARGET_COLOUR if hit else None), (TILE + TEXT_W + j * TILE, y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(buf.getvalue(), path)
    return Path(path)
