"""On-the-fly augmentation and pair sampling for training the learned networks (2D and 3D).

Images are ``(N, 1, *S)`` float tensors, max-normalised to [0, 1]; label maps ``(N, 1, *S)``
integer-valued float or int tensors; fields ``(N, ndim, *S)`` in voxels
(:mod:`cnnreg.settings`).  Every random draw takes an explicit ``torch.Generator`` (on
the CPU; results are moved to the images' device) so a seed makes a run repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..spatial import gaussian_smooth, integrate_velocity, warp


@dataclass
class AugmentSettings:
    """Random deformations and intensity changes.

    Attributes:
        max_displacement: largest displacement (voxels of the working grid, vector length) of
            the random deformation that makes a self pair (image vs a deformed copy of itself).
        pair_displacement: same for the mild deformation also applied to each image of a pair
            of different images (0 = none).
        control_spacing: voxels between the coarse random-noise samples of a deformation.
        diffeomorphic: deformations are integrated velocity fields (no folding).
        self_pair_fraction: probability that a training pair is an image vs a deformed copy of
            itself (when there is more than one image; otherwise always).
        gamma: standard deviation of ``log(gamma)`` of the intensity gamma change.
        contrast: contrast factor drawn from ``[1 - contrast, 1 + contrast]`` around the mean.
        bias_field: largest amplitude of a smooth multiplicative bias ``exp(b(x))``.
        noise: largest standard deviation of additive Gaussian noise (fraction of the maximum).
        probability: probability of applying each intensity change.
    """

    max_displacement: float = 6.0
    pair_displacement: float = 2.0
    control_spacing: int = 8
    diffeomorphic: bool = True
    self_pair_fraction: float = 0.5
    gamma: float = 0.25
    contrast: float = 0.2
    bias_field: float = 0.3
    noise: float = 0.02
    probability: float = 0.5


def uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """``n`` draws from ``U(low, high)`` (CPU, from ``generator``)."""
    return low + (high - low) * torch.rand(n, generator=generator)


def coarse_noise(
    batch: int,
    channels: int,
    shape: Sequence[int],
    spacing: float,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit normal noise on a grid ``spacing`` times coarser than ``shape`` (drawn on the CPU),
    upsampled linearly to ``shape`` and Gaussian-smoothed (sigma = spacing / 2) on ``device``:
    ``(batch, channels, *shape)``."""
    ndim = len(shape)
    coarse = [max(2, math.ceil(n / spacing) + 1) for n in shape]
    noise = torch.randn(batch, channels, *coarse, generator=generator).to(device)
    mode = "trilinear" if ndim == 3 else "bilinear"
    field = F.interpolate(noise, size=tuple(shape), mode=mode, align_corners=True)
    return gaussian_smooth(field, max(spacing / 2.0, 0.5))


def random_smooth_field(
    batch: int,
    shape: Sequence[int],
    max_displacement: float,
    generator: torch.Generator,
    control_spacing: int = 8,
    diffeomorphic: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Smooth random displacement ``(batch, ndim, *shape)``, voxels, float32 on ``device``.

    Coarse random noise upsampled and Gaussian-smoothed, scaled per item so that its largest
    vector length is ``U(0.25, 1) x max_displacement``; with ``diffeomorphic`` that field is a
    velocity integrated by scaling and squaring (no folding; the displacement is then about as
    large).  ``max_displacement <= 0`` gives zeros.  The random draws are made on the CPU from
    ``generator``, so a seed gives the same field on every device.
    """
    ndim = len(shape)
    if max_displacement <= 0:
        return torch.zeros(batch, ndim, *shape, device=device)
    field = coarse_noise(batch, ndim, shape, control_spacing, generator, device)
    length = field.pow(2).sum(1, keepdim=True).sqrt().flatten(1).amax(1).clamp_min(1e-6)
    target = (uniform(generator, batch, 0.25, 1.0) * max_displacement).to(field.device)
    field = field * (target / length).view(batch, *([1] * (ndim + 1)))
    return integrate_velocity(field) if diffeomorphic else field


def deform(
    image: torch.Tensor, u: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``image`` pulled through ``u`` (linear, border padding); ``labels`` with nearest neighbour."""
    moved = warp(image, u)
    moved_labels = None if labels is None else warp(labels.to(u.dtype), u, interpolation="nearest")
    return moved, moved_labels


def augment_intensity(image: torch.Tensor, settings: AugmentSettings, generator: torch.Generator) -> torch.Tensor:
    """Random gamma, contrast, smooth multiplicative bias and Gaussian noise, per item; the
    result is clipped at 0 and max-normalised again.  ``image``: ``(N, 1, *S)`` in [0, 1]."""
    n, ndim = image.shape[0], image.dim() - 2
    view = (n,) + (1,) * (ndim + 1)
    device = image.device

    def chosen() -> torch.Tensor:
        return (
            (torch.rand(n, generator=generator) < settings.probability).to(device=device, dtype=image.dtype).view(view)
        )

    x = image.clamp_min(0)
    if settings.gamma > 0:
        gamma = torch.exp(settings.gamma * torch.randn(n, generator=generator)).to(device, image.dtype).view(view)
        use = chosen()
        x = use * x.clamp_min(1e-6).pow(gamma) + (1 - use) * x
    if settings.contrast > 0:
        factor = uniform(generator, n, 1 - settings.contrast, 1 + settings.contrast).to(device, image.dtype).view(view)
        mean = x.flatten(1).mean(1).view(view)
        use = chosen()
        x = use * ((x - mean) * factor + mean) + (1 - use) * x
    if settings.bias_field > 0:
        field = coarse_noise(n, 1, image.shape[2:], max(image.shape[2:]) / 3.0, generator, device)
        peak = field.abs().flatten(1).amax(1).clamp_min(1e-6).view(view)
        amplitude = uniform(generator, n, 0, settings.bias_field).to(device).view(view)
        bias = torch.exp(field / peak * amplitude).to(image.dtype)
        use = chosen()
        x = use * x * bias + (1 - use) * x
    if settings.noise > 0:
        sigma = uniform(generator, n, 0, settings.noise).to(device, image.dtype).view(view)
        noise = torch.randn(image.shape, generator=generator).to(device, image.dtype)
        x = x + chosen() * sigma * noise
    x = x.clamp_min(0)
    peak = x.flatten(1).amax(1).clamp_min(1e-6).view(view)
    return x / peak


@dataclass
class Sample:
    """One image on the working grid: ``image`` ``(1, *S)`` in [0, 1]; optional ``labels``
    ``(1, *S)`` (integer values) in the label space named ``label_space``.  Pairs of different
    images are only made within one ``group`` (e.g. 2D slices at the same height); None = all."""

    name: str
    image: torch.Tensor
    labels: torch.Tensor | None = None
    label_space: str | None = None
    group: str | None = None


@dataclass
class PairBatch:
    """A batch of registration pairs ``(N, 1, *S)``; labels only when every pair has them in a
    common label space (else None); ``true_field`` (and its ``foreground`` mask) for pairs made
    with a known answer (:mod:`cnnreg.training.synth`)."""

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor | None = None
    moving_labels: torch.Tensor | None = None
    names: list[str] | None = None
    true_field: torch.Tensor | None = None  # (N, ndim, *S) voxels, when the answer is known
    foreground: torch.Tensor | None = None  # (N, 1, *S) where the true field is meaningful

    def to(self, device: torch.device) -> PairBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(
            move(self.fixed),
            move(self.moving),
            move(self.fixed_labels),
            move(self.moving_labels),
            self.names,
            move(self.true_field),
            move(self.foreground),
        )


def _stack_labels(
    fixed_items: Sequence[Sample], moving_items: Sequence[Sample]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Stacked ``(N, 1, *S)`` label maps of both sides, or ``(None, None)`` unless every sample has
    labels and all share one label space."""
    items = list(fixed_items) + list(moving_items)
    if any(item.labels is None for item in items) or len({item.label_space for item in items}) != 1:
        return None, None
    return (torch.stack([s.labels.float() for s in fixed_items]), torch.stack([s.labels.float() for s in moving_items]))


class PairSampler:
    """Random training pairs from a list of samples, augmented on the fly.

    Each pair is, with probability ``self_pair_fraction`` (always when the image has no partner
    in its ``group``), an image vs a copy of itself deformed by a random smooth field (up to
    ``max_displacement``), otherwise two different images of one group, each mildly deformed
    (``pair_displacement``); both images
    of every pair get independent intensity changes.  Labels follow the same deformations
    (nearest neighbour).

    Args:
        samples: the training images (on the working grid, CPU or device).
        settings: augmentation settings.
        generator: the random stream (seed it differently per process to shard sampling).
        intensity: apply intensity augmentation.
    """

    def __init__(
        self, samples: Sequence[Sample], settings: AugmentSettings, generator: torch.Generator, intensity: bool = True
    ):
        if not samples:
            raise ValueError("the pair sampler needs at least one image")
        self.samples = list(samples)
        self.settings = settings
        self.generator = generator
        self.intensity = intensity
        self.partners = [
            [j for j, other in enumerate(self.samples) if j != i and other.group == sample.group]
            for i, sample in enumerate(self.samples)
        ]

    def _pick(self, count: int) -> int:
        return int(torch.randint(count, (1,), generator=self.generator))

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> PairBatch:
        s = self.settings
        fixed_items, moving_items, names = [], [], []
        for _ in range(batch_size):
            first = self._pick(len(self.samples))
            partners = self.partners[first]
            self_pair = not partners or float(torch.rand(1, generator=self.generator)) < s.self_pair_fraction
            second = first if self_pair else partners[self._pick(len(partners))]
            fixed_items.append(self.samples[first])
            moving_items.append(self.samples[second])
            names.append(
                f"{self.samples[second].name}->{self.samples[first].name}" + (" (deformed)" if self_pair else "")
            )
        return self.make_batch(fixed_items, moving_items, device, names)

    def make_batch(self, fixed_items, moving_items, device, names) -> PairBatch:
        """Deform and augment the given (fixed, moving) samples into a batch on ``device``."""
        s = self.settings
        n = len(fixed_items)
        shape = fixed_items[0].image.shape[1:]
        fixed = torch.stack([item.image for item in fixed_items]).to(device)
        moving = torch.stack([item.image for item in moving_items]).to(device)
        fixed_labels, moving_labels = _stack_labels(fixed_items, moving_items)
        if fixed_labels is not None:
            fixed_labels, moving_labels = fixed_labels.to(device), moving_labels.to(device)
        same = torch.tensor([f is m for f, m in zip(fixed_items, moving_items)], device=device)
        view = (n, 1) + (1,) * len(shape)
        # moving: large deformation for self pairs, mild for pairs of different images
        big = random_smooth_field(
            n, shape, s.max_displacement, self.generator, s.control_spacing, s.diffeomorphic, device
        )
        small = random_smooth_field(
            n, shape, s.pair_displacement, self.generator, s.control_spacing, s.diffeomorphic, device
        )
        u_moving = torch.where(same.view(view), big, small)
        u_fixed = random_smooth_field(
            n, shape, s.pair_displacement, self.generator, s.control_spacing, s.diffeomorphic, device
        )
        fixed, fixed_labels = deform(fixed, u_fixed, fixed_labels)
        moving, moving_labels = deform(moving, u_moving, moving_labels)
        if self.intensity:
            fixed = augment_intensity(fixed, s, self.generator)
            moving = augment_intensity(moving, s, self.generator)
        return PairBatch(fixed, moving, fixed_labels, moving_labels, names)


def validation_pairs(
    samples: Sequence[Sample],
    settings: AugmentSettings,
    pairs_per_image: int = 2,
    cross_pairs: bool = True,
    seed: int = 12345,
    others: Sequence[Sample] = (),
) -> list[PairBatch]:
    """A fixed, seeded list of single-pair batches for validation.

    For each sample, ``pairs_per_image`` pairs of the image (fixed) vs a copy deformed by a
    random smooth field of up to ``settings.max_displacement`` (moving, labels deformed the
    same way); with ``cross_pairs``, also every ordered pair of different samples, and of a
    sample with each of ``others`` (e.g. the training images) both ways, within one ``group``
    -- unchanged images, labels kept only within one label space.  No intensity changes.
    """
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for sample in samples:
        for _ in range(pairs_per_image):
            shape = sample.image.shape[1:]
            u = random_smooth_field(
                1,
                shape,
                settings.max_displacement,
                generator,
                settings.control_spacing,
                settings.diffeomorphic,
                sample.image.device,
            )
            moving, moving_labels = deform(
                sample.image[None], u, None if sample.labels is None else sample.labels[None]
            )
            fixed_labels = None if sample.labels is None else sample.labels[None].float()
            pairs.append(
                PairBatch(sample.image[None], moving, fixed_labels, moving_labels, [f"{sample.name} (deformed)"])
            )
    if cross_pairs:
        ordered = [(a, b) for a in samples for b in samples if a is not b and a.group == b.group]
        ordered += [pair for a in samples for b in others if a.group == b.group for pair in ((a, b), (b, a))]
        for a, b in ordered:
            labels_ok = a.labels is not None and b.labels is not None and a.label_space == b.label_space
            pairs.append(
                PairBatch(
                    a.image[None],
                    b.image[None],
                    a.labels[None].float() if labels_ok else None,
                    b.labels[None].float() if labels_ok else None,
                    [f"{b.name}->{a.name}"],
                )
            )
    return pairs
