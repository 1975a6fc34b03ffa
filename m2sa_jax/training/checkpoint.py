"""Stopping a training run cleanly: SIGTERM / SIGINT set a flag that the loop reads at the next
step boundary, where it saves (m2sa_jax/checkpoints/runs.py) and exits."""

from __future__ import annotations

import signal


class StopFlag:
    """Set by SIGTERM (and SIGINT): the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.stop = False
        self.signal = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:          # not the main thread (e.g. under a test runner thread)
                pass

    def _handler(self, signum, frame):
        self.stop = True
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
