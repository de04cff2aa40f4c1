"""The one place where axis order, units and field direction are defined.

Tensors
    Images are ``(N, C, D, H, W)`` in 3D and ``(N, C, H, W)`` in 2D.  The spatial axes
    ``D, H, W`` are SimpleITK's array axes ``(k, j, i)`` (``sitk.GetArrayFromImage``),
    which are also Slicer's ``arrayFromVolume`` axes.

Displacement fields inside the backend
    ``u`` has shape ``(N, ndim, *spatial)``, lives on the **fixed** image grid, is
    expressed in **voxels of that grid**, and channel ``c`` is the displacement along
    spatial tensor axis ``c`` -- that is ``(k, j, i)`` order in 3D and ``(j, i)`` in 2D.
    It *pulls* the moving image::

        warped(x) = moving(x + u(x))

    This is ITK's resampling direction (fixed -> moving) and Slicer's "from parent"
    direction of a grid transform.

Displacement fields at the boundaries (converted exactly once, in :mod:`cnnreg.spatial`)
    * ITK displacement-field files: millimetres, **LPS** world axes ``(x, y, z)``, on the
      fixed grid, vector image components in ``(x, y, z)`` order.
    * Slicer: millimetres, **RAS** world axes: ``ras = (-x, -y, z)`` of the LPS vector.

    For a grid with spacing ``s = (s_i, s_j, s_k)`` and direction matrix ``R`` (columns =
    world direction of the ``i, j, k`` index axes), a voxel displacement ``u`` reordered to
    ``(i, j, k)`` maps to ``d_lps = R @ diag(s) @ u_ijk``.
"""

from __future__ import annotations

import enum

#: Axis permutation from LPS to RAS (sign per world axis, 3D).
LPS_TO_RAS_SIGNS = (-1.0, -1.0, 1.0)


class Mode(str, enum.Enum):
    """Registration modes."""

    PHANTOM = "phantom"  # per-pair CNN optimisation, no prior training (Chen et al. 2020)
    INSTANCE = "instance"  # per-pair dense-field optimisation
    LEARNED = "learned"  # one forward pass of a trained network
    LEARNED_REFINE = "learned-refine"  # learned + instance optimisation


class Similarity(str, enum.Enum):
    LNCC = "lncc"
    MSE = "mse"
    PCC = "pcc"
    SSIM = "ssim"
    MI = "mi"
    PCC_SSIM = "pcc+ssim"


class Regularizer(str, enum.Enum):
    DIFFUSION = "diffusion"
    TOTAL_VARIATION = "tv"
    BENDING = "bending"
    NEGATIVE_JACOBIAN = "negjac"


class Interpolation(str, enum.Enum):
    LINEAR = "linear"
    NEAREST = "nearest"
    CUBIC = "cubic"  # cubic B-spline


class SimilarityInterpolation(str, enum.Enum):
    """How the iterative modes sample the moving image inside the similarity term."""

    LINEAR = "linear"
    CUBIC = "cubic"  # cubic B-spline: no bias towards whole-voxel shifts, ~3x slower per warp


class Normalization(str, enum.Enum):
    MAX = "max"  # divide by the maximum (FAIM, Chen et al.)
    PERCENTILE = "percentile"  # robust: clip to [p0.5, p99.5] and scale to [0, 1]
    NONE = "none"


def choices(enum_type: type[enum.Enum]) -> list[str]:
    """The accepted string values of an enum, for argument parsers and messages."""
    return [member.value for member in enum_type]
