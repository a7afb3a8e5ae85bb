"""A one-line progress indicator on stderr for a long bench: the step, the round, the time spent
and a rough time left. Rewritten in place on a terminal; one line per step otherwise (a log)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, name: str, steps: int, out: TextIO | None = None) -> None:
        self._name = name
        self._steps = max(1, steps)
        self._done = 0
        self._round = ""
        self._out = out if out is not None else sys.stderr
        self._tty = self._out.isatty()
        self._started = time.monotonic()
        self._width = 0

    def round(self, n: int, of: int) -> None:
        self._round = f"round {n}/{of} · "

    def step(self, what: str) -> None:
        """The step about to run (the ones before it are done)."""
        elapsed = time.monotonic() - self._started
        left = elapsed / self._done * (self._steps - self._done) if self._done else None
        eta = f", ~{_clock(left)} left" if left is not None else ""
        self._write(f"{self._name}: {self._round}{what} "
                    f"[{self._done}/{self._steps}, {_clock(elapsed)}{eta}]")
        self._done = min(self._steps, self._done + 1)

    def say(self, message: str) -> None:
        """A line of its own, kept above the progress line."""
        if self._tty and self._width:
            self._out.write("\r" + " " * self._width + "\r")
            self._width = 0
        self._out.write(f"{self._name}: {message}\n")
        self._out.flush()

    def done(self) -> None:
        elapsed = time.monotonic() - self._started
        self._write(f"{self._name}: done in {_clock(elapsed)}")
        if self._tty:
            self._out.write("\n")
            self._out.flush()
        self._width = 0

    def _write(self, line: str) -> None:
        if self._tty:
            pad = max(0, self._width - len(line))
            self._out.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self._out.write(line + "\n")
        self._out.flush()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"
