"""Speed and memory of fti4cir's training step and composed queries, next to the per-sample reference
of scripts/toy/reference.py, measured in the same run on the same inputs. Prints a table and writes JSON.

The per-sample reference is this repository's plain rewrite of the method (two visual passes, a
Python loop over the batch, 77-token text passes run one by one), kept to prove the fast path equal
to it. It is NOT the authors' code: its speed is not theirs, and a ratio against it is no speed-up
over the authors' code (their measured step is ANCHOR below, from PERF-ANCHOR.md).

    python scripts/bench.py                                 # tiny CLIP, CPU (pipeline check)
    python scripts/bench.py --clip-model ViT-L-14 --device cuda --batch-size 256   # random ViT-L/14 weights

This repository's step is timed and recorded first. On CUDA the per-sample reference trains on the
first REFERENCE_BATCH_CUDA images of the batch (each of its sentences keeps a 77-token graph: at batch
256 they do not fit); ratios compare images per second. A part that runs out of memory is recorded
("out of memory at batch N") and the rest goes on; --json is written even when a part failed.

Model compute only: image tensors are synthetic and already on the device; the data pipeline (JPEG
decode + targetpad) is measured on its own, in images/s for one worker.

The GPU step predicted from FLOPs counted on a CPU: scripts/bench_flops.py.
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
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def peak_mem(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (GiB), CPU


def reset_mem(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_after_oom(device, batch: int) -> str:
    """Releases what a part that ran out of memory left cached on the device; the note the JSON keeps."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return f"out of memory at batch {batch}"


def captions(rng, n):
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
    subjects, attributes = captions(rng, B)
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
    pieces["visual tower (one pass, g and P)"], _ = timed(lambda: _vis(clip, images, autocast), device, args.repeats, 1)
    pieces["attribute transformer + selection + mappers"], _ = timed(lambda: _pw(net, g, P, autocast), device, args.repeats, 1)

    def fwd():
        with autocast():
            return net(clip, g, P, texts)["total"]

    t_fwd, _ = timed(fwd, device, args.repeats, 1)
    pieces["text tower x4 + losses (forward)"] = t_fwd - pieces["attribute transformer + selection + mappers"]

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        scaler.scale(fwd()).backward()

    t_fb, _ = timed(fwd_bwd, device, args.repeats, 1)
    pieces["backward"] = t_fb - t_fwd

    def opt_step():  # gradients from the last fwd_bwd stay in place
        scaler.step(opt)
        scaler.update()

    pieces["optimizer + scaler"], _ = timed(opt_step, device, args.repeats, 1)

    reset_mem(device)
    t_fast, _ = timed(lambda: step(fast_loss), device, args.repeats, args.warmup)
    mem_fast = peak_mem(device)
    # --cache-image-features from the second epoch on: g and P come from fp16 memory maps instead of
    # the visual tower (here already on the device: the step's compute alone)
    g16, P16 = g.half(), P.half()
    t_cached, _ = timed(lambda: step(lambda: net(clip, g16.float(), P16.float(), texts)["total"]), device,
                         args.repeats, 1)
    res = {"batch_size": B, "fast_s_per_step": t_fast, "fast_images_per_s": B / t_fast, "fast_peak_mem_gib": mem_fast,
           "cached_features_images_per_s": B / t_cached, "pieces_s": pieces}
    results["training"] = res  # recorded before the reference runs: nothing of this step depends on it
    if args.skip_baseline:
        return
    res["reference_batch_size"] = RB
    oom = False
    try:
        reset_mem(device)
        t_ref, _ = timed(lambda: step(reference_loss), device, max(1, args.repeats // 2), 1)
        res.update(reference_s_per_step=t_ref, reference_images_per_s=RB / t_ref,
                   reference_peak_mem_gib=peak_mem(device), speedup_vs_reference=(B / t_fast) / (RB / t_ref))
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
        res["reference_error"] = free_after_oom(device, RB)


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

    t_q, q = timed(query, device, args.repeats, 1)
    t_qt, _ = timed(query_from_tokens, device, args.repeats, 1)
    t_g, _ = timed(gallery, device, args.repeats, 1)
    res = {"query_images_per_s": B / t_q, "query_from_tokens_per_s": B / t_qt, "gallery_images_per_s": B / t_g}
    results["inference_fp32_b32"] = res
    if args.skip_baseline:
        return
    oom = False
    try:
        t_qr, qr = timed(query_reference, device, max(1, args.repeats // 2), 1)
        res.update(query_reference_images_per_s=B / t_qr, query_speedup_vs_reference=t_qr / t_q,
                   query_max_abs_diff=float((q - qr).abs().max()))
    except torch.OutOfMemoryError:
        oom = True
    if oom:
        res["query_reference_error"] = free_after_oom(device, B)


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

        t, _ = timed(run, torch.device("cpu"), 3, 1)
    results["data_pipeline"] = {"images_per_s_per_worker": args.data_images / t, "image_size": "500x375 JPEG -> 224"}


# ---------------------------------------------------------------------------------------------

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
    args = parser.parse_args(argv)
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
            results["error"] = free_after_oom(device, args.batch_size) + " (this repo's step)"
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


if __name__ == "__main__":
    main()
