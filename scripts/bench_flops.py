"""The GPU training step predicted on a CPU; times nothing. On the CPU, the FLOPs of one training step of
this repository's path and of the per-sample reference (scripts/toy/reference.py), split by piece, and
the bytes the step saves for backward; from them, the GPU step predicted at --batch-size (memory, and
time at the authors' achieved TFLOP/s), next to the authors' measured step (ANCHOR).

    python scripts/bench_flops.py --clip-model ViT-L-14 --flops-batch 2
"""
from __future__ import annotations

import argparse
import platform
from collections import defaultdict
from pathlib import Path
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench import build_clip, captions
from models import FTI4CIR
from toy.reference import training_losses
from utils import report_json

ANCHOR = {"gflop_per_image": 504.0, "peak_gib": 32.4, "tflops": 130.0, "images_per_s": 258.0,
          "matmul_peak_tflops": 774.0}  # the authors' code, ViT-L/14, batch 256, fp16, one H200 (PERF-ANCHOR.md)
# The per-sample reference counts 465 GFLOP/image at ViT-L/14, the anchor 504: with CLIP's weights left
# requiring gradients (kept out of the optimizer only), it counts 504.4, the text tower's weight gradients.
TARGET = {"peak_gib": 24.0, "images_per_s": 1050.0}


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the GPU fused-attention kernels only; the CPU one is counted the same way
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops}
REST = "rest (losses, projections, selection)"


def step_pieces(clip, net) -> dict[str, list[nn.Module]]:
    v = clip.model.visual
    return {"visual tower": [v, *v.children()],  # encode_image calls the tower, this repo its children
            "text tower": [clip.model.transformer],
            "attribute transformer": [net.attributes],
            "mappers phi_s, phi_a": [net.phi_s, net.phi_a]}


class PieceFlops(TorchDispatchMode):
    """FLOPs per piece of the step, forward and backward (FlopCounterMode's own per-module split loses
    track in the backward). A forward op counts for the piece whose module is running; the autograd
    nodes a piece makes are tagged with it (walking the graph from its outputs down to its inputs'
    history, tagged before it ran), and a backward op counts for its node's piece."""

    def __init__(self, pieces: dict[str, list[nn.Module]]):
        super().__init__()
        self.flops = defaultdict(int)
        self.formulas = {**flop_counter.flop_registry, **{k: flop_counter.shape_wrapper(f) for k, f in CPU_SDPA.items()}}
        self.running = []  # pieces whose forward is running (nested: the visual tower and its children)
        self.node_piece = {}
        self.handles = []
        for name, mods in pieces.items():
            for m in mods:
                self.handles.append(m.register_forward_pre_hook(partial(self._enter, name), with_kwargs=True))
                self.handles.append(m.register_forward_hook(partial(self._exit, name)))

    def _tag(self, tensors, piece):
        stack = [t.grad_fn for t in tree_leaves(tensors) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is not None and node not in self.node_piece:
                self.node_piece[node] = piece
                stack.extend(n for n, _ in node.next_functions)

    def _enter(self, name, module, args, kwargs):
        self._tag((args, kwargs), REST)  # what the inputs went through is not this piece's
        self.running.append(name)

    def _exit(self, name, module, args, output):
        self.running.pop()
        self._tag(output, name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            node = torch._C._current_autograd_node()  # None in the forward
            piece = self.node_piece.get(node, REST) if node is not None else (self.running or [REST])[-1]
            self.flops[piece] += formula(*args, **kwargs, out_val=out)
        return out

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


class CudaAutocastLayerNorm(TorchFunctionMode):
    """CUDA autocast runs layer_norm in fp32, so on the GPU its backward keeps a 4-byte copy of a
    2-byte input (the attribute transformer's; the towers' residual streams are fp32 anyway); CPU
    autocast runs it in the input's dtype. Cast as CUDA does, so the saved bytes are the GPU's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.layer_norm and args[0].dtype in (torch.float16, torch.bfloat16):
            args = (args[0].float(), *args[1:])
        return func(*args, **(kwargs or {}))


class BroadcastBmmAsMm(TorchDispatchMode):
    """CPU speed only: MultiheadAttention's batch_first transpose makes its projections batched
    matmuls with one broadcast weight, which in bf16 on the CPU run ~75x slower than the single mm
    they are. Run them as that mm (same FLOPs, counted by the modes outside this one)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default and args[1].stride(0) == 0:
            a, w = args
            out = torch.ops.aten.mm.default(a.reshape(-1, a.shape[-1]), w[0])  # aten.mm, seen by the counters
            return out.view(a.shape[0], a.shape[1], w.shape[-1])
        return func(*args, **(kwargs or {}))


def count_step(clip, net, fast: bool, images, subjects, attributes) -> dict:
    """Forward + backward of one training step (visual pass included) under CPU bf16 autocast, which
    casts the same ops to 2-byte floats as GPU fp16 autocast. Returns FLOPs (total, forward, per piece)
    and the bytes of tensors saved for backward, each storage once, CLIP's and the network's fp32
    parameters left out (they are fixed memory, counted on their own)."""
    texts = clip.prompts.training_texts(subjects, attributes)
    params = {p.untyped_storage().data_ptr() for m in (clip, net) for p in m.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    def loss():
        if fast:  # bench_training's fast_loss
            with torch.no_grad():
                g, P = clip.encode_visual(images)
            return net(clip, g, P, texts)["total"]
        return training_losses(net, clip, images, subjects, attributes)["total"]

    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA)
    pieces = PieceFlops(step_pieces(clip, net))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # as on the GPU under autocast: MHA as linear + sdpa ops
    try:
        with counter, pieces, BroadcastBmmAsMm():
            with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16),
                  CudaAutocastLayerNorm()):
                total = loss()
            forward = counter.get_total_flops()
            total.backward()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    net.zero_grad(set_to_none=True)
    by_piece = {name: pieces.flops[name] for name in [*step_pieces(clip, net), REST]}
    assert sum(by_piece.values()) == counter.get_total_flops(), "the pieces do not add up to FlopCounterMode's total"
    return {"flops": counter.get_total_flops(), "forward_flops": forward, "pieces_flops": by_piece,
            "saved_bytes": sum(saved.values())}


def predict_gpu_step(clip, net, args) -> dict:
    """FLOPs per image of both paths, counted at --flops-batch images, and this repo's memory at
    --batch-size as fixed + per-image x batch.

    Per image is the count divided by the images counted. Every term is linear in the batch but the
    contrastive logits (z z^T over 2B rows: 8 B D FLOPs per image forward, a few MFLOP per image at
    B = 256 against ~2e11; 2B x 2B floats, 1 MiB), which this scaling gets wrong by a negligible amount.
    """
    n, B = args.flops_batch, args.batch_size
    rng = np.random.default_rng(0)
    subjects, attributes = captions(rng, max(n, B))
    # this repo pads its text rows to the batch's longest caption: keep the longest subject and the
    # longest attributes of a --batch-size batch among the counted rows, so the text passes are as long
    longest = [max(range(len(subjects)), key=lambda i: len(subjects[i].split())),
               max(range(len(attributes)), key=lambda i: len(attributes[i].split()))]
    rows = list(dict.fromkeys(longest + list(range(len(subjects)))))[:n]
    subjects, attributes = [subjects[i] for i in rows], [attributes[i] for i in rows]
    images = torch.randn(n, 3, clip.image_size, clip.image_size)

    ours = count_step(clip, net, True, images, subjects, attributes)
    # saved bytes at n and at 2n (the same n rows twice, so every shape but the batch is the same):
    # the slope is the activations per image, the intercept what does not grow with the batch
    # (mostly the 2-byte weight copies the backward needs)
    ours2 = count_step(clip, net, True, images.repeat(2, 1, 1, 1), subjects * 2, attributes * 2)
    act_per_image = (ours2["saved_bytes"] - ours["saved_bytes"]) / n
    intercept = ours["saved_bytes"] - n * act_per_image

    def per_image(c):
        return {"gflop_per_image": c["flops"] / n / 1e9, "forward_gflop_per_image": c["forward_flops"] / n / 1e9,
                "pieces_gflop_per_image": {k: v / n / 1e9 for k, v in c["pieces_flops"].items()}}

    res = {"flops_batch": n, "batch_size": B, "ours": per_image(ours)}
    if not args.skip_baseline:
        res["baseline"] = per_image(count_step(clip, net, False, images, subjects, attributes))

    def nbytes(params, size):
        return sum(p.numel() for p in params) * size

    text_weights = [p for p in clip.model.transformer.parameters() if p.dim() == 2] + [clip.model.text_projection]
    fixed = {
        "CLIP parameters (fp32)": nbytes(clip.parameters(), 4),
        "network params + grads + AdamW moments (fp32)": nbytes(net.parameters(), 16),
        # weights cast by autocast that the backward keeps: the text tower's (gradients flow through it)
        # and the network's (autocast caches them for the step)
        "2-byte weight copies (text tower, network)": nbytes(text_weights, 2) + nbytes(net.parameters(), 2),
    }
    gib = 2**30
    peak = sum(fixed.values()) + act_per_image * B
    res["memory"] = {
        "fixed_bytes": fixed, "activation_bytes_per_image": act_per_image,
        "saved_bytes_not_growing_with_batch": intercept,
        "predicted_peak_gib": peak / gib,
        "model": "lower bound: fixed + tensors saved for backward x batch; allocator overhead, "
                 "transient buffers and gradients in flight excluded",
    }
    res["time"] = {"tflops": ANCHOR["tflops"]}
    for path in ("ours", "baseline"):
        if path in res:
            f = res[path]["gflop_per_image"] * 1e9
            res["time"][path] = {"s_per_step": f * B / (ANCHOR["tflops"] * 1e12),
                                 "images_per_s": ANCHOR["tflops"] * 1e12 / f,
                                 "tflops_needed_for_target": f * TARGET["images_per_s"] / 1e12}
    res["anchor"], res["target"] = ANCHOR, TARGET
    return res


def print_prediction(results):
    p = results["gpu_step_prediction"]
    n, B, m, t = p["flops_batch"], p["batch_size"], p["memory"], p["time"]
    paths = [(name, p[key]) for name, key in (("this repo", "ours"), ("reference", "baseline")) if key in p]
    gib, mib = 2**30, 2**20
    scale, unit = (1, "GFLOP") if p["ours"]["gflop_per_image"] >= 1 else (1000, "MFLOP")  # tiny CLIP: MFLOP

    def row(label, values, anchor=""):
        print(f"  {label:42s}" + "".join(f" {v * scale:12.1f}" for v in values) + anchor)

    print(f"\nfti4cir GPU training step predicted on the CPU: {results['clip']} (torch {results['torch']})")
    print(f"FLOPs of one step, forward + backward, visual pass included (counted at {n} images, per image):")
    print(f"  {unit + ' per image':42s}" + "".join(f" {name:>12s}" for name, _ in paths) + "  authors (anchor)")
    row("total", [x["gflop_per_image"] for _, x in paths], f"  {ANCHOR['gflop_per_image']:.0f} GFLOP")
    row("  forward", [x["forward_gflop_per_image"] for _, x in paths])
    for k in p["ours"]["pieces_gflop_per_image"]:
        row("  " + k, [x["pieces_gflop_per_image"][k] for _, x in paths])
    print(f"memory of this repo's step at batch {B}, a model (lower bound: allocator overhead and transient "
          "buffers excluded):")
    for k, v in m["fixed_bytes"].items():
        print(f"  {k:50s} {v / gib:8.3f} GiB")
    a = m["activation_bytes_per_image"]
    print(f"  {'saved for backward, per image (autocast dtypes)':50s} {a / mib:8.2f} MiB  x {B} = {a * B / gib:.2f} GiB")
    print(f"  {'  (check: saved, not growing with the batch)':50s} {m['saved_bytes_not_growing_with_batch'] / gib:8.3f} GiB"
          "  ~ the 2-byte weight copies")
    print(f"  {'predicted peak':50s} {m['predicted_peak_gib']:8.2f} GiB  (target <= {TARGET['peak_gib']:.0f} GiB; "
          f"authors' code: {ANCHOR['peak_gib']} GiB measured)")
    print(f"time at batch {B} at the authors' achieved {t['tflops']:.0f} TFLOP/s (H200, whose bf16 matmul peak is "
          f"{ANCHOR['matmul_peak_tflops']:.0f}); target {TARGET['images_per_s']:.0f} images/s:")
    for name, key in (("this repo", "ours"), ("reference", "baseline")):
        if key in t:
            x = t[key]
            print(f"  {name:10s} {x['s_per_step']:8.3f} s/step = {x['images_per_s']:9.1f} images/s; the target needs "
                  f"{x['tflops_needed_for_target']:.1f} TFLOP/s achieved")
    print(f"  {'anchor':10s} {B / ANCHOR['images_per_s']:8.3f} s/step = {ANCHOR['images_per_s']:9.1f} images/s measured")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-model", default="tiny", help="'tiny' (random tiny CLIP) or an architecture (random weights)")
    parser.add_argument("--batch-size", type=int, default=256, help="the GPU training batch predicted")
    parser.add_argument("--flops-batch", type=int, default=4, help="images per counted step")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="count only this repo's step, not the per-sample reference (scripts/toy/reference.py)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.flops_batch < 1:
        raise SystemExit("--flops-batch must be >= 1")
    torch.manual_seed(0)
    clip = build_clip(args.clip_model, torch.device("cpu"))
    net = FTI4CIR.for_clip(clip).train()
    results = {"device": platform.processor() or "cpu", "torch": torch.__version__, "clip": args.clip_model,
               "threads": torch.get_num_threads()}
    results["gpu_step_prediction"] = predict_gpu_step(clip, net, args)
    print_prediction(results)
    report_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
