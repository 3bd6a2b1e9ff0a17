"""Rank 0's running records, `metrics.jsonl` and TensorBoard events, that a full or read-only disk cannot crash.

A writer that fails warns once, naming its file and the cause, and writes nothing more in this run (a torn
record is not followed by others); training goes on. TensorBoard events are written synchronously through
tensorboardX's own event-file writer: its SummaryWriter writes from a thread, where a full disk ends in a
traceback and then in a queue that blocks the training loop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from partial_fc.fileio import os_error_cause
from partial_fc.progress import print_line

FLUSH_EVERY_S = 10.0


class _GuardedFile:
    """Runs writes through `_guard`: the first OSError warns once and turns the writer off."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self.failed = False

    def _guard(self, action: Callable[[], Any]) -> None:
        if self.failed:
            return
        try:
            action()
        except OSError as error:
            self.failed = True
            print_line(
                f"partial-fc: warning: cannot write {self.path}: {os_error_cause(error)}; no more {self.what} "
                "are written in this run (training goes on)"
            )


class MetricsFile(_GuardedFile):
    """`metrics.jsonl`: one JSON object per logged window, flushed as it is written."""

    def __init__(self, path: Path, append: bool) -> None:
        super().__init__(path, "metrics")
        self._handle: IO[str] | None = None
        self._guard(lambda: setattr(self, "_handle", open(path, "a" if append else "w", encoding="utf-8")))

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is not None:
            self._guard(lambda: (self._handle.write(json.dumps(record) + "\n"), self._handle.flush()))

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass  # already reported, or nothing more can be said


class TensorBoardFile(_GuardedFile):
    """An event file in `folder` that TensorBoard reads; scalars are flushed every `FLUSH_EVERY_S` and at close."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, "TensorBoard events")
        self._writer: Any = None
        self._flushed = time.monotonic()

        def open_events() -> None:
            from tensorboardX.event_file_writer import EventsWriter

            folder.mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(str(folder / "events"))

        self._guard(open_events)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        def write() -> None:
            for name, value in values.items():
                self._writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(name, value)))
            if time.monotonic() - self._flushed > FLUSH_EVERY_S:
                self._writer.flush()
                self._flushed = time.monotonic()

        self._guard(write)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            self._guard(writer.close)
