"""The errors a user can fix: a missing file, a wrong layout, a bad flag, an unusable checkpoint.

Library code raises a subclass of `UserError` with a message that names the file or flag and says
what to do; the scripts' `main` (through `cli.run_main`) turns it into one `error: ...` line and exit
status 1, without a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


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
