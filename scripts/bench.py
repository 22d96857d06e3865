"""Speed and memory of fti4cir against the plain per-sample baseline (the authors' way of computing
the same thing: two visual passes, a Python loop over the batch, 77-token text passes run one by
one), measured in the same run on the same inputs. Prints a table and writes JSON.

    python scripts/bench.py                                 # tiny CLIP, CPU (pipeline check)
    python scripts/bench.py --clip-model ViT-L-14 --device cuda --batch-size 256   # random ViT-L/14 weights

Model compute only: image tensors are synthetic and already on the device; the data pipeline (JPEG
decode + targetpad) is measured on its own, in images/s for one worker.
"""
from __future__ import annotations

import argparse
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import open_clip  # noqa: E402

from clip_loader import FrozenCLIP, build_tiny_clip, canonical_model_name  # noqa: E402
from models import FTI4CIR  # noqa: E402
from reference import query_feature, training_losses  # noqa: E402
from transforms import build_transform  # noqa: E402

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
    pb = net.prompts(clip)
    texts = {k: v.to(device) for k, v in pb.training_texts(subjects, attributes).items()}
    amp = device.type == "cuda" and args.precision != "fp32"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
    opt = torch.optim.AdamW(net.parameters(), lr=4e-5, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=amp)

    def fast_loss():
        with torch.no_grad():
            g, P = clip.encode_image_tokens(images)
        return net(clip, g, P, texts)["total"]

    def baseline_loss():
        return training_losses(net, clip, images, subjects, attributes)["total"]

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
            g, P = clip.encode_image_tokens(images)
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
    if not args.skip_baseline:
        _reset_mem(device)
        t_base, _ = _timed(lambda: step(baseline_loss), device, max(1, args.repeats // 2), 1)
        res.update(baseline_s_per_step=t_base, baseline_images_per_s=B / t_base, baseline_peak_mem_gib=_peak_mem(device),
                   speedup=t_base / t_fast)
        # same loss on the same batch (dropout off, fp32): the fast path is the faithful path
        net.eval()
        with torch.no_grad():
            fast = float(net(clip, *clip.encode_image_tokens(images), texts)["total"])
            base = float(training_losses(net, clip, images, subjects, attributes)["total"])
        net.train()
        res.update(loss_fast_fp32=fast, loss_baseline_fp32=base)
    results["training"] = res


def _vis(clip, images, autocast):
    with autocast(), torch.no_grad():
        return clip.encode_image_tokens(images)


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
            g, P = clip.encode_image_tokens(images)
            return net.query_features(clip, g, P, texts)

    def query_baseline():
        with torch.no_grad():
            g, P = clip.encode_image_tokens(images)
            g2 = clip.model.encode_image(images)  # the authors' second visual pass
            return torch.stack([query_feature(net, clip, g2[b], P[b], texts[b]) for b in range(B)])

    def gallery():
        with torch.no_grad():
            return clip.encode_image(images)

    with torch.no_grad():
        g_ref, P_ref = clip.encode_image_tokens(images)

    def query_from_tokens():  # --cache-reference-tokens: the references' tower outputs are already there
        with torch.no_grad():
            return net.query_features(clip, g_ref, P_ref, texts)

    t_q, q = _timed(query, device, args.repeats, 1)
    t_qt, _ = _timed(query_from_tokens, device, args.repeats, 1)
    t_g, _ = _timed(gallery, device, args.repeats, 1)
    res = {"query_images_per_s": B / t_q, "query_from_tokens_per_s": B / t_qt, "gallery_images_per_s": B / t_g}
    if not args.skip_baseline:
        t_qb, qb = _timed(query_baseline, device, max(1, args.repeats // 2), 1)
        res.update(query_baseline_images_per_s=B / t_qb, query_speedup=t_qb / t_q,
                   query_max_abs_diff=float((q - qb).abs().max()))
    results["inference_fp32_b32"] = res


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-model", default="tiny", help="'tiny' (random tiny CLIP) or an architecture (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 256 on GPU, 16 on CPU)")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="training autocast (GPU only)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data-images", type=int, default=64, help="JPEGs for the data-pipeline figure")
    parser.add_argument("--skip-baseline", action="store_true", help="time only this repo's paths")
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
    bench_training(clip, net, args, device, results)
    bench_inference(clip, net, args, device, results)
    bench_data(args, results)

    tr, inf = results["training"], results["inference_fp32_b32"]
    print(f"\nfti4cir bench: {results['clip']} on {results['device']} (torch {results['torch']})")
    print(f"training, batch {tr['batch_size']}, {args.precision if device.type == 'cuda' else 'fp32'}:")
    print(f"  this repo : {tr['fast_s_per_step']:.3f} s/step = {tr['fast_images_per_s']:.1f} images/s, peak {tr['fast_peak_mem_gib']:.2f} GiB")
    if "baseline_s_per_step" in tr:
        print(f"  baseline  : {tr['baseline_s_per_step']:.3f} s/step = {tr['baseline_images_per_s']:.1f} images/s, peak "
              f"{tr['baseline_peak_mem_gib']:.2f} GiB  -> speed-up x{tr['speedup']:.2f}")
        print(f"  same loss : {tr['loss_fast_fp32']:.6f} (this repo) vs {tr['loss_baseline_fp32']:.6f} (baseline), fp32, dropout off")
    print(f"  cached g/P: {tr['cached_features_images_per_s']:.1f} images/s (--cache-image-features, 2nd epoch on; reads excluded)")
    for k, v in tr["pieces_s"].items():
        print(f"    {k:<46s} {1000 * v:8.1f} ms")
    print("inference, fp32, batch 32:")
    print(f"  composed queries {inf['query_images_per_s']:.1f} images/s" +
          (f" (baseline {inf['query_baseline_images_per_s']:.1f}, x{inf['query_speedup']:.2f}, max |diff| {inf['query_max_abs_diff']:.1e})"
           if "query_speedup" in inf else ""))
    print(f"  composed queries from cached reference tokens {inf['query_from_tokens_per_s']:.1f} queries/s")
    print(f"  gallery          {inf['gallery_images_per_s']:.1f} images/s")
    print(f"data pipeline: {results['data_pipeline']['images_per_s_per_worker']:.1f} images/s per worker (500x375 JPEG, targetpad 224)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
