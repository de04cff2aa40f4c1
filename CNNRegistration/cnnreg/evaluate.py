"""Registration accuracy: label overlap, surface distance, error against a known field, folding.

Conventions (see :mod:`cnnreg.settings`):

* Label maps are integer images; ``0`` is background and never scored.  Arrays are in
  SimpleITK array order ``(k, j, i)`` (``(D, H, W)``), i.e. ``sitk.GetArrayFromImage``.
* Spacing is given as SimpleITK gives it, ``(s_i, s_j[, s_k])`` in mm -- the *reverse* of
  the array axes.
* Displacement fields are ITK displacement-field images: ``sitkVectorFloat64`` (or 32) on
  the fixed grid, vectors in LPS millimetres, pulling the moving image:
  ``warped(x) = moving(x + d(x))``.

Only numpy and SimpleITK are used.  Every check raises :class:`cnnreg.errors.InputError`
with a message naming the offending input, shape or value.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .grid import GEOMETRY_TOLERANCE, describe_grid, same_grid

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def label_array(labels, name: str) -> np.ndarray:
    """Label map (array or scalar image) -> integer array in SimpleITK array order."""
    if isinstance(labels, sitk.Image):
        if labels.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"{name} must be a scalar label map, got {labels.GetNumberOfComponentsPerPixel()} components"
            )
        array = sitk.GetArrayFromImage(labels)
    else:
        array = np.asarray(labels)
    if array.ndim not in (2, 3):
        raise InputError(f"{name} must be a 2D or 3D label map, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{name} contain non-integer values; a label map holds integer labels")
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise InputError(f"{name} have unsupported dtype {array.dtype}; use an integer label map")
    return array.astype(np.int64, copy=False)


def _present_labels(array: np.ndarray) -> set[int]:
    return {int(v) for v in np.unique(array) if v != 0}


def _check_label_pair(a, b, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Both label maps as arrays after checking they share a grid (images) or a shape (arrays)."""
    if isinstance(a, sitk.Image) and isinstance(b, sitk.Image) and not same_grid(a, b):
        raise InputError(
            f"{name_a} and {name_b} are on different grids: {describe_grid(a)} vs {describe_grid(b)}; "
            "resample one onto the other first"
        )
    array_a = label_array(a, name_a)
    array_b = label_array(b, name_b)
    if array_a.shape != array_b.shape:
        raise InputError(f"{name_a} have shape {array_a.shape} but {name_b} have shape {array_b.shape}")
    for array, name in ((array_a, name_a), (array_b, name_b)):
        if not np.any(array):
            raise InputError(f"{name} are empty: every voxel is background (0)")
    return array_a, array_b


def _select_labels(
    array_a: np.ndarray, array_b: np.ndarray, labels: Iterable[int] | None, name_a: str, name_b: str
) -> list[int]:
    present_a = _present_labels(array_a)
    present_b = _present_labels(array_b)
    if labels is None:
        common = sorted(present_a & present_b)
        if not common:
            raise InputError(
                f"no common labels: {name_a} have {sorted(present_a)[:20]}, {name_b} have {sorted(present_b)[:20]}"
            )
        return common
    chosen = []
    for label in labels:
        label = int(label)
        if label == 0:
            raise InputError("label 0 is background and cannot be scored")
        if label not in present_a and label not in present_b:
            raise InputError(f"label {label} is in neither {name_a} nor {name_b}")
        chosen.append(label)
    if not chosen:
        raise InputError("the list of labels to score is empty")
    return chosen


# ---------------------------------------------------------------------------------------
# overlap and surface distance
# ---------------------------------------------------------------------------------------


def dice_per_label(fixed_labels, warped_labels, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice overlap ``2|A∩B| / (|A|+|B|)`` per label.

    Args:
        fixed_labels: label map of the fixed image, array ``(D, H, W)``/``(H, W)`` or sitk.Image.
        warped_labels: moving labels warped onto the fixed grid, same shape/grid.
        labels: labels to score; default = every non-zero label present in *both* maps.  An
            explicitly requested label present in only one map scores 0.

    Returns:
        ``{label: dice}`` with dice in ``[0, 1]``, labels ascending (or in the given order).

    Raises:
        InputError: different grids/shapes, an empty (all-background) map, no common label,
            non-integer values.
    """
    a, b = _check_label_pair(fixed_labels, warped_labels, "fixed labels", "warped labels")
    chosen = _select_labels(a, b, labels, "fixed labels", "warped labels")
    if min(int(a.min()), int(b.min())) >= 0 and max(int(a.max()), int(b.max())) < 2**24:
        # one pass: voxel counts per label and of the agreeing voxels
        length = max(int(a.max()), int(b.max())) + 1
        count_a = np.bincount(a.ravel(), minlength=length)
        count_b = np.bincount(b.ravel(), minlength=length)
        count_both = np.bincount(a[a == b].ravel(), minlength=length)

        def counts(label: int) -> tuple[int, int, int]:
            if label >= length:
                return 0, 0, 0
            return int(count_a[label]), int(count_b[label]), int(count_both[label])
    else:

        def counts(label: int) -> tuple[int, int, int]:
            in_a, in_b = a == label, b == label
            return int(in_a.sum()), int(in_b.sum()), int(np.logical_and(in_a, in_b).sum())

    result = {}
    for label in chosen:
        size_a, size_b, both = counts(label)
        result[label] = 2.0 * both / (size_a + size_b) if size_a + size_b else float("nan")
    return result


def _label_arrays_and_spacing(
    a, b, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Both label maps as arrays (checked as in :func:`dice_per_label`) and the spacing ``(s_i, s_j[, s_k])``."""
    images = [x for x in (a, b) if isinstance(x, sitk.Image)]
    array_a, array_b = _check_label_pair(a, b, "first label map", "second label map")
    if spacing is None:
        if not images:
            raise InputError(
                "label maps given as numpy arrays need spacing in mm as (s_i, s_j[, s_k]) (SimpleITK order)"
            )
        spacing = images[0].GetSpacing()
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != array_a.ndim:
        raise InputError(
            f"spacing {spacing} has {len(spacing)} values but the label maps are {array_a.ndim}D {array_a.shape}"
        )
    if any(not s > 0 for s in spacing):
        raise InputError(f"spacing must be positive, got {spacing}")
    for image in images:
        if not np.allclose(image.GetSpacing(), spacing, rtol=GEOMETRY_TOLERANCE, atol=0):
            raise InputError(f"spacing {spacing} was given but a label image has spacing {image.GetSpacing()}")
    return array_a, array_b, spacing


def surface_distances(
    mask_a: np.ndarray, mask_b: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two binary masks, in mm.

    Args:
        mask_a, mask_b: boolean arrays of one shape, SimpleITK order ``(k, j, i)``; non-empty.
        spacing: ``(s_i, s_j[, s_k])`` in mm (SimpleITK order).

    Returns:
        ``(d_ab, d_ba)``: for each surface voxel of A the distance to the nearest surface
        voxel of B, and the reverse (1D arrays).  A surface voxel is a mask voxel with a face
        neighbour outside the mask (the array border counts as outside); distances are
        between voxel centres.  The direction matrix does not change distances.
    """
    union = np.logical_or(mask_a, mask_b)
    # every surface voxel of A and B lies in the union's bounding box: crop, then pad by one
    bounds = [
        np.flatnonzero(union.any(axis=tuple(x for x in range(union.ndim) if x != axis))) for axis in range(union.ndim)
    ]
    window = tuple(slice(int(b[0]), int(b[-1]) + 1) for b in bounds)
    surfaces = []
    distances = []
    for mask in (mask_a, mask_b):
        image = sitk.GetImageFromArray(np.pad(mask[window], 1).astype(np.uint8))
        image.SetSpacing(tuple(float(s) for s in spacing))
        surface = sitk.LabelContour(image, fullyConnected=False, backgroundValue=0)
        surfaces.append(sitk.GetArrayFromImage(surface) > 0)
        distance = sitk.SignedMaurerDistanceMap(
            surface, insideIsPositive=False, squaredDistance=False, useImageSpacing=True, backgroundValue=0
        )
        distances.append(np.abs(sitk.GetArrayFromImage(distance)))
    return distances[1][surfaces[0]], distances[0][surfaces[1]]


def surface_distance_per_label(
    a, b, spacing: Sequence[float] | None = None, labels: Iterable[int] | None = None
) -> dict[int, dict[str, float]]:
    """HD95 and average symmetric surface distance per label, in millimetres.

    * ``hd95 = max(P95(d(∂A→∂B)), P95(d(∂B→∂A)))``: the larger of the two directed 95th
      percentiles (as MONAI's ``compute_hausdorff_distance(percentile=95)``);
    * ``assd = mean(d(∂A→∂B) ∪ d(∂B→∂A))``,

    where ``d(∂A→∂B)`` are the distances from each surface voxel of A to the nearest surface
    voxel of B (see :func:`surface_distances`).

    Args:
        a, b: label maps on the same grid: ``sitk.Image`` (spacing taken from the image) or
            arrays in SimpleITK order ``(k, j, i)``.
        spacing: required when both are arrays: ``(s_i, s_j[, s_k])`` in mm, SimpleITK order,
            i.e. the *reverse* of the array axes.  For images it must be None or equal.
        labels: labels to score; default = non-zero labels present in both maps.  A label
            present in only one map scores ``inf``.

    Returns:
        ``{label: {"hd95": mm, "assd": mm}}``.
    """
    array_a, array_b, spacing = _label_arrays_and_spacing(a, b, spacing)
    chosen = _select_labels(array_a, array_b, labels, "first label map", "second label map")
    result = {}
    for label in chosen:
        mask_a = array_a == label
        mask_b = array_b == label
        if not (mask_a.any() and mask_b.any()):
            result[label] = {"hd95": float("inf"), "assd": float("inf")}
            continue
        d_ab, d_ba = surface_distances(mask_a, mask_b, spacing)
        result[label] = {
            "hd95": float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))),
            "assd": float(np.concatenate([d_ab, d_ba]).mean()),
        }
    return result


def hd95_per_label(
    a, b, spacing: Sequence[float] | None = None, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Symmetric 95th-percentile Hausdorff distance per label, in millimetres:
    ``{label: hd95_mm}``.  Arguments and definition as :func:`surface_distance_per_label`."""
    return {label: d["hd95"] for label, d in surface_distance_per_label(a, b, spacing, labels).items()}


# ---------------------------------------------------------------------------------------
# displacement fields
# ---------------------------------------------------------------------------------------


def _check_field(field: sitk.Image, name: str) -> None:
    if not isinstance(field, sitk.Image):
        raise InputError(f"{name} must be a SimpleITK displacement-field image, got {type(field).__name__}")
    if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
        raise InputError(
            f"{name} is not a displacement field: {field.GetNumberOfComponentsPerPixel()} components per voxel "
            f"in a {field.GetDimension()}D image (needs one per dimension)"
        )
    if not np.all(np.isfinite(sitk.GetArrayViewFromImage(field))):
        raise InputError(f"{name} contains NaN or infinite vectors")


def _mask_array(mask, reference: sitk.Image) -> np.ndarray:
    """Boolean mask on ``reference``'s grid (array order)."""
    shape = sitk.GetArrayViewFromImage(reference).shape[: reference.GetDimension()]
    if isinstance(mask, sitk.Image):
        if not same_grid(mask, reference):
            raise InputError(
                f"mask is not on the field grid: mask {describe_grid(mask)} vs field {describe_grid(reference)}"
            )
        array = sitk.GetArrayFromImage(mask)
    else:
        array = np.asarray(mask)
    if array.shape != shape:
        raise InputError(f"mask has shape {array.shape} but the field grid is {shape} (array order)")
    array = array != 0
    if not np.any(array):
        raise InputError("mask is empty: no voxel to evaluate")
    return array


def resample_field(field: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Linearly resample a displacement field (vectors unchanged, LPS mm) onto ``reference``'s grid.

    Outside ``field``'s extent the displacement is taken as zero (as ITK does for
    ``DisplacementFieldTransform``).
    """
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    identity = sitk.Transform(field.GetDimension(), sitk.sitkIdentity)
    return sitk.Resample(field, reference, identity, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)


def target_registration_error(field: sitk.Image, true_field: sitk.Image, mask=None) -> dict[str, float]:
    """Dense target registration error ``|d(x) - d_true(x)|`` in mm over the estimated field's grid.

    Both fields map fixed points to moving points (``x -> x + d(x)``), so the error at ``x`` is
    the distance between where the method and the truth send ``x``.

    Args:
        field: estimated ITK displacement field (vector image, LPS mm, on the fixed grid).
        true_field: known field; resampled (linear) onto ``field``'s grid if the grids differ.
        mask: optional region, sitk.Image on the field grid or array ``(D, H, W)`` (non-zero =
            evaluate), e.g. the fixed brain mask.

    Returns:
        ``{"mean", "median", "p95", "max"}`` in mm, plus ``"voxels"`` (count evaluated).
    """
    _check_field(field, "estimated displacement field")
    _check_field(true_field, "true displacement field")
    if field.GetDimension() != true_field.GetDimension():
        raise InputError(
            f"estimated field is {field.GetDimension()}D but the true field is {true_field.GetDimension()}D"
        )
    if not same_grid(field, true_field):
        true_field = resample_field(true_field, field)
    estimate = sitk.GetArrayFromImage(field).astype(np.float64)
    truth = sitk.GetArrayFromImage(true_field).astype(np.float64)
    error = np.sqrt(((estimate - truth) ** 2).sum(axis=-1))
    if mask is not None:
        error = error[_mask_array(mask, field)]
    error = error.ravel()
    return {
        "mean": float(error.mean()),
        "median": float(np.median(error)),
        "p95": float(np.percentile(error, 95)),
        "max": float(error.max()),
        "voxels": int(error.size),
    }


def field_jacobian_determinant(field: sitk.Image) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + d(x)`` for an ITK displacement field.

    Derivatives are central differences along the index axes (one-sided at the borders),
    converted to physical derivatives with spacing *and* direction:
    ``J = I + (∂d/∂index) (R S)^-1``.

    Returns:
        ``(D, H, W)`` (or ``(H, W)``) float64 array; ``<= 0`` means folding.
    """
    _check_field(field, "displacement field")
    dim = field.GetDimension()
    d = sitk.GetArrayFromImage(field).astype(np.float64)  # (*S, dim) vectors (x, y, z)
    spatial = d.shape[:-1]
    if min(spatial) < 2:
        raise InputError(
            f"displacement field grid {field.GetSize()} is too small for derivatives (needs >= 2 per axis)"
        )
    # gradient along array axes (k, j, i) -> reorder to index axes (i, j, k)
    gradients = np.gradient(d, axis=tuple(range(dim)))
    du_didx = np.stack(gradients[::-1], axis=-1)  # (*S, component, index axis i/j/k)
    matrix = np.asarray(field.GetDirection(), dtype=np.float64).reshape(dim, dim) @ np.diag(field.GetSpacing())
    jacobian = du_didx @ np.linalg.inv(matrix) + np.eye(dim)
    return np.linalg.det(jacobian)


def folding_percent(field: sitk.Image, mask=None) -> float:
    """Percentage of voxels (inside ``mask`` if given) where the Jacobian determinant is ``<= 0``."""
    return jacobian_statistics(field, mask)["folding_percent"]


#: ``det J`` is clipped to this range before the log in SDlogJ (as :func:`cnnreg.jacobian.sdlogj`)
SDLOGJ_CLIP = (1e-9, 1e9)


def jacobian_statistics(field: sitk.Image, mask=None) -> dict[str, float]:
    """Folding, extreme Jacobian determinants and SDlogJ of an ITK displacement field.

    ``det J`` is that of :func:`field_jacobian_determinant` (the mapping ``x -> x + d(x)``, spacing
    and direction taken into account).  SDlogJ is the population standard deviation of
    ``log(clip(det J, 1e-9, 1e9))``, exactly as :func:`cnnreg.jacobian.sdlogj`, so folded
    voxels count as ``log(1e-9)`` rather than being dropped.

    Args:
        field: ITK displacement field (vector image, LPS mm), 2D or 3D.
        mask: optional region, sitk.Image on the field grid or array ``(D, H, W)``/``(H, W)``
            in SimpleITK order (non-zero = evaluate).

    Returns:
        ``{"folding_percent": % of voxels with det J <= 0, "min_jacobian", "max_jacobian",
        "sdlogj"}`` (dimensionless) and ``"voxels"`` (count evaluated).
    """
    determinant = field_jacobian_determinant(field)
    if mask is not None:
        determinant = determinant[_mask_array(mask, field)]
    determinant = determinant.ravel()
    log_det = np.log(np.clip(determinant, *SDLOGJ_CLIP))
    return {
        "folding_percent": float(100.0 * np.count_nonzero(determinant <= 0) / determinant.size),
        "min_jacobian": float(determinant.min()),
        "max_jacobian": float(determinant.max()),
        "sdlogj": float(log_det.std()),
        "voxels": int(determinant.size),
    }


def label_set_difference(fixed_labels, warped_labels) -> dict[str, list[int]]:
    """Non-zero labels present in only one of two label maps (arrays or sitk.Image, any shapes).

    Returns:
        ``{"only_in_fixed": [...], "only_in_warped": [...]}``, ascending.  These are the labels
        that :func:`dice_per_label` and :func:`surface_distance_per_label` leave out by default.
    """
    present_fixed = _present_labels(label_array(fixed_labels, "fixed labels"))
    present_warped = _present_labels(label_array(warped_labels, "warped labels"))
    return {
        "only_in_fixed": sorted(present_fixed - present_warped),
        "only_in_warped": sorted(present_warped - present_fixed),
    }


# ---------------------------------------------------------------------------------------
# putting it together
# ---------------------------------------------------------------------------------------


def _finite_mean(values: Iterable[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def evaluate_registration(
    fixed_labels: sitk.Image,
    warped_labels: sitk.Image,
    field: sitk.Image | None = None,
    true_field: sitk.Image | None = None,
    mask=None,
    label_names: Mapping[int, str] | None = None,
    labels: Iterable[int] | None = None,
    surface_distance: bool = True,
) -> dict:
    """All metrics of one registration result as a nested, JSON-friendly dict.

    Args:
        fixed_labels, warped_labels: label maps on the fixed grid (sitk.Image).
        field: the method's displacement field (ITK, LPS mm) for folding and TRE; optional.
        true_field: the known field; TRE is reported only when both fields are given.
        mask: region for folding and TRE (sitk.Image on the field grid or array); optional.
        label_names: ``{label: name}`` used for readable keys in :func:`evaluation_table`.
        labels: labels to score (default: present in both).
        surface_distance: compute HD95 and ASSD (the slowest metrics).

    Returns:
        ``{"dice": {label: v}, "dice_mean": v, "hd95": {label: mm}, "hd95_mean": mm,
        "assd": {label: mm}, "assd_mean": mm, "folding_percent": %, "min_jacobian": v,
        "max_jacobian": v, "sdlogj": v, "tre": {...} or None, "label_names": {...}}``; the
        field metrics (see :func:`jacobian_statistics`) are None without a field.
    """
    dice = dice_per_label(fixed_labels, warped_labels, labels)
    result = {
        "dice": dice,
        "dice_mean": _finite_mean(dice.values()),
        "hd95": None,
        "hd95_mean": None,
        "assd": None,
        "assd_mean": None,
        "folding_percent": None,
        "min_jacobian": None,
        "max_jacobian": None,
        "sdlogj": None,
        "tre": None,
        "label_names": {int(k): str(v) for k, v in (label_names or {}).items()},
    }
    if surface_distance:
        distances = surface_distance_per_label(fixed_labels, warped_labels, labels=list(dice))
        result["hd95"] = {label: d["hd95"] for label, d in distances.items()}
        result["hd95_mean"] = _finite_mean(result["hd95"].values())
        result["assd"] = {label: d["assd"] for label, d in distances.items()}
        result["assd_mean"] = _finite_mean(result["assd"].values())
    if field is not None:
        statistics = jacobian_statistics(field, mask)
        for key in ("folding_percent", "min_jacobian", "max_jacobian", "sdlogj"):
            result[key] = statistics[key]
        if true_field is not None:
            result["tre"] = target_registration_error(field, true_field, mask)
    return result


def flatten_metrics(metrics: Mapping, label_names: Mapping[int, str] | None = None, prefix: str = "") -> dict:
    """Nested metrics (as from :func:`evaluate_registration`) -> one flat row.

    Per-label dicts become ``dice_<name>``/``hd95_<name>`` columns (label number when unnamed),
    ``tre`` becomes ``tre_mean`` etc.  Other scalars are kept as they are.
    """
    names = dict(metrics.get("label_names") or {})
    names.update({int(k): str(v) for k, v in (label_names or {}).items()})
    row = {}
    for key, value in metrics.items():
        if key == "label_names":
            continue
        if isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                try:
                    column = names.get(int(sub_key), str(sub_key))
                except (TypeError, ValueError):
                    column = str(sub_key)
                row.update(flatten_metrics({f"{key}_{column}": sub_value}, None, prefix))
        else:
            row[f"{prefix}{key}"] = value
    return row


def _json_safe(value):
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def write_json(data, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON; NaN/inf become ``null``, numpy scalars plain numbers."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_json_safe(data), handle, indent=2, sort_keys=False)
        handle.write("\n")


def evaluation_table(
    rows: Sequence[Mapping],
    csv_path: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
) -> list[dict]:
    """Flatten result rows and optionally write them as CSV and/or JSON.

    Args:
        rows: one mapping per (case, method), e.g. ``{"case": ..., "method": ..., **metrics}``
            where nested dicts (per-label Dice, TRE) are flattened by :func:`flatten_metrics`.
        csv_path: CSV file to write (columns = union of keys, in first-seen order).
        json_path: JSON file to write (the *unflattened* rows, JSON-safe).

    Returns:
        The flattened rows.
    """
    flat = [flatten_metrics(row) for row in rows]
    if csv_path is not None:
        columns: list[str] = []
        for row in flat:
            columns.extend(key for key in row if key not in columns)
        with open(csv_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            for row in flat:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    if json_path is not None:
        write_json(list(rows), json_path)
    return flat
