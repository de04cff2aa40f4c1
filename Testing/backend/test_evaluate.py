"""cnnreg.evaluate: hand-derived Dice, HD95, TRE and Jacobian values on tiny synthetic volumes."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import cnnreg  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "CNNRegistration"))

from cnnreg.errors import InputError
from cnnreg.evaluate import (
    dice_per_label,
    evaluate_registration,
    evaluation_table,
    field_jacobian_determinant,
    folding_percent,
    hd95_per_label,
    surface_distance_per_label,
    target_registration_error,
)

# SimpleITK order (s_i, s_j, s_k): the array axes (k, j, i) have spacings (2.0, 1.0, 1.5) mm.
SPACING = (1.5, 1.0, 2.0)
OBLIQUE = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # a rotation (axis permutation), det +1


def cube(shape=(12, 12, 12), start=(2, 2, 2), size=4, label=1) -> np.ndarray:
    array = np.zeros(shape, dtype=np.uint8)
    array[tuple(slice(s, s + size) for s in start)] = label
    return array


def as_image(array: np.ndarray, spacing=SPACING, direction=None, origin=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    if origin is not None:
        image.SetOrigin(origin)
    return image


# --------------------------------------------------------------------------- Dice


def test_dice_of_cubes_offset_by_two_voxels():
    # 4x4x4 cubes (64 voxels each) offset by 2 voxels along i overlap in 2x4x4 = 32 voxels:
    # Dice = 2 * 32 / (64 + 64) = 0.5, whatever the spacing.
    a = cube(start=(2, 2, 2))
    b = cube(start=(2, 2, 4))
    assert dice_per_label(a, b) == {1: pytest.approx(0.5)}
    assert dice_per_label(as_image(a), as_image(b)) == {1: pytest.approx(0.5)}


def test_dice_several_labels_and_explicit_list():
    a = cube(start=(1, 1, 1), label=1) + cube(start=(6, 6, 6), size=3, label=2)
    b = cube(start=(1, 1, 2), label=1) + cube(start=(6, 6, 6), size=3, label=2) + cube(start=(0, 8, 0), size=2, label=3)
    # label 1: shift 1 voxel -> overlap 3*4*4 = 48 -> 2*48/128 = 0.75; label 2 identical -> 1;
    # label 3 only in b: left out by default, 0 when asked for.
    assert dice_per_label(a, b) == {1: pytest.approx(0.75), 2: pytest.approx(1.0)}
    assert dice_per_label(a, b, labels=[3, 1]) == {3: 0.0, 1: pytest.approx(0.75)}


def test_dice_2d():
    a = np.zeros((8, 8), np.int16)
    b = np.zeros((8, 8), np.int16)
    a[2:6, 2:6] = 5  # 16 pixels
    b[2:6, 3:7] = 5  # overlap 4x3 = 12 -> 24/32
    assert dice_per_label(a, b) == {5: pytest.approx(0.75)}


def test_dice_errors():
    a = cube()
    with pytest.raises(InputError, match="fixed labels are empty"):
        dice_per_label(np.zeros_like(a), a)
    with pytest.raises(InputError, match="warped labels are empty"):
        dice_per_label(a, np.zeros_like(a))
    with pytest.raises(InputError, match="no common labels"):
        dice_per_label(a, cube(label=2))
    with pytest.raises(InputError, match=r"shape \(12, 12, 12\).*shape \(12, 12, 10\)"):
        dice_per_label(a, a[:, :, :10])
    with pytest.raises(InputError, match="different grids"):
        dice_per_label(as_image(a), as_image(a, spacing=(1.0, 1.0, 1.0)))
    with pytest.raises(InputError, match="non-integer"):
        dice_per_label(a.astype(np.float32) * 0.5, a)
    with pytest.raises(InputError, match="label 7 is in neither"):
        dice_per_label(a, a, labels=[7])


# --------------------------------------------------------------------------- HD95


@pytest.mark.parametrize(("axis", "expected"), [(2, 3.0), (1, 2.0), (0, 4.0)])
def test_hd95_of_shifted_cubes_with_anisotropic_spacing(axis, expected):
    # A = 4x4x4 cube, B = A shifted by 2 voxels along array axis `axis`.  The 56 surface voxels
    # of A (face connectivity: 8 of 64 are interior) split by their layer along that axis:
    #   first face (16 voxels):  nearest B surface voxel 2 voxels away        -> 2 s
    #   1st ring   (12 voxels):  1 voxel from B's first face                  -> 1 s
    #   2nd ring   (12 voxels):  inside B's first face                        -> 0
    #   last face, ring (12):    on B's ring                                  -> 0
    #   last face, centre (4):   1 voxel from B's surface along the cheapest axis -> min(spacing)
    # Sorted: 24 x 0, 4 x 1.0, 12 x s, 16 x 2s; numpy's P95 sits at rank 0.95 * 55 = 52.25,
    # inside the top 16, so P95 = 2 s, and by symmetry the same from B to A:
    # HD95 = 2 voxels x spacing of the shifted axis: s_i = 1.5 -> 3.0, s_j = 1.0 -> 2.0,
    # s_k = 2.0 -> 4.0 (array axes (k, j, i) <- SimpleITK spacing (s_i, s_j, s_k) reversed).
    start_b = [3, 3, 3]
    start_b[axis] += 2
    a = cube(start=(3, 3, 3))
    b = cube(start=tuple(start_b))
    assert hd95_per_label(a, b, spacing=SPACING) == {1: pytest.approx(expected)}
    # ASSD: (16 * 2s + 12 * s + 4 * 1.0) / 56 per direction, the same both ways
    s = expected / 2
    assd = surface_distance_per_label(a, b, spacing=SPACING)[1]["assd"]
    assert assd == pytest.approx((32 * s + 12 * s + 4 * 1.0) / 56)
    # images: spacing from the image; an oblique direction does not change distances
    assert hd95_per_label(as_image(a, direction=OBLIQUE), as_image(b, direction=OBLIQUE)) == {
        1: pytest.approx(expected)
    }


def test_hd95_identical_and_touching_border():
    a = cube(shape=(6, 6, 6), start=(0, 0, 0), size=6)  # fills the array: border voxels are surface
    assert hd95_per_label(a, a, spacing=(1, 1, 1)) == {1: 0.0}
    b = cube(shape=(6, 6, 6), start=(0, 0, 0), size=5)
    # A's 152 surface voxels vs B = [0, 5)^3 (surface: a coordinate 0 or 4): a voxel of A with
    # n coordinates equal to 5 is sqrt(n) from B's surface (n = 0: 61 voxels, 1: 75, 2: 15,
    # 3: 1); P95 at rank 0.95 * 151 = 143.45 falls among the 15 at sqrt(2).  B -> A: every
    # surface voxel of B is 0 or 1 from A's surface.  HD95 = max(sqrt(2), 1).
    assert hd95_per_label(a, b, spacing=(1, 1, 1)) == {1: pytest.approx(math.sqrt(2.0))}


def test_hd95_2d_and_missing_label():
    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), np.uint8)
    a[2:6, 2:6] = 1
    b[2:6, 5:9] = 1  # shifted by 3 pixels along i (s_i = 0.5 mm) -> 1.5 mm
    b[0, 0] = 2
    result = hd95_per_label(a, b, spacing=(0.5, 2.0), labels=[1, 2])
    assert result[1] == pytest.approx(1.5)
    assert math.isinf(result[2])


def test_hd95_errors():
    a = cube()
    with pytest.raises(InputError, match="need spacing"):
        hd95_per_label(a, a)
    with pytest.raises(InputError, match="has 2 values"):
        hd95_per_label(a, a, spacing=(1.0, 1.0))
    with pytest.raises(InputError, match="spacing must be positive"):
        hd95_per_label(a, a, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="no common labels"):
        hd95_per_label(a, cube(label=3), spacing=SPACING)
    with pytest.raises(InputError, match="different grids"):
        hd95_per_label(as_image(a), as_image(a, origin=(5.0, 0.0, 0.0)))


# --------------------------------------------------------------------------- fields


def field_image(vectors: np.ndarray, spacing=SPACING, direction=None, origin=None) -> sitk.Image:
    image = sitk.GetImageFromArray(vectors.astype(np.float64), isVector=True)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    if origin is not None:
        image.SetOrigin(origin)
    return image


def constant_field(vector, shape=(6, 7, 8), **geometry) -> sitk.Image:
    return field_image(np.broadcast_to(np.asarray(vector, float), (*shape, len(vector))).copy(), **geometry)


def test_tre_of_field_against_itself_is_zero():
    rng = np.random.default_rng(0)
    field = field_image(rng.normal(size=(6, 7, 8, 3)), direction=OBLIQUE, origin=(1.0, -2.0, 3.0))
    assert target_registration_error(field, field) == {
        "mean": 0.0,
        "median": 0.0,
        "p95": 0.0,
        "max": 0.0,
        "voxels": 336,
    }


def test_tre_against_constant_shift_is_the_shift_norm():
    # d - d_true = (3, 4, 0) mm everywhere -> |error| = 5 mm
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(6, 7, 8, 3))
    field = field_image(vectors)
    shifted = field_image(vectors + np.array([3.0, 4.0, 0.0]))
    tre = target_registration_error(field, shifted)
    for key in ("mean", "median", "p95", "max"):
        assert tre[key] == pytest.approx(5.0)


def test_tre_resamples_true_field_on_another_grid_and_masks():
    field = constant_field([0.0, 0.0, 0.0], shape=(6, 7, 8), origin=(0.0, 0.0, 0.0))
    # the true field is constant (1, 2, 2) mm (norm 3) on a coarser grid that covers the same
    # physical extent: field spans x in [0, 7*1.5], y in [0, 6], z in [0, 10]
    coarse = constant_field([1.0, 2.0, 2.0], shape=(6, 4, 6), spacing=(3.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    tre = target_registration_error(field, coarse)
    assert tre["max"] == pytest.approx(3.0) and tre["mean"] == pytest.approx(3.0)
    mask = np.zeros((6, 7, 8), bool)
    mask[1:3, 1:3, 1:3] = True
    assert target_registration_error(field, coarse, mask=mask)["voxels"] == 8


def test_tre_errors():
    field = constant_field([0.0, 0.0, 0.0])
    scalar = sitk.Image(8, 7, 6, sitk.sitkFloat32)
    with pytest.raises(InputError, match="not a displacement field"):
        target_registration_error(field, scalar)
    with pytest.raises(InputError, match="estimated field is 3D but the true field is 2D"):
        target_registration_error(field, constant_field([0.0, 0.0], shape=(7, 8)))
    with pytest.raises(InputError, match="mask is empty"):
        target_registration_error(field, field, mask=np.zeros((6, 7, 8)))
    with pytest.raises(InputError, match=r"mask has shape \(6, 7\)"):
        target_registration_error(field, field, mask=np.ones((6, 7)))
    bad = constant_field([np.nan, 0.0, 0.0])
    with pytest.raises(InputError, match="NaN"):
        target_registration_error(bad, field)


def linear_field(matrix: np.ndarray, shape, spacing, direction, origin) -> sitk.Image:
    """d(x) = M (x - origin) in LPS mm on the given grid."""
    reference = sitk.Image([int(n) for n in shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(spacing)
    reference.SetDirection(direction)
    reference.SetOrigin(origin)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)[..., ::-1]
    rs = np.asarray(direction, float).reshape(3, 3) @ np.diag(spacing)
    points = index @ rs.T  # x - origin
    return field_image(points @ matrix.T, spacing=spacing, direction=direction, origin=origin)


def test_jacobian_of_linear_field_with_oblique_anisotropic_grid():
    # x -> x + M x has det J = det(I + M) everywhere (central differences are exact for linear
    # fields).  With M non-diagonal, a filter that ignored the direction would get it wrong.
    matrix = np.array([[0.1, 0.3, 0.0], [0.0, -0.2, 0.0], [0.2, 0.0, 0.05]])
    field = linear_field(matrix, (5, 6, 7), SPACING, OBLIQUE, (10.0, -3.0, 2.0))
    det = field_jacobian_determinant(field)
    assert det.shape == (5, 6, 7)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + matrix), rtol=1e-10)
    assert folding_percent(field) == 0.0
    folded = linear_field(np.diag([-2.0, 0.0, 0.0]), (5, 6, 7), SPACING, OBLIQUE, (0.0, 0.0, 0.0))
    assert folding_percent(folded) == 100.0


# --------------------------------------------------------------------------- summary + tables


def test_evaluate_registration_and_table(tmp_path):
    a = cube(start=(3, 3, 3))
    b = cube(start=(3, 3, 5))
    field = constant_field([0.0, 0.0, 0.0], shape=(12, 12, 12))
    truth = constant_field([0.0, 0.0, 3.0], shape=(12, 12, 12))
    metrics = evaluate_registration(as_image(a), as_image(b), field=field, true_field=truth, label_names={1: "cube"})
    assert metrics["dice"] == {1: pytest.approx(0.5)}
    assert metrics["hd95"] == {1: pytest.approx(3.0)}
    assert metrics["assd_mean"] == pytest.approx((32 * 1.5 + 12 * 1.5 + 4 * 1.0) / 56)
    assert metrics["folding_percent"] == 0.0
    assert metrics["tre"]["mean"] == pytest.approx(3.0)
    rows = [{"case": "cubes", "method": "none", **metrics}, {"case": "cubes", "method": "x", "dice_mean": math.nan}]
    flat = evaluation_table(rows, csv_path=tmp_path / "r.csv", json_path=tmp_path / "r.json")
    assert flat[0]["dice_cube"] == pytest.approx(0.5) and flat[0]["tre_mean"] == pytest.approx(3.0)
    with open(tmp_path / "r.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert table[0]["method"] == "none" and float(table[0]["hd95_cube"]) == pytest.approx(3.0)
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded[1]["dice_mean"] is None  # NaN -> null
    assert loaded[0]["dice"] == {"1": 0.5}
