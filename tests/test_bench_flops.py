"""scripts/bench_flops.py: the counts it predicts the GPU step from."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench
import bench_flops
from models import FTI4CIR


def test_cpu_attention_counted_like_the_gpu_kernels():
    b, h, s, d = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=bench_flops.CPU_SDPA) as counter:
        out = F.scaled_dot_product_attention(q, k, v)
        forward = counter.get_total_flops()
        out.sum().backward()
    assert forward == 4 * b * h * s * s * d  # q k^T and p v
    assert counter.get_total_flops() == 3.5 * forward  # backward: q k^T again, dv, dp, dq, dk


def test_prediction_on_the_tiny_clip():
    clip = bench.build_clip("tiny", torch.device("cpu"))
    net = FTI4CIR.for_clip(clip).train()
    p = bench_flops.predict_gpu_step(clip, net, SimpleNamespace(flops_batch=2, batch_size=8, skip_baseline=False))
    ours, base = p["ours"], p["baseline"]
    # one visual pass instead of two, no gradient through it: its FLOPs are the forward of encode_visual
    # (attention as linear + sdpa ops, as on the GPU under autocast; the fused CPU fast path is not counted)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=bench_flops.CPU_SDPA) as counter, torch.no_grad():
            clip.encode_visual(torch.randn(2, 3, clip.image_size, clip.image_size))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    visual = counter.get_total_flops() / 2 / 1e9
    assert abs(ours["pieces_gflop_per_image"]["visual tower"] - visual) < 0.01 * visual
    assert abs(base["pieces_gflop_per_image"]["visual tower"] - 2 * visual) < 0.01 * visual
    # shorter text rows: fewer text-tower FLOPs; the network's own pieces are the same computation
    assert ours["pieces_gflop_per_image"]["text tower"] < 0.5 * base["pieces_gflop_per_image"]["text tower"]
    for piece in ("attribute transformer", "mappers phi_s, phi_a"):
        assert ours["pieces_gflop_per_image"][piece] == base["pieces_gflop_per_image"][piece]
    assert ours["gflop_per_image"] < base["gflop_per_image"]
    assert ours["forward_gflop_per_image"] < ours["gflop_per_image"]
    mem = p["memory"]
    assert mem["activation_bytes_per_image"] > 0
    # what does not grow with the batch is about the 2-byte weight copies the model adds as fixed memory
    copies = mem["fixed_bytes"]["2-byte weight copies (text tower, network)"]
    assert 0.5 * copies < mem["saved_bytes_not_growing_with_batch"] < 1.5 * copies
