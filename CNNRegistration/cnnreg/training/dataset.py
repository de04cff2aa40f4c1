"""Training data: image lists and folders, and samples resampled to a network's working grid.

A :class:`cnnreg.training.augment.Sample` holds one image ``(1, *S)`` (normalised, on the working
grid ``S``) and optionally its label map ``(1, *S)`` (nearest-neighbour resampled).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import image as im
from ..errors import InputError
from ..spatial import resize_image
from .augment import Sample
from .settings import TrainSettings


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


def load_samples(
    image_paths: Sequence[str],
    label_paths: Sequence[str] | None,
    settings: TrainSettings,
    ndim: int | None = None,
    label_space: str = "labels",
) -> list[Sample]:
    """Read images (and label maps on their grids) and resample them to the working shape."""
    label_paths = list(label_paths or [])
    if label_paths and len(label_paths) != len(image_paths):
        raise InputError(
            f"{len(image_paths)} images but {len(label_paths)} label maps; give one label map per image, in order"
        )
    samples = []
    for index, path in enumerate(image_paths):
        image = im.read_image(path, "training image")
        array = im.to_array(image)
        if ndim is None:
            ndim = array.ndim
        if array.ndim != ndim:
            raise InputError(
                f"training image {path} is {array.ndim}D but the others are {ndim}D; train 2D and 3D models separately"
            )
        labels = None
        if label_paths:
            import SimpleITK as sitk

            label_path = label_paths[index]
            if not os.path.isfile(label_path):
                raise InputError(f"label map not found: {label_path}")
            label_image = sitk.ReadImage(label_path)
            im.check_labels(label_image, image, f"labels {label_path}")
            labels = im.to_array(label_image)
        samples.append(
            make_sample(Path(path).name, array, settings.shape_for(ndim), settings.normalization, labels, label_space)
        )
    return samples
