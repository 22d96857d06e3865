"""The toy CLIP's training: an open_clip `CLIP` in OpenAI's layout (QuickGELU, vocabulary 49408, context
77), built as `toy.tiny_clip.build_tiny_clip` builds one, with text width == embedding size as FTI4CIR
needs, trained contrastively with open_clip's own `ClipLoss` on image-caption pairs of the toy world's
*web* part (`toy.web.web_pages`): shape scenes and garments, none of them an image of the benchmarks or
of the toy ImageNet. Every epoch each image gets several captions (`captions_per_image`), each drawn on
its own from many phrasings, full or partial, as an image on the web carries several alt texts; a step's
loss is the mean of `ClipLoss` over them, so one pass of the visual tower, the costly part, learns from
all of them. It never sees a benchmark annotation. scripts/make_toy_clip.py is its command line.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from tqdm import tqdm

from clip_loader import FrozenCLIP
from toy.captions import web_caption
from toy.drawing import render_record
from toy.tiny_clip import build_tiny_clip
from toy.web import web_pages
from toy.world import MANIFEST_NAME, world_image_keys
from transforms import build_transform
from utils import show_progress

RECALL_KS = (1, 5)


@dataclass
class ToyClipConfig:
    """What a toy CLIP is trained from and how; the same values give the same weights, bit for bit."""

    world: Path | None = None  # a toy world whose images the web part must not contain (None: no check)
    seed: int = 0  # of the web part, the initialisation and the data order
    num_web_images: int = 12000  # web images to train on
    num_held_out: int = 500  # further web pairs for the recall check
    page_size: int = 4  # images per web page (variants of one thing; a batch holds whole pages)
    steps: int = 1000  # optimiser steps
    batch_size: int = 128  # pairs per step
    captions_per_image: int = 4  # captions drawn for every image each epoch
    lr: float = 1e-3  # peak AdamW learning rate, cosine decay after warm-up
    wd: float = 0.1  # AdamW weight decay of the weight matrices
    image_size: int = 48
    patch_size: int = 12
    vision_width: int = 128
    vision_layers: int = 3
    text_width: int = 64  # also the embedding size
    text_layers: int = 1
    threads: int = 2  # CPU threads; the weights are reproducible for a fixed value
    progress: bool = True


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


def web_data(config: ToyClipConfig) -> tuple[list[dict], list[dict], torch.Tensor]:
    """(training records, held-out records, the images of both in that order): the web part of the seed,
    none of its images in the toy world `config.world`."""
    exclude = set()
    if config.world is not None:
        manifest = json.loads((Path(config.world) / MANIFEST_NAME).read_text())
        exclude = world_image_keys(manifest)
    train_pages = config.num_web_images // config.page_size
    pages = web_pages(config.seed, train_pages + math.ceil(config.num_held_out / config.page_size), config.page_size,
                      exclude)
    records = [r for page in pages for r in page]
    train_recs = records[:train_pages * config.page_size]
    held_recs = records[len(train_recs):len(train_recs) + config.num_held_out]
    t0 = time.time()
    images = render_images(train_recs + held_recs, config.image_size)
    print(f"web part: {len(train_recs)} training + {len(held_recs)} held-out images, none in the toy world "
          f"({len(exclude)} images checked against), drawn in {time.time() - t0:.1f} s", flush=True)
    return train_recs, held_recs, images


def epoch_plan(config: ToyClipConfig, epoch: int, records: list[dict],
               tokenize: WordCachedTokenizer) -> tuple[np.ndarray, torch.Tensor]:
    """(image order, token ids [N, captions per image, 77]) of an epoch: the pages in a new order (a batch
    holds whole pages), and new captions for every image, each drawn on its own from all the phrasings."""
    rng = np.random.default_rng([config.seed, 5, epoch])
    pages = len(records) // config.page_size
    order = (rng.permutation(pages)[:, None] * config.page_size + np.arange(config.page_size)).reshape(-1)
    k = config.captions_per_image
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


def make_trainable(config: ToyClipConfig) -> tuple[FrozenCLIP, tuple]:
    """(the toy CLIP of `config`, randomly initialised and unfrozen, its two optimisers)."""
    model = build_tiny_clip(config.seed, embed_dim=config.text_width, text_width=config.text_width,
                            text_layers=config.text_layers, vision_width=config.vision_width,
                            vision_layers=config.vision_layers, patch_size=config.patch_size,
                            image_size=config.image_size)
    clip = FrozenCLIP(model, "toy")  # the project's encoders (text passes cut after the end token) ...
    model.requires_grad_(True)  # ... with the weights unfrozen for training (CLIP has no dropout)
    return clip, _optimizers(model, config.lr, config.wd)


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


def train_toy_clip(config: ToyClipConfig) -> tuple[dict, dict]:
    """(state dict of the trained CLIP, held-out recall)."""
    torch.set_num_threads(config.threads)
    train_recs, held_recs, images = web_data(config)
    clip, optimizers = make_trainable(config)
    loss_fn, tokenize = ClipLoss(), WordCachedTokenizer(clip)
    per_epoch = max(1, len(train_recs) // config.batch_size)
    bar = tqdm(range(config.steps), desc="toy CLIP", disable=not show_progress(config.progress), dynamic_ncols=True)
    for step in bar:
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            order, tokens = epoch_plan(config, epoch, train_recs, tokenize)
        idx = order[i * config.batch_size:(i + 1) * config.batch_size]
        loss = train_step(clip, optimizers, loss_fn, images[idx].float(), tokens[idx],
                          _lr_at(step, config.steps, config.lr))
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    rng = np.random.default_rng([config.seed, 6])
    recall = held_out_recall(clip, images[len(train_recs):], [web_caption(rng, r) for r in held_recs])
    return clip.model.state_dict(), recall
