"""Image grids (size, spacing, origin, direction): are two the same, and how to name one in a message.

numpy and SimpleITK only, so that the Slicer module compares grids with the backend's rule
without importing torch.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

#: relative tolerance of spacing and direction comparisons (origin: this times the largest spacing, x 10)
GEOMETRY_TOLERANCE = 1e-4


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
    """True when ``a`` and ``b`` share size, origin, spacing and direction (within tolerance)."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    scale = max(max(a.GetSpacing()), 1.0)
    return (
        np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tolerance, atol=0)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tolerance * scale * 10)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tolerance)
    )


def describe_grid(image: sitk.Image) -> str:
    """Size, spacing and origin of ``image``'s grid, for messages."""
    return (
        f"size {image.GetSize()}, spacing {tuple(round(s, 6) for s in image.GetSpacing())}, origin "
        f"{tuple(round(o, 4) for o in image.GetOrigin())}"
    )
