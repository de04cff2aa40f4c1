"""Training data: image lists and folders, and samples resampled to a network's working grid.

A :class:`cnnreg.training.augment.Sample` holds one image ``(1, *S)`` (normalised, on the working
grid ``S``) and optionally its label map ``(1, *S)`` (nearest-neighbour resampled).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import image as im
from ..spatial import resize_image
from .augment import Sample


def resize_labels(labels: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resampling of a label map ``(N, 1, *S)`` to ``shape`` (same field of view,
    voxel centres matched as in :func:`cnnreg.spatial.resize_image`)."""
    if tuple(labels.shape[2:]) == tuple(shape):
        return labels
    return F.interpolate(labels.float(), size=tuple(shape), mode="nearest-exact")


def make_sample(
    name: str,
    array: np.ndarray,
    working_shape: Sequence[int],
    normalization: str = "max",
    labels: np.ndarray | None = None,
    label_space: str | None = None,
    group: str | None = None,
) -> Sample:
    """A :class:`Sample` from an image array ``(D, H, W)``/``(H, W)`` (and optional label map),
    normalised and resampled to ``working_shape``.  Labels keep their values (see
    :func:`index_labels` to make them consecutive)."""
    array = im.normalize(np.asarray(array, dtype=np.float32), normalization)
    image = resize_image(torch.from_numpy(np.ascontiguousarray(array))[None, None], working_shape)[0]
    label_tensor = None
    if labels is not None:
        label_tensor = resize_labels(torch.from_numpy(np.asarray(labels, dtype=np.float32))[None, None], working_shape)[
            0
        ]
    return Sample(name, image.float(), label_tensor, label_space if labels is not None else None, group)


def index_labels(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """Replace label values by consecutive indices (0 = background stays 0) per label space, in
    place; returns ``{space: [value of index 0, 1, ...]}``."""
    spaces: dict[str, set[int]] = {}
    for sample in samples:
        if sample.labels is not None:
            spaces.setdefault(sample.label_space or "", set()).update(int(v) for v in torch.unique(sample.labels))
    tables = {}
    for space, values in spaces.items():
        table = sorted(values | {0})
        tables[space] = table
        lookup = {value: index for index, value in enumerate(table)}
        for sample in samples:
            if sample.labels is not None and (sample.label_space or "") == space:
                mapped = torch.zeros_like(sample.labels)
                for value in torch.unique(sample.labels).tolist():
                    mapped[sample.labels == value] = float(lookup[int(value)])
                sample.labels = mapped
    return tables
