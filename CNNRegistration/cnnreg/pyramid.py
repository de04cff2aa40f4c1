"""The coarse-to-fine loop both per-pair algorithms run (:func:`run_pyramid`): level grids, the
loss of a level, the learning-rate schedule, the convergence check, progress events.

Images are ``(1, 1, *S)`` float tensors, normalised; fields ``(1, ndim, *S)`` in voxels of the
fixed grid (:mod:`cnnreg.settings`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn

from .device import reuse_freed_memory
from .field_optimizers import set_learning_rate_factor
from .losses import similarity_loss_function
from .regularizers import negative_jacobian, regularizer_function
from .settings import Interpolation, Mode, OptimizationSettings
from .spatial import bspline_coefficients, bspline_sampler, gaussian_smooth, resize_field, resize_image, warp

ProgressCallback = Callable[[dict], None]


def pyramid_shapes(shape: Sequence[int], levels: int, min_size: int = 16) -> list[tuple[int, ...]]:
    """Grid sizes from coarse to fine, halving per level; a level is skipped when any axis
    would fall below ``min_size`` voxels (axes already smaller are kept as they are)."""
    shapes = [tuple(int(n) for n in shape)]
    for _ in range(levels - 1):
        smaller = tuple(max(1, math.ceil(n / 2)) if n >= 2 * min_size else n for n in shapes[0])
        if smaller == shapes[0]:
            break
        shapes.insert(0, smaller)
    return shapes


def capped_shape(shape: Sequence[int], max_voxels: int) -> tuple[int, ...]:
    """Uniformly shrunk copy of ``shape`` with at most ``max_voxels`` voxels."""
    voxels = math.prod(shape)
    if voxels <= max_voxels:
        return tuple(shape)
    factor = (max_voxels / voxels) ** (1.0 / len(shape))
    return tuple(max(2, int(n * factor)) for n in shape)


def moving_sampler(
    settings: OptimizationSettings, moving: torch.Tensor, mode: Mode = Mode.INSTANCE
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``u -> moving(x + u(x))`` with the settings' interpolation (or ``mode``'s default);
    ``moving`` ``(N, C, *S)`` is prefiltered once here for the cubic B-spline."""
    if settings.interpolation_for(mode) is Interpolation.CUBIC:
        return bspline_sampler(bspline_coefficients(moving))
    return lambda u: warp(moving, u)


def add_update(base: torch.Tensor, update: torch.Tensor, smoothing: float) -> torch.Tensor:
    """A level's field: ``base + G_smoothing * resize(update)``, with ``base`` ``(1, ndim, *S)``
    the level's starting field and ``update`` ``(1, ndim, *S_any)`` over the same field of view
    (voxels of its own grid, resized to ``S``); ``smoothing``: Gaussian sigma, voxels (0: none)."""
    update = resize_field(update, base.shape[2:])
    return base + (gaussian_smooth(update, smoothing) if smoothing > 0 else update)


def loss_function(
    settings: OptimizationSettings,
) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(fixed, warp_moving, u, mask) -> (total, similarity loss, regularization)`` of the
    settings' loss; the measure and the regularizer are looked up once, here."""
    similarity = similarity_loss_function(settings.similarity, settings.window)
    regularizer = regularizer_function(settings.regularizer)
    weight, jacobian_weight = settings.weight, settings.jacobian_weight

    def loss_terms(fixed, warp_moving, u, mask):
        sim = similarity(fixed, warp_moving(u), mask)
        reg = regularizer(u)
        total = sim + weight * reg
        if jacobian_weight > 0:
            total = total + jacobian_weight * negative_jacobian(u)
        return total, sim, reg

    return loss_terms


def _learning_rate_factor(step: int, steps: int, final: float, warmup: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``final`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def run_pyramid(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    make_model: Callable[[torch.Tensor], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    settings: OptimizationSettings,
    shapes: Sequence[Sequence[int]],
    initial: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    callback: ProgressCallback | None = None,
    learning_rate: float = 1e-3,
    stage: str = "",
    mode: Mode = Mode.INSTANCE,
) -> torch.Tensor:
    """Coarse-to-fine optimisation of ``make_model(base)`` over the grid ``shapes``.

    Args:
        fixed, moving: ``(1, 1, *S)`` normalised images on the same grid.
        make_model: builds the module to optimise from the level's initial field
            ``base`` ``(1, ndim, *S_level)``; its ``forward(fixed, moving)`` returns ``u`` and its
            ``warmup_iterations`` sets the level's learning-rate warm-up.
        make_optimizer: the optimiser of that module's parameters (the algorithm's choice).
        shapes: level grid sizes, coarse to fine.
        initial: optional starting field ``(1, ndim, *S_any)`` in voxels of its own grid.
        mask: optional fixed-image weights ``(1, 1, *S)``.
        callback: receives one dict per iteration (see :func:`progress_event`); raising
            :class:`CancelledError` (or KeyboardInterrupt) stops the run.
        mode: whose default iterations apply when ``settings.iterations`` is None.

    Returns:
        ``u`` ``(1, ndim, *shapes[-1])`` in voxels of the finest level's grid.
    """
    iterations = settings.iterations_per_level(len(shapes), mode, shapes)
    loss_terms = loss_function(settings)
    total_iterations = sum(iterations)
    done_iterations = 0
    ndim = fixed.dim() - 2
    u = initial.detach() if initial is not None else fixed.new_zeros((1, ndim, *shapes[0]))
    with reuse_freed_memory(fixed.device):  # the same large temporaries every iteration
        for level, (shape, level_iterations) in enumerate(zip(shapes, iterations)):
            fixed_level = resize_image(fixed, shape)
            moving_level = resize_image(moving, shape)
            warp_moving = moving_sampler(settings, moving_level, mode)
            mask_level = resize_image(mask, shape) if mask is not None else None
            base = resize_field(u, shape)
            model = make_model(base)
            model.train()
            optimizer = make_optimizer(model)
            learning_rate_factor = partial(
                _learning_rate_factor,
                steps=level_iterations,
                final=settings.final_learning_rate,
                warmup=min(model.warmup_iterations, level_iterations // 4),
            )
            best, since_best = math.inf, 0
            for iteration in range(level_iterations):
                set_learning_rate_factor(optimizer, learning_rate_factor(iteration))
                optimizer.zero_grad()
                u_level = model(fixed_level, moving_level)
                total, sim, reg = loss_terms(fixed_level, warp_moving, u_level, mask_level)
                if not torch.isfinite(total):
                    raise FloatingPointError(
                        f"the loss became {total.item()} at level {level + 1}, iteration {iteration + 1}"
                    )
                total.backward()
                optimizer.step()
                done_iterations += 1
                value = float(total.detach())
                if value < best - settings.tolerance * abs(best if math.isfinite(best) else value):
                    best, since_best = value, 0
                else:
                    since_best += 1
                if callback is not None:
                    callback(
                        progress_event(
                            stage=f"{stage}level {level + 1}/{len(shapes)}",
                            iteration=iteration + 1,
                            iterations=level_iterations,
                            fraction=done_iterations / total_iterations,
                            loss=value,
                            similarity_loss=float(sim.detach()),
                            regularization=float(reg.detach()),
                        )
                    )
                if since_best >= settings.patience:
                    done_iterations += level_iterations - iteration - 1
                    break
            with torch.no_grad():  # batch norm stays in training mode: statistics of this pair
                u = model(fixed_level, moving_level).detach()
    return u


def progress_event(**values) -> dict:
    """One progress record: stage, iteration, iterations, fraction (0..1), loss terms."""
    return {"event": "progress", **values}
