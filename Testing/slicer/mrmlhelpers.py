"""Helpers shared by the Slicer-side tests (volumes with oblique geometry, blobs).

Volumes stay small (<= 40^3): the tests share a couple of CPU cores with other work.
"""

import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODULE_DIR = os.path.join(ROOT, "CNNRegistration")


def rotation(axis: int, angle: float) -> np.ndarray:
    """3x3 rotation about world axis ``axis`` by ``angle`` radians."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


#: An oblique orientation (columns: RAS direction of i, j, k) used throughout the tests.
OBLIQUE = rotation(2, 0.35) @ rotation(0, -0.25) @ rotation(1, 0.15)


def makeVolume(
    scene,
    array,
    spacing=(1.0, 1.0, 1.0),
    origin=(0.0, 0.0, 0.0),
    directions=None,
    name="volume",
    className="vtkMRMLScalarVolumeNode",
):
    """Volume node from a ``(k, j, i)`` array with RAS geometry (directions: 3x3 columns)."""
    import slicer
    import vtk

    node = scene.AddNewNodeByClass(className, name)
    node.CreateDefaultDisplayNodes()
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    matrix = vtk.vtkMatrix4x4()
    directions = np.eye(3) if directions is None else np.asarray(directions)
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(directions[r, c]))
    node.SetIJKToRASDirectionMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node


def blob(shape, center, sigma) -> np.ndarray:
    """Sum of a Gaussian blob and a gentle ramp, ``(k, j, i)`` float32 in [0, ~1.2]."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    r2 = (k - center[0]) ** 2 + (j - center[1]) ** 2 + (i - center[2]) ** 2
    ramp = 0.2 * i / max(shape[2] - 1, 1)
    return (np.exp(-r2 / (2 * sigma**2)) + ramp).astype(np.float32)


def ijkToRas(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


#: grid and values of :func:`simulationResultNodes` (anisotropic, oblique)
ORGANS_SHAPE = (12, 14, 16)
ORGANS_SPACING = (1.5, 0.8, 2.5)
ORGANS_ORIGIN = (-10.0, 4.0, 7.5)
JACOBIAN = 1.25
ORGANS_AFFINE_DETERMINANT = 0.8


def simulationResultNodes(scene) -> dict:
    """Result nodes of a phantom -> patient run, made with known values: CT (HU), organs (1 body,
    2 lung) as a named segmentation, a constant det J, the transform with its summary, and the
    phantom's own organs on a 3 mm grid."""
    import slicer

    from CNNRegistrationLib import nodes

    ct = np.full(ORGANS_SHAPE, -1000.0, np.float32)
    ct[2:-2, 2:-2, 2:-2] = 0.0  # water body
    ct[4:8, 4:8, 4:7] = -1000.0  # air lung
    organs = np.zeros(ORGANS_SHAPE, np.int16)
    organs[2:-2, 2:-2, 2:-2] = 1
    organs[4:8, 4:8, 4:7] = 2
    fixed = makeVolume(scene, ct, ORGANS_SPACING, ORGANS_ORIGIN, OBLIQUE, "patient CT")
    labelmap = makeVolume(scene, organs, ORGANS_SPACING, ORGANS_ORIGIN, OBLIQUE, "organs", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "phantom organs registered")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    for index, name in enumerate(("body", "lung")):
        segmentation.GetSegmentation().GetNthSegment(index).SetName(name)
    jacobian = makeVolume(
        scene, np.full(ORGANS_SHAPE, JACOBIAN, np.float32), ORGANS_SPACING, ORGANS_ORIGIN, OBLIQUE, "det J"
    )
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "phantom to patient")
    nodes.setRegistrationReferences(transform, fixed, None, {"affine_determinant": ORGANS_AFFINE_DETERMINANT})
    transform.SetNodeReferenceID(nodes.JACOBIAN_REFERENCE, jacobian.GetID())
    # the phantom's own organs on a coarser grid: body 6x6x6 voxels of 3 mm, lung 2x2x2
    phantomOrgans = np.zeros((10, 10, 10), np.int16)
    phantomOrgans[2:8, 2:8, 2:8] = 1
    phantomOrgans[4:6, 4:6, 4:6] = 2
    phantomLabelmap = makeVolume(
        scene, phantomOrgans, (3.0, 3.0, 3.0), name="phantom", className="vtkMRMLLabelMapVolumeNode"
    )
    phantom = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "phantom organs")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(phantomLabelmap, phantom)
    for index, name in enumerate(("body", "lung")):
        phantom.GetSegmentation().GetNthSegment(index).SetName(name)
    return {
        "fixed": fixed,
        "organs": organs,
        "segmentation": segmentation,
        "transform": transform,
        "phantom": phantom,
        "phantomVolume": phantomLabelmap,
    }
