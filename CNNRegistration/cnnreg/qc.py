"""Quality-control picture: fixed / moving / warped / checkerboard / det J with folds in red."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .image import to_array, working_axes


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate ``tiles`` x ``tiles`` squares of two equally shaped 2D arrays."""
    rows = (np.arange(a.shape[0]) * tiles // max(a.shape[0], 1)) % 2
    cols = (np.arange(a.shape[1]) * tiles // max(a.shape[1], 1)) % 2
    return np.where((rows[:, None] + cols[None, :]) % 2 == 0, a, b)


def _slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three central orthogonal slices of a 3D array (one slice for 2D), flipped so that
    the first array axis points up."""
    if volume.ndim == 2:
        return [np.flipud(volume)]
    k, j, i = (n // 2 for n in volume.shape)
    return [np.flipud(volume[k]), np.flipud(volume[:, j]), np.flipud(volume[:, :, i])]


def _aspects(image: sitk.Image) -> list[float]:
    spacing = np.asarray(image.GetSpacing()[::-1])[list(working_axes(image))]  # array-axis order
    if len(spacing) == 2:
        return [spacing[0] / spacing[1]]
    return [spacing[1] / spacing[2], spacing[0] / spacing[2], spacing[0] / spacing[1]]


def qc_figure(
    fixed: sitk.Image, moving_on_fixed: sitk.Image, warped: sitk.Image, jacobian: sitk.Image, path: str
) -> None:
    """Write a PNG grid: one row per orthogonal slice, columns fixed, moving (on the fixed grid,
    before registration), warped, checkerboard fixed|warped, det J (blue-white-red centred
    on 1; voxels with det J <= 0 painted pure red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    def scaled(image: sitk.Image) -> np.ndarray:
        array = to_array(sitk.Cast(image, sitk.sitkFloat32))
        low, high = np.percentile(array, [0.5, 99.5])
        return np.clip((array - low) / max(high - low, 1e-12), 0, 1)

    volumes = [scaled(fixed), scaled(moving_on_fixed), scaled(warped)]
    det = to_array(jacobian)
    rows = list(zip(*[_slices(v) for v in volumes], _slices(det)))
    aspects = _aspects(fixed)
    titles = ["fixed", "moving", "warped", "checkerboard", "det J (folds red)"]
    figure, axes = plt.subplots(len(rows), 5, figsize=(15, 3.2 * len(rows)), squeeze=False)
    span = max(float(np.abs(det - 1).max()), 1e-3)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=1.0 - span, vmax=1.0 + span)
    for row, ((f, m, w, d), aspect) in enumerate(zip(rows, aspects)):
        panels = [f, m, w, checkerboard(f, w)]
        for column, panel in enumerate(panels):
            axes[row, column].imshow(panel, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        shown = axes[row, 4].imshow(d, cmap="bwr", norm=norm, aspect=aspect, interpolation="nearest")
        folds = np.ma.masked_where(d > 0, np.ones_like(d))
        axes[row, 4].imshow(folds, cmap="autumn", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        for column in range(5):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
            if row == 0:
                axes[row, column].set_title(titles[column])
    figure.colorbar(shown, ax=axes[:, 4].tolist(), shrink=0.8)
    folded = 100.0 * float(np.mean(det <= 0))
    figure.suptitle(f"det J: min {det.min():.3f}, folding {folded:.4f} %")
    figure.savefig(path, dpi=80)
    plt.close(figure)
