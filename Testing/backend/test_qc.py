"""The QC picture: folds in their own colour (never the det J colour map's), similarity in the title."""

from __future__ import annotations

import numpy as np
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
