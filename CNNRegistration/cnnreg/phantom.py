"""Phantom mode (Chen et al. 2020): a randomly initialised CNN, optimised on this pair only, maps the
pair to the displacement; the network reparametrises the field and acts as its prior (no
training data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn

from .errors import InputError
from .networks import VoxelMorphNet
from .pyramid import ProgressCallback, add_update, capped_shape, pyramid_shapes, run_pyramid
from .settings import CNN_LEARNING_RATE, Mode, OptimizationSettings
from .spatial import resize_field, resize_image


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
        return add_update(self.base, self.network(self.network_input(fixed, moving)), self.smoothing)


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
    iterations = settings.iterations_per_level(len(shapes), Mode.PHANTOM, shapes)
    # the grid each level's network sees: its own, except the finest level's sees the previous
    # level's images; an optional last stage on the finest grid sees them at full size
    network_inputs = [None] * len(shapes)
    if len(shapes) > 1:
        network_inputs[-1] = shapes[-2]
    if settings.cnn_full_resolution_iterations > 0:
        shapes, network_inputs = [*shapes, shapes[-1]], [*network_inputs, None]
        iterations = [*iterations, settings.cnn_full_resolution_iterations]
    learning_rate = settings.learning_rate or CNN_LEARNING_RATE
    next_input = iter(network_inputs)  # run_pyramid builds one model per level, in order
    u = run_pyramid(
        fixed,
        moving,
        lambda base: CNNField(network, base, settings.field_smoothing, next(next_input)),
        lambda field: torch.optim.Adam(field.parameter_groups(learning_rate), lr=learning_rate),
        dataclasses.replace(settings, iterations=iterations),
        shapes,
        mask=mask,
        callback=callback,
        learning_rate=learning_rate,
        mode=Mode.PHANTOM,
    )
    return resize_field(u, fixed.shape[2:])
