"""The whole FTI4CIR pipeline on a built-in toy world, on a CPU, in a few minutes.

1. generates a small world of coloured shapes and garments in the exact layouts of ImageNet,
   FashionIQ, CIRR and CIRCO (scripts/make_toy_data.py);
2. trains FTI4CIR on its ImageNet part with a tiny random CLIP (or a real one: --clip-weights);
3. evaluates on the three benchmarks and writes the CIRR / CIRCO test submissions;
4. draws retrieval examples (reference, text, top-5, target framed) as PNG grids;
5. prints where everything went, and every metric beside its chance level.

It runs the real scripts (src/train.py, src/evaluate.py, src/test.py) with flags, printing each
command, so every step can be rerun by hand. Everything goes under --out, which a rerun replaces.
With the tiny random CLIP the numbers are those of an untrained text/image space: they show the
pipeline works end to end, not what FTI4CIR achieves.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

MARKER = ".fti4cir-demo"


def run(cmd: list[str], log: Path) -> None:
    """Runs one pipeline step, echoing the command and teeing its output to a log file."""
    shown = " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")
    print(f"\n$ {shown}", flush=True)
    t = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shown}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(proc.stdout)
    tail = proc.stdout.strip().splitlines()[-12:]
    print("\n".join("  " + line for line in tail))
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed (exit {proc.returncode}); full output in {log}")
    print(f"  ({time.time() - t:.1f} s)")


# chance levels: what a random ranking scores on the same annotations ---------------------------

def _recall_chance(k: int, gallery: int) -> float:
    return 100.0 * min(1.0, k / gallery)


def _ap_chance(k: int, n_rel: int, gallery: int) -> float:
    """E[AP@K] of a random ranking with n_rel relevant items among `gallery` (SPEC 11's AP@K)."""
    total = 0.0
    for j in range(1, min(k, gallery) + 1):
        # P(item j relevant) * E[precision@j | item j relevant]
        total += (n_rel / gallery) * (1 + (j - 1) * (n_rel - 1) / max(1, gallery - 1)) / j
    return 100.0 * total / min(n_rel, k)


def chance_levels(data: Path) -> dict[str, dict[str, float]]:
    from datasets import CIRCODataset, CIRRDataset, FashionIQDataset

    out = {"fashioniq": {}, "cirr": {}, "circo": {}}
    ident = lambda im: im  # noqa: E731 - metadata only, no image is loaded
    per_cat = {}
    for cat in ("dress", "shirt", "toptee"):
        g = len(FashionIQDataset(data / "FashionIQ", "val", [cat], "gallery", ident).names)
        per_cat[cat] = {k: _recall_chance(k, g) for k in (10, 50)}
        for k in (10, 50):
            out["fashioniq"][f"{cat}_{k}"] = per_cat[cat][k]
    for k in (10, 50):
        out["fashioniq"][f"average_{k}"] = sum(per_cat[c][k] for c in per_cat) / 3
    g = len(CIRRDataset(data / "CIRR", "val", "gallery", ident).names)
    for k in (1, 5, 10, 50):
        out["cirr"][f"cirr_recall_at{k}"] = _recall_chance(k, g - 1)  # the reference is removed
    for k in (1, 2, 3):
        out["cirr"][f"cirr_group_recall_at{k}"] = 100.0 * k / 5
    gallery = len(CIRCODataset(data / "CIRCO", "val", "gallery", ident).names)
    queries = CIRCODataset(data / "CIRCO", "val", "query", ident).queries
    for k in (5, 10, 25, 50):
        out["circo"][f"circo_recall_at{k}"] = _recall_chance(k, gallery)
        out["circo"][f"circo_map_at{k}"] = sum(_ap_chance(k, len([i for i in q["gt_img_ids"] if i]), gallery)
                                              for q in queries) / len(queries)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="output folder (replaced on rerun)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--num-train-images", type=int, default=256, help="toy ImageNet images to train on")
    p.add_argument("--num-queries", type=int, default=16, help="toy queries per benchmark split (and FashionIQ category)")
    p.add_argument("--num-distractors", type=int, default=20,
                   help="extra toy gallery images per split (20: CIRR test1 lists reach the full 50 names)")
    p.add_argument("--examples", type=int, default=4, help="queries drawn per benchmark in the example grids")
    p.add_argument("--clip-model", default="ViT-L/14", help="CLIP architecture when --clip-weights is given")
    p.add_argument("--clip-weights", default=None, help="a real CLIP file instead of the built-in tiny random one")
    p.add_argument("--device", default="cpu", help="torch device for every step")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy world and the training run")
    args = p.parse_args(argv)

    t0 = time.time()
    out = args.out.resolve()
    if out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise SystemExit(f"{out} exists and was not made by the demo; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by scripts/demo.py; replaced on every run\n")
    log = out / "demo.log"
    py = sys.executable
    data, model_dir, evals, subs, cache = out / "data", out / "model", out / "eval", out / "submissions", out / "cache"

    print(f"[1/5] toy world -> {data}")
    run([py, "scripts/make_toy_data.py", "--out", str(data), "--seed", str(args.seed),
         "--num-train-images", str(args.num_train_images), "--num-queries", str(args.num_queries),
         "--num-distractors", str(args.num_distractors)], log)

    if args.clip_weights:
        clip_flags = ["--clip-model", args.clip_model, "--clip-weights", str(Path(args.clip_weights).resolve())]
    else:
        from clip_loader import save_tiny_clip

        tiny = save_tiny_clip(out / "clip" / "tiny_clip.pt", seed=args.seed)
        print(f"\ntiny random CLIP (OpenAI layout, image size 32) -> {tiny}")
        clip_flags = ["--clip-weights", str(tiny)]
    common = clip_flags + ["--device", args.device, "--workers", "0"]

    print(f"\n[2/5] training -> {model_dir}")
    run([py, "src/train.py", "--imagenet-path", str(data / "ImageNet"), "--pairs-path", str(data / "ImageNet" / "pairs.json"),
         "--model-dir", str(model_dir), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
         "--save-frequency", "1", "--lr", "1e-3", "--seed", str(args.seed), "--precision", "fp32", "--no-progress"]
        + common, log)
    checkpoint = model_dir / "checkpoints" / f"epoch_{args.epochs}.pt"

    roots = {"fashioniq": ("--fashioniq-path", data / "FashionIQ"), "cirr": ("--cirr-path", data / "CIRR"),
             "circo": ("--circo-path", data / "CIRCO")}
    print(f"\n[3/5] validation metrics -> {evals}")
    for name, (flag, root) in roots.items():
        run([py, "src/evaluate.py", "--dataset", name, flag, str(root), "--model-path", str(checkpoint),
             "--save-path", str(evals), "--cache-dir", str(cache), "--batch-size", "16", "--no-progress",
             "--save-examples", str(args.examples)] + common, log)
    print(f"\n[4/5] test-server submissions -> {subs}")
    for name in ("cirr", "circo"):
        flag, root = roots[name]
        run([py, "src/test.py", "--dataset", name, flag, str(root), "--model-path", str(checkpoint),
             "--save-path", str(subs), "--cache-dir", str(cache), "--batch-size", "16", "--no-progress"] + common, log)

    print("\n[5/5] results (percent; a toy world with a tiny random CLIP: compare with chance, not with the paper)")
    chance = chance_levels(data)
    results = {}
    for name in roots:
        metrics = json.loads((evals / f"metrics_{name}.json").read_text())
        results[name] = metrics
        print(f"  {name}")
        for key, value in metrics.items():
            c = chance[name].get(key)
            print(f"    {key:<24s} {value:7.2f}   (chance {c:6.2f})" if c is not None else f"    {key:<24s} {value:7.2f}")
    pngs = sorted(evals.glob("**/*.png"))
    print("\nwhere everything went:")
    print(f"  toy data          {data}")
    print(f"  checkpoints       {model_dir / 'checkpoints'} (latest.pt, epoch_N.pt)")
    print(f"  hyper-parameters  {model_dir / 'hyperparameters.json'}")
    print(f"  TensorBoard       tensorboard --logdir {model_dir / 'tensorboard'}")
    print(f"  metrics           {evals}/metrics_<dataset>.json")
    print(f"  submissions       {subs / 'cirr'}/cirr.json, subset_cirr.json; {subs / 'circo'}/circo.json")
    for png in pngs:
        print(f"  examples          {png}")
    print(f"  full log          {log}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    summary = {"metrics": results, "chance": chance, "checkpoint": str(checkpoint), "examples": [str(p) for p in pngs]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
