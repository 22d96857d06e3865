"""The errors a user can fix: a missing file, a wrong layout, a bad flag, an unusable checkpoint.

Library code raises a subclass of `UserError` with a message that names the file or flag and says
what to do; the scripts' `main` (through `cli.script_main`) turns it into one `error: ...` line and exit
status 1, without a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

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


def torch_load_problem(error: BaseException, path=None) -> str:
    """What a failed `torch.load(..., weights_only=True)` means, in a few words for the user: a truncated or
    corrupt file, or a pickle that asks to run code (which is refused; the advice torch prints with it, to
    load with weights_only=False, is the one step that would run it, so it is not repeated)."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"the Python object {found.group(1)}" if found else "Python objects"
        return (f"refused: it asks to create {what} when loaded, which can run code; a checkpoint holds only "
                "tensors and plain values, so it is not loaded")
    if (isinstance(error, (EOFError, pickle.UnpicklingError)) or "zip archive" in text or "unexpected EOF" in text
            or (path is not None and _broken_zip(path))):
        return "truncated or corrupt: copy it again"
    return f"unreadable ({type(error).__name__}: {text.splitlines()[0][:160] if text else ''})"
