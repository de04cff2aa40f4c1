"""cnnreg.jacobian: det(I + grad u) in closed form, folding, SDlogJ.

Notation: ``u`` is ``(N, ndim, *S)`` in voxels; channel ``c`` is the displacement along tensor
axis ``c``, and the Jacobian entry ``J[c, a] = delta_ca + d u_c / d x_a`` with ``x_a`` the
voxel index along tensor axis ``a``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnreg.jacobian import (
    determinant_map,
    determinant_summary,
    folding_fraction,
    jacobian_determinant,
    jacobian_summary,
    sdlogj,
    spatial_gradient,
)
from cnnreg.spatial import identity_grid

# planted_fold lives in conftest.py (shared with test_regularizers.py); see its docstring for
# the hand-derived determinant values used below.


# --------------------------------------------------------------------------------------
# determinant
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 7), (5, 6, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_identity_has_determinant_exactly_one(shape, scheme):
    det = jacobian_determinant(torch.zeros(1, len(shape), *shape, dtype=torch.float32), scheme)
    expected_shape = shape if scheme == "central" else tuple(n - 1 for n in shape)
    assert det.shape == (1, *expected_shape)
    assert torch.equal(det, torch.ones_like(det))


def test_2d_quadratic_field_closed_form():
    # Let a = x_0 (tensor axis 0), b = x_1 (tensor axis 1), and u_0 = alpha a^2, u_1 = alpha a b.
    #   J = I + [[d u_0/da, d u_0/db], [d u_1/da, d u_1/db]] = [[1 + 2 alpha a, 0], [alpha b, 1 + alpha a]]
    #   det J = (1 + 2 alpha a)(1 + alpha a) - 0 * alpha b = (1 + 2 alpha a)(1 + alpha a)
    # Central differences (second-order one-sided at the edges) are exact for quadratics,
    # so this holds at every voxel, edges included.
    alpha = 0.05
    shape = (9, 11)
    grid = identity_grid(shape, dtype=torch.float64)[0]
    a, b = grid[0], grid[1]
    u = torch.stack([alpha * a**2, alpha * a * b])[None]
    det = jacobian_determinant(u, "central")[0]
    expected = (1 + 2 * alpha * a) * (1 + alpha * a)
    assert float((det - expected).abs().max()) < 1e-12
    # the swapped channel order gives a different determinant: the test sees the convention
    swapped = jacobian_determinant(u.flip(1), "central")[0]
    assert float((swapped - expected).abs().max()) > 0.1
    # forward differences: d(a^2) ~ 2a + 1, d(ab)/db = a, d(ab)/da = b, d(a^2)/db = 0
    #   det = (1 + alpha (2a + 1))(1 + alpha a) on the cropped grid a < 8, b < 10
    forward = jacobian_determinant(u, "forward")[0]
    a_c = a[:-1, :-1]
    np.testing.assert_allclose(forward.numpy(), ((1 + alpha * (2 * a_c + 1)) * (1 + alpha * a_c)).numpy(), atol=1e-12)


def test_3d_linear_field_has_det_of_identity_plus_matrix():
    rng = np.random.default_rng(0)
    matrix = rng.uniform(-0.3, 0.3, (3, 3))  # J = I + A at every voxel for u = A x
    shape = (5, 6, 7)
    grid = identity_grid(shape, dtype=torch.float64)[0]
    u = torch.einsum("ca,a...->c...", torch.from_numpy(matrix), grid)[None]
    expected = float(np.linalg.det(np.eye(3) + matrix))
    for scheme in ("central", "forward"):
        det = jacobian_determinant(u, scheme)
        np.testing.assert_allclose(det.numpy(), expected, atol=1e-12)


def test_3d_bilinear_field_matches_the_analytic_jacobian():
    # u_0 = p x_0 x_1, u_1 = q x_1 x_2, u_2 = r x_2 x_0 (linear along each axis: central
    # differences are exact), J = I + [[p x_1, p x_0, 0], [0, q x_2, q x_1], [r x_2, 0, r x_0]]
    p, q, r = 0.03, -0.04, 0.05
    shape = (5, 6, 7)
    x0, x1, x2 = identity_grid(shape, dtype=torch.float64)[0]
    u = torch.stack([p * x0 * x1, q * x1 * x2, r * x2 * x0])[None]
    jac = np.zeros((*shape, 3, 3))
    jac[..., 0, 0], jac[..., 0, 1] = 1 + p * x1.numpy(), p * x0.numpy()
    jac[..., 1, 1], jac[..., 1, 2] = 1 + q * x2.numpy(), q * x1.numpy()
    jac[..., 2, 0], jac[..., 2, 2] = r * x2.numpy(), 1 + r * x0.numpy()
    np.testing.assert_allclose(jacobian_determinant(u)[0].numpy(), np.linalg.det(jac), atol=1e-12)
    gradient = spatial_gradient(u)  # (N, C, ndim, *S): [0, c, a] = d u_c / d x_a
    np.testing.assert_allclose(gradient[0, 0, 1].numpy(), p * x0.numpy(), atol=1e-12)
    np.testing.assert_allclose(gradient[0, 2, 0].numpy(), r * x2.numpy(), atol=1e-12)


def test_gradient_shapes_and_bad_inputs():
    u = torch.zeros(2, 3, 4, 5, 6)
    assert spatial_gradient(u, "central").shape == (2, 3, 3, 4, 5, 6)
    assert spatial_gradient(u, "forward").shape == (2, 3, 3, 3, 4, 5)
    with pytest.raises(ValueError, match="scheme"):
        spatial_gradient(u, "backward")
    with pytest.raises(ValueError, match="displacement"):
        jacobian_determinant(torch.zeros(1, 2, 4, 5, 6))
    # tiny grids (< 3 voxels along an axis) fall back to first-order edges and still work
    det = jacobian_determinant(torch.zeros(1, 2, 2, 5))
    assert torch.equal(det, torch.ones(1, 2, 5))


# --------------------------------------------------------------------------------------
# folding and SDlogJ
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(14, 12), (14, 12, 5)], ids=["2d", "3d"])
def test_planted_fold_is_found_at_the_expected_voxels(synth, shape):
    u = synth.planted_fold(shape)
    det = jacobian_determinant(u, "central")[0]
    expected = torch.zeros(shape, dtype=torch.bool)
    expected[6:8, 3:7] = True  # see planted_fold: x_0 in {6, 7}, x_1 in [3, 7)
    assert torch.equal(det <= 0, expected)
    np.testing.assert_allclose(det[expected].numpy(), -0.5, atol=1e-12)
    # fraction: 2 * 4 * (rest of the axes) / all voxels = 8 / (14 * 12) in 2D
    assert folding_fraction(det) == pytest.approx(expected.sum().item() / expected.numel(), abs=1e-15)
    assert folding_fraction(det) == pytest.approx(8 / (14 * 12), abs=1e-15)
    assert folding_fraction(jacobian_determinant(torch.zeros_like(u))[0]) == 0.0


def test_folding_fraction_with_mask():
    det = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    assert folding_fraction(det) == 0.5  # det <= 0 counts: -1 and 0
    mask = torch.tensor([[1, 1], [0, 0]])
    assert folding_fraction(det, mask) == 0.5
    assert folding_fraction(det, torch.tensor([[1, 0], [0, 1]])) == 0.0
    assert folding_fraction(det, torch.zeros(2, 2)) == 0.0  # empty mask: no division by zero


def test_sdlogj_hand_values():
    e = float(np.e)
    det = torch.tensor([1.0, e, 1 / e, 1.0], dtype=torch.float64)
    # log det = (0, 1, -1, 0): mean 0, population std sqrt(2 / 4)
    assert sdlogj(det) == pytest.approx(np.sqrt(0.5), abs=1e-12)
    # masked: only (1, e) -> logs (0, 1): std 0.5
    assert sdlogj(det, torch.tensor([1, 1, 0, 0])) == pytest.approx(0.5, abs=1e-12)
    # non-positive determinants are clipped to 1e-9 before the log, not NaN
    assert np.isfinite(sdlogj(torch.tensor([1.0, -2.0, 0.0])))


@pytest.mark.parametrize("ndim", [2, 3])
def test_sdlogj_of_identity_and_uniform_scaling_is_zero(ndim):
    shape = (6, 7, 8)[:ndim]
    assert sdlogj(jacobian_determinant(torch.zeros(1, ndim, *shape, dtype=torch.float64))) == 0.0
    s = 1.2  # x -> s x, u = (s - 1) x, det = s^ndim everywhere
    u = (s - 1) * identity_grid(shape, dtype=torch.float64)
    det = jacobian_determinant(u)
    np.testing.assert_allclose(det.numpy(), s**ndim, atol=1e-12)
    assert sdlogj(det) < 1e-12


def test_jacobian_summary_of_a_uniform_scaling_and_of_a_fold(synth):
    s = 1.1
    u = (s - 1) * identity_grid((6, 7, 8))  # float32 input is promoted to float64 inside
    summary = jacobian_summary(u)
    assert set(summary) == {"folding_fraction", "folding_percent", "min_jacobian", "max_jacobian", "sdlogj"}
    assert summary["folding_fraction"] == 0.0 and summary["folding_percent"] == 0.0
    assert summary["min_jacobian"] == pytest.approx(s**3, abs=1e-6)  # 1.331
    assert summary["max_jacobian"] == pytest.approx(s**3, abs=1e-6)
    assert summary["sdlogj"] < 1e-6
    folded = jacobian_summary(synth.planted_fold((14, 12)))
    assert folded["folding_fraction"] == pytest.approx(8 / 168)
    assert folded["folding_percent"] == pytest.approx(800 / 168)
    assert folded["min_jacobian"] == pytest.approx(-0.5) and folded["max_jacobian"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------
# slab by slab: the same values with small temporaries
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(11, 5, 6), (3, 4, 5), (9, 2, 4), (13, 7)], ids=["3d", "3-rows", "thin", "2d"])
def test_determinant_map_slab_by_slab_equals_the_whole_grid_exactly(shape):
    ndim = len(shape)
    u = 0.7 * torch.randn((1, ndim, *shape), generator=torch.Generator().manual_seed(3))  # float32, folds too
    whole = jacobian_determinant(u.to(torch.float64))
    row = int(np.prod(shape[1:]))
    # every slab height (1 -> at least 2 rows, the remainder slab of 1 row, the whole axis)
    for slab_voxels in [1] + [rows * row for rows in range(2, shape[0] + 1)]:
        det = determinant_map(u, slab_voxels=slab_voxels)
        assert det.dtype == torch.float64 and det.shape == whole.shape
        assert torch.equal(det, whole), slab_voxels
    assert torch.equal(determinant_map(u, dtype=torch.float32), jacobian_determinant(u))


def test_jacobian_summary_is_the_summary_of_the_float64_determinant(synth):
    u = 0.6 * torch.randn((1, 3, 9, 8, 7), generator=torch.Generator().manual_seed(4))
    expected = determinant_summary(jacobian_determinant(u.to(torch.float64)))
    assert jacobian_summary(u) == expected
    assert expected["folding_fraction"] > 0  # the random field folds: the statistics are not trivial
