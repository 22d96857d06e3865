"""Caption step (METHOD §8): the caption split rule by rule, and a tiny random BLIP end to end."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import caption
import caption_pairs
from caption_pairs import build_pairs, drop_trailing_repeats, split_caption

NOUNS = {"dog", "cat", "grass", "table", "ball", "dogs", "picture"}


def toy_tagger(text: str):
    """Deterministic stand-in for spaCy: whitespace tokens with commas split off; a fixed noun list."""
    tokens = text.replace(",", " ,").split()
    return [(t, "NOUN" if t in NOUNS else ("PUNCT" if t == "," else "X")) for t in tokens]


class PipeTagger:
    """The same tagger offering spaCy's batched `pipe`, counting what it was asked to tag."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, text):
        raise AssertionError("build_pairs should use pipe() when the tagger has one")

    def pipe(self, texts):
        texts = list(texts)
        self.seen += texts
        return [toy_tagger(t) for t in texts]


# ----------------------------------------------------------------------------- the split, rule by rule

def test_rule1_drops_only_trailing_repeats_of_the_last_word():
    assert drop_trailing_repeats("a dog on grass grass grass") == "a dog on grass"
    assert drop_trailing_repeats("a dog dog on the grass") == "a dog dog on the grass"  # not trailing
    assert drop_trailing_repeats("grass grass") == "grass"
    assert drop_trailing_repeats("  a  cat   on a table table ") == "a cat on a table"  # whitespace words
    assert split_caption("a dog on grass grass grass", toy_tagger) == ("a dog", "on grass")


def test_rule2_fewer_than_four_words_gives_subject_equal_to_attribute():
    assert split_caption("a red dog", toy_tagger) == ("a red dog", "a red dog")
    # rule 1 first: four words collapse to one, which is then short
    assert split_caption("dog dog dog dog", toy_tagger) == ("dog", "dog")
    # four words are enough to be tagged
    assert split_caption("a dog on grass", toy_tagger) == ("a dog", "on grass")


def test_rule3_first_noun_splits_tokens_joined_with_spaces():
    assert split_caption("a small dog on the grass", toy_tagger) == ("a small dog", "on the grass")
    assert split_caption("a very fluffy white dog", toy_tagger) == ("a very fluffy white dog", "")
    # the halves are tagger tokens joined by spaces: the comma becomes its own word
    assert split_caption("a dog, on the grass", toy_tagger) == ("a dog", ", on the grass")


def test_rule3_short_caption_with_a_late_noun_gets_the_subject_twice():
    # the authors' check compares the caption's CHARACTER length with the noun's token position + 2:
    # when the caption is not longer, the attribute becomes the subject (and rule 4 drops the pair).
    # A tagger that makes every character a token reaches that case: "ab cd ef gh" has 11 characters,
    # its noun is token 10 (position 10 + 2 >= 11).
    def char_tagger(text):
        return [(c, "NOUN" if i == 9 else "X") for i, c in enumerate(text)]

    subject = " ".join("ab cd ef g")
    assert split_caption("ab cd ef gh", char_tagger) == (subject, subject)
    # 17 characters: the normal split
    assert split_caption("ab cd ef gh ij kl", char_tagger) == (subject, " ".join("h ij kl"))


def test_rule3_without_a_noun_slices_two_characters():
    caption_text = "is running very fast today"
    assert split_caption(caption_text, toy_tagger) == ("is", " running very fast today")


def test_rule4_and_counts_in_build_pairs():
    captions = {
        "00000003": "a small dog on the grass",
        "00000001": "a red dog",  # short: dropped by rule 4
        "00000002": "a dog a dog",  # tagged ("a dog", "a dog"): dropped by rule 4
        "00000004": "running very fast today today",  # no noun: character slice
        "00000005": "a cat on a table table table",
    }
    tagger = PipeTagger()
    pairs, counts = build_pairs(captions, tagger)
    assert pairs == [
        {"img_id": "00000003", "subject": "a small dog", "attribute": "on the grass"},
        {"img_id": "00000004", "subject": "ru", "attribute": "nning very fast today"},
        {"img_id": "00000005", "subject": "a cat", "attribute": "on a table"},
    ]
    assert counts == {"captions": 5, "short": 1, "no_noun": 1, "dropped_equal": 2, "pairs": 3}
    # only captions of four words or more are tagged, after rule 1
    assert sorted(tagger.seen) == sorted(["a small dog on the grass", "a dog a dog",
                                          "running very fast today", "a cat on a table"])
    # a plain callable tagger gives the same pairs
    assert build_pairs(captions, toy_tagger)[0] == pairs


def test_missing_spacy_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    with pytest.raises(caption_pairs.SpacyUnavailable, match=r"pip install -r requirements-caption\.txt.*python -m spacy download en_core_web_sm"):
        caption_pairs.SpacyTagger()
    # the script checks before captioning, and says how to go on without spaCy
    with pytest.raises(SystemExit, match=r"python -m spacy download en_core_web_sm.*--caption-only"):
        caption.main(["--imagenet-path", "/nonexistent"])


def test_missing_spacy_model_error_says_not_on_pypi(monkeypatch):
    def load(name, **kw):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    with pytest.raises(caption_pairs.SpacyUnavailable, match=r"not on PyPI.*python -m spacy download en_core_web_sm"):
        caption_pairs.SpacyTagger("en_core_web_sm")


def test_spacy_tagger_reads_pos_and_switches_off_unused_pipes(monkeypatch):
    class Tok:
        def __init__(self, text, pos):
            self.text, self.pos_ = text, pos

    class Nlp:
        pipe_names = ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "ner"]
        disabled: list[str] = []

        def select_pipes(self, disable):
            self.disabled = disable

        def __call__(self, text):
            return [Tok(w, p) for w, p in toy_tagger(text)]

        def pipe(self, texts, batch_size):
            return [self(t) for t in texts]

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=lambda name: Nlp()))
    tagger = caption_pairs.SpacyTagger()
    assert sorted(tagger.nlp.disabled) == ["lemmatizer", "ner", "parser"]
    assert tagger("a dog on grass") == toy_tagger("a dog on grass")
    assert list(tagger.pipe(["a cat", "the ball"])) == [toy_tagger("a cat"), toy_tagger("the ball")]


# ----------------------------------------------------------------------------- tiny BLIP end to end

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "picture", "of", "dog", "cat",
         "grass", "table", "ball", "on", "the", "with", "red", "small", "sitting", "in", "and", "##s"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A randomly initialised BlipForConditionalGeneration (32 px, patch 16) with a tiny vocabulary."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

    folder = tmp_path_factory.mktemp("blip")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    ids = {w: i for i, w in enumerate(VOCAB)}
    config = BlipConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=ids["[DEC]"], pad_token_id=ids["[PAD]"], sep_token_id=ids["[SEP]"],
                         eos_token_id=ids["[SEP]"], initializer_range=0.3),
        # visible initialisation scales (text too, for the cross-attention), so that different images
        # get different captions
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16, initializer_range=0.5),
        projection_dim=32, image_text_hidden_size=32)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_imagenet(root: Path, n: int, sizes=((40, 30), (30, 64), (48, 48))) -> list[str]:
    """`root/test/ILSVRC2012_test_XXXXXXXX.JPEG` with random pixels and various aspect ratios."""
    rng = np.random.default_rng(0)
    (root / "test").mkdir(parents=True)
    ids = [f"{k:08d}" for k in range(1, n + 1)]
    for k, img_id in enumerate(ids):
        w, h = sizes[k % len(sizes)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "test" / caption.imagenet_file_name(img_id))
    (root / "test" / "README.txt").write_text("not an image")  # ignored by the id discovery
    return ids


def run(root: Path, blip: Path, *extra: str, tagger=toy_tagger) -> dict:
    argv = ["--imagenet-path", str(root), "--blip-model", str(blip), "--image-size", "32",
            "--batch-size", "3", "--workers", "0", "--device", "cpu", "--max-length", "16", *extra]
    return caption.main(argv, tagger=tagger)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_writes_one_caption_per_image_and_the_pairs(tmp_path, tiny_blip):
    ids = make_imagenet(tmp_path, 7)
    summary = run(tmp_path, tiny_blip)
    records = read_jsonl(tmp_path / "pairs.json.partial.jsonl")
    assert sorted(r["img_id"] for r in records) == ids  # one record per image, none twice
    assert all(set(r) == {"img_id", "caption"} for r in records)
    captions = {r["img_id"]: r["caption"] for r in records}
    assert not any("[" in c for c in captions.values())  # special tokens are left out
    assert len(set(captions.values())) > 1  # the image changes the caption
    assert summary["captioned"] == 7
    pairs = json.loads((tmp_path / "pairs.json").read_text())
    assert pairs == build_pairs(captions, toy_tagger)[0]
    assert [p["img_id"] for p in pairs] == sorted(p["img_id"] for p in pairs)
    assert all(set(p) == {"img_id", "subject", "attribute"} and p["subject"] != p["attribute"] for p in pairs)


def test_captioner_strips_the_prompt_and_keeps_the_length_limits(tiny_blip):
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(tiny_blip).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_blip)
    captioner = caption.Captioner(model, tokenizer, num_beams=3, min_length=10, max_length=25)
    assert tokenizer.convert_ids_to_tokens(captioner.prompt_ids[0].tolist()) == ["[CLS]", "a", "picture", "of", "[SEP]"]
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    texts = captioner(pixels)
    # the same generation done by hand: [DEC] a picture of, then the caption tokens
    prompt = torch.tensor([[VOCAB.index(w) for w in ("[DEC]", "a", "picture", "of", "[SEP]")]] * 3)
    with torch.no_grad():
        raw = model.generate(pixel_values=pixels, input_ids=prompt, num_beams=3, min_length=10, max_length=25)
    assert raw[:, :4].tolist() == [[VOCAB.index(w) for w in ("[DEC]", "a", "picture", "of")]] * 3
    assert 10 <= raw.shape[1] <= 25
    assert texts == [t.strip() for t in tokenizer.batch_decode(raw[:, 4:], skip_special_tokens=True)]
    assert caption.strip_prompt("a picture of a dog on grass", "a picture of") == "a dog on grass"


def test_interrupted_run_resumes_without_duplicates_or_losses(tmp_path, tiny_blip, monkeypatch):
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    ids = make_imagenet(ref_root, 8)
    make_imagenet(root, 8)
    run(ref_root, tiny_blip, "--caption-only")
    reference = {r["img_id"]: r["caption"] for r in read_jsonl(ref_root / "pairs.json.partial.jsonl")}

    calls = {"n": 0}
    real = caption.generate_captions

    def interrupt_on_third_batch(captioner, pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(captioner, pixels)

    monkeypatch.setattr(caption, "generate_captions", interrupt_on_third_batch)
    with pytest.raises(SystemExit) as interrupted:  # Ctrl-C: the script ends with status 130, no traceback
        run(root, tiny_blip)
    assert interrupted.value.code == 130
    progress = root / "pairs.json.partial.jsonl"
    assert len(read_jsonl(progress)) == 6  # two batches of 3 made it to the file
    assert not (root / "pairs.json").exists()
    # a kill in the middle of a write leaves half a line behind
    with open(progress, "a") as f:
        f.write('{"img_id": "00000007", "capt')
    monkeypatch.setattr(caption, "generate_captions", real)

    summary = run(root, tiny_blip)
    assert summary["captioned"] == 2  # only the two images never captioned
    records = read_jsonl(progress)
    assert [r["img_id"] for r in records] == ids  # nothing twice, nothing lost, half line gone
    assert {r["img_id"]: r["caption"] for r in records} == reference
    pairs = json.loads((root / "pairs.json").read_text())
    assert pairs == build_pairs(reference, toy_tagger)[0]
    # a third run has nothing to do and changes nothing
    assert run(root, tiny_blip)["captioned"] == 0
    assert read_jsonl(progress) == records


def test_shards_split_the_ids_and_the_last_one_merges(tmp_path, tiny_blip):
    ids = make_imagenet(tmp_path, 5)
    run(tmp_path, tiny_blip, "--shard", "1/2")
    assert not (tmp_path / "pairs.json").exists()  # shard 0 still missing
    run(tmp_path, tiny_blip, "--shard", "0/2")
    shard_ids = [[r["img_id"] for r in read_jsonl(tmp_path / f"pairs.json.partial.{i}-of-2.jsonl")] for i in (0, 1)]
    assert shard_ids == [ids[0::2], ids[1::2]]
    assert (tmp_path / "pairs.json").exists()
    # torchrun's environment picks the shard the same way; a different layout resumes from both files
    assert run(tmp_path, tiny_blip, "--shard", "0/1")["captioned"] == 0


def test_torchrun_env_selects_the_shard(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert caption.parse_shard(None) == (2, 4)
    assert caption.parse_shard("1/3") == (1, 3)
    with pytest.raises(caption.ConfigError, match="0 <= i < n"):
        caption.parse_shard("3/3")


def test_split_only_resplits_recorded_captions_without_blip(tmp_path, tiny_blip):
    ids = make_imagenet(tmp_path, 4)
    run(tmp_path, tiny_blip, "--caption-only")
    assert not (tmp_path / "pairs.json").exists()
    progress = tmp_path / "pairs.json.partial.jsonl"
    assert sorted(r["img_id"] for r in read_jsonl(progress)) == ids
    # raw captions edited by hand: --split-only must split exactly what the file holds
    written = ["a dog on the grass grass", "a red ball", "a cat, on a table", "sitting on the table"]
    progress.write_text("".join(json.dumps({"img_id": i, "caption": c}) + "\n" for i, c in zip(ids, written)))

    # a BLIP path that does not exist proves the model is never loaded
    run(tmp_path, tmp_path / "no-blip-here", "--split-only")
    assert json.loads((tmp_path / "pairs.json").read_text()) == [
        {"img_id": ids[0], "subject": "a dog", "attribute": "on the grass"},
        {"img_id": ids[2], "subject": "a cat", "attribute": ", on a table"},
        {"img_id": ids[3], "subject": "sitting on the table", "attribute": ""},
    ]

    def no_nouns(text):
        return [(w, "VERB") for w in text.split()]

    run(tmp_path, tmp_path / "no-blip-here", "--split-only", tagger=no_nouns)
    assert [(p["subject"], p["attribute"]) for p in json.loads((tmp_path / "pairs.json").read_text())] == [
        ("a ", "dog on the grass"), ("a ", "cat, on a table"), ("si", "tting on the table")]


def test_split_only_refuses_an_incomplete_caption_set(tmp_path, tiny_blip):
    make_imagenet(tmp_path, 4)
    run(tmp_path, tiny_blip, "--caption-only", "--limit", "2")
    with pytest.raises(SystemExit, match="2 of 4 images have no caption"):
        run(tmp_path, tiny_blip, "--split-only")
    run(tmp_path, tiny_blip, "--split-only", "--limit", "2")
    assert {p["img_id"] for p in json.loads((tmp_path / "pairs.json").read_text())} <= {"00000001", "00000002"}


def test_bad_image_stops_the_run_unless_skipped(tmp_path, tiny_blip, capsys):
    ids = make_imagenet(tmp_path, 5)
    bad = tmp_path / "test" / caption.imagenet_file_name("00000003")
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(SystemExit, match=r"^error: .*ILSVRC2012_test_00000003\.JPEG.*--skip-bad-images"):
        run(tmp_path, tiny_blip)

    summary = run(tmp_path, tiny_blip, "--skip-bad-images")
    assert len(summary["skipped"]) == 1 and "ILSVRC2012_test_00000003.JPEG" in summary["skipped"][0]
    assert "skipped 1 unreadable images" in capsys.readouterr().out
    records = read_jsonl(tmp_path / "pairs.json.partial.jsonl")
    assert sorted(r["img_id"] for r in records) == ids
    assert [r["img_id"] for r in records if "error" in r] == ["00000003"]
    pairs = json.loads((tmp_path / "pairs.json").read_text())
    assert "00000003" not in {p["img_id"] for p in pairs}

    # without the flag the recorded bad image is tried again, and stops the run again
    with pytest.raises(SystemExit, match="ILSVRC2012_test_00000003"):
        run(tmp_path, tiny_blip)


def test_layout_errors_name_the_path(tmp_path, tiny_blip):
    with pytest.raises(SystemExit, match=r"test.*ILSVRC2012_test_XXXXXXXX\.JPEG"):
        run(tmp_path, tiny_blip)
    with pytest.raises(caption.DatasetLayoutError):  # what the library raises, a FileNotFoundError
        caption.discover_ids(tmp_path)
    make_imagenet(tmp_path, 2)
    with pytest.raises(SystemExit, match="--image-size 32"):
        caption.main(["--imagenet-path", str(tmp_path), "--blip-model", str(tiny_blip), "--workers", "0",
                      "--device", "cpu"], tagger=toy_tagger)
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(SystemExit, match="cannot load BLIP"):
        run(tmp_path, tmp_path / "empty-folder")


@pytest.mark.parametrize("name", ["./no-blip-here", "../no-blip-here", "/no-blip-here/x", "~/no-blip-here",
                                  "a/b/no-blip-here"])
def test_a_missing_blip_folder_is_one_line_before_the_plan(tmp_path, name, capsys, caplog, monkeypatch):
    make_imagenet(tmp_path / "ImageNet", 2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(caption, "cached_hub_file", lambda *a: pytest.fail("a path was taken for a hub id"))
    with pytest.raises(SystemExit) as e:
        caption.main(["--imagenet-path", "ImageNet", "--blip-model", name, "--device", "cpu", "--caption-only"])
    assert str(e.value) == (f"error: --blip-model {name}: no such folder; pass a folder saved with save_pretrained "
                            "or a hub id such as Salesforce/blip-image-captioning-large")
    printed = capsys.readouterr()
    assert "shard 0/1" not in printed.out + printed.err + caplog.text and not list((tmp_path / "ImageNet").glob("*.partial*"))
    for hub_id in (caption.DEFAULT_BLIP, "blip-base", "Some_One/blip.v2"):
        assert caption.HUB_ID.fullmatch(hub_id)
    for not_hub_id in ("./x", "../x", ".x", "x-", "a--b", "a..b", "a/b/c", "a b"):
        assert not caption.HUB_ID.fullmatch(not_hub_id)


def test_merged_pairs_load_in_the_training_dataset(tmp_path, tiny_blip):
    from datasets import ImageNetPairsDataset
    from transforms import build_transform

    ids = make_imagenet(tmp_path, 4)
    run(tmp_path, tiny_blip, "--caption-only")
    # known captions (random BLIP weights may leave no pair at all), then the merge of a real run
    written = ["a dog on the grass", "a cat on a table", "a red ball", "a small dog with a ball"]
    (tmp_path / "pairs.json.partial.jsonl").write_text(
        "".join(json.dumps({"img_id": i, "caption": c}) + "\n" for i, c in zip(ids, written)))
    run(tmp_path, tiny_blip)
    pairs = json.loads((tmp_path / "pairs.json").read_text())
    assert [p["img_id"] for p in pairs] == [ids[0], ids[1], ids[3]]
    dataset = ImageNetPairsDataset(tmp_path, tmp_path / "pairs.json", build_transform("targetpad", 32))
    assert len(dataset) == 3
    sample = dataset[2]
    assert (sample["img_id"], sample["subject"], sample["attribute"]) == (ids[3], "a small dog", "with a ball")
    assert tuple(sample["image"].shape) == (3, 32, 32)


def test_offline_without_a_blip_folder_stops_at_once_in_one_line(tmp_path, hub_cache, monkeypatch):
    import hub

    make_imagenet(tmp_path, 2)
    argv = ["--imagenet-path", str(tmp_path), "--workers", "0", "--device", "cpu", "--caption-only"]
    tried = []
    monkeypatch.setattr(caption, "fail_if_offline", lambda message, error: tried.append(1) or hub.fail_if_offline(message, error))
    for offline in (True, False):
        if not offline:  # no offline setting, but the hub does not answer
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
            monkeypatch.setattr(hub, "hub_reachable", lambda timeout=1.5: False)
        with pytest.raises(SystemExit) as e:
            caption.main(argv)
        message = str(e.value)
        assert message.startswith(f"error: --blip-model {caption.DEFAULT_BLIP}: not in the Hugging Face cache")
        assert "\n" not in message and f"`hf download {caption.DEFAULT_BLIP}`" in message and "save_pretrained" in message
    assert len(tried) == 2 and not (tmp_path / "pairs.json.partial.jsonl").exists()


def test_a_cached_blip_hub_id_loads_from_its_snapshot(tmp_path, hub_cache, tiny_blip):
    from test_hub import put_in_hub_cache

    put_in_hub_cache(hub_cache, "someone/tiny-blip", {f.name: f for f in tiny_blip.iterdir() if f.is_file()})
    source = Path(caption.blip_source("someone/tiny-blip"))
    assert source.parent.name == "snapshots" and (source / "config.json").is_file()
    assert caption.blip_source(str(tiny_blip)) == str(tiny_blip)  # a folder is taken as it is
    make_imagenet(tmp_path, 2)
    assert run(tmp_path, "someone/tiny-blip", "--caption-only")["captioned"] == 2
