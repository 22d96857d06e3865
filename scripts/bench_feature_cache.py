"""Disk side of train.py --cache-image-features, at ViT-L/14 shapes (g 768, P 257 x 1024, fp16 = 0.5 MB per
image): what the training thread pays per batch to store and to read the cached rows, the synchronous
way (each step's rows copied off the device, stored and flushed before the next step; reads by the
training process) against the writer thread of train_features.RowWriter (stores and flushes in the
background; reads in the DataLoader workers), measured in the same run on the same files. Between two
stores the training thread sleeps --step-ms, standing for the GPU step (default: 244 ms = batch 256 at
the 1,050 images/s target), and the writer must keep up: the queue is drained close to zero seconds
after the last step when it does.

    python scripts/bench_feature_cache.py                      # 2,048 rows, batch 256, workers 0 1 2
    python scripts/bench_feature_cache.py --dir /scratch --workers 0 4 8 --json runs/cache_io.json

No model runs: this is the I/O alone. With --device cuda the stored rows start on the GPU (the copy to
pinned memory is then asynchronous, and their finiteness is checked there); on the CPU `write` copies
the batch in the training thread and the writer thread checks it.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from feature_store import FORMAT, VERSION, FeatureStore, prepare_store  # noqa: E402
from train_features import CachedRowsDataset, RowReader, RowWriter, collate_cached  # noqa: E402
from utils import report_json  # noqa: E402


class _Pairs:
    """What CachedRowsDataset needs of ImageNetPairsDataset when every row is cached: `pairs` and a length."""

    def __init__(self, n: int):
        self.pairs = [{"img_id": f"{i:08d}", "subject": "a dog", "attribute": "on the grass"} for i in range(n)]

    def __len__(self):
        return len(self.pairs)


def _writer(args, root: Path) -> RowWriter:
    """A fresh training store (its own label: a new folder per phase) of --images rows, opened for writing."""
    n = args.images
    key = {"format": FORMAT, "version": VERSION, "rows": "training", "clip": {"source": "bench"}, "transform": "none",
           "precision": "fp32", "dtype": "float16", "label": f"bench{time.time_ns()}", "root": "/", "num_images": n,
           "names_sha256": "", "images_keyed_by": "sizes-and-times", "images_sha256": None}
    arrays = {"g": (n, args.dim), "P": (n, args.tokens, args.width)}
    return RowWriter(FeatureStore(prepare_store(root, key, arrays), key, arrays))


def bench_writes(args, root: Path, device: torch.device) -> dict:
    B = args.batch_size
    g = torch.randn(B, args.dim, device=device).half()
    P = torch.randn(B, args.tokens, args.width, device=device).half()
    perm = np.random.default_rng(0).permutation(args.images)
    batches = [perm[i:i + B] for i in range(0, args.images - B + 1, B)]

    # synchronous: the training thread waits until each step's rows are stored, flushed and marked filled
    old = _writer(args, root)
    t_old = []
    for rows in batches:
        t = time.perf_counter()
        old.write(rows, g, P)
        old.commit()
        t_old.append(time.perf_counter() - t)
    old.close()
    assert old.num_filled() == len(batches) * B

    new = _writer(args, root)
    t_new = []
    for rows in batches:
        t = time.perf_counter()
        new.write(rows, g, P)
        t_new.append(time.perf_counter() - t)
        time.sleep(args.step_ms / 1000)  # the step's GPU work, during which the writer thread runs
    t_commit = time.perf_counter()
    new.close()
    t_end = time.perf_counter()
    assert new.num_filled() == len(batches) * B
    return {"old_training_thread_ms_per_batch": 1000 * statistics.median(t_old),
            "new_training_thread_ms_per_batch": 1000 * statistics.median(t_new),
            "new_drain_s": t_end - t_commit, "old_rows_per_s": len(batches) * B / sum(t_old), "folder": str(new.folder)}


def bench_reads(args, folder: Path) -> dict:
    B = args.batch_size
    g_map, P_map = np.load(folder / "g.npy", mmap_mode="r"), np.load(folder / "P.npy", mmap_mode="r")
    rng = np.random.default_rng(1)
    for name in ("g.npy", "P.npy"):  # warm the page cache: the figures are for a cache that fits in RAM
        np.load(folder / name, mmap_mode="r").sum(dtype=np.float32)
    steps = args.images // B
    res = {}
    # in the training process: the batch's rows (ascending offsets) read before its step
    times = []
    for _ in range(steps):
        rows = np.sort(rng.choice(args.images, B, replace=False))
        t = time.perf_counter()
        torch.from_numpy(g_map[rows]), torch.from_numpy(P_map[rows])
        times.append(time.perf_counter() - t)
    res["old_training_thread_ms_per_batch"] = 1000 * statistics.median(times)
    # CachedRowsDataset reads in the workers; the training thread only waits for a ready batch
    reader = RowReader(folder)
    ds = CachedRowsDataset(_Pairs(args.images), reader)
    for workers in args.workers:
        loader = DataLoader(ds, batch_size=B, shuffle=True, num_workers=workers,
                            collate_fn=functools.partial(collate_cached, reader=reader),
                            drop_last=True, persistent_workers=workers > 0,
                            generator=torch.Generator().manual_seed(0))
        for _ in loader:  # start the workers, warm their maps
            pass
        t0 = time.perf_counter()
        n = 0
        for _ in range(args.epochs):
            for batch in loader:
                n += len(batch["index"])
                assert batch["g"].shape[0] == len(batch["index"])
        res[f"loader_rows_per_s_workers_{workers}"] = n / (time.perf_counter() - t0)
        del loader
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048, help="rows in the cache (0.5 MB each at ViT-L/14)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=768, help="g size (ViT-L/14: 768)")
    parser.add_argument("--tokens", type=int, default=257, help="P rows (ViT-L/14 at 224: 257)")
    parser.add_argument("--width", type=int, default=1024, help="P width (ViT-L/14: 1024)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time")
    parser.add_argument("--epochs", type=int, default=2, help="timed passes over the cache per worker count")
    parser.add_argument("--step-ms", type=float, default=244.0, help="simulated training step between two stores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the rows to store start")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the test files (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error("--images must be at least --batch-size")
    device = torch.device(args.device)
    mib = args.images * 2 * (args.dim + args.tokens * args.width) / 2**20
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        writes = bench_writes(args, Path(tmp), device)
        reads = bench_reads(args, Path(writes.pop("folder")))
    results = {"device": str(device), "rows": args.images, "batch_size": args.batch_size, "file_mib": mib,
               "writes": writes, "reads": reads}
    B = args.batch_size
    print(f"\nfeature cache I/O: {args.images} rows of g [{args.dim}] + P [{args.tokens} x {args.width}] fp16 "
          f"({mib:.0f} MiB), batch {B}, rows from {device}")
    print(f"  store, training thread : {writes['old_training_thread_ms_per_batch']:7.1f} ms/batch synchronous "
          f"(store + flush each step) -> {writes['new_training_thread_ms_per_batch']:.1f} ms/batch queued")
    print(f"  store, writer thread   : queue drained {writes['new_drain_s']:.2f} s after the last step "
          f"(synchronous: {writes['old_rows_per_s']:.0f} rows/s, all in the training thread)")
    print(f"  read, training thread  : {reads['old_training_thread_ms_per_batch']:7.1f} ms/batch "
          f"(= {1000 * B / reads['old_training_thread_ms_per_batch']:.0f} rows/s ceiling, serial with the step)")
    for w in args.workers:
        print(f"  read, DataLoader, {w} worker(s): {reads[f'loader_rows_per_s_workers_{w}']:7.0f} rows/s "
              + ("(in the training process)" if w == 0 else "(in parallel with the step)"))
    report_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
