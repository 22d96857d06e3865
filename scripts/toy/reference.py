"""A plain, per-sample implementation of METHOD §1-6, written for reading, not speed.

It does what the authors' code does, the slow way: two visual passes, a Python loop over the batch,
whole strings tokenised with CLIP's tokenizer, pseudo-words put in one row at a time, every text pass
on all 77 positions and run separately. The tests prove the vectorised network (`models.py`) equal to
it; `scripts/bench.py` times it as the baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def select_one(A_b: torch.Tensor, g_b: torch.Tensor, topk: int, epsilon: float):
    """METHOD §3 for one image: (A_sel [topk, E], r, order). Only the topk best templates are kept,
    as the authors' code cuts its sorted indices to topk (code)."""
    s = torch.softmax(A_b @ g_b.to(A_b.dtype), dim=0).tolist()
    r = min(topk, max(1, sum(1 for v in s if v > epsilon)))
    desc = sorted(range(len(s)), key=lambda k: (-s[k], k))
    order = sorted(desc[:r]) + desc[r:topk]
    return F.normalize(A_b[order], dim=-1), r, order


def text_feature_77(clip, x_row: torch.Tensor, ids_row: torch.Tensor) -> torch.Tensor:
    """CLIP's text tower on one full 77-position row of token embeddings."""
    m = clip.model
    x = x_row[None] + m.positional_embedding.to(x_row.dtype)
    x = m.transformer(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)
    return x[0, int(ids_row.argmax())] @ m.text_projection


def sentence_feature(clip, text: str, subject=None, attrs=None, attr_from_first_star: bool = False):
    """Tokenise `text`; put `subject` at the first `*` (always position 4 after "a photo of") and
    `attrs` at the positions right after "with" (or from the row's first `*`); encode."""
    ids = clip.tokenize([text])[0].to(clip.device)
    x = clip.token_embedding(ids[None])[0].clone()
    stars = [i for i, t in enumerate(ids.tolist()) if t == clip.star_id]
    if subject is not None:
        x[stars[0]] = subject.to(x.dtype)
    if attrs is not None:
        start = stars[0] if attr_from_first_star else stars[0] + 2  # "* with *": the slot after "with"
        for i in range(attrs.shape[0]):
            x[start + i] = attrs[i].to(x.dtype)
    return text_feature_77(clip, x, ids)


def training_losses(net, clip, images: torch.Tensor, subjects, attributes) -> dict:
    """METHOD §6, one sample at a time. Returns tensors (differentiable) for every term."""
    cfg = net.cfg
    with torch.no_grad():
        g = clip.model.encode_image(images)  # first visual pass: the global feature
        captured = {}
        hook = clip.model.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: captured.update(P=o))
        clip.model.encode_image(images)  # second visual pass: the last block's tokens
        hook.remove()
        P = captured["P"]
    A = net.attributes(P)
    fs, f_subj, f_attr, c, sels = [], [], [], [], []
    for b in range(g.shape[0]):
        A_sel, r, _ = select_one(A[b], g[b], cfg.topk, cfg.epsilon)
        v_s, v_a = net.phi_s(g[b]), net.phi_a(A_sel)
        fs.append(sentence_feature(clip, "a photo of * with " + "* " * r, v_s, v_a[:r]))
        f_subj.append(sentence_feature(clip, "a photo of * with " + attributes[b], subject=v_s))
        f_attr.append(sentence_feature(clip, "a photo of " + subjects[b] + " with " + "* " * r, attrs=v_a[:r],
                                       attr_from_first_star=True))
        with torch.no_grad():
            ids = clip.tokenize([f"a photo of {subjects[b]} with {attributes[b]}"])[0].to(clip.device)
            c.append(text_feature_77(clip, clip.token_embedding(ids[None])[0], ids))
        sels.append(A_sel)
    f, f_subj, f_attr, c = map(torch.stack, (fs, f_subj, f_attr, c))
    B = g.shape[0]
    z = torch.cat([F.normalize(g.float(), dim=-1), F.normalize(f.float(), dim=-1)])
    terms = []
    for j in range(2 * B):
        sims = (z[j] @ z.T) / cfg.temperature
        others = torch.cat([sims[:j], sims[j + 1:]])
        terms.append(torch.logsumexp(others, dim=0) - sims[(j + B) % (2 * B)])
    l_con = torch.stack(terms).mean()
    A_sel = torch.stack(sels).float()
    l_ortho = ((A_sel @ A_sel.transpose(1, 2) - torch.eye(A_sel.shape[1], device=A_sel.device)) ** 2).mean()
    l_reg = sum((1 - F.cosine_similarity(x.float(), c.float())).mean() for x in (f_subj, f_attr, f))
    return {"contrastive": l_con, "ortho": l_ortho, "reg": l_reg, "total": l_con + l_ortho + cfg.reg_weight * l_reg}


def query_feature(net, clip, g_b, P_b, text: str) -> torch.Tensor:
    """METHOD §10 composed-query feature of one reference image, L2-normalised."""
    A = net.attributes(P_b[None])[0]
    A_sel, r, _ = select_one(A, g_b, net.cfg.topk, net.cfg.epsilon)
    f = sentence_feature(clip, "a photo of * with " + "* " * r + "but " + text, net.phi_s(g_b), net.phi_a(A_sel)[:r])
    return F.normalize(f.float(), dim=-1)
