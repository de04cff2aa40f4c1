"""cnnreg.regularizers: hand values on linear, quadratic and folded fields; gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnreg.errors import InputError
from cnnreg.jacobian import jacobian_determinant
from cnnreg.regularizers import bending_energy, diffusion, negative_jacobian, regularization, total_variation
from cnnreg.settings import Regularizer
from cnnreg.spatial import identity_grid


def linear_field(matrix, shape):
    """``u_c(x) = sum_a A[c, a] x_a`` (voxels): every forward difference along axis a of channel c is A[c, a]."""
    grid = identity_grid(shape, dtype=torch.float64)[0]
    return torch.einsum("ca,a...->c...", torch.as_tensor(matrix, dtype=torch.float64), grid)[None]


def random_field(shape, seed=0):
    return torch.randn(1, len(shape), *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


A2 = [[0.1, 0.2], [0.3, -0.4]]
A3 = [[0.1, -0.2, 0.05], [0.0, 0.3, -0.1], [0.25, 0.15, -0.05]]


@pytest.mark.parametrize("matrix, shape", [(A2, (7, 8)), (A3, (5, 6, 7))], ids=["2d", "3d"])
def test_bending_energy_of_an_affine_field_is_zero(matrix, shape):
    u = linear_field(matrix, shape) + torch.tensor([1.5, -2.0, 0.5][: len(shape)], dtype=torch.float64).view(
        1, -1, *([1] * len(shape))
    )
    assert float(bending_energy(u)) < 1e-10
    assert float(bending_energy(u)) >= 0.0


def test_bending_energy_hand_values_2d():
    alpha = 0.3
    x0, x1 = identity_grid((6, 7), dtype=torch.float64)[0]
    zero = torch.zeros_like(x0)
    # u_0 = alpha x_0^2: second difference along axis 0 is 2 alpha for channel 0, 0 for channel 1;
    # the mean over the 2 channels of (2 alpha)^2 and 0 is 2 alpha^2; no mixed term.
    quadratic = torch.stack([alpha * x0**2, zero])[None]
    assert float(bending_energy(quadratic)) == pytest.approx(2 * alpha**2, abs=1e-12)
    # u_0 = alpha x_0 x_1: only the mixed difference, alpha on channel 0 -> 2 * mean(alpha^2, 0) = alpha^2
    mixed = torch.stack([alpha * x0 * x1, zero])[None]
    assert float(bending_energy(mixed)) == pytest.approx(alpha**2, abs=1e-12)


@pytest.mark.parametrize("matrix, shape", [(A2, (7, 8)), (A3, (5, 6, 7))], ids=["2d", "3d"])
def test_diffusion_and_tv_of_a_linear_field(matrix, shape):
    u = linear_field(matrix, shape)
    a = np.asarray(matrix)
    ndim = len(shape)
    # diffusion = sum over axes a of mean over channels c of A[c, a]^2 = ||A||_F^2 / ndim
    #   2D: (0.01 + 0.04 + 0.09 + 0.16) / 2 = 0.15
    # TV = sum over axes of mean over channels of |A[c, a]| = sum |A| / ndim
    #   2D: (0.1 + 0.2 + 0.3 + 0.4) / 2 = 0.5
    assert float(diffusion(u)) == pytest.approx((a**2).sum() / ndim, abs=1e-12)
    assert float(total_variation(u)) == pytest.approx(np.abs(a).sum() / ndim, abs=1e-12)
    if ndim == 2:
        assert float(diffusion(u)) == pytest.approx(0.15, abs=1e-12)
        assert float(total_variation(u)) == pytest.approx(0.5, abs=1e-12)


def test_constant_field_costs_nothing():
    u = torch.full((1, 3, 5, 6, 7), 2.5, dtype=torch.float64)
    for name in Regularizer:
        assert float(regularization(name, u)) == 0.0


@pytest.mark.parametrize("shape", [(14, 12), (14, 12, 5)], ids=["2d", "3d"])
def test_negative_jacobian_identity_and_planted_fold(synth, shape):
    assert float(negative_jacobian(torch.zeros(1, len(shape), *shape))) == 0.0
    u = synth.planted_fold(shape)
    # forward differences: det = -0.5 at x_0 in {5, 6, 7}, x_1 in [3, 7) (4 columns), on the
    # cropped grid (S - 1); mean of max(0, -det) = 0.5 * 3 * 4 * (rest) / prod(S - 1)
    cropped = [n - 1 for n in shape]
    rest = int(np.prod(cropped[2:])) if len(shape) == 3 else 1
    expected = 0.5 * 3 * 4 * rest / np.prod(cropped)
    assert float(negative_jacobian(u, schemes=("forward",))) == pytest.approx(expected, abs=1e-12)


def test_negative_jacobian_equals_faim_form():
    u = 1.5 * random_field((9, 10, 8), seed=3)  # rough: many folds
    det = jacobian_determinant(u, "forward")
    faim = (0.5 * (det.abs() - det)).mean()
    assert float(negative_jacobian(u, schemes=("forward",))) == pytest.approx(float(faim), rel=1e-12)
    assert float(negative_jacobian(u, schemes=("forward",))) > 0


@pytest.mark.parametrize("shape", [(12, 11), (9, 10, 8)], ids=["2d", "3d"])
def test_negative_jacobian_default_adds_the_central_scheme_the_folding_metric_uses(shape):
    u = 1.2 * random_field(shape, seed=7)
    forward, central = (torch.relu(-jacobian_determinant(u, s)).mean() for s in ("forward", "central"))
    assert float(central) > 0  # this field folds in the reported (central) determinant too
    assert float(negative_jacobian(u)) == pytest.approx(float(forward + central), rel=1e-12)
    v = u.clone().requires_grad_(True)  # with a gradient: the same value (no scheme skipped)
    assert float(negative_jacobian(v).detach()) == pytest.approx(float(forward + central), rel=1e-12)
    negative_jacobian(v).backward()
    assert float(v.grad.abs().max()) > 0
    # a two-voxel checkerboard u_0 = 0.8 (-1)^i on rows 2 .. S_0 - 3 (0 elsewhere): forward
    # du/dx = -1.6 where i is even and i + 1 patterned (det -0.6), central du/dx = 0 inside the
    # pattern and +-0.4 next to it (det >= 0.6): only the forward scheme is charged
    rows = torch.arange(shape[0], dtype=torch.float64)
    pattern = torch.where((rows >= 2) & (rows <= shape[0] - 3), 0.8 * (-1.0) ** rows, torch.zeros_like(rows))
    checker = torch.zeros(1, len(shape), *shape, dtype=torch.float64)
    checker[0, 0] = pattern.view(-1, *[1] * (len(shape) - 1))
    assert float(jacobian_determinant(checker, "central").min()) > 0.5
    folded_rows = sum(1 for i in range(2, shape[0] - 3) if i % 2 == 0)
    charged = float(negative_jacobian(checker.requires_grad_(True)).detach())
    assert folded_rows > 0 and charged == pytest.approx(0.6 * folded_rows / (shape[0] - 1), rel=1e-12)
    smooth = (0.05 * random_field(shape, seed=8)).requires_grad_(True)  # no fold in either scheme
    value = negative_jacobian(smooth)
    assert float(value.detach()) == 0.0 and value.requires_grad


@pytest.mark.parametrize("name", [r.value for r in Regularizer])
@pytest.mark.parametrize("shape", [(8, 9), (6, 7, 5)], ids=["2d", "3d"])
def test_gradients_flow(name, shape):
    scale = 1.5 if name == Regularizer.NEGATIVE_JACOBIAN.value else 0.5  # negjac needs folds
    u = (scale * random_field(shape, seed=4)).requires_grad_(True)
    value = regularization(name, u)
    assert value.dim() == 0 and float(value.detach()) > 0
    value.backward()
    assert u.grad is not None and torch.isfinite(u.grad).all() and float(u.grad.abs().max()) > 0


def test_diffusion_gradient_hand_value():
    # u (1, 2, 2, 3): channel 0 zero, channel 1 = (0, 1, 0) on both rows.
    # axis 0: all differences 0.  axis 1: differences (1, -1) per row on channel 1, 0 on channel 0:
    #   mean over 1 x 2 x 2 x 2 = 8 entries of squares = (1 + 1 + 1 + 1) / 8 = 0.5
    row = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    u = torch.stack([torch.zeros(2, 3, dtype=torch.float64), row.expand(2, 3)])[None].requires_grad_(True)
    value = diffusion(u)
    assert float(value.detach()) == pytest.approx(0.5, abs=1e-12)
    value.backward()
    # d/du at the peak: (2 (1 - 0) - 2 (0 - 1)) / 8 = 0.5; at the first entry: -2 (1 - 0) / 8 = -0.25
    assert float(u.grad[0, 1, 0, 1]) == pytest.approx(0.5, abs=1e-12)
    assert float(u.grad[0, 1, 1, 0]) == pytest.approx(-0.25, abs=1e-12)
    assert float(u.grad[0, 0].abs().max()) == 0.0


def test_regularization_dispatch_and_unknown_name():
    u = random_field((6, 7), seed=5)
    assert float(regularization("diffusion", u)) == float(diffusion(u))
    assert float(regularization("tv", u)) == float(total_variation(u))
    assert float(regularization(Regularizer.BENDING, u)) == float(bending_energy(u))
    assert float(regularization("negjac", u)) == float(negative_jacobian(u))
    with pytest.raises(InputError, match="unknown regularizer 'l2'") as error:
        regularization("l2", u)
    assert "diffusion" in str(error.value)
