"""Speed and memory of fti4cir's training step and composed queries, next to the per-sample reference
of scripts/toy/reference.py, measured in the same run on the same inputs. Prints a table and writes JSON.

The per-sample reference is this repository's plain rewrite of the method (two visual passes, a
Python loop over the batch, 77-token text passes run one by one), kept to prove the fast path equal
to it. It is NOT the authors' code: its speed is not theirs, and a ratio against it is no speed-up
over the authors' code (their measured step is ANCHOR below, from PERF-ANCHOR.md).

    python scripts/bench.py                                 # tiny CLIP, CPU (pipeline check)
    python scripts/bench.py --clip-model ViT-L-14 --device cuda --batch-size 256   # random ViT-L/14 weights
    python scripts/bench.py --clip-model ViT-L-14 --count-flops --flops-batch 2    # the GPU step predicted on a CPU

This repository's step is timed and recorded first. On CUDA the per-sample reference trains on the
first REFERENCE_BATCH_CUDA images of the batch (each of its sentences keeps a 77-token graph: at batch
256 they do not fit); ratios compare images per second. A part that runs out of memory is recorded
("out of memory at batch N") and the rest goes on; --json is written even when a part failed.

Model compute only: image tensors are synthetic and already on the device; the data pipeline (JPEG
decode + targetpad) is measured on its own, in images/s for one worker.

--count-flops times nothing: on the CPU it counts the FLOPs of one training step of this repository's
path and of the per-sample reference (the JSON key "baseline") and the bytes this repo's step saves for
backward, and from them predicts the GPU step at --batch-size (memory, time at the authors' achieved
TFLOP/s), next to the authors' measured step (PERF-ANCHOR.md).
"""
from __future__ import annotations

import argparse
import gc
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils import flop_counter
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("src", "scripts")]

import open_clip  # noqa: E402

from clip_loader import FrozenCLIP, canonical_model_name  # noqa: E402
from datasets import combine_text_features  # noqa: E402
from models import FTI4CIR  # noqa: E402
from toy.reference import query_feature, training_losses  # noqa: E402
from toy.tiny_clip import build_tiny_clip  # noqa: E402
from transforms import build_transform  # noqa: E402
from utils import report_json  # noqa: E402

REFERENCE_BATCH_CUDA = 32  # the per-sample reference's training batch on CUDA (see the docstring)
WORDS = "a red dog cat small large blue green photo of on the grass with sky car tree in front".split()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int, warmup: int) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _peak_mem(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (GiB), CPU


def _reset_mem(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free_after_oom(device, batch: int) -> str:
    """Releases what a part that ran out of memory left cached on the device; the note the JSON keeps."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return f"out of memory at batch {batch}"


def _captions(rng, n):
    subj = [" ".join(rng.choice(WORDS, rng.integers(2, 5))) for _ in range(n)]
    attr = [" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(n)]
    return subj, attr


def build_clip(name: str, device) -> FrozenCLIP:
    if name == "tiny":
        return FrozenCLIP(build_tiny_clip(0), "tiny", "random").to(device)
    name = canonical_model_name(name)
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)  # random weights, OpenAI layout
    return FrozenCLIP(model, name, "random").to(device)


def bench_training(clip, net, args, device, results):
    rng = np.random.default_rng(0)
    B = args.batch_size
    images = torch.randn(B, 3, clip.image_size, clip.image_size, device=device)
    subjects, attributes = _captions(rng, B)
    pb = clip.prompts
    texts = {k: v.to(device) for k, v in pb.training_texts(subjects, attributes).items()}
    amp = device.type == "cuda" and args.precision != "fp32"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    opt = torch.optim.AdamW(net.parameters(), lr=4e-5, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=amp)

    def fast_loss():
        with torch.no_grad():
            g, P = clip.encode_visual(images)
        return net(clip, g, P, texts)["total"]

    RB = min(B, REFERENCE_BATCH_CUDA) if device.type == "cuda" else B

    def reference_loss():  # the per-sample reference on the first RB images of the batch
        return training_losses(net, clip, images[:RB], subjects[:RB], attributes[:RB])["total"]

    def step(loss_fn):
        with autocast():
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    # pieces of the fast step, each timed on its own
    with autocast():
        with torch.no_grad():
            g, P = clip.encode_visual(images)
    pieces = {}
    pieces["visual tower (one pass, g and P)"], _ = _timed(lambda: _vis(clip, images, autocast), device, args.repeats, 1)
    pieces["attribute transformer + selection + mappers"], _ = _timed(lambda: _pw(net, g, P, autocast), device, args.repeats, 1)

    def fwd():
        with autocast():
            return net(clip, g, P, texts)["total"]

    t_fwd, _ = _timed(fwd, device, args.repeats, 1)
    pieces["text tower x4 + losses (forward)"] = t_fwd - pieces["attribute transformer + selection + mappers"]

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        scaler.scale(fwd()).backward()

    t_fb, _ = _timed(fwd_bwd, device, args.repeats, 1)
    pieces["backward"] = t_fb - t_fwd

    def opt_step():  # gradients from the last fwd_bwd stay in place
        scaler.step(opt)
        scaler.update()

    pieces["optimizer + scaler"], _ = _timed(opt_step, device, args.repeats, 1)

    _reset_mem(device)
    t_fast, _ = _timed(lambda: step(fast_loss), device, args.repeats, args.warmup)
    mem_fast = _peak_mem(device)
    # --cache-image-features from the second epoch on: g and P come from fp16 memory maps instead of
    # the visual tower (here already on the device: the step's compute alone)
    g16, P16 = g.half(), P.half()
    t_cached, _ = _timed(lambda: step(lambda: net(clip, g16.float(), P16.float(), texts)["total"]), device,
                         args.repeats, 1)
    res = {"batch_size": B, "fast_s_per_step": t_fast, "fast_images_per_s": B / t_fast, "fast_peak_mem_gib": mem_fast,
           "cached_features_images_per_s": B / t_cached, "pieces_s": pieces}
    results["training"] = res  # recorded before the reference runs: nothing of this step depends on it
    if args.skip_baseline:
        return
    res["reference_batch_size"] = RB
    oom = False
    try:
        _reset_mem(device)
        t_ref, _ = _timed(lambda: step(reference_loss), device, max(1, args.repeats // 2), 1)
        res.update(reference_s_per_step=t_ref, reference_images_per_s=RB / t_ref,
                   reference_peak_mem_gib=_peak_mem(device), speedup_vs_reference=(B / t_fast) / (RB / t_ref))
        # same loss on the same images (dropout off, fp32): the fast path computes what the reference does
        net.eval()
        with torch.no_grad():
            texts_rb = {k: v.to(device) for k, v in pb.training_texts(subjects[:RB], attributes[:RB]).items()}
            fast = float(net(clip, *clip.encode_visual(images[:RB]), texts_rb)["total"])
            ref = float(reference_loss())
        res.update(loss_fast_fp32=fast, loss_reference_fp32=ref)
    except torch.OutOfMemoryError:
        oom = True  # freed below, once the exception no longer holds the failed part's tensors
    finally:
        net.train()
        opt.zero_grad(set_to_none=True)
    if oom:
        res["reference_error"] = _free_after_oom(device, RB)


def _vis(clip, images, autocast):
    with autocast(), torch.no_grad():
        return clip.encode_visual(images)


def _pw(net, g, P, autocast):
    with autocast():
        return net.pseudo_words(g, P)


def bench_inference(clip, net, args, device, results):
    """fp32, no autocast, batch 32 (the authors' inference setting)."""
    rng = np.random.default_rng(1)
    B = 32
    images = torch.randn(B, 3, clip.image_size, clip.image_size, device=device)
    texts = [" ".join(rng.choice(WORDS, rng.integers(4, 15))) for _ in range(B)]
    net.eval()

    def query():
        with torch.no_grad():
            g, P = clip.encode_visual(images)
            return combine_text_features(net.compose(clip, g, P, [(t,) for t in texts]))

    def query_reference():
        with torch.no_grad():
            g, P = clip.encode_visual(images)
            g2 = clip.model.encode_image(images)  # the reference's second visual pass
            return torch.stack([query_feature(net, clip, g2[b], P[b], texts[b]) for b in range(B)])

    def gallery():
        with torch.no_grad():
            return clip.encode_image(images)

    with torch.no_grad():
        g_ref, P_ref = clip.encode_visual(images)

    def query_from_tokens():  # --cache-reference-tokens: the references' tower outputs are already there
        with torch.no_grad():
            return combine_text_features(net.compose(clip, g_ref, P_ref, [(t,) for t in texts]))

    t_q, q = _timed(query, device, args.repeats, 1)
    t_qt, _ = _timed(query_from_tokens, device, args.repeats, 1)
    t_g, _ = _timed(gallery, device, args.repeats, 1)
    res = {"query_images_per_s": B / t_q, "query_from_tokens_per_s": B / t_qt, "gallery_images_per_s": B / t_g}
    results["inference_fp32_b32"] = res
    if args.skip_baseline:
        return
    oom = False
    try:
        t_qr, qr = _timed(query_reference, device, max(1, args.repeats // 2), 1)
        res.update(query_reference_images_per_s=B / t_qr, query_speedup_vs_reference=t_qr / t_q,
                   query_max_abs_diff=float((q - qr).abs().max()))
    except torch.OutOfMemoryError:
        oom = True
    if oom:
        res["query_reference_error"] = _free_after_oom(device, B)


def bench_data(args, results):
    """JPEG decode + targetpad + tensor, one process (= one DataLoader worker)."""
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(2)
        paths = []
        for i in range(args.data_images):
            arr = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)  # a typical ImageNet size
            p = Path(tmp) / f"{i}.JPEG"
            Image.fromarray(arr).save(p, quality=90)
            paths.append(p)
        tf = build_transform("targetpad", 224)

        def run():
            for p in paths:
                with Image.open(p) as im:
                    tf(im)

        t, _ = _timed(run, torch.device("cpu"), 3, 1)
    results["data_pipeline"] = {"images_per_s_per_worker": args.data_images / t, "image_size": "500x375 JPEG -> 224"}


# ---------------------------------------------------------------------------------------------
# --count-flops: the GPU training step predicted on a CPU (FLOPs, memory saved for backward, time)

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
    subjects, attributes = _captions(rng, max(n, B))
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 256 on GPU, 16 on CPU)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="training autocast (GPU only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data-images", type=int, default=64, help="JPEGs for the data-pipeline figure")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="time only this repo's paths, not the per-sample reference (scripts/toy/reference.py)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--count-flops", action="store_true",
                        help="time nothing: predict the GPU training step at --batch-size (default 256) from FLOPs and "
                             "saved-for-backward bytes counted on the CPU")
    parser.add_argument("--flops-batch", type=int, default=4, help="images per counted step (--count-flops)")
    args = parser.parse_args(argv)
    if args.count_flops:
        return main_count_flops(args)
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (256 if device.type == "cuda" else 16)
    torch.manual_seed(0)
    clip = build_clip(args.clip_model, device)
    net = FTI4CIR.for_clip(clip).to(device).train()
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "clip": args.clip_model, "precision": args.precision,
               "threads": torch.get_num_threads()}
    failed = None
    try:  # each part records its figures as soon as it has them; the JSON is written whatever happens
        bench_training(clip, net, args, device, results)
        bench_inference(clip, net, args, device, results)
        bench_data(args, results)
    except BaseException as e:
        failed = e
        results["error"] = f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, torch.OutOfMemoryError):
            results["error"] = _free_after_oom(device, args.batch_size) + " (this repo's step)"
    finally:
        print_results(results, args, device)
        report_json(results, args.json)
    if failed is not None:
        raise failed
    return results


def print_results(results: dict, args, device) -> None:
    """The table of whatever the run measured (a part that failed leaves its rows out)."""
    print(f"\nfti4cir bench: {results['clip']} on {results['device']} (torch {results['torch']})")
    tr = results.get("training")
    if tr:
        print(f"training, batch {tr['batch_size']}, {args.precision if device.type == 'cuda' else 'fp32'}:")
        print(f"  this repo : {tr['fast_s_per_step']:.3f} s/step = {tr['fast_images_per_s']:.1f} images/s, "
              f"peak {tr['fast_peak_mem_gib']:.2f} GiB")
        if "reference_s_per_step" in tr:
            print(f"  per-sample reference (scripts/toy/reference.py, not the authors' code), batch {tr['reference_batch_size']}: "
                  f"{tr['reference_s_per_step']:.3f} s/step = {tr['reference_images_per_s']:.1f} images/s, peak "
                  f"{tr['reference_peak_mem_gib']:.2f} GiB  -> this repo x{tr['speedup_vs_reference']:.2f} in images/s")
        if "loss_reference_fp32" in tr:
            print(f"  same loss : {tr['loss_fast_fp32']:.6f} (this repo) vs {tr['loss_reference_fp32']:.6f} (per-sample "
                  f"reference), fp32, dropout off, the first {tr['reference_batch_size']} images")
        if "reference_error" in tr:
            print(f"  per-sample reference: {tr['reference_error']}")
        print(f"  cached g/P: {tr['cached_features_images_per_s']:.1f} images/s (--cache-image-features, 2nd epoch on; "
              "reads excluded)")
        for k, v in tr["pieces_s"].items():
            print(f"    {k:<46s} {1000 * v:8.1f} ms")
    inf = results.get("inference_fp32_b32")
    if inf:
        print("inference, fp32, batch 32:")
        ref = (f" (per-sample reference {inf['query_reference_images_per_s']:.1f}, this repo x"
               f"{inf['query_speedup_vs_reference']:.2f}, max |diff| {inf['query_max_abs_diff']:.1e})"
               if "query_speedup_vs_reference" in inf else "")
        ref += f" (per-sample reference: {inf['query_reference_error']})" if "query_reference_error" in inf else ""
        print(f"  composed queries {inf['query_images_per_s']:.1f} images/s" + ref)
        print(f"  composed queries from cached reference tokens {inf['query_from_tokens_per_s']:.1f} queries/s")
        print(f"  gallery          {inf['gallery_images_per_s']:.1f} images/s")
    if "data_pipeline" in results:
        print(f"data pipeline: {results['data_pipeline']['images_per_s_per_worker']:.1f} images/s per worker "
              "(500x375 JPEG, targetpad 224)")
    if "error" in results:
        print(f"stopped: {results['error']}")


def main_count_flops(args):
    if args.flops_batch < 1:
        raise SystemExit("--flops-batch must be >= 1")
    args.batch_size = args.batch_size or 256
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
