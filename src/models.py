"""The FTI4CIR network (METHOD §2-6): subject and attribute pseudo-word mappers and the local-attribute
transformer, over a frozen CLIP that is passed in, never held (so it is never inside DDP or the
state dict).

Inputs are CLIP's `g` [B, D] and the visual tokens `P` [B, N+1, W] of the same images
(`FrozenCLIP.encode_visual`). Shapes: B batch, K templates, W visual width, D CLIP embedding size,
E text width (E == D), M = K + N + 1 tokens in the attribute transformer.

The network composes: `compose` gives the features of a reference image's sentence with each of its
modification texts; how a benchmark turns a query into texts, and several texts' features into one,
is the dataset's business (datasets.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F



def text_width_problem(text_width: int, embed_dim: int) -> str | None:
    """The one requirement FTI4CIR puts on CLIP's sizes: the pseudo-word tokens are made from the image
    embedding (size D) and put where word embeddings (size E) go, so E == D. None when it holds, else what
    is wrong."""
    if text_width == embed_dim:
        return None
    return f"text width {text_width} and embedding size {embed_dim}: FTI4CIR needs them equal"


@dataclass
class FTI4CIRConfig:
    """Everything needed to rebuild the network; saved inside every checkpoint."""

    embed_dim: int = 768  # D
    vision_width: int = 1024  # W
    text_width: int = 768  # E
    num_k: int = 24  # K templates
    topk: int = 12  # most attribute words per image
    epsilon: float = 0.05  # score threshold for an attribute to count
    temperature: float = 0.2  # tau of the contrastive loss
    reg_weight: float = 1.4  # lambda (the authors' hy_regLoss)
    tf_layer: int = 3
    tf_head: int = 1
    mlp_ratio: float = 2.0
    mapper_dropout: float = 0.5
    clip_model: str = "ViT-L-14"
    ablation: str | None = None  # None: FTI4CIR; a key of ABLATIONS: the paper's ablation (METHOD §14)

    @classmethod
    def from_dict(cls, d: dict) -> "FTI4CIRConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown FTI4CIR config keys {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["ablation"] is None:  # the full method's checkpoints hold the same config keys with or without the field
            del d["ablation"]
        return d


# the ablations of METHOD §14: what each leaves out
ABLATIONS = {"no-attributes": "the subject pseudo-word alone (no attribute words, no attribute transformer)",
             "no-subject": "the attribute pseudo-words alone (no subject word)"}


class PseudoWordMapper(nn.Module):
    """phi: Linear(D, 4D), GELU, Dropout, Linear(4D, 4D), GELU, Dropout, Linear(4D, E) (METHOD §4)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.5):
        super().__init__()
        hidden = 4 * in_dim
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SelfAttention(nn.Module):
    """Unmasked multi-head self-attention; keys and values from one projection viewed as
    [B, M, 2, H, W/H] (keys at 0, values at 1), queries and keys/values without bias (METHOD §2)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.kv_proj = nn.Linear(width, 2 * width, bias=False)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, M, W = x.shape
        H = self.heads
        q = self.q_proj(x).view(B, M, H, W // H).transpose(1, 2)
        kv = self.kv_proj(x).view(B, M, 2, H, W // H)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        # fused kernel; its default scale is (W/H) ** -0.5, the authors' scale
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, M, W))


class AttributeLayer(nn.Module):
    """Pre-norm block: x + Attn(LN1(x)), then x + MLP(LN2(x)); MLP = Linear, ReLU, Linear."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.relu(self.fc1(self.norm2(x))))


class LocalAttributeExtractor(nn.Module):
    """K learnable templates attend over the visual tokens P; A = sigmoid(Linear(out[:K])) (METHOD §2)."""

    def __init__(self, num_k: int, width: int, out_dim: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.templates = nn.Parameter(torch.randn(num_k, width))
        self.layers = nn.ModuleList(AttributeLayer(width, heads, mlp_ratio) for _ in range(layers))
        self.head = nn.Linear(width, out_dim)

    def forward(self, P: torch.Tensor) -> torch.Tensor:
        K = self.templates.shape[0]
        x = torch.cat([self.templates.to(P.dtype).expand(P.shape[0], -1, -1), P], dim=1)
        for layer in self.layers:
            x = layer(x)
        return torch.sigmoid(self.head(x[:, :K]))


def select_attributes(A: torch.Tensor, g: torch.Tensor, topk: int, epsilon: float):
    """METHOD §3, for the whole batch at once.

    Returns (A_sel [B, topk, E] L2-normalised and reordered, r [B]): the first r rows of A_sel are the
    image's attributes in template order, the next topk - r follow in descending-score order. The
    authors' code keeps only the topk best-scoring templates here (its sorted indices are cut to
    topk before the reordering), so the orthogonality loss sees topk rows, not all K (code).
    """
    K = A.shape[1]
    scores = torch.softmax(torch.einsum("bke,be->bk", A, g.to(A.dtype)), dim=-1)
    r = (scores > epsilon).sum(dim=1).clamp(min=1, max=topk)
    desc = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.arange(K, device=A.device).unsqueeze(0)
    # sort key: template index for the top r, K + rank for the others -> first r ascending by k
    key = torch.where(rank < r.unsqueeze(1), desc, K + rank)
    order = desc.gather(1, key.argsort(dim=1))[:, :topk]  # the topk best only (code)
    A_sel = F.normalize(A.gather(1, order.unsqueeze(-1).expand(-1, -1, A.shape[-1])), dim=-1)
    return A_sel, r


def substitute(x: torch.Tensor, eot_pos: torch.Tensor, subject_pos: int | None, v_s: torch.Tensor | None,
               slot_start: torch.Tensor | None = None, r: torch.Tensor | None = None,
               v_a: torch.Tensor | None = None) -> torch.Tensor:
    """Put pseudo-word tokens into token embeddings x [B, L, E], by position (METHOD §5).

    The subject token goes to column `subject_pos` (the same in every row); row b's attribute tokens
    v_a[b, :r_b] go to columns slot_start_b .. slot_start_b + r_b - 1 (those before its end token).
    """
    L = x.shape[1]
    if v_s is not None:
        col = torch.arange(L, device=x.device) == subject_pos
        x = torch.where(col[None, :, None], v_s[:, None, :].to(x.dtype), x)
    if v_a is not None:
        j = torch.arange(L, device=x.device).unsqueeze(0)
        offset = j - slot_start.unsqueeze(1)
        mask = (offset >= 0) & (offset < r.unsqueeze(1)) & (j < eot_pos.unsqueeze(1))
        idx = offset.clamp(0, v_a.shape[1] - 1)
        picked = v_a.gather(1, idx.unsqueeze(-1).expand(-1, -1, v_a.shape[-1]))
        x = torch.where(mask.unsqueeze(-1), picked.to(x.dtype), x)
    return x


def attribute_slots(ids: torch.Tensor, star: int, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first slot [B], number of slots [B]) of the attributes-only sentence's pseudo-words (METHOD §5).

    The slots start at the row's first `*`, even one inside the subject words (code). A row that
    truncation left without any `*` (a subject of 69+ tokens) gets no slots: the authors' code fails on
    such a row, so this is outside the range their numbers cover.
    """
    stars = ids == star
    return stars.int().argmax(dim=1), torch.where(stars.any(dim=1), r, torch.zeros_like(r))


def _loss_matrices(x: torch.Tensor):
    """The region of a loss's similarity / Gram matrix. Under bf16 autocast, autocast is off there, so the
    `.float()` before the product holds (bf16 keeps 8 mantissa bits: a 3.5e-3 relative error in the
    contrastive gradient). Under fp16 autocast the product stays in fp16, as the authors' code computes
    it (code); fp32 is unchanged."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16:
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def contrastive_loss(u: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """METHOD §6 L_con over 2B rows: row j's positive is its pair, its denominator every other row."""
    n = u.shape[0]
    with _loss_matrices(u):
        # float32 before normalising: under CUDA autocast `norm` runs in float32 anyway, so fp16 numbers are
        # unchanged; under bf16 the rows are normalised in float32 too
        z = torch.cat([F.normalize(u.float(), dim=-1), F.normalize(w.float(), dim=-1)])
        sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    pos = torch.arange(2 * n, device=z.device).roll(n)
    return (torch.logsumexp(sim, dim=1) - sim[torch.arange(2 * n, device=z.device), pos]).mean()


def orthogonality_loss(A_sel: torch.Tensor) -> torch.Tensor:
    """METHOD §6 L_ortho = mean((A A^T - I)^2) over B x topk x topk (the rows select_attributes keeps)."""
    with _loss_matrices(A_sel):
        gram = A_sel.float() @ A_sel.float().transpose(1, 2)
    eye = torch.eye(A_sel.shape[1], device=A_sel.device)
    return ((gram - eye) ** 2).mean()


def cosine_loss(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(x, c)), as the authors' CosineEmbeddingLoss with target 1."""
    return F.cosine_embedding_loss(x.float(), c.float(), torch.ones(x.shape[0], device=x.device))


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, length - x.shape[1])) if x.shape[1] < length else x


class FTI4CIR(nn.Module):
    """The trainable network. CLIP (a `clip_loader.FrozenCLIP`) is an argument of every call."""

    def __init__(self, cfg: FTI4CIRConfig):
        super().__init__()
        problem = text_width_problem(cfg.text_width, cfg.embed_dim)
        if problem:
            raise ValueError(f"CLIP {cfg.clip_model} has {problem}")
        if cfg.ablation is not None and cfg.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {cfg.ablation!r}; choose one of {tuple(ABLATIONS)}")
        self.cfg = cfg
        # an ablation holds only the parts it trains (METHOD §14), created in the full network's order
        self.uses_subject = cfg.ablation != "no-subject"
        self.uses_attributes = cfg.ablation != "no-attributes"
        self.phi_s = PseudoWordMapper(cfg.embed_dim, cfg.text_width, cfg.mapper_dropout) if self.uses_subject else None
        self.phi_a = self.attributes = None
        if self.uses_attributes:
            self.phi_a = PseudoWordMapper(cfg.embed_dim, cfg.text_width, cfg.mapper_dropout)
            self.attributes = LocalAttributeExtractor(cfg.num_k, cfg.vision_width, cfg.text_width, cfg.tf_layer,
                                                      cfg.tf_head, cfg.mlp_ratio)

    @classmethod
    def for_clip(cls, clip, **hparams) -> "FTI4CIR":
        cfg = FTI4CIRConfig(embed_dim=clip.embed_dim, vision_width=clip.vision_width, text_width=clip.text_width,
                            clip_model=clip.name, **hparams)
        return cls(cfg)

    def check_clip(self, clip) -> None:
        got = (clip.embed_dim, clip.vision_width, clip.text_width)
        want = (self.cfg.embed_dim, self.cfg.vision_width, self.cfg.text_width)
        if got != want:
            raise ValueError(f"this network was built for CLIP (D, W, E) = {want} ({self.cfg.clip_model}); the CLIP given has {got}")

    # pieces ----------------------------------------------------------------------------------------
    def pseudo_words(self, g: torch.Tensor, P: torch.Tensor):
        """(v_s [B, E], v_a [B, topk, E], A_sel [B, topk, E], r [B]) from CLIP's g and visual tokens P.
        An ablation's missing part is None: --no-subject has no v_s; --no-attributes no v_a and A_sel,
        and r = 0 attribute slots in every row."""
        v_s = self.phi_s(g) if self.uses_subject else None
        if not self.uses_attributes:
            return v_s, None, None, torch.zeros(g.shape[0], dtype=torch.long, device=g.device)
        A = self.attributes(P)
        A_sel, r = select_attributes(A, g, self.cfg.topk, self.cfg.epsilon)
        return v_s, self.phi_a(A_sel), A_sel, r

    def _full_sentence_inputs(self, clip, v_s, v_a, r, tail=None, tail_len=None):
        pb = clip.prompts
        r_max = self.cfg.topk if self.uses_attributes else 0
        ids, eot, start = pb.pseudo_word_sentence(r, tail, tail_len, r_max=r_max)
        x = substitute(clip.token_embedding(ids), eot, pb.subject_pos, v_s, start, r, v_a)
        return x, eot

    # inference ------------------------------------------------------------------------------------
    def compose(self, clip, g: torch.Tensor, P: torch.Tensor, texts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Features [B, T, D] (not normalised) of "a photo of [S] with [A1..Ar] but <text>" (METHOD §5, §10)
        for each reference image (g, P) and each of its T modification texts (`texts[b]`, T the same for
        every row)."""
        B, T = g.shape[0], len(texts[0])
        if len(texts) != B or any(len(row) != T for row in texts):
            raise ValueError(f"compose needs {B} rows of {T} texts each, got {[len(row) for row in texts]}")
        # host-side tokenisation, texts in text-major order: every row's first text, then every second...
        tail, tail_len = clip.prompts.query_tails([row[t] for t in range(T) for row in texts])
        if g.device.type == "cuda":  # pinned, so the copies below need not wait for the device
            tail, tail_len = tail.pin_memory(), tail_len.pin_memory()
        return self.compose_tokens(clip, g, P, tail.to(g.device, non_blocking=True),
                                   tail_len.to(g.device, non_blocking=True))

    def compose_tokens(self, clip, g: torch.Tensor, P: torch.Tensor, tail: torch.Tensor,
                       tail_len: torch.Tensor) -> torch.Tensor:
        """`compose` from the texts' word ids (`PromptBuilder.query_tails`, T*B rows in text-major order):
        the pseudo-words are computed once per image, whatever T is, and nothing is read back from the device."""
        B = g.shape[0]
        T = tail.shape[0] // B
        v_s, v_a, _, r = self.pseudo_words(g, P)
        if T > 1:
            r = r.repeat(T)
            v_s = None if v_s is None else v_s.repeat(T, 1)
            v_a = None if v_a is None else v_a.repeat(T, 1, 1)
        x, eot = self._full_sentence_inputs(clip, v_s, v_a, r, tail, tail_len)
        f = clip.encode_token_embeddings(x, eot, trim=False)  # already as short as the shapes allow
        return f.view(T, B, -1).transpose(0, 1)

    # training ------------------------------------------------------------------------------------
    def forward(self, clip, g: torch.Tensor, P: torch.Tensor, texts: dict, gather=None) -> dict:
        """The training loss of METHOD §6; returns every term (`total`, `contrastive`, `ortho`, `reg`).

        `texts`: `PromptBuilder.training_texts` output, on g's device. `gather`: optional function that
        all-gathers features across processes with gradient, so the contrastive loss sees the global batch.
        """
        pb = clip.prompts
        v_s, v_a, A_sel, r = self.pseudo_words(g, P)
        # the three sentences that need gradients, encoded in one batched text pass:
        # full "a photo of [S] with [A..]", subject-only "a photo of [S] with <attr>",
        # attributes-only "a photo of <subj> with [A..]"; an ablation leaves out the partial sentence
        # that holds none of its pseudo-words (METHOD §14).
        # Sequence lengths come from tensor shapes (texts are trimmed in the data workers, the r slots
        # are bounded by topk), so no step here waits for the device to report a length.
        parts = [self._full_sentence_inputs(clip, v_s, v_a, r)]
        if self.uses_subject:
            sid = texts["subject_ids"]
            eot_s = sid.argmax(dim=-1)
            parts.append((substitute(clip.token_embedding(sid), eot_s, pb.subject_pos, v_s), eot_s))
        if self.uses_attributes:
            aid, eot_a, _ = pb.assemble(texts["attr_head"], texts["attr_head_len"], r, r_max=self.cfg.topk)
            start_a, r_a = attribute_slots(aid, pb.star, r)
            parts.append((substitute(clip.token_embedding(aid), eot_a, None, None, start_a, r_a, v_a), eot_a))
        length = max(x.shape[1] for x, _ in parts)
        x = torch.cat([_pad_to(x, length) for x, _ in parts])
        feats = clip.encode_token_embeddings(x, torch.cat([eot for _, eot in parts]), trim=False)
        f, *partial = feats.chunk(len(parts))
        with torch.no_grad():
            c = clip.encode_text(texts["target_ids"], trim=False)

        u, w = g, f
        if gather is not None:
            u, w = gather(u), gather(w)
        l_con = contrastive_loss(u, w, self.cfg.temperature)
        l_ortho = orthogonality_loss(A_sel) if A_sel is not None else torch.zeros((), device=g.device)
        l_reg = cosine_loss(partial[0], c)
        for x_part in partial[1:]:  # summed in the same order as the full method's three terms
            l_reg = l_reg + cosine_loss(x_part, c)
        l_reg = l_reg + cosine_loss(f, c)
        total = l_con + l_ortho + self.cfg.reg_weight * l_reg
        return {"total": total, "contrastive": l_con.detach(), "ortho": l_ortho.detach(), "reg": l_reg.detach(),
                "num_attributes": r.float().mean().detach()}
