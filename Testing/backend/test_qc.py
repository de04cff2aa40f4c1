"""The QC picture: folds in their own colour (never the det J colour map's), similarity in the title."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cnnreg.qc import FOLD_COLOUR, qc_figure


def _fold_pixels(path) -> int:
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    picture = imread(str(path))[..., :3]
    return int(np.all(np.abs(picture - np.asarray(to_rgb(FOLD_COLOUR))) < 0.02, axis=-1).sum())


def test_folds_and_only_folds_are_painted_in_the_fold_colour(tmp_path, synth):
    array = synth.blob_array((24, 28, 26), seed=1)
    image = synth.make_image(array, spacing=(1.0, 1.2, 2.0))
    summary = {"mode": "instance", "similarity": "lncc", "similarity_before": 0.31, "similarity_after": 0.52}
    counts = {}
    for fold in (False, True):
        det = 1.0 + 0.9 * np.sin(np.linspace(0, 6, array.size)).reshape(array.shape)  # strong expansion/contraction
        if fold:
            det[10:14, 12:16, 11:15] = -0.5  # around the centre, so every central slice cuts it
        jacobian = sitk.GetImageFromArray(det.astype(np.float32))
        jacobian.CopyInformation(image)
        path = tmp_path / f"qc_{fold}.png"
        qc_figure(image, image, image, jacobian, str(path), summary=summary)
        counts[fold] = _fold_pixels(path)
    # without folds only the legend patch has the colour (no det J value maps onto it); the fold adds
    # its voxels on all three central slices
    assert 0 < counts[False] < 300
    assert counts[True] > counts[False] + 100, counts


def test_slices_are_named_by_the_images_direction(synth):
    from cnnreg.qc import slice_names

    array = np.zeros((20, 30, 40), np.float32)  # (k, j, i)
    assert slice_names(synth.make_image(array)) == ["axial (k = 10)", "coronal (j = 15)", "sagittal (i = 20)"]
    # a coronal acquisition: k runs along y (anterior-posterior), j along z
    coronal = synth.make_image(array, direction=(1, 0, 0, 0, 0, 1, 0, 1, 0))
    assert slice_names(coronal) == ["coronal (k = 10)", "axial (j = 15)", "sagittal (i = 20)"]
    tilted = synth.make_image(array, direction=synth.rotation_matrix((1.0, 0.2, 0.1), 20.0).flatten())
    assert [name.split()[0] for name in slice_names(tilted)] == ["axial", "coronal", "sagittal"]
    # turned 80 degrees about x (and a little about y): k now runs mostly along y
    turned = synth.make_image(array, direction=synth.rotation_matrix((1.0, 0.1, 0.0), 80.0).flatten())
    assert [name.split()[0] for name in slice_names(turned)] == ["coronal", "axial", "sagittal"]


def test_the_qc_and_slicer_colours_are_one_definition():
    from cnnreg.settings import JACOBIAN_CONTRACTION_RGB, JACOBIAN_EXPANSION_RGB, JACOBIAN_FOLD_RGB, jacobian_rgb

    assert FOLD_COLOUR == JACOBIAN_FOLD_RGB == jacobian_rgb(0.0) == jacobian_rgb(-3.0)
    assert jacobian_rgb(1.0) == (1.0, 1.0, 1.0)
    assert jacobian_rgb(2.0) == pytest.approx(JACOBIAN_EXPANSION_RGB) and jacobian_rgb(1e-9) == pytest.approx(
        JACOBIAN_CONTRACTION_RGB
    )
    assert jacobian_rgb(1.5) == pytest.approx(tuple((1 + c) / 2 for c in JACOBIAN_EXPANSION_RGB))
