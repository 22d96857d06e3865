"""One unattended run for a GPU node: every CUDA path of the repository at toy scale, then the speed of
this repository's training step and composed queries at the real size (random ViT-L/14 weights, batch
256). Each part runs under its own timeout; a part that fails is recorded and the next one runs.

    bash scripts/gpu_check.sh          # CUDA (a machine without CUDA runs it as --cpu)
    bash scripts/gpu_check.sh --cpu    # the same paths on the CPU, CUDA-only ones skipped; speed with the tiny CLIP

Outputs in --out ($OUT in gpu_check.sh, default ./gpu_check_out); summary.json is rewritten as parts end:
- summary.json: device, torch, cuda, date, paths (name -> "ok", "skipped: no CUDA" or the last line of
  the error), speed (name -> number or null), notes, seconds, and each path's seconds;
- paths.log: every path's commands with their full output; speed.log: the speed part's;
- circo_eval.json: what scripts/bench_eval.py measured.

The toy world (scripts/make_toy_data.py) and a tiny random CLIP are built once in a temporary folder.
Every command is a child process in a process group of its own, killed whole at its timeout (torchrun
and DataLoader workers have children). The exit status is 0 once the summary is written.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from gpu_speed import SPEED_KEYS, last_line

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SKIPPED = "skipped: no CUDA"
# on CUDA, kept for the speed part at the end of --time-limit (on an H200 the figures took 60 s, the CIRCO
# evaluation 38 s, with every compile included)
SPEED_SECONDS = 190
EVAL_SECONDS = 90  # of which the warm CIRCO evaluation (scripts/bench_eval.py) keeps this much
# several scripts' main(argv) in one process, one after the other (open_clip's slow import paid once):
# argv[1] is a JSON list of [module, argv]; a failing main ends the process with its message
CHAIN = ("import importlib, json, sys\nsys.path[:0] = ['src', 'scripts']\n"
         "for module, argv in json.loads(sys.argv[1]):\n    importlib.import_module(module).main(argv)\n")
TF32_CHAIN = "import torch\ntorch.backends.fp32_precision = 'tf32'\n" + CHAIN  # TF32 set through the new API
# writes a randomly initialised BLIP with a small vocabulary to argv[1], then runs caption.main(argv[2:])
TINY_BLIP = """
import sys, torch
from pathlib import Path
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
words = "[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] a picture of red blue green square circle dress on with small the".split()
(folder / "vocab.txt").write_text("\\n".join(words) + "\\n")
i = {w: k for k, w in enumerate(words)}
size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
text = dict(size, vocab_size=len(words), encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=i["[DEC]"],
            pad_token_id=i["[PAD]"], sep_token_id=i["[SEP]"], eos_token_id=i["[SEP]"], initializer_range=0.3)
torch.manual_seed(0)
config = BlipConfig(text_config=text, vision_config=dict(size, image_size=32, patch_size=16, initializer_range=0.5),
                    projection_dim=32, image_text_hidden_size=32)
BlipForConditionalGeneration(config).eval().save_pretrained(folder)
BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]").save_pretrained(folder)
sys.path[:0] = ["src"]
import caption
caption.main(sys.argv[2:])
"""
LIVE: set = set()  # the running children: a stop of this script ends their process groups too


class Failed(Exception):
    """A path's verdict other than "ok": the line summary.json keeps."""


class Ctx:
    """Where the check runs: the device, the work folder and what is built in it, the deadline."""

    def __init__(self, cuda: bool, work: Path, deadline: float, env: dict):
        self.cuda, self.work, self.deadline, self.env = cuda, work, deadline, env
        self.device = "cuda" if cuda else "cpu"
        self.gpus = torch.cuda.device_count() if cuda else 0
        self.toy, self.clip = work / "toy", work / "tiny_clip.pt"
        self.checkpoint = work / "models" / "train_fp32" / "checkpoints" / "latest.pt"  # the evaluations' model
        self.logs: dict[str, list[str]] = {}  # path name -> its commands with their output


def spawn(ctx: Ctx, argv: list, out) -> subprocess.Popen:
    proc = subprocess.Popen([str(a) for a in argv], cwd=REPO, env=ctx.env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)  # a process group of its own
    LIVE.add(proc)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also after a normal exit: children may outlive their parent
    except (ProcessLookupError, PermissionError):
        pass


def finish(ctx: Ctx, name: str, proc, out, argv: list, timeout: float, t0: float) -> tuple[int, str]:
    """Waits for `proc`, killing its group at the timeout (or the deadline); logs it; (exit status, output)."""
    try:
        rc = proc.wait(timeout=max(1.0, min(timeout, ctx.deadline - time.time())))
    except subprocess.TimeoutExpired:
        rc = None
    kill_group(proc)
    status = proc.wait()
    LIVE.discard(proc)
    out.seek(0)
    text = out.read().decode(errors="replace")
    out.close()
    shown = " ".join(shlex.quote(str(a)) for a in argv)
    ctx.logs.setdefault(name, []).append(f"$ {shown}\n[exit status {status}, {time.time() - t0:.1f} s]\n{text}")
    if rc is None:
        raise Failed(f"timed out after {time.time() - t0:.0f} s: {last_line(text)}")
    return rc, text


def run(ctx: Ctx, name: str, argv: list, timeout: float) -> str:
    """Runs a command to its end; Failed with its last output line unless it exits 0."""
    if time.time() >= ctx.deadline:
        raise Failed("not run: the check's time limit was reached")
    out, t0 = tempfile.TemporaryFile(dir=ctx.work), time.time()
    rc, text = finish(ctx, name, spawn(ctx, argv, out), out, argv, timeout, t0)
    if rc != 0:
        raise Failed(last_line(text))
    return text


def chain(ctx: Ctx, name: str, steps: list, timeout: float, code: str = CHAIN) -> str:
    return run(ctx, name, [PY, "-c", code, json.dumps([[m, [str(a) for a in argv]] for m, argv in steps])], timeout)


def logged_steps(model_dir: Path) -> list[int]:
    path = model_dir / "train_log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["global_step"] for line in lines if line.strip().endswith("}")]  # not a half-written one


# ---------------------------------------------------------------------------------------------
# the paths at toy scale: each returns when it worked and raises Failed otherwise

def train_argv(ctx: Ctx, name: str, *extra, steps: int = 6, batch: int = 0, precision: str = "fp16") -> list:
    # fp16 on the CPU: train.py's own fallback to fp32 (with a notice) is what runs; batches of 16 there,
    # as CPU bf16 runs a few images a second
    batch = batch or (32 if ctx.cuda else 16)
    return [PY, "src/train.py", "--imagenet-path", ctx.toy / "ImageNet", "--clip-weights", ctx.clip,
            "--model-dir", ctx.work / "models" / name, "--device", ctx.device, "--workers", 2, "--no-progress",
            "--batch-size", batch, "--max-steps", steps, "--seed", 0, "--precision", precision,
            "--feature-cache-dir", ctx.work / "features" / name, *extra]


def check_trained(ctx: Ctx, name: str, steps: int) -> None:
    model_dir = ctx.work / "models" / name
    if not (model_dir / "checkpoints" / "latest.pt").is_file():
        raise Failed(f"no checkpoints/latest.pt in {model_dir}")
    done = max(logged_steps(model_dir), default=0)
    if done != steps:
        raise Failed(f"train_log.jsonl ends at global step {done}, expected {steps}")


def train_path(precision: str, *extra):
    def path(ctx: Ctx, name: str) -> None:
        run(ctx, name, train_argv(ctx, name, *extra, precision=precision), 180)
        check_trained(ctx, name, 6)
    return path


def train_sigterm_resume(ctx: Ctx, name: str) -> None:
    model_dir = ctx.work / "models" / name
    argv = train_argv(ctx, name, "--epochs", 1000, steps=0)  # no step limit: only the signal ends it
    out, t0 = tempfile.TemporaryFile(dir=ctx.work), time.time()
    proc = spawn(ctx, argv, out)
    while proc.poll() is None and not logged_steps(model_dir) and time.time() - t0 < 150:
        time.sleep(0.2)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # to the trainer alone, as a scheduler's pre-emption does
    rc, text = finish(ctx, name, proc, out, argv, 90, t0)
    if rc != 143:
        raise Failed(f"exit status {rc} after SIGTERM (expected 143): {last_line(text)}")
    if not (model_dir / "checkpoints" / "latest.pt").is_file():
        raise Failed("SIGTERM left no checkpoints/latest.pt")
    stopped = max(logged_steps(model_dir))
    run(ctx, name, train_argv(ctx, name, "--epochs", 1000, "--resume", "latest", steps=stopped + 3), 150)
    check_trained(ctx, name, stopped + 3)


def train_cached(ctx: Ctx, name: str) -> None:
    # two epochs of batches of 64: the first stores (g, P), the second reads them back
    run(ctx, name, train_argv(ctx, name, "--cache-image-features", "--epochs", 2, steps=0, batch=64), 180)
    if not (ctx.work / "models" / name / "checkpoints" / "epoch_2.pt").is_file():
        raise Failed("no checkpoints/epoch_2.pt after 2 epochs")
    if not any((ctx.work / "features" / name).rglob("*")):
        raise Failed("--cache-image-features wrote no cache")


def torchrun(ctx: Ctx, name: str) -> None:
    argv = train_argv(ctx, name)
    run(ctx, name, [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ctx.gpus}", *argv[1:]], 240)
    check_trained(ctx, name, 6)


def eval_flags(ctx: Ctx, folder: str) -> list:
    return ["--clip-weights", ctx.clip, "--model-path", ctx.checkpoint, "--device", ctx.device, "--workers", 2,
            "--no-progress", "--save-path", ctx.work / folder, "--cache-dir", ctx.work / f"cache_{folder}"]


def scripts_path(module: str, runs: list, files: list):
    """A path that runs `module` once per (dataset, extra flags) in one process and expects `files`."""
    def path(ctx: Ctx, name: str) -> None:
        roots = {"cirr": ctx.toy / "CIRR", "circo": ctx.toy / "CIRCO", "fashioniq": ctx.toy / "FashionIQ"}
        chain(ctx, name, [(module, ["--dataset", d, f"--{d}-path", roots[d], *extra, *eval_flags(ctx, name)])
                          for d, extra in runs], 180)
        missing = [f for f in files if not (ctx.work / name / f).is_file()]
        if missing:
            raise Failed(f"{module}.py wrote no {', '.join(missing)}")
    return path


def retrieve(ctx: Ctx, name: str) -> None:
    gallery = ctx.toy / "CIRCO" / "COCO2017_unlabeled" / "unlabeled2017"
    run(ctx, name, [PY, "src/retrieve.py", "--gallery", gallery, "--reference", sorted(gallery.iterdir())[0],
                    "--text", "is red instead", "--top", 5, *eval_flags(ctx, name)], 120)
    results = json.loads((ctx.work / name / "results.json").read_text())
    if [len(q["results"]) for q in results["queries"]] != [5]:
        raise Failed("results.json does not hold one query with 5 results")


def caption(ctx: Ctx, name: str) -> None:
    # --caption-only: splitting the captions needs spaCy's English model, which a bare node may lack
    out = ctx.work / "caption" / "pairs.json"
    run(ctx, name, [PY, "-c", TINY_BLIP, ctx.work / "blip", "--imagenet-path", ctx.toy / "ImageNet", "--out", out,
                    "--blip-model", ctx.work / "blip", "--image-size", 32, "--batch-size", 4, "--workers", 2,
                    "--device", ctx.device, "--max-length", 16, "--limit", 8, "--caption-only"], 180)
    progress = out.with_name(out.name + ".partial.jsonl")
    if not progress.is_file() or len(progress.read_text().splitlines()) != 8:
        raise Failed(f"{progress.name} does not hold 8 captions")


def tf32_new_api(ctx: Ctx, name: str) -> None:
    chain(ctx, name, [("evaluate", ["--dataset", "cirr", "--cirr-path", ctx.toy / "CIRR", *eval_flags(ctx, name)])],
          150, TF32_CHAIN)
    plain = json.loads((ctx.work / "evaluate" / "metrics_cirr.json").read_text())
    tf32 = json.loads((ctx.work / name / "metrics_cirr.json").read_text())
    if plain != tf32:
        diff = [f"{k} {plain.get(k)} vs {tf32.get(k)}" for k in sorted(set(plain) | set(tf32)) if plain.get(k) != tf32.get(k)]
        raise Failed("fp32 metrics after fp32_precision = 'tf32' differ from the plain evaluation's: " + "; ".join(diff))


# (name, function, CUDA only, the paths it needs), in the order they start: what others need first
PATHS = [("train_fp32", train_path("fp32"), False, ()),
         ("train_sigterm_resume", train_sigterm_resume, False, ()),
         ("train_fp16", train_path("fp16"), True, ()),
         ("train_bf16", train_path("bf16"), False, ()),
         ("train_cached", train_cached, False, ()),
         ("torchrun", torchrun, True, ()),  # over NCCL
         ("caption", caption, False, ()),
         ("train_compile", train_path("fp16", "--compile"), True, ()),  # the CPU's compile: tests/test_gpu_readiness.py
         ("evaluate", scripts_path("evaluate", [("cirr", []), ("circo", []), ("fashioniq", ["--categories", "dress"])],
                                   ["metrics_cirr.json", "metrics_circo.json", "metrics_fashioniq.json"]), False, ("train_fp32",)),
         ("test", scripts_path("test", [("cirr", []), ("circo", [])],
                               ["cirr/cirr.json", "cirr/subset_cirr.json", "circo/circo.json"]), False, ("train_fp32",)),
         ("retrieve", retrieve, False, ("train_fp32",)),
         ("tf32_new_api", tf32_new_api, True, ("evaluate",))]


def run_paths(ctx: Ctx, jobs: int, report) -> None:
    """Runs PATHS, `jobs` at a time, each once the paths it needs are done; report(name, verdict, seconds)."""
    verdicts: dict[str, str] = {}
    pending = []
    for name, fn, cuda_only, needs in PATHS:
        if cuda_only and not ctx.cuda:
            verdicts[name] = SKIPPED
            report(name, SKIPPED, 0.0)
        else:
            pending.append((name, fn, needs))

    def one(name, fn):
        t0 = time.time()
        try:
            fn(ctx, name)
            verdict = "ok"
        except Failed as e:
            verdict = str(e)
        except Exception as e:  # one of this script's own checks broke: that path's verdict, the run goes on
            verdict = f"{type(e).__name__}: {e}"
        return name, verdict, time.time() - t0

    running = set()
    with cf.ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            for item in list(pending):
                name, fn, needs = item
                if len(running) < jobs and all(verdicts.get(n) == "ok" for n in needs):
                    pending.remove(item)
                    running.add(pool.submit(one, name, fn))
                elif any(n in verdicts and verdicts[n] != "ok" for n in needs) or not running:
                    pending.remove(item)  # what it needs failed (or never runs): no point starting it
                    verdicts[name] = f"not run: {', '.join(needs)} did not pass"
                    report(name, verdicts[name], 0.0)
            if running:
                done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    name, verdict, seconds = future.result()
                    verdicts[name] = verdict
                    report(name, verdict, seconds)


def speed_part(ctx: Ctx, out: Path, merge) -> None:
    """speed_figures in a process of its own (ViT-L/14 on CUDA, the tiny CLIP on the CPU), then a warm
    CIRCO-sized evaluation through scripts/bench_eval.py's command line; merge(speed, notes) records them."""
    figures = ctx.work / "speed.json"
    options = (dict(clip_model="ViT-L-14", batch=256, repeats=5, warmup=2, profile=str(out / "profile.txt"))
               if ctx.cuda else dict(clip_model="tiny", batch=8, repeats=2, warmup=1))
    argv = [PY, "scripts/gpu_speed.py", figures, json.dumps(dict(options, device=ctx.device))]
    if not ctx.cuda:
        merge({}, ["CPU run: the speed figures are the tiny CLIP at batch 8 (fp32 where CUDA runs fp16; the peaks "
                   "are the process's peak resident memory) and a 1,200-image CIRCO gallery of 64-float features, "
                   "measured while the paths ran: they show that the speed code runs, they are not figures of the step"])
    try:  # the CIRCO evaluation after it keeps EVAL_SECONDS of what is left
        run(ctx, "speed", argv, max(60.0, ctx.deadline - time.time() - EVAL_SECONDS))
    except Failed as e:
        merge({}, [f"speed figures stopped: {e}"])
    if figures.is_file():  # what was measured before a failure or a timeout too
        measured = json.loads(figures.read_text())
        merge(measured["speed"], measured["notes"], measured["checks"])
    eval_json = out / "circo_eval.json"
    argv = [PY, "scripts/bench_eval.py", "--device", ctx.device, "--json", eval_json,
            *(["--repeats", 2, "--workers", 8] if ctx.cuda else
              ["--repeats", 1, "--workers", 0, "--gallery-size", 1200, "--dim", 64])]
    try:
        run(ctx, "speed", argv, 240)
        merge({"circo_warm_eval_s": json.loads(eval_json.read_text())["warm_median_s"]}, [])
    except (Failed, OSError, KeyError, ValueError) as e:
        merge({}, [f"circo_warm_eval_s: null: scripts/bench_eval.py: {e}"])
    (out / "speed.log").write_text("\n".join(ctx.logs.get("speed", [])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU (CUDA-only paths skipped)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"), help="output folder")
    p.add_argument("--jobs", type=int, default=None, help="paths run at once (default 4 on CUDA, 2 on the CPU)")
    p.add_argument("--time-limit", type=float, default=540.0,
                   help="seconds for the whole check: a command still running then is stopped (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (toy world, models, outputs)")
    args = p.parse_args(argv)
    t0 = time.time()
    cuda = torch.cuda.is_available() and not args.cpu
    notes: list[str] = []
    if not args.cpu and not cuda:
        print("no CUDA device here: running as --cpu", flush=True)
        notes.append("no CUDA device: ran as --cpu")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "paths.log", "speed.log", "circo_eval.json", "profile.txt"):  # a rerun replaces them
        (out / name).unlink(missing_ok=True)
    summary = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
               "cuda": torch.version.cuda if cuda else None,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "paths": {}, "speed": dict.fromkeys(SPEED_KEYS), "checks": {}, "notes": notes, "seconds": 0.0,
               "path_seconds": {}}
    lock = threading.Lock()

    def write() -> None:
        with lock:
            summary["seconds"] = round(time.time() - t0, 1)
            (out / "summary.json.tmp").write_text(json.dumps(summary, indent=1))
            (out / "summary.json.tmp").replace(out / "summary.json")

    write()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    jobs = args.jobs or (4 if cuda else 2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if not cuda:  # the jobs share the cores instead of each taking all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    # CUDA: the speed part runs alone after the paths, in the last SPEED_SECONDS of the time limit; the CPU's
    # speed figures mean nothing, so there it runs beside the paths
    ctx = Ctx(cuda, work, t0 + args.time_limit - (SPEED_SECONDS if cuda else 0), env)
    sizes = [512, 40, 40] if cuda else [256, 24, 24]  # a smaller toy world on the CPU, the same paths

    def stop(signum, frame):
        for proc in list(LIVE):
            kill_group(proc)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def report(name: str, verdict: str, seconds: float) -> None:
        with lock:
            summary["paths"][name], summary["path_seconds"][name] = verdict, round(seconds, 1)
            with open(out / "paths.log", "a") as f:
                f.write(f"\n===== {name}: {verdict} ({seconds:.1f} s)\n" + "\n".join(ctx.logs.get(name, [])))
        print(f"[{time.time() - t0:6.1f} s] {name}: {verdict} ({seconds:.1f} s)", flush=True)
        write()

    def merge(speed: dict, more_notes: list, checks: dict | None = None) -> None:
        with lock:
            summary["speed"].update(speed)
            summary["checks"].update(checks or {})
            notes.extend(more_notes)
        write()

    print(f"gpu_check on {summary['device']} (torch {summary['torch']}), {jobs} paths at a time; work folder {work}",
          flush=True)
    speed = threading.Thread(target=speed_part, args=(ctx, out, merge))
    try:
        if not cuda:
            speed.start()
        t = time.time()
        try:
            run(ctx, "toy_world", [PY, "-c", "import sys\nsys.path[:0] = ['src', 'scripts']\nimport make_toy_data\n"
                                   "from toy.tiny_clip import save_tiny_clip\nsave_tiny_clip(sys.argv[1])\n"
                                   "make_toy_data.main(sys.argv[2:])", ctx.clip, "--out", ctx.toy,
                                   "--num-train-images", sizes[0], "--num-queries", sizes[1],
                                   "--num-distractors", sizes[2]], 180)
            report("toy_world", "ok", time.time() - t)
            run_paths(ctx, jobs, report)
        except Failed as e:
            report("toy_world", str(e), time.time() - t)
            for name, _, cuda_only, _ in PATHS:
                report(name, SKIPPED if cuda_only and not cuda else "not run: toy_world failed", 0.0)
        if cuda:
            print(f"[{time.time() - t0:6.1f} s] speed figures (ViT-L/14, batch 256)", flush=True)
            ctx.deadline = t0 + args.time_limit
            speed.start()
        speed.join()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for key, value in summary["speed"].items():
        print(f"  {key}: {value}")
    write()
    bad = [n for n, v in summary["paths"].items() if v != "ok" and not v.startswith("skipped")]
    print(f"gpu_check done in {summary['seconds']:.0f} s: {len(summary['paths']) - len(bad)} of {len(summary['paths'])} "
          f"paths ok or skipped{'; not ok: ' + ', '.join(bad) if bad else ''}; summary in {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
