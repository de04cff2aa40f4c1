"""Instance mode: the displacement field itself is optimised on the pair, coarse to fine (also the
refinement of learned-refine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .field_optimizers import OPTIMIZERS, GreedyFluid
from .pyramid import ProgressCallback, add_update, pyramid_shapes, run_pyramid
from .settings import DENSE_LEARNING_RATES, OptimizationSettings, Optimizer


class DenseField(nn.Module):
    """``u = base + G_sigma * upsample(p)`` with ``p`` optimised directly (``base`` fixed, ``p``
    starts at 0).  ``p`` lives on a control grid of ``control_shape`` (the level's grid when
    None) and is interpolated linearly to the level's grid, like a B-spline control grid."""

    warmup_iterations = 0  # dense-field optimisers start at the full step

    def __init__(self, base: torch.Tensor, smoothing: float, control_shape: Sequence[int] | None = None):
        super().__init__()
        self.register_buffer("base", base.detach().clone())
        shape = tuple(control_shape) if control_shape is not None else tuple(base.shape[2:])
        self.update = nn.Parameter(base.new_zeros((*base.shape[:2], *shape)))
        self.smoothing = smoothing

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return add_update(self.base, self.update, self.smoothing)


def optimize_field(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    settings: OptimizationSettings,
    initial: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    callback: ProgressCallback | None = None,
    levels: int | None = None,
    stage: str = "",
) -> torch.Tensor:
    """Dense-field instance optimisation, coarse to fine.  Returns ``u`` ``(1, ndim, *S)``, voxels.

    ``levels`` overrides ``settings.levels`` (refinement after a learned prediction uses 1).
    """
    shapes = pyramid_shapes(fixed.shape[2:], levels or settings.levels)
    smoothing = 0.0 if settings.optimizer is Optimizer.GREEDY else settings.field_smoothing  # greedy smooths each step

    def make_field(base: torch.Tensor) -> DenseField:
        control = None
        if settings.control_spacing > 1:
            full = fixed.shape[2:]
            control = [min(n, math.ceil(m / settings.control_spacing) + 1) for n, m in zip(base.shape[2:], full)]
        return DenseField(base, smoothing, control)

    learning_rate = settings.learning_rate or DENSE_LEARNING_RATES[settings.optimizer]

    def make_optimizer(field: DenseField) -> torch.optim.Optimizer:
        if settings.optimizer is Optimizer.GREEDY:
            return GreedyFluid(field.parameters(), lr=learning_rate, sigma=settings.field_smoothing)
        return OPTIMIZERS[settings.optimizer](field.parameters(), lr=learning_rate)

    return run_pyramid(
        fixed,
        moving,
        make_field,
        make_optimizer,
        settings,
        shapes,
        initial=initial,
        mask=mask,
        callback=callback,
        learning_rate=learning_rate,
        stage=stage,
    )
