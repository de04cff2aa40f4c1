"""Register two SimpleITK images end to end and write the results.

This is the backend's public entry point (the command line and the Slicer module both go
through it)::

    result = register(fixed, moving, RegistrationSettings(mode="phantom"), moving_labels=labels)
    write_result(result, "results/")

The moving image is resampled onto the fixed grid (through the optional affine
pre-alignment), both are normalised, a displacement ``u`` is estimated on the fixed grid
(voxels), and every output is produced from the exported ITK displacement field, so that
``warped.nii.gz`` is exactly what SimpleITK (or Slicer) gives when applying
``displacement.nii.gz`` to the original moving image.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import SimpleITK as sitk
import torch

from . import image as im
from . import outputs
from .device import (
    describe_device,
    out_of_memory_as_device_error,
    resolve_device,
    reuse_freed_memory,
    seed_everything,
)
from .errors import DeviceError, InputError
from .grid import same_grid
from .instance import optimize_field
from .jacobian import determinant_map, determinant_summary
from .losses import similarity_gain, similarity_options, similarity_value
from .phantom import optimize_cnn
from .pyramid import ProgressCallback
from .settings import (
    OUTPUT_FILES,
    REGISTRATION_SUMMARY,
    Interpolation,
    Mode,
    Normalization,
    OptimizationSettings,
    RegistrationSettings,
)
from .spatial import warp


@dataclass
class RegistrationResult:
    """Outputs on the fixed grid: images are SimpleITK; ``u`` is ``(1, ndim, *S)`` voxels of the
    grid the field was estimated on (the fixed grid, or the working grid of ``summary["working_grid"]``)."""

    displacement: sitk.Image  # ITK displacement field, LPS mm, vector float64 (float32 from a working grid)
    warped: sitk.Image
    jacobian: sitk.Image  # det J, float32
    summary: dict
    warped_labels: sitk.Image | None = None
    u: torch.Tensor | None = None
    fixed: sitk.Image | None = None
    moving_on_fixed: sitk.Image | None = None
    #: the inverse mapping (fixed -> moving points become moving -> fixed), an ITK displacement
    #: field on the moving grid (LPS mm, pull: fixed-space images resampled onto the moving grid)
    inverse_displacement: sitk.Image | None = None


#: peak memory per voxel of the fixed grid, bytes, by mode, with a margin: measured on CPU at
#: 96^3 (instance 776 MiB peak, ~450 MiB above the process's imports) and 160x192x224
#: (phantom 3.5 GiB); on top of it the imports (BASELINE_BYTES) and the images as read.
BYTES_PER_VOXEL = {Mode.INSTANCE: 700, Mode.PHANTOM: 700, Mode.LEARNED: 300, Mode.LEARNED_REFINE: 700}
BASELINE_BYTES = 600 * 2**20


#: memory per voxel of the fixed grid for the outputs when the field is estimated on a coarser
#: working grid (the field in float32, warped image and labels, det J, the images as read, the QC),
#: with a margin: the 512x512x133 CT on a 3 mm grid peaked at 3.24 GiB (instance mode, CPU)
OUTPUT_BYTES_PER_VOXEL = 56


def estimate_memory_bytes(
    fixed_size: Sequence[int],
    moving_size: Sequence[int],
    mode: Mode | str,
    working_size: Sequence[int] | None = None,
    features: int = 16,
) -> int:
    """Rough peak memory of a CPU run (bytes) from the image sizes alone; ``working_size``: the
    grid the field is estimated on when it is not the fixed grid (:func:`cnnreg.image.working_size`);
    ``features``: the phantom CNN's width (its activations grow with it; measured at 16)."""
    fixed_voxels, moving_voxels = int(np.prod(fixed_size)), int(np.prod(moving_size))
    per_voxel = BYTES_PER_VOXEL[Mode(mode)] * (max(1.0, features / 16) if Mode(mode) is Mode.PHANTOM else 1.0)
    if working_size is None or tuple(working_size) == tuple(fixed_size):
        return int(BASELINE_BYTES + per_voxel * fixed_voxels + 16 * moving_voxels)
    working_voxels = int(np.prod(working_size))
    return int(BASELINE_BYTES + per_voxel * working_voxels + OUTPUT_BYTES_PER_VOXEL * fixed_voxels + 16 * moving_voxels)


def working_spacing(settings: RegistrationSettings, size: Sequence[int], spacing: Sequence[float]) -> float:
    """The working spacing (mm) of a run on a fixed image of ``size`` voxels of ``spacing`` mm: the
    one set, or the coarser one the voxel budget ``max_working_voxels`` needs (0 = the fixed grid)."""
    return max(settings.working_spacing, im.budget_spacing(size, spacing, settings.max_working_voxels))


def memory_needed(
    fixed_size: Sequence[int],
    moving_size: Sequence[int],
    settings: RegistrationSettings,
    fixed_spacing: Sequence[float] | None = None,
) -> tuple[int, tuple[int, ...], float]:
    """(bytes, working grid size, working spacing mm) of a run on images of these sizes: the
    grid the field is estimated on (:func:`working_spacing`) and :func:`estimate_memory_bytes`."""
    spacing = fixed_spacing if fixed_spacing is not None else (1.0,) * len(fixed_size)
    chosen = working_spacing(settings, fixed_size, spacing)
    working = im.working_size(fixed_size, spacing, chosen)
    features = settings.optimization.features
    return estimate_memory_bytes(fixed_size, moving_size, settings.mode, working, features), working, chosen


def check_memory(
    fixed_size: Sequence[int],
    moving_size: Sequence[int],
    settings: RegistrationSettings,
    fixed_spacing: Sequence[float] | None = None,
) -> int:
    """DeviceError when a run on images of these sizes (from their headers,
    :func:`cnnreg.image.grid_from_header`, before any image is read) would need more memory than
    the machine has available (CPU runs); the message names a working grid that would fit.
    Returns the estimate in bytes."""
    from .device import available_memory_bytes

    needed, working, chosen = memory_needed(fixed_size, moving_size, settings, fixed_spacing)
    spacing = fixed_spacing if fixed_spacing is not None else (1.0,) * len(fixed_size)
    features = settings.optimization.features
    available = available_memory_bytes()
    if available is not None and needed > available and resolve_device(settings.device).type == "cpu":
        advice = "crop or resample the images"
        for candidate in (1.5, 2.0, 3.0, 4.0, 6.0):  # the finest working spacing that fits, if any
            if candidate > chosen and fixed_spacing is not None:
                size = im.working_size(fixed_size, spacing, candidate)
                if estimate_memory_bytes(fixed_size, moving_size, settings.mode, size, features) < available:
                    advice = (
                        f"register on a coarser grid with --working-spacing {candidate:g} (a "
                        f"{'x'.join(map(str, size))} working grid; the field is still returned on the fixed grid), "
                        "or crop the images"
                    )
                    break
        raise DeviceError(
            f"this run needs about {needed / 2**30:.1f} GiB of memory (a {'x'.join(map(str, working))} working grid "
            f"for a {'x'.join(map(str, fixed_size))} fixed image, {'x'.join(map(str, moving_size))} moving, "
            f"{settings.mode.value} mode) but only {available / 2**30:.1f} GiB are available; {advice}"
            + (", or lower --max-cnn-voxels" if settings.mode is Mode.PHANTOM else "")
        )
    return needed


#: more folded voxels than this (fraction) is a failed registration (a diverged optimisation):
#: the presets and defaults stay below 0.0001 on every benchmark case
MAX_FOLDING_FRACTION = 0.01
#: a similarity worse than before by more than this fraction of its value is a failed
#: registration (a smaller loss of similarity, e.g. one learned pass off its training domain, is
#: a warning)
WORSE_SIMILARITY = 0.01
#: below this (natural units; intensities are normalised to ~[0, 1]) a change of similarity is
#: numerical noise: an image registered to itself moved its MSE from 0 to 5e-7
SIMILARITY_NOISE = 1e-4


def check_field_length(u: torch.Tensor) -> None:
    """FloatingPointError (exit code 4) when the estimate ``u`` ``(1, ndim, *S)`` (voxels) reaches
    farther than the whole grid: a numerical failure, not a registration."""
    with torch.no_grad():
        longest = float(u.detach().pow(2).sum(1).sqrt().max())
    extent = max(u.shape[2:])
    if not np.isfinite(longest) or longest > extent:
        raise FloatingPointError(
            f"the estimated displacement reaches {longest:.3g} voxels, more than the whole {extent}-voxel grid: "
            "the optimisation diverged"
        )


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def _estimate_field(
    settings: RegistrationSettings,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    mask: torch.Tensor | None,
    callback: ProgressCallback | None,
) -> torch.Tensor:
    mode = settings.mode
    opt = settings.optimization
    if mode is Mode.PHANTOM:
        return optimize_cnn(fixed, moving, opt, mask=mask, callback=callback)
    if mode is Mode.INSTANCE:
        return optimize_field(fixed, moving, opt, mask=mask, callback=callback)
    from .learned import predict_field  # the learned modes need shipped weights

    u = predict_field(fixed, moving, settings.model)
    schedule = settings.refine_schedule(math.prod(fixed.shape[2:]))
    if mode is Mode.LEARNED_REFINE and sum(schedule) > 0:
        refine = OptimizationSettings(**{**asdict(opt), "iterations": schedule})
        u = optimize_field(
            fixed, moving, refine, initial=u, mask=mask, callback=callback, levels=len(schedule), stage="refine "
        )
    return u


def _affine_record(pre_transform: sitk.Transform | None, dim: int) -> dict:
    """The affine pre-alignment in the summary: fixed -> moving physical, ``p -> M p + t`` (LPS
    mm), and det M (the factor by which it scales volumes; 1 without one)."""
    if pre_transform is None:
        return {"affine_matrix": None, "affine_offset_mm": None, "affine_determinant": 1.0}
    matrix, offset = im.affine_matrix(pre_transform, dim)
    return {
        "affine_matrix": matrix.tolist(),
        "affine_offset_mm": offset.tolist(),
        "affine_determinant": float(np.linalg.det(matrix)),
    }


#: the inverse is computed on a grid of at most this many voxels over the field's extent (ITK's
#: fixed-point inversion of a 1 mm head's 8.7 M-voxel field takes 16 s on 2 threads; the field is
#: smooth on the scale of the coarser grid, and the residual below measures what it costs)
INVERSE_MAX_VOXELS = 2**21


def _inverse(
    u: torch.Tensor,
    grid: sitk.Image,
    pre_transform: sitk.Transform | None,
    forward: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image | None,
) -> dict:
    """The inverse displacement field on the moving grid (:func:`cnnreg.image.inverse_displacement`)
    and the residual of forward after inverse (mm) over the moving voxels that map inside the
    grid the field was estimated on (2 voxels in), and inside the moving labels when given."""
    deformation = forward if pre_transform is None else im.displacement_image(u[0].numpy(), grid, None)
    coarse = im.working_grid(
        deformation, im.budget_spacing(deformation.GetSize(), deformation.GetSpacing(), INVERSE_MAX_VOXELS)
    )
    if coarse is not None:  # its last samples may lie past the field's last voxel centre: extrapolated
        deformation = sitk.Resample(deformation, coarse, useNearestNeighborExtrapolator=True)
    field = im.inverse_displacement(deformation, pre_transform, moving)
    if field.GetDimension() != moving.GetDimension() or field.GetSize() != moving.GetSize():
        return {"field": field, "residual": None}
    dim = grid.GetDimension()
    # measured on every second voxel along each axis of a large grid: the same statistics, an eighth of the cost
    step = 2 if math.prod(field.GetSize()) > INVERSE_MAX_VOXELS else 1
    every = tuple(slice(None, None, step) for _ in range(dim))
    sampled = field[every] if step > 1 else field
    voxels = moving[every] if step > 1 else moving
    points = im.physical_points(voxels) + sitk.GetArrayViewFromImage(sampled)  # where each moving voxel maps to
    matrix = np.asarray(grid.GetDirection()).reshape(dim, dim) @ np.diag(grid.GetSpacing())
    index = (points - np.asarray(grid.GetOrigin())) @ np.linalg.inv(matrix).T  # (i, j[, k])
    region = np.all((index >= 2) & (index <= np.asarray(grid.GetSize()) - 3), axis=-1)
    del points, index
    what = "moving voxels that map inside the fixed field of view"
    if moving_labels is not None:
        region &= sitk.GetArrayViewFromImage(moving_labels[every] if step > 1 else moving_labels) > 0
        what = "moving labels (> 0) that map inside the fixed field of view"
    if step > 1:
        what += f", every {step}nd voxel along each axis"
    residual = im.inverse_residual_mm(forward, sampled, region)
    return {"field": field, "residual": {**residual, "region": what, "voxels": int(region.sum())}}


def _measure(opt: OptimizationSettings, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None) -> float:
    """The similarity of the settings, in its natural units (no gradient)."""
    with torch.no_grad():
        return float(
            similarity_value(opt.similarity, fixed, warped, mask, **similarity_options(opt.similarity, opt.window))
        )


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    settings: RegistrationSettings | None = None,
    moving_labels: sitk.Image | None = None,
    fixed_mask: sitk.Image | None = None,
    callback: Callable[[dict], None] | None = None,
    keep_failed: bool = False,
) -> RegistrationResult:
    """Deformably register ``moving`` to ``fixed``.

    Args:
        fixed, moving: scalar 2D/3D images (any grids; moving is resampled onto fixed).
        settings: mode, losses, device...; defaults to instance mode with LNCC + diffusion.
        moving_labels: optional label map on the moving grid, warped with nearest neighbour.
        fixed_mask: optional mask on the fixed grid restricting the similarity.
        callback: receives progress dicts (``{"event": "progress", "stage", "iteration",
            "iterations", "fraction", "loss", ...}``); raising stops the run.

        keep_failed: return the result of a failed registration (more than
            :data:`MAX_FOLDING_FRACTION` folded, or the similarity worse than before over the voxels
            where both images are defined) with ``summary["failed"]`` saying why, instead of raising.

    Raises:
        InputError for bad images/settings, DeviceError for device problems, FloatingPointError
        for a failed registration (unless ``keep_failed``).
    """
    settings = settings or RegistrationSettings()
    settings.validate()
    # the mode's default interpolation made explicit (the summary and warped.nii.gz say which)
    optimization = replace(settings.optimization, interpolation=settings.optimization.interpolation_for(settings.mode))
    settings = replace(settings, optimization=optimization)
    im.check_image(fixed, "fixed image")
    im.check_image(moving, "moving image")
    im.check_pair(fixed, moving)
    if moving_labels is not None:
        im.check_labels(moving_labels, moving)
    if fixed_mask is not None:
        if not same_grid(fixed_mask, fixed):
            raise InputError(
                f"fixed mask is not on the fixed image grid (mask size {fixed_mask.GetSize()}, fixed {fixed.GetSize()})"
            )
        if not np.any(sitk.GetArrayViewFromImage(fixed_mask)):
            raise InputError("fixed mask is empty (no voxel is inside it)")

    if settings.normalization is Normalization.CT:
        im.check_hounsfield(fixed, "fixed image")
        im.check_hounsfield(moving, "moving image")

    device = resolve_device(settings.device)
    seed_everything(settings.seed)
    start = time.perf_counter()

    # the grid the field is estimated on: the fixed grid, or a coarser one over the same extent
    grid = im.working_grid(fixed, working_spacing(settings, fixed.GetSize(), fixed.GetSpacing()))
    fixed_work = im.resample_smoothed(fixed, grid) if grid is not None else fixed
    background = im.background_value(moving, settings.normalization)
    pre_transform = None
    if settings.affine:
        pre_transform = im.affine_prealign(
            im.normalized_image(fixed_work, settings.normalization), im.normalized_image(moving, settings.normalization)
        )
    moving_on_fixed = im.resample(
        sitk.Cast(moving, sitk.sitkFloat32), fixed_work, pre_transform, default_value=background
    )
    fixed_array = im.normalize(im.to_array(fixed_work), settings.normalization)
    moving_array = im.normalize(im.to_array(moving_on_fixed), settings.normalization)
    if float(moving_array.max()) == float(moving_array.min()):
        raise InputError(
            "moving image does not overlap the fixed image: it is constant once resampled onto the fixed grid"
            + ("" if settings.affine else " (if the two are not aligned, add --affine)")
        )

    fixed_t = _to_tensor(fixed_array, device)
    moving_t = _to_tensor(moving_array, device)
    if fixed_mask is not None and grid is not None:
        fixed_mask = im.resample(fixed_mask, fixed_work, interpolation=Interpolation.NEAREST)
    mask_t = _to_tensor(im.to_array(fixed_mask) > 0, device) if fixed_mask is not None else None
    opt = settings.optimization
    # where the moving image has data (1 inside its grid, 0 where resampling filled it in)
    domain = sitk.Image(moving.GetSize(), sitk.sitkFloat32)
    domain.CopyInformation(moving)
    domain_t = _to_tensor(im.to_array(im.resample(domain + 1.0, fixed_work, pre_transform)), device)

    before = _measure(opt, fixed_t, moving_t, mask_t)
    ran: dict[str, int] = {}  # stage -> iterations it ran (what the schedule became, early stops included)
    requested: dict[str, int] = {}  # stage -> its iterations in the schedule (defaults depend on the grid)

    def record(event: dict) -> None:
        if event.get("event") == "progress":
            ran[event["stage"]] = max(ran.get(event["stage"], 0), int(event["iteration"]))
            if "iterations" in event:
                requested[event["stage"]] = int(event["iterations"])
        if callback is not None:
            callback(event)

    what = f"{settings.mode.value} registration of a {tuple(fixed_t.shape[2:])} grid"
    # freed tensors reused by the measures after the optimisation too (images of the grid's size)
    with out_of_memory_as_device_error(device, what), reuse_freed_memory(device):
        u = _estimate_field(settings, fixed_t, moving_t, mask_t, record)
        check_field_length(u)
        # zeros outside and the same interpolation, as in warped.nii.gz
        warped_t = warp(moving_t, u, opt.interpolation, padding="zeros")
        after = _measure(opt, fixed_t, warped_t, mask_t)
        # the same two measured over the voxels where the moving image has data before and after
        # (zero-filled borders would read as a change): what decides a failed registration
        region = (domain_t > 0.999) & (warp(domain_t, u, Interpolation.LINEAR, padding="zeros") > 0.999)
        if mask_t is not None:
            region &= mask_t > 0
        if int(region.sum()) > 0:
            region_t = region.to(fixed_t.dtype)
            overlap_before = _measure(opt, fixed_t, moving_t, region_t)
            overlap_after = _measure(opt, fixed_t, warped_t, region_t)
        else:
            overlap_before, overlap_after = before, after
        del region, domain_t, warped_t
    elapsed = time.perf_counter() - start
    # the outputs need only u: free the working images first, and keep u in float32 (its own
    # precision) -- the field conversion and det J run in float64 slab by slab
    del fixed_t, moving_t, mask_t, fixed_array, moving_array
    u = u.detach().to("cpu")
    working_field = im.displacement_image(u[0].numpy(), fixed_work, pre_transform)
    determinant = determinant_map(u)  # float64, as the summary statistics (of the working grid)
    jacobian_image = im.array_to_image(determinant[0].numpy().astype(np.float32), fixed_work)
    jacobian = determinant_summary(determinant)
    del determinant
    field_image = working_field
    if grid is not None:
        # on the fixed grid: the working field interpolated linearly (exactly what ITK's
        # DisplacementFieldTransform of the working field evaluates there, so the images below are
        # warped through the small working field), in float32, the precision of the written file
        field_image = im.resample(sitk.Cast(working_field, sitk.sitkVectorFloat32), fixed)
        jacobian_image = im.resample(jacobian_image, fixed)
        moving_on_fixed = im.resample(
            sitk.Cast(moving, sitk.sitkFloat32), fixed, pre_transform, default_value=background
        )
    warped = im.apply_displacement(
        moving, working_field, reference=fixed, interpolation=opt.interpolation, default_value=background
    )
    warped_labels = None
    if moving_labels is not None:
        warped_labels = im.apply_displacement(
            moving_labels, working_field, reference=fixed, interpolation=im.label_interpolation(moving_labels, fixed)
        )
    inverse = _inverse(u, fixed_work, pre_transform, working_field, moving, moving_labels)
    del working_field
    failures = []
    if jacobian["folding_fraction"] > MAX_FOLDING_FRACTION:
        failures.append(
            f"the estimated field folds {jacobian['folding_percent']:.2f} % of the voxels (det J <= 0; at most "
            f"{100 * MAX_FOLDING_FRACTION:g} % is accepted): the optimisation diverged"
        )
    gain = similarity_gain(opt.similarity, overlap_before, overlap_after)
    if gain < -(WORSE_SIMILARITY * max(abs(overlap_before), abs(overlap_after)) + SIMILARITY_NOISE):
        failures.append(
            f"the {opt.similarity.value} similarity got worse ({overlap_before:.4f} -> {overlap_after:.4f}, over the "
            "voxels where both images are defined)"
        )
    if failures and not keep_failed:
        raise FloatingPointError(
            "the registration failed: " + "; ".join(failures) + ". Nothing was written (--keep-failed keeps the "
            "results of a failed registration; --affine helps images that are not aligned)"
        )

    iterations_ran = list(ran.values())
    warnings = []
    if settings.normalization is not Normalization.CT and im.looks_like_hounsfield(fixed):
        warnings.append(
            "the fixed image looks like a CT in Hounsfield units but was normalised with "
            f"'{settings.normalization.value}': --normalization ct (or --preset phantom-to-ct) windows HU and "
            "treats padding as air"
        )
    if not failures and gain <= 0:
        warnings.append(
            f"the {opt.similarity.value} similarity did not improve ({before:.4f} -> {after:.4f}) with "
            f"{iterations_ran} iterations per level in {settings.mode.value} mode: the schedule may be too "
            "short (raise --iterations, or leave it out for the mode's default) or the images may not overlap"
        )
    summary = {
        "mode": settings.mode.value,
        "similarity": opt.similarity.value,
        "regularizer": opt.regularizer.value,
        "weight": opt.weight,
        "jacobian_weight": opt.jacobian_weight,
        "levels": len(ran),
        "iterations": iterations_ran,
        # the default schedule depends on the grid (settings.LARGE_LEVEL_VOXELS): what it became
        "iterations_requested": (
            list(requested.values())
            if requested
            and (
                (opt.iterations is None and settings.mode in (Mode.INSTANCE, Mode.PHANTOM))
                or (settings.refine_iterations is None and settings.mode is Mode.LEARNED_REFINE)
            )
            else settings.iterations_requested()
        ),
        "device": describe_device(device),
        "seed": settings.seed,
        "affine": settings.affine,
        **_affine_record(pre_transform, fixed.GetDimension()),
        "normalization": settings.normalization.value,
        "working_grid": {"size": list(fixed_work.GetSize()), "spacing": list(fixed_work.GetSpacing())},
        "interpolation": opt.interpolation.value,
        "labels_interpolation": im.label_interpolation(moving_labels, fixed).value
        if moving_labels is not None
        else None,
        "seconds": round(elapsed, 3),
        "similarity_before": before,
        "similarity_after": after,
        "similarity_overlap_before": overlap_before,
        "similarity_overlap_after": overlap_after,
        "failed": "; ".join(failures) or None,
        "warnings": warnings,
        "inverse_residual_mm": inverse["residual"],
        "fixed_size": list(fixed.GetSize()),
        "fixed_spacing": list(fixed.GetSpacing()),
        **jacobian,
    }
    if set(summary) != set(REGISTRATION_SUMMARY):  # one definition: cnnreg.settings.REGISTRATION_SUMMARY
        raise RuntimeError(f"summary keys differ from REGISTRATION_SUMMARY: {set(summary) ^ set(REGISTRATION_SUMMARY)}")
    return RegistrationResult(
        displacement=field_image,
        warped=warped,
        jacobian=jacobian_image,
        summary=summary,
        warped_labels=warped_labels,
        u=u.to(torch.float64),
        fixed=fixed,
        moving_on_fixed=moving_on_fixed,
        inverse_displacement=inverse["field"],
    )


def _float32(field: sitk.Image | None) -> sitk.Image | None:
    """A displacement field as written (vector float32), or None."""
    if field is None or field.GetPixelID() == sitk.sitkVectorFloat32:
        return field
    return sitk.Cast(field, sitk.sitkVectorFloat32)


def check_output_folder(
    out_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[str] = (), overwrite_any_folder: bool = False
) -> str:
    """Check ``out_dir`` can receive the registration results (before any work); returns its
    absolute path.  See :func:`cnnreg.outputs.check_output_folder`."""
    return outputs.check_output_folder(out_dir, overwrite, inputs, OUTPUT_FILES.values(), overwrite_any_folder)


def write_result(
    result: RegistrationResult, out_dir: str | os.PathLike, qc: bool = True, claim: outputs.Claim | None = None
) -> dict[str, str]:
    """Write the result files into ``out_dir``; returns name -> path.

    The files are written into a new folder beside ``out_dir``, each read back and compared
    (:func:`cnnreg.outputs.write_verified_image`), and that folder then replaces ``out_dir``
    (:func:`cnnreg.outputs.staged_folder`): on any failure nothing of this run is left and an
    existing ``out_dir`` is untouched; on success ``out_dir`` holds exactly these files.  The
    QC picture is optional: if it cannot be drawn, the run still succeeds and the summary says
    why (``qc_error``).  Raises :class:`cnnreg.errors.WriteError` when a file cannot be written.
    ``claim``: the folder as taken by :func:`cnnreg.outputs.claimed_folder` at the start of the run
    (the swap is then refused if anything else appeared in it meanwhile).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    names = {}
    summary = dict(result.summary)
    displacement = _float32(result.displacement)  # a copy only when needed (a CT's field is ~0.4 GB)
    with outputs.staged_folder(out_dir, claim) as stage:
        for key, image in (
            ("warped", result.warped),
            ("displacement", displacement),
            ("jacobian", result.jacobian),
            ("warped_labels", result.warped_labels),
            ("inverse_displacement", _float32(result.inverse_displacement)),
        ):
            if image is not None:
                outputs.write_verified_image(image, os.path.join(stage, OUTPUT_FILES[key]))
                names[key] = OUTPUT_FILES[key]
        if qc and result.fixed is not None:
            try:
                from .qc import qc_figure

                qc_figure(
                    result.fixed,
                    result.moving_on_fixed,
                    result.warped,
                    result.jacobian,
                    os.path.join(stage, OUTPUT_FILES["qc"]),
                    summary=summary,
                )
                names["qc"] = OUTPUT_FILES["qc"]
            except Exception as error:  # noqa: BLE001 - the picture must never cost the results
                summary["qc_error"] = f"{type(error).__name__}: {error}"
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(stage, OUTPUT_FILES["qc"]))
        names["summary"] = OUTPUT_FILES["summary"]
        summary["files"] = dict(names)
        outputs.write_verified_text(os.path.join(stage, OUTPUT_FILES["summary"]), json.dumps(summary, indent=2))
    result.summary = summary
    return {key: os.path.join(out_dir, name) for key, name in names.items()}
