"""Learned mode: one forward pass of a trained network gives the displacement.

Resampling policy
    A network is trained on a fixed *working grid* (``working_shape`` in its checkpoint, e.g.
    64^3 for the shipped 3D brain weights): every training image's whole field of view was
    resampled to it, axis by axis.  :func:`predict_field` does the same with the pair:
    both images are resampled to the working shape (:func:`cnnreg.spatial.resize_image`,
    same field of view, Gaussian anti-aliasing when shrinking), the network runs once, and
    its field is resampled back to the fixed grid (:func:`cnnreg.spatial.resize_field`,
    linear, values rescaled per axis so the physical displacement is kept).  The field is
    therefore no finer than the working grid.  When an axis of the image is more than
    :data:`MAX_RESAMPLING_FACTOR` times larger or smaller than the working shape the
    anatomy would be at a scale the network never saw, so the pair is refused with an
    :class:`~cnnreg.errors.InputError` (crop or resample the images, or train a model for
    that grid).  A checkpoint without a working shape runs at the images' own size.

Symmetric prediction
    A velocity network (``diffeomorphic``) sees the pair both ways in one batched pass, and
    the field is ``exp((v(m, f) - v(f, m)) / 2)``: swapping the images then gives exactly the
    inverse map, and the average removes part of each direction's error.  With the shipped 3D
    weights it raised Dice on every benchmark case (the README's Results); it costs a second
    batch item of the forward pass.

Mirrored prediction
    The pair is also mirrored along the image's first index axis (the last tensor axis: left-right
    in axial brain scans), predicted in the same batched pass, and the prediction mirrored back
    (its last component negated) is averaged with the direct one, velocities before integrating.
    The field of a mirrored pair is then exactly the mirrored field, and averaging two
    predictions of the same map removes part of their independent errors (docs/decisions.md).
    It doubles the batch (4 items with the symmetric pass).

Shipped weights
    ``cnnreg/models/`` inside the backend package (the same relative place in a checkout, a pip
    install and the Slicer extension's installed module folder), or the folder named by the
    environment variable ``CNNREG_MODELS_DIR``, holds
    ``models.json`` listing each weights file with its dimension and SHA-256; the first
    entry with ``"default": true`` (else the first) for the pair's dimension is used.
    They are produced by ``scripts/train_weights.py`` (see the model card ``README.md`` there).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import MANIFEST_NAME, Checkpoint, load_checkpoint, read_manifest
from .errors import InputError
from .networks import RegistrationNetwork
from .spatial import resize_field, resize_image

#: largest accepted ratio between an image axis and the network's working shape (either way)
MAX_RESAMPLING_FACTOR = 4.0

MODELS_ENV = "CNNREG_MODELS_DIR"


def models_folder() -> Path:
    """Folder of the shipped weights (``$CNNREG_MODELS_DIR`` or the package's ``models/``)."""
    override = os.environ.get(MODELS_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "models"


def _how_to_get_weights(ndim: int) -> str:
    return (
        f"train them with `python scripts/train_weights.py` (writes {ndim}D and the other weights, "
        "models.json and the model card into CNNRegistration/cnnreg/models; see the README.md there), "
        "or train your own with `python -m cnnreg train` and pass it with --model FILE"
    )


def shipped_model_path(ndim: int) -> str:
    """Path of the shipped weights for ``ndim`` (2 or 3); InputError when none are shipped."""
    folder = models_folder()
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise InputError(f"no shipped {ndim}D weights: {manifest} does not exist; {_how_to_get_weights(ndim)}")
    entries = [e for e in read_manifest(manifest) if int(e.get("ndim", 0)) == ndim and e.get("file")]
    if not entries:
        raise InputError(f"no shipped {ndim}D weights are listed in {manifest}; {_how_to_get_weights(ndim)}")
    defaults = [e for e in entries if e.get("default")]
    entry = (defaults or entries)[0]
    path = folder / str(entry["file"])
    if not path.is_file():
        raise InputError(
            f"the shipped {ndim}D weights {path} listed in {manifest} are missing; {_how_to_get_weights(ndim)}"
        )
    return str(path)


def load_model(model_path: str | os.PathLike | None, ndim: int) -> Checkpoint:
    """The checkpoint at ``model_path`` (any recorded SHA-256 verified) or the shipped ``ndim``D
    weights (SHA-256 required), checked to be ``ndim``D."""
    if model_path is None:
        return load_checkpoint(shipped_model_path(ndim), expected_ndim=ndim, require_hash=True)
    return load_checkpoint(model_path, expected_ndim=ndim)


def _ensemble_choice(asked: bool | None, supported: bool, refusal: str, default: bool | None = None) -> bool:
    """``asked``, or ``default`` (else ``supported``) when None; InputError(``refusal``) when asked but unsupported."""
    if asked is None:
        return supported if default is None else default
    if asked and not supported:
        raise InputError(refusal)
    return bool(asked)


def check_resampling(shape, working_shape, path: str = "") -> None:
    """InputError when an axis of ``shape`` differs from ``working_shape`` by more than
    :data:`MAX_RESAMPLING_FACTOR` (see the module docstring)."""
    for axis, (n, w) in enumerate(zip(shape, working_shape)):
        factor = n / w
        if factor > MAX_RESAMPLING_FACTOR or factor < 1.0 / MAX_RESAMPLING_FACTOR:
            raise InputError(
                f"the image grid {tuple(shape)} is too far from the model's working grid {tuple(working_shape)} "
                f"(axis {axis}: {n} vs {w} voxels, factor {factor:.2f}; at most {MAX_RESAMPLING_FACTOR:g}x either way)"
                f"{' for ' + path if path else ''}; crop or resample the images, or train a model for that grid"
            )


def predict_field(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    model_path: str | os.PathLike | None = None,
    checkpoint: Checkpoint | None = None,
    symmetric: bool | None = None,
    mirror: bool | None = None,
) -> torch.Tensor:
    """Displacement from one (batched) forward pass of a trained network.

    Args:
        fixed, moving: ``(1, 1, *S)`` normalised images on the fixed grid (2D or 3D), on any device.
        model_path: checkpoint file; None = the shipped weights for the pair's dimension.
        checkpoint: an already loaded checkpoint (then ``model_path`` is ignored).
        symmetric: average the velocity predicted for the pair with the negated velocity for
            the swapped pair, in the same batched pass (see the module docstring); None = whenever
            the network predicts a velocity from the pair alone (the shipped weights do).
        mirror: also average with the prediction for the pair mirrored along the image's first
            index axis (the last tensor axis), mirrored back (see the module docstring); None =
            whenever the network predicts a velocity (the average is then taken before
            integrating, so the map stays diffeomorphic).

    Returns:
        ``u`` ``(1, ndim, *S)`` in voxels of the fixed grid, on the images' device and dtype.

    Raises:
        InputError: no/unusable weights, wrong dimension, grid too far from the working shape,
            an ensemble the network cannot run.
    """
    ndim = fixed.dim() - 2
    if ndim not in (2, 3) or fixed.shape[:2] != (1, 1) or moving.shape != fixed.shape:
        raise InputError(
            f"the learned mode needs fixed and moving as (1, 1, *S) tensors of the same 2D/3D shape, "
            f"got {tuple(fixed.shape)} and {tuple(moving.shape)}"
        )
    checkpoint = checkpoint or load_model(model_path, ndim)
    if checkpoint.ndim != ndim:
        raise InputError(f"model {checkpoint.path} holds {checkpoint.ndim}D weights but the images are {ndim}D")
    shape = tuple(fixed.shape[2:])
    working = checkpoint.working_shape or shape
    check_resampling(shape, working, checkpoint.path)
    network = checkpoint.network.to(device=fixed.device, dtype=torch.float32).eval()
    symmetric = _ensemble_choice(
        symmetric,
        bool(getattr(network, "supports_symmetric", False)),
        f"model {checkpoint.path} ({checkpoint.architecture}) cannot predict symmetrically: that needs a "
        "velocity (diffeomorphic) network on the image pair",
    )
    pair_network = isinstance(network, RegistrationNetwork)
    mirror = _ensemble_choice(
        mirror,
        pair_network,
        f"model {checkpoint.path} ({checkpoint.architecture}) cannot average a mirrored prediction: that needs "
        "a single network on the image pair",
        default=pair_network and network.diffeomorphic,
    )
    with torch.no_grad():
        pair = resize_image(torch.cat([moving, fixed], dim=1).to(torch.float32), working)
        field = network(pair, symmetric=symmetric, mirror=mirror) if pair_network else network(pair)
        u = resize_field(field, shape)
    return u.to(fixed.dtype)
