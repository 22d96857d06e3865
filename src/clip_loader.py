"""Loading the frozen CLIP that FTI4CIR works over, and the few entry points into it that the method
needs (METHOD §1 and §5): one visual pass giving both the global feature `g` and the visual tokens
`P` (the last block's output), and a text pass that starts from token embeddings (so pseudo-words can
be put in).

Every script loads CLIP through `load_clip`, a thin layer over open_clip: a file given with
--clip-weights is read here; open_clip's pretrained weights (OpenAI's by default) are found in open_clip's
caches or downloaded by open_clip. A `FrozenCLIP` holds its tokenizer and the prompt builder made from it
(`prompts`). The network itself never holds CLIP, so CLIP is never inside DDP or the network's state dict.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import open_clip
from open_clip.model import CLIP, build_model_from_openai_state_dict
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_file as load_safetensors

from errors import UserError, torch_load_problem
from hub import cached_hub_file, fail_if_offline, hub_file, is_hub_reference, not_cached_message
from logs import get_logger
from models import text_width_problem
from prompts import PromptBuilder

log = get_logger("clip_loader")
_NOTICES_GIVEN: set[str] = set()  # a process that loads CLIP several times (the demo, validation) says each once

# OpenAI spelling -> open_clip spelling. Anything else is taken as an open_clip name.
_OPENAI_NAMES = {
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}
CLIP_FORMATS = ("auto", "openai", "open_clip")


class ClipLoadError(UserError, RuntimeError):
    """CLIP weights could not be found or read; the message says what to pass."""


def canonical_model_name(name: str) -> str:
    """'ViT-L/14' and 'ViT-L-14' both give open_clip's 'ViT-L-14'."""
    name = _OPENAI_NAMES.get(name, name)
    if name not in open_clip.list_models():
        known = ", ".join(sorted(_OPENAI_NAMES) + ["ViT-L-14", "ViT-B-32", "ViT-B-16"])
        raise ClipLoadError(f"--clip-model {name!r} is not a CLIP architecture open_clip knows; try one of: {known}")
    return name


class FrozenCLIP(nn.Module):
    """A frozen, float32, eval-mode open_clip `CLIP` (ViT image tower) with the method's entry points."""

    def __init__(self, model: CLIP, name: str = "custom", source: str = "", pretrained: str | None = None):
        super().__init__()
        visual = getattr(model, "visual", None)
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ClipLoadError(f"FTI4CIR needs a ViT image tower (patch tokens); {name} has {type(visual).__name__}")
        if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type != "tok":
            raise ClipLoadError(f"{name}: only CLS-token ViTs in the OpenAI layout are supported")
        if not hasattr(model, "token_embedding"):
            raise ClipLoadError(f"{name}: only CLIP models with the OpenAI text tower are supported")
        self.model = model
        # architecture name (open_clip spelling), `<architecture>:<tag>` for open_clip pretrained weights other
        # than OpenAI's (open_clip's own `name:tag` spelling); stored in FTI4CIR checkpoints
        self.name = name
        self.source = source or name  # where the weights came from, for logs and feature caches
        self.pretrained = pretrained  # open_clip pretrained tag (--clip-pretrained), None for OpenAI's weights or a file
        model.float().eval().requires_grad_(False)  # frozen, float32 weights (code)
        self.tokenizer = SimpleTokenizer(context_length=model.context_length)
        try:  # the method's sentences as token ids, with this tokenizer's special ids (prompts.py)
            self.prompts = PromptBuilder(self.tokenizer, model.context_length)
        except ValueError as e:
            raise ClipLoadError(f"{name}: {e}") from e
        self._fingerprint: dict | None = None
        self._weights_fingerprint: str | None = None
        self._float32_copy: dict | None = None
        self.train_visual = self.encode_visual  # the training step's visual pass (`compile_visual`)
        self.causal_text = False  # `use_causal_text_attention`
        self.train(False)

    @property
    def star_id(self) -> int:
        """`prompts.star`, the `*` placeholder's id, under the name src/reference.py reads."""
        return self.prompts.star

    def train(self, mode: bool = True):  # CLIP stays in eval mode whatever its owner does
        return super().train(False)

    def fingerprint(self) -> dict:
        """What features computed with this CLIP depend on, for the caches' keys: where the weights came
        from, the weights file's size and modification time when they came from a file, a hash of a few
        visual weights (catches weights swapped under an unchanged name, hub weights included) and the
        input size."""
        if self._fingerprint is None:
            info = {"source": str(self.source)}
            if self.pretrained is not None:
                info["pretrained"] = self.pretrained
            _, _, path = info["source"].partition(":")
            if path and os.path.isfile(path):
                st = os.stat(path)
                info.update(weights_size=st.st_size, weights_mtime_ns=st.st_mtime_ns)
            v = self.model.visual
            h = hashlib.sha256()
            for t in (v.proj, v.class_embedding, v.conv1.weight, v.ln_post.weight):
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            info.update(visual_weights_sha256=h.hexdigest(), image_size=self.image_size)
            self._fingerprint = info
        return dict(self._fingerprint)

    def weights_fingerprint(self) -> str:
        """A short digest of the weights alone (`weights_digest`): the same for the same weights wherever
        they were read from, different for other weights of the same shapes. Training checkpoints record
        it, and resuming or evaluating one compares it with the CLIP loaded. Taken once, from the float32
        weights as loaded (`hold_visual_weights_in` takes it before it casts them)."""
        if self._weights_fingerprint is None:
            self._weights_fingerprint = weights_digest(self.model.state_dict())
        return self._weights_fingerprint

    # sizes (METHOD's symbols)
    @property
    def embed_dim(self) -> int:  # D
        return self.model.text_projection.shape[1]

    @property
    def vision_width(self) -> int:  # W
        return self.model.visual.conv1.out_channels

    @property
    def text_width(self) -> int:  # E
        return self.model.token_embedding.weight.shape[1]

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    # image side
    def encode_visual(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the visual tower: `g` [B, D] (not normalised) and the visual tokens `P` [B, N+1, W].

        `P` is the output of the last transformer block, before `ln_post` (code: the authors run every
        block, the last one too); `g` is `ln_post(P[:, 0]) @ proj`, exactly what `encode_image` gives.
        """
        v = self.model.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        x = v.ln_pre(x)
        P = v.transformer(x)
        g = v.ln_post(P[:, 0]) @ v.proj
        return g, P

    # speed options (docs/PERFORMANCE.md): none changes the method; the equality each keeps is tested
    def hold_visual_weights_in(self, dtype: torch.dtype) -> None:
        """Keep the frozen visual tower's weights in `dtype` (fp16/bf16 training, where autocast casts them to
        it at every call anyway). When that cast loses digits (bf16; fp32 weights that did not come as
        fp16), a float32 copy stays on the CPU, so `float32_weights()` gives back exactly the loaded ones.
        The text tower stays float32: its LayerNorms run in float32 on the gradient path."""
        if self.train_visual != self.encode_visual:
            # the compiled pass keeps the weights' dtype it was traced with; changing it under the compiled
            # kernels read past the weights' memory on an H200 (illegal memory access), not an error
            raise RuntimeError("hold_visual_weights_in after compile_visual: hold the weights first, then compile "
                               "(training.apply_speed_options does it in that order)")
        self.weights_fingerprint()  # of the weights as loaded, not of their cast
        state = {k: v for k, v in self.model.visual.state_dict().items() if v.is_floating_point()}
        lossless = all(torch.equal(v.to(dtype).to(v.dtype), v) for v in state.values())
        self._float32_copy = None if lossless else {k: v.detach().float().cpu().clone() for k, v in state.items()}
        self.model.visual.to(dtype)

    @property
    def visual_dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    @contextlib.contextmanager
    def float32_weights(self):
        """float32 weights for the region (fp32 validation during a half-weight training run), then back."""
        dtype = self.visual_dtype
        if dtype == torch.float32:
            yield
            return
        self.model.visual.float()
        if self._float32_copy is not None:
            self.model.visual.load_state_dict(self._float32_copy, strict=False)
        try:
            yield
        finally:
            self.model.visual.to(dtype)

    def compile_visual(self) -> None:
        """torch.compile the training step's visual pass (`train_visual`). Training batches keep one shape
        (the last partial batch is dropped), so it compiles once; with --cache-image-features a batch whose
        rows are partly cached runs the tower on the others alone, and that new size costs one more compile,
        with a dynamic batch dimension. Evaluation keeps the eager pass, whose last batch differs in size."""
        self.train_visual = torch.compile(self.encode_visual)

    def use_causal_text_attention(self, on: bool = True) -> None:
        """Text attention through scaled_dot_product_attention with `is_causal` instead of a float mask,
        which lets PyTorch pick a fused (flash) kernel; the same product up to rounding."""
        self.causal_text = on

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_visual(images)[0]

    # text side
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.context_length)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(ids)

    def encode_token_embeddings(self, x: torch.Tensor, eot_pos: torch.Tensor, trim: bool = True) -> torch.Tensor:
        """Text features from token embeddings `x` [B, L, E] whose end token sits at `eot_pos` [B].

        With `trim`, positions after the longest end token of the batch are cut off first: the causal
        mask makes every position's output independent of what follows it, so the end-token features
        are unchanged (tests/test_models.py proves it) and the transformer runs on fewer positions.
        """
        m = self.model
        if trim:
            x = x[:, : int(eot_pos.max()) + 1]
        length = x.shape[1]
        x = x + m.positional_embedding[:length].to(x.dtype)
        if self.causal_text:
            x = _causal_transformer(m.transformer, x)
        else:
            x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_pos]
        return x @ m.text_projection

    def encode_text(self, ids: torch.Tensor, trim: bool = True) -> torch.Tensor:
        """Plain CLIP text features of token ids [B, 77] (end token = the largest id)."""
        return self.encode_token_embeddings(self.token_embedding(ids), ids.argmax(dim=-1), trim=trim)


WEIGHT_SAMPLES = 64  # values read from each tensor by weights_digest


def weights_digest(state: dict[str, torch.Tensor], length: int = 16) -> str:
    """Hex SHA-256 (first `length` digits) over every tensor's name, shape and dtype and WEIGHT_SAMPLES of its
    values at fixed, evenly spaced positions (first and last included), read as float32. Cheap for any CLIP
    (a few hundred small reads, one copy to the host), and any retraining or fine-tuning moves the sampled
    values; a change confined to unsampled entries would go unnoticed."""
    h = hashlib.sha256()
    samples = []
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.reshape(-1)
        if flat.numel():
            k = min(flat.numel(), WEIGHT_SAMPLES)
            at = torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)  # integers: the same positions on every device
            samples.append(flat.index_select(0, at.to(flat.device)).float())
    if samples:
        h.update(torch.cat(samples).cpu().numpy().tobytes())
    return h.hexdigest()[:length]


# flash, memory-efficient or math kernels: the cuDNN attention kernel failed on an H200 (torch 2.11) for these
# shapes under fp16 autocast, and its failure leaves the CUDA context unusable
CAUSAL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _causal_transformer(transformer, x: torch.Tensor) -> torch.Tensor:
    """open_clip's text `Transformer` (batch first, pre-norm `ResidualAttentionBlock`s) with its attention
    as one `scaled_dot_product_attention(is_causal=True)` call per block: the computation of
    `nn.MultiheadAttention` with the causal float mask, in the order it does it."""
    B, L, E = x.shape
    for r in transformer.resblocks:
        a = r.attn
        H = a.num_heads
        q, k, v = F.linear(r.ln_1(x), a.in_proj_weight, a.in_proj_bias).view(B, L, 3, H, E // H).unbind(2)
        with sdpa_kernel(CAUSAL_BACKENDS):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + r.ls_1(F.linear(o.transpose(1, 2).reshape(B, L, E), a.out_proj.weight, a.out_proj.bias))
        x = x + r.ls_2(r.mlp(r.ln_2(x)))
    return x


# ---------------------------------------------------------------------------------------------
# loading: a file given with --clip-weights is read here (OpenAI's layout or an open_clip checkpoint);
# open_clip's pretrained weights are found in its caches or downloaded by open_clip itself


def _read_weights(path: Path):
    """Returns (state_dict, kind) with kind 'jit', 'state_dict' or 'training_checkpoint'."""
    if not path.is_file():
        raise ClipLoadError(
            f"--clip-weights {path}: no such file. Pass OpenAI's CLIP file (e.g. ~/.cache/clip/ViT-L-14.pt) "
            "or an open_clip checkpoint."
        )
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                is_jit = any(n.endswith("constants.pkl") for n in z.namelist())
            if is_jit:
                return torch.jit.load(str(path), map_location="cpu").state_dict(), "jit"
        if path.suffix == ".safetensors":
            obj = load_safetensors(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise ClipLoadError(
            f"--clip-weights {path}: cannot be read as a CLIP checkpoint (TorchScript archive, state dict or "
            f"open_clip checkpoint): {torch_load_problem(e, path)}"
        ) from None
    if isinstance(obj, dict) and obj.get("format") == "fti4cir":
        raise ClipLoadError(f"--clip-weights {path}: an FTI4CIR checkpoint, not CLIP weights; pass it as --model-path "
                            "and CLIP's own file as --clip-weights")
    kind = "state_dict"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, kind = obj["state_dict"], "training_checkpoint"
        if next(iter(obj), "").startswith("module."):
            obj = {k[len("module."):]: v for k, v in obj.items()}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClipLoadError(f"--clip-weights {path}: holds a {type(obj).__name__}, not a CLIP state dict")
    if not any(k.startswith("visual.") for k in obj):  # checked before a model is built for it
        raise ClipLoadError(f"--clip-weights {path}: holds no CLIP weights (no visual tower's keys); pass OpenAI's CLIP "
                            "file or an open_clip checkpoint")
    return obj, kind


def _is_openai_layout(sd: dict) -> bool:
    return all(k in sd for k in ("visual.proj", "visual.conv1.weight", "token_embedding.weight", "text_projection"))


def build_openai_model(sd: dict, fast: bool = True) -> CLIP:
    """open_clip's `build_model_from_openai_state_dict` (architecture inferred, QuickGELU, the weights it
    converts to fp16 stored in fp16), without its random initialisation: the model is laid out on the meta
    device, given uninitialised memory, then every persistent tensor is filled from `sd` (strict) and the
    buffers a state dict does not hold (the causal mask, and nothing else) rebuilt. The same model (tested);
    `load_clip` of a ViT-L/14 file takes 2-8 s instead of 9-19 s (CPU figures, on a 2-core CPU shared with
    other work). `fast=False`, or a model with any other buffer outside its state dict, takes the plain way."""
    if fast:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint to a meta parameter")
            model = build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None)
        persistent = set(model.state_dict())
        derived = [n for n, _ in model.named_buffers() if n not in persistent]
        if all(n.rpartition(".")[2] == "attn_mask" and model.get_buffer(n).dim() == 2 for n in derived):
            sizes = {n: model.get_buffer(n).shape[0] for n in derived}
            model = model.to_empty(device="cpu")
            model.load_state_dict({k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")})
            for n, size in sizes.items():  # open_clip's causal mask: -inf above the diagonal
                owner, _, attr = n.rpartition(".")
                setattr(model.get_submodule(owner), attr, torch.full((size, size), float("-inf")).triu_(1))
            return model.eval()
    return build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None)


def _load_weights_file(path: Path, model_name: str, clip_format: str) -> tuple[CLIP, str]:
    sd, kind = _read_weights(path)
    if clip_format == "auto":
        clip_format = "openai" if (kind != "training_checkpoint" and _is_openai_layout(sd)) else "open_clip"
    if clip_format == "openai":
        if not _is_openai_layout(sd):
            raise ClipLoadError(
                f"--clip-weights {path}: not an OpenAI-format CLIP ViT (expected keys visual.proj, visual.conv1.weight, "
                "token_embedding.weight, text_projection)"
            )
        # causal masks are rebuilt by the model; a traced archive may carry them as buffers
        sd = {k: v for k, v in sd.items() if not k.endswith("attn_mask")}
        try:
            # Architecture inferred from the weights, QuickGELU as OpenAI trained it. The OpenAI loader
            # stores the weights in fp16 before .float(), as OpenAI's clip.load does; kept (code).
            model = build_openai_model(sd)
        except Exception as e:  # noqa: BLE001
            raise ClipLoadError(f"--clip-weights {path}: OpenAI-format weights that do not build a CLIP: {e}") from e
        return model, f"openai:{path.resolve()}"
    name = canonical_model_name(model_name)
    model = open_clip.create_model(name, pretrained=None)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ClipLoadError(f"--clip-weights {path}: shapes do not fit --clip-model {name}: {e}") from e
    missing = [k for k in missing if k not in ("logit_bias",)]
    if missing or unexpected:
        raise ClipLoadError(
            f"--clip-weights {path}: not an open_clip {name} checkpoint (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model, f"{name}:{path.resolve()}"


def qualifying_backbones() -> dict[str, list[str]]:
    """open_clip's model configs that FTI4CIR can run over, with their pretrained tags: a ViT image tower
    pooled by its class token, OpenAI's text tower (argmax pooling, a projection matrix, causal mask) and
    the text width the network needs (models.text_width_problem)."""
    out = {}
    for name in open_clip.list_models():
        c = open_clip.get_model_config(name) or {}
        v, t = c.get("vision_cfg", {}), c.get("text_cfg", {})
        ok = (not c.get("custom_text") and "multimodal_cfg" not in c and "hf_model_name" not in t
              and "timm_model_name" not in v and isinstance(v.get("layers", 12), int)
              and not v.get("attentional_pool") and v.get("pool_type", "tok") == "tok" and not v.get("final_ln_after_pool")
              and v.get("pos_embed_type", "learnable") == "learnable"
              and t.get("pool_type", "argmax") == "argmax" and t.get("proj_type", "linear") == "linear"
              and not t.get("proj_bias") and not t.get("embed_cls") and not t.get("no_causal_mask")
              and text_width_problem(t.get("width", 512), c.get("embed_dim")) is None)
        if ok:
            out[name] = open_clip.list_pretrained_tags_by_model(name)
    return out


def _backbones_text() -> str:
    """The qualifying backbones as lines `name: tag, tag` (those with released weights), then the others."""
    found = qualifying_backbones()
    lines = [f"  {n}: {', '.join(tags)}" for n, tags in found.items() if tags]
    bare = [n for n, tags in found.items() if not tags]
    return "\n".join(lines + ([f"  without released weights: {', '.join(bare)}"] if bare else []))


def check_backbone(clip: "FrozenCLIP") -> None:
    """A ClipLoadError listing the backbones that qualify when FTI4CIR cannot run over `clip`'s sizes."""
    problem = text_width_problem(clip.text_width, clip.embed_dim)
    if problem:
        raise ClipLoadError(f"CLIP {clip.name} ({clip.source}) has {problem}. open_clip backbones that qualify "
                            f"(--clip-model: --clip-pretrained tags):\n{_backbones_text()}")


def _hub_weight_names(hub: str) -> tuple[str, list[str]]:
    """(repo id, file names to look for) of an open_clip `hf_hub` entry: 'org/repo/' means open_clip's
    default file names, 'org/repo/file' that file; a safetensors twin is preferred, as open_clip does."""
    repo, filename = os.path.split(hub)  # as open_clip splits it
    if not filename:
        return repo, [open_clip.constants.HF_SAFE_WEIGHTS_NAME, open_clip.constants.HF_WEIGHTS_NAME]
    twins = [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []
    return repo, twins + [filename]


def _cached_pretrained_file(name: str, tag: str) -> Path | None:
    """open_clip's `tag` weights of `name` already on disk, where open_clip's downloads put them: its URL
    cache (~/.cache/clip; not re-hashed, as open_clip would on every load) or the hub cache."""
    cfg = open_clip.pretrained.get_pretrained_cfg(name, tag) or {}
    if cfg.get("url"):
        f = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if f.is_file():
            return f
    return cached_hub_file(*_hub_weight_names(cfg["hf_hub"])) if cfg.get("hf_hub") else None


def _pretrained_file(name: str, tag: str, cfg: dict) -> Path:
    """The file of open_clip's `tag` weights of `name`: cached, else downloaded by open_clip (once); offline,
    a ClipLoadError at once saying what to fetch."""
    cached = _cached_pretrained_file(name, tag)
    if cached is not None:
        return cached
    if tag == "openai":
        what = f"CLIP {name} 'openai' weights"
        alternative = (f"or pass --clip-weights /path/to/{name}.pt (OpenAI's file, as the `clip` package caches it "
                       "in ~/.cache/clip/) or an open_clip checkpoint")
    else:
        what = f"CLIP {name} --clip-pretrained {tag} weights"
        alternative = f"or pass the downloaded file as --clip-weights FILE --clip-pretrained {tag}"

    def offline() -> str:
        if cfg.get("hf_hub"):
            repo, names = _hub_weight_names(cfg["hf_hub"])
            return not_cached_message(what, repo, names[-1], alternative)
        return (f"{what} are not on this machine and the network is off: download {cfg.get('url')} into "
                f"~/.cache/clip/ (open_clip's cache), {alternative}")

    fail_if_offline(offline, ClipLoadError)
    try:
        return Path(open_clip.pretrained.download_pretrained(cfg))
    except Exception as e:  # noqa: BLE001 - one attempt; any failure means the same to the user
        raise ClipLoadError(f"{what}: the download failed ({type(e).__name__}: {str(e)[:300]}); {alternative}") from e


def _load_pretrained(model_name: str, tag: str, weights: Path | None) -> tuple[CLIP, str]:
    """(model, source) of open_clip's pretrained `tag` weights of `model_name` ('openai': OpenAI's), from
    `weights` (a file holding them) or open_clip's caches; QuickGELU as the tag was trained."""
    name = canonical_model_name(model_name)
    if name not in qualifying_backbones():
        raise ClipLoadError(f"--clip-model {name}: FTI4CIR cannot run over this backbone. Backbones that qualify "
                            f"(--clip-model: --clip-pretrained tags):\n{_backbones_text()}")
    cfg = open_clip.pretrained.get_pretrained_cfg(name, tag)
    if not cfg and tag == "openai":
        raise ClipLoadError(f"OpenAI released no weights for {name}; pass --clip-weights PATH")
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ClipLoadError(f"--clip-pretrained {tag}: open_clip has no such weights for {name}; its tags: "
                            f"{', '.join(tags) or 'none (pass --clip-weights)'}")
    path = Path(weights) if weights is not None else _pretrained_file(name, tag, cfg)
    if tag == "openai" and path.suffix == ".pt":  # OpenAI's own file (a TorchScript archive): its fp16 weights
        return _load_weights_file(path, name, "openai")
    if not path.is_file():
        raise ClipLoadError(f"--clip-weights {path}: no such file (the {name} --clip-pretrained {tag} weights)")
    try:
        model = open_clip.create_model(name, pretrained=str(path), force_quick_gelu=bool(cfg.get("quick_gelu")))
    except Exception as e:  # noqa: BLE001
        raise ClipLoadError(f"{path}: cannot be read as open_clip's {name} --clip-pretrained {tag} weights "
                            f"({type(e).__name__}: {str(e)[:300]}). Is the file truncated?") from e
    return model, f"{name}:openai" if tag == "openai" else f"{name}:{path.resolve()}"


def load_clip(
    model_name: str = "ViT-L/14",
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    clip_format: str = "auto",
    pretrained: str | None = None,
) -> FrozenCLIP:
    """The frozen CLIP every script uses.

    `weights`: a local OpenAI-format file (plain state dict or TorchScript archive; architecture read
    from the weights, so any size works) or an open_clip checkpoint of `model_name`, or an
    `hf-hub:OWNER/REPO/FILE` reference (hub.py).

    `pretrained`: one of open_clip's pretrained tags for `model_name` (e.g. ViT-H-14's laion2b_s32b_b79k),
    read from `weights` when given. Without `weights`, the tag's weights (OpenAI's when `pretrained` is
    None or 'openai') come from open_clip's caches, else open_clip downloads them; offline this fails at
    once with a message saying what to pass. The backbone must fit the network (`check_backbone`).
    """
    if clip_format not in CLIP_FORMATS:
        raise ClipLoadError(f"--clip-format {clip_format!r}: choose one of {CLIP_FORMATS}")
    if is_hub_reference(weights):
        weights = hub_file(weights, "--clip-weights")
    tag = pretrained.lower().replace("-", "_") if pretrained else None  # open_clip's spelling of tags
    tag = None if tag == "openai" else tag
    if tag is not None and clip_format == "openai":
        raise ClipLoadError(f"--clip-format openai reads OpenAI's files; --clip-pretrained {tag} weights are open_clip's")
    if weights is not None and tag is None:
        model, desc = _load_weights_file(Path(weights), model_name, clip_format)
    else:
        model, desc = _load_pretrained(model_name, tag or "openai", weights)
    if desc.startswith("openai:"):  # an OpenAI-format file: its architecture was read from the weights
        name = openai_architecture(model)
        notice = f"--clip-weights {weights or desc}: the weights are a {name}; --clip-model {model_name} is not used"
        if _OPENAI_NAMES.get(model_name, model_name) != name and notice not in _NOTICES_GIVEN:
            _NOTICES_GIVEN.add(notice)
            log.info(notice)
    else:
        try:
            name = canonical_model_name(model_name)
        except ClipLoadError:
            name = model_name
    clip = FrozenCLIP(model, name if tag is None else f"{name}:{tag}", desc, pretrained=tag)
    check_backbone(clip)
    return clip.to(device)


# (visual width, visual layers, patch size, image size, embedding size) of OpenAI's ViTs
_OPENAI_ARCHITECTURES = {(768, 12, 32, 224, 512): "ViT-B-32", (768, 12, 16, 224, 512): "ViT-B-16",
                         (1024, 24, 14, 224, 768): "ViT-L-14", (1024, 24, 14, 336, 768): "ViT-L-14-336"}


def openai_architecture(model: CLIP) -> str:
    """The open_clip name of an OpenAI-layout CLIP's architecture, read from its shapes (checkpoints record
    it), or a description of the shapes for any other size."""
    v = model.visual
    size = v.image_size[0] if isinstance(v.image_size, (tuple, list)) else int(v.image_size)
    key = (v.conv1.out_channels, len(v.transformer.resblocks), v.conv1.kernel_size[0], size,
           model.text_projection.shape[1])
    return _OPENAI_ARCHITECTURES.get(key, "ViT (width {}, {} layers, patch {}, {} px, embedding {})".format(*key))
