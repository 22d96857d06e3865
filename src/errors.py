"""The errors a user can fix: a missing file, a wrong layout, a bad flag, an unusable checkpoint.

Library code raises a subclass of `UserError` with a message that names the file or flag and says
what to do; the scripts' `main` (through `cli.script_main`) turns it into one `error: ...` line and exit
status 1, without a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import zipfile


class UserError(Exception):
    """Base of every error whose message is meant for the person running a script."""

    def __init__(self, message: str = ""):
        super().__init__(_unwrap_worker_message(str(message), type(self)))


class ConfigError(UserError, ValueError):
    """A flag or argument value that cannot work (the message names the flag)."""


class DeviceError(UserError):
    """A device that is not there, or cannot do what was asked (fp16 on a CPU, say)."""


def _unwrap_worker_message(message: str, cls: type) -> str:
    """A DataLoader worker re-raises an error in the main process by calling its class with the worker's
    whole traceback as the message; keep what the original error said (the traceback's last entry)."""
    if "Original Traceback" not in message:
        return message
    for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        at = message.rfind(name)
        if at >= 0:
            return message[at + len(name):].strip()
    return message


def _broken_zip(path) -> bool:
    """A file that starts like a zip archive (torch.save's format) but is not a complete one."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)
    except OSError:
        return False


def _head(path) -> bytes | None:
    """The first bytes of the file at `path`; None without a path or when it cannot be read."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read(2)
    except OSError:
        return None


def torch_load_problem(error: BaseException, path=None) -> str:
    """What a failed `torch.load(..., weights_only=True)` means, in a few words for the user: a truncated or
    corrupt file, or a pickle that asks to run code (which is refused; the advice torch prints with it, to
    load with weights_only=False, is the one step that would run it, so it is not repeated)."""
    text = str(error)
    if path is not None and str(path).endswith(".safetensors"):  # not torch.save's format: no first-bytes check
        return f"a damaged safetensors file ({text.splitlines()[0][:160] if text else type(error).__name__}): copy it again"
    head = _head(path)
    if head is not None and not head:
        return "an empty file: copy it again"
    if head is not None and not head.startswith((b"PK", b"\x80")):  # neither a zip archive nor a pickle (protocol 2+)
        return "not a PyTorch checkpoint (neither a torch.save archive nor a pickle): pass the checkpoint file itself"
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"the Python object {found.group(1)}" if found else "Python objects"
        return (f"refused: it asks to create {what} when loaded, which can run code; a checkpoint holds only "
                "tensors and plain values, so it is not loaded")
    if (isinstance(error, (EOFError, pickle.UnpicklingError)) or "zip archive" in text or "unexpected EOF" in text
            or (path is not None and _broken_zip(path))):
        return "truncated or corrupt: copy it again"
    return f"unreadable ({type(error).__name__}: {text.splitlines()[0][:160] if text else ''})"


# the system's refusals of a write (the disk, a quota, permissions), whose text torch.save's writer puts in its
# own RuntimeError
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM)
# what torch.save's C++ writer says when a write or a seek fails, whatever the cause
_TORCH_WRITER = ("inline_container", "PytorchStreamWriter", "file write failed")


def write_error(error: BaseException, path=None) -> OSError | None:
    """The failed write behind `error`, as an OSError naming `path` (when given): an OSError itself (which
    names no file, or a temporary one, when it comes from a write or fsync), or a RuntimeError of
    torch.save's writer, which wraps the system's error in its own text. None for any other error."""
    if isinstance(error, UserError):
        return None
    if isinstance(error, OSError):
        code, text = error.errno, error.strerror or str(error)
    elif isinstance(error, RuntimeError):
        cause = error.__cause__ or error.__context__
        message = str(error)
        if isinstance(cause, OSError):
            code, text = cause.errno, cause.strerror or str(cause)
        else:
            code = next((c for c in WRITE_ERRNOS if os.strerror(c) in message), None)
            if code is None and not any(m in message for m in _TORCH_WRITER):
                return None
            text = (os.strerror(code) if code is not None
                    else "the write failed (a full disk or quota is the usual cause)")
    else:
        return None
    return OSError(code, text, str(path)) if path is not None else OSError(code, text)


@contextlib.contextmanager
def naming_written_file(path):
    """A failed write inside the block (`write_error`) is raised as an OSError naming `path`, which the
    scripts' boundary (cli.script_main) reports in one line."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        found = write_error(e, path)
        if found is None:
            raise
        raise found from e
