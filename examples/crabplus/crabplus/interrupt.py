"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers and launchers send).

Light on purpose (no torch): the handler only records the request; the training loop finishes its step, agrees with
the other ranks to stop, writes a checkpoint and says how to resume.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any


class StopSignals:
    """SIGINT / SIGTERM during training: the first asks the loop to stop after the current step (with a checkpoint);
    a second SIGINT later than ``grace_s`` exits at once. A repeat within ``grace_s`` is the same request forwarded
    (``torchrun`` passes the terminal's Ctrl-C on to workers that already got it). Installed only in the main thread;
    ``announce``: print the first request (one rank of a job does).
    """

    def __init__(self, grace_s: float = 1.0, announce: bool = True):
        self.grace_s, self.announce = grace_s, announce
        self.received: str | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self._at = name, time.monotonic()
            if self.announce:  # one rank says it
                print(f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again to exit at once)",
                      file=sys.stderr, flush=True)  # fmt: skip
        elif signum == signal.SIGINT and time.monotonic() - self._at > self.grace_s:
            print(f"{name} again: exiting at once, without a checkpoint of this step", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
