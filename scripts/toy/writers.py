"""The four benchmarks of the toy world in the real folder and JSON layouts: ImageNet's test images with
caption pairs, FashionIQ, CIRR and CIRCO (COCO's image info included)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from toy.attributes import (FASHIONIQ_CATEGORIES, GARMENT_ATTRIBUTES, GARMENT_CANVASES, KIND_ATTRIBUTES,
                            SCENE_ATTRIBUTES, SCENE_CANVASES, SCENE_DOMAINS, always_valid, attribute_key,
                            draw_distinct, garment_domains, mutate_attributes, pick, random_attributes,
                            random_layout, sample_attributes, valid_scene)
from toy.captions import (circo_change_text, fashioniq_captions, garment_pair, scene_attribute, scene_change_text,
                          scene_subject, with_article)
from toy.drawing import render_garment, render_record, render_scene, save_image

CIRR_SPLITS = {"train": "train", "val": "dev", "test1": "test1"}  # annotation split -> image folder / name prefix
FASHIONIQ_SPLITS = ("train", "val", "test")
CIRCO_SPLITS = ("val", "test")
CIRR_SET_SIZE = 6
CIRR_QUERIES_PER_SET = 6  # every member is once a reference; the real val split asks 9 of most of its sets


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_imagenet(root: Path, rng, n: int, garment_share: float = 0.25) -> dict:
    """ImageNet test images with caption pairs: mostly shape scenes, and a share of garments (ImageNet
    holds clothes too: jerseys, gowns, cardigans...), so the network learns to invert both kinds."""
    taken: set = set()
    records, pairs = {}, []
    for i in range(1, n + 1):
        img_id = f"{i:08d}"
        kind = "scene" if rng.random() >= garment_share else pick(rng, FASHIONIQ_CATEGORIES)
        # unique while the attribute space allows it; repeats only for very large --num-train-images
        for _ in range(50):
            attrs = random_attributes(rng, kind)
            if (kind, *attribute_key(attrs, KIND_ATTRIBUTES[kind])) not in taken:
                break
        taken.add((kind, *attribute_key(attrs, KIND_ATTRIBUTES[kind])))
        rec = {"kind": kind, **attrs, **random_layout(rng, SCENE_CANVASES if kind == "scene" else GARMENT_CANVASES)}
        save_image(render_record(rec), root / "test" / f"ILSVRC2012_test_{img_id}.JPEG")
        records[img_id] = rec
        subject, attribute = (scene_subject(attrs), scene_attribute(attrs)) if kind == "scene" else garment_pair(kind, attrs)
        pairs.append({"img_id": img_id, "subject": subject, "attribute": attribute})
    write_json(pairs, root / "pairs.json")
    return records


def _asin(rng, used: set) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    while True:
        name = "B0" + "".join(alphabet[int(i)] for i in rng.integers(len(alphabet), size=8))
        if name not in used:
            used.add(name)
            return name


def write_fashioniq(root: Path, seed: int, num_queries: int, num_distractors: int) -> tuple[dict, dict]:
    records: dict = {c: {} for c in FASHIONIQ_CATEGORIES}
    hidden: dict = {c: {} for c in FASHIONIQ_CATEGORIES}
    used_names: set = set()
    for ci, cat in enumerate(FASHIONIQ_CATEGORIES):
        domains = garment_domains(cat)
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
                rec = {**attrs, **random_layout(rng, GARMENT_CANVASES)}
                records[cat][name] = rec
                save_image(render_garment(cat, rec), root / cat / f"{name}.jpg")
                gallery.append(name)
                return name

            for _ in range(num_queries):
                ref = draw_distinct(lambda: sample_attributes(rng, domains, always_valid), taken, GARMENT_ATTRIBUTES,
                                    "a reference")
                tgt = draw_distinct(lambda: mutate_attributes(rng, ref, domains, always_valid, int(rng.integers(1, 4))),
                              taken, GARMENT_ATTRIBUTES, "a target")
                ref_name, tgt_name = add(ref), add(tgt)
                texts = fashioniq_captions(rng, cat, ref, tgt)
                texts = [t + "." if rng.random() < 0.25 else t for t in texts]  # real captions carry stray dots
                entry = {"candidate": ref_name, "captions": texts} if split == "test" else \
                    {"target": tgt_name, "candidate": ref_name, "captions": texts}
                captions.append(entry)
                targets.append(tgt_name)
            for _ in range(num_distractors):
                add(draw_distinct(lambda: sample_attributes(rng, domains, always_valid), taken, GARMENT_ATTRIBUTES,
                                  "a distractor"))
            order = rng.permutation(len(gallery))
            write_json([gallery[i] for i in order], root / "image_splits" / f"split.{cat}.{split}.json")
            write_json(captions, root / "captions" / f"cap.{cat}.{split}.json")
            if split == "test":
                hidden[cat]["test"] = targets
    return records, hidden


def write_cirr(root: Path, seed: int, num_queries: int, num_distractors: int) -> tuple[dict, dict]:
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
            rec = {**attrs, **random_layout(rng, SCENE_CANVASES)}
            records[name] = rec
            save_image(render_scene(rec), root / rel[2:])
            split_map[name] = rel
            return name

        captions = []
        left = num_queries
        for set_id in range(n_sets):
            # a chain of 6 images, each a 1-2 attribute edit of the previous: hard in-set distractors
            chain_attrs = [draw_distinct(lambda: sample_attributes(rng, SCENE_DOMAINS, valid_scene), taken,
                                         SCENE_ATTRIBUTES, "an image")]
            while len(chain_attrs) < CIRR_SET_SIZE:
                prev = chain_attrs[-1]
                chain_attrs.append(draw_distinct(
                    lambda: mutate_attributes(rng, prev, SCENE_DOMAINS, valid_scene, int(rng.integers(1, 3))),
                    taken, SCENE_ATTRIBUTES, "an image"))
            chain = [add(a) for a in chain_attrs]
            members = [chain[i] for i in rng.permutation(CIRR_SET_SIZE)]
            n_q = min(CIRR_QUERIES_PER_SET, left)
            left -= n_q
            for rank in sorted(int(r) for r in rng.choice(CIRR_SET_SIZE, size=n_q, replace=False)):
                t_rank = (rank + 1) % CIRR_SET_SIZE
                ref, tgt = chain[rank], chain[t_rank]
                text = scene_change_text(rng, chain_attrs[rank], chain_attrs[t_rank])
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
            add(draw_distinct(lambda: sample_attributes(rng, SCENE_DOMAINS, valid_scene), taken, SCENE_ATTRIBUTES,
                              "a distractor"))
        names = list(split_map)
        ordered = {names[i]: split_map[names[i]] for i in rng.permutation(len(names))}
        write_json(ordered, root / "cirr" / "image_splits" / f"split.rc2.{split}.json")
        write_json(captions, root / "cirr" / "captions" / f"cap.rc2.{split}.json")
    return records, hidden




def circo_matches(columns: dict[str, np.ndarray], constraints: dict) -> np.ndarray:
    """Which images (attribute `columns`: name -> one value per image) have every value a CIRCO query asks for."""
    match = np.ones(len(next(iter(columns.values()))), dtype=bool)
    for k, v in constraints.items():
        match &= columns[k] == v
    return match


def write_circo(root: Path, seed: int, num_queries: int, num_distractors: int) -> tuple[dict, dict]:
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
            ref = draw_distinct(lambda: sample_attributes(rng, SCENE_DOMAINS, valid_scene), taken, SCENE_ATTRIBUTES,
                                "a reference")
            changed = [("colour", "background", "pattern")[int(i)] for i in
                       sorted(rng.choice(3, size=int(rng.integers(1, 3)), replace=False))]
            for _ in range(1000):  # new values for the changed attributes that still contrast
                changes = {k: pick(rng, [v for v in SCENE_DOMAINS[k] if v != ref[k]]) for k in changed}
                trial = {**ref, **changes}
                if valid_scene(trial):
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
            members = [add(ref)] + [add(sample_attributes(rng, SCENE_DOMAINS, valid_scene, fixed=constraints))
                                    for _ in range(int(rng.integers(2, 5)))]  # the target and further ground truths
            # a hard negative: all but one of the concept's and the caption's attributes
            broken = pick(rng, list(constraints))
            near = dict(constraints)
            near.pop(broken)
            add(_mutate_until(rng, near, broken, constraints))
            queries[split].append({"ref": members[0], "target": members[1], "constraints": constraints,
                                   "caption": circo_change_text(rng, changes),
                                   "concept": with_article(" ".join(concept.values()))})
    for _ in range(num_distractors):
        add(sample_attributes(rng, SCENE_DOMAINS, valid_scene))

    ids = [int(i) + 1 for i in rng.choice(581929, size=len(gallery), replace=False)]  # COCO-like ids
    records, images = {}, []
    for idx in rng.permutation(len(gallery)):
        img_id = ids[idx]
        rec = {**gallery[idx], **random_layout(rng, SCENE_CANVASES)}
        file_name = f"{img_id:012d}.jpg"
        save_image(render_scene(rec), root / "COCO2017_unlabeled" / "unlabeled2017" / file_name)
        records[str(img_id)] = rec
        images.append(coco_image_entry(img_id, file_name, rec["canvas"]))
    write_json(coco_image_info(images), root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json")

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
        write_json(entries, root / "annotations" / f"{split}.json")
    return records, hidden


def _mutate_until(rng, keep: dict, broken: str, constraints: dict) -> dict:
    """Random valid attributes with `keep` fixed and `broken` set to anything but its asked-for value."""
    for _ in range(1000):
        attrs = sample_attributes(rng, SCENE_DOMAINS, valid_scene, fixed=keep)
        if attrs[broken] != constraints[broken]:
            return attrs
    raise ValueError(f"cannot break {broken} of {constraints}")


def coco_image_entry(img_id: int, file_name: str, canvas: Sequence[int]) -> dict:
    w, h = canvas
    return {"license": 1, "file_name": file_name, "coco_url": f"http://images.cocodataset.org/unlabeled2017/{file_name}",
            "height": int(h), "width": int(w), "date_captured": "2017-01-01 00:00:00", "id": int(img_id)}


def coco_image_info(images: list[dict]) -> dict:
    return {
        "info": {"description": "fti4cir toy stand-in for COCO 2017 Unlabeled Image Info", "version": "1.0",
                 "year": 2017, "contributor": "scripts/make_toy_data.py", "date_created": "2017-01-01"},
        "licenses": [{"id": 1, "name": "toy images, generated", "url": ""}],
        "images": images,
        "categories": [],
    }
