"""Regularizers of a displacement ``u`` ``(N, ndim, *S)`` in voxels (2D and 3D).

Each returns a scalar mean over voxels and components, so its weight does not depend on
the image size.  Derivatives are finite differences on voxel indices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .jacobian import jacobian_determinant
from .settings import Regularizer, as_choice


def diffusion(u: torch.Tensor) -> torch.Tensor:
    """Gradient L2: ``sum over axes of mean((du/dx)^2)`` (forward differences)."""
    ndim = u.dim() - 2
    return sum(torch.diff(u, dim=2 + axis).pow(2).mean() for axis in range(ndim))


def total_variation(u: torch.Tensor) -> torch.Tensor:
    """Gradient L1 (anisotropic TV): ``sum over axes of mean(|du/dx|)``."""
    ndim = u.dim() - 2
    return sum(torch.diff(u, dim=2 + axis).abs().mean() for axis in range(ndim))


def bending_energy(u: torch.Tensor) -> torch.Tensor:
    """``mean(sum_a d2u/dx_a^2 ^2 + 2 sum_{a<b} d2u/dx_a dx_b ^2)``; exactly 0 for affine ``u``."""
    ndim = u.dim() - 2
    energy = u.new_zeros(())
    for a in range(ndim):
        energy = energy + torch.diff(u, n=2, dim=2 + a).pow(2).mean()
        for b in range(a + 1, ndim):
            mixed = torch.diff(torch.diff(u, dim=2 + a), dim=2 + b)
            energy = energy + 2 * mixed.pow(2).mean()
    return energy


#: the difference schemes of :func:`negative_jacobian`'s ``det J`` by default
JACOBIAN_PENALTY_SCHEMES = ("forward", "central")


def negative_jacobian(u: torch.Tensor, schemes: Sequence[str] = JACOBIAN_PENALTY_SCHEMES) -> torch.Tensor:
    """Sum over ``schemes`` of the mean of ``max(0, -det J)`` (FAIM's ``0.5 (|J| - J)``).

    ``det J`` by forward differences (``("forward",)``: FAIM's penalty) sees folds between
    neighbouring voxels; by central differences it is the determinant that the folding % and
    the Jacobian volume report, and it can be <= 0 where the forward one is not (and is blind
    to the two-voxel checkerboard that forward differences see), so by default both are
    penalised.  Where no voxel folds in any scheme the penalty and its gradient are exactly 0;
    that case is detected without building the autograd graph of det J (most of the cost of
    an iteration when no voxel folds), and a zero that keeps ``u``'s graph is returned.
    """
    if u.requires_grad and torch.is_grad_enabled():
        with torch.no_grad():
            schemes = [s for s in schemes if not bool((jacobian_determinant(u, scheme=s) > 0).all())]
        if not schemes:
            return u.sum() * 0.0
    return sum(torch.relu(-jacobian_determinant(u, scheme=s)).mean() for s in schemes)


_REGULARIZERS = {
    Regularizer.DIFFUSION: diffusion,
    Regularizer.TOTAL_VARIATION: total_variation,
    Regularizer.BENDING: bending_energy,
    Regularizer.NEGATIVE_JACOBIAN: negative_jacobian,
}


def regularizer_function(name: Regularizer | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The named regularizer as a function of ``u`` (unweighted); InputError for unknown names."""
    return _REGULARIZERS[as_choice(name, Regularizer, "regularizer")]


def regularization(name: Regularizer | str, u: torch.Tensor) -> torch.Tensor:
    """The named regularizer of ``u`` (unweighted)."""
    return regularizer_function(name)(u)


__all__ = [
    "JACOBIAN_PENALTY_SCHEMES",
    "bending_energy",
    "diffusion",
    "negative_jacobian",
    "regularization",
    "regularizer_function",
    "total_variation",
]
