"""Registration networks (2D and 3D).

A network maps the pair ``cat([moving, fixed], dim=1)`` ``(N, 2, *S)`` to a displacement
``(N, ndim, *S)`` in voxels of the input grid (:mod:`cnnreg.settings`: channel ``c`` is
the displacement along tensor axis ``c``, it pulls the moving image).  Each network keeps
the keyword arguments it was built with in ``self.config`` so a checkpoint can rebuild it
(:func:`build_network`, :mod:`cnnreg.checkpoint`).

* :class:`UNet` -- a U-Net in the style of Chen et al. 2020 (a trainable architecture; phantom
  mode optimises a :class:`VoxelMorphNet`, see :func:`cnnreg.phantom.phantom_network`).
* :class:`FAIMNet` -- FAIM-style (Kuang & Schmah 2019): inception-like first block, strided
  convolutions down, transposed convolutions up, PReLU, residual (additive) skips.
* :class:`VoxelMorphNet` -- VoxelMorph-2-style U-Net (strided encoder, concatenated skips).
* :class:`CascadeNet` -- a base network followed by a refinement network that sees
  ``(warped moving, fixed, u)`` and predicts a residual deformation (FAIM's refinement module).

The learned networks accept any input size (padded to a multiple of their down-sampling
factor and cropped back), start from exactly zero displacement (zero-initialised last layer),
and can output a stationary velocity field integrated by scaling and squaring
(``diffeomorphic=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spatial import compose, integrate_velocity, resize_field, warp


def _conv(ndim: int):
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def _norm(ndim: int):
    return nn.BatchNorm3d if ndim == 3 else nn.BatchNorm2d


class ConvBlock(nn.Sequential):
    """Two ``3^ndim`` convolutions, each followed by optional batch norm and LeakyReLU(0.2)."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, batch_norm: bool):
        layers: list[nn.Module] = []
        for channels in (in_channels, out_channels):
            layers.append(_conv(ndim)(channels, out_channels, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(_norm(ndim)(out_channels))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        super().__init__(*layers)


def _decode(decoder: nn.Module, x: torch.Tensor, skip: torch.Tensor, mode: str) -> torch.Tensor:
    """One decoder step: upsample ``x`` to the skip's size, concatenate, convolve."""
    x = F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=False)
    return decoder(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net with ``depth`` poolings (Chen et al. 2020 style: 24 features, 3 poolings, batch norm).

    Input ``(N, in_channels, *S)``; output ``(N, ndim, *S)`` displacement in voxels.  Any
    spatial size works (decoder features are resized to the skip connection's size).  The
    output convolution starts at (near) zero, so a fresh network gives the identity map.
    """

    def __init__(
        self,
        ndim: int = 3,
        features: int = 24,
        depth: int = 3,
        batch_norm: bool = True,
        in_channels: int = 2,
        output_scale: float = 1.0,
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.config = dict(
            ndim=ndim,
            features=features,
            depth=depth,
            batch_norm=batch_norm,
            in_channels=in_channels,
            output_scale=output_scale,
        )
        self.ndim = ndim
        self.output_scale = output_scale
        widths = [features * min(2**level, 4) for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        channels = in_channels
        for width in widths:
            self.encoders.append(ConvBlock(ndim, channels, width, batch_norm))
            channels = width
        self.decoders = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.decoders.append(ConvBlock(ndim, channels + width, width, batch_norm))
            channels = width
        self.head = _conv(ndim)(channels, ndim, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        pool = F.max_pool3d if self.ndim == 3 else F.max_pool2d
        mode = "trilinear" if self.ndim == 3 else "bilinear"
        skips = []
        x = pair
        for index, encoder in enumerate(self.encoders):
            if index > 0:
                x = pool(x, 2, ceil_mode=True)
            x = encoder(x)
            skips.append(x)
        for decoder, skip in zip(self.decoders, reversed(skips[:-1])):
            x = _decode(decoder, x, skip, mode)
        return self.head(x) * self.output_scale


def parameter_count(network: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------
# Learned registration networks (trained by cnnreg.training.loop, used by cnnreg.learned)
# ---------------------------------------------------------------------------------------


def _conv_transpose(ndim: int):
    return nn.ConvTranspose3d if ndim == 3 else nn.ConvTranspose2d


class RegistrationNetwork(nn.Module):
    """Base class of the learned networks: padding/cropping and optional velocity integration.

    Subclasses implement :meth:`predict` on an input whose spatial size is a multiple of
    ``self.factor`` and set ``self.head`` (the last convolution, zero-initialised here).
    """

    factor: int = 1

    def __init__(self, ndim: int, diffeomorphic: bool, integration_steps: int):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be >= 0, got {integration_steps}")
        self.ndim = ndim
        self.diffeomorphic = bool(diffeomorphic)
        self.integration_steps = int(integration_steps)

    def zero_head(self) -> None:
        """Zero the last layer: the network then predicts exactly no displacement."""
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def predict(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_padded_grid(self, x: torch.Tensor, function) -> torch.Tensor:
        """``function`` applied to ``x`` zero-padded (centred) to a multiple of ``self.factor``;
        its output, on the padded grid, is cropped back to ``x``'s grid."""
        if x.dim() != self.ndim + 2:
            raise ValueError(f"{type(self).__name__} is {self.ndim}D and needs (N, C, *S) input, got {tuple(x.shape)}")
        shape = x.shape[2:]
        padded = [math.ceil(n / self.factor) * self.factor for n in shape]
        before = [(p - n) // 2 for p, n in zip(padded, shape)]
        pad = []
        for n, p, b in reversed(list(zip(shape, padded, before))):
            pad += [b, p - n - b]
        out = function(F.pad(x, pad) if any(pad) else x)
        if any(pad):
            out = out[(slice(None), slice(None), *(slice(b, b + n) for b, n in zip(before, shape)))]
        return out

    def velocity_or_displacement(self, x: torch.Tensor) -> torch.Tensor:
        """The raw network output on ``x``'s grid (a velocity when ``diffeomorphic``)."""
        return self.on_padded_grid(x, self.predict)

    @property
    def supports_symmetric(self) -> bool:
        """Whether :meth:`forward` can average the two directions: a velocity network (a
        displacement's inverse is not its negative) on the pair alone (2 input channels)."""
        return self.diffeomorphic and self.config.get("in_channels", 2) == 2

    def _check_symmetric(self, symmetric: bool) -> None:
        """ValueError when ``symmetric`` is asked of a network that cannot (see :attr:`supports_symmetric`)."""
        if symmetric and not self.supports_symmetric:
            raise ValueError(f"symmetric prediction needs a velocity network on the image pair, not {self.config}")

    def ensemble_predict(self, padded: torch.Tensor, symmetric: bool, mirror: bool) -> torch.Tensor:
        """:meth:`predict` on ``padded`` ``(N, C, *P)`` (a multiple of :attr:`factor`), averaged
        over the test-time ensemble, all of it one batched pass:

        - ``mirror``: the input mirrored along its last axis, its output mirrored back (the
          last component negated), mean of the two;
        - ``symmetric``: ``(v(m, f) - v(f, m)) / 2``, the pair swapped (velocity networks).

        Flipping the padded grid itself keeps the mirror exact whatever the padding.
        Returns ``(N, ndim, *P')`` on :meth:`predict`'s output grid.
        """
        self._check_symmetric(symmetric)
        x = padded
        if mirror:
            x = torch.cat([x, x.flip(-1)], dim=0)
        if symmetric:
            x = torch.cat([x, x.flip(1)], dim=0)  # cat(moving, fixed), then cat(fixed, moving)
        out = self.predict(x)
        if symmetric:
            forward, backward = out.chunk(2, dim=0)
            out = 0.5 * (forward - backward)
        if mirror:
            direct, mirrored = out.chunk(2, dim=0)
            mirrored = mirrored.flip(-1)
            mirrored = torch.cat([mirrored[:, :-1], -mirrored[:, -1:]], dim=1)  # the last component turns
            out = 0.5 * (direct + mirrored)
        return out

    def forward(self, x: torch.Tensor, symmetric: bool = False, mirror: bool = False) -> torch.Tensor:
        """``x``: ``(N, in_channels, *S)``, any ``S`` -> displacement ``(N, ndim, *S)``, voxels.

        Test-time ensemble (see :meth:`ensemble_predict`), in one batched pass:
        ``symmetric`` (velocity networks only) averages the prediction for the pair with the
        negated prediction for the swapped pair, ``(v(m, f) - v(f, m)) / 2``, so the field does
        not depend on which image is called fixed beyond the inverse (``exp(-v)`` is the
        inverse of ``exp(v)``); ``mirror`` averages it with the prediction for the pair mirrored
        along its last axis, mirrored back.  Both average velocities before integrating when
        the network is diffeomorphic.
        """
        out = self.on_padded_grid(x, lambda padded: self.ensemble_predict(padded, symmetric, mirror))
        if self.diffeomorphic:
            out = integrate_velocity(out, self.integration_steps)
        return out


class InceptionBlock(nn.Module):
    """Parallel convolutions with different kernel sizes, ``filters`` each, concatenated.

    Even kernels are padded asymmetrically (one more voxel after) so every branch keeps the size.
    """

    def __init__(self, ndim: int, in_channels: int, filters: int, kernels: Sequence[int]):
        super().__init__()
        self.ndim = ndim
        self.kernels = [int(k) for k in kernels]
        self.branches = nn.ModuleList(_conv(ndim)(in_channels, filters, k) for k in self.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for kernel, branch in zip(self.kernels, self.branches):
            low, high = (kernel - 1) // 2, kernel // 2
            outputs.append(branch(F.pad(x, [low, high] * self.ndim)))
        return torch.cat(outputs, dim=1)


class FAIMNet(RegistrationNetwork):
    """FAIM-style registration network (Kuang & Schmah 2019, reimplemented from the paper's facts).

    Layout (``features = F``, ``levels = L``)::

        pair (N, in_channels, *S)
          -> inception block: kernels 2, 5, 7, 11 x ``filters`` each, concatenated (= F), PReLU
          -> L x [3^ndim convolution, stride 2, F -> F, PReLU]            (encoder, S / 2^l)
          -> 3^ndim convolution F -> F, PReLU                              (bottleneck)
          -> L x [3^ndim transposed convolution, stride 2, PReLU, + encoder output of that size]
          -> 3^ndim convolution F -> ndim (zero-initialised)

    About 0.23 M parameters in 3D with the defaults (0.07 M in 2D).  Input sizes are padded
    to a multiple of ``2^levels``.
    """

    def __init__(
        self,
        ndim: int = 3,
        in_channels: int = 2,
        filters: int = 8,
        kernels: Sequence[int] = (2, 5, 7, 11),
        features: int = 32,
        levels: int = 3,
        diffeomorphic: bool = False,
        integration_steps: int = 7,
    ):
        super().__init__(ndim, diffeomorphic, integration_steps)
        kernels = tuple(int(k) for k in kernels)
        if filters * len(kernels) != features:
            raise ValueError(
                f"the inception block gives filters x len(kernels) = {filters * len(kernels)} channels, "
                f"but features = {features}; they must be equal (residual adds)"
            )
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.config = dict(
            ndim=ndim,
            in_channels=in_channels,
            filters=filters,
            kernels=kernels,
            features=features,
            levels=levels,
            diffeomorphic=bool(diffeomorphic),
            integration_steps=int(integration_steps),
        )
        self.factor = 2**levels
        conv, conv_t = _conv(ndim), _conv_transpose(ndim)
        self.inception = InceptionBlock(ndim, in_channels, filters, kernels)
        self.inception_act = nn.PReLU(features)
        self.down = nn.ModuleList(
            nn.Sequential(conv(features, features, 3, stride=2, padding=1), nn.PReLU(features)) for _ in range(levels)
        )
        self.bottleneck = nn.Sequential(conv(features, features, 3, padding=1), nn.PReLU(features))
        self.up = nn.ModuleList(
            nn.Sequential(
                conv_t(features, features, 3, stride=2, padding=1, output_padding=1),
                nn.PReLU(features),
            )
            for _ in range(levels)
        )
        self.head = conv(features, ndim, 3, padding=1)
        self.zero_head()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception_act(self.inception(x))
        skips = [x]
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = self.bottleneck(x) + x
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = up(x) + skip
        return self.head(x)


class VoxelMorphNet(RegistrationNetwork):
    """VoxelMorph-2-style U-Net (Balakrishnan et al. 2019), LeakyReLU(0.2), 3^ndim convolutions.

    The encoder halves the size with each stride-2 convolution (``encoder`` widths); the
    decoder runs one convolution per width in ``decoder``: the first ``len(encoder)`` at the
    encoder's scales from coarse to fine, each followed by 2x upsampling and concatenation
    with the encoder feature (or the input pair) of the next finer scale; the remaining
    ones at the output resolution.  A zero-initialised 3^ndim convolution gives the field.
    About 0.30 M parameters in 3D with the defaults (0.10 M in 2D).

    ``half_resolution=True`` stops the decoder one scale early: the field (or velocity) is
    predicted on the half-size grid and upsampled linearly (values doubled, so they stay in
    voxels of the input grid); the last skip (the input pair) is not used.  This removes the
    most expensive full-size convolutions (about 3x fewer operations at 64^3) and smooths the
    field, as in the half-resolution VoxelMorph variants.
    """

    def __init__(
        self,
        ndim: int = 3,
        in_channels: int = 2,
        encoder: Sequence[int] = (16, 32, 32, 32),
        decoder: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        diffeomorphic: bool = False,
        integration_steps: int = 7,
        half_resolution: bool = False,
    ):
        super().__init__(ndim, diffeomorphic, integration_steps)
        encoder, decoder = tuple(int(c) for c in encoder), tuple(int(c) for c in decoder)
        self.upsamplings = len(encoder) - (1 if half_resolution else 0)
        if len(decoder) < self.upsamplings + 1:
            raise ValueError(f"decoder needs at least {self.upsamplings + 1} widths, got {decoder}")
        if half_resolution and len(encoder) < 2:
            raise ValueError("half_resolution needs at least two encoder levels")
        self.config = dict(
            ndim=ndim,
            in_channels=in_channels,
            encoder=encoder,
            decoder=decoder,
            diffeomorphic=bool(diffeomorphic),
            integration_steps=int(integration_steps),
            half_resolution=bool(half_resolution),
        )
        self.half_resolution = bool(half_resolution)
        self.factor = 2 ** len(encoder)
        conv = _conv(ndim)

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(conv(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))

        self.encoder = nn.ModuleList()
        channels, skip_channels = in_channels, [in_channels]
        for width in encoder:
            self.encoder.append(block(channels, width, stride=2))
            channels = width
            skip_channels.append(width)
        skip_channels = skip_channels[:-1][::-1]  # finer-scale skips, coarse to fine
        self.decoder = nn.ModuleList()
        for index, width in enumerate(decoder):
            self.decoder.append(block(channels, width))
            channels = width
            if index < self.upsamplings:
                channels += skip_channels[index]
        self.head = conv(channels, ndim, 3, padding=1)
        self.zero_head()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        skips = [x]
        for layer in self.encoder:
            x = layer(x)
            skips.append(x)
        skips = skips[:-1][::-1]
        for index, layer in enumerate(self.decoder):
            x = layer(x)
            if index < self.upsamplings:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
                x = torch.cat([x, skips[index]], dim=1)
        return self.head(x)

    def forward(self, x: torch.Tensor, symmetric: bool = False, mirror: bool = False) -> torch.Tensor:
        """``x``: ``(N, in_channels, *S)``, any ``S`` -> displacement ``(N, ndim, *S)``, voxels
        (``symmetric``, ``mirror``: see :meth:`RegistrationNetwork.forward`)."""
        if not self.half_resolution:
            return super().forward(x, symmetric=symmetric, mirror=mirror)

        def full_grid_field(padded: torch.Tensor) -> torch.Tensor:
            out = self.ensemble_predict(padded, symmetric, mirror)  # (N, ndim, *padded / 2), half-grid voxels
            if self.diffeomorphic:
                out = integrate_velocity(out, self.integration_steps)
            return resize_field(out, padded.shape[2:])  # input-grid voxels

        return self.on_padded_grid(x, full_grid_field)


class CascadeNet(nn.Module):
    """A base network followed by a refinement network (FAIM's refinement module).

    ``u0 = base(cat(moving, fixed))``; the refiner sees ``cat(warp(moving, u0), fixed, u0)``
    ``(N, 2 + ndim, *S)`` and predicts a residual deformation ``r`` of the warped image, so
    ``u = compose(u0, r) = r + u0(x + r)`` (warp by ``u0`` first, then by ``r``).

    Args:
        base, refiner: ``{"architecture": class name, "config": constructor kwargs}`` (the
            refiner's ``in_channels`` must be ``2 + ndim``).
    """

    def __init__(self, base: dict, refiner: dict):
        super().__init__()
        self.config = dict(base=dict(base), refiner=dict(refiner))
        self.base = build_network(base["architecture"], base["config"])
        self.refiner = build_network(refiner["architecture"], refiner["config"])
        self.ndim = self.base.ndim
        if self.refiner.ndim != self.ndim:
            raise ValueError(f"base is {self.ndim}D but refiner is {self.refiner.ndim}D")
        if self.refiner.config.get("in_channels") != 2 + self.ndim:
            raise ValueError(f"the refiner needs in_channels = 2 + ndim = {2 + self.ndim}, got {self.refiner.config}")

    def refine(self, pair: torch.Tensor, u0: torch.Tensor, refiner: nn.Module | None = None) -> torch.Tensor:
        """Final field from the base field ``u0`` (``pair`` = ``cat(moving, fixed)``); ``refiner``
        replaces ``self.refiner`` (e.g. its DistributedDataParallel wrapper during training)."""
        moving, fixed = pair[:, :1], pair[:, 1:2]
        residual = (refiner or self.refiner)(torch.cat([warp(moving, u0), fixed, u0], dim=1))
        return compose(u0, residual)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """``pair`` ``(N, 2, *S)`` -> ``u`` ``(N, ndim, *S)`` voxels."""
        return self.refine(pair, self.base(pair))


#: architecture name (class name, as stored in checkpoints) -> class
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "FAIMNet": FAIMNet,
    "VoxelMorphNet": VoxelMorphNet,
    "CascadeNet": CascadeNet,
    "UNet": UNet,
}

#: short names accepted in training configs
SHORT_NAMES = {"faim": "FAIMNet", "voxelmorph": "VoxelMorphNet", "unet": "UNet"}


def build_network(architecture: str, config: dict) -> nn.Module:
    """Instantiate ``architecture`` (class name or short name) with the keyword arguments ``config``.

    Raises KeyError for an unknown architecture, TypeError/ValueError for a bad config.
    """
    name = SHORT_NAMES.get(architecture, architecture)
    if name not in ARCHITECTURES:
        raise KeyError(
            f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)} or {sorted(SHORT_NAMES)}"
        )
    return ARCHITECTURES[name](**config)
