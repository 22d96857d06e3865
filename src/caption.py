"""Caption the ImageNet test images with BLIP and write the training pairs of METHOD §8.

    python src/caption.py --imagenet-path ./data/ImageNet            # one GPU (or CPU)
    torchrun --nproc-per-node 8 src/caption.py --imagenet-path ...   # one shard per GPU

Captions are appended, one JSON line per image, to a progress file beside `--out`
(`<out>.partial.jsonl`, or `<out>.partial.<i>-of-<n>.jsonl` per shard), so an interrupted run
resumes where it stopped. When every selected image has a caption, whichever shard finishes last
splits them (caption_pairs.py) and writes `--out`: the authors' JSON list of
`{"img_id", "subject", "attribute"}`, sorted by id. `--split-only` redoes that split from the
progress files without BLIP.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from caption_pairs import DEFAULT_SPACY_MODEL, SpacyTagger, SpacyUnavailable, Tagger, build_pairs
from cli import FlagParser, script_main
from datasets import IMAGENET_FILE_RE, DatasetLayoutError, ImageLoadError, imagenet_file_name, load_image
from distributed import layout_from_env, pick_device
from errors import ConfigError, UserError
from hub import cached_hub_file, fail_if_offline, not_cached_message
from logs import get_logger
from precision import DTYPES, weights_dtype
from transforms import build_transform
from utils import atomic_write_json, check_output_folder, open_append, open_regular, resolve_device, show_progress

DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"  # HF port of BLIP ViT-B, CapFilt-L
PROMPT = "a picture of "  # BLIP's captioning prompt; stripped from every caption

log = get_logger("caption")


class CaptionError(UserError):
    """The progress files do not allow the step asked for (the message says what to run)."""


# ----------------------------------------------------------------------------- image ids, shards

def discover_ids(imagenet_path: Path, limit: int | None = None) -> list[str]:
    """Sorted 8-digit ids of `<imagenet_path>/test/ILSVRC2012_test_XXXXXXXX.JPEG`, the first `limit`."""
    folder = Path(imagenet_path) / "test"
    if not folder.is_dir():
        raise DatasetLayoutError(
            f"image folder {folder} not found: --imagenet-path must hold test/ILSVRC2012_test_XXXXXXXX.JPEG "
            "(the ILSVRC2012 test set, see the README's data layout)"
        )
    ids = sorted(m.group(1) for m in map(IMAGENET_FILE_RE.match, os.listdir(folder)) if m)
    if not ids:
        raise DatasetLayoutError(f"no ILSVRC2012_test_XXXXXXXX.JPEG files in {folder}")
    return ids[:limit] if limit is not None else ids


def parse_shard(text: str | None) -> tuple[int, int]:
    """`--shard i/n`, else the launcher's rank and world size (torchrun or srun), else (0, 1)."""
    if text is None:
        info = layout_from_env()
        return info.rank, info.world_size
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. --shard 0/4")
    return int(m.group(1)), int(m.group(2))


def progress_path(out: Path, shard: int, num_shards: int) -> Path:
    suffix = ".partial.jsonl" if num_shards == 1 else f".partial.{shard}-of-{num_shards}.jsonl"
    return out.with_name(out.name + suffix)


# ----------------------------------------------------------------------------- progress files

class Progress(NamedTuple):
    captions: dict[str, str]  # img_id -> raw caption (prompt stripped)
    errors: dict[str, str]  # img_id -> why the image could not be read (only with --skip-bad-images)


def read_progress(out: Path) -> Progress:
    """Every record in every progress file of `out` (all shard layouts), first caption per id kept.

    A last line without its newline is an interrupted write and is ignored; it is captioned again.
    """
    captions: dict[str, str] = {}
    errors: dict[str, str] = {}
    for path in sorted(out.parent.glob(glob.escape(out.name) + ".partial*.jsonl")):
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines and lines[-1] != "":
            lines = lines[:-1]  # interrupted mid-write: the id has no complete record
        for n, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                rec = json.loads(line)
                img_id = rec["img_id"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CaptionError(f"{path}:{n}: not a caption record ({err}); fix or delete that line") from err
            if "caption" in rec:
                captions.setdefault(img_id, rec["caption"])
            else:
                errors[img_id] = rec.get("error", "unreadable image")
    return Progress(captions, errors)


def open_progress_for_append(path: Path):
    """Open this shard's progress file for appending, cutting an interrupted last line first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with os.fdopen(open_regular(path, os.O_RDWR, "progress file"), "r+b") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # killed mid-write: drop the half line
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)
    return open_append(path, "progress file")


# ----------------------------------------------------------------------------- images

class BadImage(NamedTuple):
    img_id: str
    reason: str


class ImageNetTestImages(Dataset):
    """`test/ILSVRC2012_test_<id>.JPEG` as (img_id, pixel tensor); a bad file raises, or with
    `skip_bad` comes back as a `BadImage` that the collate function sets apart."""

    def __init__(self, imagenet_path: Path, ids: list[str], transform, skip_bad: bool = False):
        self.folder = Path(imagenet_path) / "test"
        self.ids = ids
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        img_id = self.ids[index]
        path = self.folder / imagenet_file_name(img_id)
        try:
            image = load_image(path)
        except ImageLoadError as err:
            if not self.skip_bad:
                raise ImageLoadError(f"{err}; or pass --skip-bad-images to caption the other images "
                                     "and list the unreadable ones at the end") from err
            return img_id, BadImage(img_id, str(err))
        return img_id, self.transform(image.convert("RGB"))


def collate_images(batch):
    """-> (ids of good images, their stacked pixels or None, list of BadImage)."""
    good = [(i, x) for i, x in batch if not isinstance(x, BadImage)]
    bad = [x for _, x in batch if isinstance(x, BadImage)]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, bad


# ----------------------------------------------------------------------------- BLIP

# OWNER/NAME or NAME as the hub spells them: letters, digits, - _ . (neither first nor last, never doubled)
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"(?!.*(?:--|\.\.)){_HUB_PART}(?:/{_HUB_PART})?")
BLIP_FIX = "pass a folder saved with save_pretrained or a hub id such as Salesforce/blip-image-captioning-large"


def check_blip_name(name: str) -> Path | None:
    """The --blip-model folder when `name` is one that exists, None for a hub id; a ConfigError in one
    line for anything else (a path that does not exist, a name the hub cannot hold), found before any
    image is read or transformers imported."""
    folder = Path(name).expanduser()
    if folder.exists():
        return folder
    if name.startswith(("./", "../", "/", "~")) or os.sep in name.replace("/", "", 1):
        raise ConfigError(f"--blip-model {name}: no such folder; {BLIP_FIX}")
    if not HUB_ID.fullmatch(name):
        raise ConfigError(f"--blip-model {name}: no such folder, nor a hub id (OWNER/NAME); {BLIP_FIX}")
    return None


def blip_source(name: str) -> str:
    """Where to load --blip-model from: a folder as it is; a hub id from its snapshot in the Hugging Face
    cache when that holds it (no network touched), else from the hub, which must answer: without it the
    run stops at once with what to do, instead of transformers retrying for half a minute."""
    folder = check_blip_name(name)
    if folder is not None:
        return str(folder)  # with ~ expanded: transformers would take "~/blip" for a hub id
    cached = cached_hub_file(name, ["config.json"])
    if cached is not None:
        return str(cached.parent)
    fail_if_offline(lambda: not_cached_message(
        f"--blip-model {name}", name, None,
        "or pass --blip-model a folder written by save_pretrained (model and tokenizer), copied from a machine "
        "that has the weights"), ConfigError)
    return name


def load_blip(name: str, device: torch.device, dtype: torch.dtype):
    """BlipForConditionalGeneration + its tokenizer from a hub id (`blip_source`) or a save_pretrained folder."""
    source = blip_source(name)  # offline and not cached: stops here, before transformers is even imported
    # deferred: transformers takes seconds to import and only the captioning pass needs it (--split-only does not)
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    try:
        model = BlipForConditionalGeneration.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load BLIP from {name!r} ({err}). Pass --blip-model a folder written by "
            "save_pretrained (model + tokenizer) or a hub id this machine can download."
        ) from err
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


class Captioner:
    """Batched BLIP beam-search captioning with the authors' settings (METHOD §8)."""

    def __init__(self, model, tokenizer, prompt: str = PROMPT, num_beams: int = 3,
                 min_length: int = 10, max_length: int = 25):
        self.model, self.tokenizer = model, tokenizer
        self.num_beams, self.min_length, self.max_length = num_beams, min_length, max_length
        # [CLS] prompt [SEP]: HF's BLIP generate swaps [CLS] for the decoder's BOS and drops the
        # trailing [SEP], as the authors' BLIP does, so generation continues the prompt.
        self.prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        # The decoded prompt (the tokenizer may normalise it) is what starts every output.
        self.prompt_text = tokenizer.decode(self.prompt_ids[0, 1:-1], skip_special_tokens=True)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> list[str]:
        p = next(self.model.parameters())
        pixel_values = pixel_values.to(device=p.device, dtype=p.dtype, non_blocking=True)
        # generate() writes the BOS into column 0 in place, hence a fresh copy per batch.
        input_ids = self.prompt_ids.to(p.device).expand(pixel_values.shape[0], -1).clone()
        out = self.model.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            num_beams=self.num_beams,
            min_length=self.min_length,  # both lengths count the prompt tokens, as in BLIP
            max_length=self.max_length,
            do_sample=False,
            repetition_penalty=1.0,
            length_penalty=1.0,
        )
        # Column 0 is the decoder BOS (not always a special token of the tokenizer): leave it out.
        texts = self.tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
        return [strip_prompt(t, self.prompt_text) for t in texts]


def strip_prompt(text: str, prompt: str) -> str:
    """The caption without its prompt ('a picture of a dog' -> 'a dog')."""
    if text.startswith(prompt):
        text = text[len(prompt):]
    return text.strip()


# ----------------------------------------------------------------------------- merge

def merge(out: Path, progress: Progress, ids: list[str] | None, tagger: Tagger,
          skip_bad: bool) -> dict[str, int]:
    """Split the recorded captions of `ids` (all recorded ones when None) and write `out` atomically."""
    if ids is None:
        ids = sorted(set(progress.captions) | set(progress.errors))
    missing = [i for i in ids if i not in progress.captions and i not in progress.errors]
    if missing:
        raise CaptionError(
            f"{len(missing)} of {len(ids)} images have no caption in {out}.partial*.jsonl "
            f"(first: {imagenet_file_name(missing[0])}); run src/caption.py without --split-only to caption them"
        )
    bad = [i for i in ids if i not in progress.captions]
    if bad and not skip_bad:
        raise CaptionError(
            f"{len(bad)} images were recorded as unreadable (first: {progress.errors[bad[0]]}); "
            "fix them and rerun, or pass --skip-bad-images to leave them out"
        )
    pairs, counts = build_pairs({i: progress.captions[i] for i in ids if i in progress.captions}, tagger)
    atomic_write_json(pairs, out)
    counts["bad_images"] = len(bad)
    log.info(f"wrote {out}: {counts['pairs']} pairs from {counts['captions']} captions "
          f"({counts['short']} under 4 words, {counts['no_noun']} without a noun, "
          f"{counts['dropped_equal']} dropped as subject == attribute, {len(bad)} unreadable images)")
    return counts


# ----------------------------------------------------------------------------- main

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> FlagParser:
    p = FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imagenet-path", type=Path, default=Path("./data/ImageNet"),
                   help="folder holding test/ILSVRC2012_test_XXXXXXXX.JPEG")
    p.add_argument("--out", type=Path, default=None, help="merged pairs JSON (default <imagenet-path>/pairs.json)")
    p.add_argument("--limit", type=positive_int, default=None, help="caption only the first N ids (sorted)")
    p.add_argument("--blip-model", default=DEFAULT_BLIP,
                   help="hub id or save_pretrained folder of a BlipForConditionalGeneration")
    p.add_argument("--image-size", type=positive_int, default=384, help="BLIP input size (the model's own)")
    p.add_argument("--num-beams", type=positive_int, default=3, help="beam search width")
    p.add_argument("--min-length", type=positive_int, default=10, help="minimum tokens, prompt included")
    p.add_argument("--max-length", type=positive_int, default=25, help="maximum tokens, prompt included")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per generate() call")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="model precision; auto = fp16 on GPU, fp32 on CPU")
    p.add_argument("--shard", default=None,
                   help="i/n: caption every n-th id starting at i (default: torchrun's RANK/WORLD_SIZE)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="go on past missing/corrupt images and list them at the end")
    p.add_argument("--spacy-model", default=DEFAULT_SPACY_MODEL, help="spaCy pipeline name or path for POS tags")
    p.add_argument("--split-only", action="store_true",
                   help="no BLIP: split the captions already in the progress files and write --out")
    p.add_argument("--caption-only", action="store_true",
                   help="write the progress file only (no spaCy needed); split later with --split-only")
    return p


@script_main
def main(argv=None, tagger: Tagger | None = None) -> dict:
    """Run the caption step; `tagger` replaces spaCy (tests). Returns a summary dict."""
    args = build_parser().parse_args(argv)
    if args.split_only and args.caption_only:
        raise ConfigError("--split-only and --caption-only exclude each other")
    out = args.out if args.out is not None else args.imagenet_path / "pairs.json"
    check_output_folder(out.parent, "--out" if args.out is not None else "--imagenet-path")
    need_split = not args.caption_only
    if not args.split_only:
        check_blip_name(args.blip_model)  # a mistyped folder is named now, before the shard's plan
    if need_split and tagger is None:
        try:
            tagger = SpacyTagger(args.spacy_model)  # fails now, not after hours of captioning
        except SpacyUnavailable as err:
            hint = "" if args.split_only else (
                " Or caption now with --caption-only and split later with --split-only where spaCy is installed.")
            raise ConfigError(f"{err}{hint}") from err

    if args.split_only:
        has_images = (args.imagenet_path / "test").is_dir()
        ids = discover_ids(args.imagenet_path, args.limit) if has_images else None
        if ids is None:
            log.info(f"{args.imagenet_path / 'test'} not found: splitting every recorded caption")
        return {"merged": merge(out, read_progress(out), ids, tagger, args.skip_bad_images)}

    ids = discover_ids(args.imagenet_path, args.limit)
    shard, num_shards = parse_shard(args.shard)
    mine = ids[shard::num_shards]
    done = read_progress(out)
    accepted = done.captions.keys() | (done.errors.keys() if args.skip_bad_images else set())
    todo = [i for i in mine if i not in accepted]
    own_file = progress_path(out, shard, num_shards)
    log.info(f"shard {shard}/{num_shards}: {len(mine)} images, {len(mine) - len(todo)} already captioned, "
          f"{len(todo)} to go -> {own_file}")

    summary = {"captioned": 0, "skipped": [], "seconds": 0.0}
    if todo:
        summary.update(caption_ids(args, todo, own_file, shard))

    progress = read_progress(out)
    skipped = [progress.errors[i] for i in mine if i not in progress.captions and i in progress.errors]
    if skipped:
        log.info(f"skipped {len(skipped)} unreadable images (recorded as such in the progress files):")
        for reason in skipped:
            log.info(f"  {reason}")
    summary["skipped"] = skipped
    left = [i for i in ids if i not in progress.captions and i not in progress.errors]
    if left:
        then = "run --split-only" if args.caption_only else "the last shard to finish writes the pairs"
        log.info(f"{len(left)} images still have no caption (other shards); once they have, {then}")
    elif need_split:
        summary["merged"] = merge(out, progress, ids, tagger, args.skip_bad_images)
    else:
        log.info(f"all {len(ids)} images captioned; split them with --split-only")
    return summary


def caption_ids(args, todo: list[str], own_file: Path, shard: int = 0) -> dict:
    """Caption `todo`, appending one JSON line per image to `own_file` batch by batch."""
    device = resolve_device(args.device)
    if device.type == "cuda":  # one GPU per torchrun / srun process, as training picks it
        device = pick_device(device, layout_from_env(), torch.cuda.device_count())
        torch.cuda.set_device(device)
    model, tokenizer = load_blip(args.blip_model, device, weights_dtype(args.dtype, device))
    model_size = model.config.vision_config.image_size
    if model_size != args.image_size:
        raise ConfigError(f"--image-size {args.image_size} differs from the BLIP model's {model_size}; "
                         f"pass --image-size {model_size}")
    captioner = Captioner(model, tokenizer, num_beams=args.num_beams,
                          min_length=args.min_length, max_length=args.max_length)
    dataset = ImageNetTestImages(args.imagenet_path, todo, build_transform("targetpad", args.image_size),
                                 skip_bad=args.skip_bad_images)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=collate_images, pin_memory=device.type == "cuda")
    count, start = 0, time.perf_counter()
    with open_progress_for_append(own_file) as f, tqdm(total=len(todo), unit="img", dynamic_ncols=True,
                                                        desc=own_file.name, position=shard,
                                                        disable=not show_progress()) as bar:
        for batch_ids, pixels, bad in loader:
            lines = [json.dumps({"img_id": b.img_id, "error": b.reason}) for b in bad]
            if batch_ids:
                captions = generate_captions(captioner, pixels)
                lines += [json.dumps({"img_id": i, "caption": c}) for i, c in zip(batch_ids, captions)]
            f.write("".join(line + "\n" for line in lines))
            f.flush()  # a batch reaches the file before the next one starts: resume loses at most one
            count += len(batch_ids)
            bar.update(len(batch_ids) + len(bad))
    seconds = time.perf_counter() - start
    log.info(f"captioned {count} images in {seconds:.1f} s ({count / max(seconds, 1e-9):.2f} images/s)")
    return {"captioned": count, "seconds": seconds}


def generate_captions(captioner: Captioner, pixels: torch.Tensor) -> list[str]:
    """One batch through BLIP (a seam for tests that interrupt a run)."""
    return captioner(pixels)


if __name__ == "__main__":
    main()
