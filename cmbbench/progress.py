"""Progress reporting on stderr: a bar on a terminal, a periodic one-line status otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressReporter"]


class ProgressReporter:
    """Callable ``(done, total, label)`` that reports progress on ``stream`` (stderr).

    On a TTY it redraws a bar in place; otherwise it prints a status line at most every
    ``interval_s`` seconds and at the end. ``quiet`` silences it.
    """

    def __init__(self, what: str, *, stream: TextIO | None = None, quiet: bool = False,
                 interval_s: float = 10.0) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.interval_s = interval_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._last = -1e9

    def __call__(self, done: int, total: int, label: str = "") -> None:
        if self.quiet:
            return
        now = time.monotonic()
        elapsed = now - self.t0
        rate = f"{elapsed / done:.1f} s/item" if done else ""
        if self.tty:
            width = 30
            filled = int(width * done / total) if total else width
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.what} [{bar}] {done}/{total} {rate} {label[:30]:<30}")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif done >= total or now - self._last >= self.interval_s:
            self._last = now
            self.stream.write(f"{self.what}: {done}/{total} done, {elapsed:.0f} s elapsed"
                              f"{', ' + rate if rate else ''}{', last ' + label if label else ''}\n")
            self.stream.flush()
