"""Exceptions whose messages are shown to users as they are (CLI exit code 2)."""


class CnnregError(Exception):
    """Base class: an error the user can act on; the message names the problem."""


class InputError(CnnregError, ValueError):
    """Bad input: unreadable file, wrong dimension, NaN, mismatched geometry, bad option."""


class DeviceError(CnnregError, RuntimeError):
    """The compute device cannot be used (missing CUDA, out of memory)."""


class CancelledError(CnnregError):
    """The user (or a callback) asked the run to stop."""
