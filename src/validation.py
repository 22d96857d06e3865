"""Validation during training: after an epoch, evaluate.py's metrics of the network on a benchmark's val
split, as the authors validate (fp32 inference). It runs after the epoch's checkpoint is written; a stop
signal ends it at its next batch, since a cluster's grace period after SIGTERM is often shorter than a
validation, and the warning then names the command that gives its metrics."""
from __future__ import annotations

import shlex
from pathlib import Path

import torch

from errors import ConfigError, UserError
from evaluation import EvalConfig, evaluate
from features import Encoding, EncodingStopped
from logs import get_logger
from stop_signals import StopOnSignal
from train_config import TrainConfig

log = get_logger("validation")


def validation_config(config: TrainConfig, device: torch.device) -> EvalConfig:
    """evaluate.py's validation as training runs it: fp32 inference as the authors', --val-batch-size,
    the gallery features (frozen CLIP) cached in --val-cache-dir, so only the first validation encodes the
    gallery."""
    encoding = Encoding(batch_size=config.val_batch_size, workers=config.workers, device=device, precision="fp32",
                        progress=False)
    return EvalConfig(split="val", preprocess_type=config.preprocess_type, encoding=encoding,
                      cache_dir=config.val_cache_dir or None, cache_hash_images=config.cache_hash_images)


def validate(net, clip, config: TrainConfig, root, device: torch.device, *, epoch: int, checkpoint: Path,
             stop: StopOnSignal | None = None) -> dict[str, float] | None:
    """The metrics (percent) of `net` on --val-dataset's val split after `epoch` (1-based), logged; None,
    with a warning, when `stop` received a signal before the validation's end."""
    dataset = config.val_dataset
    eval_config = validation_config(config, device)
    if stop is not None:
        eval_config.encoding.stop = lambda: stop.requested is not None
    try:
        # the loaders draw their seeds from the CPU random stream, which the checkpoint before this captured:
        # forked, so a run resumed from that checkpoint draws what an uninterrupted run draws (CPU dropout)
        with clip.float32_weights(), torch.random.fork_rng(devices=[]):
            metrics = evaluate(net, clip, dataset, root, eval_config)  # fp32 weights whatever --clip-half holds
    except EncodingStopped:
        keep = " (copy it first: resuming overwrites latest.pt)" if checkpoint.name == "latest.pt" else ""
        log.warning(f"validation {dataset} after epoch {epoch} ended by {stop.requested.name}, no metrics logged; for "
                    f"them run `{evaluate_command(config, root, checkpoint)}`{keep}")
        return None
    except UserError as e:
        raise ConfigError(f"validation on {dataset}: {e}") from e
    log.info(f"validation {dataset} after epoch {epoch}: "
             + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics


def evaluate_command(config: TrainConfig, root, checkpoint: Path) -> str:
    """The evaluate.py command line that gives the validation's metrics for `checkpoint`: the same data,
    preprocessing and CLIP as the run."""
    args = ["python", "src/evaluate.py", "--dataset", config.val_dataset, f"--{config.val_dataset}-path", str(root),
            "--model-path", str(checkpoint), "--preprocess-type", config.preprocess_type,
            "--clip-model", config.clip_model, "--clip-format", config.clip_format]
    args += ["--clip-weights", str(config.clip_weights)] if config.clip_weights else []
    args += ["--clip-pretrained", config.clip_pretrained] if config.clip_pretrained else []
    return shlex.join(args)
