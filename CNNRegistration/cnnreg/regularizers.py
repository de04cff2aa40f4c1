"""Regularizers of a displacement ``u`` ``(N, ndim, *S)`` in voxels (2D and 3D).

Each returns a scalar mean over voxels and components, so its weight does not depend on
the image size.  Derivatives are finite differences on voxel indices.
"""

from __future__ import annotations

from collections.abc import Callable

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


def negative_jacobian(u: torch.Tensor) -> torch.Tensor:
    """Mean of ``max(0, -det J)`` (equal to FAIM's ``0.5 (|J| - J)``), forward differences.

    Where no voxel folds the penalty and its gradient are exactly 0; that case is detected
    without building the autograd graph of det J (most of the cost of an iteration when no
    voxel folds), and a zero that keeps ``u``'s graph is returned.
    """
    if u.requires_grad and torch.is_grad_enabled():
        with torch.no_grad():
            unfolded = bool((jacobian_determinant(u, scheme="forward") >= 0).all())
        if unfolded:
            return u.sum() * 0.0
    return torch.relu(-jacobian_determinant(u, scheme="forward")).mean()


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
    "bending_energy",
    "diffusion",
    "negative_jacobian",
    "regularization",
    "regularizer_function",
    "total_variation",
]
