"""cnnreg.registration with the instance and phantom algorithms end to end.

1. The coordinate convention, proved on an anisotropic, oblique, non-zero-origin image with a
   known translation: our torch warp, SimpleITK ``Resample`` through the exported field and the
   registration itself all agree (design.md, "The coordinate convention").
2. Behaviour on a real pair (MNI152 2 mm, a crop, warped by a known smooth random field):
   Dice up, loss down, no folding, for the phantom and instance modes; 2D; seeds; bad settings.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cnnreg import image as im
from cnnreg.errors import CancelledError, InputError
from cnnreg.grid import same_grid
from cnnreg.registration import check_output_folder, register, write_result
from cnnreg.settings import (
    CNN_LEARNING_RATE,
    OUTPUT_FILES,
    REGISTRATION_SUMMARY,
    OptimizationSettings,
    RegistrationSettings,
)
from cnnreg.spatial import lps_to_voxel, voxel_to_lps, warp

SUMMARY_KEYS = set(REGISTRATION_SUMMARY)  # the one definition (cnnreg.settings)


# ======================================================================================
# 1. the coordinate convention on an oblique, anisotropic, off-origin grid
# ======================================================================================

SPACING_3D = (1.2, 0.8, 2.0)  # (s_i, s_j, s_k) mm
ORIGIN_3D = (-20.5, 13.25, 7.75)
ARRAY_SHAPE_3D = (18, 40, 28)  # (k, j, i): 36 x 32 x 33.6 mm
SPACING_2D = (0.7, 1.3)
ORIGIN_2D = (4.5, -9.0)
ARRAY_SHAPE_2D = (30, 36)


def _grid(synth, ndim):
    """(array shape, spacing, origin, direction matrix) of the oblique test grid."""
    if ndim == 3:
        return ARRAY_SHAPE_3D, SPACING_3D, ORIGIN_3D, synth.rotation_matrix((1.0, 2.0, 3.0), 30.0)
    angle = np.deg2rad(25.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return ARRAY_SHAPE_2D, SPACING_2D, ORIGIN_2D, rotation


def _points(shape, spacing, origin, direction):
    """World (LPS) coordinates of every voxel, ``(*shape, ndim)`` with components (x, y[, z]),
    written out here without cnnreg: p = origin + R diag(spacing) (i, j[, k])."""
    index_kji = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    index_ijk = index_kji[..., ::-1]
    return index_ijk @ (np.asarray(direction) @ np.diag(spacing)).T + np.asarray(origin)


def _blob_function(shape, spacing, origin, direction, synth):
    """Smooth content defined in world coordinates: f(p) = sum of Gaussians (widths 3.5-5 mm)
    centred well inside the field of view."""
    points = _points(shape, spacing, origin, direction)
    centre = points.reshape(-1, points.shape[-1]).mean(axis=0)
    rng = np.random.default_rng(11)
    ndim = len(shape)
    centres = [centre + rng.uniform(-8, 8, ndim) for _ in range(5)]
    widths = rng.uniform(3.5, 5.0, 5)
    amplitudes = rng.uniform(0.5, 1.0, 5)
    return lambda p: synth.gaussian_blobs(p, centres, widths, amplitudes)


def _translated_pair(synth, ndim, d_lps):
    """Fixed image f(p) and moving image f(p - d) on the same oblique grid, so that the true
    pull field on the fixed grid is the constant d: moving(x + d) = f(x) = fixed(x)."""
    shape, spacing, origin, direction = _grid(synth, ndim)
    f = _blob_function(shape, spacing, origin, direction, synth)
    points = _points(shape, spacing, origin, direction)
    geometry = dict(spacing=spacing, origin=origin, direction=direction)
    fixed = synth.make_image(f(points).astype(np.float32), **geometry)
    moving = synth.make_image(f(points - np.asarray(d_lps)).astype(np.float32), **geometry)
    return fixed, moving


def _constant_itk_field(reference, d_lps):
    """An ITK displacement field equal to ``d_lps`` everywhere, built without cnnreg."""
    shape = sitk.GetArrayViewFromImage(reference).shape
    array = np.broadcast_to(np.asarray(d_lps, dtype=np.float64), (*shape, len(d_lps))).copy()
    field = sitk.GetImageFromArray(array, isVector=True)
    field.CopyInformation(reference)
    return field


def _resample_with_field(moving, reference, field, interpolator=sitk.sitkLinear):
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.GetArrayFromImage(sitk.Resample(moving, reference, transform, interpolator, 0.0, sitk.sitkFloat32))


def _inside(shape, u_voxels, margin=1.0):
    """Voxels x whose sample point x + u stays ``margin`` voxels inside the grid (padding differs
    between torch's border mode and ITK's default value outside)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    target = index + u_voxels
    ok = np.ones(shape, dtype=bool)
    for axis, n in enumerate(shape):
        ok &= (target[axis] >= margin) & (target[axis] <= n - 1 - margin)
    return ok


D_LPS = {3: np.array([1.5, -1.1, 2.3]), 2: np.array([-1.2, 1.7])}


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_constructed_pair_has_the_known_pull_field(synth, ndim):
    # Independent of cnnreg: SimpleITK resampling of the moving image through the translation
    # T(p) = p + d (fixed point -> moving point) gives back the fixed image.
    d = D_LPS[ndim]
    fixed, moving = _translated_pair(synth, ndim, d)
    back = sitk.GetArrayFromImage(
        sitk.Resample(moving, fixed, sitk.TranslationTransform(ndim, tuple(d)), sitk.sitkLinear, 0.0)
    )
    u = lps_to_voxel(
        np.broadcast_to(d, (*sitk.GetArrayViewFromImage(fixed).shape, ndim)), fixed.GetSpacing(), fixed.GetDirection()
    )
    inside = _inside(back.shape, u)
    f = sitk.GetArrayFromImage(fixed)
    error = np.abs(back - f)[inside].max()
    assert error < 0.05 * f.max()  # linear-interpolation error on smooth blobs
    # the opposite translation is clearly wrong (the test can tell the sign)
    wrong = sitk.GetArrayFromImage(
        sitk.Resample(moving, fixed, sitk.TranslationTransform(ndim, tuple(-d)), sitk.sitkLinear, 0.0)
    )
    assert np.abs(wrong - f)[inside].max() > 3 * error


@pytest.mark.parametrize("ndim", [2, 3])
def test_torch_warp_matches_simpleitk_resample_with_the_field(synth, ndim):
    d = D_LPS[ndim]
    fixed, moving = _translated_pair(synth, ndim, d)
    shape = sitk.GetArrayViewFromImage(fixed).shape
    # (a) d (mm, LPS) -> voxels (k, j, i), torch warp of the moving image
    u = lps_to_voxel(np.broadcast_to(d, (*shape, ndim)), fixed.GetSpacing(), fixed.GetDirection())
    assert u.shape == (ndim, *shape)
    moving_t = torch.from_numpy(sitk.GetArrayFromImage(moving))[None, None]
    ours = warp(moving_t, torch.from_numpy(u).float()[None])[0, 0].numpy()
    itk = _resample_with_field(moving, fixed, _constant_itk_field(fixed, d))
    inside = _inside(shape, u)
    assert inside.mean() > 0.6
    assert np.abs(ours - itk)[inside].max() < 1e-4
    # both agree with the analytic fixed image up to interpolation error
    assert np.abs(ours - sitk.GetArrayFromImage(fixed))[inside].max() < 0.05


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_image_of_the_voxel_field_is_the_constant_mm_vector(synth, ndim):
    d = D_LPS[ndim]
    fixed, _ = _translated_pair(synth, ndim, d)
    shape = sitk.GetArrayViewFromImage(fixed).shape
    u = lps_to_voxel(np.broadcast_to(d, (*shape, ndim)), fixed.GetSpacing(), fixed.GetDirection())
    # (b) voxels -> ITK field: d everywhere, on the fixed grid
    field = im.displacement_image(u, fixed)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert field.GetOrigin() == fixed.GetOrigin() and field.GetSpacing() == fixed.GetSpacing()
    assert field.GetDirection() == fixed.GetDirection()
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), np.broadcast_to(d, (*shape, ndim)), atol=1e-9)


def test_a_translation_given_in_voxels(synth):
    fixed, _ = _translated_pair(synth, 3, D_LPS[3])
    shape = sitk.GetArrayViewFromImage(fixed).shape
    u_kji = np.array([0.6, -1.4, 1.1])  # voxels along (k, j, i)
    # the same vector in mm, from SimpleITK's own index -> point mapping
    start = np.array(fixed.TransformContinuousIndexToPhysicalPoint((3.0, 5.0, 2.0)))
    end = np.array(fixed.TransformContinuousIndexToPhysicalPoint(tuple(np.array([3.0, 5.0, 2.0]) + u_kji[::-1])))
    d = end - start
    u = np.broadcast_to(u_kji.reshape(3, 1, 1, 1), (3, *shape)).copy()
    np.testing.assert_allclose(voxel_to_lps(u, fixed.GetSpacing(), fixed.GetDirection())[2, 3, 4], d, atol=1e-12)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(im.displacement_image(u, fixed)), np.broadcast_to(d, (*shape, 3)), atol=1e-9
    )
    # warping with u == SimpleITK resampling with d, and both recover the fixed image
    _, moving = _translated_pair(synth, 3, d)
    ours = warp(torch.from_numpy(sitk.GetArrayFromImage(moving))[None, None], torch.from_numpy(u).float()[None])[
        0, 0
    ].numpy()
    itk = _resample_with_field(moving, fixed, _constant_itk_field(fixed, d))
    inside = _inside(shape, u)
    assert np.abs(ours - itk)[inside].max() < 1e-4
    assert np.abs(ours - sitk.GetArrayFromImage(fixed))[inside].max() < 0.05


@pytest.fixture(scope="module")
def translation_registration(synth, tmp_path_factory):
    """(c) instance-mode registration of the oblique translated pair, written to disk."""
    d = D_LPS[3]
    fixed, moving = _translated_pair(synth, 3, d)
    settings = RegistrationSettings(
        mode="instance",
        device="cpu",
        seed=0,
        # 100 iterations at full resolution: the 2-voxel control grid of the defaults moves a
        # constant shift more slowly than a coarser one (40 left 0.39 voxel, 100 leave 0.09)
        optimization=OptimizationSettings(similarity="mse", levels=2, iterations=(60, 100), window=5),
    )
    result = register(fixed, moving, settings)
    out = tmp_path_factory.mktemp("translation")
    paths = write_result(result, out)
    return dict(d=d, fixed=fixed, moving=moving, result=result, paths=paths, out=out)


def test_registration_recovers_the_translation(translation_registration):
    case = translation_registration
    fixed, d = case["fixed"], case["d"]
    field = sitk.GetArrayFromImage(case["result"].displacement)  # (*shape, 3) LPS mm
    f = sitk.GetArrayFromImage(fixed)
    shape = f.shape
    u_true = lps_to_voxel(np.broadcast_to(d, (*shape, 3)), fixed.GetSpacing(), fixed.GetDirection())
    # inside the object: bright voxels, away from the border where the moving image has no data
    inside = (f > 0.3 * f.max()) & _inside(shape, u_true, margin=2.0)
    assert inside.sum() > 500
    mean_mm = field[inside].mean(axis=0)
    mean_voxels = lps_to_voxel(mean_mm.reshape(1, 3), fixed.GetSpacing(), fixed.GetDirection())[:, 0]
    true_voxels = u_true[:, 0, 0, 0]
    assert np.abs(mean_voxels - true_voxels).max() < 0.2, (mean_voxels, true_voxels)
    # and the internal voxel field is the same thing (units converted once at the boundary)
    u = case["result"].u[0].numpy()
    np.testing.assert_allclose(u[:, inside].mean(axis=1), mean_voxels, atol=1e-6)


def test_written_warped_image_is_simpleitk_resampling_with_the_written_field(translation_registration):
    case = translation_registration
    paths = case["paths"]
    field = sitk.ReadImage(paths["displacement"])
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert same_grid(field, case["fixed"])
    warped_file = sitk.GetArrayFromImage(sitk.ReadImage(paths["warped"]))
    # the default interpolation is the cubic B-spline: SimpleITK's order-3 B-spline resampling
    assert case["result"].summary["interpolation"] == "cubic"
    again = _resample_with_field(case["moving"], case["fixed"], field, sitk.sitkBSpline)
    np.testing.assert_allclose(warped_file, again, atol=1e-5)
    # and the registration made the moving image look like the fixed one
    f = sitk.GetArrayFromImage(case["fixed"])
    m = sitk.GetArrayFromImage(case["moving"])
    assert np.abs(warped_file - f).mean() < 0.5 * np.abs(m - f).mean()


def test_write_result_files_and_summary(translation_registration):
    case = translation_registration
    paths = case["paths"]
    # no labels given: every file but warped_labels
    assert set(paths) == set(OUTPUT_FILES) - {"warped_labels"}
    for key, path in paths.items():
        assert path == str(case["out"] / OUTPUT_FILES[key])
    with open(paths["summary"], encoding="utf-8") as handle:
        summary = json.load(handle)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["mode"] == "instance" and summary["similarity"] == "mse"
    assert summary["files"] == {k: OUTPUT_FILES[k] for k in paths}
    assert summary["fixed_size"] == [28, 40, 18]
    assert summary["fixed_spacing"] == pytest.approx(list(SPACING_3D))
    assert summary["similarity_after"] < summary["similarity_before"]  # MSE: lower is better
    assert summary["folding_fraction"] == 0.0
    jacobian = sitk.ReadImage(paths["jacobian"])
    assert same_grid(jacobian, case["fixed"])
    # a translation: det J ~ 1 everywhere
    assert abs(float(np.median(sitk.GetArrayFromImage(jacobian))) - 1.0) < 0.05
    with open(paths["qc"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_affine_prealignment_is_part_of_the_exported_field(synth):
    # iterations 0: u = 0, so the exported field is exactly the affine pre-alignment, which
    # should find the translation d (within 1 mm) on this smooth pair
    d = np.array([3.0, -2.0, 2.5])
    fixed, moving = _translated_pair(synth, 3, d)
    settings = RegistrationSettings(
        mode="instance", device="cpu", affine=True, optimization=OptimizationSettings(iterations=0, levels=1)
    )
    result = register(fixed, moving, settings)
    field = sitk.GetArrayFromImage(result.displacement)
    f = sitk.GetArrayFromImage(fixed)
    inside = f > 0.3 * f.max()
    np.testing.assert_allclose(field[inside].mean(axis=0), d, atol=1.0)
    assert np.all(result.u.numpy() == 0)


# ======================================================================================
# 2. a real pair: MNI152 2 mm crop, warped by a known smooth random displacement
# ======================================================================================

CROP = 40  # voxels per axis (80 mm), centred on the brain: small enough for 2 CPU threads


def _smooth_random_field(shape, seed, max_voxels=3.0):
    """Coarse Gaussian noise (5 nodes per axis) upsampled (cubic) and smoothed; scaled so the
    largest component is ``max_voxels``: ``(ndim, *shape)``, voxels."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    ndim = len(shape)
    coarse = rng.normal(size=(ndim, *([5] * ndim)))
    field = np.stack([ndimage.gaussian_filter(ndimage.zoom(c, np.array(shape) / 5, order=3), 2.0) for c in coarse])
    return field * (max_voxels / np.abs(field).max())


def _deform(array, field, order):
    """array(x + field(x)) by scipy (independent of cnnreg); order 1 images, 0 labels."""
    from scipy import ndimage

    index = np.indices(array.shape).astype(np.float64)
    return ndimage.map_coordinates(array, index + field, order=order, mode="nearest").astype(array.dtype)


def dice(a: np.ndarray, b: np.ndarray, labels=(1, 2)) -> list[float]:
    return [2.0 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in labels]


@pytest.fixture(scope="session")
def mni():
    """MNI152 2 mm template and GM/WM labels (1 = GM, 2 = WM, WM wins where the masks overlap)
    in SimpleITK array order (k, j, i)."""
    datasets = pytest.importorskip("nilearn.datasets")
    template = datasets.load_mni152_template(resolution=2).get_fdata()
    gm = datasets.load_mni152_gm_mask(resolution=2).get_fdata()
    wm = datasets.load_mni152_wm_mask(resolution=2).get_fdata()
    labels = np.zeros(template.shape, np.uint8)
    labels[gm > 0.5] = 1
    labels[wm > 0.5] = 2

    def kji(a):
        return np.ascontiguousarray(np.transpose(a, (2, 1, 0)))

    return kji(template.astype(np.float32)), kji(labels)


@pytest.fixture(scope="session")
def mni_pair(mni):
    template, labels = mni
    centre = (40, 58, 49)  # (k, j, i) voxel near the middle of the brain
    crop = tuple(slice(c - CROP // 2, c + CROP // 2) for c in centre)
    fixed_array, fixed_labels = template[crop], labels[crop]
    field = _smooth_random_field(fixed_array.shape, seed=0)
    moving_array = _deform(fixed_array, field, order=1)
    moving_labels = _deform(fixed_labels, field, order=0)

    def image(a):
        return sitk.GetImageFromArray(a) if a.ndim == 2 else _with_spacing(sitk.GetImageFromArray(a))

    return dict(
        fixed=image(fixed_array),
        moving=image(moving_array),
        moving_labels=image(moving_labels),
        fixed_labels=fixed_labels,
        before=dice(fixed_labels, moving_labels),
        field=field,
    )


def _with_spacing(image, spacing=2.0):
    image.SetSpacing([spacing] * image.GetDimension())
    return image


def _run(pair, mode, **optimization):
    settings = RegistrationSettings(mode=mode, device="cpu", seed=0, optimization=OptimizationSettings(**optimization))
    events = []
    result = register(
        pair["fixed"], pair["moving"], settings, moving_labels=pair["moving_labels"], callback=events.append
    )
    after = dice(pair["fixed_labels"], sitk.GetArrayFromImage(result.warped_labels))
    return dict(result=result, after=after, events=events)


@pytest.fixture(scope="module")
def phantom_run(mni_pair):
    # a slim U-Net on a 32^3 working grid (pyramid 16^3, 32^3) keeps this to seconds on 2 threads
    return _run(mni_pair, "phantom", iterations=(80, 60, 40), max_cnn_voxels=32**3)


@pytest.fixture(scope="module")
def instance_run(mni_pair):
    """The instance defaults (cubic B-spline sampling) with a short schedule."""
    return _run(mni_pair, "instance", iterations=(40, 30, 20))


@pytest.fixture(scope="module")
def linear_run(mni_pair):
    return _run(mni_pair, "instance", iterations=(40, 30, 20), interpolation="linear")


def _inverse_residual(u: np.ndarray, field: np.ndarray) -> np.ndarray:
    """``|u(x) + field(x + u(x))|`` voxels: zero where ``u`` exactly undoes the pair's warp
    (moving(y) = fixed(y + field(y)), and the registration pulls moving(x + u(x)) = fixed(x))."""
    from scipy import ndimage

    points = np.indices(u.shape[1:]).astype(np.float64) + u
    back = np.stack([ndimage.map_coordinates(component, points, order=1, mode="nearest") for component in field])
    return np.linalg.norm(u + back, axis=0)


def test_cubic_interpolation_lands_closer_to_the_known_field(mni_pair, linear_run, instance_run):
    # linear interpolation blurs least at whole-voxel shifts, which biases the optimum of a
    # blurred (resampled) moving image; the cubic B-spline hardly does (0.33 -> 0.25 voxel here)
    brain = mni_pair["fixed_labels"] > 0
    linear, cubic = (
        float(_inverse_residual(run["result"].u[0].numpy(), mni_pair["field"])[brain].mean())
        for run in (linear_run, instance_run)
    )
    assert cubic < 0.85 * linear, (linear, cubic)
    assert np.mean(instance_run["after"]) > np.mean(linear_run["after"]), (linear_run["after"], instance_run["after"])
    assert linear_run["result"].summary["interpolation"] == "linear"
    assert instance_run["result"].summary["interpolation"] == "cubic"  # the default
    # warped.nii.gz is SimpleITK's cubic B-spline resampling of the moving image with the field
    transform = sitk.DisplacementFieldTransform(sitk.Cast(instance_run["result"].displacement, sitk.sitkVectorFloat64))
    again = sitk.Resample(mni_pair["moving"], mni_pair["fixed"], transform, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(instance_run["result"].warped), sitk.GetArrayFromImage(again), atol=1e-5
    )


def test_the_real_pair_starts_misaligned(mni_pair):
    # the synthetic deformation (max 3 voxels) costs a visible amount of overlap
    gm, wm = mni_pair["before"]
    assert 0.75 < gm < 0.93 and 0.85 < wm < 0.97
    assert np.abs(mni_pair["field"]).max() == pytest.approx(3.0)


@pytest.mark.parametrize("run_name, margin", [("phantom_run", 0.015), ("instance_run", 0.035)])
def test_registration_of_the_real_pair(request, mni_pair, run_name, margin):
    run = request.getfixturevalue(run_name)
    summary = run["result"].summary
    before, after = np.mean(mni_pair["before"]), np.mean(run["after"])
    assert after > before + margin, (mni_pair["before"], run["after"])
    assert all(a > b for a, b in zip(run["after"], mni_pair["before"]))  # GM and WM each
    # LNCC: higher is better
    assert summary["similarity_after"] > summary["similarity_before"] + 0.03
    assert summary["folding_percent"] < 1.0
    assert summary["min_jacobian"] > 0.0
    assert summary["warnings"] == []
    assert SUMMARY_KEYS <= set(summary)


@pytest.mark.parametrize("run_name", ["phantom_run", "instance_run"])
def test_progress_events(request, run_name):
    events = request.getfixturevalue(run_name)["events"]
    assert events, "no progress reported"
    for event in events:
        assert event["event"] == "progress"
        assert {"stage", "iteration", "iterations", "fraction", "loss", "similarity_loss", "regularization"} <= set(
            event
        )
        assert math.isfinite(event["loss"])
    fractions = [e["fraction"] for e in events]
    assert all(a < b for a, b in zip(fractions, fractions[1:]))
    assert 0 < fractions[0] and fractions[-1] <= 1.0
    assert events[0]["stage"].startswith("level 1/")
    # the loss goes down within the first level, and the last level is reached
    first_level = [e["loss"] for e in events if e["stage"] == events[0]["stage"]]
    assert first_level[-1] < first_level[0]
    levels = events[0]["stage"].split("/")[-1]
    assert events[-1]["stage"] == f"level {levels}/{levels}"


def test_registration_2d_slice(mni):
    template, labels = mni
    k = 40
    crop = (k, slice(26, 90), slice(17, 81))  # an axial 64 x 64 slice
    fixed_array, fixed_labels = template[crop], labels[crop]
    field = _smooth_random_field(fixed_array.shape, seed=1)
    pair = dict(
        fixed=_with_spacing(sitk.GetImageFromArray(fixed_array)),
        moving=_with_spacing(sitk.GetImageFromArray(_deform(fixed_array, field, 1))),
        moving_labels=_with_spacing(sitk.GetImageFromArray(_deform(fixed_labels, field, 0))),
        fixed_labels=fixed_labels,
    )
    before = dice(fixed_labels, sitk.GetArrayFromImage(pair["moving_labels"]))
    for mode, options in (("instance", {}), ("phantom", {"features": 8})):
        run = _run(pair, mode, iterations=(40, 30), **options)
        result = run["result"]
        assert result.u.shape == (1, 2, 64, 64)
        assert result.displacement.GetDimension() == 2 and result.displacement.GetNumberOfComponentsPerPixel() == 2
        assert np.mean(run["after"]) > np.mean(before) + 0.02, (mode, before, run["after"])
        assert result.summary["similarity_after"] > result.summary["similarity_before"]
        assert result.summary["folding_percent"] < 1.0


def test_single_slice_3d_is_registered_as_2d(synth):
    fixed_array = synth.blob_array((40, 44), seed=3)
    moving_array = np.roll(fixed_array, 2, axis=1)
    fixed = synth.make_image(fixed_array[None], spacing=(1.0, 1.0, 3.0))
    moving = synth.make_image(moving_array[None], spacing=(1.0, 1.0, 3.0))
    settings = RegistrationSettings(
        mode="instance", device="cpu", optimization=OptimizationSettings(similarity="mse", iterations=(30, 30))
    )
    result = register(fixed, moving, settings)
    assert result.u.shape == (1, 2, 40, 44)  # working axes (j, i)
    field = sitk.GetArrayFromImage(result.displacement)
    assert field.shape == (1, 40, 44, 3)
    np.testing.assert_array_equal(field[..., 2], 0.0)  # identity direction: z is the collapsed k axis
    # moving(x) = fixed(x - 2 i): the pull field is +2 voxels (= +2 mm) along i inside the object
    inside = fixed_array > 0.3 * fixed_array.max()
    assert abs(field[0][inside][:, 0].mean() - 2.0) < 0.3
    assert sitk.GetArrayFromImage(result.warped).shape == (1, 40, 44)
    assert sitk.GetArrayFromImage(result.jacobian).shape == (1, 40, 44)


# --------------------------------------------------------------------------------------
# seeds, callbacks, settings
# --------------------------------------------------------------------------------------


def _small_pair(synth, shape=(32, 36)):
    fixed_array = synth.blob_array(shape, seed=4)
    return synth.make_image(fixed_array), synth.make_image(np.roll(fixed_array, 1, axis=0))


def test_same_seed_same_output_different_seed_different_output(synth):
    fixed, moving = _small_pair(synth)

    def run(seed):
        settings = RegistrationSettings(
            mode="phantom", device="cpu", seed=seed, optimization=OptimizationSettings(iterations=(8, 6), features=4)
        )
        return register(fixed, moving, settings)

    first, second, other = run(3), run(3), run(4)
    assert torch.equal(first.u, second.u)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(first.warped), sitk.GetArrayFromImage(second.warped))
    assert not torch.equal(first.u, other.u)


def test_callback_can_cancel(synth):
    fixed, moving = _small_pair(synth)
    seen = []

    def cancel_at_third(event):
        seen.append(event)
        if len(seen) == 3:
            raise CancelledError("stop")

    settings = RegistrationSettings(mode="instance", device="cpu", optimization=OptimizationSettings(iterations=50))
    with pytest.raises(CancelledError):
        register(fixed, moving, settings, callback=cancel_at_third)
    assert len(seen) == 3


def test_fixed_mask_checks(synth):
    fixed, moving = _small_pair(synth)
    settings = RegistrationSettings(
        mode="instance", device="cpu", optimization=OptimizationSettings(iterations=1, levels=1)
    )
    with pytest.raises(InputError, match="fixed mask is not on the fixed image grid"):
        register(fixed, moving, settings, fixed_mask=sitk.Image([10, 10], sitk.sitkUInt8))
    empty = sitk.Image(fixed.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(fixed)
    with pytest.raises(InputError, match="fixed mask is empty"):
        register(fixed, moving, settings, fixed_mask=empty)
    mask = sitk.Cast(fixed > 0.2, sitk.sitkUInt8)
    register(fixed, moving, settings, fixed_mask=mask)  # a valid mask is accepted


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mode": "magic"}, "unknown mode 'magic'"),
        ({"normalization": "zscore"}, "unknown normalization"),
        ({"weight": -1.0}, "weight: must be >= 0"),
        ({"jacobian_weight": -0.1}, "jacobian weight: must be >= 0"),
        ({"iterations": (10, -1)}, "iterations: must be integers >= 0"),
        ({"levels": 0}, "levels: must be >= 1"),
        ({"window": 4}, "window: must be odd"),
        ({"interpolation": "nearest"}, "interpolation 'nearest' cannot sample the moving image"),
        ({"optimizer": "sgd"}, "unknown optimizer 'sgd'"),
    ],
)
def test_bad_settings_are_refused_when_made_and_when_changed(synth, changes, message):
    """Settings are checked on construction, and again by register() after a change."""
    top = {k: v for k, v in changes.items() if k in ("mode", "normalization")}
    optimization = {k: v for k, v in changes.items() if k not in top}
    with pytest.raises(InputError, match=message):
        RegistrationSettings(device="cpu", optimization=OptimizationSettings(**optimization), **top)
    settings = RegistrationSettings(device="cpu", optimization=OptimizationSettings(iterations=1, levels=1))
    target = settings if top else settings.optimization
    for name, value in changes.items():
        setattr(target, name, value)
    fixed, moving = _small_pair(synth)
    with pytest.raises(InputError, match=message):
        register(fixed, moving, settings)


def test_unknown_regularizer_and_similarity_are_refused():
    with pytest.raises(InputError, match="unknown regularizer 'l3'"):
        OptimizationSettings(regularizer="l3")
    with pytest.raises(InputError, match="unknown similarity 'ncc'"):
        OptimizationSettings(similarity="ncc")


def test_register_rejects_bad_images(synth):
    fixed, moving = _small_pair(synth)
    settings = RegistrationSettings(device="cpu", optimization=OptimizationSettings(iterations=1))
    volume = synth.make_image(synth.blob_array((8, 9, 10)))
    with pytest.raises(InputError, match="both must be 2D or both 3D"):
        register(fixed, volume, settings)
    flat = synth.make_image(np.ones((32, 36), np.float32))
    with pytest.raises(InputError, match="constant"):
        register(fixed, flat, settings)
    labels = sitk.Image([5, 5], sitk.sitkUInt8)
    with pytest.raises(InputError, match="not on the moving image grid"):
        register(fixed, moving, settings, moving_labels=labels)
    far = sitk.Image(moving)
    far.SetOrigin((1000.0, 1000.0))
    with pytest.raises(InputError, match="does not overlap"):
        register(fixed, far, settings)


def test_register_rejects_a_one_dimensional_profile(synth):
    profile = np.sin(np.linspace(0, 6, 40)).astype(np.float32).reshape(1, 1, 40)
    fixed, moving = synth.make_image(profile), synth.make_image(np.roll(profile, 2, axis=2))
    settings = RegistrationSettings(mode="instance", device="cpu", optimization=OptimizationSettings(iterations=2))
    with pytest.raises(InputError, match="1"):
        register(fixed, moving, settings)


@pytest.mark.parametrize(
    "options, shape",
    [
        ({"learning_rate": -1.0}, (32, 36)),
        ({"features": 0}, (32, 36)),
        ({"max_cnn_voxels": 1}, (32, 36)),
        ({}, (8, 8)),  # a small image: 3 poolings leave 1 x 1 for batch norm
    ],
    ids=["negative-learning-rate", "zero-features", "tiny-working-grid", "8x8-image"],
)
def test_phantom_mode_bad_numbers_give_input_error(synth, options, shape):
    array = synth.blob_array(shape, seed=4)
    fixed, moving = synth.make_image(array), synth.make_image(np.roll(array, 1, axis=0))
    with pytest.raises(InputError):
        settings = RegistrationSettings(
            mode="phantom", device="cpu", optimization=OptimizationSettings(iterations=2, levels=1, **options)
        )
        register(fixed, moving, settings)


def test_check_output_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_folder(empty, overwrite=False) == str(empty)
    assert check_output_folder(tmp_path / "new", overwrite=False) == str(tmp_path / "new")
    assert not (tmp_path / "new").exists()  # checking creates nothing
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty") as error:
        check_output_folder(full, overwrite=False)
    assert str(full) in str(error.value)
    # --overwrite replaces a result folder; another folder only with overwrite_any_folder
    with pytest.raises(InputError, match="x.txt, which are not results"):
        check_output_folder(full, overwrite=True)
    assert check_output_folder(full, overwrite=True, overwrite_any_folder=True) == str(full)
    (full / "x.txt").unlink()
    (full / "summary.json").write_text("{}")
    assert check_output_folder(full, overwrite=True) == str(full)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(InputError, match="is a file"):
        check_output_folder(a_file, overwrite=True)
    with pytest.raises(InputError, match="would be overwritten"):
        check_output_folder(full, overwrite=True, inputs=[str(full / "warped.nii.gz")])


@pytest.mark.parametrize("finest_input", [None, (20, 20, 20)])
def test_a_level_change_keeps_the_phantom_field(mni_pair, finest_input):
    """The phantom CNN starts each level exactly from the previous level's field: the first loss
    of level 2 is the loss of level 1's final field (upsampled) on level 2's grid, and level 2
    then lowers it; also when level 2's network sees level 1's images (phantom mode's default)."""
    from cnnreg.phantom import CNNField, phantom_network
    from cnnreg.pyramid import loss_function, moving_sampler, run_pyramid
    from cnnreg.spatial import resize_field, resize_image

    fixed = torch.from_numpy(sitk.GetArrayFromImage(mni_pair["fixed"]))[None, None].float()
    moving = torch.from_numpy(sitk.GetArrayFromImage(mni_pair["moving"]))[None, None].float()
    fixed, moving = fixed / fixed.max(), moving / moving.max()
    settings = OptimizationSettings(iterations=(25, 15), patience=10**6)
    shapes = [(20, 20, 20), (40, 40, 40)]

    def run(levels):
        schedule = OptimizationSettings(iterations=settings.iterations[: len(levels)], patience=10**6)
        torch.manual_seed(0)
        network = phantom_network(3, 8)
        losses = []
        u = run_pyramid(
            fixed,
            moving,
            lambda base: CNNField(network, base, 1.0, finest_input if base.shape[2:] == shapes[1] else None),
            lambda field: torch.optim.Adam(field.parameter_groups(CNN_LEARNING_RATE), lr=CNN_LEARNING_RATE),
            schedule,
            levels,
            callback=lambda e: losses.append((e["stage"], e["loss"])),
            learning_rate=CNN_LEARNING_RATE,
        )
        return u, losses

    u_coarse, _ = run(shapes[:1])  # level 1 alone: the same seed gives the same first level
    _, losses = run(shapes)
    level2 = [loss for stage, loss in losses if stage == "level 2/2"]
    with torch.no_grad():
        fine_fixed, fine_moving = resize_image(fixed, shapes[1]), resize_image(moving, shapes[1])
        handed_over, _, _ = loss_function(settings)(
            fine_fixed, moving_sampler(settings, fine_moving), resize_field(u_coarse, shapes[1]), None
        )
    assert level2[0] == pytest.approx(float(handed_over), abs=1e-5)
    assert min(level2) < level2[0] - 1e-3


@pytest.mark.parametrize("full_resolution_iterations", [0, 3])
def test_the_phantom_finest_level_network_input(mni_pair, full_resolution_iterations):
    """The finest level's network sees the previous level's images (the loss stays at full size);
    ``cnn_full_resolution_iterations`` add a last stage on the full-size images."""
    from cnnreg.phantom import optimize_cnn, phantom_network

    fixed = torch.from_numpy(sitk.GetArrayFromImage(mni_pair["fixed"]))[None, None].float()
    moving = torch.from_numpy(sitk.GetArrayFromImage(mni_pair["moving"]))[None, None].float()
    fixed, moving = fixed / fixed.max(), moving / moving.max()
    shapes, stages = [], []
    original = phantom_network

    def recording_network(*args, **kwargs):
        network = original(*args, **kwargs)
        network.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape[2:])))
        return network

    settings = OptimizationSettings(
        iterations=(2, 2, 2), features=4, cnn_full_resolution_iterations=full_resolution_iterations
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cnnreg.phantom.phantom_network", recording_network)
        u = optimize_cnn(fixed, moving, settings, callback=lambda event: stages.append(event["stage"]))
    size = tuple(fixed.shape[2:])  # 40^3: levels 20^3 and 40^3 (10^3 is below phantom mode's 16)
    half = tuple(n // 2 for n in size)
    assert u.shape == (1, 3, *size)
    # per stage: 2 iterations + the final field
    assert shapes == [half] * 3 + [half] * 3 + [size] * (
        full_resolution_iterations + 1 if full_resolution_iterations else 0
    )
    levels = 3 if full_resolution_iterations else 2
    assert stages[-1] == f"level {levels}/{levels}" and len(stages) == 4 + full_resolution_iterations
    summary = RegistrationSettings(mode="phantom", optimization=settings).iterations_requested()
    assert list(summary) == ([2, 2, 2, 3] if full_resolution_iterations else [2, 2, 2])
    # one level: its network already sees the full-size images; the full-size stage still runs
    stages.clear()
    one_level = OptimizationSettings(
        iterations=2, levels=1, features=4, cnn_full_resolution_iterations=full_resolution_iterations
    )
    optimize_cnn(fixed, moving, one_level, callback=lambda event: stages.append(event["stage"]))
    assert len(stages) == 2 + full_resolution_iterations


@pytest.mark.parametrize(
    "name, before, after, gain",
    [
        ("lncc", 0.2, 0.5, 0.3),
        ("pcc", 0.9, 0.8, -0.1),
        ("ssim", 0.5, 0.5, 0.0),
        ("mi", 0.4, 0.7, 0.3),
        ("pcc+ssim", 0.3, 0.6, 0.3),
        ("mse", 0.02, 0.01, 0.01),
        ("mse", 0.01, 0.03, -0.02),
    ],
)
def test_similarity_gain_is_positive_when_the_images_became_more_similar(name, before, after, gain):
    from cnnreg.losses import similarity_gain

    assert similarity_gain(name, before, after) == pytest.approx(gain)
