"""The training output folder (`--model-dir`): one run at a time, and no leftovers.

- `RunLock`: an exclusive lock on `<model-dir>/.train.lock` for the whole run. The lock is an OS file
  lock (`flock`), so it dies with its process, however the process ends; the file also records the
  owner (host, pid, start time) for the message a second run gets; a lock file that is a symbolic link or
  not a regular file is refused. A lock file whose lock is free was
  left by a process that is gone: it is taken over, and the log says so.
- `check_start`: a folder that already holds a run is only trained in again with `--resume`.
- `remove_leftovers`: temporary files of atomic writes that a killed process left behind.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from errors import ConfigError, UserError
from logs import get_logger
from utils import open_regular

LOCK_NAME = ".train.lock"
# what flock raises where the file system has no locks
UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}
# what a finished or running training leaves in its folder
RUN_FILES = ("hyperparameters.json", "train_log.jsonl", "checkpoints/latest.pt")

log = get_logger("run_folder")


class RunFolderBusy(UserError):
    """Another training run holds the folder."""


def _describe(owner: dict) -> str:
    return (f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {owner.get('started', '?')}"
            if owner else "an unknown process")


class RunLock:
    """Holds `<folder>/.train.lock` from `acquire()` to `release()` (or the process's end)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW, regular files only: the lock's owner record is written into it, never into a file a
        # link points to
        f = os.fdopen(open_regular(self.path, os.O_RDWR | os.O_CREAT, "the run folder's lock"), "r+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = _read_owner(f.read())
            f.close()
            raise RunFolderBusy(f"--model-dir {self.folder} is in use by another training run ({_describe(owner)}); "
                                "wait for it to finish, or pass another --model-dir") from None
        except OSError as e:
            f.close()
            if e.errno not in UNSUPPORTED:
                raise
            # a file system without locks (Lustre mounted without -o flock, some NFS set-ups)
            log.warning(f"{self.folder} is on a file system that cannot lock files ({e.strerror}); "
                        "training goes on, but nothing stops a second run from using this --model-dir at the same time")
            return
        f.seek(0)
        previous = _read_owner(f.read())
        if previous:
            log.warning(f"took over the lock in {self.folder} left by a run that is gone ({_describe(previous)})")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)  # still ours: unlinked while the lock is held
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def _read_owner(text: str) -> dict:
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def check_start(folder, resume: str | None) -> None:
    """A folder that already holds a run is refused unless `--resume` says how to go on from it."""
    folder = Path(folder)
    found = [name for name in RUN_FILES if (folder / name).exists()]
    found += [str(p.relative_to(folder)) for p in sorted((folder / "checkpoints").glob("epoch_*.pt"))[:1]]
    if found and resume is None:
        raise ConfigError(f"--model-dir {folder} already holds a training run ({', '.join(found)}); pass "
                          "--resume latest to continue it, or another --model-dir for a new run")


def remove_leftovers(folder) -> list[Path]:
    """Deletes the temporary files interrupted atomic writes left in `folder` and its checkpoints/
    (`.<name>.<host>.<pid>.<hex>.tmp` and the like; about 620 MiB each for ViT-L/14). Only while holding
    the folder's lock."""
    folder = Path(folder)
    removed = []
    for where in (folder, folder / "checkpoints"):
        for p in where.glob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info(f"removed {len(removed)} temporary file(s) left by an interrupted write in {folder}")
    return removed
