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
import dataclasses
import datetime
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence

from .errors import InputError, WriteError  # noqa: F401  (WriteError: also cnnreg.outputs.WriteError)


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


def add_overwrite_any_folder_argument(parser) -> None:
    """``--overwrite-any-folder``: what :func:`check_output_folder` needs to replace a folder that
    is not a result folder of the command (an argparse parser of a command with ``--out``)."""
    parser.add_argument(
        "--overwrite-any-folder",
        action="store_true",
        help="with --overwrite: replace the output folder even when it holds files that are not this command's "
        "results (they are deleted)",
    )


#: the file a running command keeps in its output folder (:func:`claimed_folder`)
LOCK_NAME = ".cnnreg-running"


def check_output_folder(
    out_dir: str | os.PathLike,
    overwrite: bool,
    inputs: Sequence[str] = (),
    output_names: Iterable[str] = (),
    overwrite_any_folder: bool = False,
) -> str:
    """Absolute path of ``out_dir`` after checking it can receive the outputs (nothing is written).

    Raises InputError when ``out_dir`` is empty text (an unset variable in a script), the
    current folder or one that holds it, a file, a folder another run is writing into, a
    non-empty folder without ``overwrite``, a folder with entries other than ``output_names``
    (not a result folder of this command: ``--overwrite`` would delete them) unless
    ``overwrite_any_folder``, not writable, or when an input lies inside it (``--overwrite``
    replaces the whole folder) or is one of ``output_names``.
    """
    if not os.fspath(out_dir).strip():
        raise InputError("the output folder (--out) is empty text; name a folder (is a variable in the script unset?)")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if _inside(os.getcwd(), out_dir):
        raise InputError(
            f"the output folder {out_dir} is the current folder or holds it; the results replace the whole output "
            "folder, so name a new folder for them (e.g. --out results)"
        )
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"output path {out_dir} exists and is a file, not a folder")
    if os.path.ismount(out_dir):
        raise InputError(
            f"the output folder {out_dir} is a mount point, which cannot be replaced by the finished results; "
            "name a folder inside it"
        )
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if LOCK_NAME in entries:
        _refuse_if_busy(os.path.join(out_dir, LOCK_NAME), out_dir)
        entries.remove(LOCK_NAME)  # left by a run that was killed: ignored, and replaced when claimed
    if entries and not overwrite:
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
    names = set(output_names)
    foreign = [entry for entry in entries if entry not in names]
    if foreign and not overwrite_any_folder:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(
            f"output folder {out_dir} holds {shown}, which are not results of this command; --overwrite replaces the "
            "whole folder and would delete them: choose another folder, or pass --overwrite-any-folder as well to "
            "replace it anyway"
        )
    check_writable_parent(out_dir)
    return out_dir


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_if_busy(lock: str, out_dir: str) -> None:
    """InputError naming the run that holds the lock file ``lock`` of ``out_dir`` while its
    process lives; nothing when the lock is a killed run's or cannot be read."""
    try:
        with open(lock, encoding="utf-8") as handle:
            pid_text, _, started = handle.read().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return
    if _process_alive(pid):
        raise InputError(
            f"another cnnreg run (process {pid}, started {started.strip() or 'at an unknown time'}) is writing into "
            f"{out_dir}; wait for it or choose another folder"
        )


@dataclasses.dataclass
class Claim:
    """An output folder taken by this run: its lock file and the entries it held when taken."""

    folder: str
    lock: str
    entries: frozenset


@contextlib.contextmanager
def claimed_folder(out_dir: str | os.PathLike) -> Iterator[Claim]:
    """Take ``out_dir`` for this run, atomically: the folder is created if missing and a lock
    file (:data:`LOCK_NAME`, with this process's id) is created in it with ``O_EXCL``, so a
    second run on the same folder is refused (exit 2, naming this one) instead of replacing the
    results of the first.  Give the claim to :func:`staged_folder`, which checks before its swap
    that nothing else appeared in the folder.  On leaving, the lock is removed, and a folder
    this run created is removed if it is still empty (a failed run leaves nothing)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    created = False
    try:
        os.mkdir(out_dir)
        created = True
    except FileExistsError:
        pass
    except OSError as error:
        raise InputError(f"cannot create the output folder {out_dir}: {error.strerror or error}") from None
    lock = os.path.join(out_dir, LOCK_NAME)
    stamp = f"{os.getpid()} {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                _refuse_if_busy(lock, out_dir)
            except InputError:
                if created:
                    os.rmdir(out_dir)
                raise
            with contextlib.suppress(OSError):  # a killed run's lock
                os.remove(lock)
    else:
        raise InputError(f"cannot take the output folder {out_dir}: its lock file keeps reappearing")
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(stamp)
    claim = Claim(out_dir, lock, frozenset(set(os.listdir(out_dir)) - {LOCK_NAME}))
    try:
        yield claim
    finally:
        with contextlib.suppress(OSError):
            with open(lock, encoding="utf-8") as handle:
                ours = handle.read() == stamp
            if ours:
                os.remove(lock)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only when empty: a failed run leaves no folder behind


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, claim: Claim | None = None) -> Iterator[str]:
    """Yield a new empty folder beside ``out_dir``; when the block ends without an exception, it
    replaces ``out_dir`` (an existing folder is moved aside first and removed after the swap; it is
    restored if the swap fails).  On an exception (including KeyboardInterrupt) the new folder is
    removed and ``out_dir`` is left as it was; an OSError (full disk, I/O) becomes a WriteError."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_partials(parent, name)
    stage = tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=parent)
    # mkdtemp makes 0700: give the results the mode of the folder they replace, else the umask's
    os.chmod(stage, _folder_mode(out_dir))
    try:
        yield stage
        if claim is not None:
            appeared = sorted(set(os.listdir(out_dir)) - claim.entries - {LOCK_NAME}) if os.path.isdir(out_dir) else []
            if appeared:
                kept = tempfile.mkdtemp(prefix=f"{name}.results-", dir=parent)
                os.rmdir(kept)
                os.rename(stage, kept)
                raise InputError(
                    f"{', '.join(appeared[:5])} appeared in the output folder {out_dir} during the run; it was not "
                    f"replaced, and this run's results are in {kept}"
                )
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
    os.chmod(stage, _folder_mode(path) & 0o666)  # mkstemp makes 0600: the replaced file's mode, else the umask's
    try:
        yield stage
        os.replace(stage, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(stage)
        raise


def _folder_mode(out_dir: str) -> int:
    """The permission bits (setgid included) the results folder gets: those of the folder it
    replaces, or a new folder's under the process's umask."""
    try:
        return os.stat(out_dir).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o777 & ~umask


def _remove_stale_partials(parent: str, name: str) -> None:
    """Remove the ``.NAME.partial-PID-*`` folders left beside ``NAME`` by runs that were killed
    (their process is gone); another live run's are kept."""
    prefix = f".{name}.partial-"
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        pid_text = entry[len(prefix) :].split("-", 1)[0] if entry.startswith(prefix) else ""
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _process_alive(int(pid_text)):
            _remove(os.path.join(parent, entry))


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
