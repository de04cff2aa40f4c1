"""Image similarity measures (2D and 3D) and their losses.

Every ``*_similarity`` function takes ``fixed`` and ``warped`` of shape ``(N, 1, *S)``
(intensities normalised, typically to [0, 1]) and an optional ``mask`` ``(N, 1, *S)`` of
weights, and returns a scalar tensor in the measure's natural units (higher = more
similar, except MSE).  :func:`similarity_loss` turns a named measure into a loss to
minimise; :func:`similarity_value` reports the natural value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import InputError
from .settings import Similarity, as_choice
from .spatial import filter_axis, gaussian_smooth


def _weighted_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    weights = mask.expand_as(x)
    return (x * weights).sum() / weights.sum().clamp_min(1e-12)


def box_filter(x: torch.Tensor, window: int) -> torch.Tensor:
    """Local mean over a ``window``-wide box (odd) around every voxel, taken over the voxels
    inside the image only (near the border the box is clipped, not zero-padded).  Separable:
    one 1D box sum per axis (zero padding), divided by the in-image voxel count.
    ``x``: ``(N, C, *S)`` -> same shape."""
    ndim = x.dim() - 2
    radius = window // 2
    for axis in range(ndim):
        size = x.shape[2 + axis]
        index = torch.arange(size, device=x.device)
        count = torch.clamp(index + radius, max=size - 1) - torch.clamp(index - radius, min=0) + 1
        shape = [1] * x.dim()
        shape[2 + axis] = size
        x = filter_axis(x, axis, [1.0] * window, "zeros") / count.to(x.dtype).view(shape)
    return x


def lncc_fixed_means(fixed: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed image's local means of ``f`` and ``f^2`` over the LNCC box, ``(N, 1, *S)`` each."""
    return tuple(box_filter(torch.cat([fixed, fixed * fixed], dim=1), window).split(1, dim=1))


def lncc_similarity(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: torch.Tensor | None = None,
    window: int = 9,
    eps: float = 1e-5,
    fixed_means: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Local normalised cross-correlation, squared (VoxelMorph/FAIM form), averaged over voxels.

    ``cc(x) = cov(x)^2 / (var_f(x) var_w(x) + eps')`` over a ``window``-wide box around ``x``
    (``window`` voxels per axis, odd), with ``eps`` stated, as in those methods, for window
    *sums*: ``eps' = eps / window^(2 ndim)`` for the window means used here (a larger value
    would mute low-contrast texture).  Range [0, 1]; 1 = locally linearly related.
    ``fixed_means``: :func:`lncc_fixed_means` of ``fixed`` when already computed (an optimisation
    loop's fixed image does not change; the same numbers, two box filters fewer per call).
    """
    if window < 1 or window % 2 == 0:
        raise InputError(f"LNCC window must be a positive odd number of voxels, got {window}")
    ndim = fixed.dim() - 2
    mean_f, mean_ff = lncc_fixed_means(fixed, window) if fixed_means is None else fixed_means
    stacked = torch.cat([warped, warped * warped, fixed * warped], dim=1)
    mean_w, mean_ww, mean_fw = box_filter(stacked, window).split(1, dim=1)
    covariance = mean_fw - mean_f * mean_w
    variance_f = (mean_ff - mean_f * mean_f).clamp_min(0)
    variance_w = (mean_ww - mean_w * mean_w).clamp_min(0)
    cc = covariance * covariance / (variance_f * variance_w + eps / window ** (2 * ndim))
    return _weighted_mean(cc, mask)


def mse_similarity(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared intensity difference (lower = more similar)."""
    return _weighted_mean((fixed - warped) ** 2, mask)


def pcc_similarity(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Global Pearson correlation coefficient in [-1, 1] (per batch item, then averaged)."""
    weights = torch.ones_like(fixed) if mask is None else mask.expand_as(fixed)
    dims = tuple(range(1, fixed.dim()))
    total = weights.sum(dims, keepdim=True).clamp_min(1e-12)
    mean_f = (fixed * weights).sum(dims, keepdim=True) / total
    mean_w = (warped * weights).sum(dims, keepdim=True) / total
    df, dw = fixed - mean_f, warped - mean_w
    covariance = (weights * df * dw).sum(dims)
    variance = (weights * df * df).sum(dims) * (weights * dw * dw).sum(dims)
    return (covariance / torch.sqrt(variance + 1e-12)).mean()


def ssim_similarity(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: torch.Tensor | None = None,
    sigma: float = 1.5,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window of ``sigma`` voxels,
    constants ``(0.01 L)^2`` and ``(0.03 L)^2`` for data range ``L``; mean over voxels, <= 1."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    stacked = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    mean_f, mean_w, mean_ff, mean_ww, mean_fw = gaussian_smooth(stacked, sigma).split(1, dim=1)
    variance_f = mean_ff - mean_f**2
    variance_w = mean_ww - mean_w**2
    covariance = mean_fw - mean_f * mean_w
    ssim = ((2 * mean_f * mean_w + c1) * (2 * covariance + c2)) / (
        (mean_f**2 + mean_w**2 + c1) * (variance_f + variance_w + c2)
    )
    return _weighted_mean(ssim, mask)


def mutual_information(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: torch.Tensor | None = None,
    bins: int = 32,
    max_samples: int = 2**18,
) -> torch.Tensor:
    """Mutual information (nats) from a Parzen-window joint histogram with Gaussian kernels.

    Each image is rescaled to [0, 1] by its own (constant) range, ``bins`` kernel centres
    are spaced evenly with sigma = half the bin spacing.  Above ``max_samples`` voxels a
    random subset is used (the torch global generator, so ``--seed`` makes it repeatable).
    """
    f = fixed.reshape(-1)
    w = warped.reshape(-1)
    weights = None if mask is None else mask.expand_as(fixed).reshape(-1)
    if f.numel() > max_samples:
        index = torch.randint(0, f.numel(), (max_samples,), device=f.device)
        f, w = f[index], w[index]
        weights = None if weights is None else weights[index]

    def scaled(x: torch.Tensor) -> torch.Tensor:
        low, high = x.detach().min(), x.detach().max()
        return (x - low) / (high - low).clamp_min(1e-12)

    centres = torch.linspace(0, 1, bins, device=f.device, dtype=f.dtype)
    sigma = 0.5 / (bins - 1)

    def parzen(x: torch.Tensor) -> torch.Tensor:
        p = torch.exp(-0.5 * ((scaled(x)[:, None] - centres[None, :]) / sigma) ** 2)
        return p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)

    pf, pw = parzen(f), parzen(w)
    if weights is not None:
        pf = pf * weights[:, None]
    joint = pf.t() @ pw
    joint = joint / joint.sum().clamp_min(1e-12)
    marginal_f = joint.sum(dim=1, keepdim=True)
    marginal_w = joint.sum(dim=0, keepdim=True)
    ratio = joint / (marginal_f * marginal_w).clamp_min(1e-12)
    return (joint * torch.log(ratio.clamp_min(1e-12))).sum()


def pcc_ssim_similarity(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Equal-weight combination ``0.5 PCC + 0.5 SSIM`` (Chen et al. 2020's weighted loss)."""
    return 0.5 * pcc_similarity(fixed, warped, mask) + 0.5 * ssim_similarity(fixed, warped, mask)


# measure -> (function, loss from value); loss is minimised, value is reported
_MEASURES: dict[Similarity, tuple[Callable[..., torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    Similarity.LNCC: (lncc_similarity, lambda v: 1 - v),
    Similarity.MSE: (mse_similarity, lambda v: v),
    Similarity.PCC: (pcc_similarity, lambda v: 1 - v),
    Similarity.SSIM: (ssim_similarity, lambda v: 1 - v),
    Similarity.MI: (mutual_information, lambda v: -v),
    Similarity.PCC_SSIM: (pcc_ssim_similarity, lambda v: 1 - v),
}


def _measure(name: Similarity | str):
    return _MEASURES[as_choice(name, Similarity, "similarity")]


def similarity_value(
    name: Similarity | str, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None, **options
) -> torch.Tensor:
    """The named measure in its natural units (see the module docstring)."""
    function, _ = _measure(name)
    return function(fixed, warped, mask, **options)


def similarity_gain(name: Similarity | str, before: float, after: float) -> float:
    """How much more similar ``after`` is than ``before`` (natural values of the named measure),
    as the decrease of its loss: > 0 when the images became more similar, for every measure
    (MSE falls, the others rise)."""
    _, to_loss = _measure(name)
    return float(to_loss(before)) - float(to_loss(after))


def similarity_loss(
    name: Similarity | str, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None, **options
) -> torch.Tensor:
    """The named measure as a loss to minimise: ``1 - value`` for LNCC/PCC/SSIM/PCC+SSIM,
    ``value`` for MSE and ``-value`` for MI."""
    function, to_loss = _measure(name)
    return to_loss(function(fixed, warped, mask, **options))


def similarity_options(name: Similarity | str, window: int) -> dict:
    """Keyword options a measure understands from the generic settings (the LNCC window)."""
    return {"window": window} if as_choice(name, Similarity, "similarity") is Similarity.LNCC else {}


def similarity_loss_function(
    name: Similarity | str, window: int
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``(fixed, warped, mask) -> loss`` of the named measure (:func:`similarity_loss`), looked up
    once: for loops that evaluate it every iteration."""
    function, to_loss = _measure(name)
    options = similarity_options(name, window)
    if function is not lncc_similarity:
        return lambda fixed, warped, mask=None: to_loss(function(fixed, warped, mask, **options))
    kept: dict = {}  # the last fixed image (held, so that its identity is its content) and its means

    def lncc_loss(fixed, warped, mask=None):
        if fixed.requires_grad:
            return to_loss(lncc_similarity(fixed, warped, mask, **options))
        if kept.get("fixed") is not fixed or kept.get("version") != fixed._version:
            with torch.no_grad():
                kept.update(fixed=fixed, version=fixed._version, means=lncc_fixed_means(fixed, window))
        return to_loss(lncc_similarity(fixed, warped, mask, fixed_means=kept["means"], **options))

    return lncc_loss
