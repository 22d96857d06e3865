"""Where the scripts' messages and training's records go.

- `setup_logging()`: every module logs through `logging.getLogger("fti4cir.<module>")`; the scripts call
  this once so that INFO lines reach standard output as plain text and warnings as `warning: <text>`
  (the level is the formatter's to print: a message never starts with it). Processes other than rank 0
  of a distributed run only show warnings and errors.
- `TrainLog`: rank 0's per-step JSON lines (`train_log.jsonl`, appended, never through a symbolic link)
  and TensorBoard scalars.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

ROOT = "fti4cir"


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time of the message (a test's capture included)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler's constructor assigns it; the property wins
        pass


class LevelFormatter(logging.Formatter):
    """`message` for INFO and below, `warning: message` / `error: message` above."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup_logging(main_process: bool = True) -> logging.Logger:
    """Lines on stdout at INFO (WARNING on non-main processes), the level named from WARNING up; idempotent."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(LevelFormatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    return logger


def get_logger(module: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT}.{module}")


PERF_KEYS = ("images_per_s", "data_wait_s", "step_s")


class TrainLog:
    """Rank 0's TensorBoard writer and JSON-lines step log (`enabled=False`: every call does nothing)."""

    def __init__(self, model_dir: Path, enabled: bool, purge_step: int | None = None):
        self.tb = self.jsonl = None
        if enabled:
            # deferred: tensorboard takes seconds to import and only rank 0 of a training run writes to it;
            # utils imports this module
            from torch.utils.tensorboard import SummaryWriter

            from utils import open_append

            # first: a train_log.jsonl that is a link or not a file stops the run before anything is written
            self.jsonl = open_append(Path(model_dir) / "train_log.jsonl", "training log")
            self.tb = SummaryWriter(str(Path(model_dir) / "tensorboard"), purge_step=purge_step)

    def step(self, record: dict, global_step: int) -> None:
        """One training step: every number but the counters as a scalar, the whole record as a line."""
        if self.tb is None:
            return
        for k, v in record.items():
            if k not in ("epoch", "step", "global_step"):
                self.tb.add_scalar(("perf/" if k in PERF_KEYS else "train/") + k, v, global_step)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def scalars(self, prefix: str, values: dict, global_step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, global_step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.jsonl.close()
            self.tb = self.jsonl = None
