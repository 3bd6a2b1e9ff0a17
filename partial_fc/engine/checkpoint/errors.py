"""What a save or a load raises besides InputError about its arguments."""

from __future__ import annotations

from partial_fc.errors import InputError, PartialFCError


class CheckpointError(PartialFCError):
    """A checkpoint could not be written or read for a reason other than bad input (disk full, unshared root)."""


class CheckpointSaveError(CheckpointError):
    """A save failed (disk full, read-only or unwritable folder...); its `.partial` is gone, the older ones intact."""


class CorruptCheckpointError(InputError):
    """A checkpoint's files do not match its manifest (truncated, changed, missing) or its manifest is unreadable."""
