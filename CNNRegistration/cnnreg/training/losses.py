"""Training losses: the unsupervised registration loss of one batch and its terms.

``u`` is a displacement ``(N, ndim, *S)`` in voxels on the fixed grid (:mod:`cnnreg.spatial`);
images and label maps are ``(N, 1, *S)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import similarity_loss, similarity_options
from ..regularizers import negative_jacobian, regularization
from ..spatial import warp
from .settings import TrainSettings


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Label indices ``(N, 1, *S)`` -> one-hot ``(N, classes, *S)`` float."""
    return F.one_hot(labels[:, 0].round().long().clamp(0, classes - 1), classes).movedim(-1, 1).to(torch.float32)


def soft_dice(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean soft Dice ``2 sum(ab) / (sum(a) + sum(b))`` over the foreground channels (1..) present
    in ``a`` or ``b``, per item, then over the batch.  ``a, b``: ``(N, L, *S)`` in [0, 1]."""
    dims = tuple(range(2, a.dim()))
    a, b = a[:, 1:], b[:, 1:]
    overlap = (a * b).sum(dims)
    sizes = a.sum(dims) + b.sum(dims)
    present = (sizes > eps).to(a.dtype)
    dice = 2 * overlap / sizes.clamp_min(eps)
    return ((dice * present).sum(1) / present.sum(1).clamp_min(1)).mean()


def field_error(u: torch.Tensor, true_field: torch.Tensor, foreground: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared vector error ``|u - true_field|^2`` (voxels^2) over ``foreground`` ``(N, 1, *S)``
    (every voxel when None); ``u``, ``true_field``: ``(N, ndim, *S)``."""
    squared = (u - true_field).pow(2).sum(1, keepdim=True)
    if foreground is None:
        return squared.mean()
    return (squared * foreground).sum() / foreground.sum().clamp_min(1.0)


def registration_loss(
    settings: TrainSettings,
    u: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_labels: torch.Tensor | None = None,
    moving_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unsupervised loss of ``u`` ``(N, ndim, *S)`` for the pairs ``(fixed, moving)`` ``(N, 1, *S)``
    (mean over the batch), plus the optional Dice term.  Returns ``(total, terms)``."""
    options = similarity_options(settings.similarity, settings.window)
    sim = similarity_loss(settings.similarity, fixed, warp(moving, u), **options)
    reg = regularization(settings.regularizer, u)
    total = sim + settings.weight * reg
    terms = {"similarity_loss": sim, "regularization": reg}
    if settings.jacobian_weight > 0:
        # FAIM's forward-difference penalty: the recipe the shipped weights were trained with
        negjac = negative_jacobian(u, schemes=("forward",))
        total = total + settings.jacobian_weight * negjac
        terms["negative_jacobian"] = negjac
    if settings.dice_weight > 0 and fixed_labels is not None and moving_labels is not None:
        classes = int(max(fixed_labels.max(), moving_labels.max())) + 1
        dice = soft_dice(one_hot(fixed_labels, classes), warp(one_hot(moving_labels, classes), u))
        total = total + settings.dice_weight * (1 - dice)
        terms["dice"] = dice
    return total, terms
