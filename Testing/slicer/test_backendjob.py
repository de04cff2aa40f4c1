"""A whole registration job against a fake backend with a known answer (a constant LPS
translation): inputs are left alone, output nodes reproduce the backend's files, labels
come back as the same kind of node, and the temporary folder is removed (or kept)."""

import os
import shutil

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

from mrmlhelpers import HERE, OBLIQUE, blob, makeVolume  # noqa: E402

from CNNRegistrationLib import backendjob, nodes  # noqa: E402
from CNNRegistrationLib.panel import PanelSettings  # noqa: E402

SHAPE = (14, 16, 18)
SPACING = (1.3, 1.1, 1.6)
ORIGIN = (4.0, -6.5, 9.25)
TRANSLATION_LPS = np.array([1.5, -2.0, 1.0])  # the fake backend's answer


@pytest.fixture
def fakeBackend(tmp_path):
    package = tmp_path / "fake" / "cnnreg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(os.path.join(HERE, "fake_cnnreg_main.py"), package / "__main__.py")
    return str(tmp_path / "fake")


def pair(scene):
    fixed = makeVolume(scene, blob(SHAPE, (7, 8, 9), 3.5), SPACING, ORIGIN, OBLIQUE, "fixed")
    moving = makeVolume(scene, blob(SHAPE, (7, 9, 8), 3.5) * 50, SPACING, ORIGIN, OBLIQUE, "moving")
    return fixed, moving


def labelArray():
    labels = np.zeros(SHAPE, np.int16)
    labels[3:9, 4:11, 5:12] = 1
    labels[9:13, 6:14, 8:16] = 2
    return labels


def test_job_outputs_with_label_map(scene, tmp_path, fakeBackend):
    fixed, moving = pair(scene)
    labelmap = makeVolume(scene, labelArray(), SPACING, ORIGIN, OBLIQUE, "labels", "vtkMRMLLabelMapVolumeNode")
    inputs = {node.GetName(): slicer.util.arrayFromVolume(node).copy() for node in (fixed, moving, labelmap)}
    progress = []
    job = backendjob.RegistrationJob(
        fixed,
        moving,
        PanelSettings(),
        movingLabelsNode=labelmap,
        fixedMaskNode=labelmap,
        extraPythonPath=[fakeBackend],
        temporaryDirectory=str(tmp_path),
    )
    result = job.run(progressCallback=progress.append, timeout=120)

    kinds = [event["event"] for event in progress]
    assert kinds.count("progress") == 3 and "done" in kinds and kinds[-1] == "exit"
    assert job.lastProgress["iteration"] == 3
    assert not os.path.exists(job.workDirectory) and result.workDirectory is None
    assert result.summary["folding_percent"] == 0.0
    assert result.summary["fixed_mask"].endswith("fixed_mask.nrrd")

    # Inputs untouched (voxels, geometry, no transform).
    for node in (fixed, moving, labelmap):
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), inputs[node.GetName()])
        assert node.GetParentTransformNode() is None

    # The transform node holds the backend's field (RAS, from parent) and its references.
    transform = result.outputTransform
    assert transform.IsA("vtkMRMLGridTransformNode")
    assert transform.GetNodeReference(nodes.FIXED_VOLUME_REFERENCE) is fixed
    assert transform.GetNodeReference(nodes.MOVING_VOLUME_REFERENCE) is moving
    assert '"folding_percent"' in transform.GetAttribute(nodes.SUMMARY_ATTRIBUTE)
    point = nodes.gridPointsRAS(fixed)[2, 3, 4]
    moved = np.array(transform.GetTransformFromParent().TransformPoint(point))
    np.testing.assert_allclose(moved - point, TRANSLATION_LPS * [-1, -1, 1], atol=1e-5)

    # The transform applied to the moving volume reproduces the warped volume.
    warped = slicer.util.arrayFromVolume(result.outputVolume)
    resampled = nodes.resampleThroughTransform(moving, fixed, transform)
    inside = (warped > 0) & (resampled > 0)
    assert inside.mean() > 0.8
    assert np.abs(warped - resampled)[inside].max() < 1e-3 * float(warped.max() - warped.min())
    np.testing.assert_allclose(nodes.volumeGeometry(result.outputVolume)[0], nodes.volumeGeometry(fixed)[0], atol=1e-4)

    # Labels come back as a label map, warped with nearest neighbour.
    warpedLabels = result.outputLabels
    assert warpedLabels.IsA("vtkMRMLLabelMapVolumeNode")
    expectedLabels = nodes.resampleThroughTransform(labelmap, fixed, transform, interpolation="nearest")
    agreement = (slicer.util.arrayFromVolume(warpedLabels) == expectedLabels).mean()
    assert agreement > 0.99
    assert set(np.unique(slicer.util.arrayFromVolume(warpedLabels))) == {0, 1, 2}
    display = result.outputJacobian.GetDisplayNode()
    assert display.GetColorNode().GetName() == nodes.JACOBIAN_COLOR_NODE_NAME


def test_job_outputs_with_segmentation_and_given_nodes(scene, tmp_path, fakeBackend):
    fixed, moving = pair(scene)
    labelmap = makeVolume(scene, labelArray(), SPACING, ORIGIN, OBLIQUE, "labels", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
    segmentation.CreateDefaultDisplayNodes()
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segmentation.GetSegmentation().GetNthSegment(0).SetName("liver")
    segmentation.GetSegmentation().GetNthSegment(1).SetName("spleen")
    outputVolume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my output")
    outputTransform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "my transform")
    settings = PanelSettings(keepTemporaryFiles=True)
    job = backendjob.RegistrationJob(
        fixed,
        moving,
        settings,
        movingLabelsNode=segmentation,
        outputVolumeNode=outputVolume,
        outputTransformNode=outputTransform,
        extraPythonPath=[fakeBackend],
        temporaryDirectory=str(tmp_path),
    )
    result = job.run(timeout=120)
    assert result.outputVolume is outputVolume and result.outputTransform is outputTransform
    assert outputVolume.GetName() == "my output"
    assert result.workDirectory and os.path.isdir(result.workDirectory)  # kept on request
    assert os.path.isfile(os.path.join(result.workDirectory, "output", "displacement.nii.gz"))
    segments = result.outputLabels.GetSegmentation()
    assert result.outputLabels.IsA("vtkMRMLSegmentationNode")
    assert sorted(segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())) == [
        "liver",
        "spleen",
    ]
    # Segmentation output: the segment voxels match the warped label map.
    labels, _ = nodes.segmentationToLabelImage(result.outputLabels, fixed)
    expected = nodes.resampleThroughTransform(labelmap, fixed, outputTransform, interpolation="nearest")
    assert ((sitk.GetArrayFromImage(labels) > 0) == (expected > 0)).mean() > 0.99
    shutil.rmtree(result.workDirectory)
