"""Quality-control picture: fixed / moving / warped / checkerboard / difference / det J (folds yellow)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .image import to_array, working_axes
from .settings import JACOBIAN_CONTRACTION_RGB, JACOBIAN_EXPANSION_RGB, JACOBIAN_FOLD_RGB, JACOBIAN_KEPT_RGB


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


#: colour of folded voxels (det J <= 0): not in the det J colour map, so a fold cannot be read
#: as strong expansion or contraction (the Slicer overlay uses the same colours)
FOLD_COLOUR = JACOBIAN_FOLD_RGB
#: the plane a slice lies in, by the world (LPS) axis its normal is closest to
PLANE_NAMES = ("sagittal", "coronal", "axial")


def slice_names(image: sitk.Image) -> list[str]:
    """Names of the three central slices of :func:`_slices` (the planes normal to index axes k,
    j, i), by the image's direction: axial, coronal or sagittal with the slice index."""
    if image.GetDimension() == 2 or len(working_axes(image)) == 2:
        return ["2D image"]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)  # columns: world direction of i, j, k
    size = image.GetSize()
    names = []
    for axis, letter in ((2, "k"), (1, "j"), (0, "i")):
        plane = PLANE_NAMES[int(np.argmax(np.abs(direction[:, axis])))]
        names.append(f"{plane} ({letter} = {size[axis] // 2})")
    return names


def jacobian_colours(det: np.ndarray):
    """The det J colour map (blue contraction, white 1, red expansion) and its norm centred on 1,
    spanning the largest change in ``det`` (at most 0 .. 2)."""
    from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm

    colours = LinearSegmentedColormap.from_list(
        "det J", [JACOBIAN_CONTRACTION_RGB, JACOBIAN_KEPT_RGB, JACOBIAN_EXPANSION_RGB]
    )
    span = min(max(float(np.abs(det - 1).max()), 1e-3), 1.0)
    return colours, TwoSlopeNorm(vcenter=1.0, vmin=1.0 - span, vmax=1.0 + span)


def draw_jacobian(axis, det_slice: np.ndarray, colours, norm, aspect: float = 1.0):
    """Draw a det J slice on a matplotlib ``axis`` with its folds (det J <= 0) in
    :data:`FOLD_COLOUR` on top; returns the image for a colour bar."""
    from matplotlib.colors import ListedColormap

    shown = axis.imshow(det_slice, cmap=colours, norm=norm, aspect=aspect, interpolation="nearest")
    folds = np.ma.masked_where(det_slice > 0, np.zeros_like(det_slice))
    axis.imshow(folds, cmap=ListedColormap([FOLD_COLOUR]), aspect=aspect, interpolation="nearest")
    return shown


def qc_figure(
    fixed: sitk.Image,
    moving_on_fixed: sitk.Image,
    warped: sitk.Image,
    jacobian: sitk.Image,
    path: str,
    summary: dict | None = None,
) -> None:
    """Write a PNG grid: one row per orthogonal slice (axial, coronal, sagittal by the image's
    direction, with the slice index; first remaining axis up), columns fixed, moving (on the
    fixed grid, before registration), warped, checkerboard fixed|warped (tile borders drawn),
    |fixed - warped| (residual misalignment), det J (blue = contraction, white = 1, red =
    expansion; folds, det J <= 0, in :data:`FOLD_COLOUR`, as in the Slicer overlay).  ``summary``
    (the run's) puts the similarity before/after and the folding in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    def scaled(image: sitk.Image) -> np.ndarray:
        array = to_array(sitk.Cast(image, sitk.sitkFloat32))
        low, high = np.percentile(array, [0.5, 99.5])
        return np.clip((array - low) / max(high - low, 1e-12), 0, 1)

    volumes = [scaled(fixed), scaled(moving_on_fixed), scaled(warped)]
    det = to_array(jacobian)
    rows = list(zip(*[_slices(v) for v in volumes], _slices(det)))
    aspects = _aspects(fixed)
    names = slice_names(fixed)
    titles = ["fixed", "moving (before)", "warped (after)", "checkerboard fixed | warped", "|fixed - warped|", "det J"]
    figure, axes = plt.subplots(len(rows), 6, figsize=(19, 3.3 * len(rows) + 1.0), squeeze=False)
    colours, norm = jacobian_colours(det)
    tiles = 8
    for row, ((f, m, w, d), aspect, name) in enumerate(zip(rows, aspects, names)):
        for column, panel in enumerate([f, m, w, checkerboard(f, w, tiles)]):
            axes[row, column].imshow(panel, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        for position in np.arange(1, tiles) / tiles:  # tile borders of the checkerboard
            axes[row, 3].axhline(position * f.shape[0] - 0.5, color="cyan", linewidth=0.6, alpha=0.7)
            axes[row, 3].axvline(position * f.shape[1] - 0.5, color="cyan", linewidth=0.6, alpha=0.7)
        axes[row, 4].imshow(np.abs(f - w), cmap="magma", vmin=0, vmax=0.5, aspect=aspect, interpolation="nearest")
        shown = draw_jacobian(axes[row, 5], d, colours, norm, aspect)
        axes[row, 0].set_ylabel(name, fontsize=11)
        for column in range(6):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
            if row == 0:
                axes[row, column].set_title(titles[column], fontsize=10)
    bar = figure.colorbar(shown, ax=axes[:, 5].tolist(), shrink=0.8)
    bar.set_label("det J (1 = volume kept; < 1 contraction, > 1 expansion)")
    folded = 100.0 * float(np.mean(det <= 0))
    figure.legend(
        handles=[Patch(color=FOLD_COLOUR, label=f"fold: det J <= 0 ({folded:.4f} % of voxels)")],
        loc="lower right",
        fontsize=11,
        frameon=False,
    )
    title = f"det J: min {det.min():.3f}, folding {folded:.4f} %"
    if summary and summary.get("similarity_before") is not None:
        title = (
            f"{summary.get('mode', '')} registration, {summary.get('similarity', 'similarity')}: "
            f"{summary['similarity_before']:.4f} before -> {summary['similarity_after']:.4f} after; " + title
        )
    figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=80)
    plt.close(figure)
