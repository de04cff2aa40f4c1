"""Output folders: check, before any work, that results may be written (no torch import)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from .errors import InputError


def check_output_folder(
    out_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[str] = (), output_names: Iterable[str] = ()
) -> str:
    """Absolute path of ``out_dir`` after checking it can receive the outputs (nothing is written).

    Raises InputError when ``out_dir`` is a file, when it holds files and ``overwrite`` is
    False, or when one of ``output_names`` (file names inside ``out_dir``) is one of ``inputs``.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"output path {out_dir} exists and is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise InputError(
            f"output folder {out_dir} already exists and is not empty; choose another folder or pass --overwrite"
        )
    outputs = {os.path.join(out_dir, name) for name in output_names}
    for path in inputs:
        if path and os.path.abspath(path) in outputs:
            raise InputError(f"input {path} would be overwritten by an output; choose another output folder")
    return out_dir
