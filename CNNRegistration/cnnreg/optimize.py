"""Per-pair iterative registration: the phantom-mode CNN and dense-field instance optimisation.

Both run the same coarse-to-fine loop (:func:`run_pyramid`) and differ only in what is
optimised:

* :class:`DenseField` -- the displacement itself (a smoothed dense field; the refinement
  stage of the learned mode and the ``instance`` mode);
* :class:`CNNField` -- the weights of a randomly initialised U-Net that maps the pair to a
  displacement (Chen et al. 2020: the network reparametrises the field and acts as a prior;
  no training data).

Images are ``(1, 1, *S)`` float tensors, normalised; the result is ``u`` ``(1, ndim, *S)``
in voxels of the fixed grid (:mod:`cnnreg.settings`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn

from .errors import InputError
from .losses import similarity_loss_function
from .networks import VoxelMorphNet
from .regularizers import negative_jacobian, regularizer_function
from .settings import CNN_LEARNING_RATE, DENSE_LEARNING_RATES, Interpolation, Mode, OptimizationSettings, Optimizer
from .spatial import bspline_coefficients, gaussian_smooth, resize_field, resize_image, warp, warp_bspline

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


class FieldOptimizer:
    """Base of the dense-field optimisers: one parameter group (``lr`` and the optimiser's
    hyper-parameters), per-tensor ``state`` and :meth:`zero_grad`, as in ``torch.optim`` -- but
    not a ``torch.optim.Optimizer``: building one of those imports ``torch._dynamo`` on the
    first use in a process (1.4-2 s; a learned-refine registration of a 96^3 pair takes ~2 s
    without it), and the Slicer module runs each registration in a new process.  Subclasses
    implement ``step()``."""

    def __init__(self, params, defaults: dict):
        self.param_groups = [{**defaults, "params": list(params)}]
        self.state: defaultdict[torch.Tensor, dict] = defaultdict(dict)

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


def set_learning_rate_factor(optimizer, factor: float) -> None:
    """``lr = initial_lr * factor`` in every parameter group (``torch.optim`` optimisers and
    :class:`FieldOptimizer`; what ``LambdaLR`` does, without its scheduler machinery)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


class GlobalAdam(FieldOptimizer):
    """Adam with one second-moment estimate per parameter tensor instead of per element.

    Per-element Adam gives every voxel of a dense field a step of about ``lr``, however weak
    its evidence, which turns textureless regions into noise; normalising by the tensor's
    gradient RMS keeps steps proportional to the local gradient (as demons-type methods do),
    so ``lr`` is the step, in voxels, of a voxel with an RMS-sized gradient.
    """

    def __init__(
        self,
        params,
        lr: float = DENSE_LEARNING_RATES[Optimizer.GLOBAL_ADAM],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-12,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum"] = torch.zeros_like(p)
                    state["square"] = p.new_zeros(())
                state["step"] += 1
                state["momentum"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["square"].mul_(beta2).add_(p.grad.pow(2).mean(), alpha=1 - beta2)
                momentum = state["momentum"] / (1 - beta1 ** state["step"])
                square = state["square"] / (1 - beta2 ** state["step"])
                p.sub_(group["lr"] * momentum / (square.sqrt() + group["eps"]))


class GreedyFluid(FieldOptimizer):
    """Demons/SyN-style greedy steps: the gradient is Gaussian-smoothed (``sigma`` voxels, a
    fluid-like regularisation of each update) and scaled so that the largest step of any
    voxel is ``lr`` voxels.  Use with a small or zero penalty on the total field."""

    def __init__(self, params, lr: float = DENSE_LEARNING_RATES[Optimizer.GREEDY], sigma: float = 3.0):
        super().__init__(params, dict(lr=lr, sigma=sigma))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction = gaussian_smooth(p.grad, group["sigma"]) if group["sigma"] > 0 else p.grad
                largest = direction.norm(dim=1).max().clamp_min(1e-12)
                p.sub_(group["lr"] * direction / largest)


#: optimisers of a dense field (the phantom CNN's weights always use Adam)
OPTIMIZERS = {Optimizer.GLOBAL_ADAM: GlobalAdam, Optimizer.ADAM: torch.optim.Adam, Optimizer.GREEDY: GreedyFluid}


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
        update = resize_field(self.update, self.base.shape[2:])
        update = gaussian_smooth(update, self.smoothing) if self.smoothing > 0 else update
        return self.base + update


def phantom_network(ndim: int, features: int = 16) -> VoxelMorphNet:
    """The phantom mode's CNN: a U-Net with strided convolutions (widths ``features``,
    ``2 features`` x 3 down to 1/16), no normalisation layers, whose decoder stops at half
    resolution (:class:`~cnnreg.networks.VoxelMorphNet` with ``half_resolution``) with one
    ``features``-wide convolution there before the head.  The half-resolution convolutions are
    most of an iteration's cost (their backward pass above all), hence one of width ``features``
    there (docs/decisions.md).

    The trunk's convolutions are initialised for LeakyReLU(0.2) (Kaiming normal, zero bias),
    not with PyTorch's default, whose gain shrinks the activations ~2.5x per layer (std 0.19 after
    the first convolution, 0.013 before the head at 64^3): with features that small every Adam step
    of the head moves the field by little and the result depended on the seed (docs/decisions.md);
    the head stays zero."""
    wide = 2 * features
    network = VoxelMorphNet(
        ndim=ndim,
        encoder=(features, wide, wide, wide),
        decoder=(wide, wide, wide, features),
        half_resolution=True,
    )
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)) and module is not network.head:
            nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu")
            nn.init.zeros_(module.bias)
    return network


class CNNField(nn.Module):
    """``u = base + G_sigma * network(cat(moving, fixed))`` with the network's weights optimised.

    One fully convolutional network is carried through the pyramid: at each level its last
    layer is set to zero (so the level starts exactly from ``base``, the previous level's
    field: nothing is lost at a level change) while the rest keeps what it learnt.  The last
    layer gets ``head_factor`` x the learning rate: with Adam every weight moves by about
    the learning rate per step, and the last layer is what turns features into voxels.
    No batch normalisation: with one pair per step its statistics would change the field
    between training and evaluation.  Each level's learning rate warms up linearly over
    ``warmup_iterations`` before the cosine decay.
    """

    head_factor = 5.0
    #: iterations of linear learning-rate warm-up at the start of each level (at most a quarter
    #: of the level's): a new Adam's first steps move every weight by about the full rate at once
    warmup_iterations = 15

    def __init__(
        self,
        network: VoxelMorphNet,
        base: torch.Tensor,
        smoothing: float = 0.0,
        input_shape: Sequence[int] | None = None,
    ):
        """``base`` ``(1, ndim, *S)``: the level's starting field (voxels of its grid ``S``);
        ``input_shape``: the grid the network sees the images on when it is not ``S`` (its
        field is then resized to ``S``, values rescaled to ``S``'s voxels)."""
        super().__init__()
        self.network = network
        self.register_buffer("base", base.detach().clone())
        self.smoothing = smoothing
        self.input_shape = None if input_shape is None else tuple(int(n) for n in input_shape)
        self._resized_input: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        network.zero_head()

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        head = list(self.network.head.parameters())
        ids = {id(p) for p in head}
        trunk = [p for p in self.network.parameters() if id(p) not in ids]
        return [{"params": trunk, "lr": learning_rate}, {"params": head, "lr": learning_rate * self.head_factor}]

    def network_input(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``cat(moving, fixed)`` ``(1, 2, *S)``, or resampled to ``input_shape`` (kept while the
        same two tensors come back: one resampling per level)."""
        pair_shape = tuple(fixed.shape[2:])
        if self.input_shape is None or self.input_shape == pair_shape:
            return torch.cat([moving, fixed], dim=1)
        cached = self._resized_input
        if cached is None or cached[0] is not fixed or cached[1] is not moving:
            cached = (fixed, moving, resize_image(torch.cat([moving, fixed], dim=1), self.input_shape))
            self._resized_input = cached
        return cached[2]

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``fixed``, ``moving`` ``(1, 1, *S)`` -> ``u`` ``(1, ndim, *S)``, voxels of ``S``."""
        residual = self.network(self.network_input(fixed, moving))
        if residual.shape[2:] != fixed.shape[2:]:
            residual = resize_field(residual, fixed.shape[2:])
        if self.smoothing > 0:
            residual = gaussian_smooth(residual, self.smoothing)
        return self.base + residual


def moving_sampler(
    settings: OptimizationSettings, moving: torch.Tensor, mode: Mode = Mode.INSTANCE
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``u -> moving(x + u(x))`` with the settings' interpolation (or ``mode``'s default);
    ``moving`` ``(N, C, *S)`` is prefiltered once here for the cubic B-spline."""
    if settings.interpolation_for(mode) is Interpolation.CUBIC:
        coefficients = bspline_coefficients(moving)
        return lambda u: warp_bspline(coefficients, u)
    return lambda u: warp(moving, u)


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
        shapes: level grid sizes, coarse to fine.
        initial: optional starting field ``(1, ndim, *S_any)`` in voxels of its own grid.
        mask: optional fixed-image weights ``(1, 1, *S)``.
        callback: receives one dict per iteration (see :func:`progress_event`); raising
            :class:`CancelledError` (or KeyboardInterrupt) stops the run.
        mode: whose default iterations apply when ``settings.iterations`` is None.

    Returns:
        ``u`` ``(1, ndim, *shapes[-1])`` in voxels of the finest level's grid.
    """
    iterations = settings.iterations_per_level(len(shapes), mode)
    loss_terms = loss_function(settings)
    total_iterations = sum(iterations)
    done_iterations = 0
    ndim = fixed.dim() - 2
    u = initial.detach() if initial is not None else fixed.new_zeros((1, ndim, *shapes[0]))
    for level, (shape, level_iterations) in enumerate(zip(shapes, iterations)):
        fixed_level = resize_image(fixed, shape)
        moving_level = resize_image(moving, shape)
        warp_moving = moving_sampler(settings, moving_level, mode)
        mask_level = resize_image(mask, shape) if mask is not None else None
        base = resize_field(u, shape)
        model = make_model(base)
        model.train()
        if isinstance(model, DenseField) and settings.optimizer is Optimizer.GREEDY:
            optimizer = GreedyFluid(model.parameters(), lr=learning_rate, sigma=settings.field_smoothing)
        elif isinstance(model, DenseField):
            optimizer = OPTIMIZERS[settings.optimizer](model.parameters(), lr=learning_rate)
        else:
            optimizer = torch.optim.Adam(model.parameter_groups(learning_rate), lr=learning_rate)
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

    return run_pyramid(
        fixed,
        moving,
        make_field,
        settings,
        shapes,
        initial=initial,
        mask=mask,
        callback=callback,
        learning_rate=settings.learning_rate or DENSE_LEARNING_RATES[settings.optimizer],
        stage=stage,
    )


def optimize_cnn(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    settings: OptimizationSettings,
    mask: torch.Tensor | None = None,
    callback: ProgressCallback | None = None,
) -> torch.Tensor:
    """Phantom mode: optimise a randomly initialised U-Net on this pair only (no training).

    The network runs on the pyramid of a working grid of at most ``settings.max_cnn_voxels``
    voxels; the resulting field is upsampled to the fixed grid.  At the finest level the
    network sees the images of the level before (half the size per axis): the loss is still
    evaluated on the finest grid, and the field the network predicts at half its input
    resolution is resized to it (4-voxel spacing, then the update smoothing): faster, and the
    coarser field is a better-posed problem for the same iterations (docs/decisions.md).  Finer detail (the
    phantom-to-image case) needs the network on the full-size images:
    ``settings.cnn_full_resolution_iterations`` more iterations on the finest grid do that.
    Returns ``u`` ``(1, ndim, *S)``.
    """
    ndim = fixed.dim() - 2
    network = phantom_network(ndim, settings.features).to(device=fixed.device, dtype=fixed.dtype)
    smallest = 16
    working = capped_shape(fixed.shape[2:], settings.max_cnn_voxels)
    if min(working) < smallest:
        raise InputError(
            f"phantom mode needs at least {smallest} voxels along every axis of its working grid, got "
            f"{working} (image {tuple(fixed.shape[2:])}, max_cnn_voxels {settings.max_cnn_voxels}); "
            "use instance mode for such small images or raise --max-cnn-voxels"
        )
    shapes = [s for s in pyramid_shapes(working, settings.levels) if min(s) >= smallest] or [working]
    iterations = settings.iterations_per_level(len(shapes), Mode.PHANTOM)
    # the grid each level's network sees: its own, except the finest level's sees the previous
    # level's images; an optional last stage on the finest grid sees them at full size
    network_inputs = [None] * len(shapes)
    if len(shapes) > 1:
        network_inputs[-1] = shapes[-2]
    if settings.cnn_full_resolution_iterations > 0:
        shapes, network_inputs = [*shapes, shapes[-1]], [*network_inputs, None]
        iterations = [*iterations, settings.cnn_full_resolution_iterations]
    next_input = iter(network_inputs)  # run_pyramid builds one model per level, in order
    u = run_pyramid(
        fixed,
        moving,
        lambda base: CNNField(network, base, settings.field_smoothing, next(next_input)),
        dataclasses.replace(settings, iterations=iterations),
        shapes,
        mask=mask,
        callback=callback,
        learning_rate=settings.learning_rate or CNN_LEARNING_RATE,
        mode=Mode.PHANTOM,
    )
    return resize_field(u, fixed.shape[2:])
