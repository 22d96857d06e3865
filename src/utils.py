"""Small helpers shared by every script: atomic writes, devices, seeding."""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path, indent: int | None = 2) -> None:
    data = json.dumps(obj, indent=indent).encode("utf-8")
    _atomic_replace(Path(path), lambda f: f.write(data))


def report_json(results: Any, path) -> None:
    """A benchmark's figures to `path` (atomic; nothing when path is None), saying where they went."""
    if path:
        atomic_write_json(results, path)
        print(f"wrote {path}")


def atomic_write_bytes(data: bytes, path) -> None:
    _atomic_replace(Path(path), lambda f: f.write(data))


def resolve_device(name: str | None) -> torch.device:
    """`None`/'auto' -> cuda when available, else cpu. A named CUDA device that is absent is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; pass --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
