"""Output folders and files: checked before any work, written whole or not at all (no torch).

A run's results are written into a new temporary folder beside the output folder, each file
verified after writing (:func:`write_verified_image`), and only then put in place
(:func:`staged_folder`): a run that fails, is cancelled or is killed leaves no new file in
the output folder, and an existing folder replaced with ``--overwrite`` stays intact until
the new one is complete; afterwards it holds exactly the new run's files.  Single-file
outputs (``apply``) go through a temporary file and ``os.replace`` the same way
(:func:`staged_file`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence

from .errors import DeviceError, InputError


class WriteError(DeviceError):
    """A result could not be written or did not read back as written (full disk, quota, I/O error)."""


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_writable_parent(path: str) -> None:
    """InputError unless the folder that will hold ``path`` exists (created if missing) and accepts
    a new entry (proved by making and removing a temporary folder in it)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(parent, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".cnnreg-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as error:
        raise InputError(f"cannot write into {parent}: {error.strerror or error}") from None


def check_output_folder(
    out_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[str] = (), output_names: Iterable[str] = ()
) -> str:
    """Absolute path of ``out_dir`` after checking it can receive the outputs (nothing is written).

    Raises InputError when ``out_dir`` is a file, when it holds files and ``overwrite`` is
    False, when its folder is not writable, or when an input lies inside it (``--overwrite``
    replaces the whole folder) or is one of ``output_names``.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"output path {out_dir} exists and is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise InputError(
            f"output folder {out_dir} already exists and is not empty; choose another folder or pass --overwrite"
        )
    outputs = {os.path.join(out_dir, name) for name in output_names}
    for path in inputs:
        if not path:
            continue
        if os.path.abspath(path) in outputs:
            raise InputError(f"input {path} would be overwritten by an output; choose another output folder")
        if os.path.isdir(out_dir) and _inside(path, out_dir):
            raise InputError(
                f"input {path} lies inside the output folder {out_dir}, which the run replaces; "
                "choose another output folder"
            )
    check_writable_parent(out_dir)
    return out_dir


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike) -> Iterator[str]:
    """Yield a new empty folder beside ``out_dir``; when the block ends without an exception, it
    replaces ``out_dir`` (an existing folder is moved aside first and removed after the swap; it is
    restored if the swap fails).  On an exception (including KeyboardInterrupt) the new folder is
    removed and ``out_dir`` is left as it was; an OSError (full disk, I/O) becomes a WriteError."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        yield stage
        old = None
        if os.path.lexists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
        try:
            os.rename(stage, out_dir)
        except OSError:
            if old is not None:
                os.rename(old, out_dir)
            raise
        if old is not None:
            _remove(old)
    except OSError as error:  # a full disk, a quota, an I/O error while writing: exit code 3
        _remove(stage)
        raise WriteError(f"writing the results into {out_dir} failed: {error.strerror or error}") from error
    except BaseException:
        _remove(stage)
        raise


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path beside ``path`` (same suffix); it replaces ``path`` when the
    block ends without an exception and is removed otherwise."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    handle, stage = tempfile.mkstemp(prefix=f".{name}.partial-", suffix=suffix, dir=parent)
    os.close(handle)
    try:
        yield stage
        os.replace(stage, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(stage)
        raise


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def verify_image_file(path: str, expected) -> None:
    """WriteError unless ``path`` reads back as the SimpleITK image ``expected`` (same size,
    spacing, pixel type and voxel values).  SimpleITK does not raise on a short write (it prints
    "wrote only N of M bytes"), so this is what finds a full disk."""
    import numpy as np
    import SimpleITK as sitk

    try:
        if os.path.getsize(path) == 0:
            raise WriteError(f"writing {path} failed: the file is empty (disk full?)")
        back = sitk.ReadImage(path)
    except (OSError, RuntimeError) as error:
        raise WriteError(
            f"writing {path} failed: it does not read back ({str(error).strip().splitlines()[-1]})"
        ) from None
    layout = (back.GetSize(), back.GetNumberOfComponentsPerPixel())
    wanted = (expected.GetSize(), expected.GetNumberOfComponentsPerPixel())
    if layout != wanted:
        raise WriteError(
            f"writing {path} failed: it reads back as size {layout[0]} with {layout[1]} components per voxel "
            f"instead of {wanted[0]} with {wanted[1]}"
        )
    same = np.allclose(back.GetSpacing(), expected.GetSpacing()) and _same_values(
        sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(expected)
    )
    if not same:
        raise WriteError(f"writing {path} failed: the file does not hold what was written (disk full or I/O error?)")


def write_verified_image(image, path: str) -> None:
    """Write the SimpleITK ``image`` to ``path`` and check it reads back as written
    (:func:`verify_image_file`); WriteError naming the file otherwise."""
    from . import image as images

    images.write_image(image, path)
    verify_image_file(path, image)


def _same_values(a, b) -> bool:
    import numpy as np

    if a.shape != b.shape:
        return False
    if np.issubdtype(a.dtype, np.floating) or np.issubdtype(b.dtype, np.floating):
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def write_verified_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` and read it back; WriteError if that fails."""
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        with open(path, encoding="utf-8") as handle:
            ok = handle.read() == text
    except OSError as error:
        raise WriteError(f"writing {path} failed: {error.strerror or error}") from None
    if not ok:
        raise WriteError(f"writing {path} failed: the file does not hold what was written")
