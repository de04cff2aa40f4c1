"""Training pairs with a known answer, synthesised on the fly (SynthMorph-style).

A few real brains are not enough to train a registration network, so every training pair
is made from one *source* (a real image with a label map on the working grid):

1. a new "subject": the source is moved by a random affine map and a random smooth
   deformation (:func:`random_affine_field`, :func:`multiscale_velocity`);
2. its image is, with probability ``synthetic_fraction``, *synthesised* from the deformed
   label map (every label a random intensity, optional random blobs in the empty
   background, Gaussian blur; :func:`synthesize`), otherwise the deformed real image;
3. a random diffeomorphism ``phi = exp(v)`` (scaling and squaring of a multi-scale
   velocity ``v``) and its exact inverse ``exp(-v)`` make the pair: either
   ``fixed = base, moving = base o phi`` (answer ``exp(-v)``) or
   ``fixed = base o phi, moving = base`` (answer ``exp(v)``), so that which side is
   interpolated (blurred) varies;
4. both images get independent intensity changes (gamma, contrast, bias, noise;
   :func:`cnnreg.training.augment.augment_intensity`).

The pair carries its true field (``PairBatch.true_field``, voxels, pulling the moving image
onto the fixed one, :mod:`cnnreg.settings`) and a foreground mask of the fixed image, for
the supervised warm-up loss of :mod:`cnnreg.training.losses`.  Every draw comes from an explicit CPU
``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..spatial import gaussian_smooth, integrate_velocity, warp
from .augment import AugmentSettings, PairBatch, Sample, augment_intensity, coarse_noise, uniform


@dataclass
class SynthSettings:
    """How synthetic pairs are drawn (lengths in voxels of the working grid).

    Attributes:
        synthetic_fraction: probability that a pair's image is synthesised from the label map
            rather than taken from the real image.
        max_displacement: largest vector length of the pair's field ``exp(v)``; each pair
            draws its own size, ``U(0.1, 1) x max_displacement``.
        spacings: control spacings of the velocity's components (one coarse noise per
            spacing, random relative weights): several scales of deformation.
        subject_displacement: largest length of the random deformation that makes a new
            subject from a source (shared by both images of the pair).
        rotation_degrees, scaling, translation: random affine map of a new subject: rotation
            about each axis ``U(-r, r)``, per-axis scale ``U(1 - s, 1 + s)``, translation
            ``U(-t, t) x`` axis size.
        blob_probability: probability of filling the empty background (label 0 and image 0)
            with random blob labels (head-like structures around the brain).
        blobs: number of random blob labels.
        max_blur: largest Gaussian sigma of a synthesised image.
        intensity: intensity changes applied to each image of the pair.
        foreground_threshold: image value above which a voxel counts as foreground (real images).
    """

    synthetic_fraction: float = 0.5
    max_displacement: float = 5.0
    spacings: Sequence[int] = (4, 8, 16)
    subject_displacement: float = 3.0
    rotation_degrees: float = 8.0
    scaling: float = 0.1
    translation: float = 0.04
    blob_probability: float = 0.3
    blobs: int = 6
    max_blur: float = 1.0
    intensity: AugmentSettings = field(
        default_factory=lambda: AugmentSettings(gamma=0.25, contrast=0.2, bias_field=0.3, noise=0.03, probability=0.5)
    )
    foreground_threshold: float = 0.02

    def __post_init__(self):
        if isinstance(self.intensity, dict):
            self.intensity = AugmentSettings(**self.intensity)
        self.spacings = tuple(int(s) for s in self.spacings)
        if not 0 <= self.synthetic_fraction <= 1 or not 0 <= self.blob_probability <= 1:
            raise ValueError("synthetic_fraction and blob_probability must lie in [0, 1]")
        if not self.spacings or min(self.spacings) < 1:
            raise ValueError(f"spacings must be positive voxel counts, got {self.spacings}")


def multiscale_velocity(
    shape: Sequence[int],
    max_length: float,
    spacings: Sequence[int],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Smooth random velocity ``(1, ndim, *shape)`` (voxels): coarse noise at each of
    ``spacings`` with random weights, summed and scaled so its largest vector length is
    ``max_length``."""
    ndim = len(shape)
    velocity = torch.zeros(1, ndim, *shape, device=device)
    for spacing in spacings:
        weight = float(torch.rand(1, generator=generator))
        velocity = velocity + weight * coarse_noise(1, ndim, shape, spacing, generator, device)
    length = velocity.pow(2).sum(1).sqrt().max().clamp_min(1e-6)
    return velocity * (max_length / length)


def random_affine_field(
    shape: Sequence[int],
    settings: SynthSettings,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Displacement ``(1, ndim, *shape)`` (voxels) of a random affine map about the grid centre:
    ``x -> R S (x - c) + c + t`` with rotation ``R``, per-axis scale ``S`` and translation ``t``."""
    ndim = len(shape)
    angles = uniform(generator, 3 if ndim == 3 else 1, -1, 1) * math.radians(settings.rotation_degrees)
    scales = uniform(generator, ndim, 1 - settings.scaling, 1 + settings.scaling)
    shift = uniform(generator, ndim, -1, 1) * settings.translation * torch.tensor(shape, dtype=torch.float32)
    rotation = torch.eye(ndim)
    planes = [(0, 1), (0, 2), (1, 2)] if ndim == 3 else [(0, 1)]
    for angle, (a, b) in zip(angles.tolist(), planes):
        r = torch.eye(ndim)
        r[a, a], r[a, b], r[b, a], r[b, b] = math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle)
        rotation = r @ rotation
    matrix = rotation @ torch.diag(scales)
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (ndim, *shape)
    centre = torch.tensor([(n - 1) / 2.0 for n in shape]).view(ndim, *([1] * ndim))
    moved = torch.einsum("ab,b...->a...", matrix, points - centre) + centre + shift.view(ndim, *([1] * ndim))
    return (moved - points)[None].to(device)


def blob_labels(
    shape: Sequence[int], count: int, generator: torch.Generator, device: torch.device | str | None = None
) -> torch.Tensor:
    """Random smooth partition of the grid into ``count`` labels ``1..count``: ``(1, 1, *shape)``
    (the arg-max of ``count`` smooth noise fields)."""
    noise = coarse_noise(1, count, shape, 8, generator, device)
    return noise.argmax(1, keepdim=True).float() + 1


def synthesize(
    labels: torch.Tensor, settings: SynthSettings, generator: torch.Generator, background_labels: int = 0
) -> torch.Tensor:
    """An image ``(1, 1, *S)`` in [0, 1] from a label map ``(1, 1, *S)`` (integer values): a random
    intensity ``U(0, 1)`` per label (label 0 stays 0), then a Gaussian blur ``U(0, max_blur)``."""
    count = int(labels.max()) + 1
    table = torch.rand(count, generator=generator).to(labels.device)
    table[0] = 0.0
    image = table[labels.long().clamp_min(0)]
    sigma = float(uniform(generator, 1, 0, settings.max_blur))
    if sigma > 0.2:
        image = gaussian_smooth(image, sigma)
    return image / image.max().clamp_min(1e-6)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    pool = F.max_pool3d if mask.dim() == 5 else F.max_pool2d
    return pool(mask, 2 * radius + 1, stride=1, padding=radius)


class SynthPairSampler:
    """Pairs with a known field from ``sources`` (each a real image with a label map), see the
    module docstring.  ``sample(batch_size, device)`` returns a :class:`PairBatch` with
    ``true_field`` ``(N, ndim, *S)`` and ``foreground`` ``(N, 1, *S)`` (the fixed image's
    foreground, dilated by 2 voxels)."""

    def __init__(self, sources: Sequence[Sample], settings: SynthSettings, generator: torch.Generator):
        if not sources:
            raise ValueError("the synthetic pair sampler needs at least one source image")
        if any(s.labels is None for s in sources):
            raise ValueError("every source of the synthetic pair sampler needs a label map")
        self.sources = list(sources)
        self.settings = settings
        self.generator = generator

    def _one(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
        s, g = self.settings, self.generator
        source = self.sources[int(torch.randint(len(self.sources), (1,), generator=g))]
        image = source.image[None].to(device)
        labels = source.labels[None].to(device).float()
        shape = tuple(image.shape[2:])
        # a new subject: random affine + smooth deformation of the source
        subject = random_affine_field(shape, s, g, device)
        if s.subject_displacement > 0:
            bend = multiscale_velocity(shape, float(uniform(g, 1, 0, s.subject_displacement)), s.spacings, g, device)
            subject = subject + integrate_velocity(bend)
        labels = warp(labels, subject, interpolation="nearest", padding="zeros")
        synthetic = float(torch.rand(1, generator=g)) < s.synthetic_fraction
        if synthetic:
            foreground = (labels > 0).float()
        else:
            image = warp(image, subject, padding="zeros")
            foreground = (image > s.foreground_threshold).float()
        if float(torch.rand(1, generator=g)) < s.blob_probability:
            empty = _dilate(foreground, 2) == 0
            blobs = blob_labels(shape, s.blobs, g, device) + (labels.max() if synthetic else 0)
            labels = torch.where(empty, blobs, labels)
            if not synthetic:  # real brain, synthetic head around it
                shell = synthesize(torch.where(empty, blobs, torch.zeros_like(blobs)), s, g)
                image = torch.where(empty, shell * float(uniform(g, 1, 0.2, 1.0)), image)
        base = synthesize(labels, s, g) if synthetic else image
        # the pair: a random diffeomorphism and its exact inverse
        size = float(uniform(g, 1, 0.1, 1.0)) * s.max_displacement
        velocity = multiscale_velocity(shape, size, s.spacings, g, device)
        if float(torch.rand(1, generator=g)) < 0.5:  # fixed = base, moving = base o exp(v)
            fixed, moving = base, warp(base, integrate_velocity(velocity))
            true_field, fixed_foreground = integrate_velocity(-velocity), foreground
        else:  # fixed = base o exp(v), moving = base
            true_field = integrate_velocity(velocity)
            fixed, moving = warp(base, true_field), base
            fixed_foreground = (warp(foreground, true_field) > 0.5).float()
        fixed = augment_intensity(fixed, s.intensity, g)
        moving = augment_intensity(moving, s.intensity, g)
        name = f"{source.name} ({'synthetic' if synthetic else 'real'}, |u| <= {size:.1f})"
        return fixed, moving, true_field, _dilate(fixed_foreground, 2), name

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> PairBatch:
        items = [self._one(device) for _ in range(batch_size)]
        fixed, moving, true_field, foreground = (torch.cat([item[k] for item in items]) for k in range(4))
        return PairBatch(fixed, moving, names=[item[4] for item in items], true_field=true_field, foreground=foreground)
