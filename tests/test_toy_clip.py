"""The web part of the toy world and the toy CLIP trained on it (scripts/make_toy_clip.py): the web part
avoids every world image and tells the truth; the CLIP file loads as a real one, is reproducible, and
a short training already retrieves held-out captions far above chance."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import make_toy_clip
from clip_loader import load_clip
from helpers import parse_garment_text  # the same reader of garment texts as the world's tests
from toy.attributes import (COLOURS, FASHIONIQ_CATEGORIES, GARMENT_ATTRIBUTES, KIND_ATTRIBUTES, KINDS, SCENE_DOMAINS,
                            SHAPES, always_valid, garment_domains, image_key, mutate_attributes, random_attributes,
                            valid_scene)
from toy.captions import (SCENE_PATTERN_ADJ, SIZE_WORDS, circo_change_text, fashioniq_captions, garment_pair,
                          scene_attribute, scene_change_text, scene_subject, web_caption, with_article)
from toy.clip_training import WordCachedTokenizer, encode_by_length, multi_caption_loss
from toy.web import web_pages
from toy.world import MANIFEST_NAME, make_toy_world, world_image_keys

SCENE_SIZE_WORDS = {w: size for size, words in SIZE_WORDS.items() for w in words}
SCENE_PATTERN_WORDS = {w: p for p, words in SCENE_PATTERN_ADJ.items() for w in words for w in w.split()}
TINY_FLAGS = ["--image-size", "32", "--patch-size", "8", "--vision-width", "64", "--vision-layers", "1",
              "--text-width", "64", "--text-layers", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_toy_world(tmp_path_factory.mktemp("toy") / "world", seed=2, num_train_images=40, num_queries=6,
                              num_distractors=4)


def parse_web_scene(text: str) -> dict:
    """Attributes a web caption names about a scene: the words just before 'background' are the
    background's, every other colour / shape / size word is the object's."""
    t = text.lower()
    out: dict = {}

    def put(key, value):
        assert out.get(key, value) == value, f"{text!r} names two values for {key}"
        out[key] = value

    m = re.search(r"\ban? ((?:[a-z]+ ){0,3}?)background\b", t)
    if m:
        for w in m.group(1).split():
            if w in COLOURS:
                put("background", w)
            elif w in SCENE_PATTERN_WORDS:
                put("pattern", SCENE_PATTERN_WORDS[w])
            elif w != "dot":
                raise AssertionError(f"unexpected word {w!r} in the background phrase of {text!r}")
        t = t[: m.start()] + " " + t[m.end():]
    for w in re.findall(r"[a-z]+", t):
        if w in COLOURS:
            put("colour", w)
        elif w in SHAPES:
            put("shape", w)
        elif w in SCENE_SIZE_WORDS:
            put("size", SCENE_SIZE_WORDS[w])
    return out


def test_web_pages_avoid_every_world_image_and_vary_one_thing(world):
    manifest = json.loads((world / MANIFEST_NAME).read_text())
    keys = world_image_keys(manifest)
    n_world = sum(len(v) for part, v in manifest["images"].items() if part != "FashionIQ") + \
        sum(len(v) for v in manifest["images"]["FashionIQ"].values())
    assert len(keys) == n_world  # every world image has its own key
    free = web_pages(0, 300, 4)
    hit = {image_key(r["kind"], r) for r in free[10] + free[200]}  # as if these were world images
    pages = web_pages(0, 300, 4, exclude=keys | hit)
    assert len(pages) == 300 and all(len(p) == 4 for p in pages)
    records = [r for p in pages for r in p]
    web_keys = [image_key(r["kind"], r) for r in records]
    assert not set(web_keys) & (keys | hit)  # no web image is an image of the benchmarks or of the toy ImageNet
    assert len(set(web_keys)) == len(web_keys)
    assert {r["kind"] for r in records} == set(KINDS)
    assert any(r.get("grayscale") for r in records)
    for page in pages:
        names = KIND_ATTRIBUTES[page[0]["kind"]]
        first = [page[0][k] for k in names]
        assert {r["kind"] for r in page} == {page[0]["kind"]}
        assert all(1 <= sum(a != b for a, b in zip(first, [r[k] for k in names])) <= 2 for r in page[1:])
    assert web_pages(0, 300, 4, exclude=keys | hit) == pages  # deterministic


def test_web_captions_tell_the_truth_in_many_phrasings():
    rng = np.random.default_rng(0)
    records = [r for p in web_pages(1, 250, 4) for r in p]
    captions = [web_caption(rng, r) for r in records]
    assert len(set(captions)) > 0.8 * len(captions)
    full = 0
    for rec, caption in zip(records, captions):
        if rec["kind"] == "scene":
            said = parse_web_scene(caption)
            if rec.get("grayscale"):
                assert not {"colour", "background"} & set(said), caption
            full += len(said) == 5
        else:
            said = parse_garment_text(rec["kind"], caption)
            full += len(said) == len(GARMENT_ATTRIBUTES)
        assert all(rec[k] == v for k, v in said.items()), (caption, rec)
    # full and partial descriptions, and the words in several orders
    assert 0.1 < full / len(records) < 0.6
    assert any(c.startswith("a photo of") for c in captions) and any(" that is " in c for c in captions)
    assert any(re.search(r"background with an? ", c) for c in captions)


def benchmark_texts(rng, n: int) -> list[str]:
    """`n` texts of each kind the benchmarks and the toy ImageNet carry, drawn by the world's own writers:
    FashionIQ's two captions, CIRR's caption, CIRCO's caption and shared concept, ImageNet's pairs."""
    texts = []
    for _ in range(n):
        cat = FASHIONIQ_CATEGORIES[int(rng.integers(3))]
        ref = random_attributes(rng, cat)
        tgt = mutate_attributes(rng, ref, garment_domains(cat), always_valid, int(rng.integers(1, 4)))
        texts += fashioniq_captions(rng, cat, ref, tgt) + list(garment_pair(cat, tgt))
        ref = random_attributes(rng, "scene")
        tgt = mutate_attributes(rng, ref, SCENE_DOMAINS, valid_scene, int(rng.integers(1, 3)))
        texts += [scene_change_text(rng, ref, tgt), scene_subject(tgt), scene_attribute(tgt)]
        texts += [circo_change_text(rng, {k: tgt[k] for k in ("colour", "background", "pattern")
                                               if rng.random() < 0.5} or {"colour": tgt["colour"]}),
                  with_article(" ".join(ref[k] for k in ("size", "colour", "shape")))]
    return texts


def test_web_captions_use_every_word_of_the_benchmark_texts(world):
    """A real CLIP has met every word of the benchmarks' texts; a word that no web caption uses would keep
    its random embedding in the toy CLIP and blur every query that says it ("looser", "has", "instead")."""
    rng = np.random.default_rng(0)
    web = {w for p in web_pages(0, 1500, 4) for r in p for w in re.findall(r"[a-z]+", web_caption(rng, r))}
    texts = benchmark_texts(np.random.default_rng(1), 2000)
    for cat in FASHIONIQ_CATEGORIES:  # and the files of a world
        texts += [c for q in json.loads((world / "FashionIQ" / "captions" / f"cap.{cat}.val.json").read_text())
                  for c in q["captions"]]
    texts += [q["caption"] for q in json.loads((world / "CIRR" / "cirr" / "captions" / "cap.rc2.val.json").read_text())]
    texts += [q["relative_caption"] + " " + q["shared_concept"]
              for q in json.loads((world / "CIRCO" / "annotations" / "val.json").read_text())]
    words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    assert {"looser", "shorter", "has", "instead", "make", "turn", "into", "colored"} <= words  # the texts use them
    assert words - web == set()


def test_short_run_writes_an_openai_clip_file_that_loads_the_same_each_time(tmp_path, world):
    flags = ["--world", str(world), "--seed", "3", "--steps", "3", "--batch-size", "16", "--num-web-images", "64",
             "--num-held-out", "16", "--no-progress"] + TINY_FLAGS
    out = make_toy_clip.main(["--out", str(tmp_path / "a.pt")] + flags)
    assert set(out["recall"]) == {"image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5",
                                  "chance_r1", "chance_r5"}
    clip = load_clip("ViT-L/14", tmp_path / "a.pt", device="cpu")  # the architecture is read from the file
    assert clip.source.startswith("openai:")
    assert (clip.embed_dim, clip.text_width, clip.vision_width, clip.image_size) == (64, 64, 64, 32)
    sd = torch.load(tmp_path / "a.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())  # as OpenAI ships
    make_toy_clip.main(["--out", str(tmp_path / "b.pt")] + flags)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    make_toy_clip.main(["--out", str(tmp_path / "c.pt")] + flags[:3] + ["4"] + flags[4:])  # another seed
    assert (tmp_path / "a.pt").read_bytes() != (tmp_path / "c.pt").read_bytes()


def test_toy_clip_retrieves_held_out_web_captions_far_above_chance(tmp_path, capsys):
    out = make_toy_clip.main(["--out", str(tmp_path / "clip.pt"), "--steps", "250", "--batch-size", "64",
                              "--num-web-images", "1600", "--num-held-out", "200", "--lr", "2e-3", "--no-progress"]
                             + TINY_FLAGS)
    r = out["recall"]
    assert r["chance_r5"] == pytest.approx(2.5)
    assert r["image_to_text_r5"] > 5 * r["chance_r5"] and r["text_to_image_r5"] > 5 * r["chance_r5"], r
    printed = capsys.readouterr().out
    assert "held-out web pairs (200)" in printed and "chance R@1 0.5" in printed


def test_word_cached_tokenizer_gives_the_clip_tokenizers_ids(tiny_clip):
    rng = np.random.default_rng(5)
    captions = [web_caption(rng, r) for p in web_pages(5, 600, 4) for r in p]
    assert any("," in c for c in captions) and any("-" in c for c in captions)  # punctuation inside words too
    tokenize = WordCachedTokenizer(tiny_clip)
    assert torch.equal(tokenize(captions), tiny_clip.tokenize(captions))
    assert torch.equal(tokenize(captions[:7]), tiny_clip.tokenize(captions[:7]))  # every word now from the cache
    with pytest.raises(ValueError, match="plain lower-case"):
        tokenize(["a Red star"])  # CLIP's cleaning would lower it: the cache refuses rather than differ


def test_encoding_captions_grouped_by_length_equals_one_pass(tiny_clip):
    rng = np.random.default_rng(6)
    captions = [web_caption(rng, r) for p in web_pages(6, 12, 4) for r in p]
    tokens = tiny_clip.tokenize(captions)
    lengths = tokens.argmax(dim=-1)
    assert lengths.max() - lengths.min() >= 8  # the groups are cut at different lengths
    grouped = encode_by_length(tiny_clip, tokens, groups=4)
    torch.testing.assert_close(grouped, tiny_clip.encode_text(tokens, trim=False), atol=1e-5, rtol=1e-5)


def test_multi_caption_loss_is_the_mean_of_clip_losses_over_each_images_captions(tiny_clip):
    from open_clip.loss import ClipLoss

    rng = np.random.default_rng(7)
    records = [r for p in web_pages(7, 3, 4) for r in p]  # 12 images, 3 captions each
    captions = [[web_caption(rng, r) for _ in range(3)] for r in records]
    tokens = torch.stack([tiny_clip.tokenize(c) for c in captions])  # [12, 3, 77]
    images = torch.randn(len(records), 3, tiny_clip.image_size, tiny_clip.image_size, generator=torch.Generator().manual_seed(0))
    loss_fn, scale = ClipLoss(), tiny_clip.model.logit_scale.exp()
    image_f = torch.nn.functional.normalize(tiny_clip.encode_image(images), dim=-1)
    reference = sum(loss_fn(image_f, torch.nn.functional.normalize(tiny_clip.encode_text(tokens[:, j]), dim=-1), scale)
                    for j in range(3)) / 3  # caption j of every image against all images, one caption set at a time
    got = multi_caption_loss(tiny_clip, loss_fn, images, tokens, groups=4)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    mispaired = multi_caption_loss(tiny_clip, loss_fn, images, tokens.roll(1, dims=0), groups=4)
    assert abs(float(mispaired) - float(reference)) > 1e-3  # the check can tell a caption given to another image
