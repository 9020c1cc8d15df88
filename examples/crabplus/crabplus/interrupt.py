"""Stopping a command cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers and launchers send).

Light on purpose (no torch): the handlers only record the request; the training loop finishes its step, agrees with
the other ranks to stop, writes a checkpoint and says how to resume; evaluation finishes its batch and keeps its
predictions. Outside those loops (loading, saving, shutting down) ``command_signals`` turns the first signal into
``Interrupted`` and exits at once on any later one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_FINISHED = "finished"


class _Request:
    """The first stop request of this process (shared by every handler), and when it came."""

    name: str | None = None
    at: float = 0.0


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM outside a loop that stops cleanly; ``signal``: its name."""

    def __init__(self, name: str):
        super().__init__(name)
        self.signal = name


def _record(name: str) -> bool:
    """Note a stop request; False when one came before."""
    if _Request.name is not None:
        return False
    _Request.name, _Request.at = name, time.monotonic()
    return True


def _exit_now(name: str, grace_s: float) -> None:
    """Exit at once on a signal after the first, except a repeat within ``grace_s`` (``torchrun`` forwards the
    terminal's Ctrl-C to workers that already got it)."""
    if time.monotonic() - _Request.at > grace_s:
        again = "" if _Request.name == _FINISHED else " again"
        print(f"crabplus: {name}{again}: exiting at once", file=sys.stderr, flush=True)
        os._exit(128 + signal.Signals[name])


class StopSignals:
    """SIGINT / SIGTERM during a loop: the first asks the loop to stop after the current ``doing`` step (the loop
    reads ``received``); a second SIGINT later than ``grace_s`` exits at once. Installed only in the main thread;
    ``announce``: print the first request (one rank of a job does)."""

    def __init__(self, grace_s: float = 1.0, announce: bool = True, doing: str = "training",
                 after: str = "this step and saving a checkpoint"):  # fmt: skip
        self.grace_s, self.announce, self.doing, self.after = grace_s, announce, doing, after
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            if _record(name) and self.announce:  # one rank says it
                print(f"\n{name}: stopping {self.doing} after {self.after} "
                      "(Ctrl-C again, a second later, to exit at once)", file=sys.stderr, flush=True)  # fmt: skip
        elif signum == signal.SIGINT:
            _exit_now(name, self.grace_s)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _command_handler(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if _record(name):
        raise Interrupted(name)
    _exit_now(name, 1.0)


def command_signals() -> None:
    """Handle SIGINT and SIGTERM for the whole of a command: the first raises ``Interrupted`` where the command is
    (unless a ``StopSignals`` loop handles it); any later one (after a loop stopped and saved, too) prints one line
    and exits at once with 128 + the signal number."""
    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            signal.signal(sig, _command_handler)


def finished() -> None:
    """The command's work is done: a signal from now on exits at once, with one line."""
    _record(_FINISHED)
