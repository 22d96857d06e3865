"""Small helpers shared by every script: atomic file writes, output folders, the device, seeding."""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from errors import ConfigError, DeviceError


def _atomic_replace(path: Path, write) -> None:
    """`write(file)` into a new file beside `path`, flushed to disk, then renamed over `path`: readers see
    the old file or the new one, never half of one. The temporary file is opened like a plain `open()`
    would create it, so it gets the mode the umask gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


PROGRESS_ENV = "FTI4CIR_PROGRESS"  # 1: progress bars even without a terminal; 0: none anywhere


def show_progress(requested: bool = True) -> bool:
    """Whether to draw progress bars: when asked for (no --no-progress) and stderr is a terminal, since in a
    log file or a pipe a bar is a stream of redraws; FTI4CIR_PROGRESS=1 forces them, 0 turns them off."""
    forced = os.environ.get(PROGRESS_ENV, "").strip()
    if forced in ("0", "1"):
        return requested and forced == "1"
    return requested and sys.stderr.isatty()


def atomic_torch_save(obj: Any, path) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path, indent: int | None = 2) -> None:
    data = json.dumps(obj, indent=indent).encode("utf-8")
    _atomic_replace(Path(path), lambda f: f.write(data))


def atomic_write_bytes(data: bytes, path) -> None:
    _atomic_replace(Path(path), lambda f: f.write(data))


def check_output_folder(path, flag: str, fix: str = "pass a folder you can write to") -> Path:
    """Creates `path` if needed and proves it writable, before any slow work; a ConfigError naming the
    flag, the folder and `fix` otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create or write this folder ({e.strerror or e}); {fix}") from None
    return path


def report_json(results: Any, path) -> None:
    """A benchmark's figures to `path` (atomic; nothing when path is None), saying where they went."""
    if path:
        atomic_write_json(results, path)
        print(f"wrote {path}")  # a benchmark's own output, beside its printed figures


def sha256_text(text: str) -> str:
    """Hex SHA-256 of a string's UTF-8 bytes (the caches' keys)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_device(name: str | None) -> torch.device:
    """`None`/'auto' -> cuda when available, else cpu. A named CUDA device that is absent is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"--device {name!r} is not a torch device; pass cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine; pass --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
