"""Exceptions whose messages are shown to users as they are (CLI exit code 2)."""


class CnnregError(Exception):
    """Base class: an error the user can act on; the message names the problem."""


class InputError(CnnregError, ValueError):
    """Bad input: unreadable file, wrong dimension, NaN, mismatched geometry, bad option."""


class DeviceError(CnnregError, RuntimeError):
    """The compute device cannot be used (missing CUDA, out of memory)."""


class WriteError(DeviceError):
    """A result could not be written or did not read back as written (full disk, quota, I/O error)."""


class CancelledError(CnnregError):
    """Raised by a progress callback to stop a run: ``register``, ``build_atlas`` and ``train``
    let it propagate before anything is written; the command line exits with 130 for it, as
    for Ctrl-C and SIGTERM."""
