"""FTI4CIR from Python: load a network and its CLIP, index a folder of images, search it with a reference
image and a text, and look at the pseudo-words the network writes for an image.

    from fti4cir_api import load        # or torch.hub.load(REPO, "fti4cir", source="local", ...)
    model = load(checkpoint="FTI4CIR_released.pt", clip_weights="ViT-L-14.pt")
    index = model.index("photos/")
    hits = model.search(index, reference="photos/dress.jpg", text="is red with long sleeves", top=5)
    words = model.explain("photos/dress.jpg")

Retrieval is retrieve.py's, which calls this module: the same gallery cache as evaluate.py
(`folder_search.index_folder`), the same composed queries and ranking (`folder_search.rank_folder`).
`explain` shows the subject pseudo-word, the r attribute pseudo-words with their selection scores and
where in the image each attribute word looks (METHOD §3 and "What explain shows" in §10).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from checkpoint import load_network, warn_if_other_clip
from clip_loader import load_clip
from datasets import IMAGE_SUFFIXES, ImageLoadError, list_images, load_image
from errors import ConfigError, UserError
from evaluation import EvalConfig
from feature_store import DEFAULT_CACHE_DIR
from features import BASELINES, Counters, Encoding
from folder_search import FolderIndex, FolderResults, index_folder, rank_folder
from hub import is_hub_reference, local_file
from precision import inference
from prompts import PREFIX
from transforms import CLIP_MEAN, CLIP_STD, build_transform
from utils import resolve_device

__all__ = ["load", "FTI4CIRModel", "Explanation", "PseudoWord", "InputError", "FolderIndex"]


class InputError(UserError, ValueError):
    """An argument of the API that cannot work: a missing folder or file, a folder without images, an
    image that cannot be read, an empty text. The message is one line naming the value and the fix."""


def load(checkpoint=None, clip_weights=None, *, clip_model: str = "ViT-L/14", clip_format: str = "auto",
         clip_pretrained: str | None = None, device=None, **options) -> "FTI4CIRModel":
    """The network of `checkpoint` over the CLIP of `clip_weights`, ready to index and search.

    checkpoint: this repository's checkpoint (src/train.py) or the authors' released file, a path or
    `hf-hub:OWNER/REPO/FILE`; None gives a model that only answers the image-only / text-only baselines.
    clip_weights: OpenAI's CLIP file, an open_clip checkpoint or `hf-hub:OWNER/REPO/FILE`; None: open_clip's
    'openai' weights of `clip_model` from the local cache (or `clip_pretrained`, one of open_clip's tags).
    device: 'cuda', 'cuda:1', 'cpu', ... (default: cuda when available). `options`: FTI4CIRModel's.
    """
    for value, name in ((checkpoint, "checkpoint"), (clip_weights, "clip_weights")):
        if value is not None and not is_hub_reference(value) and not Path(value).is_file():
            raise InputError(f"{name}={str(value)!r}: no such file; pass a local file or hf-hub:OWNER/REPO/FILE")
    device = resolve_device(device)
    clip = load_clip(clip_model, clip_weights, device=device, clip_format=clip_format, pretrained=clip_pretrained)
    net = None
    if checkpoint is not None:
        net, info = load_network(local_file(checkpoint, "checkpoint"), device)
        try:
            net.check_clip(clip)
        except ValueError as e:
            raise ConfigError(f"checkpoint={str(checkpoint)!r} does not fit the CLIP loaded ({clip.source}): {e}; "
                              "pass the clip_weights it was trained with") from None
        warn_if_other_clip(f"checkpoint={str(checkpoint)!r}", info, clip, "clip_weights")
    return FTI4CIRModel(net, clip, **options)


# ---------------------------------------------------------------------------------------------
# what explain returns

@dataclass
class PseudoWord:
    """One pseudo-word of an image: a token embedding `vector` [E] that the network writes, shown as its
    `nearest` vocabulary tokens (token, cosine similarity in CLIP's token-embedding space), best first.
    Attribute words also carry their template, selection score and patch map."""

    role: str  # "subject" or "attribute"
    vector: torch.Tensor
    nearest: list[tuple[str, float]]
    template: int | None = None  # the attribute template k it comes from
    score: float | None = None  # its selection score s_k (METHOD §3)
    patch_map: torch.Tensor | None = None  # [grid, grid], sums to 1: the template's attention over the patches

    @property
    def word(self) -> str:
        """The nearest vocabulary token, for display."""
        return self.nearest[0][0]


@dataclass
class Explanation:
    """The pseudo-words FTI4CIR writes for one reference image."""

    reference: str
    subject: PseudoWord
    attributes: list[PseudoWord]  # the r attribute words, in the order they take in the sentence
    scores: torch.Tensor  # [K] selection scores of every template
    view: Image.Image  # the image as CLIP sees it (after preprocessing): the patch maps' frame

    @property
    def r(self) -> int:
        return len(self.attributes)

    def sentence(self, text: str | None = None) -> str:
        """The composed sentence with each pseudo-word shown as its nearest token in brackets."""
        words = " ".join(f"[{a.word}]" for a in self.attributes)
        s = f"{PREFIX.replace('*', f'[{self.subject.word}]')} {words}"
        return f"{s} but {text}" if text is not None else s


# ---------------------------------------------------------------------------------------------

class FTI4CIRModel:
    """An FTI4CIR network (None: baselines only) and its frozen CLIP, with how to encode.

    Every method is batched, runs on CLIP's device and computes no gradients. `cache_dir=None`: the
    gallery features are not cached; `workers`: DataLoader processes for the gallery (0: none).
    """

    def __init__(self, net, clip, *, preprocess_type: str = "targetpad", batch_size: int = 32,
                 workers: int = min(8, os.cpu_count() or 1), precision: str = "fp32",
                 cache_dir=DEFAULT_CACHE_DIR, cache_hash_images: bool = False, progress: bool = True):
        if net is not None:
            net.eval()
        self.net, self.clip = net, clip
        self.preprocess_type = preprocess_type
        self.preprocess = build_transform(preprocess_type, clip.image_size)
        self.encoding = Encoding(batch_size=batch_size, workers=workers, precision=precision, progress=progress)
        self.device = self.encoding.on(clip)
        self.cache_dir, self.cache_hash_images = cache_dir, cache_hash_images
        self._vocabulary = None

    @property
    def counters(self) -> Counters:
        """How many images were encoded and how often the gallery cache served (for logs and tests)."""
        return self.encoding.counters

    def _config(self, baseline: str | None = None, progress: bool | None = None) -> EvalConfig:
        encoding = self.encoding if progress is None else dataclasses.replace(self.encoding, progress=progress)
        return EvalConfig(split="", preprocess_type=self.preprocess_type, encoding=encoding, cache_dir=self.cache_dir,
                          cache_hash_images=self.cache_hash_images, baseline=baseline)

    # retrieval ----------------------------------------------------------------------------------
    def index(self, folder, progress: bool | None = None, skip_bad_images: bool = False) -> FolderIndex:
        """Every image under `folder` (recursive; hidden files and folders skipped) as a gallery: CLIP's
        embeddings, from the gallery cache evaluate.py uses when it holds them, else encoded (a progress
        bar unless `progress=False`) and written there. `skip_bad_images`: images that cannot be read are
        left out, counted in one warning (else the first one is an error)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"gallery folder {folder}: no such folder")
        if not list_images(folder):
            raise InputError(f"gallery folder {folder}: holds no images ({' '.join(IMAGE_SUFFIXES)}, searched "
                             "recursively); pass a folder of images")
        return index_folder(self.clip, folder, self._config(progress=progress), skip_bad_images)

    def rank(self, index: FolderIndex, queries: Sequence[tuple[str, str]], top: int = 10,
             baseline: str | None = None, exclude_reference: bool = False) -> FolderResults:
        """Each (reference image, text) query's `top` gallery rows, best first, with their cosine
        similarities: FTI4CIR's composed query, or `baseline` ('image-only' / 'text-only').
        `exclude_reference`: a reference that is itself in the gallery is left out of its own ranking."""
        if baseline not in (None,) + BASELINES:
            raise InputError(f"baseline={baseline!r}: choose one of {BASELINES}, or None for FTI4CIR")
        if baseline is None and self.net is None:
            raise InputError("this model was loaded without a checkpoint: pass checkpoint=... to load, or "
                             "baseline='image-only' / 'text-only'")
        if top < 1:
            raise InputError(f"top={top}: ask for at least one result")
        if not isinstance(index, FolderIndex):
            raise InputError(f"expected the index that model.index(folder) returns, got {type(index).__name__}")
        for reference, text in queries:
            self._check_reference(reference)
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"the text of the query with reference {reference} is empty: say what to change "
                                 "in the image, e.g. 'is red with long sleeves'")
        return rank_folder(self.net, self.clip, index, list(queries), self._config(baseline), top, exclude_reference)

    def search(self, index: FolderIndex, reference, text: str, top: int = 5, baseline: str | None = None,
               exclude_reference: bool = False) -> list[tuple[str, float]]:
        """The `top` gallery images for one query, best first: [(path, cosine similarity), ...], the
        ranking and scores retrieve.py prints."""
        results = self.rank(index, [(str(reference), text)], top, baseline, exclude_reference)
        paths = index.paths
        return [(str(paths[j]), float(s)) for j, s in zip(results.ranked[0].tolist(), results.scores[0].tolist())]

    # explanation -----------------------------------------------------------------------------------
    def _check_reference(self, path) -> Image.Image:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"reference image {path}: no such file")
        try:
            return load_image(path)
        except ImageLoadError as e:
            if isinstance(e.__cause__, Image.DecompressionBombError):
                raise  # its own message says how to raise the pixel limit
            why = str(e.__cause__ or e).splitlines()[0]
            raise InputError(f"reference image {path}: cannot be read as an image ({why}); pass a jpg, png or "
                             "webp file") from None

    @torch.no_grad()
    def explain(self, reference, words: int = 5):
        """The pseudo-words of a reference image (a path; a list of paths gives a list): the subject word,
        the r attribute words with their selection scores and, per attribute word, a patch map: the
        attention of its template over CLIP's patch tokens in the last attribute layer, heads averaged,
        renormalised over the patches (METHOD §10, "What explain shows"). Each word is shown as its
        `words` nearest vocabulary tokens by cosine similarity in CLIP's token-embedding space."""
        if self.net is None:
            raise InputError("explain needs the FTI4CIR network: pass checkpoint=... to load")
        if self.net.cfg.ablation is not None:  # it lays out both kinds of pseudo-word; an ablation has one
            raise InputError(f"explain shows the subject and the attribute words; this checkpoint is the ablation "
                             f"{self.net.cfg.ablation!r} (docs/METHOD.md §14): search with it, explain a full model")
        paths = [reference] if isinstance(reference, (str, os.PathLike)) else list(reference)
        images = torch.stack([self.preprocess(self._check_reference(p)) for p in paths])
        out = []
        for s in range(0, len(paths), self.encoding.batch_size):
            out += self._explain_batch(paths[s:s + self.encoding.batch_size], images[s:s + self.encoding.batch_size],
                                       words)
        return out[0] if isinstance(reference, (str, os.PathLike)) else out

    def _explain_batch(self, paths, images: torch.Tensor, words: int) -> list[Explanation]:
        net, device = self.net, self.device
        seen = {}
        attributes = net.attributes
        # the network's own pass, with its last attribute layer's attention input and the attribute
        # features A kept: the words shown are exactly the ones a query composes
        hooks = [attributes.layers[-1].attn.register_forward_pre_hook(lambda m, args: seen.update(h=args[0])),
                 attributes.register_forward_hook(lambda m, args, out: seen.update(A=out))]
        try:
            with inference(self.encoding.precision, device):
                g, P = self.clip.encode_visual(images.to(device))
                v_s, v_a, _, r = net.pseudo_words(g, P)
        finally:
            for h in hooks:
                h.remove()
        K = attributes.templates.shape[0]
        scores = torch.softmax(torch.einsum("bke,be->bk", seen["A"].float(), g.float()), dim=-1)  # METHOD §3 step 1
        # the r best templates in template order: the rows select_attributes puts first
        best = torch.sort(scores, dim=1, descending=True, stable=True).indices
        maps = self._patch_maps(attributes.layers[-1].attn, seen["h"].float(), K)  # [B, K, grid, grid]
        nearest = self._nearest(torch.cat([v_s[:, None], v_a], dim=1).float(), words)
        out = []
        for b, path in enumerate(paths):
            n = int(r[b])
            chosen = sorted(best[b, :n].tolist())
            subject = PseudoWord("subject", v_s[b].float().cpu(), nearest[b][0])
            attrs = [PseudoWord("attribute", v_a[b, i].float().cpu(), nearest[b][1 + i], template=k,
                                score=float(scores[b, k]), patch_map=maps[b, k].cpu())
                     for i, k in enumerate(chosen)]
            out.append(Explanation(str(path), subject, attrs, scores[b].cpu(), _view(images[b])))
        return out

    @staticmethod
    def _patch_maps(attn, h: torch.Tensor, K: int) -> torch.Tensor:
        """[B, K, grid, grid]: each template's attention weights over the N patch tokens in the layer whose
        attention module is `attn` and whose normalised input is `h` [B, K+1+N, W] (templates, class token,
        patches), averaged over heads, renormalised to sum to 1 over the patches."""
        B, M, W = h.shape
        H = attn.heads
        q = F.linear(h, attn.q_proj.weight.float()).view(B, M, H, W // H).transpose(1, 2)
        k = F.linear(h, attn.kv_proj.weight.float()).view(B, M, 2, H, W // H)[:, :, 0].transpose(1, 2)
        weights = torch.softmax(q[:, :, :K] @ k.transpose(-1, -2) * (W // H) ** -0.5, dim=-1).mean(dim=1)  # [B, K, M]
        patches = weights[:, :, K + 1:]
        grid = math.isqrt(patches.shape[-1])
        if grid * grid != patches.shape[-1]:
            raise ValueError(f"{patches.shape[-1]} patch tokens do not form a square grid")
        return (patches / patches.sum(dim=-1, keepdim=True)).view(B, K, grid, grid)

    def _nearest(self, vectors: torch.Tensor, n: int) -> list[list[list[tuple[str, float]]]]:
        """The n vocabulary tokens nearest each of vectors [B, S, E] by cosine similarity to CLIP's token
        embeddings (start and end tokens left out); a token that does not end a word is shown with '-'."""
        if self._vocabulary is None:
            table = F.normalize(self.clip.model.token_embedding.weight.detach().float(), dim=-1)
            self._vocabulary = table
        table = self._vocabulary
        sims = F.normalize(vectors, dim=-1) @ table.T  # [B, S, V]
        sims[..., [self.clip.prompts.sot, self.clip.prompts.eot]] = -2.0
        values, ids = sims.topk(n, dim=-1)
        decoder = self.clip.tokenizer.decoder
        byte_decoder = self.clip.tokenizer.byte_decoder

        def token(i: int) -> str:
            bpe = decoder[i]
            text = bytearray(byte_decoder[c] for c in bpe.replace("</w>", "")).decode("utf-8", errors="replace")
            return text if bpe.endswith("</w>") else text + "-"

        return [[[(token(i), round(float(v), 4)) for i, v in zip(row_ids, row_v)]
                 for row_ids, row_v in zip(ids_b.tolist(), v_b.tolist())] for ids_b, v_b in zip(ids, values)]


def _view(image: torch.Tensor) -> Image.Image:
    """A preprocessed image tensor [3, S, S] back to the RGB picture CLIP was given."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())
