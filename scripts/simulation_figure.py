#!/usr/bin/env python
"""The README's phantom-to-CT picture: the patient CT, the warped phantom organs, an activity map
and the attenuation map at 140 keV, made with `cnnreg simulation-inputs` from a registration of
the xcat_ct case.

    python scripts/simulation_figure.py benchmark/runs/xcat_ct-seed0/phantom-to-ct \\
        benchmark/cases/xcat_ct-seed0 docs/phantom-to-ct.png

The activity (relative units) and the materials are illustrative: body 1, lungs 0.2, spine 4;
body muscle, lungs lung tissue at 0.26 g/cm^3, spine cortical bone at 1.4 g/cm^3.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
try:
    import cnnreg  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "CNNRegistration"))

from cnnreg.cli import main as cnnreg_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    result, case, out = (Path(a) for a in (argv or sys.argv[1:]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "names.json").write_text(json.dumps({"1": "body", "2": "lungs", "3": "spine"}))
        (folder / "activity.csv").write_text("organ,relative\nbody,1\nlungs,0.2\nspine,4\n")
        (folder / "materials.csv").write_text("body,muscle\nlungs,lungtissue:0.26\nspine,bonecortical:1.4\n")
        code = cnnreg_main(
            [
                "simulation-inputs", "--result", str(result), "--label-names", str(folder / "names.json"),
                "--activity", str(folder / "activity.csv"), "--ct", str(case / "fixed.nii.gz"),
                "--materials", str(folder / "materials.csv"), "--moving-labels", str(case / "moving_labels.nii.gz"),
                "--energy", "140", "--out", str(folder / "sim"),
            ]
        )  # fmt: skip
        if code != 0:
            return code
        sim = folder / "sim"
        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "fixed.nii.gz")))
        organs = sitk.GetArrayFromImage(sitk.ReadImage(str(sim / "organs.nii.gz")))
        activity = sitk.GetArrayFromImage(sitk.ReadImage(str(sim / "activity.nii.gz")))
        mu = sitk.GetArrayFromImage(sitk.ReadImage(str(sim / "mu_ct_140keV.nii.gz")))
        spacing = sitk.ReadImage(str(case / "fixed.nii.gz")).GetSpacing()
        record = json.loads((sim / "simulation.json").read_text())
    k = int(np.argmax((organs == 2).sum(axis=(1, 2))))  # the axial slice with the most lung
    j = ct.shape[1] // 2
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    aspect = spacing[2] / spacing[0]
    for row, (cut, kwargs) in enumerate(
        ((lambda a: a[k], {}), (lambda a: a[:, j], {"aspect": aspect, "origin": "lower"}))
    ):
        axes[row, 0].imshow(cut(ct), cmap="gray", vmin=-1000, vmax=400, **kwargs)
        axes[row, 1].imshow(cut(ct), cmap="gray", vmin=-1000, vmax=400, **kwargs)
        shown = np.ma.masked_equal(cut(organs), 0)
        axes[row, 1].imshow(shown, cmap="Set1", vmin=1, vmax=9, alpha=0.45, interpolation="nearest", **kwargs)
        image = axes[row, 2].imshow(cut(activity), cmap="inferno", **kwargs)
        fig.colorbar(image, ax=axes[row, 2], fraction=0.04, label="relative activity")
        image = axes[row, 3].imshow(cut(mu), cmap="viridis", vmin=0, vmax=0.25, **kwargs)
        fig.colorbar(image, ax=axes[row, 3], fraction=0.04, label="mu at 140 keV (1/cm)")
    for ax, title in zip(
        axes[0], ("patient CT (HU)", "warped phantom organs", "activity map", "attenuation map (from the CT)")
    ):
        ax.set_title(title)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel(f"axial, slice k = {k}")
    axes[1, 0].set_ylabel(f"coronal, j = {j}")
    volumes = "; ".join(
        f"{row['organ']} {row['warped_ml'] / 1000:.2f} l" for row in record["organ_volumes"] if row["organ"] != "spine"
    )
    fig.suptitle(
        f"XCAT vmale50 phantom warped onto a 512x512x133 chest CT (cnnreg --preset phantom-to-ct) and its "
        f"simulator inputs; warped volumes: {volumes}"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=60)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
