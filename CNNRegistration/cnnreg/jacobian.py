"""Jacobian of the mapping ``x -> x + u(x)``: determinant map, folding, SDlogJ.

``u`` is ``(N, ndim, *S)`` in voxels (:mod:`cnnreg.settings`).  The determinant of
``I + grad u`` is dimensionless and the same whether computed in voxel or physical units
(the grid's spacing/direction cancel in the similarity transform), so it is computed on
voxel indices.
"""

from __future__ import annotations

import math

import torch


def _check(u: torch.Tensor) -> int:
    ndim = u.dim() - 2
    if ndim not in (2, 3) or u.shape[1] != ndim:
        raise ValueError(f"displacement must be (N, ndim, *spatial), got shape {tuple(u.shape)}")
    return ndim


def spatial_gradient(u: torch.Tensor, scheme: str = "central") -> torch.Tensor:
    """Derivatives of every channel along every spatial axis: ``(N, C, ndim, *S')``.

    ``scheme="central"``: central differences inside, second-order one-sided at the edges
    (exact for quadratics), same size as ``u``.  ``scheme="forward"``: forward differences
    cropped to the common interior ``S' = S - 1`` (cheap; used inside losses).
    """
    ndim = u.dim() - 2
    if scheme == "central":
        edge_order = 2 if min(u.shape[2:]) >= 3 else 1
        grads = torch.gradient(u, dim=tuple(range(2, ndim + 2)), edge_order=edge_order)
        return torch.stack(grads, dim=2)
    if scheme == "forward":
        crop = (slice(None), slice(None)) + (slice(0, -1),) * ndim
        grads = []
        for axis in range(ndim):
            diff = torch.diff(u, dim=2 + axis)
            index = list(crop)
            index[2 + axis] = slice(None)
            grads.append(diff[tuple(index)])
        return torch.stack(grads, dim=2)
    raise ValueError(f"unknown finite-difference scheme {scheme!r}; use 'central' or 'forward'")


def jacobian_determinant(u: torch.Tensor, scheme: str = "central") -> torch.Tensor:
    """``det(I + grad u)``: ``(N, *S)`` for the central scheme, ``(N, *(S-1))`` for forward."""
    ndim = _check(u)
    g = spatial_gradient(u, scheme)
    if ndim == 2:
        return (1 + g[:, 0, 0]) * (1 + g[:, 1, 1]) - g[:, 0, 1] * g[:, 1, 0]
    a, b, c = 1 + g[:, 0, 0], g[:, 0, 1], g[:, 0, 2]
    d, e, f = g[:, 1, 0], 1 + g[:, 1, 1], g[:, 1, 2]
    h, i, k = g[:, 2, 0], g[:, 2, 1], 1 + g[:, 2, 2]
    return a * (e * k - f * i) - b * (d * k - f * h) + c * (d * i - e * h)


def determinant_map(u: torch.Tensor, dtype: torch.dtype = torch.float64, slab_voxels: int = 2**20) -> torch.Tensor:
    """``jacobian_determinant(u.to(dtype))`` (central scheme), computed slab by slab.

    The first spatial axis is cut into slabs of about ``slab_voxels`` voxels; each slab is
    converted to ``dtype`` with one neighbouring row on each side (the central differences
    need them; at the grid's edges the one-sided formulas see the same rows as for the whole
    grid), so every value equals the whole-grid one while the temporaries (the ``ndim^2``
    derivatives in ``dtype``) stay the size of a slab.  ``u``: ``(N, ndim, *S)`` -> ``(N, *S)``.
    """
    _check(u)
    size = u.shape[2]
    rows = max(2, slab_voxels // max(1, math.prod(u.shape[3:])))
    if rows >= size:
        return jacobian_determinant(u.to(dtype))
    det = torch.empty((u.shape[0], *u.shape[2:]), dtype=dtype, device=u.device)
    for start in range(0, size, rows):
        stop = min(start + rows, size)
        low, high = max(0, start - 1), min(size, stop + 1)
        if high - low < 3:  # the one-sided edge formula needs three rows
            low = max(0, high - 3)
            high = min(size, low + 3)
        piece = jacobian_determinant(u[:, :, low:high].to(dtype))
        det[:, start:stop] = piece[:, start - low : stop - low]
    return det


def folding_fraction(determinant: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction (0..1) of voxels with ``det J <= 0`` (within ``mask`` when given)."""
    folded = (determinant <= 0).to(torch.float64)
    if mask is None:
        return float(folded.mean())
    weights = mask.reshape(determinant.shape).to(torch.float64)
    return float((folded * weights).sum() / weights.sum().clamp_min(1))


def sdlogj(determinant: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Standard deviation of ``log(det J)``, with ``det J`` clipped to [1e-9, 1e9]."""
    log_det = torch.log(determinant.to(torch.float64).clamp(1e-9, 1e9))
    if mask is not None:
        log_det = log_det[mask.reshape(determinant.shape) > 0]
    return float(log_det.std(unbiased=False))


def determinant_summary(determinant: torch.Tensor) -> dict:
    """Folding fraction and percent, min/max det J and SDlogJ of a determinant map."""
    fraction = folding_fraction(determinant)
    return {
        "folding_fraction": fraction,
        "folding_percent": 100.0 * fraction,
        "min_jacobian": float(determinant.min()),
        "max_jacobian": float(determinant.max()),
        "sdlogj": sdlogj(determinant),
    }


def jacobian_summary(u: torch.Tensor) -> dict:
    """Folding fraction and percent, min/max det J and SDlogJ of ``u`` ``(1, ndim, *S)``
    (det J in float64, computed slab by slab: :func:`determinant_map`)."""
    return determinant_summary(determinant_map(u.detach()))
