"""scripts/prepare_cases.py: the known-answer construction and its determinism."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
try:
    import cnnreg  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "CNNRegistration"))

from cnnreg.evaluate import dice_per_label, target_registration_error  # noqa: E402


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_cases", ROOT / "scripts" / "prepare_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_cases = _load_script()


def _nilearn_data_available() -> bool:
    try:
        from nilearn.datasets import struct
    except ImportError:
        return False
    return all(
        Path(p).exists() for p in (struct.MNI152_FILE_PATH, struct.GM_MNI152_FILE_PATH, struct.WM_MNI152_FILE_PATH)
    )


needs_nilearn = pytest.mark.skipif(
    not _nilearn_data_available(), reason="nilearn and its MNI152 files are not installed"
)


def oblique_reference(size=(20, 18, 16)) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing((1.5, 1.0, 2.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    angle = np.deg2rad(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(rotation.ravel().tolist())
    return image


def test_smooth_random_field_is_scaled_and_seeded():
    reference = oblique_reference()
    field = prepare_cases.smooth_random_field(reference, 3.0, 4.0, np.random.default_rng(0))
    vectors = sitk.GetArrayFromImage(field)
    assert vectors.shape == (16, 18, 20, 3)
    assert np.sqrt((vectors**2).sum(-1)).max() == pytest.approx(3.0)
    again = prepare_cases.smooth_random_field(reference, 3.0, 4.0, np.random.default_rng(0))
    assert np.array_equal(sitk.GetArrayFromImage(again), vectors)
    coarse = prepare_cases.smooth_random_field(reference, 3.0, 4.0, np.random.default_rng(0), step=4)
    # a coarse grid that still covers the whole extent: ceil((n - 1) / 4) + 1 nodes per axis
    assert coarse.GetSize() == (6, 6, 5)
    assert coarse.GetSpacing() == (6.0, 4.0, 8.0)


def test_inverse_field_undoes_the_field_through_itk_resampling():
    # The numpy inversion works in index space; ITK resamples in physical space with the
    # direction and spacing: composing them on an oblique, anisotropic grid checks both agree.
    reference = oblique_reference()
    field = prepare_cases.smooth_random_field(reference, 2.5, 5.0, np.random.default_rng(3))
    inverse, stats = prepare_cases.invert_field(field)
    assert stats["max_residual_mm"] < 1e-4
    points = sitk.PhysicalPointSource(
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )
    roundtrip = prepare_cases.warp(
        prepare_cases.warp(points, inverse, replicate_edges=False), field, replicate_edges=False
    )
    error = np.sqrt(((sitk.GetArrayFromImage(roundtrip) - sitk.GetArrayFromImage(points)) ** 2).sum(-1))
    inner = error[3:-3, 3:-3, 3:-3]  # away from the border, where points leave the grid
    # mm: what is left is linear interpolation of a field that varies on a 5 mm scale
    assert inner.mean() < 0.05 and inner.max() < 0.15
    # and the wrong direction is far off
    wrong = prepare_cases.warp(prepare_cases.warp(points, field, replicate_edges=False), field, replicate_edges=False)
    wrong_error = np.sqrt(((sitk.GetArrayFromImage(wrong) - sitk.GetArrayFromImage(points)) ** 2).sum(-1))[
        3:-3, 3:-3, 3:-3
    ]
    assert wrong_error.mean() > 10 * inner.mean()


def test_crop_around_pads_and_keeps_geometry():
    image = oblique_reference((10, 10, 10))
    crop = prepare_cases.crop_around(image, (4.5, 4.5, 4.5), (16, 8, 12))
    assert crop.GetSize() == (16, 8, 12)
    # the voxel at the crop centre is the same physical point as the source centre
    centre_crop = crop.TransformContinuousIndexToPhysicalPoint((7.5, 3.5, 5.5))
    centre_image = image.TransformContinuousIndexToPhysicalPoint((4.5, 4.5, 4.5))
    np.testing.assert_allclose(centre_crop, centre_image, atol=1e-9)


def _arrays(paths: dict) -> dict:
    return {
        role: sitk.GetArrayFromImage(sitk.ReadImage(path)) for role, path in paths.items() if path.endswith(".nii.gz")
    }


@needs_nilearn
def test_2d_case_is_deterministic_and_its_true_field_is_right(tmp_path):
    first = prepare_cases.prepare_case("2d", tmp_path / "a", seed=0)
    second = prepare_cases.prepare_case("2d", tmp_path / "b", seed=0)
    other = prepare_cases.prepare_case("2d", tmp_path / "c", seed=1)
    a, b, c = _arrays(first), _arrays(second), _arrays(other)
    assert set(a) == {"fixed", "moving", "fixed_labels", "moving_labels", "true_displacement"}
    for role in a:
        assert a[role].dtype == b[role].dtype and a[role].tobytes() == b[role].tobytes(), role
    assert np.array_equal(a["fixed"], c["fixed"])
    assert not np.array_equal(a["moving"], c["moving"])

    record = json.loads(Path(first["case"]).read_text())
    assert record["label_names"] == {"1": "GM", "2": "WM"}
    checks = record["checks"]
    assert checks["true_field_max_mm"] == pytest.approx(4.0)
    assert checks["coordinates_warped_by_inverse_then_true_field_error_mm"]["max"] < 0.1
    # the stored field (pull, fixed grid) maps the moving labels back onto the fixed labels
    fixed_labels = sitk.ReadImage(first["fixed_labels"])
    moving_labels = sitk.ReadImage(first["moving_labels"])
    field = sitk.ReadImage(first["true_displacement"], sitk.sitkVectorFloat64)
    # (DisplacementFieldTransform takes over the image it is given: hand it a copy)
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    back = sitk.Resample(moving_labels, fixed_labels, transform, sitk.sitkNearestNeighbor, 0)
    before = dice_per_label(fixed_labels, moving_labels)
    after = dice_per_label(fixed_labels, back)
    assert min(after.values()) > 0.98 > max(before.values())
    assert target_registration_error(sitk.ReadImage(first["true_displacement"]), field)["max"] == 0.0


def test_bundled_sample_data():
    folder = ROOT / "Resources" / "SampleData"
    if not (folder / "case.json").exists():
        pytest.skip("Resources/SampleData has not been generated")
    files = ["fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz", "true_displacement.nii.gz"]
    assert sum((folder / f).stat().st_size for f in files) <= 1.5 * 2**20
    fixed = sitk.ReadImage(str(folder / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(folder / "moving.nii.gz"))
    labels = sitk.ReadImage(str(folder / "moving_labels.nii.gz"))
    assert fixed.GetSize() == moving.GetSize() == labels.GetSize()
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == {0, 1, 2}
    record = json.loads((folder / "case.json").read_text())
    before = dice_per_label(sitk.ReadImage(str(folder / "fixed_labels.nii.gz")), labels)
    assert before == pytest.approx({int(k): v for k, v in record["checks"]["dice_before"].items()})


@needs_nilearn
@pytest.mark.skipif(not (prepare_cases.MRICRON / "aal.nii.gz").is_file(), reason="Debian mricron-data not installed")
def test_phantom_case_is_piecewise_constant_with_consistent_labels(tmp_path):
    from scipy import ndimage

    paths = prepare_cases.prepare_case("phantom_mni", tmp_path, seed=0)
    moving = sitk.GetArrayFromImage(sitk.ReadImage(paths["moving"]))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(paths["moving_labels"]))
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(paths["fixed_labels"]))
    assert set(np.unique(labels)) == {0, 1, 2} and set(np.unique(fixed_labels)) == {0, 1, 2}
    # deep inside the white matter the blurred phantom is the class constant
    deep_wm = ndimage.binary_erosion(labels == 2, iterations=3)
    assert deep_wm.sum() > 1000
    np.testing.assert_allclose(moving[deep_wm], prepare_cases.PHANTOM_INTENSITIES[2], atol=1e-4)
    # grey-matter regions lie within +-5 % of the grey-matter constant
    deep_gm = ndimage.binary_erosion(labels == 1, iterations=1)
    gm = prepare_cases.PHANTOM_INTENSITIES[1]
    assert np.all(np.abs(moving[deep_gm] - gm) <= 0.05 * gm + 0.02)
    # a real pair: Colin27's classes overlap MNI152's only partly before registration
    dice = dice_per_label(fixed_labels, labels)
    assert 0.5 < dice[1] < 0.8 and 0.6 < dice[2] < 0.85
    assert "true_displacement" not in paths
