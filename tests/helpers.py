"""Plain helpers shared by several test files (fixtures live in conftest.py): generated datasets in the
real layouts (noise images, random captions), the argument lists of the scripts, training logs and
checkpoints, DDP workers, src/test.py as a module, and independent readers of the toy world's texts."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import socket
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from checkpoint import load_checkpoint
from evaluation import EvalConfig
from features import Counters, Encoding
from toy.attributes import COLOURS, PATTERNS, SHAPES

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def load_test_script():
    """src/test.py as a module (under its plain name it would collide with the standard library's `test`
    package)."""
    spec = importlib.util.spec_from_file_location("fti4cir_test_script", REPO / "src" / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The keys of the authors' metrics files, written out here independently of evaluate.py.
KEYS = {
    "fashioniq": ["dress_10", "dress_50", "shirt_10", "shirt_50", "toptee_10", "toptee_50", "average_10", "average_50"],
    "cirr": ["cirr_recall_at1", "cirr_recall_at5", "cirr_recall_at10", "cirr_recall_at50",
             "cirr_group_recall_at1", "cirr_group_recall_at2", "cirr_group_recall_at3"],
    "circo": ["circo_map_at5", "circo_map_at10", "circo_map_at25", "circo_map_at50",
              "circo_recall_at5", "circo_recall_at10", "circo_recall_at25", "circo_recall_at50"],
}
ROOT_FLAG = {"fashioniq": "--fashioniq-path", "cirr": "--cirr-path", "circo": "--circo-path"}
WORDS = "red blue dog cat two three bigger smaller remove add shirt sleeves darker brighter outdoor wooden".split()
SIZES = [(40, 30), (32, 32), (26, 44), (36, 20)]


# ---------------------------------------------------------------------------------------------
# generated benchmark data: noise images, random captions

def noise_image(path: Path, rng: np.random.Generator) -> None:
    """A small noise image (every image distinct, so no two gallery features tie)."""
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def random_caption(rng) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))


def dump_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_cirr(root: Path, split: str, names: list[str], queries: list[dict], rng) -> None:
    """CIRR layout for `split` (val -> dev/): the split file, the captions, an image per name."""
    folder = {"val": "dev", "test1": "test1"}[split]
    dump_json({n: f"./{folder}/{n}.png" for n in names}, root / "cirr" / "image_splits" / f"split.rc2.{split}.json")
    dump_json(queries, root / "cirr" / "captions" / f"cap.rc2.{split}.json")
    for n in names:
        noise_image(root / folder / f"{n}.png", rng)


def make_cirr(root: Path, rng, n_images: int = 60, n_queries: int = 12) -> Path:
    for split, prefix in (("val", "dev"), ("test1", "test1")):
        names = [f"{prefix}-{i}-0-img{i % 2}" for i in range(n_images)]
        queries = []
        for q in range(n_queries):
            members = [names[j] for j in rng.choice(n_images, size=6, replace=False)]
            e = {"pairid": 1000 + q, "reference": members[0], "caption": random_caption(rng),
                 "img_set": {"id": q, "members": list(rng.permutation(members))}}
            if split == "val":
                e["target_hard"] = members[1]
            queries.append(e)
        write_cirr(root, split, names, queries, rng)
    return root


def write_circo(root: Path, ids: list[int], queries: dict[str, list[dict]], rng) -> None:
    dump_json({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]},
          root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")
    for split, entries in queries.items():
        dump_json(entries, root / "annotations" / f"{split}.json")
    for i in ids:
        noise_image(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg", rng)


def make_circo(root: Path, rng, n_images: int = 54, n_queries: int = 8) -> Path:
    ids = [int(x) for x in rng.choice(10**6, size=n_images, replace=False)]
    queries = {"val": [], "test": []}
    for split in queries:
        for q in range(n_queries):
            pick = [ids[j] for j in rng.choice(n_images, size=1 + int(rng.integers(2, 6)), replace=False)]
            e = {"id": q, "reference_img_id": pick[0], "relative_caption": random_caption(rng), "shared_concept": random_caption(rng)}
            if split == "val":
                gts = pick[1:]
                e.update(target_img_id=gts[0], gt_img_ids=gts + [""] * (6 - len(gts)))  # the authors' padding
            queries[split].append(e)
    write_circo(root, ids, queries, rng)
    return root


def write_fashioniq(root: Path, cat: str, names: list[str], queries: list[dict], rng) -> None:
    dump_json(names, root / "image_splits" / f"split.{cat}.val.json")
    dump_json(queries, root / "captions" / f"cap.{cat}.val.json")
    for n in set(names) | {q["candidate"] for q in queries}:
        noise_image(root / cat / f"{n}.jpg", rng)


def make_fashioniq(root: Path, rng, n_images: int = 16, n_queries: int = 6) -> Path:
    for cat in ("dress", "shirt", "toptee"):
        names = [f"B{cat[:2].upper()}{i:06d}" for i in range(n_images)]
        queries = [{"candidate": names[a], "target": names[b], "captions": [random_caption(rng) + ".", random_caption(rng)]}
                   for a, b in (rng.choice(n_images, size=2, replace=False) for _ in range(n_queries))]
        write_fashioniq(root, cat, names, queries, rng)
    return root


def read_json(path: Path):
    return json.loads(path.read_text())


def eval_config(cache_dir=None, reference_tokens=False, baseline=None, split="val", batch_size=7, counters=None):
    encoding = Encoding(batch_size=batch_size, workers=0, device="cpu", progress=False, counters=counters or Counters())
    return EvalConfig(split=split, encoding=encoding, cache_dir=cache_dir, reference_tokens=reference_tokens,
                      baseline=baseline)


def dataset_args(base, dataset, root, *more) -> list[str]:
    return [*base, "--dataset", dataset, ROOT_FLAG[dataset], str(root), *more]


# ---------------------------------------------------------------------------------------------
# CIRCO with one query, its gallery images drawn from a seed each

def seeded_image(path: Path, seed: int, size=(24, 18)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def small_circo(root: Path, ids: list[int], with_images: bool = True) -> Path:
    info = {"info": {"description": "test"}, "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]}
    ann = root / "COCO2017_unlabeled" / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    (ann / "image_info_unlabeled2017.json").write_text(json.dumps(info))
    (root / "COCO2017_unlabeled" / "unlabeled2017").mkdir(parents=True, exist_ok=True)
    if with_images:
        for k, i in enumerate(ids):
            seeded_image(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg", k)
    queries = [{"id": 0, "reference_img_id": ids[0], "target_img_id": ids[1], "relative_caption": "is red",
                "shared_concept": "a dog", "gt_img_ids": [ids[1], ids[2]]}]
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "val.json").write_text(json.dumps(queries))
    return root


# ---------------------------------------------------------------------------------------------
# training: generated ImageNet pairs, train.py's arguments, its log and checkpoints, DDP

SUBJECTS = ["a red circle", "a blue square", "a green star", "a small dog", "a tall tree", "a yellow car",
            "an old house", "a white cat"]
ATTRIBUTES = ["on grass", "in the snow", "with stripes", "near a lake", "at night", "on a road",
              "under a bridge", "on a sofa"]


def make_pairs_data(root: Path, n: int = 8, seed: int = 0) -> Path:
    """n small JPEGs under root/test/ILSVRC2012_test_<id>.JPEG (some elongated) and root/pairs.json."""
    rng = np.random.default_rng(seed)
    (root / "test").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        img_id = f"{i + 1:08d}"
        h, w = (24 + 6 * (i % 4), 32)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "test" / f"ILSVRC2012_test_{img_id}.JPEG")
        pairs.append({"img_id": img_id, "subject": SUBJECTS[i % 8], "attribute": ATTRIBUTES[(3 * i) % 8]})
    (root / "pairs.json").write_text(json.dumps(pairs))
    return root


def train_args(data: Path, clip: Path, model_dir: Path, *extra) -> list[str]:
    return ["--imagenet-path", str(data), "--clip-weights", str(clip), "--model-dir", str(model_dir),
            "--device", "cpu", "--workers", "0", *map(str, extra)]


def read_log(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]


def checkpoint_weights(path: Path) -> dict:
    return load_checkpoint(path)["state_dict"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_train_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One rank of a gloo run of train.main(argv) on this machine (the target of mp.spawn)."""
    import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 0
    try:
        train.main(argv)  # ends with a barrier and destroy_process_group
    except BaseException:  # noqa: BLE001 - reported through the exit code
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # gloo workers can abort at interpreter exit; skip it


# --------------------------------------------------------------------------------------------
# Independent readers of the toy world's texts: what does a sentence say about an image?

def _put(out: dict, key: str, value: str, text: str) -> None:
    assert out.get(key, value) == value, f"{text!r} names two values for {key}"
    out[key] = value


def parse_scene_text(text: str) -> dict:
    """Attributes named by a shape-world text (caption, CIRR modification, CIRCO caption/concept)."""
    t = text.lower().strip(" .?,")
    out: dict = {}
    m = re.search(r"\b(?:with|on|has) an? ([a-z ]*?)\s*background\b", t)
    if m:
        for w in m.group(1).split():
            if w in COLOURS:
                _put(out, "background", w, text)
            elif w in PATTERNS:
                _put(out, "pattern", w, text)
            else:
                raise AssertionError(f"unexpected word {w!r} in the background phrase of {text!r}")
        t = t[: m.start()] + " " + t[m.end():]
    for w in re.findall(r"[a-z]+", t):
        if w in COLOURS:
            _put(out, "colour", w, text)
        elif w in SHAPES:
            _put(out, "shape", w, text)
        elif w in ("bigger", "larger", "large"):
            _put(out, "size", "large", text)
        elif w in ("smaller", "small"):
            _put(out, "size", "small", text)
        assert w not in PATTERNS and w != "background", f"background word outside its phrase in {text!r}"
    return out


GARMENT_PATTERN_WORDS = {"solid": "solid", "plain": "solid", "striped": "striped", "stripes": "striped",
                         "dotted": "dotted", "dots": "dotted", "polka": "dotted", "plaid": "plaid", "checked": "plaid"}
FIT_WORDS = {"fitted": "fitted", "tight": "fitted", "tighter": "fitted", "slim": "fitted",
             "loose": "loose", "looser": "loose", "baggy": "loose", "flowy": "loose"}


# a graphic, a logo or a print on the front; "no" / "without" before it says there is none
GRAPHIC_PHRASE = re.compile(r"\b(?:(no|without an?) )?(?:graphic|logo|print)\b")


def parse_garment_text(category: str, text: str) -> dict:
    """Attributes named by a garment text (FashionIQ caption, ImageNet pair, web caption)."""
    t = text.lower().strip(" .?,")
    out: dict = {}
    for m in GRAPHIC_PHRASE.finditer(t):
        _put(out, "print", "none" if m.group(1) else "graphic", text)
    t = GRAPHIC_PHRASE.sub(" ", t)
    words = re.findall(r"[a-z]+", t)
    for w in words:
        if w in COLOURS:
            _put(out, "colour", w, text)
        elif w in GARMENT_PATTERN_WORDS:
            _put(out, "pattern", GARMENT_PATTERN_WORDS[w], text)
        elif w in FIT_WORDS:
            _put(out, "fit", FIT_WORDS[w], text)
    if "sleeveless" in words or "no sleeves" in t:
        _put(out, "variant", "sleeveless", text)
    elif category == "dress":
        for w in words:
            if w in ("short", "shorter", "long", "longer"):
                _put(out, "variant", "short" if w.startswith("short") else "long", text)
    else:
        for v in ("short", "long"):
            if re.search(rf"\b{v}(er)? sleeves|\b{v}-sleeved", t):
                _put(out, "variant", v, text)
        if category == "toptee" and re.search(r"\bhas sleeves", t):  # a top's only sleeves are short ones
            _put(out, "variant", "short", text)
    return out


def draw_gallery(folder, n: int = 12, seed: int = 0):
    """n small distinct pictures: a shape of one colour on a background of another, a few elongated."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = (48, 32) if i % 4 == 3 else (40, 40)
        bg, fg = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
        im = Image.new("RGB", size, bg)
        x, y = int(rng.integers(0, 16)), int(rng.integers(0, 12))
        (ImageDraw.Draw(im).ellipse if i % 2 else ImageDraw.Draw(im).rectangle)((x, y, x + 18, y + 16), fill=fg)
        im.save(folder / f"img{i:02d}.{'png' if i % 3 else 'jpg'}")
    return folder
