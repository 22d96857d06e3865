"""Time a full CIRCO validation (`evaluate.main --dataset circo`) with a warm feature cache, phase by phase.

Builds a CIRCO root laid out as the real one: the real `annotations/val.json` when present (else a
synthetic one with the same fields), an `image_info_unlabeled2017.json` listing `--gallery-size`
images (default 123,403, COCO 2017 unlabeled) that include every id the val queries use, and one
file per image (hard links to one small JPEG). CLIP is a tiny random one whose embedding size is
ViT-L/14's (D = 768), so the gallery cache has the real size (123,403 x 768 float32); the FTI4CIR
network is freshly initialised. Then runs evaluate.main once cold (fills the gallery and
reference-token caches: tiny-tower time, not a ViT-L figure) and `--repeats` times warm.

Everything but the CLIP towers is real-size: cache validation and loading, the annotation files,
the 220 query compositions (tiny text tower here; a ViT-L text tower does 220 queries in
milliseconds on a GPU), the similarity against 123,403 x 768 and the CIRCO metrics. The reference
tokens are the tiny tower's size ([220, 17, 128]); `--token-file-check` also times reading a store of
ViT-L/14's size ([220, 257, 1024] float32, ~231 MB) to show what that phase costs there.

Every gallery image is the same file, so every gallery feature is the same and every score ties: the
metrics printed mean nothing, and which tied image a ranking lists first depends on the kernels. The
runs are checked by their features instead: each warm run's gallery features must equal the cold
run's bit for bit (they are its copy, read from the cache), and its query features must be within
QUERY_TOLERANCE of the cold run's (the same references through the same network; only the batch size
of the composition differs, --batch-size cold, 32 warm). A failed check is printed as a warning line,
and the timings are still printed and written. Each run starts without the in-process memo of the
gallery annotation, as a fresh process would. The phases are timed by wrapping the functions
evaluate.py calls (inclusive times; indented rows are part of the row above). `--work-dir` keeps
the data, models and caches for the next invocation (building 123,403 links takes seconds, the
cold run minutes); without it all goes to a temporary folder that is removed.

    python scripts/bench_eval.py [--gallery-size 123403] [--repeats 3] [--device cpu] [--threads 1]
                                 [--work-dir DIR] [--token-file-check] [--json PATH|-]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "src", REPO / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
import evaluation  # noqa: E402
import features  # noqa: E402
import feature_store  # noqa: E402
import metrics  # noqa: E402
from clip_loader import FrozenCLIP  # noqa: E402
from toy.placeholders import placeholder_image, write_circo_image_info  # noqa: E402
from utils import report_json  # noqa: E402

# the real annotation files, where tests/conftest.py looks for them
REAL_VAL = Path(os.environ.get("FTI4CIR_ANNOTATIONS", REPO.parent / "shared" / "data")) / "CIRCO" / "annotations" / "val.json"
MANIFEST = "bench_eval_manifest.json"
WORDS = "red blue dog cat two three bigger smaller remove add wooden outdoor darker brighter people".split()
QUERY_TOLERANCE = 1e-5  # L2-normalised query features, cold against warm: float rounding of other batch shapes

# (label, module, function, parent label): the phases timed by wrapping these functions.
PHASES = [
    ("load CLIP", evaluate, "load_clip", None),
    ("load network", evaluate, "load_model", None),
    ("datasets (annotation JSONs)", evaluation, "open_benchmark", None),
    ("gallery_features", evaluation, "gallery_features", None),
    ("cache key", feature_store, "gallery_key", "gallery_features"),
    ("image stats", feature_store, "files_fingerprint", "cache key"),
    ("CLIP weights hash", FrozenCLIP, "fingerprint", "cache key"),
    ("read gallery cache", feature_store.EvalCache, "read_gallery", "gallery_features"),
    ("read token cache", feature_store.EvalCache, "read_references", "gallery_features"),
    ("encode gallery", features, "encode_gallery", "gallery_features"),
    ("compose queries", evaluation, "query_features", None),
    ("CIRCO metrics", evaluation, "circo_metrics", None),
    ("similarity + top-50", metrics, "topk_indices", "CIRCO metrics"),
]


# ---------------------------------------------------------------------------------------------
# timing

class PhaseTimer:
    """Wraps module functions so every call adds its wall time (inclusive) to a label."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo = []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, module, name: str, label: str) -> None:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.totals[label] += time.perf_counter() - t
                self.calls[label] += 1

        setattr(module, name, timed)
        self._undo.append((module, name, fn))

    def reset(self):
        self.totals.clear()
        self.calls.clear()

    def restore(self):
        for module, name, fn in reversed(self._undo):
            setattr(module, name, fn)
        self._undo.clear()


# ---------------------------------------------------------------------------------------------
# the CIRCO root

def _val_entries(seed: int) -> tuple[list[dict], str]:
    if REAL_VAL.is_file():
        return json.loads(REAL_VAL.read_text()), str(REAL_VAL)
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, 582_000), size=1200, replace=False).tolist()
    entries = []
    for q in range(220):  # CIRCO val: 220 queries, 1-14 ground truths each
        pick = rng.choice(len(ids), size=2 + q % 14, replace=False)
        gts = [int(ids[j]) for j in pick[1:]]
        entries.append({"reference_img_id": int(ids[pick[0]]), "target_img_id": gts[0],
                        "relative_caption": " ".join(rng.choice(WORDS, size=6)),
                        "shared_concept": " ".join(rng.choice(WORDS, size=4)), "gt_img_ids": gts, "id": q})
    return entries, "synthetic"


def build_circo_root(work: Path, gallery_size: int, seed: int) -> tuple[Path, str]:
    """`work`/CIRCO, reused when `work` already holds one of the same size and source."""
    root = work / "CIRCO"
    entries, source = _val_entries(seed)
    want = {"gallery_size": gallery_size, "seed": seed, "val": source}
    manifest = work / MANIFEST
    image_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
    if manifest.is_file() and json.loads(manifest.read_text()) == want and image_dir.is_dir() \
            and len(os.listdir(image_dir)) == gallery_size:
        return root, source
    if root.exists():
        shutil.rmtree(root)
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "val.json").write_text(json.dumps(entries))
    if source != "synthetic" and (REAL_VAL.parent / "test.json").is_file():
        shutil.copy(REAL_VAL.parent / "test.json", root / "annotations" / "test.json")
    used = {int(e["reference_img_id"]) for e in entries}
    used |= {int(g) for e in entries for g in e["gt_img_ids"] if str(g) != ""}
    if gallery_size < len(used):
        raise SystemExit(f"--gallery-size {gallery_size} is smaller than the {len(used)} ids the val queries use")
    rng = np.random.default_rng(seed)
    pool = np.setdiff1d(np.arange(1, max(600_000, 2 * gallery_size)), np.fromiter(used, dtype=np.int64))
    extra = rng.choice(pool, size=gallery_size - len(used), replace=False).tolist()
    ids = sorted(used | {int(i) for i in extra})
    write_circo_image_info(root, ids, size=(48, 32))
    image_dir.mkdir(parents=True)
    one = work / "one.jpg"
    placeholder_image("bench_eval").save(one, format="JPEG", quality=90)
    link = os.link
    for i in ids:
        target = image_dir / f"{i:012d}.jpg"
        try:
            link(one, target)
        except OSError:  # a file system without hard links (or over the link limit): copies
            link = shutil.copyfile
            link(one, target)
    manifest.write_text(json.dumps(want))
    return root, source


def build_models(work: Path, dim: int, text_layers: int) -> tuple[Path, Path]:
    from checkpoint import save_network
    from clip_loader import load_clip
    from toy.tiny_clip import save_tiny_clip
    from models import FTI4CIR

    # FTI4CIR needs the text width E == D; the visual tower stays tiny (W = 128, 17 tokens)
    tag = f"d{dim}-t{text_layers}"
    clip_path, net_path = work / f"tiny_clip-{tag}.pt", work / f"fti4cir-{tag}.pt"
    if not clip_path.is_file():
        save_tiny_clip(clip_path, seed=0, embed_dim=dim, text_width=dim, text_layers=text_layers)
    if not net_path.is_file():
        clip = load_clip("ViT-L/14", clip_path, device="cpu")
        torch.manual_seed(0)
        save_network(FTI4CIR.for_clip(clip), net_path)
    return clip_path, net_path


# ---------------------------------------------------------------------------------------------
# runs

def run_once(argv: list[str], timer: PhaseTimer, quiet: bool) -> tuple[float, dict, dict[str, float]]:
    """One evaluate.main, as a fresh process would run it."""
    timer.reset()
    sink = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        metrics = evaluate.main(argv)
    total = time.perf_counter() - t
    return total, metrics, dict(timer.totals)


def table(rows: list[tuple[str, float]], total: float, title: str, calls: dict[str, int]) -> str:
    depth = {label: 0 for label, *_ in PHASES}
    for label, _, _, parent in PHASES:
        if parent is not None:
            depth[label] = depth[parent] + 1
    lines = [title, f"  {'phase':<34}{'seconds':>9}{'share':>8}"]
    top = 0.0
    for label, sec in rows:
        n = calls.get(label, 0)
        name = "  " * depth[label] + label + (f" (x{n})" if n > 1 else "")
        lines.append(f"  {name:<34}{sec:9.3f}{100 * sec / total:7.1f}%")
        if depth[label] == 0:
            top += sec
    lines.append(f"  {'other (argparse, JSON out, ...)':<34}{total - top:9.3f}{100 * (total - top) / total:7.1f}%")
    lines.append(f"  {'TOTAL evaluate.main':<34}{total:9.3f}")
    return "\n".join(lines)


def image_key_timing(root: Path, threads: int | None) -> dict[str, float]:
    """Seconds to key the gallery by its files' sizes and times (the default) and by their contents
    (--cache-hash-images), over the same files."""
    from datasets import CIRCODataset

    ds = CIRCODataset(root, "val", "gallery", lambda image: image)
    t = time.perf_counter()
    feature_store.images_fingerprint(ds)
    stat_s = time.perf_counter() - t
    t = time.perf_counter()
    feature_store.images_content_fingerprint(ds, threads=threads)
    return {"files": len(ds.names), "stat_s": stat_s, "contents_s": time.perf_counter() - t}


class _CheckClip:
    """The one thing a store key asks of CLIP."""

    @staticmethod
    def fingerprint() -> dict:
        return {"source": "token-file-check"}


def token_file_check(work: Path, device: torch.device, refs: int = 220, tokens: int = 257, width: int = 1024,
                     dim: int = 768) -> float:
    """Seconds to read a reference-token store of ViT-L/14's size to the device (what the tiny tower cannot
    show): the lookup, the memory-mapped arrays and their copy, as composing the queries makes it."""
    root = work / "vitl_tokens_check"
    cache = feature_store.EvalCache(root)
    names = [str(i) for i in range(refs)]
    key = feature_store.store_key("gallery", _CheckClip(), "none", "fp32", "float32", names, None, root, "check")
    with contextlib.redirect_stdout(io.StringIO()):  # the cache's own log lines
        outputs = feature_store.ReferenceOutputs(names, torch.randn(refs, dim), torch.randn(refs, tokens, width))
        cache.write_references(key, outputs)
        t = time.perf_counter()
        got = cache.read_references(key, names)
        got.g.to(device, copy=True), got.P.to(device, copy=True)  # read from the file, whatever the device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sec = time.perf_counter() - t
    shutil.rmtree(root)
    return sec


class Outputs:
    """What each evaluate.main run encoded (evaluation.encode_benchmark's gallery and query features),
    kept as the run left them (no copy inside the timed run)."""

    def __init__(self):
        self.last = None
        self._fn = evaluation.encode_benchmark

        @functools.wraps(self._fn)
        def kept(*args, **kwargs):
            r = self._fn(*args, **kwargs)
            self.last = (r.gallery.features, r.query_features)
            return r

        evaluation.encode_benchmark = kept

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        out, self.last = self.last, None
        return out

    def restore(self):
        evaluation.encode_benchmark = self._fn


def compare(cold: tuple[torch.Tensor, torch.Tensor], warm: tuple[torch.Tensor, torch.Tensor]) -> tuple[bool, float]:
    """(the gallery features equal bit for bit, the largest difference of a query feature)."""
    gallery_equal = cold[0].shape == warm[0].shape and torch.equal(cold[0], warm[0].to(cold[0].device))
    diff = float((cold[1] - warm[1].to(cold[1].device)).abs().max()) if cold[1].shape == warm[1].shape else float("inf")
    return gallery_equal, diff


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Time CIRCO validation with a warm feature cache, by phase.")
    p.add_argument("--gallery-size", type=int, default=123_403, help="gallery images (COCO 2017 unlabeled: 123,403)")
    p.add_argument("--dim", type=int, default=768, help="CLIP embedding size D (ViT-L/14: 768)")
    p.add_argument("--text-layers", type=int, default=1,
                   help="text transformer blocks of the tiny CLIP (ViT-L has 12: milliseconds for 220 queries on a "
                        "GPU, seconds on a CPU, so few here)")
    p.add_argument("--repeats", type=int, default=3, help="warm runs (the median is reported)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). 1 by default: on a shared machine, small ops with "
                        "2+ threads wait on descheduled threads (the compose phase ran 3-20x slower)")
    p.add_argument("--batch-size", type=int, default=256, help="cold run: images per forward pass")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="cold run: DataLoader workers")
    p.add_argument("--work-dir", default=None,
                   help="build (and keep, for the next run) the data, models and cache here; default: a temp dir, removed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hash-images", action="store_true",
                   help="also time keying the gallery cache by the images' contents (--cache-hash-images) against "
                        "the default size-and-time key; the files are the bench's own small JPEGs")
    p.add_argument("--hash-threads", type=int, default=None, help="threads for --hash-images (default min(32, 4 x CPUs))")
    p.add_argument("--token-file-check", action="store_true",
                   help="also time loading a ViT-L/14-size reference-token file (~231 MB)")
    p.add_argument("--verbose", action="store_true", help="show evaluate.py's own output")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures here ('-': stdout)")
    args = p.parse_args(argv)
    if args.text_layers < 1:
        p.error("--text-layers must be >= 1 (open_clip builds no text tower without a block)")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_eval_")
        work = Path(tmp)
    else:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        root, source = build_circo_root(work, args.gallery_size, args.seed)
        clip_path, net_path = build_models(work, args.dim, args.text_layers)
        setup_s = time.perf_counter() - t
        device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        print(f"CIRCO val ({source}), gallery {args.gallery_size}, D={args.dim}, device {device}, "
              f"torch threads {torch.get_num_threads()}; data + models ready in {setup_s:.1f} s ({work})", flush=True)
        base = ["--dataset", "circo", "--circo-path", str(root), "--clip-weights", str(clip_path),
                "--model-path", str(net_path), "--device", str(device), "--cache-dir", str(work / "cache"),
                "--cache-reference-tokens", "--save-path", str(work / "out"), "--no-progress"]
        timer = PhaseTimer(device)
        for label, module, name, _ in PHASES:
            timer.wrap(module, name, label)
        outputs = Outputs()
        checks = []
        try:
            cold_argv = base + ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
            cold, cold_metrics, cold_phases = run_once(cold_argv, timer, not args.verbose)
            cold_calls = dict(timer.calls)
            cold_out = outputs.take()
            encoded = args.gallery_size if cold_calls.get("encode gallery") else 0
            warm = []
            for _ in range(max(1, args.repeats)):
                warm.append(run_once(base + ["--workers", "0"], timer, not args.verbose))
                checks.append(compare(cold_out, outputs.take()))  # outside the timed run
            warm_calls = dict(timer.calls)
        finally:
            timer.restore()
            outputs.restore()
        gallery_equal = all(c[0] for c in checks)
        query_diff = max(c[1] for c in checks)
        check = {"gallery_features_equal": gallery_equal, "query_features_max_abs_diff": query_diff,
                 "query_tolerance": QUERY_TOLERANCE, "ok": gallery_equal and query_diff <= QUERY_TOLERANCE,
                 "metrics_equal": all(m == cold_metrics for _, m, _ in warm)}
        order = [label for label, *_ in PHASES]
        title = ("cold run (fills the caches; tiny-tower encoding, NOT a ViT-L figure):" if encoded else
                 "first run (the caches in --work-dir were already warm: nothing encoded):")
        print(table([(k, cold_phases.get(k, 0.0)) for k in order], cold, title, cold_calls))
        mid = sorted(range(len(warm)), key=lambda i: warm[i][0])[len(warm) // 2]
        w_total, _, w_phases = warm[mid]
        print(table([(k, w_phases.get(k, 0.0)) for k in order], w_total,
                    f"warm run (median of {len(warm)}: {', '.join(f'{w[0]:.2f}' for w in warm)} s):", warm_calls))
        print("metrics (one image repeated: every score ties, so they mean nothing):",
              ", ".join(f"{k} {v:.2f}" for k, v in cold_metrics.items()))
        if check["ok"]:
            print(f"check: warm gallery features equal the cold run's, query features within {query_diff:.1e} "
                  f"(tolerance {QUERY_TOLERANCE:.0e})")
        else:
            print(f"warning: the warm runs encoded other features than the cold run (gallery features equal: "
                  f"{gallery_equal}; query features up to {query_diff:.3g} apart, tolerance {QUERY_TOLERANCE:.0e})")
        result = {"gallery_size": args.gallery_size, "dim": args.dim, "device": str(device), "val": source,
                  "cold_s": cold, "cold_encoded_images": encoded, "cold_phases_s": cold_phases, "warm_s": [w[0] for w in warm],
                  "warm_median_s": w_total, "warm_phases_s": w_phases, "metrics": cold_metrics, "check": check}
        if args.hash_images:
            result["image_key"] = image_key_timing(root, args.hash_threads)
            k = result["image_key"]
            print(f"keying {k['files']} gallery files: sizes and times {k['stat_s']:.2f} s, contents "
                  f"(--cache-hash-images) {k['contents_s']:.2f} s")
        if args.token_file_check:
            result["vitl_token_file_load_s"] = token_file_check(work, device)
            print(f"reading a ViT-L/14-size reference-token store to {device} (220 x 257 x 1024 fp32): "
                  f"{result['vitl_token_file_load_s']:.3f} s")
        if args.json == "-":
            print(json.dumps(result, indent=2))
        else:
            report_json(result, args.json)
        return result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
