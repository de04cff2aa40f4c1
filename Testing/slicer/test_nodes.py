"""Volume nodes <-> files and displacement fields <-> grid transform nodes, checked against
Slicer's own storage nodes and SimpleITK on anisotropic, oblique, off-origin grids."""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")
vtk = pytest.importorskip("vtk")

from mrmlhelpers import OBLIQUE, blob, ijkToRas, makeVolume, rotation  # noqa: E402

from CNNRegistrationLib import nodes  # noqa: E402

FIXED_SHAPE = (18, 22, 26)  # (k, j, i)
FIXED_SPACING = (1.7, 0.9, 1.3)  # (i, j, k) mm
FIXED_ORIGIN = (12.5, -30.25, 7.75)  # RAS mm
LPS_TRANSLATION = np.array([2.6, -1.9, 3.3])  # mm


def fixedVolume(scene):
    array = blob(FIXED_SHAPE, (9, 10, 12), 5.0)
    return makeVolume(scene, array, FIXED_SPACING, FIXED_ORIGIN, OBLIQUE, name="fixed")


def movingVolume(scene, fixed):
    """A larger, differently oriented volume that covers the fixed one (plus any test shift)."""
    shape = (30, 30, 30)
    spacing = (2.4, 2.2, 2.3)
    directions = rotation(1, -0.3) @ rotation(2, 0.2)
    center = nodes.gridPointsRAS(fixed).reshape(-1, 3).mean(axis=0)
    halfExtent = directions @ (np.array(spacing) * (np.array(shape[::-1]) - 1) / 2)
    array = blob(shape, (13, 16, 15), 4.0) * 100.0 + 20.0
    return makeVolume(scene, array, spacing, center - halfExtent, directions, name="moving")


def constantField(reference: "sitk.Image", vectorLps) -> "sitk.Image":
    size = reference.GetSize()
    vectors = np.broadcast_to(np.asarray(vectorLps, dtype=np.float64), (size[2], size[1], size[0], 3))
    field = sitk.GetImageFromArray(np.ascontiguousarray(vectors), isVector=True)
    field.CopyInformation(reference)
    return field


def varyingField(reference: "sitk.Image") -> "sitk.Image":
    """A smooth, clearly non-constant LPS field (mm) on the reference grid."""
    points = sitk.GetArrayFromImage(reference).shape
    k, j, i = np.meshgrid(*[np.linspace(0, np.pi, n) for n in points], indexing="ij")
    vectors = np.stack([3.0 * np.sin(i) * np.cos(j), -2.0 * np.sin(k + j), 1.5 * np.cos(i * k / np.pi)], axis=-1)
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(reference)
    return field


def sitkWarp(movingNode, fixedNode, field):
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    moving = nodes.sitkImageFromVolumeNode(movingNode)
    reference = nodes.sitkImageFromVolumeNode(fixedNode)
    return sitk.GetArrayFromImage(sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64))


def readWithStorageNode(scene, path, className="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(className, "read")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    assert storage.ReadData(node)
    return node


# -- volumes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_volume_node_to_file_and_back_is_exact(scene, tmp_path, dtype):
    array = (blob(FIXED_SHAPE, (5, 6, 7), 4.0) * 1000).astype(dtype)
    node = makeVolume(scene, array, FIXED_SPACING, FIXED_ORIGIN, OBLIQUE, name="source")
    path = str(tmp_path / "volume.nrrd")
    image = nodes.writeVolumeNode(node, path)
    assert image.GetSize() == FIXED_SHAPE[::-1]
    np.testing.assert_allclose(image.GetOrigin(), np.array(FIXED_ORIGIN) * [-1, -1, 1], atol=1e-12)

    # Slicer's own reader sees the same voxels and geometry ...
    slicerRead = readWithStorageNode(scene, path)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(slicerRead), array)
    np.testing.assert_allclose(ijkToRas(slicerRead), ijkToRas(node), atol=1e-9)
    # ... and so does ours.
    ours = nodes.readVolumeNode(path, name="ours")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ours), array)
    assert slicer.util.arrayFromVolume(ours).dtype == array.dtype
    np.testing.assert_allclose(ijkToRas(ours), ijkToRas(node), atol=1e-9)


def test_file_written_by_slicer_reads_with_the_same_geometry(scene, tmp_path):
    node = fixedVolume(scene)
    path = str(tmp_path / "slicer.nrrd")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    assert storage.WriteData(node)
    read = sitk.ReadImage(path)
    expected = nodes.sitkImageFromVolumeNode(node)
    np.testing.assert_allclose(read.GetOrigin(), expected.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(read.GetSpacing(), expected.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(read.GetDirection(), expected.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), slicer.util.arrayFromVolume(node))


def test_linear_parent_transform_is_part_of_the_world_geometry(scene):
    node = fixedVolume(scene)
    transformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(2, 0.5)
    matrix[:3, 3] = [5.0, -3.0, 2.0]
    transformNode.SetMatrixTransformToParent(nodes._arrayToMatrix(matrix))
    node.SetAndObserveTransformNodeID(transformNode.GetID())
    image = nodes.sitkImageFromVolumeNode(node)
    world = matrix @ ijkToRas(node)
    lpsToRas = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(np.array(image.GetOrigin()), lpsToRas @ world[:3, 3], atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), FIXED_SPACING, atol=1e-9)
    directions = world[:3, :3] / np.array(FIXED_SPACING)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), lpsToRas @ directions, atol=1e-9)


def test_nonlinear_parent_transform_is_refused(scene):
    node = fixedVolume(scene)
    gridNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    nodes.updateGridTransformFromDisplacementImage(
        gridNode, constantField(nodes.sitkImageFromVolumeNode(node), [1, 0, 0])
    )
    node.SetAndObserveTransformNodeID(gridNode.GetID())
    with pytest.raises(ValueError, match="harden"):
        nodes.sitkImageFromVolumeNode(node)


# -- displacement fields -> grid transforms -----------------------------------------------


@pytest.mark.parametrize("kind", ["constant", "varying"])
def test_grid_transform_resampling_matches_simpleitk(scene, kind):
    fixed = fixedVolume(scene)
    moving = movingVolume(scene, fixed)
    reference = nodes.sitkImageFromVolumeNode(fixed)
    field = constantField(reference, LPS_TRANSLATION) if kind == "constant" else varyingField(reference)
    transformNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "grid")
    nodes.updateGridTransformFromDisplacementImage(transformNode, field)

    ours = nodes.resampleThroughTransform(moving, fixed, transformNode).astype(np.float64)
    expected = sitkWarp(moving, fixed, field)
    assert ours.shape == expected.shape == FIXED_SHAPE
    inside = (ours > 0) & (expected > 0)
    assert inside.mean() > 0.95
    intensityRange = float(expected.max() - expected.min())
    assert np.abs(ours - expected)[inside].max() < 1e-3 * intensityRange
    # The warp did something: without the transform the result differs clearly.
    identity = nodes.resampleThroughTransform(moving, fixed, None).astype(np.float64)
    assert np.abs(identity - expected)[inside].max() > 0.05 * intensityRange


def test_constant_field_vectors_are_ras_from_parent(scene):
    fixed = fixedVolume(scene)
    transformNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    nodes.updateGridTransformFromDisplacementImage(
        transformNode, constantField(nodes.sitkImageFromVolumeNode(fixed), LPS_TRANSLATION)
    )
    point = nodes.gridPointsRAS(fixed)[4, 5, 6]
    moved = np.array(transformNode.GetTransformFromParent().TransformPoint(point))
    np.testing.assert_allclose(moved - point, LPS_TRANSLATION * [-1, -1, 1], atol=1e-9)


def test_hardened_moving_volume_matches_simpleitk(scene):
    """Slicer's harden, then resampling onto the fixed grid, agrees with SimpleITK (a constant
    RAS vector d stored from-parent moves the content by -d)."""
    fixed = fixedVolume(scene)
    moving = movingVolume(scene, fixed)
    field = constantField(nodes.sitkImageFromVolumeNode(fixed), LPS_TRANSLATION)
    expected = sitkWarp(moving, fixed, field)
    transformNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    nodes.updateGridTransformFromDisplacementImage(transformNode, field)
    moving.SetAndObserveTransformNodeID(transformNode.GetID())
    logic = slicer.vtkSlicerTransformLogic()
    logic.SetMRMLScene(scene)
    assert logic.hardenTransform(moving)
    assert moving.GetParentTransformNode() is None
    hardened = nodes.resampleThroughTransform(moving, fixed, None).astype(np.float64)
    inside = (hardened > 0) & (expected > 0)
    assert inside.mean() > 0.9
    assert np.abs(hardened - expected)[inside].max() < 1e-3 * float(expected.max() - expected.min())


# -- grid transforms -> files ---------------------------------------------------------------


def test_storage_node_writes_the_same_lps_field(scene, tmp_path):
    fixed = fixedVolume(scene)
    field = varyingField(nodes.sitkImageFromVolumeNode(fixed))
    transformNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    nodes.updateGridTransformFromDisplacementImage(transformNode, field)
    path = str(tmp_path / "slicer_field.nii.gz")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(path)
    assert storage.WriteData(transformNode)
    written = sitk.ReadImage(path)
    assert written.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(field), atol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), field.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), field.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), field.GetDirection(), atol=1e-5)


def test_storage_node_reads_a_field_as_we_do(scene, tmp_path):
    fixed = fixedVolume(scene)
    field = varyingField(nodes.sitkImageFromVolumeNode(fixed))
    path = str(tmp_path / "field.nrrd")
    sitk.WriteImage(field, path)
    slicerNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(path)
    assert storage.ReadData(slicerNode)
    ourNode = nodes.readDisplacementField(path)
    points = nodes.gridPointsRAS(fixed)[::3, ::3, ::3]
    np.testing.assert_allclose(
        nodes.transformPoints(ourNode.GetTransformFromParent(), points),
        nodes.transformPoints(slicerNode.GetTransformFromParent(), points),
        atol=1e-9,
    )


@pytest.mark.parametrize("extension", [".nii.gz", ".h5"])
def test_export_round_trip(scene, tmp_path, extension):
    fixed = fixedVolume(scene)
    field = varyingField(nodes.sitkImageFromVolumeNode(fixed))
    transformNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    nodes.updateGridTransformFromDisplacementImage(transformNode, field)
    path = nodes.exportTransformToDisplacementFile(transformNode, str(tmp_path / f"out{extension}"))
    if extension == ".h5":
        written = sitk.DisplacementFieldTransform(sitk.ReadTransform(path)).GetDisplacementField()
    else:
        written = sitk.ReadImage(path)
    np.testing.assert_allclose(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(field), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), field.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), field.GetOrigin(), atol=1e-4)


def test_export_samples_any_transform_on_a_reference(scene):
    fixed = fixedVolume(scene)
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(0, 0.1)
    matrix[:3, 3] = [1.0, 2.0, -3.0]
    linear.SetMatrixTransformFromParent(nodes._arrayToMatrix(matrix))
    field = nodes.displacementImageFromTransformNode(linear, fixed)
    points = nodes.gridPointsRAS(fixed)
    expectedRas = points @ matrix[:3, :3].T + matrix[:3, 3] - points
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), expectedRas * [-1, -1, 1], atol=1e-9)
    with pytest.raises(ValueError, match="reference"):
        nodes.displacementImageFromTransformNode(linear)


# -- labels, segmentations, Jacobian display ---------------------------------------------------


def test_segmentation_to_labels_and_back_keeps_names_and_colours(scene):
    fixed = fixedVolume(scene)
    labels = np.zeros(FIXED_SHAPE, np.int16)
    labels[3:8, 4:10, 5:12] = 1
    labels[10:15, 12:18, 14:20] = 2
    labelmap = makeVolume(scene, labels, FIXED_SPACING, FIXED_ORIGIN, OBLIQUE, "labels", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.CreateDefaultDisplayNodes()
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segments = segmentation.GetSegmentation()
    segments.GetNthSegment(0).SetName("liver")
    segments.GetNthSegment(0).SetColor(0.9, 0.2, 0.1)
    segments.GetNthSegment(1).SetName("kidney")
    count = scene.GetNumberOfNodes()

    image, table = nodes.segmentationToLabelImage(segmentation, fixed)
    assert scene.GetNumberOfNodes() == count  # temporary nodes removed
    assert [entry["name"] for entry in table] == ["liver", "kidney"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)

    restored = nodes.labelImageToSegmentation(image, table, "restored", fixed)
    restoredSegments = restored.GetSegmentation()
    names = sorted(restoredSegments.GetNthSegment(i).GetName() for i in range(restoredSegments.GetNumberOfSegments()))
    assert names == ["kidney", "liver"]
    liver = restoredSegments.GetSegment(restoredSegments.GetSegmentIdBySegmentName("liver"))
    np.testing.assert_allclose(liver.GetColor(), (0.9, 0.2, 0.1), atol=1e-6)


def test_jacobian_colour_table_and_display(scene):
    fixed = fixedVolume(scene)
    jacobian = makeVolume(scene, np.full(FIXED_SHAPE, 1.0, np.float32), FIXED_SPACING, FIXED_ORIGIN, OBLIQUE, "detJ")
    nodes.setJacobianDisplay(jacobian)
    display = jacobian.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (2.0, 1.0)
    colorNode = display.GetColorNode()
    assert colorNode.GetName() == nodes.JACOBIAN_COLOR_NODE_NAME
    from cnnreg.settings import JACOBIAN_CONTRACTION_RGB, JACOBIAN_EXPANSION_RGB, JACOBIAN_FOLD_RGB

    def colour(index):
        rgba = [0.0] * 4
        colorNode.GetColor(index, rgba)
        return rgba[:3]

    # the colours of qc.png: folds yellow, contraction blue, 1 white, expansion red (det J 2 and over)
    np.testing.assert_allclose(colour(0), JACOBIAN_FOLD_RGB, atol=2 / 255)  # stored in 8 bits
    assert min(colour(colorNode.GetNumberOfColors() // 2)) > 0.95
    np.testing.assert_allclose(colour(colorNode.GetNumberOfColors() - 1), JACOBIAN_EXPANSION_RGB, atol=2 / 255)
    # just above 0: nearly the full contraction colour (det J 2/255)
    np.testing.assert_allclose(colour(1), JACOBIAN_CONTRACTION_RGB, atol=0.01)
    # One table per scene, reused by later runs; no layout manager here, so nothing shown.
    assert nodes.jacobianColorNode(scene) is colorNode
    assert nodes.showJacobian(jacobian, fixed) is False


def test_slicer_reads_our_displacement_file_as_the_field_we_wrote(scene, tmp_path):
    """displacement.nii.gz as the backend writes it (NIfTI intent 1006, RAS vectors) read by
    Slicer's own transform storage node: a point moves by the field in RAS (LPS flipped)."""
    from cnnreg.image import write_image

    values = np.zeros((6, 7, 8, 3), np.float32)
    values[...] = (3.0, -2.0, 1.0)  # LPS mm
    field = sitk.GetImageFromArray(values, isVector=True)
    field.SetSpacing((2.0, 2.0, 2.0))
    path = str(tmp_path / "displacement.nii.gz")
    write_image(field, path)
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "read by Slicer")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(path)
    assert storage.ReadData(transform)
    moved = transform.GetTransformFromParent().TransformPoint([8.0, 6.0, 4.0])
    np.testing.assert_allclose(moved, (8.0 - 3.0, 6.0 + 2.0, 4.0 + 1.0), atol=1e-5)
