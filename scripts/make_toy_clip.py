"""Train a small CLIP that knows the toy world, to stand in for OpenAI's CLIP where it cannot be had.

The model is an open_clip `CLIP` in OpenAI's layout (QuickGELU, vocabulary 49408, context 77), built as
`clip_loader.build_tiny_clip` builds one, with text width == embedding size as FTI4CIR needs. It is
trained contrastively, with open_clip's own `ClipLoss`, on image-caption pairs of the toy world's *web*
part (`make_toy_data.web_pages`): shape scenes and garments, none of them an image of the benchmarks or
of the toy ImageNet. Every epoch each image gets several captions (`--captions-per-image`), each drawn on
its own from many phrasings, full or partial, as an image on the web carries several alt texts; a step's
loss is the mean of `ClipLoss` over them, so one pass of the visual tower, the costly part, learns from
all of them. It never sees a benchmark annotation. The file written is an OpenAI-format state dict,
stored in fp16 as OpenAI ships its weights, which every script loads through `--clip-weights`.

    python scripts/make_toy_clip.py --world data/toy --out data/toy_clip.pt

Same flags, same seed: the same file, byte for byte (fixed thread count, seeded data order).
At the end it prints its own image->text and text->image recall on held-out web pairs beside chance.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

from open_clip.loss import ClipLoss  # noqa: E402
from tqdm import tqdm  # noqa: E402

from clip_loader import FrozenCLIP, build_tiny_clip  # noqa: E402
from make_toy_data import MANIFEST_NAME, render_record, web_caption, web_pages, world_image_keys  # noqa: E402
from transforms import build_transform  # noqa: E402
from utils import atomic_torch_save  # noqa: E402

RECALL_KS = (1, 5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("./data/toy_clip.pt"), help="the CLIP file to write (default %(default)s)")
    p.add_argument("--world", type=Path, default=None,
                   help="a toy world (scripts/make_toy_data.py) whose images the web part must not contain; "
                        "without it the web part is drawn without that check")
    p.add_argument("--seed", type=int, default=0, help="seed of the web part, the initialisation and the data order")
    p.add_argument("--num-web-images", type=int, default=12000, help="web images to train on (default %(default)s)")
    p.add_argument("--num-held-out", type=int, default=500, help="further web pairs for the recall check (default %(default)s)")
    p.add_argument("--page-size", type=int, default=4,
                   help="images per web page (variants of one thing; a batch holds whole pages) (default %(default)s)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step (default %(default)s)")
    p.add_argument("--captions-per-image", type=int, default=4,
                   help="captions drawn for every image each epoch; a step's loss is the mean of CLIP's loss over "
                        "them (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate, cosine decay after warm-up (default %(default)s)")
    p.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay of the weight matrices (default %(default)s)")
    p.add_argument("--image-size", type=int, default=48, help="input resolution (default %(default)s)")
    p.add_argument("--patch-size", type=int, default=12, help="ViT patch size (default %(default)s)")
    p.add_argument("--vision-width", type=int, default=128, help="ViT width (default %(default)s)")
    p.add_argument("--vision-layers", type=int, default=3, help="ViT blocks (default %(default)s)")
    p.add_argument("--text-width", type=int, default=64,
                   help="text transformer width, also the embedding size (default %(default)s)")
    p.add_argument("--text-layers", type=int, default=1, help="text transformer blocks (default %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads; the file is reproducible for a fixed value (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def render_images(records: list[dict], image_size: int) -> torch.Tensor:
    """[N, 3, S, S] float16: every record drawn and preprocessed as the benchmarks' images are (targetpad)."""
    tf = build_transform("targetpad", image_size)
    out = torch.empty((len(records), 3, image_size, image_size), dtype=torch.float16)
    for i, rec in enumerate(records):
        out[i] = tf(render_record(rec))
    return out


class WordCachedTokenizer:
    """`FrozenCLIP.tokenize` for plain lower-case captions, a space-separated word at a time with a cache.

    CLIP's tokenizer cleans the text, then splits it by a pattern that never crosses a space, then
    byte-pair-encodes each piece; so for text that cleaning leaves unchanged, the ids of a caption are
    the ids of its words in a row. The web captions use about a hundred words, so after the first few
    captions every word is a dictionary look-up (a test checks the ids equal the tokenizer's)."""

    def __init__(self, clip: FrozenCLIP):
        self.tokenizer, self.context_length = clip.tokenizer, clip.context_length
        self.sot, self.eot = clip.prompts.sot, clip.prompts.eot
        self.words: dict[str, list[int]] = {}

    def ids(self, caption: str) -> list[int]:
        out = [self.sot]
        for word in caption.split(" "):
            got = self.words.get(word)
            if got is None:
                if self.tokenizer.clean_fn(word) != word:
                    raise ValueError(f"caption {caption!r}: {word!r} is not plain lower-case text")
                got = self.words[word] = self.tokenizer.encode(word)
            out += got
        out.append(self.eot)
        if len(out) > self.context_length:
            raise ValueError(f"caption {caption!r} is longer than {self.context_length} tokens")
        return out

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """[len(captions), context length] token ids, zero-padded after the end token, as CLIP's."""
        rows = [self.ids(c) for c in captions]
        out = np.zeros((len(rows), self.context_length), dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return torch.from_numpy(out)


def encode_by_length(clip: FrozenCLIP, tokens: torch.Tensor, groups: int = 4) -> torch.Tensor:
    """`clip.encode_text(tokens)`, the captions sorted by length and encoded in `groups` groups, each cut
    after its own longest caption: the causal mask makes that exact, and it spares the padding that a
    batch cut at its single longest caption would carry (captions run from 4 to 25 tokens)."""
    order = tokens.argmax(dim=-1).argsort()  # the end token has the largest id
    parts = [clip.encode_text(tokens[part]) for part in order.chunk(groups)]
    return torch.cat(parts)[order.argsort()]


def _optimizers(model, lr: float, wd: float):
    """AdamW over the dense parameters (weight decay on matrices only, as open_clip trains), and a lazy
    Adam over the token embedding, whose gradient is sparse: only the rows of the words in a batch
    change, so the 49408-row table costs nothing per step."""
    model.token_embedding.sparse = True
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name == "token_embedding.weight":
            continue
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    dense = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)  # one kernel per step on the CPU too
    sparse = torch.optim.SparseAdam([model.token_embedding.weight], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    return dense, sparse


def _lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def held_out_recall(clip: FrozenCLIP, images: torch.Tensor, texts: list[str]) -> dict[str, float]:
    """Recall@K (percent) of matching each held-out image to its own caption among all, and back."""
    img = F.normalize(torch.cat([clip.encode_image(images[s:s + 256].float()) for s in range(0, len(images), 256)]), dim=-1)
    txt = F.normalize(torch.cat([clip.encode_text(clip.tokenize(texts[s:s + 256])) for s in range(0, len(texts), 256)]), dim=-1)
    sims = img @ txt.T
    truth = torch.arange(len(texts))
    out = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        rank = (s > s[truth, truth][:, None]).sum(dim=1)  # how many candidates beat the right one
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = 100.0 * float((rank < k).float().mean())
    out.update({f"chance_r{k}": 100.0 * k / len(texts) for k in RECALL_KS})
    return out


def web_data(args) -> tuple[list[dict], list[dict], torch.Tensor]:
    """(training records, held-out records, the images of both in that order): the web part of the seed,
    none of its images in the toy world `args.world`."""
    exclude = set()
    if args.world is not None:
        manifest = json.loads((Path(args.world) / MANIFEST_NAME).read_text())
        exclude = world_image_keys(manifest)
    train_pages = args.num_web_images // args.page_size
    pages = web_pages(args.seed, train_pages + math.ceil(args.num_held_out / args.page_size), args.page_size, exclude)
    records = [r for page in pages for r in page]
    train_recs = records[:train_pages * args.page_size]
    held_recs = records[len(train_recs):len(train_recs) + args.num_held_out]
    t0 = time.time()
    images = render_images(train_recs + held_recs, args.image_size)
    print(f"web part: {len(train_recs)} training + {len(held_recs)} held-out images, none in the toy world "
          f"({len(exclude)} images checked against), drawn in {time.time() - t0:.1f} s", flush=True)
    return train_recs, held_recs, images


def epoch_plan(args, epoch: int, records: list[dict], tokenize: WordCachedTokenizer) -> tuple[np.ndarray, torch.Tensor]:
    """(image order, token ids [N, captions per image, 77]) of an epoch: the pages in a new order (a batch
    holds whole pages), and new captions for every image, each drawn on its own from all the phrasings."""
    rng = np.random.default_rng([args.seed, 5, epoch])
    pages = len(records) // args.page_size
    order = (rng.permutation(pages)[:, None] * args.page_size + np.arange(args.page_size)).reshape(-1)
    k = args.captions_per_image
    tokens = tokenize([web_caption(rng, r) for r in records for _ in range(k)]).view(len(records), k, -1)
    return order, tokens


def multi_caption_loss(clip: FrozenCLIP, loss_fn: ClipLoss, images: torch.Tensor, tokens: torch.Tensor,
                       groups: int = 4) -> torch.Tensor:
    """The mean over the k captions of each image of CLIP's contrastive loss (`tokens` [B, k, 77]): one
    image pass serves k batches of captions, each a partial description, so a step teaches the visual
    tower about more of what each image shows for a little text-tower work. The B * k captions go
    through the text tower in `groups` groups of similar length (`encode_by_length`)."""
    b, k = tokens.shape[:2]
    image_f = F.normalize(clip.encode_image(images), dim=-1)
    text_f = F.normalize(encode_by_length(clip, tokens.transpose(0, 1).reshape(k * b, -1), groups), dim=-1)
    scale = clip.model.logit_scale.exp()
    return sum(loss_fn(image_f, t, scale) for t in text_f.split(b)) / k


def make_trainable(args) -> tuple[FrozenCLIP, tuple]:
    """(the toy CLIP of `args`, randomly initialised and unfrozen, its two optimisers)."""
    model = build_tiny_clip(args.seed, embed_dim=args.text_width, text_width=args.text_width,
                            text_layers=args.text_layers, vision_width=args.vision_width,
                            vision_layers=args.vision_layers, patch_size=args.patch_size, image_size=args.image_size)
    clip = FrozenCLIP(model, "toy")  # the project's encoders (text passes cut after the end token) ...
    model.requires_grad_(True)  # ... with the weights unfrozen for training (CLIP has no dropout)
    return clip, _optimizers(model, args.lr, args.wd)


def train_step(clip: FrozenCLIP, optimizers, loss_fn: ClipLoss, images: torch.Tensor, tokens: torch.Tensor,
               lr: float, groups: int = 4) -> torch.Tensor:
    """One optimiser step on a batch (images [B, 3, S, S], tokens [B, k, 77]) at learning rate `lr`."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = lr
    loss = multi_caption_loss(clip, loss_fn, images, tokens, groups)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()
    with torch.no_grad():
        clip.model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training does
    return loss.detach()


def train_toy_clip(args) -> tuple[dict, dict]:
    """(state dict of the trained CLIP, held-out recall)."""
    torch.set_num_threads(args.threads)
    train_recs, held_recs, images = web_data(args)
    clip, optimizers = make_trainable(args)
    loss_fn, tokenize = ClipLoss(), WordCachedTokenizer(clip)
    per_epoch = max(1, len(train_recs) // args.batch_size)
    bar = tqdm(range(args.steps), desc="toy CLIP", disable=args.no_progress, dynamic_ncols=True)
    for step in bar:
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            order, tokens = epoch_plan(args, epoch, train_recs, tokenize)
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        loss = train_step(clip, optimizers, loss_fn, images[idx].float(), tokens[idx], _lr_at(step, args.steps, args.lr))
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    rng = np.random.default_rng([args.seed, 6])
    recall = held_out_recall(clip, images[len(train_recs):], [web_caption(rng, r) for r in held_recs])
    return clip.model.state_dict(), recall


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.text_width % 64 or args.vision_width % 64:
        raise SystemExit("error: --text-width and --vision-width must be multiples of 64 (OpenAI's layout: width // 64 heads)")
    if args.captions_per_image < 1:
        raise SystemExit("error: --captions-per-image must be at least 1")
    t0 = time.time()
    threads = torch.get_num_threads()
    try:
        sd, recall = train_toy_clip(args)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the demo) keeps its own setting
    # OpenAI's format: a plain state dict in fp16, read back by clip_loader.load_clip like the real file
    atomic_torch_save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, args.out)
    n = args.num_held_out
    print(f"toy CLIP -> {args.out} ({time.time() - t0:.0f} s)")
    chance = ", ".join("R@%d %.1f" % (k, recall[f"chance_r{k}"]) for k in RECALL_KS)
    for name, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        figures = ", ".join("R@%d %5.1f" % (k, recall[f"{name}_r{k}"]) for k in RECALL_KS)
        print(f"  held-out web pairs ({n}), {label}: {figures}   (chance {chance})")
    return {"path": str(args.out), "recall": recall}


if __name__ == "__main__":
    main()
