"""The training loop of FTI4CIR (METHOD §6-7), behind src/train.py.

Five steps, in the order a run takes them:

- `preflight` (train_config.py): every check that can fail before CLIP is loaded, and the folder's lock;
- `setup`: the frozen CLIP, the network, the image-feature source, loader, optimizer and scaler;
- `restore`: a checkpoint's weights, optimizer, scaler, position and random streams;
- `train_one_epoch`: the steps of one epoch (`training_step` is one of them);
- `end_of_epoch`: save, log the epoch's means, validate (validation.py).

`train(config, info, device)` runs them for a `TrainConfig`, holding the folder's lock (run_folder.py)
and stopping cleanly on SIGTERM / SIGINT
(stop_signals.py): every process finishes the same step, `latest.pt` is written, and the run ends with
exit status 128 + the signal's number. The image features of a batch come from one object, called the
same way with or without `--cache-image-features` (train_features.py).

One step: (g, P) from the frozen visual tower (or the cache) -> the network's loss (`FTI4CIR.forward`)
under autocast -> gradient scaler -> AdamW. Only the network is in DDP; CLIP is passed to it. With N
processes, features are all-gathered with gradient before the contrastive loss, so N processes with
batch B/N train like one process with batch B.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import precision as prec
from checkpoint import capture_rng, checkpoint_summaries, link_or_copy, restore_rng, save_network
from clip_loader import load_clip
from datasets import ImageNetPairsDataset
from distributed import (DistInfo, RankFailed, ResumableDistributedSampler, all_gather_object, all_reduce_mean,
                         every_rank, gather_with_grad, main_only)
from errors import ConfigError, UserError, naming_written_file, write_error
from logs import TrainLog, get_logger
from models import FTI4CIR
from stop_signals import StopOnSignal, ignore_stop_signals
from train_config import (Preflight, TrainConfig, check_resume_clip, check_same_start, forget_failed_start,
                          hparam_differences, preflight, remove_empty_folders, resolved_hparams, run_files_present)
from train_features import CachedTowerFeatures, TowerFeatures, open_feature_cache
from transforms import build_transform
from utils import atomic_write_json, seed_everything, show_progress
from validation import validate

LOSS_KEYS = ("total", "contrastive", "ortho", "reg", "num_attributes")  # the network's loss terms (FTI4CIR.forward)
# each term's name in train_log.jsonl and in TensorBoard, step and epoch alike
LOG_NAMES = {"total": "loss", "contrastive": "loss_contrastive", "ortho": "loss_ortho", "reg": "loss_reg",
             "num_attributes": "num_attributes"}
# fp16 steps whose loss or gradients overflow are skipped, as the gradient scaler does; a run of this many
# in a row means the scale cannot recover, and the run stops
MAX_SKIPPED_STEPS = 20

log = get_logger("training")


class NonFiniteLossError(UserError):
    """A training step gave a NaN or infinite loss; the update was not applied."""


def non_finite_message(run: "Run", stats: list[float]) -> str:
    """What went wrong, which checkpoints there are with the loss each was saved at, and what to change.
    The step in question was skipped: its update was never applied."""
    pos, config = run.position, run.config
    saved = checkpoint_summaries(run.ckpt_dir)
    listed = "; ".join(f"{s['path']} (global step {s.get('global_step', '?')}, loss "
                       + (f"{s['loss']:.4g})" if isinstance(s.get("loss"), float) else "not recorded)")
                       for s in saved[:4]) or "none yet"
    what = "non-finite loss" if not all(math.isfinite(x) for x in stats) else "non-finite gradients"
    streak = f" (the {run.skipped_in_a_row}th fp16 step in a row skipped)" if run.skipped_in_a_row > 1 else ""
    return (f"{what} at epoch {pos.epoch + 1}, global step {pos.global_step + 1}{streak}: "
            + ", ".join(f"{k} {v}" for k, v in zip(LOSS_KEYS, stats))
            + f". Stopped before that update; no weights were written. Checkpoints, newest first: {listed}. Resume from one whose loss looks sane with --resume PATH, and lower --lr (now "
            f"{config.lr:g})" + (" or train with --precision bf16 or fp32" if run.precision == "fp16" else ""))


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16: the authors' dynamic loss scaling. bf16 / fp32: a scaler held at 1.0 (multiplying by 1 is exact,
    so the numbers are those of a plain step), kept for its check: a step whose gradients are not finite is
    skipped on the device, without reading the loss back before the update."""
    if prec.uses_grad_scaler(precision):
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**31 - 1)  # never grows


def make_optimizer(net: torch.nn.Module, lr: float, wd: float, fused: bool) -> torch.optim.AdamW:
    """AdamW (the authors'); `fused`: one kernel for every parameter, equal up to float rounding, and with the
    fp16 scaler it needs no host read to skip an overflowing step."""
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd, fused=True if fused else None)


def use_deterministic_algorithms() -> None:
    """--deterministic: PyTorch's deterministic kernels (cuBLAS with a fixed workspace, no atomics in the
    backward of gather/scatter or attention), so two CUDA runs match bit for bit; slower."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: set before any GPU work
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def apply_speed_options(clip, precision: str, *, compile_visual: bool, half_visual: bool, causal_text: bool) -> None:
    """The frozen CLIP's speed options (docs/PERFORMANCE.md)."""
    if half_visual:
        if precision == "fp32":
            raise ConfigError("--clip-half holds the frozen visual tower in the autocast type: pass --precision fp16 or bf16")
        clip.hold_visual_weights_in(prec.DTYPES[precision])
    if causal_text:
        clip.use_causal_text_attention()
    if compile_visual:
        clip.compile_visual()


def close_loader(loader: DataLoader) -> None:
    """Ends the loader's worker processes now, however training ended. They ignore SIGTERM (stop_signals.py),
    so leaving them to the interpreter's exit hook, which terminates and then joins them, would hang the
    process; a worker that does not take the shutdown message is killed."""
    it = getattr(loader, "_iterator", None)
    if it is None:
        return
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in getattr(it, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)
    loader._iterator = None


def learning_rate(epoch: int, lr: float, lr_decay: int, lr_div: float) -> float:
    """METHOD §7: lr for 0-based epoch `epoch`; multiplied by lr_div once, from epoch index lr_decay on."""
    return lr * lr_div if epoch >= lr_decay else lr


# ---------------------------------------------------------------------------------------------
# set-up

@dataclass
class Position:
    """Where training stands: `epoch` (0-based, the epoch in progress), samples of it done (all
    processes together), optimisation steps done, the newest checkpoint written or resumed from."""

    epoch: int = 0
    samples_in_epoch: int = 0
    global_step: int = 0
    last_checkpoint: Path | None = None


@dataclass
class Run:
    """Everything one training run works with."""

    config: TrainConfig | None  # None: a step-only run (`step_only_run`)
    info: DistInfo
    device: torch.device
    precision: str
    dataset: ImageNetPairsDataset
    clip: object
    net: FTI4CIR
    features: TowerFeatures
    sampler: ResumableDistributedSampler
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    hparams: dict
    position: Position = field(default_factory=Position)
    model: torch.nn.Module | None = None  # the network, DDP-wrapped with several processes
    train_log: TrainLog | None = None
    stop: StopOnSignal | None = None  # set while the epochs run
    last_loss: float | None = None  # the total loss of the newest step, recorded in checkpoints
    flags: torch.Tensor | None = None  # [stop asked, rank-0 failure], on the device, carried by each step's all-reduce
    grad_scale: float = 1.0  # the scaler's scale after the newest step (it drops when a step is skipped)
    skipped_in_a_row: int = 0
    pending_error: BaseException | None = None  # a rank-0 failure between two steps, raised on every rank together
    val_root: Path | None = None  # --val-dataset's root folder
    data: dict | None = None  # the training pairs' fingerprint (train_config.data_fingerprint), recorded in checkpoints

    @property
    def model_dir(self) -> Path:
        return Path(self.config.model_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.config.ckpt_dir

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def world(self) -> int:
        return self.info.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.num_samples // self.batch_size


def setup(config: TrainConfig, info: DistInfo, device: torch.device, checked: Preflight) -> Run:
    """Everything a run needs, after `preflight` has checked the flags and files: the slow CLIP load,
    the network, the feature source, the loader, the optimizer."""
    precision, dataset = checked.precision, checked.dataset
    # collective: a node that lacks the weights (offline, another cache) stops every rank, not itself alone
    clip = every_rank(info, lambda: load_clip(config.clip_model, config.clip_weights, device=device,
                                              clip_format=config.clip_format, pretrained=config.clip_pretrained),
                      "loading CLIP")
    apply_speed_options(clip, precision, compile_visual=config.compile, half_visual=config.clip_half,
                        causal_text=config.causal_text_attention)
    dataset.preprocess = build_transform(config.preprocess_type, clip.image_size)
    seed_everything(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = FTI4CIR.for_clip(clip, num_k=config.num_k, topk=config.topk, epsilon=config.epsilon,
                           temperature=config.temperature, reg_weight=config.reg_weight, tf_layer=config.tf_layer,
                           tf_head=config.tf_head, mapper_dropout=config.mapper_dropout,
                           ablation=config.ablation).to(device)
    if config.cache_image_features:
        cache = open_feature_cache(config.feature_cache_dir, clip, dataset, precision, info, config.cache_hash_images)
        features = CachedTowerFeatures(clip, device, precision, cache)
    else:
        features = TowerFeatures(clip, device, precision)
    sampler = ResumableDistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, seed=config.seed)
    loader = DataLoader(features.wrap_dataset(dataset), batch_size=config.batch_size, sampler=sampler,
                        num_workers=config.workers, drop_last=True, collate_fn=features.collate(clip.prompts),
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                        # its own generator: creating an epoch's iterator must not draw from the global RNG,
                        # or a resumed run's dropout masks would differ from an uninterrupted run's
                        generator=torch.Generator().manual_seed(config.seed + info.rank),
                        persistent_workers=config.workers > 0)
    optimizer = make_optimizer(net, config.lr, config.wd, config.fused_adamw)
    scaler = make_scaler(precision, device)
    hparams = resolved_hparams(config, net, clip, info, device, precision)
    run = Run(config, info, device, precision, dataset, clip, net, features, sampler, loader, optimizer, scaler, hparams,
              val_root=checked.val_root, data=checked.data)
    run.flags = torch.zeros(2, device=device)
    run.grad_scale = scaler.get_scale()
    return run


def step_only_run(clip, net, device: torch.device, precision: str, *, fused_adamw: bool = False, lr: float = 4e-5,
                  wd: float = 0.01) -> Run:
    """A Run that `training_step` can take, without data, loader or output folder: a benchmark feeds it
    batches of {"image", "texts"} already on the device, through the same step a training run takes."""
    optimizer = make_optimizer(net, lr, wd, fused_adamw)
    scaler = make_scaler(precision, device)
    run = Run(None, DistInfo(), device, precision, None, clip, net, TowerFeatures(clip, device, precision), None, None,
              optimizer, scaler, {}, model=net)
    run.flags = torch.zeros(2, device=device)
    run.grad_scale = scaler.get_scale()
    return run


# ---------------------------------------------------------------------------------------------
# restoring a checkpoint

def restore(run: Run, path: Path, state: dict) -> dict | None:
    """Puts a training checkpoint's `state` (read_resume_state) into the run; returns this process's saved
    random streams (None when the checkpoint was written by another number of processes)."""
    check_resume_clip(path, state, run.clip.weights_fingerprint(), str(run.clip.source), run.config.allow_changes,
                      run.info.is_main)
    diffs = hparam_differences(state.get("hparams", {}), run.hparams)
    if diffs and run.info.is_main:
        log.warning(f"resuming {path} with different hyper-parameters (the current flags apply): " + "; ".join(diffs))
    try:
        run.net.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise ConfigError(f"--resume {path}: its network does not fit the current flags "
                          f"(saved config {state['config']}): {str(e)[:300]}") from e
    # the saved groups come back with load_state_dict; the flags apply: weight decay, and how AdamW runs
    # (--fused-adamw, which the scaler follows), set before loading, since it decides where the state goes
    now = {"weight_decay": run.config.wd, **{k: run.optimizer.defaults[k] for k in ("fused", "foreach", "capturable")}}
    run.optimizer.load_state_dict({**state["optimizer"],
                                   "param_groups": [{**g, **now} for g in state["optimizer"]["param_groups"]]})
    if state.get("scaler") and state.get("hparams", {}).get("precision_used") == run.precision:
        run.scaler.load_state_dict(state["scaler"])  # another precision's scale means nothing here
        run.grad_scale = run.scaler.get_scale()
    run.position = Position(state["epoch"], state["samples_in_epoch"], state["global_step"], path)
    world = run.world
    if run.position.samples_in_epoch % world and run.info.is_main:
        log.warning(f"{run.position.samples_in_epoch} samples done in the epoch do not split over {world} "
                 "processes; a few samples of that epoch are repeated")
    log.info(f"resumed {path}: epoch {run.position.epoch + 1}, {run.position.samples_in_epoch} samples into it, "
             f"global step {run.position.global_step}")
    rngs = state.get("rng") or []
    if len(rngs) == world:
        return rngs[run.info.rank]
    if run.info.is_main:
        log.warning(f"{path} was written by {len(rngs)} processes, this run has {world}: "
                    "random streams are re-seeded, dropout masks will differ from an uninterrupted run")
    return None


def start(run: Run, rng_state: dict | None, resumed: bool) -> None:
    """Per-process random streams, the DDP wrapper, the output folder and the logs."""
    seed_everything(run.config.seed + run.info.rank)  # per-rank streams (dropout masks differ between ranks)
    if rng_state is not None:
        restore_rng(rng_state, run.device)
    run.model = run.net
    if run.info.enabled:
        run.model = DistributedDataParallel(run.net, device_ids=[run.device.index] if run.device.type == "cuda" else None)

    def write_run_files():
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        with naming_written_file(run.model_dir / "hyperparameters.json"):
            atomic_write_json(run.hparams, run.model_dir / "hyperparameters.json")
        return TrainLog(run.model_dir, True, purge_step=run.position.global_step if resumed else None)

    run.train_log = main_only(run.info, write_run_files, f"writing {run.model_dir}") or TrainLog(run.model_dir, False)


# ---------------------------------------------------------------------------------------------
# one epoch

def save_checkpoint(run: Run, path: Path, epoch: int, samples: int, step: int) -> Path:
    """Every process's streams and rank 0's network and optimizer state, written atomically (collective;
    a failed write stops every rank, not rank 0 alone)."""
    # the rows a resumed run will skip are stored and marked before the checkpoint, on every process
    every_rank(run.info, run.features.commit, "storing its feature cache")
    rng = all_gather_object(capture_rng(run.device), run.info)
    main_only(run.info, lambda: save_network(
        run.net, path, optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(), epoch=epoch,
        samples_in_epoch=samples, step=step, global_step=run.position.global_step, world_size=run.world, rng=rng,
        hparams=run.hparams, loss=run.last_loss, clip_fingerprint=run.clip.weights_fingerprint(), data=run.data),
        f"writing {path}")
    run.position.last_checkpoint = path
    return path


def _set_flags(run: Run) -> torch.Tensor:
    """This process's [stop asked, failed] flags, written into a preallocated device tensor: no host-to-device
    copy in the step."""
    run.flags[0].fill_(float(run.stop is not None and run.stop.requested is not None))
    run.flags[1].fill_(float(run.pending_error is not None or run.features.failed))
    return run.flags


def _raise_pending(run: Run, failed: bool) -> None:
    """After an all-reduce that said some process failed between two steps (rank 0's step log, any
    process's feature cache): every process stops now, the failed one with its own error."""
    if not failed:
        return
    if run.pending_error is not None:
        error, run.pending_error = run.pending_error, None
        raise error
    if run.features.failed:
        run.features.commit()  # raises the writer's error
    raise RankFailed("another process failed between two steps (writing the step log or its feature cache); "
                     "its output has the details")


def stop_agreed(run: Run) -> bool:
    """Whether any process was asked to stop (collective: every process calls it at the same point)."""
    stop, failed = all_reduce_mean(_set_flags(run).clone(), run.info).tolist()
    _raise_pending(run, failed > 0)
    return stop > 0


def training_step(run: Run, batch: dict) -> tuple[list[float], bool, bool]:
    """One optimisation step. Returns the loss terms (LOSS_KEYS), averaged over processes, whether any
    process has been asked to stop (carried by the same all-reduce, so all stop after the same step), and
    whether the update was skipped (the loss or the gradients were not finite).

    The whole step is queued before anything is read back: the scaler skips a non-finite step on the
    device, and the losses and flags are read once, at the end."""
    g, P = run.features(batch)
    texts = {k: v.to(run.device, non_blocking=True) for k, v in batch["texts"].items()}
    with prec.autocast(run.precision, run.device):
        out = run.model(run.clip, g, P, texts, gather_with_grad if run.info.enabled else None)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(out["total"]).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    reduced = all_reduce_mean(torch.cat([torch.stack([out[k].detach().float() for k in LOSS_KEYS]), _set_flags(run)]),
                              run.info).tolist()  # the step's one read from the device
    stats, stop, failed = reduced[:len(LOSS_KEYS)], reduced[-2] > 0, reduced[-1] > 0
    _raise_pending(run, failed)
    scale = run.scaler.get_scale()
    skipped = scale < run.grad_scale or not all(math.isfinite(x) for x in stats)
    run.grad_scale = scale
    if not skipped:
        run.skipped_in_a_row = 0
        run.last_loss = stats[0]
        return stats, stop, False
    run.skipped_in_a_row += 1
    if run.precision != "fp16" or run.skipped_in_a_row >= MAX_SKIPPED_STEPS:
        run.features.commit()  # non-finite visual features would be the cause: that error first
        raise NonFiniteLossError(non_finite_message(run, stats))
    if run.info.is_main:
        log.warning(f"global step {run.position.global_step + 1}: the fp16 loss or gradients overflowed; the update "
                    f"was skipped and the gradient scale lowered to {scale:g} (a few such steps at the start are normal)")
    return stats, stop, True


@dataclass
class EpochStats:
    sums: np.ndarray
    first_step: int = 0  # 0-based; > 0 when the epoch was resumed part-way
    steps: int = 0
    data_wait: float = 0.0
    seconds: float = 0.0
    skipped: int = 0  # fp16 steps whose update the scaler skipped (not in `sums`)
    stopped_early: bool = False  # --max-steps, or a stop signal, part-way through the epoch
    stop_signalled: bool = False  # some process was asked to stop (agreed by every process)

    def means(self) -> dict[str, float]:
        return dict(zip(LOSS_KEYS, self.sums / max(self.steps, 1)))


def _write_log(run: Run, write) -> None:
    """Rank 0 writes to the step log or TensorBoard; a failure there (a full disk) is raised on every rank
    together, by the next all-reduce, instead of stopping rank 0 alone. A failed write names the step log
    (TensorBoard's own writes happen in its thread, not here)."""
    try:
        with naming_written_file(run.model_dir / "train_log.jsonl"):
            write()
    except Exception as e:  # noqa: BLE001 - re-raised on every rank by the next collective
        if not run.info.enabled:
            raise
        run.pending_error = e


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    if not show_progress(enabled):
        return None
    # forced into a log file (no terminal) refresh rarely: each refresh is a line there
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def train_one_epoch(run: Run, epoch: int) -> EpochStats:
    """The steps of 0-based `epoch`, from where `run.position` says it stands; writes `latest.pt` every
    --save-every-steps and stops early, with `latest.pt` written, at --max-steps."""
    config, pos, b, world = run.config, run.position, run.batch_size, run.world
    lr = learning_rate(epoch, config.lr, config.lr_decay, config.lr_div)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    skip = pos.samples_in_epoch // world  # per-rank indices already trained on this epoch
    run.sampler.set_epoch(epoch, skip)
    step = skip // b
    last_step = step + len(run.loader)  # < steps_per_epoch only after a resume across a batch-size change
    stats = EpochStats(np.zeros(len(LOSS_KEYS)), first_step=step)
    t0 = t_last = time.perf_counter()
    bar = _progress_bar(run.steps_per_epoch, step, f"epoch {epoch + 1}/{config.epochs}",
                        run.info.is_main and not config.no_progress)
    try:
        for batch in run.loader:
            t_batch = time.perf_counter()
            losses, stop, skipped = training_step(run, batch)
            step += 1
            pos.global_step += 1
            pos.samples_in_epoch += b * world
            now = time.perf_counter()
            if skipped:  # its loss is not finite: left out of the epoch's means
                stats.skipped += 1
            else:
                stats.sums += losses
                stats.steps += 1
            stats.data_wait += t_batch - t_last
            record = {"epoch": epoch + 1, "step": step, "global_step": pos.global_step, "lr": lr,
                      **{LOG_NAMES[k]: v for k, v in zip(LOSS_KEYS, losses)},
                      "images_per_s": b * world / max(now - t_last, 1e-9), "data_wait_s": t_batch - t_last,
                      "step_s": now - t_batch, **({"skipped": True} if skipped else {})}
            _write_log(run, lambda: run.train_log.step(record, pos.global_step))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats.sums[0] / max(stats.steps, 1):.4f}", lr=f"{lr:.2g}")
            mid_epoch = step < last_step
            limit = stop or (config.max_steps and pos.global_step >= config.max_steps)
            if mid_epoch and ((config.save_every_steps and pos.global_step % config.save_every_steps == 0) or limit):
                save_checkpoint(run, run.ckpt_dir / "latest.pt", epoch, pos.samples_in_epoch, step)
            if mid_epoch and limit:
                stats.stopped_early, stats.stop_signalled = True, stop
                break
            t_last = time.perf_counter()
    finally:
        if bar is not None:  # also on an exception mid-epoch: close the bar now, not at interpreter exit
            bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


# ---------------------------------------------------------------------------------------------
# the end of an epoch

def end_of_epoch(run: Run, epoch: int, stats: EpochStats) -> None:
    """After 0-based `epoch` completed: checkpoint (epoch_<n>.pt and latest.pt, n = completed epochs),
    the epoch's summary line and scalars, and validation every --val-frequency epochs."""
    config, pos = run.config, run.position
    done = epoch + 1  # checkpoint names count completed epochs: epoch_1.pt after the first epoch
    pos.epoch, pos.samples_in_epoch = done, 0
    if config.save_frequency and done % config.save_frequency == 0:
        path = save_checkpoint(run, run.ckpt_dir / f"epoch_{done}.pt", done, 0, 0)
        main_only(run.info, lambda: link_or_copy(path, run.ckpt_dir / "latest.pt"), f"linking {path} as latest.pt")
    else:
        save_checkpoint(run, run.ckpt_dir / "latest.pt", done, 0, 0)
    means = stats.means()
    b, world = run.batch_size, run.world
    part = (f" (resumed: steps {stats.first_step + 1}-{stats.first_step + stats.steps} of {run.steps_per_epoch}; "
            "the means and speed cover those)" if stats.first_step else "")
    log.info(f"epoch {done}/{config.epochs}{part}: loss {means['total']:.4f} (contrastive {means['contrastive']:.4f}, "
             f"ortho {means['ortho']:.4f}, reg {means['reg']:.4f}), {means['num_attributes']:.1f} attributes/image, "
             f"lr {learning_rate(epoch, config.lr, config.lr_decay, config.lr_div):.3g}, "
             f"{(stats.steps + stats.skipped) * b * world / max(stats.seconds, 1e-9):.1f} images/s, data wait {stats.data_wait:.1f} s, "
             f"{stats.seconds:.0f} s; saved {pos.last_checkpoint}")
    _write_log(run, lambda: run.train_log.scalars("epoch", {LOG_NAMES[k]: v for k, v in means.items()}, pos.global_step))
    if config.val_dataset and done % config.val_frequency == 0:
        def validate_and_log():
            metrics = validate(run.net, run.clip, config, run.val_root, run.device, epoch=done,
                               checkpoint=pos.last_checkpoint, stop=run.stop)
            if metrics is not None:
                run.train_log.scalars(f"val_{config.val_dataset}", metrics, pos.global_step)

        run.stop.validating = True  # on every rank: a stop signal now ends the validation, not a step
        try:
            main_only(run.info, validate_and_log, f"validating on {config.val_dataset}")  # also the barrier
        finally:
            run.stop.validating = False


# ---------------------------------------------------------------------------------------------
# the run

def train(config: TrainConfig, info: DistInfo, device: torch.device) -> dict:
    """A whole training run; returns {"global_step", "epochs_done", "last_checkpoint", "stopped_early",
    "stopped_by"} (`stopped_by`: the name of the signal that stopped the run, or None)."""
    checked = preflight(config, info, device)  # everything before the slow part; holds the folder's lock
    finished = False
    try:
        result = _train(config, info, device, checked)
        finished = True
        return result
    finally:
        checked.lock.release()  # first: its file sits in --model-dir
        if not finished and info.is_main:  # what a run that failed before writing anything created (no CLIP, say)
            remove_empty_folders(checked.made)


def _train(config: TrainConfig, info: DistInfo, device: torch.device, checked: Preflight) -> dict:
    resume_path = checked.resume_path
    run = setup(config, info, device, checked)
    rng_state = every_rank(info, lambda: restore(run, resume_path, checked.resume_state) if resume_path else None,
                           f"resuming {resume_path}")
    pos = run.position
    check_same_start(info, (pos.epoch, pos.samples_in_epoch, pos.global_step), pos.last_checkpoint)
    present = run_files_present(run.model_dir)  # before this start writes any
    try:
        start(run, rng_state, resumed=resume_path is not None)
        return _epochs(run, resume_path)
    except BaseException as e:
        # nothing to resume from and nothing to learn from the files: a write that failed (a full disk) or
        # a failure before the first step; other failures (a non-finite loss) keep their step log
        pos = run.position
        if info.is_main and pos.last_checkpoint is None and (pos.global_step == 0 or write_error(e) is not None):
            forget_failed_start(run.model_dir, present)
        raise


def _epochs(run: Run, resume_path: Path | None) -> dict:
    config, device, pos = run.config, run.device, run.position
    if pos.epoch >= config.epochs:
        log.info(f"nothing to train: {resume_path} already holds {pos.epoch} epochs and --epochs is {config.epochs}")
    else:
        log.info(f"training {len(run.dataset)} pairs, {run.steps_per_epoch} steps/epoch of {run.batch_size} x "
                 f"{run.world} process(es), epochs {pos.epoch + 1}..{config.epochs}, {run.precision} on {device}; "
                 f"outputs in {run.model_dir}")
    stopped_early = signalled = False
    try:
        with StopOnSignal() as run.stop:
            run.net.train()
            for epoch in range(pos.epoch, config.epochs):
                stats = train_one_epoch(run, epoch)
                if stats.stopped_early:
                    stopped_early, signalled = True, stats.stop_signalled
                    break
                end_of_epoch(run, epoch, stats)
                signalled = stop_agreed(run)  # also a signal that came during the epoch's end (every rank asks)
                if signalled or (config.max_steps and pos.global_step >= config.max_steps):
                    stopped_early = pos.epoch < config.epochs
                    break
            local = run.stop.requested
        if run.pending_error is not None:  # a log write that failed after the last collective
            raise run.pending_error
    finally:
        close_loader(run.loader)
        run.train_log.close()
        run.features.close()
    stopped_by = None
    if stopped_early and signalled:
        stopped_by = local.name if local is not None else "a stop signal sent to another process"
    elif stopped_early:
        log.info(f"stopped at global step {pos.global_step} (--max-steps {config.max_steps}); resume with --resume latest")
    return {"global_step": pos.global_step, "epochs_done": pos.epoch, "stopped_by": stopped_by,
            "last_checkpoint": str(pos.last_checkpoint) if pos.last_checkpoint else None, "stopped_early": stopped_early}
