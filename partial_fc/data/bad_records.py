"""A record that cannot be used (broken framing, header, label or image), as the loader and check-data name it."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["BadRecord", "reason_of"]


class BadRecord(NamedTuple):
    """One unusable record: its file, key (None for an image file), byte offset (None when unknown) and why."""

    file: str
    key: int | None
    offset: int | None
    reason: str

    def __str__(self) -> str:
        place = [self.file] + [
            f"{name} {value}" for name, value in (("key", self.key), ("offset", self.offset)) if value is not None
        ]
        return f"{', '.join(place)}: {self.reason}"


def reason_of(error: Exception) -> str:
    """What is wrong, without the place: a format error's ``reason``, or an OS error's text."""
    if isinstance(error, OSError) and not hasattr(error, "reason"):
        return f"cannot read: {error.strerror or error}"
    return str(getattr(error, "reason", error))
