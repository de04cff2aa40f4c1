"""Spatial transformer: identity grids, warping, composition, resizing, unit conversion.

All fields follow :mod:`cnnreg.settings`: ``u`` is ``(N, ndim, *spatial)`` in voxels of
the grid it lives on, channel order = spatial tensor axis order, and it pulls:
``warped(x) = moving(x + u(x))``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .settings import Interpolation


def _check_field(u: torch.Tensor) -> int:
    ndim = u.dim() - 2
    if ndim not in (2, 3) or u.shape[1] != ndim:
        raise ValueError(
            f"displacement must be (N, ndim, *spatial) with ndim 2 or 3 channels, got shape {tuple(u.shape)}"
        )
    return ndim


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel: ``(1, ndim, *shape)``, channel ``c`` = index along axis ``c``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def _normalization(shape: Sequence[int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per axis ``scale`` and ``offset`` with ``normalized = voxel * scale - offset`` (align_corners=True)."""
    scale = torch.tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in shape], device=device, dtype=dtype)
    return scale, (scale != 0).to(dtype)


def _sample_points(u: torch.Tensor, axis: int, first: int = 0) -> torch.Tensor:
    """``(N, *S)`` voxel coordinate along ``axis`` of the points ``x + u(x)``, from a broadcast
    index (no identity grid); ``u`` may be a slab of a larger field starting at index ``first``
    of its first spatial axis."""
    ndim = u.shape[1]
    view = [1] * (ndim + 1)
    view[1 + axis] = u.shape[2 + axis]
    start = first if axis == 0 else 0
    index = torch.arange(start, start + u.shape[2 + axis], device=u.device, dtype=u.dtype)
    return u[:, axis] + index.view(view)


def _pad_axis(ndim: int, axis: int, width: int) -> list[int]:
    """``F.pad`` list padding only spatial ``axis`` (of ``ndim``) by ``width`` on both sides
    (``F.pad`` lists the last axis first)."""
    pad = [0, 0] * ndim
    pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = width
    return pad


def _sampling_grid(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``grid_sample`` grid ``(N, *S, ndim)`` in ``[-1, 1]`` of the voxel points ``x + u(x)`` of a
    grid of size ``shape`` (align_corners=True), last axis reversed to ``(x=W, y=H[, z=D])`` as
    ``grid_sample`` expects.  Built one axis at a time from a broadcast index (no identity grid
    and no full-size intermediates besides one component at a time and the result)."""
    scale, offset = _normalization(shape, u.device, u.dtype)
    components = [_sample_points(u, axis) * scale[axis] - offset[axis] for axis in reversed(range(u.shape[1]))]
    return torch.stack(components, dim=-1)


_GRID_SAMPLE_MODES = {Interpolation.LINEAR: "bilinear", Interpolation.NEAREST: "nearest", Interpolation.CUBIC: "cubic"}


def warp(
    image: torch.Tensor,
    u: torch.Tensor,
    interpolation: Interpolation | str = Interpolation.LINEAR,
    padding: str = "border",
) -> torch.Tensor:
    """Pull ``image`` through the displacement ``u``: ``out(x) = image(x + u(x))``.

    Args:
        image: ``(N, C, *S_in)``; may be on a different grid size than ``u`` only if both
            grids share voxel coordinates (rarely what you want; normally ``S_in == S``).
        u: ``(N, ndim, *S)`` displacement in voxels of ``image``'s grid, channel order = axes.
        interpolation: linear, nearest or cubic (:class:`cnnreg.settings.Interpolation`; cubic B-spline: the image
            is prefiltered by :func:`bspline_coefficients` on every call; to sample one image
            many times, prefilter once and call :func:`warp_bspline`).
        padding: ``"border"`` (repeat edge), ``"zeros"`` or ``"reflection"`` outside the image
            (``"cubic"``: ``"border"`` or ``"zeros"``).

    Returns:
        ``(N, C, *S)`` warped image, same dtype as ``image``; ``u == 0`` (not requiring a
        gradient) returns an exact copy.
    """
    ndim = _check_field(u)
    if image.dim() != ndim + 2:
        raise ValueError(f"image {tuple(image.shape)} and displacement {tuple(u.shape)} differ in dimension")
    try:
        mode = _GRID_SAMPLE_MODES[Interpolation(interpolation)]
    except ValueError:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; use one of {[i.value for i in Interpolation]}"
        ) from None
    if not u.requires_grad and image.shape[2:] == u.shape[2:] and not bool(u.any()):
        return image.clone()  # the identity, exactly (grid_sample's float rounding would blur it)
    if mode == "cubic":
        return warp_bspline(bspline_coefficients(image), u, padding)
    grid = _sampling_grid(u, image.shape[2:])
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode=padding, align_corners=True)


# ---------------------------------------------------------------------------------------
# cubic B-spline interpolation
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _bspline_prefilter_matrix(size: int) -> np.ndarray:
    """``(size, size)`` float64 matrix taking samples to cubic B-spline coefficients along one
    axis, mirror boundary (``c[-k] = c[k]``, ``c[n-1+k] = c[n-1-k]``): the inverse of the
    interpolation matrix ``(c[i-1] + 4 c[i] + c[i+1]) / 6``."""
    if size == 1:
        return np.ones((1, 1))
    interpolation = np.zeros((size, size))
    for i in range(size):
        for j, weight in ((i - 1, 1.0), (i, 4.0), (i + 1, 1.0)):
            j = -j if j < 0 else (2 * (size - 1) - j if j > size - 1 else j)  # mirror
            interpolation[i, j] += weight / 6.0
    return np.linalg.inv(interpolation)


def bspline_coefficients(image: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline coefficients ``(N, C, *S)`` of the samples ``image`` ``(N, C, *S)``
    (mirror boundary; exact: :func:`warp_bspline` at ``u = 0`` gives ``image`` back up to
    rounding).  Linear in ``image``, differentiable."""
    for axis in range(image.dim() - 2):
        size = image.shape[2 + axis]
        if size > 1:
            matrix = torch.from_numpy(_bspline_prefilter_matrix(size)).to(image.device, image.dtype)
            image = torch.matmul(image.movedim(2 + axis, -1), matrix.T).movedim(-1, 2 + axis)
    return image


def _cubic_weights(t: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Cubic B-spline weights of the 4 neighbours ``floor(p) - 1 .. floor(p) + 2`` at the
    fractional position ``t`` in ``[0, 1)``, and their derivatives with respect to ``t``."""
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    values = (
        s * s * s / 6.0,
        (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0,
        (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0,
        t3 / 6.0,
    )
    slopes = (-0.5 * s * s, 1.5 * t2 - 2.0 * t, -1.5 * t2 + t + 0.5, 0.5 * t2)
    return values, slopes


_BSPLINE_PAD = 2  # neighbours floor(p) - 1 .. floor(p) + 2 of a clamped p stay in the pad
#: points per slab of the cubic sampler (see _BSplineSample.forward)
_BSPLINE_SLAB_VOXELS = 2**16


def _bspline_stencil(u: torch.Tensor, shape: Sequence[int], padded_shape: Sequence[int], first: int = 0):
    """Per axis: neighbour weights and slopes ``(N, *S)``, whether the point lies inside the
    image along that axis; per channel, the flat index of each point's first neighbour in the
    padded coefficients ``padded_shape`` = ``(N, C, *S_padded)``; the spatial strides.  Points
    outside are clamped to the border (as ``padding="border"``).  ``u`` may be a slab of the
    field from index ``first`` of its first spatial axis."""
    ndim = u.shape[1]
    batch, channels, *spatial = padded_shape
    volume = math.prod(spatial)
    strides = [math.prod(spatial[axis + 1 :]) for axis in range(ndim)]
    weights, slopes, inside, base = [], [], [], None
    for axis in range(ndim):
        position = _sample_points(u, axis, first)
        clamped = position.clamp(0, shape[axis] - 1)
        inside.append(clamped == position)
        floor = clamped.floor()
        values, derivatives = _cubic_weights(clamped - floor)
        weights.append(values)
        slopes.append(derivatives)
        term = (floor.long() + (_BSPLINE_PAD - 1)) * strides[axis]
        base = term if base is None else base + term
    base = base + (torch.arange(batch, device=u.device) * (channels * volume)).view(batch, *[1] * ndim)
    starts = [base + channel * volume for channel in range(channels)]
    return weights, slopes, inside, starts, strides


def _bspline_reduce(flat, index, strides, weights, slopes, with_slopes, axis=0, offset=0):
    """Sum the neighbours of axes ``axis..ndim-1`` (the last, contiguous axis innermost):
    returns the partial value and, if ``with_slopes``, its derivatives along those axes.

    ``flat`` is the padded coefficient volume, flattened; ``index`` the flat index of each
    point's first neighbour; neighbours are read from views of ``flat`` shifted by ``offset``
    (no index arithmetic per neighbour)."""
    value = None
    derivatives = []
    for k in range(4):
        shifted = offset + k * strides[axis]
        if axis == len(strides) - 1:
            # index_select: the same values as take, faster on the CPU (1.3x for a smooth field)
            part = flat.narrow(0, shifted, flat.numel() - shifted).index_select(0, index.reshape(-1)).view(index.shape)
            part_derivatives = []
        else:
            part, part_derivatives = _bspline_reduce(
                flat, index, strides, weights, slopes, with_slopes, axis + 1, shifted
            )
        w = weights[axis][k]
        if value is None:
            value = part * w
            if with_slopes:
                derivatives = [part * slopes[axis][k]] + [d * w for d in part_derivatives]
        else:
            value.addcmul_(part, w)
            if with_slopes:
                derivatives[0].addcmul_(part, slopes[axis][k])
                for total, d in zip(derivatives[1:], part_derivatives):
                    total.addcmul_(d, w)
    return value, derivatives


class _BSplineSample(torch.autograd.Function):
    """Cubic B-spline sampling of padded coefficients at ``x + u(x)``.

    The forward pass gathers the ``4^ndim`` neighbours once and computes the value and its
    exact spatial gradient together; the backward pass to ``u`` is then one product, and the
    one to the coefficients (needed only when they require a gradient) a scatter-add."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, u: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        flat = padded.reshape(-1)
        with_slopes = ctx.needs_input_grad[1]
        # slabs of the first spatial axis, so that the 4^ndim partial sums stay in the CPU's cache
        # (on the whole of a 1 mm head they did not, and an iteration cost 4x its share)
        rows = max(1, _BSPLINE_SLAB_VOXELS // max(1, math.prod(u.shape[3:]) * u.shape[0]))
        value_slabs, gradient_slabs = [], []
        for first in range(0, u.shape[2], rows):
            slab = u[:, :, first : first + rows]
            weights, slopes, inside, starts, strides = _bspline_stencil(slab, shape, padded.shape, first)
            values, gradients = [], []
            for start in starts:
                value, derivatives = _bspline_reduce(flat, start, strides, weights, slopes, with_slopes)
                values.append(value)
                if with_slopes:
                    # clamped along an axis: no gradient along it (as grid_sample's border mode)
                    gradients.append(torch.stack([d * ok for d, ok in zip(derivatives, inside)], dim=1))
            value_slabs.append(torch.stack(values, dim=1))
            if with_slopes:
                gradient_slabs.append(torch.stack(gradients, dim=1))
        gradient = torch.cat(gradient_slabs, dim=3) if with_slopes else None  # (N, C, ndim, *S)
        ctx.save_for_backward(u, gradient)
        ctx.shape, ctx.padded_shape = shape, tuple(padded.shape)
        return torch.cat(value_slabs, dim=2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        u, gradient = ctx.saved_tensors
        grad_padded = grad_u = None
        if ctx.needs_input_grad[1]:
            grad_u = (gradient * grad.unsqueeze(2)).sum(1)
        if ctx.needs_input_grad[0]:
            weights, _, _, starts, strides = _bspline_stencil(u, ctx.shape, ctx.padded_shape)
            flat = grad.new_zeros(math.prod(ctx.padded_shape))
            for channel, start in enumerate(starts):
                for neighbour in itertools.product(range(4), repeat=u.shape[1]):
                    contribution = math.prod(
                        (weights[axis][k] for axis, k in enumerate(neighbour)), start=grad[:, channel]
                    )
                    index = start + sum(k * stride for k, stride in zip(neighbour, strides))
                    flat.index_add_(0, index.reshape(-1), contribution.reshape(-1))
            grad_padded = flat.view(ctx.padded_shape)
        return grad_padded, grad_u, None


def warp_bspline(coefficients: torch.Tensor, u: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Pull an image through ``u`` with cubic B-spline interpolation.

    Args:
        coefficients: ``(N, C, *S)`` from :func:`bspline_coefficients` (``N`` = 1 or ``u``'s).
        u: ``(N, ndim, *S_out)`` displacement in voxels of the coefficients' grid.
        padding: ``"border"`` (points outside are clamped onto the border) or ``"zeros"``.

    Returns:
        ``(N, C, *S_out)``; differentiable with respect to ``u`` (exact: the derivative of the
        cubic spline) and to ``coefficients``.
    """
    return bspline_sampler(coefficients, padding)(u)


def bspline_sampler(coefficients: torch.Tensor, padding: str = "border") -> Callable[[torch.Tensor], torch.Tensor]:
    """``u -> warp_bspline(coefficients, u, padding)`` for sampling one image through many fields:
    the coefficients' mirror extension is made once here (unless they require a gradient)."""
    if padding not in ("border", "zeros"):
        raise ValueError(f"unknown padding {padding!r} for cubic interpolation; use 'border' or 'zeros'")
    shape = tuple(coefficients.shape[2:])
    padded = None if coefficients.requires_grad else _mirror_padded(coefficients)

    def sample(u: torch.Tensor) -> torch.Tensor:
        ndim = _check_field(u)
        if coefficients.dim() != ndim + 2:
            raise ValueError(
                f"coefficients {tuple(coefficients.shape)} and displacement {tuple(u.shape)} differ in dimension"
            )
        extended = padded if padded is not None else _mirror_padded(coefficients)
        if extended.shape[0] != u.shape[0]:
            extended = extended.expand(u.shape[0], *extended.shape[1:]).contiguous()
        out = _BSplineSample.apply(extended, u, shape)
        if padding == "zeros":
            out = out * _inside(u, shape).unsqueeze(1).to(out.dtype)
        return out.to(coefficients.dtype)

    return sample


def _mirror_padded(coefficients: torch.Tensor) -> torch.Tensor:
    """The coefficients ``(N, C, *S)`` extended by the mirror the prefilter assumed, contiguous."""
    padded = coefficients
    ndim = coefficients.dim() - 2
    for axis, size in enumerate(coefficients.shape[2:]):
        # 2 samples mirrored repeat with period 2 (circular); 1 sample is constant
        mode = "reflect" if size > _BSPLINE_PAD else ("circular" if size == 2 else "replicate")
        padded = F.pad(padded, _pad_axis(ndim, axis, _BSPLINE_PAD), mode=mode)
    return padded.contiguous()


def _inside(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(N, *S)`` True where ``x + u(x)`` lies within the grid ``shape`` (voxel centres 0..n-1)."""
    inside = None
    for axis in range(u.shape[1]):
        position = _sample_points(u, axis)
        ok = (position >= 0) & (position <= shape[axis] - 1)
        inside = ok if inside is None else inside & ok
    return inside


def compose(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Field of warping by ``u`` first and then by ``v``: ``w(x) = v(x) + u(x + v(x))``.

    ``warp(warp(m, u), v) ~= warp(m, compose(u, v))``. Shapes ``(N, ndim, *S)``, voxels.
    """
    _check_field(u)
    return v + warp(u, v, padding="border")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement of the flow of a stationary velocity field by scaling and squaring.

    ``u = v / 2^steps``, then ``steps`` times ``u <- u o u`` (:func:`compose`).
    The result is (up to interpolation) a diffeomorphism; integrating ``-v`` gives its inverse.

    Args:
        velocity: ``(N, ndim, *S)`` in voxels of its grid.
        steps: squaring steps (7 -> 128 sub-steps).

    Returns:
        ``(N, ndim, *S)`` displacement in voxels.
    """
    u = velocity / (2**steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def resize_field(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a voxel displacement to another grid covering the same field of view.

    Voxel centres are matched as in ``align_corners=False`` (the pyramid convention used by
    :func:`resize_image`); values are rescaled per axis by ``new_size / old_size`` so the
    physical displacement is kept.  ``u``: ``(N, ndim, *S)`` -> ``(N, ndim, *shape)``.
    """
    ndim = _check_field(u)
    shape = tuple(int(n) for n in shape)
    if tuple(u.shape[2:]) == shape:
        return u
    mode = "trilinear" if ndim == 3 else "bilinear"
    resized = F.interpolate(u, size=shape, mode=mode, align_corners=False)
    factors = torch.tensor([new / old for new, old in zip(shape, u.shape[2:])], device=u.device, dtype=u.dtype)
    return resized * factors.view(1, ndim, *([1] * ndim))


def gaussian_kernel1d(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1D Gaussian of standard deviation ``sigma`` voxels, radius ``ceil(3 sigma)``."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _correlate_valid(padded: torch.Tensor, dim: int, taps: Sequence[float], size: int) -> torch.Tensor:
    """``out[i] = sum_t taps[t] padded[i + t]`` along ``dim`` for ``i < size`` (no autograd)."""
    out = padded.narrow(dim, 0, size) * taps[0]
    for shift in range(1, len(taps)):
        out.add_(padded.narrow(dim, shift, size), alpha=taps[shift])
    return out


class _AxisFilter(torch.autograd.Function):
    """Pad (replicate or zeros) and correlate along one axis; the backward pass is the exact
    adjoint, written with the same in-place shifted sums (no per-tap autograd nodes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, taps: tuple[float, ...], replicate: bool) -> torch.Tensor:
        pad = _pad_axis(x.dim() - 2, dim - 2, len(taps) // 2)
        padded = F.pad(x, pad, mode="replicate") if replicate else F.pad(x, pad)
        ctx.dim, ctx.taps, ctx.replicate = dim, taps, replicate
        return _correlate_valid(padded, dim, taps, x.shape[dim])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        dim, taps = ctx.dim, ctx.taps
        radius = len(taps) // 2
        size = grad.shape[dim]
        grad_padded = grad.new_zeros((*grad.shape[:dim], size + 2 * radius, *grad.shape[dim + 1 :]))
        for shift, weight in enumerate(taps):  # adjoint of the valid correlation
            grad_padded.narrow(dim, shift, size).add_(grad, alpha=weight)
        grad_x = grad_padded.narrow(dim, radius, size).clone()
        if ctx.replicate and radius > 0:  # adjoint of edge replication: fold the pads back
            grad_x.narrow(dim, 0, 1).add_(grad_padded.narrow(dim, 0, radius).sum(dim, keepdim=True))
            grad_x.narrow(dim, size - 1, 1).add_(grad_padded.narrow(dim, size + radius, radius).sum(dim, keepdim=True))
        return grad_x, None, None, None


def filter_axis(x: torch.Tensor, axis: int, taps: Sequence[float], padding: str = "replicate") -> torch.Tensor:
    """Correlate every channel of ``x`` ``(N, C, *S)`` along spatial ``axis`` with the odd-length
    1D kernel ``taps`` (centred), padding by ``"replicate"`` or ``"zeros"``.  Same shape out.

    Written as in-place weighted sums of shifted views with a hand-written adjoint: on CPU
    several times faster than a grouped (depthwise) convolution, above all backwards.
    """
    taps = tuple(float(t) for t in taps)
    if len(taps) % 2 == 0:
        raise ValueError(f"filter_axis needs an odd number of taps, got {len(taps)}")
    if padding not in ("replicate", "zeros"):
        raise ValueError(f"unknown padding {padding!r}")
    return _AxisFilter.apply(x, 2 + axis, taps, padding == "replicate")


def gaussian_smooth(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of every channel of ``x`` ``(N, C, *S)``; ``sigma`` in voxels
    (one value or one per axis; 0 skips an axis).  Edges are replicated."""
    ndim = x.dim() - 2
    sigmas = [float(sigma)] * ndim if np.isscalar(sigma) else [float(s) for s in sigma]
    for axis, s in enumerate(sigmas):
        if s > 0:
            x = filter_axis(x, axis, gaussian_kernel1d(s, dtype=torch.float64).tolist(), "replicate")
    return x


def resize_image(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample ``image`` ``(N, C, *S)`` to ``shape`` (same field of view, ``align_corners=False``),
    with Gaussian anti-aliasing (sigma = 0.5 x factor voxels) when shrinking."""
    ndim = image.dim() - 2
    shape = tuple(int(n) for n in shape)
    if tuple(image.shape[2:]) == shape:
        return image
    factors = [old / new for old, new in zip(image.shape[2:], shape)]
    sigmas = [0.5 * f if f > 1 else 0.0 for f in factors]
    if any(s > 0 for s in sigmas):
        image = gaussian_smooth(image, sigmas)
    mode = "trilinear" if ndim == 3 else "bilinear"
    return F.interpolate(image, size=shape, mode=mode, align_corners=False)


# ---------------------------------------------------------------------------------------
# Unit conversion at the boundaries (numpy, one image at a time)
# ---------------------------------------------------------------------------------------


def voxel_to_lps(u: np.ndarray, spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """Voxel displacement ``(ndim, *S)`` in axis order ``(k, j, i)`` -> LPS millimetres ``(*S, ndim)``
    in world order ``(x, y, z)``: ``d = R @ diag(spacing) @ u_ijk``.

    ``spacing`` is SimpleITK's ``(s_i, s_j, s_k)``; ``direction`` its flat row-major matrix.
    """
    ndim = len(spacing)
    if u.shape[0] != ndim:
        raise ValueError(f"displacement has {u.shape[0]} channels but the image is {ndim}D")
    matrix = np.asarray(direction, dtype=np.float64).reshape(ndim, ndim) @ np.diag(np.asarray(spacing, float))
    u_ijk = np.moveaxis(np.asarray(u, dtype=np.float64)[::-1], 0, -1)  # (*S, ndim) in (i, j, k)
    return u_ijk @ matrix.T


def lps_to_voxel(d: np.ndarray, spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """Inverse of :func:`voxel_to_lps`: LPS millimetres ``(*S, ndim)`` -> voxels ``(ndim, *S)``, ``(k, j, i)``."""
    ndim = len(spacing)
    if d.shape[-1] != ndim:
        raise ValueError(f"vectors have {d.shape[-1]} components but the image is {ndim}D")
    matrix = np.asarray(direction, dtype=np.float64).reshape(ndim, ndim) @ np.diag(np.asarray(spacing, float))
    u_ijk = np.asarray(d, dtype=np.float64) @ np.linalg.inv(matrix).T
    return np.moveaxis(u_ijk, -1, 0)[::-1].copy()
