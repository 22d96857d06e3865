"""The vectorised network against the plain per-sample implementation of METHOD §1-6
(scripts/toy/reference.py) and against hand-computed examples."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from models import (FTI4CIR, FTI4CIRConfig, SelfAttention, contrastive_loss, cosine_loss, orthogonality_loss,
                    select_attributes)
from datasets import combine_text_features, fashioniq_texts
from prompts import PromptBuilder
from toy.reference import select_one as ref_select, sentence_feature as ref_sentence_feature, training_losses

STAR, EOT = 265, 49407


# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def net(tiny_clip):
    torch.manual_seed(0)
    # a larger epsilon spread makes r vary between images of the batch
    net = FTI4CIR.for_clip(tiny_clip, epsilon=0.03, num_k=8, topk=5)
    return net.eval()


@pytest.fixture(scope="module")
def batch(tiny_clip):
    torch.manual_seed(1)
    images = torch.randn(5, 3, tiny_clip.image_size, tiny_clip.image_size)
    with torch.no_grad():
        g, P = tiny_clip.encode_visual(images)
    return images, g, P


def test_tokenizer_facts(tiny_clip):
    pb = PromptBuilder(tiny_clip.tokenizer)
    assert tiny_clip.prompts.star == STAR and pb.star == STAR
    assert tiny_clip.prompts.eot == EOT and int(tiny_clip.tokenize(["x"]).max()) == EOT
    assert pb.subject_pos == 4
    ids = tiny_clip.tokenize(["a photo of * with * * but a * here"])[0].tolist()
    assert ids[:9] == [49406, 320, 1125, 539, STAR, 593, STAR, STAR, 767]
    assert ids.count(STAR) == 4  # a `*` in the modification text is an ordinary token


def test_one_visual_pass_equals_two(tiny_clip, batch):
    images, g, P = batch
    captured = {}
    hook = tiny_clip.model.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: captured.update(P=o))
    try:
        g2 = tiny_clip.model.encode_image(images)
    finally:
        hook.remove()
    assert P.shape == (5, (tiny_clip.image_size // 8) ** 2 + 1, tiny_clip.vision_width)
    torch.testing.assert_close(g, g2)
    torch.testing.assert_close(P, captured["P"])


def test_trimming_keeps_end_token_features(tiny_clip):
    ids = tiny_clip.tokenize(["a dog", "a photo of a much longer sentence with many words in it", "x"])
    torch.testing.assert_close(tiny_clip.encode_text(ids, trim=True), tiny_clip.encode_text(ids, trim=False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_clip.encode_text(ids), tiny_clip.model.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_assemble_equals_tokenizer_on_whole_strings(tiny_clip):
    pb = PromptBuilder(tiny_clip.tokenizer)
    rng = random.Random(0)
    words = ["red", "dog", "grass,", "the", "Blue", "sky!", "*", "over", "café", "it's", "3", "two-tone"]
    heads = ["a photo of " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 6))) + " with" for _ in range(12)]
    heads.append("a photo of " + " ".join(["long"] * 80) + " with")  # truncated inside the head
    tails = ["but " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 70))) for _ in range(13)]
    r = torch.tensor([rng.randint(1, 12) for _ in range(13)])
    head, head_len = pb.encode_words(heads)
    tail, tail_len = pb.encode_words(tails)
    ids, eot, start = pb.assemble(head, head_len, r, tail, tail_len)
    expected = tiny_clip.tokenize([h + " " + "* " * int(k) + t for h, k, t in zip(heads, r, tails)])
    assert torch.equal(ids, expected)
    assert torch.equal(eot, expected.argmax(dim=-1))
    for b in range(13):  # slots start at the first `*` after the head
        if start[b] < eot[b]:
            assert int(ids[b, start[b]]) == STAR
    ids, eot, _ = pb.assemble(head, head_len, r)  # no tail, as the attributes-only sentence
    assert torch.equal(ids, tiny_clip.tokenize([h + " " + "* " * int(k) for h, k in zip(heads, r)]))
    ids, _, _ = pb.pseudo_word_sentence(r)
    assert torch.equal(ids, tiny_clip.tokenize(["a photo of * with " + "* " * int(k) for k in r]))
    ids, _, _ = pb.pseudo_word_sentence(r, tail, tail_len)
    assert torch.equal(ids, tiny_clip.tokenize(["a photo of * with " + "* " * int(k) + t for k, t in zip(r, tails)]))


def test_select_attributes_equals_per_sample_reference():
    torch.manual_seed(0)
    B, K, E = 64, 24, 16
    A = torch.rand(B, K, E)
    g = torch.randn(B, E) * torch.linspace(0.1, 3, B)[:, None]  # from flat to peaked score distributions
    A_sel, r = select_attributes(A, g, topk=12, epsilon=0.05)
    # the authors' code keeps the 12 best-scoring of the 24 templates, not all of them (code)
    assert A_sel.shape == (B, 12, E)
    scores = torch.softmax(torch.einsum("bke,be->bk", A, g), dim=-1)
    best = scores.topk(12, dim=1).indices
    for b in range(B):
        kept = {int(torch.nonzero((F.normalize(A[b], dim=-1) == row).all(dim=1))[0]) for row in A_sel[b]}
        assert kept == set(best[b].tolist())
    rs = set()
    for b in range(B):
        ref, r_b, _ = ref_select(A[b], g[b], 12, 0.05)
        assert int(r[b]) == r_b
        assert torch.equal(A_sel[b], ref)  # same order, bitwise
        rs.add(r_b)
    assert len(rs) > 3  # the batch really mixes different r


def test_select_attributes_edges():
    # uniform scores 1/24 < 0.05: none above epsilon -> r = 1; all above 0.01 -> r = topk
    K, E = 24, 4
    A = torch.ones(1, K, E)
    A[0, :, 0] = torch.linspace(0, 1, K)
    _, r = select_attributes(A, torch.zeros(1, E), topk=12, epsilon=0.05)
    assert int(r) == 1
    _, r = select_attributes(A, torch.tensor([[60.0, 0, 0, 0]]), topk=12, epsilon=0.05)
    assert int(r) == 2  # scores ~ e^(60 k/23): the top two hold 0.93 and 0.07 of the mass
    _, r = select_attributes(A, torch.zeros(1, E), topk=12, epsilon=0.01)  # uniform 1/24 > 0.01 everywhere
    assert int(r) == 12


def test_attention_equals_explicit_math():
    torch.manual_seed(0)
    for heads in (1, 4):
        attn = SelfAttention(32, heads)
        x = torch.randn(3, 7, 32)
        q = attn.q_proj(x).view(3, 7, heads, -1)
        kv = attn.kv_proj(x).view(3, 7, 2, heads, -1)
        k, v = kv[:, :, 0], kv[:, :, 1]
        w = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", q, k) * (32 // heads) ** -0.5, dim=-1)
        ref = attn.out_proj(torch.einsum("bhmn,bnhd->bmhd", w, v).reshape(3, 7, 32))
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_loss_terms_on_hand_computed_examples():
    # contrastive: B = 1, u = w -> rows see their positive (cos 1) and the other modality's copy only
    u = torch.tensor([[1.0, 0.0]])
    # 2 rows: each has one other row (its positive) -> log(num/den) = 0
    assert float(contrastive_loss(u, u.clone(), 0.2)) == pytest.approx(0.0, abs=1e-6)
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # row 0 (u0): pos w0 (1), others u1 (0), w1 (1) -> -log(e^5/(e^0+2e^5))
    # row 1 (u1): pos w1 (0), others u0 (0), w0 (0) -> -log(1/3)
    # row 2 (w0): pos u0 (1), others u1 (0), w1 (1) -> same as row 0; row 3 (w1): pos u1 (0), others u0 (1), w0 (1)
    e5 = math.exp(5)
    expected = (2 * -math.log(e5 / (1 + 2 * e5)) - math.log(1 / 3) - math.log(1 / (1 + 2 * e5))) / 4
    assert float(contrastive_loss(u, w, 0.2)) == pytest.approx(expected, rel=1e-5)
    # orthogonality: two identical unit rows -> gram all ones -> off-diagonals (2 of 4) squared error 1
    A = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert float(orthogonality_loss(A)) == pytest.approx(0.5)
    assert float(orthogonality_loss(torch.eye(3)[None])) == pytest.approx(0.0)
    # cosine: orthogonal -> 1, opposite -> 2
    assert float(cosine_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 3.0], [-2.0, 0.0]]))) == pytest.approx(1.5)


def test_training_loss_equals_per_sample_reference(tiny_clip, net, batch):
    images, g, P = batch
    # a `*` inside a subject moves the attribute slots of the attributes-only sentence (code)
    subjects = ["a red circle", "a dog", "the big blue sky over", "two * stars", "x"]
    attributes = ["on a blue background", "on grass", "the sea at night with a long trailing description", "y z", "in a box"]
    texts = PromptBuilder(tiny_clip.tokenizer).training_texts(subjects, attributes)
    assert (texts["subject_ids"][:, 4] == STAR).all()
    with torch.no_grad():
        out = net(tiny_clip, g, P, texts)
        ref = training_losses(net, tiny_clip, images, subjects, attributes)
    for key in ("contrastive", "ortho", "reg", "total"):
        assert float(out[key]) == pytest.approx(float(ref[key]), rel=1e-4, abs=1e-5), key


def test_query_features_equal_per_sample_reference(tiny_clip, net, batch):
    _, g, P = batch
    texts = ["is green and a square", "has *two* dogs", "", "a much longer modification text " * 6, "x"]
    with torch.no_grad():
        q = combine_text_features(net.compose(tiny_clip, g, P, [(t,) for t in texts]))
        A = net.attributes(P)
        for b in range(5):
            A_sel, r, _ = ref_select(A[b], g[b], net.cfg.topk, net.cfg.epsilon)
            f = ref_sentence_feature(tiny_clip, "a photo of * with " + "* " * r + "but " + texts[b],
                                     net.phi_s(g[b]), net.phi_a(A_sel)[:r])
            torch.testing.assert_close(q[b], F.normalize(f, dim=-1), atol=1e-5, rtol=1e-4)
        caps = [("is shiny.", "Longer SLEEVES?"), (" red ", "blue"), ("a", "b"), ("c", "d"), ("e", "f")]
        q = combine_text_features(net.compose(tiny_clip, g, P, [fashioniq_texts(*c) for c in caps]))
        for b in range(5):
            A_sel, r, _ = ref_select(A[b], g[b], net.cfg.topk, net.cfg.epsilon)
            t1, t2 = fashioniq_texts(*caps[b])
            f1, f2 = (F.normalize(ref_sentence_feature(tiny_clip, "a photo of * with " + "* " * r + "but " + t,
                                                       net.phi_s(g[b]), net.phi_a(A_sel)[:r]), dim=-1) for t in (t1, t2))
            torch.testing.assert_close(q[b], F.normalize((f1 + f2) / 2, dim=-1), atol=1e-5, rtol=1e-4)


def test_fashioniq_texts():
    assert fashioniq_texts("Is shiny and SILVER.", " fit and flare?") == ("Is shiny and silver and fit and flare", "fit and flare and Is shiny and SILVER")


def test_gradients_reach_only_the_network(tiny_clip, batch):
    torch.manual_seed(0)
    net = FTI4CIR.for_clip(tiny_clip, num_k=8, topk=5).train()
    _, g, P = batch
    texts = PromptBuilder(tiny_clip.tokenizer).training_texts(["a"] * 5, ["b c"] * 5)
    net(tiny_clip, g, P, texts)["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(not p.requires_grad for p in tiny_clip.parameters())
    assert not any(k.startswith("clip") or "token_embedding" in k for k in net.state_dict())


def test_config_mismatch_is_refused(tiny_clip):
    net = FTI4CIR(FTI4CIRConfig())  # ViT-L/14 sizes
    with pytest.raises(ValueError, match="built for CLIP"):
        net.check_clip(tiny_clip)


def test_gradients_equal_per_sample_reference(tiny_clip, net, batch):
    images, g, P = batch
    subjects, attributes = ["a cat", "two dogs", "a", "the sky", "x y"], ["on a mat", "b", "c d e", "at night", "z"]
    texts = PromptBuilder(tiny_clip.tokenizer).training_texts(subjects, attributes)
    net.zero_grad()
    net(tiny_clip, g, P, texts)["total"].backward()
    fast = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    training_losses(net, tiny_clip, images, subjects, attributes)["total"].backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(fast[k], p.grad, atol=1e-6, rtol=1e-3, msg=k)
    net.zero_grad()


def test_assemble_with_length_bound_is_the_prefix_of_the_full_ids(tiny_clip):
    pb = PromptBuilder(tiny_clip.tokenizer)
    head, head_len = pb.encode_words(["a photo of a red dog with", "a photo of x with"])
    tail, tail_len = pb.encode_words(["but make it blue", "but " + "very " * 80])  # the second one truncated
    r = torch.tensor([3, 12])
    full, eot, start = pb.assemble(head, head_len, r, tail, tail_len)
    short, eot2, start2 = pb.assemble(head, head_len, r, tail, tail_len, r_max=12)
    assert torch.equal(eot, eot2) and torch.equal(start, start2)
    assert torch.equal(short, full[:, : short.shape[1]]) and not full[:, short.shape[1]:].any()
    assert short.shape[1] == 77  # the truncated row keeps the whole context
    tail, tail_len = pb.encode_words(["but make it blue"])
    short, _, _ = pb.assemble(head[:1], head_len[:1], r[:1], tail, tail_len, r_max=12)
    assert short.shape[1] == 2 + head.shape[1] + 12 + tail.shape[1]  # from shapes alone


class _NoReadBack:
    """Makes every way of reading a tensor's value on the host raise, so a forward pass can be checked
    for device->host synchronisation on a CPU-only machine."""

    NAMES = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def refuse(*args, **kwargs):
            raise AssertionError("the forward pass read a tensor value back to the host")

        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def test_forward_passes_read_nothing_back_from_the_device(tiny_clip, net, batch):
    _, g, P = batch
    pb = PromptBuilder(tiny_clip.tokenizer)
    texts = pb.training_texts(["a cat", "two dogs", "a", "the sky", "x y"], ["on a mat", "b", "c d e", "at night", "z"])
    tail, tail_len = pb.query_tails(["is red", "has two", "x", "y", "z"])
    with _NoReadBack():
        out = net(tiny_clip, g, P, texts)
        q = net.compose_tokens(tiny_clip, g, P, tail, tail_len)
    assert torch.isfinite(out["total"]) and q.shape == (5, 1, tiny_clip.embed_dim)
