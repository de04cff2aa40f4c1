"""cnnreg.image: reading and checking images, single-slice handling, normalisation, fields."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from cnnreg import image as im
from cnnreg.errors import InputError
from cnnreg.grid import same_grid
from cnnreg.spatial import voxel_to_lps


def _write(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


def _blob_image(synth, shape=(10, 12, 14), seed=0, **geometry) -> sitk.Image:
    return synth.make_image(synth.blob_array(shape, seed=seed), **geometry)


# --------------------------------------------------------------------------------------
# read_image / check_image: every problem is an InputError naming the file and the problem
# --------------------------------------------------------------------------------------


def test_read_image_returns_a_valid_image(tmp_path, synth):
    path = _write(_blob_image(synth, spacing=(1.2, 0.8, 2.0)), tmp_path / "ok.nii.gz")
    image = im.read_image(path, "fixed image")
    assert image.GetSize() == (14, 12, 10)
    np.testing.assert_allclose(image.GetSpacing(), (1.2, 0.8, 2.0), rtol=1e-6)


def test_read_missing_file(tmp_path):
    path = tmp_path / "nowhere.nii.gz"
    with pytest.raises(InputError, match="not found") as error:
        im.read_image(path, "fixed image")
    assert "fixed image" in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize("name", ["x.nii.gz", "x.nrrd", "x.mha"])
def test_read_garbage_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="cannot read") as error:
        im.read_image(path, "moving image")
    assert "moving image" in str(error.value) and str(path) in str(error.value)


def test_read_zero_byte_file(tmp_path):
    path = tmp_path / "zero.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="cannot read"):
        im.read_image(path)


def test_read_4d_image(tmp_path):
    volumes = [sitk.GetImageFromArray(np.random.default_rng(i).random((4, 5, 6)).astype(np.float32)) for i in range(3)]
    path = _write(sitk.JoinSeries(volumes), tmp_path / "series.nii.gz")
    with pytest.raises(InputError, match="4D") as error:
        im.read_image(path, "fixed image")
    assert "only 2D and 3D" in str(error.value)


def test_read_vector_image(tmp_path):
    vectors = np.random.default_rng(1).random((4, 5, 6, 3)).astype(np.float32)
    path = _write(sitk.GetImageFromArray(vectors, isVector=True), tmp_path / "rgb.nrrd")
    with pytest.raises(InputError, match="vector image with 3 components"):
        im.read_image(path, "moving image")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("ext", ["nrrd", "mha"])
def test_read_non_finite_values(tmp_path, bad, ext):
    array = np.random.default_rng(2).random((4, 5, 6)).astype(np.float32)
    array[1, 2, 3] = bad
    array[3, 0, 0] = bad
    path = _write(sitk.GetImageFromArray(array), tmp_path / f"bad.{ext}")
    with pytest.raises(InputError, match="2 NaN or infinite voxels") as error:
        im.read_image(path, "fixed image")
    assert str(path) in str(error.value)


def test_nifti_nan_is_silently_read_as_zero_by_simpleitk(tmp_path):
    """Documents a reader fact the NaN check cannot see: SimpleITK's NIfTI reader returns 0 for
    NaN voxels (NRRD/MHA keep them, see above).  If this starts failing, SimpleITK changed and
    the NIfTI case of the NaN check becomes testable."""
    array = np.random.default_rng(2).random((4, 5, 6)).astype(np.float32)
    array[1, 2, 3] = np.nan
    path = _write(sitk.GetImageFromArray(array), tmp_path / "nan.nii.gz")
    values = sitk.GetArrayFromImage(sitk.ReadImage(path))
    assert np.all(np.isfinite(values)) and values[1, 2, 3] == 0.0


def test_read_constant_image(tmp_path):
    path = _write(sitk.GetImageFromArray(np.full((4, 5, 6), 7, np.int16)), tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match="constant") as error:
        im.read_image(path, "moving image")
    assert "7.0" in str(error.value)


def test_read_empty_image(tmp_path):
    path = tmp_path / "empty.mha"  # a MetaImage header with a zero-length axis
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 0 4 4\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    with pytest.raises(InputError, match="empty") as error:
        im.read_image(path, "fixed image")
    assert str(path) in str(error.value)


def test_check_image_empty_and_allow_constant():
    with pytest.raises(InputError, match="empty"):
        im.check_image(sitk.Image([0, 4, 4], sitk.sitkFloat32), "fixed image")
    flat = sitk.Image([4, 4, 4], sitk.sitkUInt8) + 1
    im.check_image(flat, "labels", allow_constant=True)  # no error
    with pytest.raises(InputError, match="constant"):
        im.check_image(flat, "labels")


# --------------------------------------------------------------------------------------
# pairs and labels
# --------------------------------------------------------------------------------------


def test_check_pair_2d_vs_3d(synth):
    image_3d = _blob_image(synth)
    image_2d = synth.make_image(synth.blob_array((12, 14)))
    with pytest.raises(InputError, match="both must be 2D or both 3D") as error:
        im.check_pair(image_3d, image_2d)
    assert "fixed image is 3D" in str(error.value) and "moving image is 2D" in str(error.value)
    with pytest.raises(InputError, match="fixed image is 2D"):
        im.check_pair(image_2d, image_3d)


def test_check_pair_single_slice_stored_differently(synth):
    image_2d = synth.make_image(synth.blob_array((12, 14)))
    single_slice = synth.make_image(synth.blob_array((12, 14))[None])  # 3D, one slice
    im.check_pair(single_slice, single_slice)  # fine
    with pytest.raises(InputError, match="stored as"):
        im.check_pair(image_2d, single_slice)


def test_check_pair_accepts_different_grids_but_not_other_dimensions(synth):
    """Fixed and moving may lie on any grids (the moving image is resampled), never a 2D against a 3D image."""
    assert im.check_pair(_blob_image(synth), _blob_image(synth, shape=(8, 9, 10), spacing=(2, 2, 2))) is None
    flat = synth.make_image(synth.blob_array((12, 14)))
    with pytest.raises(InputError, match="2D|3D|dimension"):
        im.check_pair(_blob_image(synth), flat)


def test_check_labels(synth):
    moving = _blob_image(synth, spacing=(1.2, 0.8, 2.0), origin=(5, -3, 1))
    labels = sitk.Cast(moving > 0.5, sitk.sitkUInt8)
    im.check_labels(labels, moving)  # on the grid: fine

    shifted = sitk.Image(labels)
    shifted.SetOrigin((5.5, -3, 1))
    resized = sitk.Image([14, 12, 9], sitk.sitkUInt8)
    resized.CopyInformation(labels[:, :, :9])
    respaced = sitk.Image(labels)
    respaced.SetSpacing((1.0, 0.8, 2.0))
    for bad in (shifted, resized, respaced):
        with pytest.raises(InputError, match="not on the moving image grid"):
            im.check_labels(bad, moving)

    fractional = sitk.Cast(labels, sitk.sitkFloat32) * 0.5
    with pytest.raises(InputError, match="non-integer"):
        im.check_labels(fractional, moving)
    im.check_labels(sitk.Cast(labels, sitk.sitkFloat32) * 2.0, moving)  # integer-valued floats: fine


def test_same_grid_tolerance(synth):
    a = _blob_image(synth, spacing=(1.0, 1.0, 1.0))
    b = sitk.Image(a)
    b.SetOrigin((1e-6, 0, 0))  # far below the 1e-3 mm origin tolerance
    assert same_grid(a, b)
    b.SetOrigin((0.01, 0, 0))
    assert not same_grid(a, b)


# --------------------------------------------------------------------------------------
# single slices, arrays and normalisation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array_shape, expected_axes",
    [
        ((1, 12, 14), (1, 2)),
        ((10, 1, 14), (0, 2)),
        ((10, 12, 1), (0, 1)),
        ((10, 12, 14), (0, 1, 2)),
        ((12, 14), (0, 1)),
    ],
)
def test_working_axes_and_to_array(synth, array_shape, expected_axes):
    array = synth.blob_array([n for n in array_shape if n > 1]).reshape(array_shape)
    image = synth.make_image(array)
    assert im.working_axes(image) == expected_axes
    working = im.to_array(image)
    assert working.dtype == np.float32
    assert working.shape == tuple(array_shape[a] for a in expected_axes)
    np.testing.assert_array_equal(working.ravel(), array.ravel())
    back = im.array_to_image(working, image)
    assert back.GetSize() == image.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)


@pytest.mark.parametrize("array_shape", [(1, 6, 7), (5, 1, 7), (5, 6, 1)])
def test_displacement_image_single_slice_embeds_zero_on_the_collapsed_axis(synth, array_shape):
    direction = synth.rotation_matrix((1.0, -2.0, 0.5), 40.0)
    spacing = (1.2, 0.8, 2.0)
    image = synth.make_image(np.ones(array_shape, np.float32), spacing=spacing, origin=(3, -4, 5), direction=direction)
    axes = im.working_axes(image)
    collapsed = ({0, 1, 2} - set(axes)).pop()
    work_shape = tuple(array_shape[a] for a in axes)
    rng = np.random.default_rng(5)
    u = rng.normal(size=(2, *work_shape))
    field = im.displacement_image(u, image)
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSize() == image.GetSize()
    d = sitk.GetArrayFromImage(field)  # (*array_shape, 3), LPS mm
    # the same displacement written out by hand: 3 channels in (k, j, i), zero on the collapsed axis
    full = np.zeros((3, *array_shape))
    for channel, axis in enumerate(axes):
        full[axis] = u[channel].reshape(array_shape)
    # the field is rounded to float32 (the precision of the written file)
    np.testing.assert_allclose(d, voxel_to_lps(full, spacing, direction.ravel()), rtol=1e-6, atol=1e-6)
    # ... and back to voxels: the collapsed axis carries no displacement (to float32 rounding)
    voxels = im.field_to_voxels(field)
    np.testing.assert_allclose(voxels[collapsed], 0.0, atol=1e-6)
    for channel, axis in enumerate(axes):
        np.testing.assert_allclose(voxels[axis], u[channel].reshape(array_shape), rtol=1e-6, atol=1e-6)


def test_normalize_max():
    array = np.array([[-4.0, 2.0], [1.0, 0.0]], np.float32)
    # divided by max |value| = 4
    np.testing.assert_allclose(im.normalize(array, "max"), [[-1.0, 0.5], [0.25, 0.0]])
    np.testing.assert_array_equal(im.normalize(np.zeros((3, 3)), "max"), 0.0)


def test_normalize_percentile():
    array = np.arange(1000, dtype=np.float32).reshape(10, 100)
    # numpy's linear percentile of 0..999: p0.5 = 0.005 * 999 = 4.995, p99.5 = 0.995 * 999 = 994.005
    low, high = 4.995, 994.005
    expected = np.clip((array - low) / (high - low), 0, 1)
    out = im.normalize(array, "percentile")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.count_nonzero(out == 0.0) == 5 and np.count_nonzero(out == 1.0) == 5  # 0..4 and 995..999


def test_normalize_percentile_degenerate_falls_back_to_min_max():
    array = np.zeros(1000, np.float32)
    array[0] = 8.0  # p0.5 == p99.5 == 0
    out = im.normalize(array, "percentile")
    assert out[0] == 1.0 and np.all(out[1:] == 0.0)


def test_normalize_none_and_unknown():
    array = np.array([3.0, -1.0], np.float32)
    np.testing.assert_array_equal(im.normalize(array, "none"), array)
    with pytest.raises(ValueError):
        im.normalize(array, "zscore")


# --------------------------------------------------------------------------------------
# displacement files, resampling, writing
# --------------------------------------------------------------------------------------


def test_displacement_round_trip_through_a_file(tmp_path, synth):
    fixed = _blob_image(
        synth, spacing=(1.2, 0.8, 2.0), origin=(1, 2, 3), direction=synth.rotation_matrix((0, 1, 1), 25)
    )
    u = np.random.default_rng(6).normal(size=(3, 10, 12, 14))
    path = _write(im.displacement_image(u, fixed), tmp_path / "field.nii.gz")
    field = im.read_displacement(path)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert same_grid(field, fixed)
    # NIfTI stores the grid (sform) in float32, so the direction read back differs by ~1e-7
    np.testing.assert_allclose(im.field_to_voxels(field), u, atol=1e-5)


def test_read_displacement_errors(tmp_path, synth):
    with pytest.raises(InputError, match="not found"):
        im.read_displacement(tmp_path / "missing.nii.gz")
    scalar = _write(_blob_image(synth), tmp_path / "scalar.nii.gz")
    with pytest.raises(InputError, match="not a displacement field"):
        im.read_displacement(scalar)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x00\x01" * 300)
    with pytest.raises(InputError, match="cannot read"):
        im.read_displacement(garbage)
    bad = np.zeros((4, 5, 6, 3))
    bad[1, 1, 1, 0] = np.nan
    nan_path = _write(sitk.GetImageFromArray(bad, isVector=True), tmp_path / "nan_field.mha")
    with pytest.raises(InputError, match="NaN"):
        im.read_displacement(nan_path)


def test_displacement_image_with_affine_pre_transform(synth):
    fixed = _blob_image(
        synth, spacing=(1.2, 0.8, 2.0), origin=(4, -6, 2), direction=synth.rotation_matrix((1, 1, 0), 20)
    )
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.05, 0.02, 0.0, -0.03, 0.97, 0.01, 0.0, 0.04, 1.02))
    affine.SetTranslation((2.0, -1.5, 0.5))
    affine.SetCenter((10.0, 0.0, 5.0))
    u = np.random.default_rng(7).normal(size=(3, 10, 12, 14))
    combined = sitk.GetArrayFromImage(im.displacement_image(u, fixed, affine))
    plain = sitk.GetArrayFromImage(im.displacement_image(u, fixed))
    # the exported mapping is x -> A(x + d(x)): check voxel by voxel with SimpleITK's TransformPoint
    for index in [(0, 0, 0), (13, 11, 9), (5, 7, 3)]:  # (i, j, k)
        x = np.array(fixed.TransformIndexToPhysicalPoint(index))
        kji = index[::-1]
        expected = np.array(affine.TransformPoint(tuple(x + plain[kji])))
        np.testing.assert_allclose(x + combined[kji], expected, atol=1e-9)


@pytest.mark.parametrize("array_shape", [(9, 6, 7), (1, 6, 7), (5, 6, 1), (8, 7)], ids=["3d", "k1", "i1", "2d"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_displacement_image_slab_by_slab_equals_the_whole_grid_conversion(synth, monkeypatch, array_shape, affine):
    # the field is converted in float64 slabs of the first array axis; every vector must be the
    # one of the whole-grid formula (float64, then rounded to float32), whatever the slab size
    ndim = len(array_shape)
    direction = synth.rotation_matrix((1.0, -2.0, 0.5), 40.0) if ndim == 3 else np.array([[0.8, -0.6], [0.6, 0.8]])
    spacing, origin = (1.2, 0.8, 2.0)[:ndim], (3, -4, 5)[:ndim]
    image = synth.make_image(np.ones(array_shape, np.float32), spacing=spacing, origin=origin, direction=direction)
    axes = im.working_axes(image)
    u = np.random.default_rng(8).normal(size=(len(axes), *[array_shape[a] for a in axes])).astype(np.float32)
    transform = None
    if affine:
        transform = sitk.AffineTransform(ndim)
        transform.SetMatrix(tuple(np.eye(ndim).ravel() + np.random.default_rng(9).normal(scale=0.03, size=ndim * ndim)))
        transform.SetTranslation(tuple(float(t) for t in np.arange(ndim) - 1.5))
    # the whole grid at once, as a formula
    full = np.zeros((len(array_shape), *array_shape))
    for channel, axis in enumerate(axes):
        full[axis] = u[channel].reshape(array_shape)
    d = voxel_to_lps(full, spacing, direction.ravel())
    if affine:
        matrix = np.asarray(transform.GetMatrix()).reshape(ndim, ndim)
        offset = np.asarray(transform.GetTranslation())  # centre 0
        points = im.physical_points(image)
        d = (points + d) @ matrix.T + offset - points
    expected = d.astype(np.float32).astype(np.float64)
    row = int(np.prod(array_shape[1:]))
    for slab_voxels in (1, 2 * row, 4 * row, im.SLAB_VOXELS):
        monkeypatch.setattr(im, "SLAB_VOXELS", slab_voxels)
        for field_u in (u, u.astype(np.float64)):
            field = im.displacement_image(field_u, image, transform)
            assert field.GetPixelID() == sitk.sitkVectorFloat64 and same_grid(field, image)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(field), expected)
    # physical_points of a band of rows is that band of the whole grid's points
    np.testing.assert_array_equal(im.physical_points(image, slice(1, 3)), im.physical_points(image)[1:3])


def test_apply_displacement_zero_field_is_identity_and_dimension_check(synth):
    image = _blob_image(synth, spacing=(1.2, 0.8, 2.0))
    field = im.displacement_image(np.zeros((3, 10, 12, 14)), image)
    out = im.apply_displacement(image, field)
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(image), atol=1e-6)
    # the field image passed in is still usable afterwards (DisplacementFieldTransform takes its buffer)
    assert field.GetSize() == image.GetSize()
    flat = synth.make_image(synth.blob_array((12, 14)))
    with pytest.raises(InputError, match="2D but the displacement field is 3D"):
        im.apply_displacement(flat, field)


def test_resample_identity_keeps_values_and_pixel_type(synth):
    image = sitk.Cast(_blob_image(synth) * 100, sitk.sitkInt16)
    out = im.resample(image, image)
    assert out.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(image))


def test_write_image_to_a_missing_folder(tmp_path, synth):
    path = tmp_path / "no" / "such" / "folder" / "x.nii.gz"
    from cnnreg.errors import WriteError

    with pytest.raises(WriteError, match="cannot write") as error:  # exit code 3: the disk, not the input
        im.write_image(_blob_image(synth), path)
    assert str(path) in str(error.value)
    assert not os.path.exists(path)


def test_affine_prealign_recovers_a_translation(synth):
    spacing = (1.5, 1.5, 1.5)
    shape = (28, 30, 26)
    fixed = _blob_image(synth, shape=shape, seed=3, spacing=spacing)
    shift = np.array([3.0, -2.0, 1.5])  # mm, LPS: moving(p) = fixed(p - shift)
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, tuple(-shift)), sitk.sitkLinear, 0.0)
    transform = im.affine_prealign(fixed, moving)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    # the fixed -> moving mapping is p -> p + shift (an affine on a small blob image: within
    # 1 mm = 2/3 voxel; the wrong direction would be off by 2 |shift| = 7.8 mm)
    np.testing.assert_allclose(np.array(transform.TransformPoint(tuple(centre))) - centre, shift, atol=1.0)


def test_displacement_fields_are_nifti_intent_1006_with_ras_vectors(tmp_path, synth):
    """Written as NIfTI intent 1006 (displacement), vectors in RAS as the NIfTI world is: SimpleITK
    reads the LPS field back exactly, nibabel sees the intent and the RAS values."""
    import gzip
    import struct

    rng = np.random.default_rng(4)
    direction = synth.rotation_matrix((0.3, 1.0, 0.2), 25.0).flatten()
    values = rng.normal(0, 2.0, (7, 9, 11, 3)).astype(np.float32)  # (k, j, i, LPS xyz) mm
    field = sitk.GetImageFromArray(values, isVector=True)
    field.SetSpacing((1.5, 0.8, 2.5))
    field.SetDirection(direction)
    for name in ("field.nii.gz", "field.nii"):
        path = tmp_path / name
        im.write_image(field, path)
        back = sitk.ReadImage(str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), values)
        np.testing.assert_allclose(back.GetDirection(), direction, atol=1e-6)
        raw = (gzip.open if name.endswith(".gz") else open)(path, "rb").read(352)
        assert struct.unpack("<h", raw[68:70])[0] == 1006
    nibabel = pytest.importorskip("nibabel")
    loaded = nibabel.load(str(tmp_path / "field.nii.gz"))
    assert loaded.header.get_intent()[0] == "displacement vector"
    stored = np.asarray(loaded.dataobj)  # (i, j, k, 1, component)
    np.testing.assert_array_equal(stored[..., 0, 0].transpose(2, 1, 0), -values[..., 0])  # x: L -> R
    np.testing.assert_array_equal(stored[..., 0, 2].transpose(2, 1, 0), values[..., 2])  # z: the same
    # other vector images and other formats are written as they are
    im.write_image(field, tmp_path / "field.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "field.nrrd"))), values)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_gzip_file_compressed_on_several_threads_is_one_ordinary_gzip_stream(tmp_path, monkeypatch, threads):
    """Blocks compressed apart and joined: gzip (which checks the CRC and the length) and zlib's
    own single-member reader give back exactly the bytes written, over several blocks, a ragged
    tail and writes that straddle blocks."""
    import gzip
    import zlib

    from cnnreg.nifti import ParallelGzipWriter

    monkeypatch.setattr(ParallelGzipWriter, "BLOCK_BYTES", 1000)
    rng = np.random.default_rng(5)
    data = (rng.normal(0, 1, 2600).astype(np.float32).tobytes()) + bytes(3001)  # noise, then a long run of zeros
    path = tmp_path / "blocks.gz"
    with ParallelGzipWriter(path, threads=threads) as out:
        for start in range(0, len(data), 777):
            out.write(data[start : start + 777])
    stored = path.read_bytes()
    assert gzip.decompress(stored) == data
    single = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one gzip member, nothing after it
    assert single.decompress(stored) == data and single.eof and single.unused_data == b""
    assert len(stored) < len(data) - 2500  # the zeros compressed
