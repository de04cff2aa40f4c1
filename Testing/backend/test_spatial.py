"""cnnreg.spatial: identity grids, warping, composition, resizing and voxel <-> LPS/RAS units.

Convention under test (cnnreg.settings): ``u`` is ``(N, ndim, *S)`` in voxels, channel ``c``
is the displacement along tensor axis ``c`` and it pulls: ``out(x) = image(x + u(x))``.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cnnreg.spatial import (
    bspline_coefficients,
    compose,
    filter_axis,
    gaussian_kernel1d,
    gaussian_smooth,
    identity_grid,
    lps_to_voxel,
    resize_field,
    resize_image,
    voxel_to_lps,
    warp,
    warp_bspline,
)

SHAPES = [(17, 23), (11, 13, 9)]


def _random(shape, seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _constant_field(shape, vector, dtype=torch.float32):
    """``(1, ndim, *shape)`` field equal to ``vector`` (voxels, tensor-axis order) everywhere."""
    ndim = len(shape)
    return torch.tensor(vector, dtype=dtype).view(1, ndim, *([1] * ndim)).expand(1, ndim, *shape).clone()


# --------------------------------------------------------------------------------------
# identity grid and identity warp
# --------------------------------------------------------------------------------------


def test_identity_grid_channel_c_is_the_index_along_axis_c():
    grid = identity_grid((3, 4, 5), dtype=torch.float64)
    assert grid.shape == (1, 3, 3, 4, 5)
    k, j, i = np.meshgrid(np.arange(3), np.arange(4), np.arange(5), indexing="ij")
    np.testing.assert_array_equal(grid[0, 0].numpy(), k)
    np.testing.assert_array_equal(grid[0, 1].numpy(), j)
    np.testing.assert_array_equal(grid[0, 2].numpy(), i)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_identity_warp_nearest_is_bit_exact(shape):
    image = _random((2, 3, *shape))
    u = torch.zeros(2, len(shape), *shape)
    assert torch.equal(warp(image, u, "nearest"), image)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_identity_warp_linear_within_float32_rounding(shape):
    # align_corners=True normalisation -> grid_sample un-normalisation round-trips integer
    # coordinates only up to float32 rounding (~ n * 6e-8 voxels), so the weights are not
    # exactly (1, 0); warp() therefore returns an exact copy for u == 0 (tested below).
    image = _random((2, 3, *shape))
    u = torch.zeros(2, len(shape), *shape)
    out = warp(image, u, "linear")
    assert out.dtype == image.dtype and out.shape == image.shape
    assert float((out - image).abs().max()) < 2e-5


@pytest.mark.parametrize("shape", [(17, 23), (11, 13, 9), (40, 48, 44)], ids=["2d", "3d", "3d-large"])
def test_identity_warp_linear_is_bit_exact(shape):
    image = _random((1, 1, *shape))
    u = torch.zeros(1, len(shape), *shape)
    assert torch.equal(warp(image, u, "linear"), image)


def test_identity_warp_float64_linear_is_exact_to_1e12():
    image = _random((1, 1, 9, 10, 11), dtype=torch.float64)
    u = torch.zeros(1, 3, 9, 10, 11, dtype=torch.float64)
    assert float((warp(image, u) - image).abs().max()) < 1e-12


# --------------------------------------------------------------------------------------
# translations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, shift",
    [((17, 23), (2, -3)), ((11, 13, 9), (1, -2, 3))],
    ids=["2d", "3d"],
)
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_integer_translation_equals_shifted_array_in_the_interior(shape, shift, interpolation):
    image = _random((1, 1, *shape), seed=1)
    out = warp(image, _constant_field(shape, shift), interpolation)
    # out[p] = image[p + t]  ==  np.roll(image, -t)[p] wherever p + t stays inside the image
    expected = np.roll(image[0, 0].numpy(), [-s for s in shift], axis=tuple(range(len(shape))))
    interior = tuple(slice(max(0, -s), n - max(0, s)) for n, s in zip(shape, shift))
    got = out[0, 0].numpy()[interior]
    if interpolation == "nearest":
        np.testing.assert_array_equal(got, expected[interior])
    else:
        np.testing.assert_allclose(got, expected[interior], atol=2e-5, rtol=0)
    # the interior really is most of the image (the test would be vacuous otherwise)
    assert got.size >= 0.4 * image.numel()


def test_translation_direction_is_pull_along_each_axis():
    # A single bright voxel at index 5 along one axis; a displacement of +2 voxels along that
    # axis pulls it to index 3 (out(3) = image(3 + 2)).  Each axis separately, 3D.
    shape = (9, 10, 11)
    for axis in range(3):
        image = torch.zeros(1, 1, *shape)
        index = [4, 4, 4]
        index[axis] = 5
        image[(0, 0, *index)] = 1.0
        vector = [0.0, 0.0, 0.0]
        vector[axis] = 2.0
        out = warp(image, _constant_field(shape, vector), "nearest")
        expected = [4, 4, 4]
        expected[axis] = 3
        assert out[(0, 0, *expected)] == 1.0 and float(out.sum()) == 1.0


def test_half_voxel_translation_is_linear_interpolation():
    # out(x) = image(x + 0.5) = mean of two neighbours along the shifted axis (hand value)
    image = torch.arange(12, dtype=torch.float64).view(1, 1, 3, 4)  # image[j, i] = 4 j + i
    out = warp(image, _constant_field((3, 4), (0.0, 0.5), torch.float64))
    # along i: 4 j + i + 0.5 inside, border-clamped at the last column
    expected = image[0, 0].numpy() + 0.5
    expected[:, -1] = image[0, 0, :, -1].numpy()
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-12)


def test_zeros_padding_outside_and_border_padding():
    image = torch.ones(1, 1, 6, 6)
    u = _constant_field((6, 6), (0.0, 3.0))  # pull from 3 voxels to the right
    zeros = warp(image, u, padding="zeros")[0, 0]
    border = warp(image, u, padding="border")[0, 0]
    # columns 0..2 sample inside (i + 3 <= 5), columns 3..5 outside
    assert torch.all(zeros[:, :3] == 1) and torch.all(zeros[:, 3:] == 0)
    assert torch.all(border == 1)


def test_warp_rejects_bad_shapes_and_interpolation():
    with pytest.raises(ValueError, match="displacement"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="dimension"):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="interpolation"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), interpolation="quintic")
    with pytest.raises(ValueError, match="padding"):
        warp(torch.zeros(1, 1, 4, 4), torch.ones(1, 2, 4, 4), interpolation="cubic", padding="reflection")


def test_warp_broadcasts_one_field_over_a_batch_and_keeps_dtype():
    image = _random((3, 2, 8, 9), seed=4).to(torch.float64)
    u = _constant_field((8, 9), (1.0, 0.0))
    out = warp(image, u, "nearest")
    assert out.shape == (3, 2, 8, 9) and out.dtype == torch.float64
    np.testing.assert_array_equal(out[:, :, :-1].numpy(), image[:, :, 1:].numpy())


# --------------------------------------------------------------------------------------
# composition and resizing
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# cubic B-spline interpolation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(17, 23), (11, 13, 9), (2, 7), (1, 5, 6), (3, 2, 4)])
def test_cubic_identity_reproduces_every_sample_including_the_edges(shape):
    # the prefilter is the exact inverse of the interpolation with the mirror boundary, so
    # u = 0 (taking the sampling path: u requires a gradient) returns the samples
    image = _random((2, 2, *shape), seed=1, dtype=torch.float64)
    u = torch.zeros(2, len(shape), *shape, dtype=torch.float64, requires_grad=True)
    np.testing.assert_allclose(warp(image, u, "cubic").detach().numpy(), image.numpy(), atol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_cubic_shift_of_a_cubic_polynomial_is_exact_away_from_the_edges(ndim):
    # cubic B-spline interpolation reproduces polynomials of degree <= 3; linear does not
    shape = (36,) * ndim if ndim == 2 else (30, 30, 30)
    grid = identity_grid(shape, dtype=torch.float64)[0]
    x = grid / 10.0

    def polynomial(p):
        value = 1.0 + 0.5 * p[0] - 0.3 * p[0] ** 2 + 0.2 * p[-1] ** 3
        return value - 0.4 * p[0] * p[1] ** 2

    shift = (0.37, -0.61, 0.25)[:ndim]
    u = _constant_field(shape, shift, torch.float64)
    expected = polynomial(x + u[0] / 10.0)
    inner = (slice(12, -12),) * ndim
    cubic = warp(polynomial(x)[None, None], u, "cubic")[0, 0]
    linear = warp(polynomial(x)[None, None], u, "linear")[0, 0]
    assert (cubic - expected)[inner].abs().max() < 1e-6
    assert (linear - expected)[inner].abs().max() > 3e-4  # the curvature linear interpolation misses


def test_cubic_warp_equals_simpleitk_bspline_resampling():
    # SimpleITK's order-3 B-spline interpolator on a translation, index space
    shape = (14, 17, 15)
    array = np.asarray(_random(shape, seed=2, dtype=torch.float64))
    shift = np.array([0.3, -1.45, 2.7])  # (k, j, i) voxels
    image = sitk.GetImageFromArray(array)
    transform = sitk.TranslationTransform(3, tuple(float(s) for s in shift[::-1]))  # (x, y, z) = (i, j, k)
    itk = sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkBSpline, -1.0, sitk.sitkFloat64))
    ours = warp(torch.from_numpy(array)[None, None], _constant_field(shape, shift, torch.float64), "cubic")
    # points at least 2 voxels inside (near the edge the two boundary extensions differ)
    positions = identity_grid(shape, dtype=torch.float64)[0].numpy() + shift.reshape(3, 1, 1, 1)
    deep = np.all([(p >= 2) & (p <= n - 3) for p, n in zip(positions, shape)], axis=0)
    assert deep.sum() > 1000
    np.testing.assert_allclose(ours[0, 0].numpy()[deep], itk[deep], atol=1e-12)


def test_cubic_zeros_padding_and_border_clamping():
    image = torch.ones(1, 1, 6, 7, dtype=torch.float64)
    u = _constant_field((6, 7), (0.0, 3.5), torch.float64)
    zeros = warp(image, u, "cubic", padding="zeros")[0, 0]
    border = warp(image, u, "cubic")[0, 0]
    # columns 0..2 sample inside (i + 3.5 <= 6), columns 3..6 outside
    assert torch.allclose(zeros[:, :3], torch.ones(6, 3, dtype=torch.float64)) and torch.all(zeros[:, 3:] == 0)
    assert torch.allclose(border, torch.ones_like(border))


@pytest.mark.parametrize("shape", [(5, 6), (4, 5, 3), (2, 5)])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_cubic_warp_gradcheck_image_and_displacement(shape, padding):
    ndim = len(shape)
    image = _random((2, 1, *shape), seed=3, dtype=torch.float64).requires_grad_(True)
    # up to +-1.5 voxels: points outside the grid (clamped) are part of the check
    u = ((_random((2, ndim, *shape), seed=4, dtype=torch.float64) - 0.5) * 3.0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, v: warp(i, v, "cubic", padding), (image, u))


def test_cubic_warp_of_prefiltered_coefficients_broadcasts_over_a_batch_and_channels():
    image = _random((1, 3, 9, 8, 7), seed=5, dtype=torch.float64)
    u = (_random((2, 3, 9, 8, 7), seed=6, dtype=torch.float64) - 0.5) * 2.0
    both = warp_bspline(bspline_coefficients(image), u)
    assert both.shape == (2, 3, 9, 8, 7)
    for n in range(2):
        for c in range(3):
            one = warp(image[:, c : c + 1], u[n : n + 1], "cubic")
            assert torch.allclose(both[n, c], one[0, 0], atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_compose_of_constant_shifts_is_their_sum(shape):
    ndim = len(shape)
    a = [0.7, -1.25, 2.5][:ndim]
    b = [-0.3, 2.0, 0.125][:ndim]
    w = compose(_constant_field(shape, a, torch.float64), _constant_field(shape, b, torch.float64))
    expected = _constant_field(shape, [x + y for x, y in zip(a, b)], torch.float64)
    assert float((w - expected).abs().max()) < 1e-12


def test_compose_matches_sequential_warping_for_smooth_fields(synth):
    # warp(warp(m, u), v) == warp(m, compose(u, v)) up to interpolation error, in the interior
    shape = (32, 34)
    moving = torch.from_numpy(synth.blob_array(shape, seed=2)).to(torch.float64)[None, None]
    grid = identity_grid(shape, dtype=torch.float64)
    # smooth fields of amplitude 2 voxels: sinusoids of period ~ the image size
    u = 2.0 * torch.sin(2 * np.pi * grid.flip(1) / 30.0 + torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))
    v = 2.0 * torch.cos(2 * np.pi * grid / 28.0 + torch.tensor([0.5, -0.7]).view(1, 2, 1, 1))
    sequential = warp(warp(moving, u), v)
    composed = warp(moving, compose(u, v))
    wrong = warp(moving, compose(v, u))  # the other order
    naive = warp(moving, u + v)  # plain sum: wrong for non-constant fields
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5))
    error = float((sequential - composed)[inner].abs().max())
    spread = float(moving.max() - moving.min())
    assert error < 0.03 * spread
    assert float((sequential - wrong)[inner].abs().max()) > 3 * error
    assert float((sequential - naive)[inner].abs().max()) > 3 * error


@pytest.mark.parametrize("old, new", [((8, 12), (16, 6)), ((6, 8, 10), (12, 4, 5))], ids=["2d", "3d"])
def test_resize_field_keeps_a_constant_physical_displacement(old, new):
    ndim = len(old)
    vector = [1.5, -2.0, 0.75][:ndim]
    resized = resize_field(_constant_field(old, vector, torch.float64), new)
    assert resized.shape == (1, ndim, *new)
    # voxel size scales by old/new, so the voxel displacement scales by new/old:
    # 2D: (1.5 * 16/8, -2.0 * 6/12) = (3.0, -1.0); 3D: (3.0, -1.0, 0.375)
    expected = [v * n / o for v, n, o in zip(vector, new, old)]
    for c in range(ndim):
        np.testing.assert_allclose(resized[0, c].numpy(), expected[c], atol=1e-12)
    # physical length: (voxels on the new grid) x (new spacing = old spacing * old / new)
    spacing_old = np.array([0.8, 1.2, 2.0][:ndim])
    physical_new = np.array(expected) * spacing_old * np.array(old) / np.array(new)
    np.testing.assert_allclose(physical_new, np.array(vector) * spacing_old, atol=1e-12)


def test_resize_field_same_shape_is_a_no_op():
    u = _random((1, 2, 5, 6))
    torch.testing.assert_close(resize_field(u, (5, 6)), u, rtol=0, atol=0)  # no rescaling of the vectors


def test_resize_image_keeps_constants_and_shape():
    image = torch.full((1, 1, 12, 10, 8), 3.5)
    small = resize_image(image, (6, 5, 4))
    assert small.shape == (1, 1, 6, 5, 4)
    np.testing.assert_allclose(small.numpy(), 3.5, rtol=1e-6)


def test_gaussian_kernel_and_smoothing_preserve_constants():
    kernel = gaussian_kernel1d(1.5, dtype=torch.float64)
    assert kernel.numel() == 2 * 5 + 1  # radius ceil(3 * 1.5) = 5
    assert abs(float(kernel.sum()) - 1.0) < 1e-12
    assert torch.argmax(kernel) == 5 and torch.allclose(kernel, kernel.flip(0))
    x = torch.full((1, 2, 7, 8, 9), 2.0, dtype=torch.float64)
    np.testing.assert_allclose(gaussian_smooth(x, 1.0).numpy(), 2.0, atol=1e-12)
    # smoothing only along the last axis leaves a field that varies along the first untouched
    ramp = torch.arange(7, dtype=torch.float64).view(1, 1, 7, 1).expand(1, 1, 7, 6).clone()
    np.testing.assert_allclose(gaussian_smooth(ramp, [0.0, 2.0]).numpy(), ramp.numpy(), atol=1e-12)


def _reference_filter(x: np.ndarray, axis: int, taps: list[float], padding: str) -> np.ndarray:
    """Brute-force 1D correlation along spatial ``axis`` (numpy, explicit index clamping)."""
    x = np.moveaxis(x, 2 + axis, -1)
    size, radius = x.shape[-1], len(taps) // 2
    out = np.zeros_like(x)
    for i in range(size):
        for t, weight in enumerate(taps):
            j = i + t - radius
            if padding == "replicate":
                out[..., i] += weight * x[..., min(max(j, 0), size - 1)]
            elif 0 <= j < size:
                out[..., i] += weight * x[..., j]
    return np.moveaxis(out, -1, 2 + axis)


@pytest.mark.parametrize("padding", ["replicate", "zeros"])
@pytest.mark.parametrize("shape", [(2, 1, 6, 9), (1, 2, 5, 4, 7)])
def test_filter_axis_equals_brute_force_and_its_gradient_is_the_adjoint(shape, padding):
    taps = [0.1, -0.5, 0.2, 0.7, 0.3]  # asymmetric, so a flipped kernel would be caught
    for axis in range(len(shape) - 2):
        x = _random(shape, seed=axis, dtype=torch.float64).requires_grad_()
        out = filter_axis(x, axis, taps, padding)
        np.testing.assert_allclose(
            out.detach().numpy(), _reference_filter(x.detach().numpy(), axis, taps, padding), atol=1e-12
        )
        assert torch.autograd.gradcheck(lambda v, axis=axis: filter_axis(v, axis, taps, padding), (x,))


def test_filter_axis_rejects_even_kernels_and_unknown_padding():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="odd"):
        filter_axis(x, 0, [0.5, 0.5])
    with pytest.raises(ValueError, match="padding"):
        filter_axis(x, 0, [1.0], "reflect")


# --------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------


def _off_node_field(shape, seed):
    """Displacement with fractional parts in [0.3, 0.7] (away from grid nodes, where linear
    interpolation is not differentiable) that keeps every sample inside the image."""
    ndim = len(shape)
    magnitude = 0.3 + 0.4 * _random((1, ndim, *shape), seed=seed, dtype=torch.float64)
    grid = identity_grid(shape, dtype=torch.float64)
    upper = torch.stack([grid[:, c] >= (shape[c] - 1) / 2 for c in range(ndim)], dim=1)
    return torch.where(upper, -magnitude, magnitude)


@pytest.mark.parametrize("shape", [(5, 6), (4, 5, 4)], ids=["2d", "3d"])
def test_warp_gradcheck_image_and_displacement(shape):
    image = _random((1, 2, *shape), seed=7, dtype=torch.float64).requires_grad_(True)
    u = _off_node_field(shape, seed=8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda img, disp: warp(img, disp), (image, u), eps=1e-6, atol=1e-6)


def test_warp_gradient_wrt_displacement_is_the_image_slope():
    # out(x) = image(x + u) for image = 3 * i (a ramp along the last axis): d out / d u_i = 3
    image = (3.0 * torch.arange(8, dtype=torch.float64)).view(1, 1, 1, 8).expand(1, 1, 5, 8).clone()
    u = torch.full((1, 2, 5, 8), 0.25, dtype=torch.float64)
    u[:, :, :, -2:] = -0.25  # stay inside
    u.requires_grad_(True)
    warp(image, u).sum().backward()
    np.testing.assert_allclose(u.grad[0, 1].numpy(), 3.0, atol=1e-12)
    np.testing.assert_allclose(u.grad[0, 0].numpy(), 0.0, atol=1e-12)


@pytest.mark.parametrize("shape", [(9, 10), (7, 8, 6), (1, 8, 6)], ids=["2d", "3d", "single-slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warp_is_grid_sample_at_identity_plus_u_exactly(shape, dtype):
    # the sampling grid is built per axis without an identity grid; it must be the textbook one:
    # normalised (align_corners=True) identity + u, last axis reversed, bit for bit (values and gradients)
    ndim = len(shape)
    image = _random((2, 1, *shape), seed=21, dtype=dtype)
    u = 3 * (_random((2, ndim, *shape), seed=22, dtype=dtype) - 0.5)
    scale = torch.tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in shape], dtype=dtype).view(1, ndim, *[1] * ndim)
    offset = (scale != 0).to(dtype)

    def reference(img, disp):
        grid = ((identity_grid(shape, dtype=dtype) + disp) * scale - offset).movedim(1, -1).flip(-1)
        return torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)

    ours_u, ref_u = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
    weights = _random((2, 1, *shape), seed=23, dtype=dtype)
    ours, ref = warp(image, ours_u), reference(image, ref_u)
    assert torch.equal(ours, ref)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.equal(ours_u.grad, ref_u.grad)


# --------------------------------------------------------------------------------------
# voxel <-> LPS <-> RAS
# --------------------------------------------------------------------------------------

SPACING = (1.2, 0.8, 2.0)  # SimpleITK order (s_i, s_j, s_k)


def _oblique_direction(synth):
    return synth.rotation_matrix((1.0, 2.0, 3.0), 35.0)


def test_voxel_lps_round_trip_oblique_anisotropic(synth):
    direction = _oblique_direction(synth).ravel()
    u = (2 * _random((3, 4, 5, 6), seed=11, dtype=torch.float64) - 1).numpy() * 3
    d = voxel_to_lps(u, SPACING, direction)
    assert d.shape == (4, 5, 6, 3)
    np.testing.assert_allclose(lps_to_voxel(d, SPACING, direction), u, atol=1e-12)
    # and the other way round
    np.testing.assert_allclose(voxel_to_lps(lps_to_voxel(d, SPACING, direction), SPACING, direction), d, atol=1e-12)


def test_voxel_to_lps_matches_simpleitk_index_to_point(synth):
    direction = _oblique_direction(synth)
    image = sitk.Image(6, 5, 4, sitk.sitkFloat32)
    image.SetSpacing(SPACING)
    image.SetDirection(direction.ravel())
    image.SetOrigin((-12.0, 30.5, 7.25))
    u_kji = np.array([0.4, -1.7, 2.3])  # displacement along (k, j, i)
    d = voxel_to_lps(u_kji.reshape(3, 1, 1, 1), SPACING, direction.ravel())[0, 0, 0]
    index = np.array([2.0, 3.0, 1.0])  # (i, j, k)
    start = np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
    end = np.array(image.TransformContinuousIndexToPhysicalPoint((index + u_kji[::-1]).tolist()))
    np.testing.assert_allclose(d, end - start, atol=1e-12)


def test_voxel_lps_axis_aligned_hand_values():
    # identity direction, spacing (s_i, s_j, s_k) = (1.2, 0.8, 2.0); u (k, j, i) = (1, 2, 3)
    # -> d (x, y, z) = (3 * 1.2, 2 * 0.8, 1 * 2.0) = (3.6, 1.6, 2.0)
    d = voxel_to_lps(np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1), SPACING, np.eye(3).ravel())
    np.testing.assert_allclose(d.reshape(3), [3.6, 1.6, 2.0], atol=1e-12)
    # 2D: spacing (s_i, s_j) = (0.5, 3.0); u (j, i) = (1, 4) -> d (x, y) = (2.0, 3.0)
    d2 = voxel_to_lps(np.array([1.0, 4.0]).reshape(2, 1, 1), (0.5, 3.0), np.eye(2).ravel())
    np.testing.assert_allclose(d2.reshape(2), [2.0, 3.0], atol=1e-12)
    np.testing.assert_allclose(lps_to_voxel(d2, (0.5, 3.0), np.eye(2).ravel()).reshape(2), [1.0, 4.0])


def test_unit_conversion_rejects_wrong_component_counts():
    with pytest.raises(ValueError, match="channels"):
        voxel_to_lps(np.zeros((2, 3, 3, 3)), SPACING, np.eye(3).ravel())
    with pytest.raises(ValueError, match="components"):
        lps_to_voxel(np.zeros((3, 3, 3, 2)), SPACING, np.eye(3).ravel())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_warp_cpu_and_cuda_agree():
    shape = (20, 22, 18)
    image = _random((1, 1, *shape), seed=21)
    u = 3 * (2 * _random((1, 3, *shape), seed=22) - 1)
    cpu = warp(image, u)
    gpu = warp(image.cuda(), u.cuda()).cpu()
    assert float((cpu - gpu).abs().max()) < 1e-4


def test_the_cubic_sampler_gives_the_same_values_and_gradients_slab_by_slab(monkeypatch):
    """The cubic B-spline sampler works through the field in slabs (cache-sized); the values and
    the gradients with respect to the displacement are those of one pass, bit for bit."""
    import cnnreg.spatial as spatial

    torch.manual_seed(0)
    coefficients = torch.rand(1, 2, 11, 12, 13, dtype=torch.float64)
    u = ((torch.rand(1, 3, 11, 12, 13, dtype=torch.float64) - 0.5) * 6).requires_grad_(True)
    whole = spatial.warp_bspline(coefficients, u)
    (whole_grad,) = torch.autograd.grad((whole * whole).sum(), u)
    monkeypatch.setattr(spatial, "_BSPLINE_SLAB_VOXELS", 40)  # slabs of a few rows, one ragged
    slabs = spatial.warp_bspline(coefficients, u)
    (slabs_grad,) = torch.autograd.grad((slabs * slabs).sum(), u)
    torch.testing.assert_close(slabs, whole, rtol=0, atol=0)
    torch.testing.assert_close(slabs_grad, whole_grad, rtol=0, atol=0)
