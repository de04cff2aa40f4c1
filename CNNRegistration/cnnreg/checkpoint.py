"""Checkpoint files of the learned networks: save, verify (SHA-256) and rebuild.

A checkpoint is a ``torch.save`` dictionary that ``torch.load(weights_only=True)`` can read
(tensors and plain Python values only, no pickled classes)::

    {
        "format": "cnnreg-checkpoint", "version": 1,
        "architecture": "FAIMNet",          # class name in cnnreg.networks.ARCHITECTURES
        "config": {...},                    # the network's constructor kwargs (network.config)
        "state_dict": {...},
        "ndim": 3,
        "working_shape": [64, 64, 64],      # grid the network runs on (None = the input's own)
        "normalization": "max",             # intensity normalisation it was trained with
        "training": {...},                  # settings, metrics, history (JSON-like)
        # optional, for resuming training: "optimizer", "epoch", ...
    }

Integrity: :func:`save_checkpoint` writes a sidecar ``<file>.sha256`` (``sha256sum`` format);
the shipped weights are also listed with their SHA-256 in ``models.json`` next to them
(:data:`MANIFEST_NAME`).  :func:`load_checkpoint` verifies the file against whichever record
exists (both when both exist) and can insist that one does (``require_hash``).  Every
problem raises :class:`cnnreg.errors.InputError` with a message naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .errors import InputError, WriteError
from .networks import ARCHITECTURES, build_network

FORMAT = "cnnreg-checkpoint"
VERSION = 1
MANIFEST_NAME = "models.json"
REQUIRED_KEYS = ("architecture", "config", "state_dict", "ndim")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt network (CPU, eval mode) and its metadata."""

    network: nn.Module
    architecture: str
    ndim: int
    working_shape: tuple[int, ...] | None
    normalization: str
    training: dict = field(default_factory=dict)
    path: str = ""
    sha256: str = ""
    extra: dict = field(default_factory=dict)  # other keys (optimizer state, epoch...)


def plain(value):
    """``value`` with numpy scalars/arrays, tuples and enums turned into JSON-like Python values
    (what ``torch.load(weights_only=True)`` and ``json`` both accept).  Tensors are kept."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {(k if isinstance(k, (str, int)) else str(k)): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "value") and isinstance(value.value, (str, int, float)):  # enums
        return value.value
    if value is None:
        return None
    for kind in (bool, int, float, str):  # also turns subclasses (e.g. torch's version string) into the base type
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: str | os.PathLike) -> str:
    return os.fspath(path) + ".sha256"


def write_sidecar(path: str | os.PathLike, sha256: str | None = None) -> str:
    """Write ``<file>.sha256`` (``"<hex>  <basename>"``); returns the hash."""
    sha256 = sha256 or file_sha256(path)
    with open(sidecar_path(path), "w", encoding="utf-8") as handle:
        handle.write(f"{sha256}  {os.path.basename(os.fspath(path))}\n")
    return sha256


def save_checkpoint(path: str | os.PathLike, network: nn.Module, extra: Mapping | None = None) -> str:
    """Save ``network`` (with its ``config``) and ``extra`` metadata; write the SHA-256 sidecar.

    Args:
        path: output file (``.pt``); its folder is created.  Written atomically (temp + rename).
        network: a network from :data:`cnnreg.networks.ARCHITECTURES` (unwrapped, not DDP).
        extra: ``working_shape`` (sequence or None), ``normalization`` (str), ``training``
            (dict), and any other keys to store (e.g. ``optimizer`` state, ``epoch``).

    Returns:
        The file's hex SHA-256.
    """
    architecture = type(network).__name__
    if architecture not in ARCHITECTURES or not hasattr(network, "config"):
        raise ValueError(f"cannot checkpoint {architecture}: not one of {sorted(ARCHITECTURES)} with a .config")
    extra = dict(extra or {})
    ndim = int(getattr(network, "ndim", network.config.get("ndim", 0)))
    working_shape = extra.pop("working_shape", None)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture,
        "config": plain(network.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
        "ndim": ndim,
        "working_shape": None if working_shape is None else [int(n) for n in working_shape],
        "normalization": str(plain(extra.pop("normalization", "max"))),
        "training": plain(extra.pop("training", {})),
    }
    for key, value in extra.items():
        payload[key] = plain(value)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
        return write_sidecar(path)
    except OSError as error:  # full disk, quota, I/O: the previous checkpoint (if any) stays intact
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise WriteError(f"writing the checkpoint {path} failed: {error.strerror or error}") from error


def _recorded_hashes(path: str) -> dict[str, str]:
    """Recorded SHA-256 values of ``path``: ``{"sidecar": hex, "manifest": hex}`` (those present)."""
    records = {}
    sidecar = sidecar_path(path)
    if os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as handle:
            text = handle.read().split()
        if not text or len(text[0]) != 64:
            raise InputError(f"the SHA-256 record {sidecar} is malformed; delete it or re-save the checkpoint")
        records["sidecar"] = text[0].lower()
    manifest = os.path.join(os.path.dirname(os.path.abspath(path)), MANIFEST_NAME)
    if os.path.isfile(manifest):
        for entry in read_manifest(manifest):
            if entry.get("file") == os.path.basename(path) and entry.get("sha256"):
                records["manifest"] = str(entry["sha256"]).lower()
    return records


def read_manifest(manifest: str | os.PathLike) -> list[dict]:
    """Entries of a ``models.json`` manifest (``{"models": [{"file", "sha256", "ndim", ...}]}``)."""
    try:
        with open(manifest, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read the model manifest {manifest}: {error}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise InputError(f"the model manifest {manifest} has no 'models' list")
    return [m for m in models if isinstance(m, dict)]


def verify_sha256(path: str | os.PathLike, require_hash: bool = False) -> str:
    """Check ``path`` against its recorded SHA-256 (sidecar and/or manifest); returns the hash.

    Raises InputError on a mismatch, or when ``require_hash`` and no record exists.
    """
    path = os.fspath(path)
    actual = file_sha256(path)
    records = _recorded_hashes(path)
    if not records and require_hash:
        raise InputError(
            f"model file {path} has no recorded SHA-256 (no {os.path.basename(sidecar_path(path))} and no entry "
            f"in {MANIFEST_NAME}); refusing to use unverified weights"
        )
    for where, expected in records.items():
        if expected != actual:
            source = sidecar_path(path) if where == "sidecar" else MANIFEST_NAME
            raise InputError(
                f"model file {path} does not match its recorded SHA-256 in {source} (file {actual[:16]}..., "
                f"recorded {expected[:16]}...): it is corrupt, truncated or was changed after saving; "
                "restore it or retrain it"
            )
    return actual


def read_checkpoint_dict(path: str | os.PathLike, require_hash: bool = False) -> tuple[dict, str]:
    """Verify and ``torch.load(weights_only=True)`` a checkpoint; returns ``(dict, sha256)``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"model file not found: {path}")
    if not os.path.isfile(path):
        raise InputError(f"model path {path} is not a file")
    sha256 = verify_sha256(path, require_hash)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        reason = (
            f"it pickles the Python object {found.group(1)}" if found else "it holds Python objects, not only tensors"
        )
        raise InputError(
            f"model file {path} is not a cnnreg checkpoint: torch.load(weights_only=True) refused it ({reason}); "
            "cnnreg checkpoints hold only tensors and plain values -- only use files from a source you trust"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch.load raises many kinds on arbitrary bytes
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"model file {path} is corrupt or not a cnnreg checkpoint: cannot be read by torch ({reason})"
        ) from None
    if not isinstance(data, dict) or any(key not in data for key in REQUIRED_KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(
            f"model file {path} is not a cnnreg checkpoint: expected keys {list(REQUIRED_KEYS)}, found {found}"
        )
    return data, sha256


def load_checkpoint(
    path: str | os.PathLike, expected_ndim: int | None = None, require_hash: bool = False
) -> Checkpoint:
    """Load a checkpoint and rebuild its network (CPU, float32, eval mode).

    Args:
        path: checkpoint file written by :func:`save_checkpoint`.
        expected_ndim: 2 or 3 -- the dimension of the images it will be used on.
        require_hash: refuse files without a recorded SHA-256 (used for the shipped weights).

    Raises:
        InputError: missing file, corrupt or foreign file, SHA-256 mismatch, unknown
            architecture, weights of the wrong dimension, state dict that does not fit.
    """
    path = os.fspath(path)
    data, sha256 = read_checkpoint_dict(path, require_hash)
    architecture = str(data["architecture"])
    if architecture not in ARCHITECTURES:
        raise InputError(
            f"model file {path} holds an unknown architecture {architecture!r}; this version of cnnreg knows "
            f"{sorted(ARCHITECTURES)} (was it written by a newer version?)"
        )
    ndim = int(data["ndim"])
    if expected_ndim is not None and ndim != int(expected_ndim):
        raise InputError(
            f"model file {path} holds {ndim}D weights but the images are {int(expected_ndim)}D; "
            f"use a {int(expected_ndim)}D model (or omit --model to use the shipped {int(expected_ndim)}D weights)"
        )
    config = data["config"]
    if not isinstance(config, dict):
        raise InputError(f"model file {path} has a malformed network config ({type(config).__name__})")
    try:
        network = build_network(architecture, config)
    except (TypeError, ValueError, KeyError) as error:
        raise InputError(
            f"model file {path}: cannot rebuild {architecture} from its config {config}: {error}"
        ) from None
    try:
        network.load_state_dict(data["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        detail = " ".join(str(error).split())
        if len(detail) > 400:
            detail = detail[:400] + "..."
        raise InputError(
            f"model file {path}: its weights do not fit the {architecture} built from its config ({detail})"
        ) from None
    network.eval()
    shape = data.get("working_shape")
    if shape is not None and len(shape) != ndim:
        raise InputError(f"model file {path}: working shape {shape} does not have {ndim} axes")
    known = set(REQUIRED_KEYS) | {"format", "version", "working_shape", "normalization", "training"}
    return Checkpoint(
        network=network,
        architecture=architecture,
        ndim=ndim,
        working_shape=None if shape is None else tuple(int(n) for n in shape),
        normalization=str(data.get("normalization", "max")),
        training=dict(data.get("training") or {}),
        path=path,
        sha256=sha256,
        extra={k: v for k, v in data.items() if k not in known},
    )


def write_manifest(folder: str | os.PathLike, entries: Sequence[Mapping]) -> str:
    """Write ``models.json`` in ``folder`` from entries (``file``, ``ndim``, ``sha256``, ...)."""
    path = os.path.join(os.fspath(folder), MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(
            {"format": "cnnreg-models", "version": 1, "models": [plain(dict(e)) for e in entries]}, handle, indent=2
        )
        handle.write("\n")
    return path
