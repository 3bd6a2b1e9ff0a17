"""Exceptions the project raises for bad input, so callers and launchers can tell them from bugs."""


class PartialFCError(Exception):
    """Base of every error partial_fc raises on purpose."""


class InputError(PartialFCError, ValueError):
    """A tensor, label or argument handed to partial_fc is invalid; the message names the value."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the job needs does not exist; the message names it."""


class DatasetError(InputError):
    """A data set's layout or listing is invalid; the message names the file or folder (and line)."""
