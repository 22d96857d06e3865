"""Small helpers shared by every script: files a run writes (atomic writes, appended logs, temporaries
left by dead processes), output folders, folder walks, the device, seeding.

No file a run writes follows a symbolic link it did not make: new files are made with O_EXCL (which
refuses any existing name, a link included), files a run reopens (logs, the run folder's lock) with
O_NOFOLLOW and must be regular files.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import socket
import stat
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from errors import ConfigError, DeviceError, UserError
from logs import get_logger

log = get_logger("utils")

# temporaries are named `.<name>.<host>.<pid>.<8 hex>.tmp`: a later run on this host can tell whether the
# process that made one is still running (another host's pids cannot be told apart from ours)
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"
TEMP_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeFileError(UserError, OSError):
    """A file a run would write is a symbolic link or not a regular file."""


def temp_path(path) -> Path:
    """A fresh temporary name beside `path`, `.<name>.<host>.<pid>.<8 hex>.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def open_regular(path, flags: int, what: str = "file") -> int:
    """os.open(path, flags | O_NOFOLLOW) of a regular file (created with the umask's mode when `flags` has
    O_CREAT); a symbolic link or anything but a regular file is an UnsafeFileError naming it."""
    path = Path(path)
    fix = "remove it (this file is the run's own, never a link to another file)"
    try:
        # O_NONBLOCK: a FIFO in its place is refused below instead of waiting for a reader
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFileError(f"{what} {path} is a symbolic link; {fix}") from None
        if e.errno in (errno.EISDIR, errno.ENXIO):  # a folder; a FIFO without a reader
            raise UnsafeFileError(f"{what} {path} is not a regular file; {fix}") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{what} {path} is not a regular file; {fix}")
    os.set_blocking(fd, True)
    return fd


def open_append(path, what: str = "log file"):
    """`path` opened to append text (created if missing), refused when it is a link or not a regular file."""
    return os.fdopen(open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what), "a", encoding="utf-8")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_path(path) -> None:
    """Remove a file, link or folder without following any link (rmtree does not follow them)."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def remove_dead_temporaries(folder, what: str = "") -> list[Path]:
    """Remove the temporaries (TEMP_NAME) in `folder` made on this host by processes no longer running;
    those of running processes and of other hosts stay."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = TEMP_NAME.match(entry)
        if m is None or m["host"] != HOST or _running(int(m["pid"])):
            continue
        try:
            remove_path(Path(folder) / entry)
        except OSError:  # removed by another process meanwhile
            continue
        removed.append(Path(folder) / entry)
        log.info(f"{what}{': ' if what else ''}removed {Path(folder) / entry}, left by process {m['pid']}, "
                 "which is not running")
    return removed


def walk_files(folder) -> list[str]:
    """Every file under `folder` (recursive; hidden files and folders skipped), as sorted '/'-separated
    paths relative to it.

    Links to folders are followed, but each real folder (device and inode) is listed once: every folder
    reached without a link is listed first, under its own path; a link to a folder already listed (a
    parent, `.`, a second link to the same place) adds nothing, so no walk repeats or loops. A folder that
    cannot be listed is passed over with a warning naming it."""
    seen: set[tuple[int, int]] = set()
    out: list[str] = []
    real, linked = [""], []  # folders still to list: those reached without a link first
    while real or linked:
        rel = real.pop() if real else linked.pop(0)
        try:
            st = os.stat(os.path.join(folder, rel))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(os.path.join(folder, rel)) as it:
                entries = list(it)
        except OSError as e:
            log.warning(f"{os.path.join(folder, rel)}: cannot be listed ({e.strerror or e}); its files are left out")
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            sub = f"{rel}/{e.name}" if rel else e.name
            try:
                is_dir = e.is_dir()  # follows a link
            except OSError:
                continue
            if is_dir:
                (linked if e.is_symlink() else real).append(sub)
            else:
                out.append(sub)
    return sorted(out)


def new_temporary(path, write) -> Path:
    """`write(file)` into a fresh temporary file beside `path` (`temp_path`), flushed to disk; its path.
    The file is made new (O_EXCL, O_NOFOLLOW) with the mode the umask gives, as a plain `open()` would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with os.fdopen(os.open(tmp, _NEW_FILE, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _atomic_replace(path: Path, write) -> None:
    """`write(file)` into a new temporary beside `path`, then renamed over `path`: readers see the old
    file or the new one, never half of one; a link at `path` is replaced, not followed."""
    tmp = new_temporary(path, write)
    try:
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
    flag, the folder and `fix` otherwise. Temporaries that dead processes of this host left there are
    removed."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temp_path(path / "write-test")
        os.close(os.open(probe, _NEW_FILE, 0o666))
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create or write this folder ({e.strerror or e}); {fix}") from None
    remove_dead_temporaries(path, flag)
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
