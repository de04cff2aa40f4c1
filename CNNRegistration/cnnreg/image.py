"""Image I/O, geometry checks, resampling and displacement-field files (SimpleITK).

Every reader/checker raises :class:`cnnreg.errors.InputError` with a message that names
the file (or role) and the problem.  Arrays follow :mod:`cnnreg.settings`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError, WriteError
from .grid import same_grid
from .nifti import ParallelGzipWriter, check_nifti, is_nifti
from .settings import CT_WINDOW_HU, Interpolation, Normalization
from .spatial import lps_to_voxel, voxel_to_lps


def read_image(path: str | os.PathLike, role: str = "image", allow_constant: bool = False) -> sitk.Image:
    """Read a scalar 2D/3D image with any format SimpleITK knows; check it is usable.

    Raises InputError for: missing/unreadable file, truncated NIfTI, vector or 4D image, NaN/Inf values
    (for NIfTI as stored in the file: :mod:`cnnreg.nifti`),
    an empty image, a 1D profile, or a constant image (unless ``allow_constant``, e.g. a
    single-label mask).
    """
    path = _existing(path, role)
    if is_nifti(path):
        check_nifti(path, role)  # truncation and NaN/Inf, which SimpleITK's reader hides
    image = _read(path, role)
    check_image(image, f"{role} {path}", allow_constant=allow_constant)
    return image


def _existing(path: str | os.PathLike, role: str) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{role} {path} is a folder; give an image file")
    if not os.path.isfile(path):
        if os.path.islink(path):
            raise InputError(f"{role} {path} is a broken symbolic link (or a loop of links)")
        raise InputError(f"{role} file not found: {path}")
    return path


def _read(path: str, role: str, header_only: bool = False):
    """``sitk.ReadImage(path)`` (or, with ``header_only``, the reader after reading the header);
    InputError naming ``role`` and the file when SimpleITK cannot read it."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        if header_only:
            reader.ReadImageInformation()
            return reader
        return reader.Execute()
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        if "No such file" in first_line:  # ITK's errno text for a file that is there but short (e.g. a truncated .mha)
            first_line = "its data is missing or truncated"
        raise InputError(
            f"cannot read {role} file {path}: not an image SimpleITK can read, or damaged ({first_line})"
        ) from None


def size_from_header(path: str | os.PathLike, role: str = "image") -> tuple[int, ...]:
    """The image's size (SimpleITK order ``(i, j, k)``) from its header only: nothing large is read."""
    return grid_from_header(path, role)[0]


def grid_from_header(path: str | os.PathLike, role: str = "image") -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The image's size and spacing (mm), ``(i, j, k)`` order, from its header only."""
    reader = _read(_existing(path, role), role, header_only=True)
    return tuple(int(n) for n in reader.GetSize()), tuple(float(s) for s in reader.GetSpacing())


def check_image(image: sitk.Image, name: str, allow_constant: bool = False) -> None:
    """Raise InputError unless ``image`` is a finite, non-empty, non-constant scalar 2D/3D image."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} is a vector image with {image.GetNumberOfComponentsPerPixel()} components; "
            "a scalar (grey-level) image is needed"
        )
    if image.GetDimension() not in (2, 3):
        raise InputError(
            f"{name} is {image.GetDimension()}D with size {image.GetSize()}; only 2D and 3D images are supported"
        )
    if image.GetNumberOfPixels() == 0 or min(image.GetSize()) == 0:
        raise InputError(f"{name} is empty (size {image.GetSize()})")
    if sum(n > 1 for n in image.GetSize()) < 2:
        raise InputError(
            f"{name} has size {image.GetSize()}: fewer than two axes longer than one voxel; a 2D or 3D image is needed"
        )
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(f"{name} contains {count} NaN or infinite voxels")
    if not allow_constant and float(array.max()) == float(array.min()):
        raise InputError(f"{name} is constant (every voxel is {float(array.min())}); nothing to register")


def working_axes(image: sitk.Image) -> tuple[int, ...]:
    """Array axes ``(k, j, i)`` used for computation: all of them, except that a 3D image with
    exactly one singleton axis (a single slice) is handled as 2D."""
    shape = sitk.GetArrayViewFromImage(image).shape
    if len(shape) == 3:
        kept = tuple(axis for axis, n in enumerate(shape) if n > 1)
        if len(kept) == 2:
            return kept
    return tuple(range(len(shape)))


def to_array(image: sitk.Image) -> np.ndarray:
    """Image -> float32 array on its working axes (``(D, H, W)`` or ``(H, W)``)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    axes = working_axes(image)
    return array.reshape([array.shape[a] for a in axes])


def normalize(array: np.ndarray, method: Normalization | str = Normalization.MAX) -> np.ndarray:
    """Intensity normalisation: ``max`` divides by the maximum absolute value (the reference
    methods); ``percentile`` clips to [p0.5, p99.5] and rescales to [0, 1]; ``ct`` clips
    Hounsfield units to :data:`cnnreg.settings.CT_WINDOW_HU` and rescales to [0, 1]; ``none``
    keeps values."""
    method = Normalization(method)
    array = np.asarray(array, dtype=np.float32)
    if method is Normalization.CT:
        low, high = CT_WINDOW_HU
        return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if method is Normalization.MAX:
        peak = float(np.abs(array).max())
        return array / peak if peak > 0 else array
    if method is Normalization.PERCENTILE:
        low, high = np.percentile(array, [0.5, 99.5])
        if high <= low:
            low, high = float(array.min()), float(array.max())
        return np.clip((array - low) / max(high - low, 1e-12), 0.0, 1.0).astype(np.float32)
    return array


def check_pair(
    fixed: sitk.Image, moving: sitk.Image, fixed_name: str = "fixed image", moving_name: str = "moving image"
) -> None:
    """Raise InputError when two images cannot be registered together (2D vs 3D, or a single
    slice stored as 2D on one side and as 3D on the other); the names go into the message."""
    fixed_dims = len(working_axes(fixed))
    moving_dims = len(working_axes(moving))
    if fixed_dims != moving_dims:
        raise InputError(
            f"{fixed_name} is {fixed_dims}D (size {fixed.GetSize()}) but {moving_name} is "
            f"{moving_dims}D (size {moving.GetSize()}); both must be 2D or both 3D (the same dimension)"
        )
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(
            f"{fixed_name} is stored as {fixed.GetDimension()}D and {moving_name} as {moving.GetDimension()}D; "
            "store both single slices the same way"
        )


def check_labels(labels: sitk.Image, moving: sitk.Image, name: str = "moving labels") -> None:
    """Raise InputError unless ``labels`` is an integer-valued label map on the moving grid."""
    if labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} must be a scalar label map, got {labels.GetNumberOfComponentsPerPixel()} components")
    if not same_grid(labels, moving):
        raise InputError(
            f"{name} are not on the moving image grid: labels size {labels.GetSize()}, spacing "
            f"{labels.GetSpacing()}, origin {labels.GetOrigin()} vs moving size {moving.GetSize()}, "
            f"spacing {moving.GetSpacing()}, origin {moving.GetOrigin()}"
        )
    array = sitk.GetArrayViewFromImage(labels)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{name} contain non-integer values; a label map holds integer labels")


_SITK_INTERPOLATORS = {
    Interpolation.LINEAR: sitk.sitkLinear,
    Interpolation.NEAREST: sitk.sitkNearestNeighbor,
    Interpolation.CUBIC: sitk.sitkBSpline,
}


def resample(
    image: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform | None = None,
    interpolation: Interpolation | str = Interpolation.LINEAR,
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid through ``transform`` (reference physical
    point -> image physical point; identity when None).  Output keeps ``image``'s pixel type."""
    interpolator = _SITK_INTERPOLATORS[Interpolation(interpolation)]
    transform = transform if transform is not None else sitk.Transform(reference.GetDimension(), sitk.sitkIdentity)
    return sitk.Resample(image, reference, transform, interpolator, default_value, image.GetPixelID())


def normalized_image(image: sitk.Image, method: Normalization | str) -> sitk.Image:
    """``image`` as float32 normalised by :func:`normalize`, on its own grid."""
    array = sitk.GetArrayFromImage(image)
    normalized = sitk.GetImageFromArray(normalize(array, method))
    normalized.CopyInformation(image)
    return normalized


#: a CT in Hounsfield units has air (-1000 HU) around the body; an image with nothing below this
#: value is not in HU (e.g. stored without its rescale intercept, or an MR image)
MAX_AIR_HU = -500.0


def check_hounsfield(image: sitk.Image, name: str) -> None:
    """InputError unless ``image`` looks like Hounsfield units (some voxel at or below
    :data:`MAX_AIR_HU`), for ``--normalization ct``."""
    array = sitk.GetArrayViewFromImage(image)
    low, high = float(array.min()), float(array.max())
    if low > MAX_AIR_HU:
        raise InputError(
            f"{name} does not look like a CT in Hounsfield units (values {low:g} to {high:g}, no air at or below "
            f"{MAX_AIR_HU:g} HU), but the CT normalisation (--normalization ct, the phantom-to-CT presets) expects "
            "HU: convert it (rescale slope and intercept, e.g. HU = stored - 1024) or choose another normalisation"
        )


def looks_like_hounsfield(image: sitk.Image) -> bool:
    """A guess for advice only: values span air (<= -900) to bone (>= 300), as a CT's do."""
    array = sitk.GetArrayViewFromImage(image)
    return float(array.min()) <= -900.0 and float(array.max()) >= 300.0


def background_value(image: sitk.Image, method: Normalization | str) -> float:
    """The value that stands for "outside the image" when it is resampled: its minimum for CT
    (air, not 0 HU, which is soft tissue), 0 otherwise."""
    return float(sitk.GetArrayViewFromImage(image).min()) if Normalization(method) is Normalization.CT else 0.0


def working_size(size: Sequence[int], spacing: Sequence[float], working_spacing: float) -> tuple[int, ...]:
    """Size ``(i, j[, k])`` of the working grid over an image of ``size`` voxels of ``spacing`` mm:
    each axis finer than ``working_spacing`` (mm) resampled to it, covering the same extent (the
    last working sample at or beyond the last voxel centre); the image's own size when
    ``working_spacing`` is 0 or no axis is finer."""
    return tuple(
        int(math.ceil((n - 1) * s / working_spacing - 1e-6)) + 1 if working_spacing > s and n > 1 else int(n)
        for n, s in zip(size, spacing)
    )


def budget_spacing(size: Sequence[int], spacing: Sequence[float], max_voxels: int) -> float:
    """The finest isotropic working spacing (mm, a multiple of 0.05 mm) whose working grid (see
    :func:`working_size`) holds at most ``max_voxels``; 0 when the image's own grid does or
    ``max_voxels`` is 0 (no limit)."""
    if not max_voxels or math.prod(size) <= max_voxels:
        return 0.0

    def fits(steps: int) -> bool:  # a working spacing of ``steps`` x 0.05 mm
        return math.prod(working_size(size, spacing, steps * 0.05)) <= max_voxels

    # an isotropic grid over the extent fits from here on (axes already coarser only shrink it)
    extent = math.prod(max((n - 1) * s, s) for n, s in zip(size, spacing))
    high = math.ceil(max(min(spacing), (extent / max_voxels) ** (1.0 / len(size))) / 0.05 - 1e-9)
    while not fits(high):
        high += 1
    low = math.ceil(min(spacing) / 0.05 - 1e-9) - 1  # does not fit: the image's own grid does not
    while high - low > 1:  # the number of voxels only falls as the spacing grows
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return round(high * 0.05, 2)


def working_grid(image: sitk.Image, working_spacing: float) -> sitk.Image | None:
    """The grid (an empty float32 image: same origin and direction) on which a registration with
    ``working_spacing`` (mm) runs, or None when it is ``image``'s own grid (see :func:`working_size`)."""
    size = working_size(image.GetSize(), image.GetSpacing(), working_spacing)
    if size == tuple(image.GetSize()):
        return None
    grid = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    grid.SetSpacing(
        [working_spacing if new != old else s for new, old, s in zip(size, image.GetSize(), image.GetSpacing())]
    )
    return grid


def resample_smoothed(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """``image`` (float32) on the coarser ``grid``: Gaussian-smoothed first (sigma = half the spacing
    ratio minus one voxel per axis, so coarse samples do not alias fine detail), then linear."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    sigma_mm = [0.5 * math.sqrt(max(0.0, g * g - s * s)) for g, s in zip(grid.GetSpacing(), image.GetSpacing())]
    if max(sigma_mm) > 0:
        image = sitk.DiscreteGaussian(image, [v * v for v in sigma_mm], 32, 0.01, True)
    return resample(image, grid)


def affine_prealign(fixed: sitk.Image, moving: sitk.Image, iterations: int = 200) -> sitk.AffineTransform:
    """Affine pre-alignment (moments initialisation, Mattes MI, 3-level pyramid).

    Returns the transform from fixed physical space to moving physical space.
    """
    dim = fixed.GetDimension()
    fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_f = sitk.Cast(moving, sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(
        fixed_f, moving_f, sitk.AffineTransform(dim), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, gradientMagnitudeTolerance=1e-8
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SetInitialTransform(initial, inPlace=False)
    result = method.Execute(fixed_f, moving_f)
    if isinstance(result, sitk.CompositeTransform):
        result = result.GetBackTransform() if result.GetNumberOfTransforms() == 1 else result.GetNthTransform(0)
    return sitk.AffineTransform(result)


def affine_matrix(transform: sitk.Transform | None, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, b)`` with ``T(p) = A p + b`` for a matrix-offset transform (identity when None)."""
    if transform is None:
        return np.eye(dim), np.zeros(dim)
    affine = sitk.AffineTransform(transform)
    matrix = np.asarray(affine.GetMatrix(), dtype=np.float64).reshape(dim, dim)
    center = np.asarray(affine.GetCenter(), dtype=np.float64)
    translation = np.asarray(affine.GetTranslation(), dtype=np.float64)
    return matrix, center + translation - matrix @ center


def physical_points(image: sitk.Image, rows: slice | None = None) -> np.ndarray:
    """World (LPS) coordinates of every voxel: ``(*array_shape, dim)``, components ``(x, y, z)``.

    ``rows``: only the voxels of this slice of the first array axis (``(n_rows, *array_shape[1:], dim)``).
    """
    shape = sitk.GetArrayViewFromImage(image).shape
    ranges = [np.arange(n) for n in shape]
    if rows is not None:
        ranges[0] = ranges[0][rows]
    index = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1)[..., ::-1]
    matrix = np.asarray(image.GetDirection(), dtype=np.float64).reshape(image.GetDimension(), -1) @ np.diag(
        image.GetSpacing()
    )
    return index @ matrix.T + np.asarray(image.GetOrigin())


#: voxels converted at a time by :func:`displacement_image` (bounds its float64 temporaries)
SLAB_VOXELS = 2**18


def displacement_image(u: np.ndarray, fixed: sitk.Image, pre_transform: sitk.Transform | None = None) -> sitk.Image:
    """Voxel displacement on the fixed grid -> ITK displacement field (LPS mm, vector float64).

    Args:
        u: ``(n_work, *S_work)`` voxels of the fixed grid, channels in working-axis order
            (any float dtype; converted to float64 slab by slab).
        fixed: the fixed image (defines the grid).
        pre_transform: optional affine pre-alignment (fixed -> moving physical); the field
            returned then represents the whole mapping ``x -> A(x + d(x))``.

    Returns:
        A ``sitkVectorFloat64`` image on the fixed grid whose vector at ``x`` is the LPS
        displacement in mm, directly usable by ``sitk.DisplacementFieldTransform``.  Its values
        are rounded to float32, the precision of the written file, so that warped images made
        from this field and from the file agree exactly.

    The conversion runs in float64 on slabs of the first array axis (:data:`SLAB_VOXELS`
    voxels), so its temporaries stay small whatever the image size; every vector is computed
    exactly as for the whole grid at once.
    """
    dim = fixed.GetDimension()
    shape = sitk.GetArrayViewFromImage(fixed).shape
    axes = working_axes(fixed)
    channels = [np.asarray(u[channel]).reshape(shape) for channel in range(len(axes))]
    affine = affine_matrix(pre_transform, dim) if pre_transform is not None else None
    rounded = np.empty((*shape, dim), dtype=np.float32)
    step = max(1, SLAB_VOXELS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        full = np.zeros((len(shape), rows.stop - rows.start, *shape[1:]), dtype=np.float64)
        for channel, axis in enumerate(axes):
            full[axis] = channels[channel][rows]
        d = voxel_to_lps(full, fixed.GetSpacing(), fixed.GetDirection())
        if affine is not None:
            matrix, offset = affine
            points = physical_points(fixed, rows)
            d = (points + d) @ matrix.T + offset - points
        rounded[rows] = d
    field = sitk.GetImageFromArray(rounded, isVector=True)
    del rounded
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    field.CopyInformation(fixed)
    return field


def field_to_voxels(field: sitk.Image) -> np.ndarray:
    """ITK displacement field (LPS mm) -> voxel displacement ``(dim, *array_shape)`` on its own grid."""
    d = sitk.GetArrayFromImage(field).astype(np.float64)
    return lps_to_voxel(d, field.GetSpacing(), field.GetDirection())


def read_displacement(path: str | os.PathLike) -> sitk.Image:
    """Read an ITK displacement field file (vector image, components = dimension)."""
    path = _existing(path, "displacement")
    if is_nifti(path):
        check_nifti(path, "displacement")
    field = _read(path, "displacement")
    if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
        raise InputError(
            f"{path} is not a displacement field: {field.GetNumberOfComponentsPerPixel()} components per "
            f"voxel in a {field.GetDimension()}D image (a field has one component per dimension)"
        )
    array = sitk.GetArrayViewFromImage(field)
    if not np.all(np.isfinite(array)):
        raise InputError(f"displacement file {path} contains NaN or infinite vectors")
    return sitk.Cast(field, sitk.sitkVectorFloat64)


def apply_displacement(
    image: sitk.Image,
    field: sitk.Image,
    reference: sitk.Image | None = None,
    interpolation: Interpolation | str = Interpolation.LINEAR,
    default_value: float = 0.0,
) -> sitk.Image:
    """Warp ``image`` with an ITK displacement field onto ``reference`` (default: the field's grid).

    The field maps reference physical points to ``image`` physical points (pull); outside the
    field's own grid the displacement is zero.
    """
    if image.GetDimension() != field.GetDimension():
        raise InputError(f"image is {image.GetDimension()}D but the displacement field is {field.GetDimension()}D")
    if reference is not None and reference.GetDimension() != field.GetDimension():
        raise InputError(
            f"the reference grid is {reference.GetDimension()}D but the displacement field is {field.GetDimension()}D"
        )
    if Interpolation(interpolation) is Interpolation.LABEL:
        return warp_labels(image, field, reference)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return resample(image, reference if reference is not None else field, transform, interpolation, default_value)


#: fixed-point iterations of ITK's displacement-field inversion (:func:`inverse_displacement`)
INVERSE_ITERATIONS = 50


def inverse_displacement(
    deformation: sitk.Image, pre_transform: sitk.Transform | None, moving: sitk.Image
) -> sitk.Image:
    """The inverse of a registration's mapping, as an ITK displacement field on the moving grid.

    The registration maps a fixed point ``x`` to the moving point ``A(x + d(x))`` (``A`` the
    affine ``pre_transform``, identity when None; ``d`` = ``deformation``, LPS mm, on the grid it
    was estimated on).  The inverse maps a moving point ``y`` to ``z + v(z)`` with ``z = A^-1 y``
    and ``v`` the inverse of ``d`` (ITK's fixed-point inversion); the returned field holds
    ``z + v(z) - y`` at the moving grid's voxels (vector float64, LPS mm), so that resampling a
    fixed-space image through it gives that image on the moving grid (pull)."""
    inverse = sitk.InvertDisplacementField(
        sitk.Cast(deformation, sitk.sitkVectorFloat64),
        maximumNumberOfIterations=INVERSE_ITERATIONS,
        maxErrorToleranceThreshold=1e-3,
        meanErrorToleranceThreshold=1e-5,
        enforceBoundaryCondition=False,
    )
    steps = [sitk.DisplacementFieldTransform(inverse)]
    if pre_transform is not None:
        steps.append(sitk.AffineTransform(pre_transform).GetInverse())  # applied first (last in the list)
    return sitk.TransformToDisplacementField(
        sitk.CompositeTransform(steps),
        sitk.sitkVectorFloat64,
        moving.GetSize(),
        moving.GetOrigin(),
        moving.GetSpacing(),
        moving.GetDirection(),
    )


def inverse_residual_mm(forward: sitk.Image, inverse: sitk.Image, region: np.ndarray | None = None) -> dict:
    """How far ``forward`` after ``inverse`` is from the identity: ``|F(I(y)) - y|`` (mm) at the
    inverse field's voxels ``y`` (inside ``region``, a boolean array on its grid, when given),
    ``F``/``I`` the transforms of the two ITK displacement fields; mean, 95th percentile, max."""
    composed = sitk.CompositeTransform(
        [
            sitk.DisplacementFieldTransform(sitk.Cast(forward, sitk.sitkVectorFloat64)),
            sitk.DisplacementFieldTransform(sitk.Cast(inverse, sitk.sitkVectorFloat64)),
        ]
    )  # the inverse applied first
    residual = sitk.TransformToDisplacementField(
        composed,
        sitk.sitkVectorFloat64,
        inverse.GetSize(),
        inverse.GetOrigin(),
        inverse.GetSpacing(),
        inverse.GetDirection(),
    )
    length = np.sqrt((sitk.GetArrayViewFromImage(residual) ** 2).sum(axis=-1))
    values = length[region] if region is not None else length.ravel()
    if values.size == 0:
        return {"mean": None, "p95": None, "max": None}
    return {"mean": float(values.mean()), "p95": float(np.percentile(values, 95)), "max": float(values.max())}


#: Gaussian sigma (voxels of the label map) of each label's indicator before it is warped by
#: :func:`warp_labels`: smooth enough that a boundary moves by sub-voxel amounts, small enough
#: that thin structures survive (Greedy's ``-ri LABEL 0.2vox``)
LABEL_SMOOTHING_VOXELS = 0.2


#: at most this fraction of neighbouring voxel pairs (along the first index axis, where either is
#: non-zero) differ in a label map: measured 0.15 for the sample's GM/WM labels at 2 mm, 0.01 for
#: the CT case's organs, against 0.96 for the sample's uint8 T1 and 0.76 for an int16 CT
MAX_LABEL_CHANGES = 0.5


def is_label_map(image: sitk.Image) -> bool:
    """An integer image that is piecewise constant (few neighbouring voxels differ,
    :data:`MAX_LABEL_CHANGES`): a label map or mask, not an integer-typed intensity image."""
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.integer) or array.shape[-1] < 2:
        return False
    right, left = array[..., 1:], array[..., :-1]
    occupied = (right != 0) | (left != 0)
    return bool(((right != left) & occupied).sum() <= MAX_LABEL_CHANGES * max(1, int(occupied.sum())))


def label_interpolation(labels: sitk.Image, reference: sitk.Image) -> Interpolation:
    """How a label map is best brought onto ``reference``'s grid: label-aware when that grid is
    finer (a voxel less than half the label map's: smooth boundaries instead of the coarse grid's
    staircase; the xcat_ct phantom's lungs onto the CT: Dice 0.912 against nearest's 0.907),
    nearest neighbour otherwise (it keeps thin structures: the sample's GM 0.984 against 0.959)."""
    finer = math.prod(reference.GetSpacing()) < 0.5 * math.prod(labels.GetSpacing())
    return Interpolation.LABEL if finer else Interpolation.NEAREST


def warp_labels(
    labels: sitk.Image,
    field: sitk.Image,
    reference: sitk.Image | None = None,
    sigma_voxels: float = LABEL_SMOOTHING_VOXELS,
) -> sitk.Image:
    """Warp a label map through an ITK displacement field label-aware: each label's indicator
    (background included) is Gaussian-smoothed by ``sigma_voxels`` voxels, resampled linearly
    through the field onto ``reference`` (default: the field's grid), and every output voxel
    takes the label whose warped indicator is largest.  Onto a finer grid (a phantom's labels
    onto a CT) the boundaries are smooth iso-surfaces instead of the coarse grid's staircase;
    on the same grid nearest neighbour keeps thin structures better (arg-max favours the thicker
    neighbour).  The output keeps the label map's pixel type."""
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    grid = reference if reference is not None else field
    array = sitk.GetArrayViewFromImage(labels)
    variance = [(sigma_voxels * s) ** 2 for s in labels.GetSpacing()]
    best_value = best_label = None
    for value in np.unique(array):
        indicator = sitk.Cast(labels == int(value), sitk.sitkFloat32)
        if sigma_voxels > 0:
            indicator = sitk.DiscreteGaussian(indicator, variance, 32, 0.01, True)
        warped = sitk.GetArrayFromImage(resample(indicator, grid, transform, Interpolation.LINEAR))
        if best_value is None:
            best_value, best_label = warped, np.full(warped.shape, value, dtype=array.dtype)
        else:
            higher = warped > best_value
            best_value[higher], best_label[higher] = warped[higher], value
    out = sitk.GetImageFromArray(best_label)
    out.CopyInformation(grid)
    return out


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write ``image`` (format from the extension); :class:`cnnreg.errors.WriteError` naming the
    path if SimpleITK reports a failure (a short write is only found by reading back:
    :func:`cnnreg.outputs.verify_image_file`)."""
    path = os.fspath(path)
    try:
        if is_displacement_field(image) and path.lower().endswith((".nii", ".nii.gz")):
            _write_nifti_displacement(image, path)
        else:
            sitk.WriteImage(image, path, useCompression=compress)
    except RuntimeError as error:
        raise WriteError(f"cannot write {path}: {str(error).strip().splitlines()[-1]}") from None
    except OSError as error:
        raise WriteError(f"cannot write {path}: {error.strerror or error}") from None


#: NIfTI intent code of a displacement field (NIFTI_INTENT_DISPVECT), at byte 68 of the header
NIFTI_INTENT_DISPLACEMENT = 1006
_NIFTI_FLOAT_TYPES = {16: np.float32, 64: np.float64}


def is_displacement_field(image: sitk.Image) -> bool:
    """A 3D image with one vector component per axis (what cnnreg writes as a displacement field)."""
    return image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 3


def _write_nifti_displacement(field: sitk.Image, path: str) -> None:
    """A 3D displacement field (LPS mm) as NIfTI intent 1006, the code Slicer, nibabel and FSL
    expect of a displacement field: its vectors stored in RAS (the NIfTI world), which ITK
    readers (SimpleITK, ANTs, Greedy, Slicer) convert back to LPS.  Streamed: the x and y
    components (the first two thirds of NIfTI's component-major data) are negated chunk by chunk,
    so a CT-sized field costs no second copy in memory."""
    import shutil
    import struct
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(suffix=".nii", prefix=".field-", dir=folder)
    os.close(handle)
    try:
        sitk.WriteImage(field, temporary, useCompression=False)
        with open(temporary, "r+b") as raw:
            header = bytearray(raw.read(352))
            datatype = struct.unpack("<h", header[70:72])[0]
            offset = int(struct.unpack("<f", header[108:112])[0])
            if datatype not in _NIFTI_FLOAT_TYPES or struct.unpack("<h", header[40:42])[0] != 5:
                raise RuntimeError(f"unexpected NIfTI layout for a displacement field (datatype {datatype})")
            header[68:70] = struct.pack("<h", NIFTI_INTENT_DISPLACEMENT)
            raw.seek(0)
            raw.write(header)
            raw.seek(0)
            head = raw.read(offset)
            dtype = np.dtype(_NIFTI_FLOAT_TYPES[datatype]).newbyteorder("<")
            flipped_bytes = 2 * math.prod(field.GetSize()) * dtype.itemsize  # the x and y components
            compressed = path.lower().endswith(".gz")
            with ParallelGzipWriter(path, torch.get_num_threads()) if compressed else open(path, "wb") as out:
                out.write(head)
                chunk = 1 << 24
                done = 0
                while done < flipped_bytes:
                    block = raw.read(min(chunk, flipped_bytes - done))
                    out.write((-np.frombuffer(block, dtype=dtype)).astype(dtype).tobytes())
                    done += len(block)
                shutil.copyfileobj(raw, out, 1 << 24)  # z: the same in LPS and RAS
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def array_to_image(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    """Array -> image on ``reference``'s grid: a working-axes array ``(D, H, W)``/``(H, W)`` (or
    one with the reference's singleton axes), or with ``is_vector`` a field ``(*array_shape, dim)``."""
    if is_vector:
        image = sitk.GetImageFromArray(np.asarray(array), isVector=True)
    else:
        image = sitk.GetImageFromArray(np.asarray(array).reshape(sitk.GetArrayViewFromImage(reference).shape))
    image.CopyInformation(reference)
    return image


#: image files a folder given as a list of images contributes (training, atlas, batch)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".tif", ".tiff", ".jpg")
LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv")


def expand_paths(entries: Sequence[str] | str | None) -> list[str]:
    """Folders (their image files, sorted), list files (one path per line, relative to the
    list's folder, ``#`` comments) and image files -> a flat list of image paths."""
    if entries is None:
        return []
    if isinstance(entries, (str, os.PathLike)):
        entries = [entries]
    paths: list[str] = []
    for entry in entries:
        entry = os.fspath(entry)
        if os.path.isdir(entry):
            found = sorted(
                os.path.join(entry, name)
                for name in os.listdir(entry)
                if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
            )
            if not found:
                raise InputError(f"folder {entry} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif entry.lower().endswith(LIST_SUFFIXES):
            if not os.path.isfile(entry):
                raise InputError(f"image list file not found: {entry}")
            base = os.path.dirname(os.path.abspath(entry))
            with open(entry, encoding="utf-8") as handle:
                for line in handle:
                    line = line.split("#", 1)[0].strip()
                    if line:
                        paths.append(line if os.path.isabs(line) else os.path.join(base, line))
        else:
            paths.append(entry)
    return paths
