"""The speed part of scripts/gpu_check.py, in a process of its own: this repository's training step and
composed queries timed on the device, then the speed options added one by one, and a profile of the
default step.

    python scripts/gpu_speed.py FILE JSON    # speed_figures(**JSON); FILE rewritten after each figure

gpu_check.py runs it with ViT-L/14 at batch 256 on CUDA and with the tiny CLIP on the CPU.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SPEED_KEYS = ("train_fp16_images_per_s", "train_bf16_images_per_s", "train_compile_images_per_s",
              "train_fast_images_per_s", "train_cached_images_per_s", "train_peak_gib", "train_fast_peak_gib",
              "compose_cached_images_per_s", "compose_images_per_s", "circo_warm_eval_s")
COMPOSE_BATCH = 32  # composed queries: the evaluation scripts' default batch


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# ---------------------------------------------------------------------------------------------
# the speed figures: one process, CLIP built once, each figure on its own (an error is noted, the rest go on)

def speed_figures(device: torch.device, clip_model: str, batch: int, repeats: int, warmup: int, save,
                  profile: str | None = None) -> None:
    """This repository's training step (`training.training_step`, the step train.py runs, fed batches
    already on the device) and composed queries, CUDA-synchronised, median of `repeats` after `warmup`
    calls; then the speed options added one by one. save(speed, notes, checks) after each figure."""
    import numpy as np

    import bench
    import training
    from datasets import combine_text_features
    from models import FTI4CIR

    speed, notes, checks = {k: None for k in SPEED_KEYS if k != "circo_warm_eval_s"}, [], {}
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    clip = bench.build_clip(clip_model, device)
    with torch.no_grad():  # random weights rounded to fp16 values, as OpenAI ships CLIP (--clip-half keeps them exactly)
        for t in clip.model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    net = FTI4CIR.for_clip(clip).to(device)
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, device=device)
    subjects, attributes = bench.captions(np.random.default_rng(0), batch)
    texts = {k: v.to(device) for k, v in clip.prompts.training_texts(subjects, attributes).items()}
    train_batch = {"image": images, "texts": texts}
    fp16 = "fp16" if cuda else "fp32"  # fp16 needs CUDA; the CPU's "fp16" figure is fp32

    def trainer(precision: str, fused: bool = False, features=None):
        run = training.step_only_run(clip, net, device, precision, fused_adamw=fused)
        if features is not None:
            run.features = features
        net.train()
        return lambda: training.training_step(run, train_batch)

    def per_s(fn, n=batch):
        t, _ = bench.timed(fn, device, repeats, warmup)
        return n / t

    def with_peak(fn, key):
        bench.reset_mem(device)
        value = per_s(fn)
        speed[key] = bench.peak_mem(device)
        return value

    g_ref, P_ref = (x[:COMPOSE_BATCH] for x in clip.encode_visual(images[:COMPOSE_BATCH]))  # --cache-reference-tokens
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
        g16, P16 = (x.half() for x in clip.encode_visual(images))  # what --cache-image-features stores
    queries = [(f"{s} {a}",) for s, a in zip(subjects, attributes)][:COMPOSE_BATCH]

    def compose(from_tokens: bool):
        def one():
            with torch.no_grad():
                g, P = (g_ref, P_ref) if from_tokens else clip.encode_visual(images[:COMPOSE_BATCH])
                return combine_text_features(net.compose(clip, g, P, queries))
        net.eval()
        return one

    class CachedFeatures:
        """The step's image features as the cache gives them (fp16 rows, no visual pass), nothing stored."""
        failed = False  # training reads it into the step's flags

        def __call__(self, b):
            return g16.float(), P16.float()

    def first_loss(precision: str) -> float:
        """One forward of the step's loss on the batch, dropout off (for the options' equality checks)."""
        net.eval()
        with torch.no_grad(), training.prec.autocast(precision, device):
            g, P = clip.train_visual(images)
            return float(net(clip, g, P, texts)["total"])

    def compile_options():
        eager = first_loss(fp16)
        clip.compile_visual()
        checks["compile_loss_abs_diff"] = abs(first_loss(fp16) - eager)
        return per_s(trainer(fp16))

    def every_option():
        # train.py's order (training.apply_speed_options): the weights are held in half before the compile,
        # which traces them as they then are; the compiled pass of the figure before is dropped first
        torch._dynamo.reset()
        clip.train_visual = clip.encode_visual
        with torch.no_grad(), training.prec.autocast(fp16, device):
            P_plain = clip.encode_visual(images[:8])[1]
        training.apply_speed_options(clip, fp16, compile_visual=cuda, half_visual=cuda, causal_text=True)
        if cuda:
            with torch.no_grad(), training.prec.autocast(fp16, device):
                checks["clip_half_P_max_abs_diff"] = float((clip.encode_visual(images[:8])[1] - P_plain).abs().max())
        return with_peak(trainer(fp16, fused=True), "train_fast_peak_gib")

    def compiled_on_cuda():
        if not cuda:  # inductor's CPU compile of even the tiny tower takes minutes on a small machine
            notes.append("train_compile_images_per_s: null: measured on CUDA only")
            return None
        return compile_options()

    figures = [("compose_cached_images_per_s", lambda: per_s(compose(True), COMPOSE_BATCH)),
               ("compose_images_per_s", lambda: per_s(compose(False), COMPOSE_BATCH)),
               ("train_fp16_images_per_s", lambda: with_peak(trainer(fp16), "train_peak_gib")),
               ("train_bf16_images_per_s", lambda: per_s(trainer("bf16"))),
               # epoch 2 on with --cache-image-features: fp16 g and P already on the device, no visual pass
               ("train_cached_images_per_s", lambda: per_s(trainer(fp16, features=CachedFeatures()))),
               ("train_compile_images_per_s", compiled_on_cuda),  # --compile
               # --compile --clip-half --causal-text-attention --fused-adamw
               ("train_fast_images_per_s", every_option)]
    for key, fn in figures:
        oom = False
        try:
            speed[key] = fn()
            print(f"{key}: {speed[key]} {checks}", flush=True)
        except torch.OutOfMemoryError:
            oom = True
        except Exception as e:
            notes.append(f"{key}: {type(e).__name__}: {last_line(str(e))}")
        if oom:  # freed once the exception no longer holds the failed step's tensors
            notes.append(f"{key}: " + bench.free_after_oom(device, COMPOSE_BATCH if key.startswith("compose") else batch))
        save(speed, notes, checks)
    if profile:
        try:  # the default step: the options off again (the weights were fp16 values, so float() restores them)
            torch._dynamo.reset()
            clip.train_visual = clip.encode_visual
            clip.use_causal_text_attention(False)
            clip.model.visual.float()
            Path(profile).write_text(profile_table(device, trainer(fp16)))
        except Exception as e:
            notes.append(f"profile: {type(e).__name__}: {last_line(str(e))}")
        save(speed, notes, checks)


def profile_table(device: torch.device, step, steps: int = 3) -> str:
    """torch.profiler over `steps` steps of the default training step: the operators by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"{steps} training steps (fp16 on CUDA, the defaults), operators by {key}\n"
            + prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


def main(argv=None) -> int:
    file, options = (sys.argv[1:] if argv is None else argv)
    sys.path[:0] = [str(REPO / "src"), str(REPO / "scripts")]
    file = Path(file)

    def save(speed, notes, checks):
        file.with_suffix(".tmp").write_text(json.dumps({"speed": speed, "notes": notes, "checks": checks}, indent=1))
        file.with_suffix(".tmp").replace(file)
    kwargs = json.loads(options)
    speed_figures(torch.device(kwargs.pop("device")), save=save, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
