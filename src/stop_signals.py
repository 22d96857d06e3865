"""A clean stop on SIGTERM and SIGINT (cluster pre-emption, Ctrl-C).

Inside `StopOnSignal()`, the first SIGTERM or SIGINT only records that a stop was asked for: training
finishes the step in progress, writes `latest.pt` and exits with one line saying how to resume; during
a validation (which starts after `latest.pt` is written) it ends the validation at its next batch. A
second signal ends the process at once (the signal's default action). DataLoader workers ignore both
signals (`ignore_stop_signals`, their `worker_init_fn`): Ctrl-C reaches the whole process group, and a
worker dying of it would fail the step the main process is finishing.
"""
from __future__ import annotations

import signal
import threading

from logs import get_logger

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = get_logger("stop_signals")


class StopOnSignal:
    """Context manager: while active, `.requested` is the first stop signal received (None before)."""

    def __init__(self):
        self.requested: signal.Signals | None = None
        self.validating = False  # set by training while it validates: a stop then ends the validation
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None:  # the second one: stop now
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum)
        doing = ("ending the validation (latest.pt is already written)" if self.validating
                 else "finishing this step, then writing latest.pt")
        log.warning(f"{self.requested.name} received: {doing} (send it again to stop at once)")

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: the main process decides when to stop."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
