"""A progress line for long jobs on stderr that works without a terminal, and a closing summary."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def print_line(text: str, stream: TextIO | None = None) -> None:
    """Write `text` and its newline in one write (to stderr by default, as it is now), so launchers that tag output
    per chunk keep it one line."""
    stream = sys.stderr if stream is None else stream
    stream.write(text + "\n")
    stream.flush()


class Progress:
    """`update(n)` as work is done; redraws at most every `interval` seconds; `close()` prints the last state."""

    def __init__(self, total: int | None, label: str, stream: TextIO = sys.stderr, interval: float = 1.0) -> None:
        self.total, self.label, self.stream, self.interval = total, label, stream, interval
        self.done = 0
        self.started = self._last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            percent = 100.0 * self.done / self.total
            line = f"{self.label}: {self.done}/{self.total} ({percent:5.1f}%) {rate:,.0f}/s, {left:,.0f}s left"
        else:
            line = f"{self.label}: {self.done} {rate:,.0f}/s"
        end = "\r" if self.stream.isatty() else "\n"
        self.stream.write(line + end)
        self.stream.flush()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def close(self) -> None:
        self._draw(time.monotonic())
        if self.stream.isatty():
            self.stream.write("\n")
