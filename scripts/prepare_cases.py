#!/usr/bin/env python
"""Prepare registration test cases with a known answer (seeded, deterministic).

Usage::

    python scripts/prepare_cases.py mni2mm benchmark/cases/mni2mm          # one case -> that folder
    python scripts/prepare_cases.py all benchmark/cases                    # every case -> DIR/<name>
    python scripts/prepare_cases.py sample Resources/SampleData            # the bundled demo pair
    python -c "from prepare_cases import prepare_case; prepare_case('2d', 'out')"

Each case folder holds ``fixed.nii.gz``, ``moving.nii.gz``, ``fixed_labels.nii.gz``,
``moving_labels.nii.gz``, ``true_displacement.nii.gz`` (when the answer is known) and
``case.json`` (description, source, licence, parameters, checks).

The known answer
    A smooth random displacement ``d`` (Gaussian-filtered white noise per LPS component,
    scaled so that ``max |d|`` is the case's ``max_mm``) is drawn on the fixed grid.  ``d`` is
    stored *as drawn* in ``true_displacement.nii.gz`` (ITK displacement field, LPS mm, on the
    fixed grid).  The moving image is the fixed image pulled through the *inverse* of ``d``
    (computed by fixed-point iteration ``v(y) = -d(y + v(y))``), so that::

        moving(x + d(x)) = fixed(x)

    i.e. ``d`` is exactly the field a registration fixed -> moving should find, in the pull
    convention of :mod:`cnnreg.settings`.  ``case.json`` records the inversion residual and
    checks it numerically: resampling the moving image (and labels) with the stored field
    gives back the fixed image (and labels) up to interpolation error.

Data sources (installed by package managers, nothing downloaded at run time):
    nilearn (PyPI): MNI152 2009a template and GM/WM probability maps;
    Debian ``mricron-data``: Colin27 (``ch2bet``) and AAL labels;
    Debian ``insighttoolkit5-examples``: ``KmeansTest_T1UCharRaw`` and its 7-class k-means
    segmentation.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
try:
    import cnnreg.evaluate as cnnreg_evaluate
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "CNNRegistration"))
    import cnnreg.evaluate as cnnreg_evaluate
from cnnreg.image import array_to_image  # noqa: E402

GENERATOR_VERSION = 1

MRICRON = Path("/usr/share/mricron/templates")
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")

MNI_LICENCE = (
    "MNI ICBM152 2009a (shipped in nilearn as mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz): "
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University. Permission to use, copy, modify, and distribute this software and "
    "its documentation for any purpose and without fee is hereby granted, provided that the above "
    "copyright notice appear in all copies. The authors and McGill University make no representations "
    'about the suitability of this software for any purpose. It is provided "as is" without express or '
    "implied warranty. The authors are not responsible for any data loss, equipment damage, property "
    "loss, or injury to subjects or patients resulting from the use or misuse of this software package."
)
COLIN_LICENCE = (
    "Colin27 (ch2bet) and AAL from the Debian package mricron-data (MRIcron, BSD-3-clause per "
    "debian/copyright). Colin27: Holmes et al. 1998, J Comput Assist Tomogr 22:324, (C) McConnell Brain "
    "Imaging Centre, MNI. AAL: Tzourio-Mazoyer et al. 2002, NeuroImage 15:273. Not redistributed here; "
    "regenerate with this script."
)
ITK_LICENCE = (
    "ITK example data from the Debian package insighttoolkit5-examples (Insight Software Consortium, "
    "Apache-2.0 per debian/copyright). Not redistributed here; regenerate with this script."
)

TRUE_FIELD_NOTE = (
    "true_displacement.nii.gz is the drawn field d (ITK displacement field, LPS mm, on the fixed grid); "
    "moving = fixed pulled through the fixed-point inverse of d, so moving(x + d(x)) = fixed(x): d is the "
    "pull field a registration fixed -> moving should recover."
)


# ---------------------------------------------------------------------------------------
# geometry helpers
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_thread():
    """Run SimpleITK filters single-threaded (reductions summed in one order: bitwise reproducible)."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def nibabel_to_sitk(image) -> sitk.Image:
    """A nibabel image (RAS affine) -> SimpleITK image (LPS geometry), via a NIfTI file that
    SimpleITK reads itself, so the RAS -> LPS conversion is ITK's own."""
    import nibabel

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "image.nii.gz")
        nibabel.save(image, path)
        return sitk.ReadImage(path)


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, last)`` array indices (inclusive, ``(k, j, i)`` order) of the non-zero voxels."""
    index = np.argwhere(mask)
    if index.size == 0:
        raise ValueError("bounding box of an empty mask")
    return index.min(axis=0), index.max(axis=0)


def crop_around(
    image: sitk.Image, center_kji: Sequence[float], size_ijk: Sequence[int], value: float = 0
) -> sitk.Image:
    """Extract a ``size_ijk`` block centred on the array index ``center_kji``, padding with
    ``value`` where it leaves the image.  Keeps the physical geometry."""
    center_ijk = np.asarray(center_kji, dtype=float)[::-1]
    start = np.floor(center_ijk - (np.asarray(size_ijk) - 1) / 2.0 + 0.5).astype(int)
    stop = start + np.asarray(size_ijk)
    lower = np.maximum(0, -start)
    upper = np.maximum(0, stop - np.asarray(image.GetSize()))
    if lower.any() or upper.any():
        image = sitk.ConstantPad(image, [int(v) for v in lower], [int(v) for v in upper], value)
        start = start + lower
    return sitk.RegionOfInterest(image, [int(v) for v in size_ijk], [int(v) for v in start])


def resample_to_spacing(
    image: sitk.Image, spacing: float, size_ijk, center_lps, interpolator, smooth: bool
) -> sitk.Image:
    """Resample onto a new grid (same direction, ``spacing`` mm, ``size_ijk``) centred on ``center_lps``."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)
    half = (np.asarray(size_ijk) - 1) / 2.0 * spacing
    origin = np.asarray(center_lps) - direction @ half
    reference = sitk.Image([int(n) for n in size_ijk], image.GetPixelID())
    reference.SetSpacing([spacing] * dim)
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin([float(v) for v in origin])
    if smooth:
        sigma = [max(0.0, 0.5 * (spacing - s)) for s in image.GetSpacing()]
        image = sitk.DiscreteGaussian(sitk.Cast(image, sitk.sitkFloat32), [s * s for s in sigma], 32, 0.01, True)
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    return sitk.Resample(image, reference, identity, interpolator, 0.0, image.GetPixelID())


# ---------------------------------------------------------------------------------------
# smooth random fields and their inverse (numpy, bitwise reproducible)
# ---------------------------------------------------------------------------------------


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """``n x n`` matrix of a Gaussian filter along one axis, rows renormalised at the borders."""
    x = np.arange(n, dtype=np.float64)
    weights = np.exp(-0.5 * ((x[:, None] - x[None, :]) / sigma) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def gaussian_filter(array: np.ndarray, sigma_voxels: Sequence[float]) -> np.ndarray:
    """Separable Gaussian filter of ``array`` over its leading ``len(sigma_voxels)`` axes."""
    out = np.asarray(array, dtype=np.float64)
    for axis, sigma in enumerate(sigma_voxels):
        if sigma > 0:
            out = np.moveaxis(np.tensordot(_gaussian_matrix(out.shape[axis], sigma), out, axes=(1, axis)), 0, axis)
    return out


def coarse_grid(reference: sitk.Image, step: int) -> sitk.Image:
    """A grid ``step`` times coarser than ``reference``, same origin/direction, covering its extent."""
    size = [int(np.ceil((n - 1) / step)) + 1 for n in reference.GetSize()]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetOrigin(reference.GetOrigin())
    grid.SetDirection(reference.GetDirection())
    grid.SetSpacing([s * step for s in reference.GetSpacing()])
    return grid


def smooth_random_field(
    reference: sitk.Image, max_mm: float, sigma_mm: float, rng: np.random.Generator, step: int = 1
) -> sitk.Image:
    """Smooth random displacement: white noise per LPS component, Gaussian-filtered with
    ``sigma_mm`` (per axis ``sigma_mm / spacing`` voxels), scaled so ``max |d| = max_mm``.

    Returns a ``sitkVectorFloat64`` ITK displacement field (LPS mm) on ``reference``'s grid, or
    on a ``step``-times coarser grid covering the same extent (ITK interpolates it linearly).
    """
    grid = reference if step == 1 else coarse_grid(reference, step)
    dim = grid.GetDimension()
    shape = sitk.GetArrayViewFromImage(grid).shape[:dim]
    noise = rng.standard_normal((*shape, dim))
    sigma_voxels = [sigma_mm / s for s in grid.GetSpacing()[::-1]]
    field = gaussian_filter(noise, sigma_voxels)
    field *= max_mm / np.sqrt((field**2).sum(axis=-1)).max()
    return array_to_image(field, grid, is_vector=True)


def dense_field(field: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """``field`` on ``reference``'s grid exactly as ITK's DisplacementFieldTransform evaluates it."""
    if field.GetSize() == reference.GetSize() and field.GetSpacing() == reference.GetSpacing():
        return field
    return cnnreg_evaluate.resample_field(field, reference)


def _interpolate(values: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``values`` ``(*S, C)`` at continuous array indices ``points``
    ``(*P, ndim)``; outside the grid the nearest edge value is used."""
    shape = np.asarray(values.shape[: points.shape[-1]])
    ndim = len(shape)
    flat_points = points.reshape(-1, ndim)
    clamped = np.clip(flat_points, 0, shape - 1)
    base = np.minimum(np.floor(clamped).astype(np.int64), np.maximum(shape - 2, 0))
    frac = clamped - base
    flat_values = values.reshape(int(np.prod(shape)), -1)
    strides = np.array([int(np.prod(shape[axis + 1 :])) for axis in range(ndim)], dtype=np.int64)
    out = np.zeros((flat_points.shape[0], flat_values.shape[1]))
    for corner in range(2**ndim):
        offsets = np.array([(corner >> (ndim - 1 - axis)) & 1 for axis in range(ndim)])
        weight = np.prod(np.where(offsets == 1, frac, 1.0 - frac), axis=1)
        index = (np.minimum(base + offsets, shape - 1) * strides).sum(axis=1)
        out += weight[:, None] * flat_values[index]
    return out.reshape(*points.shape[:-1], flat_values.shape[1])


def invert_field(field: sitk.Image, iterations: int = 200, tolerance_mm: float = 1e-5) -> tuple[sitk.Image, dict]:
    """Inverse of a displacement field by fixed-point iteration ``v(y) = -d(y + v(y))``.

    Args:
        field: ITK displacement field (LPS mm); ``d`` maps ``x -> x + d(x)``.

    Returns:
        ``(inverse field on the same grid, {"iterations", "max_residual_mm", "mean_residual_mm"})``
        where the residual is ``|v(y) + d(y + v(y))|`` -- how far ``x -> x + d(x)`` composed with
        the inverse is from the identity.
    """
    dim = field.GetDimension()
    d = sitk.GetArrayFromImage(field).astype(np.float64)  # (*S, dim) LPS mm
    shape = d.shape[:-1]
    matrix = np.asarray(field.GetDirection()).reshape(dim, dim) @ np.diag(field.GetSpacing())
    # displacement in array-index units, components in array-axis order (k, j, i)
    u = (d @ np.linalg.inv(matrix).T)[..., ::-1].copy()
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    v = -u
    stats = {"iterations": 0, "max_residual_mm": float("inf"), "mean_residual_mm": float("inf")}
    for iteration in range(1, iterations + 1):
        v_next = -_interpolate(u, grid + v)
        residual_mm = np.sqrt((((v - v_next)[..., ::-1] @ matrix.T) ** 2).sum(axis=-1))
        v = v_next
        stats = {
            "iterations": iteration,
            "max_residual_mm": float(residual_mm.max()),
            "mean_residual_mm": float(residual_mm.mean()),
        }
        if stats["max_residual_mm"] < tolerance_mm:
            break
    inverse = v[..., ::-1] @ matrix.T
    return array_to_image(inverse, field, is_vector=True), stats


def warp(image: sitk.Image, field: sitk.Image, nearest: bool = False, replicate_edges: bool = True) -> sitk.Image:
    """Pull ``image`` through ``field`` onto ``image``'s own grid: ``out(x) = image(x + d(x))``.

    With ``replicate_edges`` points that land outside the image take the nearest edge value
    (the image is padded by edge replication first) instead of 0.
    """
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    source = image
    if replicate_edges:
        reach_mm = float(np.sqrt((sitk.GetArrayViewFromImage(field).astype(np.float64) ** 2).sum(axis=-1)).max())
        pad = [int(np.ceil(reach_mm / s)) + 2 for s in image.GetSpacing()]
        source = sitk.ZeroFluxNeumannPad(image, pad, pad)
    return sitk.Resample(source, image, transform, interpolator, 0.0, image.GetPixelID())


# ---------------------------------------------------------------------------------------
# intensity changes
# ---------------------------------------------------------------------------------------


def intensity_change(
    image: sitk.Image, rng: np.random.Generator, gamma: float, bias: float, bias_sigma_mm: float, noise: float
) -> sitk.Image:
    """Gamma, smooth multiplicative bias ``exp(b)`` (``|b| <= bias``) and Gaussian noise
    (std ``noise`` x max), clipped at 0; returns float32 with the original maximum."""
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    peak = float(array.max())
    out = (np.clip(array, 0, None) / peak) ** gamma
    dim = image.GetDimension()
    field = gaussian_filter(
        rng.standard_normal(array.shape), [bias_sigma_mm / s for s in image.GetSpacing()[::-1]][:dim]
    )
    field *= bias / np.abs(field).max()
    out = out * np.exp(field)
    out = out + rng.normal(0.0, noise, size=array.shape)
    out = np.clip(out, 0, None) * peak
    return array_to_image(out.astype(np.float32), image)


# ---------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def mni_volume(resolution: int) -> tuple[sitk.Image, sitk.Image]:
    """nilearn's MNI152 2009a T1 (float32, [0, 1]) and GM/WM labels at ``resolution`` mm.

    Labels come from nilearn's masks: 2 = WM where ``load_mni152_wm_mask`` is set, 1 = GM where
    ``load_mni152_gm_mask`` is set and the WM mask is not (the two masks overlap).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        t1 = nibabel_to_sitk(datasets.load_mni152_template(resolution=resolution))
        gm = nibabel_to_sitk(datasets.load_mni152_gm_mask(resolution=resolution))
        wm = nibabel_to_sitk(datasets.load_mni152_wm_mask(resolution=resolution))
    t1 = sitk.Cast(t1, sitk.sitkFloat32)
    labels = np.zeros(sitk.GetArrayViewFromImage(t1).shape, dtype=np.uint8)
    labels[sitk.GetArrayViewFromImage(gm) > 0] = 1
    labels[sitk.GetArrayViewFromImage(wm) > 0] = 2
    return t1, array_to_image(labels, t1)


def mni_2mm(size_ijk: Sequence[int]) -> tuple[sitk.Image, sitk.Image]:
    """MNI152 at 2 mm (see :func:`mni_volume`) cropped to ``size_ijk`` around the brain's
    bounding-box centre."""
    t1, labels = mni_volume(2)
    first, last = bounding_box(sitk.GetArrayViewFromImage(t1) > 0)
    center = (first + last) / 2.0
    return crop_around(t1, center, size_ijk), crop_around(labels, center, size_ijk)


def mni_1mm_slice(z_mm: float, size_ij: Sequence[int]) -> tuple[sitk.Image, sitk.Image]:
    """The axial slice at world z = ``z_mm`` of MNI152 at 1 mm (see :func:`mni_volume`),
    cropped to ``size_ij`` around the brain: 2D images."""
    volumes = mni_volume(1)
    k = int(round(volumes[0].TransformPhysicalPointToContinuousIndex((0.0, 0.0, z_mm))[2]))
    size = list(volumes[0].GetSize())
    t1, labels = (sitk.Extract(v, [size[0], size[1], 0], [0, 0, k]) for v in volumes)
    first, last = bounding_box(sitk.GetArrayViewFromImage(t1) > 0.02)
    center = (first + last) / 2.0
    return crop_around(t1, center, size_ij), crop_around(labels, center, size_ij)


def colin_resampled(spacing: float, max_size: int) -> tuple[sitk.Image, sitk.Image]:
    """Colin27 ``ch2bet`` (1 mm) and AAL, cropped to the brain and resampled to ``spacing`` mm
    (anti-aliased; labels nearest neighbour), each axis a multiple of 8 up to ``max_size``."""
    t1 = sitk.Cast(sitk.ReadImage(str(MRICRON / "ch2bet.nii.gz")), sitk.sitkFloat32)
    aal = sitk.ReadImage(str(MRICRON / "aal.nii.gz"))
    first, last = bounding_box(sitk.GetArrayViewFromImage(t1) > 0)
    center_lps = t1.TransformContinuousIndexToPhysicalPoint([float(v) for v in ((first + last) / 2.0)[::-1]])
    extent_ijk = (last - first + 1)[::-1] * np.asarray(t1.GetSpacing())
    size = [int(min(max_size, 8 * np.ceil((e / spacing + 6) / 8))) for e in extent_ijk]
    image = resample_to_spacing(t1, spacing, size, center_lps, sitk.sitkLinear, smooth=True)
    labels = resample_to_spacing(aal, spacing, size, center_lps, sitk.sitkNearestNeighbor, smooth=False)
    return image, sitk.Cast(labels, sitk.sitkUInt8)


def itk_t1() -> tuple[sitk.Image, sitk.Image]:
    """ITK's KmeansTest T1 (128x128x62, 2x2x3 mm, non-identity direction) and its k-means labels."""
    image = sitk.Cast(sitk.ReadImage(str(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz")), sitk.sitkFloat32)
    classes = sitk.GetArrayFromImage(sitk.ReadImage(str(ITK_DATA / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz")))
    # class 1 is the air around the head (72 % of the volume, mean intensity ~1) and class 0
    # holds 126 stray voxels: both become background; classes 2-6 keep their numbers
    labels = np.where(classes >= 2, classes, 0).astype(np.uint8)
    return image, array_to_image(labels, image)


def otsu_tissues(image: sitk.Image) -> sitk.Image:
    """Three-class Otsu (CSF / GM / WM) inside the non-zero brain: 1 = GM, 2 = WM."""
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    brain = array > 0.02 * array.max()
    values = array[brain]
    with _single_thread():
        calculator = sitk.OtsuMultipleThresholdsImageFilter()
        calculator.SetNumberOfThresholds(2)
        calculator.SetNumberOfHistogramBins(256)
        calculator.Execute(sitk.GetImageFromArray(values.astype(np.float32).reshape(1, -1)))
    low, high = calculator.GetThresholds()
    labels = np.zeros(array.shape, np.uint8)
    labels[brain & (array > low) & (array <= high)] = 1
    labels[brain & (array > high)] = 2
    return array_to_image(labels, image)


def affine_to(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """Affine fixed -> moving physical (moments init, Mattes MI, 3 levels), single-threaded
    and fully sampled so that it is bitwise reproducible."""
    with _single_thread():
        fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
        moving_f = sitk.Cast(moving, sitk.sitkFloat32)
        initial = sitk.CenteredTransformInitializer(
            fixed_f, moving_f, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        method = sitk.ImageRegistrationMethod()
        method.SetNumberOfThreads(1)
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.NONE)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-4, numberOfIterations=200, gradientMagnitudeTolerance=1e-8
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([4, 2, 1])
        method.SetSmoothingSigmasPerLevel([2, 1, 0])
        method.SetInitialTransform(initial, inPlace=False)
        return method.Execute(fixed_f, moving_f)


# ---------------------------------------------------------------------------------------
# writing a case
# ---------------------------------------------------------------------------------------


def _stored(image: sitk.Image, storage: str) -> sitk.Image:
    if storage == "native":  # as given (the CT's int16 HU)
        return image
    if storage == "uint8":
        array = sitk.GetArrayFromImage(image).astype(np.float64)
        return array_to_image(np.clip(np.round(array), 0, 255).astype(np.uint8), image)
    return sitk.Cast(image, sitk.sitkFloat32)


def _checks(fixed, moving, fixed_labels, moving_labels, true_field, inverse_stats) -> dict:
    """Numbers that show the case is what it claims (stored in case.json)."""
    checks = {}
    if fixed_labels.GetSize() != moving_labels.GetSize() or fixed_labels.GetOrigin() != moving_labels.GetOrigin():
        # a real pair on its own grid: the labels as they fall on the fixed grid, unaligned
        identity = sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity)
        moving_labels = sitk.Resample(moving_labels, fixed_labels, identity, sitk.sitkNearestNeighbor, 0)
        named = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(fixed_labels)) if v > 0]
        checks["dice_before"] = cnnreg_evaluate.dice_per_label(fixed_labels, moving_labels, named)
        return checks
    dice = cnnreg_evaluate.dice_per_label(fixed_labels, moving_labels)
    checks["dice_before"] = dice
    if true_field is None:
        return checks
    dense = dense_field(true_field, fixed)
    magnitude = np.sqrt((sitk.GetArrayFromImage(dense) ** 2).sum(axis=-1))
    det = cnnreg_evaluate.field_jacobian_determinant(dense)
    back = warp(sitk.Cast(moving, sitk.sitkFloat32), dense)
    labels_back = warp(moving_labels, dense, nearest=True)
    fixed_array = sitk.GetArrayFromImage(fixed).astype(np.float64)
    region = sitk.GetArrayViewFromImage(fixed_labels) > 0
    scale = float(np.percentile(fixed_array[region], 99)) or 1.0

    # ITK's own resampling of the world coordinates through inverse then d must give back x:
    # checks the numpy inversion against ITK's axis order, direction and spacing handling
    inverse = inverse_stats.pop("field")
    points = sitk.GetArrayFromImage(
        sitk.PhysicalPointSource(
            sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection()
        )
    )
    coordinates = array_to_image(points, fixed, is_vector=True)
    roundtrip = sitk.GetArrayFromImage(
        warp(warp(coordinates, inverse, replicate_edges=False), dense, replicate_edges=False)
    )
    margin = int(np.ceil(np.abs(_voxel_vectors(dense)).max())) + 2
    interior = np.zeros(region.shape, bool)
    interior[tuple(slice(margin, n - margin) for n in region.shape)] = True
    coordinate_error = np.sqrt(((roundtrip - points) ** 2).sum(axis=-1))[region & interior]

    def error(image):
        return float(np.mean(np.abs(sitk.GetArrayFromImage(image).astype(np.float64) - fixed_array)[region]) / scale)

    checks.update(
        {
            "true_field_max_mm": float(magnitude.max()),
            "true_field_max_voxels": float(np.sqrt((_voxel_vectors(dense) ** 2).sum(axis=-1)).max()),
            "true_field_mean_mm_in_labels": float(magnitude[region].mean()),
            "true_field_min_jacobian": float(det.min()),
            "inverse": inverse_stats,
            "coordinates_warped_by_inverse_then_true_field_error_mm": {
                "mean": float(coordinate_error.mean()),
                "max": float(coordinate_error.max()),
            },
            "mean_abs_error_moving_vs_fixed": error(moving),
            "mean_abs_error_moving_warped_by_true_field_vs_fixed": error(back),
            "dice_moving_labels_warped_by_true_field": cnnreg_evaluate.dice_per_label(fixed_labels, labels_back),
        }
    )
    return checks


def _voxel_vectors(field: sitk.Image) -> np.ndarray:
    """LPS mm vectors -> index-space (voxel) vectors ``(*S, dim)``."""
    dim = field.GetDimension()
    matrix = np.asarray(field.GetDirection()).reshape(dim, dim) @ np.diag(field.GetSpacing())
    return sitk.GetArrayFromImage(field).astype(np.float64) @ np.linalg.inv(matrix).T


def write_case(
    out_dir: str | os.PathLike,
    fixed: sitk.Image,
    fixed_labels: sitk.Image,
    info: dict,
    rng: np.random.Generator | None = None,
    warp_spec: dict | None = None,
    moving: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
    intensity: dict | None = None,
    storage: str = "float32",
) -> dict[str, str]:
    """Make the moving image (synthetic warp, or the given real one), check, write the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fixed = _stored(fixed, storage)
    fixed_labels = sitk.Cast(fixed_labels, sitk.sitkUInt8)
    true_field = None
    inverse_stats = None
    if warp_spec is not None:
        true_field = smooth_random_field(
            fixed, warp_spec["max_mm"], warp_spec["sigma_mm"], rng, warp_spec.get("step", 1)
        )
        inverse, inverse_stats = invert_field(dense_field(true_field, fixed))
        inverse_stats["field"] = inverse
        moving = warp(sitk.Cast(fixed, sitk.sitkFloat32), inverse)
        moving_labels = warp(fixed_labels, inverse, nearest=True)
        if intensity is not None:
            moving = intensity_change(moving, rng, **intensity)
    moving = _stored(moving, storage)
    moving_labels = sitk.Cast(moving_labels, sitk.sitkUInt8)
    checks = _checks(fixed, moving, fixed_labels, moving_labels, true_field, inverse_stats)
    paths = {
        "fixed": out / "fixed.nii.gz",
        "moving": out / "moving.nii.gz",
        "fixed_labels": out / "fixed_labels.nii.gz",
        "moving_labels": out / "moving_labels.nii.gz",
    }
    images = {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels}
    if true_field is not None:
        paths["true_displacement"] = out / "true_displacement.nii.gz"
        images["true_displacement"] = sitk.Cast(true_field, sitk.sitkVectorFloat32)
    else:
        stale = out / "true_displacement.nii.gz"
        if stale.exists():
            stale.unlink()
    for key, image in images.items():
        sitk.WriteImage(image, str(paths[key]), useCompression=True)
    paths["case"] = out / "case.json"
    record = {
        **info,
        "generator": f"scripts/prepare_cases.py (version {GENERATOR_VERSION})",
        "fixed_grid": {
            "size": list(fixed.GetSize()),
            "spacing_mm": list(fixed.GetSpacing()),
            "origin_lps_mm": list(fixed.GetOrigin()),
            "direction": list(fixed.GetDirection()),
        },
        "warp": warp_spec,
        "intensity_change": intensity,
        "true_field": TRUE_FIELD_NOTE if true_field is not None else None,
        "files": {key: path.name for key, path in paths.items()},
        "checks": checks,
    }
    cnnreg_evaluate.write_json(record, paths["case"])
    return {key: str(path) for key, path in paths.items()}


# ---------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------

MNI_NAMES = {1: "GM", 2: "WM"}


def _case_mni2mm(out_dir, rng):
    fixed, labels = mni_2mm((96, 96, 96))
    info = {
        "name": "mni2mm",
        "description": "MNI152 2009a T1 at 2 mm cropped to 96^3 around the brain; moving = the template "
        "warped by a known smooth random field (max 7 mm = 3.5 voxels, sigma 10 mm); labels 2 = WM "
        "(nilearn WM mask), 1 = GM (nilearn GM mask minus the WM mask).",
        "source": "nilearn.datasets.load_mni152_template / load_mni152_gm_mask / load_mni152_wm_mask (resolution=2)",
        "licence": MNI_LICENCE,
        "label_names": MNI_NAMES,
    }
    return write_case(out_dir, fixed, labels, info, rng, {"max_mm": 7.0, "sigma_mm": 10.0})


def _case_mni1mm(out_dir, rng):
    fixed, labels = mni_volume(1)
    info = {
        "name": "mni1mm",
        "description": "The whole MNI152 2009a T1 head at 1 mm (197x233x189, 8.7 M voxels, uncropped); moving = the "
        "template warped by a known smooth random field (max 7 mm, sigma 10 mm, made on a 2x coarser grid); labels "
        "2 = WM (nilearn WM mask), 1 = GM (nilearn GM mask minus the WM mask). The cost-versus-size case.",
        "source": "nilearn.datasets.load_mni152_template / load_mni152_gm_mask / load_mni152_wm_mask (resolution=1)",
        "licence": MNI_LICENCE,
        "label_names": MNI_NAMES,
    }
    return write_case(out_dir, fixed, labels, info, rng, {"max_mm": 7.0, "sigma_mm": 10.0, "step": 2})


def _case_sample(out_dir, rng):
    fixed, labels = mni_2mm((80, 96, 80))
    fixed = fixed * 255.0
    info = {
        "name": "sample",
        "description": "Small demo pair: MNI152 2009a T1 at 2 mm cropped to 80x96x80, stored as uint8; moving = "
        "the template warped by a known smooth random field (max 7 mm); labels 2 = WM (nilearn WM mask), 1 = GM "
        "(nilearn GM mask minus the WM mask). The true field "
        "is stored on a 4x coarser grid covering the same extent (ITK interpolates it linearly; "
        "cnnreg.evaluate.target_registration_error resamples it onto the estimate's grid).",
        "source": "nilearn.datasets.load_mni152_template / load_mni152_gm_mask / load_mni152_wm_mask (resolution=2)",
        "licence": MNI_LICENCE,
        "label_names": MNI_NAMES,
    }
    return write_case(out_dir, fixed, labels, info, rng, {"max_mm": 7.0, "sigma_mm": 10.0, "step": 4}, storage="uint8")


def _case_colin1mm(out_dir, rng):
    fixed, labels = colin_resampled(1.5, 128)
    info = {
        "name": "colin1mm",
        "description": "Colin27 (ch2bet, 1 mm) cropped to the brain and resampled to 1.5 mm (<= 128 voxels per "
        "axis); moving = warped by a known smooth random field (max 6 mm) plus an intensity change (gamma, "
        "smooth bias field, noise); labels = AAL (116 regions).",
        "source": "Debian mricron-data: /usr/share/mricron/templates/ch2bet.nii.gz, aal.nii.gz",
        "licence": COLIN_LICENCE,
        "label_names": _aal_names(),
    }
    return write_case(
        out_dir,
        fixed,
        labels,
        info,
        rng,
        {"max_mm": 6.0, "sigma_mm": 10.0},
        intensity={"gamma": 1.2, "bias": 0.15, "bias_sigma_mm": 40.0, "noise": 0.02},
    )


def _aal_names() -> dict[int, str]:
    names = {}
    path = MRICRON / "aal.nii.txt"
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit() and int(parts[0]) > 0:
                names[int(parts[0])] = parts[1]
    return names


def _case_itk_t1(out_dir, rng):
    fixed, labels = itk_t1()
    info = {
        "name": "itk_t1",
        "description": "ITK KmeansTest T1 head (128x128x62, 2x2x3 mm, non-identity direction) with its 7-class k-means "
        "segmentation: classes 2-6 kept as labels 2-6; class 1 (air around the head) and class 0 (126 stray voxels) "
        "are background 0; moving = warped by a known smooth random field (max 6 mm).",
        "source": "Debian insighttoolkit5-examples: KmeansTest_T1UCharRaw.nii.gz, KmeansTest_T1KmeansPrelimSegmentation.nii.gz",
        "licence": ITK_LICENCE,
        "label_names": {i: f"class{i}" for i in range(2, 7)},
    }
    return write_case(out_dir, fixed, labels, info, rng, {"max_mm": 6.0, "sigma_mm": 12.0})


def _case_2d(out_dir, rng):
    fixed, labels = mni_1mm_slice(10.0, (160, 192))
    info = {
        "name": "2d",
        "description": "2D: axial slice (z = 10 mm) of the 1 mm MNI152 2009a T1, cropped to 160x192; moving = "
        "warped by a known smooth random field (max 4 mm = 4 pixels); labels 2 = WM (nilearn WM mask), 1 = GM "
        "(nilearn GM mask minus the WM mask).",
        "source": "nilearn.datasets.load_mni152_template / load_mni152_gm_mask / load_mni152_wm_mask (resolution=1)",
        "licence": MNI_LICENCE,
        "label_names": MNI_NAMES,
    }
    return write_case(out_dir, fixed, labels, info, rng, {"max_mm": 4.0, "sigma_mm": 8.0})


def _case_mni_colin(out_dir, rng):
    del rng  # no randomness: a real pair
    fixed, _ = mni_2mm((96, 96, 96))
    colin = sitk.Cast(sitk.ReadImage(str(MRICRON / "ch2bet.nii.gz")), sitk.sitkFloat32)
    transform = affine_to(fixed, colin)
    moving = sitk.Resample(colin, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moving = moving / float(np.percentile(sitk.GetArrayViewFromImage(moving), 99.9))
    fixed_labels = otsu_tissues(fixed)
    moving_labels = otsu_tissues(moving)
    info = {
        "name": "mni_colin",
        "description": "Real inter-template pair: fixed = MNI152 2009a T1 at 2 mm (96^3, as mni2mm); moving = "
        "Colin27 (ch2bet) affinely pre-aligned to it (SimpleITK, Mattes MI) and resampled onto the same grid, "
        "scaled to [0, ~1]. No true field. Labels 1 = GM, 2 = WM from the same 3-class Otsu segmentation of "
        "each brain (consistent definitions on both sides).",
        "source": "nilearn MNI152 (resolution=2); Debian mricron-data ch2bet.nii.gz",
        "licence": MNI_LICENCE + " / " + COLIN_LICENCE,
        "label_names": MNI_NAMES,
        "affine_prealignment": {"fixed_to_moving": transform.GetName(), "parameters": list(transform.GetParameters())},
    }
    return write_case(out_dir, fixed, fixed_labels, info, moving=moving, moving_labels=moving_labels)


#: constant intensities of the phantom case's tissue classes (T1-like order: CSF-like < GM < WM)
PHANTOM_INTENSITIES = {0: 0.25, 1: 0.6, 2: 1.0}


def _case_phantom_mni(out_dir, rng):
    """A piecewise-constant "phantom" made from Colin27's labels, registered to MNI152 (the
    XCAT-to-patient use of the extension, on brains)."""
    fixed, _ = mni_2mm((96, 96, 96))
    colin = sitk.Cast(sitk.ReadImage(str(MRICRON / "ch2bet.nii.gz")), sitk.sitkFloat32)
    aal = sitk.ReadImage(str(MRICRON / "aal.nii.gz"))
    transform = affine_to(fixed, colin)
    colin_on_grid = sitk.Resample(colin, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    tissues = sitk.GetArrayFromImage(otsu_tissues(colin_on_grid))
    brain = sitk.GetArrayFromImage(colin_on_grid) > 0.02 * float(sitk.GetArrayViewFromImage(colin_on_grid).max())
    regions = sitk.GetArrayFromImage(sitk.Resample(aal, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32))
    # every class a constant; each AAL region of the grey matter its own constant within +-5 % (organs)
    phantom = np.zeros(tissues.shape, np.float32)
    for value, intensity in PHANTOM_INTENSITIES.items():
        phantom[brain & (tissues == value)] = intensity
    for region in np.unique(regions[regions > 0]):
        inside = brain & (tissues == 1) & (regions == region)
        phantom[inside] = PHANTOM_INTENSITIES[1] * (1.0 + rng.uniform(-0.05, 0.05))
    moving = gaussian_filter(phantom, [0.5, 0.5, 0.5])  # partial volume at the class borders
    moving_image = array_to_image(moving.astype(np.float32), fixed)
    fixed_labels = otsu_tissues(fixed)
    moving_labels = array_to_image(np.where(brain, tissues, 0).astype(np.uint8), fixed)
    info = {
        "name": "phantom_mni",
        "description": "Phantom-to-image: moving = a piecewise-constant phantom made from Colin27 (ch2bet) affinely "
        "aligned to MNI152 (Mattes MI): its 3-class Otsu tissues given constant intensities "
        f"{PHANTOM_INTENSITIES} (CSF-like, GM, WM), each AAL region of the grey matter its own constant "
        "within +-5 %, Gaussian-blurred by 0.5 voxel; fixed = the real MNI152 2009a T1 at 2 mm (96^3, as "
        "mni2mm). Labels 1 = GM, 2 = WM: the phantom's own classes (moving) and the Otsu classes of MNI152 "
        "(fixed). No true field.",
        "source": "nilearn MNI152 (resolution=2); Debian mricron-data ch2bet.nii.gz, aal.nii.gz",
        "licence": MNI_LICENCE + " / " + COLIN_LICENCE,
        "label_names": MNI_NAMES,
        "affine_prealignment": {"fixed_to_moving": transform.GetName(), "parameters": list(transform.GetParameters())},
    }
    return write_case(out_dir, fixed, fixed_labels, info, moving=moving_image, moving_labels=moving_labels)


def _case_xcat_ct(out_dir, rng):
    import ct_case  # the CT case's registry packages and voxeliser (scripts/ct_case.py)

    del rng  # a real pair
    pair = ct_case.xcat_ct_pair()
    return write_case(
        out_dir,
        pair["fixed"],
        pair["fixed_labels"],
        pair["info"],
        moving=pair["moving"],
        moving_labels=pair["moving_labels"],
        storage="native",
    )


CASES: dict[str, Callable] = {
    "mni2mm": _case_mni2mm,
    "mni1mm": _case_mni1mm,
    "colin1mm": _case_colin1mm,
    "itk_t1": _case_itk_t1,
    "2d": _case_2d,
    "mni_colin": _case_mni_colin,
    "phantom_mni": _case_phantom_mni,
    "sample": _case_sample,
    "xcat_ct": _case_xcat_ct,
}


def case_rng(name: str, seed: int) -> np.random.Generator:
    """Random generator of one case: depends on the seed and the case name only."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def prepare_case(name: str, out_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write case ``name`` into ``out_dir`` (created) and return ``{role: path}``.

    Roles: ``fixed``, ``moving``, ``fixed_labels``, ``moving_labels``, ``true_displacement``
    (synthetic cases only) and ``case`` (case.json).  Same name and seed -> identical arrays.
    """
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    return CASES[name](out_dir, case_rng(name, seed))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", help=f"case name, comma list or 'all' ({', '.join(CASES)})")
    parser.add_argument("out_dir", help="output folder (one case) or parent folder (several: OUT/<name>)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [n for n in CASES if n != "sample"] if args.cases == "all" else args.cases.split(",")
    for name in names:
        if name not in CASES:
            parser.error(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    for name in names:
        out = Path(args.out_dir) if len(names) == 1 else Path(args.out_dir) / name
        start = time.perf_counter()
        paths = prepare_case(name, out, args.seed)
        record = json.loads(Path(paths["case"]).read_text())
        dice = record["checks"]["dice_before"]
        shown = dice if len(dice) <= 8 else {"mean": float(np.mean(list(dice.values())))}
        print(f"{name}: {out} ({time.perf_counter() - start:.1f} s), Dice before {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
