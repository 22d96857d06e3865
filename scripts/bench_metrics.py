"""Time the retrieval metrics at benchmark scale on random features.

CIRCO test scale: 800 queries x 123,403 gallery images (mAP/recall, then the top-50 submission).
CIRR val scale: 4,181 queries x 2,297 gallery images (recall + subset recall, then the submission).

    python scripts/bench_metrics.py [--device cpu|cuda|auto] [--dim 768] [--chunk 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from metrics import circo_map_recall, circo_submission, cirr_recall, cirr_submission  # noqa: E402
from utils import resolve_device  # noqa: E402


def _feats(n: int, d: int, device, gen) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen)
    return torch.nn.functional.normalize(x, dim=1).to(device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int) -> float:
    """Median wall seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_circo(args, device, gen) -> dict[str, float]:
    n_q, n_g = args.circo_queries, args.circo_gallery
    q, g = _feats(n_q, args.dim, device, gen), _feats(n_g, args.dim, device, gen)
    ids = [str(100000 + j) for j in range(n_g)]
    # 1-14 ground truths per query, as in CIRCO val, padded with "" to 23 like the authors' files
    gt = []
    for i in range(n_q):
        n = 1 + i % 14
        picks = torch.randint(0, n_g, (n,), generator=gen).tolist()
        gt.append([ids[p] for p in dict.fromkeys(picks)] + [""] * (23 - len(set(picks))))
    return {
        "circo mAP+recall": _time(lambda: circo_map_recall(q, g, ids, gt, chunk=args.chunk), device, args.repeats),
        "circo submission": _time(lambda: circo_submission(q, g, ids, list(range(n_q)), chunk=args.chunk),
                                  device, args.repeats),
    }


def bench_cirr(args, device, gen) -> dict[str, float]:
    n_q, n_g = args.cirr_queries, args.cirr_gallery
    q, g = _feats(n_q, args.dim, device, gen), _feats(n_g, args.dim, device, gen)
    names = [f"dev-{j}-img" for j in range(n_g)]
    members = [[names[j] for j in torch.randperm(n_g, generator=gen)[:6].tolist()] for _ in range(n_q)]
    refs = [m[0] for m in members]
    targets = [m[1] for m in members]
    return {
        "cirr recall+subset": _time(lambda: cirr_recall(q, g, names, refs, targets, members, chunk=args.chunk),
                                    device, args.repeats),
        "cirr submission": _time(lambda: cirr_submission(q, g, names, refs, members, list(range(n_q)),
                                                         chunk=args.chunk), device, args.repeats),
    }


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Time the CIRCO / CIRR metrics on random features.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--dim", type=int, default=768, help="feature size D (768 for ViT-L/14)")
    parser.add_argument("--chunk", type=int, default=256, help="query rows per similarity block")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median shown)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    parser.add_argument("--circo-queries", type=int, default=800, help="CIRCO test has 800 queries")
    parser.add_argument("--circo-gallery", type=int, default=123_403, help="COCO 2017 unlabeled images")
    parser.add_argument("--cirr-queries", type=int, default=4181, help="CIRR val queries")
    parser.add_argument("--cirr-gallery", type=int, default=2297, help="CIRR val gallery images")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"device {device}, torch threads {torch.get_num_threads()}, D={args.dim}, chunk {args.chunk}, "
          f"median of {args.repeats}")
    results = {}
    for name, fn in (("CIRCO", bench_circo), ("CIRR", bench_cirr)):
        sizes = (args.circo_queries, args.circo_gallery) if name == "CIRCO" else (args.cirr_queries, args.cirr_gallery)
        res = fn(args, device, gen)
        for key, sec in res.items():
            print(f"{key:>20s}  {sizes[0]:>6d} x {sizes[1]:<7d}  {sec:8.3f} s")
        results.update(res)
    return results


if __name__ == "__main__":
    main()
