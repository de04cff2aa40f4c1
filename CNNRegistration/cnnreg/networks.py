"""Registration networks (2D and 3D).

A network maps the pair ``cat([moving, fixed], dim=1)`` ``(N, 2, *S)`` to a displacement
``(N, ndim, *S)`` in voxels (:mod:`cnnreg.conventions`).  Each network keeps the keyword
arguments it was built with in ``self.config`` so a checkpoint can rebuild it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
            x = F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=False)
            x = decoder(torch.cat([x, skip], dim=1))
        return self.head(x) * self.output_scale


def parameter_count(network: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)
