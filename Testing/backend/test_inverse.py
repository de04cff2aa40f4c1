"""The inverse field (patient -> phantom) exported beside the forward one: on a known smooth
deformation composed with an affine, on oblique, anisotropic grids that differ between the fixed
and the moving image, forward after inverse is the identity within 0.1 voxel."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from cnnreg import image as im
from cnnreg import registration


def _grid(size, spacing, origin, direction):
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection([float(v) for v in np.asarray(direction).ravel()])
    return image


def _smooth_deformation(grid: sitk.Image, amplitudes) -> sitk.Image:
    """A smooth displacement field on ``grid`` (LPS mm; components up to ``amplitudes`` mm)."""
    points = im.physical_points(grid)
    d = np.stack(
        [
            amplitudes[0] * np.sin(points[..., 1] / 12.0),
            amplitudes[1] * np.cos(points[..., 2] / 15.0) * np.sin(points[..., 0] / 20.0),
            amplitudes[2] * np.sin((points[..., 0] + points[..., 1]) / 18.0),
        ],
        axis=-1,
    )
    field = sitk.GetImageFromArray(d, isVector=True)
    field.CopyInformation(grid)
    return field


def test_forward_after_inverse_is_the_identity_within_a_tenth_of_a_voxel(synth):
    fixed = _grid((40, 36, 24), (1.5, 1.5, 2.5), (-30.0, -25.0, -28.0), synth.rotation_matrix((1, 2, 3), 15.0))
    moving = _grid((34, 34, 30), (2.0, 2.0, 2.0), (-35.0, -30.0, -30.0), synth.rotation_matrix((3, -1, 1), -10.0))
    # a smooth deformation d on the fixed grid (LPS mm, up to ~2.5 mm) ...
    points = im.physical_points(fixed)
    deformation = _smooth_deformation(fixed, (2.5, 2.0, 1.5))
    d = sitk.GetArrayFromImage(deformation)
    # ... then an affine: the registration maps x -> A(x + d(x))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([1.05, 0.03, 0.0, -0.02, 0.97, 0.04, 0.01, 0.0, 1.02])
    affine.SetTranslation((3.0, -2.0, 1.5))
    forward_points = np.stack(
        [np.asarray(affine.TransformPoint(tuple(p))) for p in (points + d).reshape(-1, 3)]
    ).reshape(points.shape)
    forward = sitk.GetImageFromArray(forward_points - points, isVector=True)
    forward.CopyInformation(fixed)

    inverse = im.inverse_displacement(deformation, affine, moving)
    assert inverse.GetSize() == moving.GetSize() and inverse.GetOrigin() == moving.GetOrigin()
    # the moving voxels whose inverse image lies well inside the fixed grid
    where = im.physical_points(moving) + sitk.GetArrayFromImage(inverse)
    matrix = np.asarray(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    index = (where - np.asarray(fixed.GetOrigin())) @ np.linalg.inv(matrix).T
    region = np.all((index >= 3) & (index <= np.asarray(fixed.GetSize()) - 4), axis=-1)
    assert region.sum() > 5000
    residual = im.inverse_residual_mm(forward, inverse, region)
    assert residual["max"] < 0.1 * min(moving.GetSpacing()), residual
    # and the inverse really undoes something: without it the residual is the whole mapping
    identity = sitk.Image(moving.GetSize(), sitk.sitkVectorFloat64, 3)
    identity.CopyInformation(moving)
    assert im.inverse_residual_mm(forward, identity, region)["mean"] > 2.0


def test_the_inverse_of_a_field_on_a_large_grid_is_taken_on_a_coarser_grid(synth, monkeypatch):
    """A field on more voxels than INVERSE_MAX_VOXELS is inverted on a coarser grid over the same
    extent (ITK's inversion costs ~16 s on a 1 mm head); for a smooth field forward after inverse
    stays within a tenth of a voxel at the 95th percentile, and the residual the summary reports
    is measured against the full-resolution forward field."""
    fixed = _grid((48, 40, 30), (1.0, 1.2, 1.5), (-24.0, -22.0, -20.0), synth.rotation_matrix((1, 2, 3), 15.0))
    moving = _grid((40, 36, 30), (1.5, 1.5, 1.5), (-30.0, -27.0, -22.0), synth.rotation_matrix((3, -1, 1), -10.0))
    forward = _smooth_deformation(fixed, (2.0, 1.5, 1.5))
    inverted_on = []
    invert = im.inverse_displacement
    monkeypatch.setattr(
        registration.im, "inverse_displacement", lambda field, *rest: inverted_on.append(field) or invert(field, *rest)
    )
    monkeypatch.setattr(registration, "INVERSE_MAX_VOXELS", 8000)
    result = registration._inverse(None, fixed, None, forward, moving, None)
    coarse = inverted_on[0]
    assert math.prod(coarse.GetSize()) <= 8000 < math.prod(fixed.GetSize())
    np.testing.assert_allclose(coarse.GetOrigin(), fixed.GetOrigin())
    np.testing.assert_allclose(coarse.GetDirection(), fixed.GetDirection())
    assert result["field"].GetSize() == moving.GetSize()
    residual = result["residual"]
    assert residual["voxels"] > 1500 and "every 2nd voxel" in residual["region"]  # sampled: a large grid
    assert residual["p95"] < 0.1 * min(moving.GetSpacing()) and residual["max"] < 0.3, residual
