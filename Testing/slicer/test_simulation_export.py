"""Export for simulation from result nodes with the real ``python -m cnnreg simulation-inputs``.

The nodes are made here with known values (an anisotropic oblique patient grid, a CT in HU, a
constant det J, an affine determinant in the summary), so every number written has a closed form.
"""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

from mrmlhelpers import (  # noqa: E402
    JACOBIAN,
    OBLIQUE,
    ORGANS_AFFINE_DETERMINANT,
    ORGANS_ORIGIN,
    ORGANS_SPACING,
    makeVolume,
    simulationResultNodes,
)

from CNNRegistrationLib import nodes, process  # noqa: E402
from CNNRegistrationLib.simulation import SimulationExportError, exportForSimulation  # noqa: E402


def backendImportable() -> bool:
    completed = subprocess.run(
        [sys.executable, "-c", "import cnnreg.simulation"],
        env=process.backendEnvironment(),
        capture_output=True,
        timeout=120,
    )
    return completed.returncode == 0


pytestmark = pytest.mark.skipif(not backendImportable(), reason="cnnreg.simulation is not importable")

SPACING, ORIGIN, AFFINE_DETERMINANT = ORGANS_SPACING, ORGANS_ORIGIN, ORGANS_AFFINE_DETERMINANT


@pytest.fixture
def result(scene):
    return simulationResultNodes(scene)


def test_export_for_simulation_writes_every_map_with_the_organ_names(result, tmp_path):
    from cnnreg.simulation import linear_attenuation, read_interfile

    activity = tmp_path / "activity.csv"
    activity.write_text("organ,value\nbody,2.0\nlung,0.5\n")
    out = tmp_path / "simulation"
    transform = result["transform"]
    transform.SetNodeReferenceID(nodes.MOVING_VOLUME_REFERENCE, result["phantomVolume"].GetID())
    nodesBefore = result["fixed"].GetScene().GetNumberOfNodes()

    export = exportForSimulation(
        transform,
        result["segmentation"],
        str(out),
        ctVolumeNode=result["fixed"],
        phantomLabelsNode=result["phantom"],
        energies=(140,),
        activityTable=str(activity),
        formats=("nifti", "interfile"),
    )

    # the organ map on the patient grid, labels and names carried through
    organs = sitk.ReadImage(str(out / "organs.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(organs), result["organs"])
    np.testing.assert_allclose(organs.GetSpacing(), SPACING, atol=1e-5)
    assert json.loads((out / "organs.json").read_text()) == {"1": "body", "2": "lung"}
    assert export.record["organs"] == {"1": "body", "2": "lung"}

    # volumes: label counts, det J x affine determinant, the phantom's own grid
    voxel_ml = math.prod(SPACING) / 1000.0
    with open(out / "organ_volumes.csv", encoding="utf-8") as stream:
        rows = {row["organ"]: row for row in csv.DictReader(stream)}
    body_voxels = int((result["organs"] == 1).sum())
    lung_voxels = int((result["organs"] == 2).sum())
    assert float(rows["body"]["warped_ml"]) == pytest.approx(body_voxels * voxel_ml, rel=1e-6)
    assert float(rows["lung"]["jacobian_ml"]) == pytest.approx(
        lung_voxels * voxel_ml * JACOBIAN * AFFINE_DETERMINANT, rel=1e-5
    )
    assert float(rows["body"]["phantom_ml"]) == pytest.approx((6**3 - 2**3) * 27 / 1000.0, rel=1e-6)
    assert float(rows["lung"]["phantom_ml"]) == pytest.approx(2**3 * 27 / 1000.0, rel=1e-6)

    # activity: the summed map and its total; mu at 140 keV from the CT's water and air
    activityMap = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "activity.nii.gz")))
    assert activityMap[result["organs"] == 1] == pytest.approx(2.0)
    assert activityMap[result["organs"] == 2] == pytest.approx(0.5)
    assert export.record["total_activity"] == pytest.approx((2.0 * body_voxels + 0.5 * lung_voxels) * voxel_ml)
    mu, spacing = read_interfile(out / "mu_ct_140keV.h33")
    np.testing.assert_allclose(spacing, SPACING, atol=1e-5)
    body = result["organs"] == 1
    assert mu[body] == pytest.approx(linear_attenuation("water", 140), rel=1e-5)
    assert mu[result["organs"] == 0] == pytest.approx(linear_attenuation("air", 140), rel=1e-5)

    # the warped organs come back into the scene as a segmentation with their names
    loaded = export.organsSegmentation
    assert loaded is not None and loaded.GetName().startswith("phantom organs registered for simulation")
    segmentation = loaded.GetSegmentation()
    names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments()))
    assert names == ["body", "lung"]
    assert result["fixed"].GetScene().GetNumberOfNodes() > nodesBefore

    # a second export into the same folder needs overwrite; with it the folder is replaced
    with pytest.raises(SimulationExportError, match="exists|--overwrite"):
        exportForSimulation(transform, result["segmentation"], str(out), loadOrgans=False)
    again = exportForSimulation(transform, result["segmentation"], str(out), overwrite=True, loadOrgans=False)
    assert again.organsSegmentation is None and not (out / "activity.nii.gz").exists()


def test_a_label_map_gives_its_colour_names(result, tmp_path):
    colors = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "organ colours")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(3)
    colors.SetColor(0, "background", 0, 0, 0, 0)
    colors.SetColor(1, "soft tissue", 0.9, 0.7, 0.6, 1)
    colors.SetColor(2, "left lung", 0.2, 0.5, 0.9, 1)
    fixed = result["fixed"]
    labelmap = makeVolume(
        slicer.mrmlScene, result["organs"], SPACING, ORIGIN, OBLIQUE, "organs map", "vtkMRMLLabelMapVolumeNode"
    )
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    export = exportForSimulation(result["transform"], labelmap, str(tmp_path / "sim"))
    assert export.record["organs"] == {"1": "soft tissue", "2": "left lung"}
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "sim" / "organs.nii.gz"))).max() == 2
    assert fixed.GetScene() is slicer.mrmlScene


def test_export_refuses_what_it_cannot_do_and_adds_nothing(result, tmp_path):
    scene = result["fixed"].GetScene()
    before = scene.GetNumberOfNodes()
    with pytest.raises(SimulationExportError, match="photon energy"):
        exportForSimulation(
            result["transform"], result["segmentation"], str(tmp_path / "a"), ctVolumeNode=result["fixed"]
        )
    stranger = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "not ours")
    with pytest.raises(SimulationExportError, match="carries no summary"):
        exportForSimulation(stranger, result["segmentation"], str(tmp_path / "b"))
    bad = tmp_path / "activity.csv"
    bad.write_text("organ,value\nliver,3\n")
    with pytest.raises(SimulationExportError, match="liver"):
        exportForSimulation(result["transform"], result["segmentation"], str(tmp_path / "c"), activityTable=str(bad))
    assert scene.GetNumberOfNodes() == before + 1  # only the stranger transform
    assert not any(os.path.exists(tmp_path / name) for name in ("a", "b", "c"))
