"""MRML nodes <-> SimpleITK images and ITK displacement fields (no Qt).

Conventions (the same as the backend's ``cnnreg.settings``):

* Arrays are ``(k, j, i)``: ``slicer.util.arrayFromVolume`` and ``sitk.GetArrayFromImage``.
* Slicer world coordinates are RAS, ITK files are LPS: ``ras = (-x, -y, z)`` of an LPS
  point or vector; origins, direction rows and displacement vectors are all converted.
* A displacement ``d`` (mm) lives on the fixed grid and pulls the moving image:
  ``warped(x) = moving(x + d(x))``. This is ITK's resampling direction and the
  **from parent** direction of a Slicer transform node.

Only needs ``slicer`` (MRML), ``vtk``, ``numpy`` and ``SimpleITK``, so it runs with the
``slicer-core`` wheel outside the application.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from cnnreg.grid import same_grid
from cnnreg.settings import LPS_TO_RAS_SIGNS, jacobian_rgb

#: Sign flip between LPS and RAS for points and vectors (its own inverse).
LPS_TO_RAS = np.array(LPS_TO_RAS_SIGNS)

#: Node reference roles set on the output transform node.
FIXED_VOLUME_REFERENCE = "fixedVolume"
MOVING_VOLUME_REFERENCE = "movingVolume"
JACOBIAN_REFERENCE = "jacobian"
#: Attribute holding the backend's ``summary.json`` on the output transform node.
SUMMARY_ATTRIBUTE = "CNNRegistration.summary"
#: Name (and singleton tag) of the colour table used for Jacobian determinant maps.
JACOBIAN_COLOR_NODE_NAME = "CNNRegistrationJacobian"

_TRANSFORM_FILE_EXTENSIONS = (".h5", ".hdf5", ".tfm", ".txt", ".mat")


# ---------------------------------------------------------------------------------------
# Volume geometry
# ---------------------------------------------------------------------------------------


def _matrixToArray(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _arrayToMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volumeGeometry(volumeNode) -> tuple:
    """World geometry of a volume node in RAS: ``(origin (3,), spacing (3,), directions (3, 3))``
    in mm, direction columns = RAS direction of the i, j, k axes.

    A linear parent transform is included (the geometry where the volume is shown); a
    non-linear one raises ``ValueError`` (harden it first).
    """
    origin = np.array(volumeNode.GetOrigin(), dtype=np.float64)
    spacing = np.array(volumeNode.GetSpacing(), dtype=np.float64)
    directionMatrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(directionMatrix)
    directions = _matrixToArray(directionMatrix)[:3, :3]
    parent = volumeNode.GetParentTransformNode()
    if parent is None:
        return origin, spacing, directions
    if not parent.IsTransformToWorldLinear():
        raise ValueError(
            f"volume '{volumeNode.GetName()}' is under the non-linear transform '{parent.GetName()}'; "
            "harden the transform (Data module, right-click > Harden transform) before registering"
        )
    toWorld = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(toWorld)
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    world = _matrixToArray(toWorld) @ _matrixToArray(ijkToRas)
    columns = world[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    return world[:3, 3].copy(), spacing, columns / spacing


def sitkImageFromVolumeNode(volumeNode) -> sitk.Image:
    """Scalar volume node -> SimpleITK image (LPS geometry, same voxel values and type).

    The world geometry (including a linear parent transform) is used. ``ValueError`` for
    a node without image data or with more than one component per voxel.
    """
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None:
        raise ValueError(f"volume '{volumeNode.GetName() if volumeNode else None}' has no image data")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(
            f"volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} components per "
            "voxel; a scalar (grey-level) volume is needed"
        )
    origin, spacing, directions = volumeGeometry(volumeNode)
    array = slicer.util.arrayFromVolume(volumeNode)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetOrigin(tuple(origin * LPS_TO_RAS))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((LPS_TO_RAS[:, None] * directions).ravel()))
    return image


def updateVolumeNodeFromSitkImage(volumeNode, image: sitk.Image) -> None:
    """Set voxels and geometry of ``volumeNode`` from a 3D scalar SimpleITK image (LPS)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"a 3D scalar image is needed, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    directions = LPS_TO_RAS[:, None] * np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = directions
    volumeNode.SetIJKToRASDirectionMatrix(_arrayToMatrix(matrix))
    volumeNode.SetSpacing(*image.GetSpacing())
    volumeNode.SetOrigin(*(np.array(image.GetOrigin()) * LPS_TO_RAS))
    slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))


def writeVolumeNode(volumeNode, path: str) -> sitk.Image:
    """Write a volume node to ``path`` (any SimpleITK format; ``.nrrd`` keeps geometry in
    double precision, NIfTI in single). Returns the image written."""
    image = sitkImageFromVolumeNode(volumeNode)
    sitk.WriteImage(image, os.fspath(path), useCompression=False)
    return image


def readVolumeNode(path: str, volumeNode=None, name: str | None = None, labelmap: bool = False, scene=None):
    """Read an image file into ``volumeNode`` (created in ``scene`` when None: a scalar or,
    with ``labelmap``, a label map volume node with default display nodes)."""
    image = sitk.ReadImage(os.fspath(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components; expected a scalar image")
    if volumeNode is None:
        scene = scene or slicer.mrmlScene
        className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        volumeNode = scene.AddNewNodeByClass(className, name or os.path.basename(os.fspath(path)).split(".")[0])
        volumeNode.CreateDefaultDisplayNodes()
    updateVolumeNodeFromSitkImage(volumeNode, image)
    return volumeNode


def resampleLabelsToGrid(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of a label image onto ``reference``'s grid (identity
    in physical space; a no-op when the grids already match)."""
    if same_grid(labels, reference):
        return labels
    return sitk.Resample(labels, reference, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, 0)


# ---------------------------------------------------------------------------------------
# Segmentations
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def temporaryNodes(scene):
    """Remove the nodes added to ``scene`` inside the block (singletons such as the subject
    hierarchy node are kept)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node is not None and node.GetID() not in before and not node.GetSingletonTag():
                scene.RemoveNode(node)


def segmentationToLabelImage(segmentationNode, referenceVolumeNode) -> tuple:
    """Segmentation node -> (label image on the reference grid, segment table).

    Segment ``n`` (0-based, in segmentation order) gets label ``n + 1``. The table is a
    list of dicts ``{"label", "id", "name", "color"}`` used by :func:`labelImageToSegmentation`
    to give the warped segments their names and colours back. Temporary nodes are removed.
    """
    scene = segmentationNode.GetScene()
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = vtk.vtkStringArray()
    table = []
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        segmentIds.InsertNextValue(segmentId)
        table.append({"label": index + 1, "id": segmentId, "name": segment.GetName(), "color": segment.GetColor()})
    if not table:
        raise ValueError(f"segmentation '{segmentationNode.GetName()}' has no segments")
    with temporaryNodes(scene):
        labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CNNRegistrationTemporaryLabels")
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.ExportSegmentsToLabelmapNode(segmentationNode, segmentIds, labelmapNode, referenceVolumeNode):
            raise ValueError(f"could not export segmentation '{segmentationNode.GetName()}' to a label map")
        image = sitkImageFromVolumeNode(labelmapNode)
    return image, table


def labelImageToSegmentation(labelImage: sitk.Image, table: list, name: str, referenceVolumeNode=None, scene=None):
    """Label image -> new segmentation node, one segment per label of ``table`` (names and
    colours restored; labels absent from the image give no segment)."""
    scene = scene or slicer.mrmlScene
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentationNode.CreateDefaultDisplayNodes()
    if referenceVolumeNode is not None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    with temporaryNodes(scene):
        labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "CNNRegistrationTemporaryLabels")
        updateVolumeNodeFromSitkImage(labelmapNode, labelImage)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmapNode, segmentationNode
        ):
            raise ValueError("could not import the warped label map into a segmentation")
    byLabel = {entry["label"]: entry for entry in table}
    segmentation = segmentationNode.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        entry = byLabel.get(_segmentLabelValue(segment))
        if entry is not None:
            segment.SetName(entry["name"])
            segment.SetColor(*entry["color"])
    return segmentationNode


def _segmentLabelValue(segment) -> int | None:
    """Label value a segment was imported from (``Label_<n>`` names on old Slicer versions)."""
    if hasattr(segment, "GetLabelValue"):
        return int(segment.GetLabelValue())
    name = segment.GetName()
    return int(name.split("_")[-1]) if name.startswith("Label_") and name.split("_")[-1].isdigit() else None


def maskImageFromNode(maskNode, referenceVolumeNode) -> sitk.Image:
    """Label map or segmentation node -> binary uint8 mask (1 inside) on the reference grid."""
    if maskNode.IsA("vtkMRMLSegmentationNode"):
        labels, _ = segmentationToLabelImage(maskNode, referenceVolumeNode)
    else:
        labels = resampleLabelsToGrid(sitkImageFromVolumeNode(maskNode), sitkImageFromVolumeNode(referenceVolumeNode))
    return sitk.Cast(labels > 0, sitk.sitkUInt8)


# ---------------------------------------------------------------------------------------
# Displacement fields and grid transforms
# ---------------------------------------------------------------------------------------


def updateGridTransformFromDisplacementImage(transformNode, field: sitk.Image) -> None:
    """Set a ``vtkMRMLGridTransformNode`` from an ITK displacement field.

    Args:
        transformNode: receives the field as its **from parent** transform.
        field: 3D vector image with 3 components: LPS displacement in mm on its own grid
            (``warped(x) = moving(x + d(x))``), as written by ``cnnreg`` or SimpleITK.

    The grid keeps the field's oblique orientation (``vtkOrientedGridTransform``); vectors,
    origin and direction rows are flipped to RAS. Linear interpolation, as ITK's
    ``DisplacementFieldTransform``.
    """
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(
            f"a 3D displacement field with 3 components is needed, got {field.GetDimension()}D with "
            f"{field.GetNumberOfComponentsPerPixel()} components"
        )
    vectors = sitk.GetArrayFromImage(field).astype(np.float64) * LPS_TO_RAS  # (k, j, i, 3), RAS
    grid = vtk.vtkImageData()
    grid.SetDimensions(*field.GetSize())
    grid.SetSpacing(*field.GetSpacing())
    grid.SetOrigin(*(np.array(field.GetOrigin()) * LPS_TO_RAS))
    scalars = numpy_support.numpy_to_vtk(vectors.reshape(-1, 3), deep=True, array_type=vtk.VTK_DOUBLE)
    scalars.SetName("DisplacementField")
    grid.GetPointData().SetScalars(scalars)
    direction = np.eye(4)
    direction[:3, :3] = LPS_TO_RAS[:, None] * np.array(field.GetDirection(), dtype=np.float64).reshape(3, 3)
    gridTransform = slicer.vtkOrientedGridTransform()
    gridTransform.SetDisplacementGridData(grid)
    gridTransform.SetGridDirectionMatrix(_arrayToMatrix(direction))
    gridTransform.SetInterpolationModeToLinear()
    transformNode.SetAndObserveTransformFromParent(gridTransform)


def readDisplacementField(path: str, transformNode=None, name: str | None = None, scene=None):
    """ITK displacement field file (LPS mm) -> grid transform node (created when None)."""
    field = sitk.ReadImage(os.fspath(path))
    if transformNode is None:
        scene = scene or slicer.mrmlScene
        transformNode = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name or "CNNRegistrationTransform")
    updateGridTransformFromDisplacementImage(transformNode, field)
    return transformNode


def gridPointsRAS(volumeNode) -> np.ndarray:
    """RAS coordinates (mm) of every voxel centre of a volume: ``(k, j, i, 3)``."""
    origin, spacing, directions = volumeGeometry(volumeNode)
    k, j, i = volumeNode.GetImageData().GetDimensions()[::-1]
    index = np.stack(np.meshgrid(np.arange(i), np.arange(j), np.arange(k), indexing="ij"), axis=-1)
    index = index.transpose(2, 1, 0, 3)  # (k, j, i, [i, j, k])
    return index @ (directions * spacing).T + origin


def transformPoints(transform: vtk.vtkAbstractTransform, points: np.ndarray) -> np.ndarray:
    """Apply a VTK transform to points ``(..., 3)`` (mm)."""
    flat = np.ascontiguousarray(points.reshape(-1, 3), dtype=np.float64)
    source = vtk.vtkPoints()
    source.SetData(numpy_support.numpy_to_vtk(flat, deep=True))
    target = vtk.vtkPoints()
    target.SetDataTypeToDouble()  # vtkPoints default to float32
    transform.TransformPoints(source, target)
    return numpy_support.vtk_to_numpy(target.GetData()).reshape(points.shape)


def displacementImageFromTransformNode(transformNode, referenceVolumeNode=None) -> sitk.Image:
    """The from-parent transform of a node as an ITK displacement field (LPS mm, float64).

    With ``referenceVolumeNode`` the transform is sampled at that volume's voxel centres
    (works for any transform: linear, B-spline, grid, composite). Without it the node
    must hold a grid transform, whose own grid is used.
    """
    transform = transformNode.GetTransformFromParent()
    if referenceVolumeNode is not None:
        points = gridPointsRAS(referenceVolumeNode)
        vectors = (transformPoints(transform, points) - points) * LPS_TO_RAS
        field = sitk.GetImageFromArray(vectors, isVector=True)
        field.CopyInformation(sitkImageFromVolumeNode(referenceVolumeNode))
        return field
    grid = transform if isinstance(transform, vtk.vtkGridTransform) else None
    if grid is None or grid.GetDisplacementGrid() is None:
        raise ValueError(
            f"transform '{transformNode.GetName()}' is not a grid transform; give a reference volume to sample it on"
        )
    data = grid.GetDisplacementGrid()
    size = data.GetDimensions()
    vectors = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).astype(np.float64)
    vectors = vectors.reshape(size[2], size[1], size[0], 3) * grid.GetDisplacementScale() + grid.GetDisplacementShift()
    field = sitk.GetImageFromArray(vectors * LPS_TO_RAS, isVector=True)
    field.SetSpacing(data.GetSpacing())
    field.SetOrigin(tuple(np.array(data.GetOrigin()) * LPS_TO_RAS))
    direction = np.eye(3)
    if isinstance(grid, slicer.vtkOrientedGridTransform) and grid.GetGridDirectionMatrix() is not None:
        direction = _matrixToArray(grid.GetGridDirectionMatrix())[:3, :3]
    field.SetDirection(tuple((LPS_TO_RAS[:, None] * direction).ravel()))
    return field


def exportTransformToDisplacementFile(transformNode, path: str, referenceVolumeNode=None) -> str:
    """Write the from-parent transform as an ITK displacement field (LPS mm).

    ``.nii.gz``/``.nrrd``/``.mha``: a vector image; ``.h5``/``.tfm``: an ITK transform file
    holding a ``DisplacementFieldTransform``. Either loads in Slicer, ANTs, SimpleITK and
    ``python -m cnnreg apply --displacement``. See :func:`displacementImageFromTransformNode`
    for ``referenceVolumeNode``.
    """
    path = os.fspath(path)
    field = displacementImageFromTransformNode(transformNode, referenceVolumeNode)
    if path.lower().endswith(_TRANSFORM_FILE_EXTENSIONS):
        sitk.WriteTransform(sitk.DisplacementFieldTransform(field), path)
    else:
        sitk.WriteImage(field, path)
    return path


def setRegistrationReferences(transformNode, fixedVolumeNode, movingVolumeNode, summary: dict | None = None) -> None:
    """Record on the transform node which volumes it registers (and the run's summary as JSON)."""
    transformNode.SetNodeReferenceID(FIXED_VOLUME_REFERENCE, fixedVolumeNode.GetID() if fixedVolumeNode else None)
    transformNode.SetNodeReferenceID(MOVING_VOLUME_REFERENCE, movingVolumeNode.GetID() if movingVolumeNode else None)
    if summary is not None:
        transformNode.SetAttribute(SUMMARY_ATTRIBUTE, json.dumps(summary, default=str))


def resampleThroughTransform(
    movingVolumeNode, referenceVolumeNode, transformNode, interpolation: str = "linear", defaultValue: float = 0.0
) -> np.ndarray:
    """Moving volume resampled on the reference grid through the from-parent transform:
    ``out(x) = moving(T(x))`` for every reference voxel centre ``x`` (RAS), with
    ``vtkImageReslice`` (reference IJK -> RAS -> transform -> moving IJK). Returns a
    ``(k, j, i)`` array of the moving volume's type. Unlike hardening, the extent stays
    the reference's."""
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    referenceToRas = vtk.vtkMatrix4x4()
    referenceVolumeNode.GetIJKToRASMatrix(referenceToRas)
    rasToMoving = vtk.vtkMatrix4x4()
    movingVolumeNode.GetRASToIJKMatrix(rasToMoving)
    chain = vtk.vtkGeneralTransform()
    chain.PostMultiply()
    chain.Concatenate(referenceToRas)
    if transformNode is not None:
        chain.Concatenate(transformNode.GetTransformFromParent())
    chain.Concatenate(rasToMoving)
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(movingVolumeNode.GetImageData())
    reslice.SetResliceTransform(chain)
    if interpolation == "linear":
        reslice.SetInterpolationModeToLinear()
    else:
        reslice.SetInterpolationModeToNearestNeighbor()
    reslice.SetBackgroundLevel(defaultValue)
    reslice.SetOutputOrigin(0, 0, 0)
    reslice.SetOutputSpacing(1, 1, 1)
    reslice.SetOutputExtent(referenceVolumeNode.GetImageData().GetExtent())
    reslice.Update()
    output = reslice.GetOutput()
    k, j, i = output.GetDimensions()[::-1]
    return numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(k, j, i).copy()


# ---------------------------------------------------------------------------------------
# Jacobian display
# ---------------------------------------------------------------------------------------


def jacobianColorNode(scene=None):
    """Colour table for det J shown with window 2 / level 1 (range [0, 2]): the backend's
    :func:`cnnreg.settings.jacobian_rgb` (blue = contraction, white = 1, red = expansion; the
    first entry, det J <= 0 i.e. folding, yellow), as in ``qc.png``. Reused across runs."""
    scene = scene or slicer.mrmlScene
    existing = scene.GetSingletonNode(JACOBIAN_COLOR_NODE_NAME, "vtkMRMLColorTableNode")
    if existing is not None:
        return existing
    colorNode = slicer.vtkMRMLColorTableNode()
    colorNode.SetName(JACOBIAN_COLOR_NODE_NAME)
    colorNode.SetSingletonTag(JACOBIAN_COLOR_NODE_NAME)
    colorNode.SetTypeToUser()
    colorNode.SetHideFromEditors(False)
    count = 256
    colorNode.SetNumberOfColors(count)
    colorNode.GetLookupTable().SetTableRange(0, count - 1)
    for index in range(count):
        value = 2.0 * index / (count - 1)  # det J at this entry
        name = "folding (det J <= 0)" if index == 0 else f"det J {value:.3f}"
        colorNode.SetColor(index, name, *jacobian_rgb(value), 1.0)
    scene.AddNode(colorNode)
    return colorNode


def setJacobianDisplay(jacobianVolumeNode) -> None:
    """Colour a det J volume with :func:`jacobianColorNode`, window [0, 2], no interpolation."""
    scene = jacobianVolumeNode.GetScene() or slicer.mrmlScene
    if jacobianVolumeNode.GetDisplayNode() is None:
        jacobianVolumeNode.CreateDefaultDisplayNodes()
    displayNode = jacobianVolumeNode.GetDisplayNode()
    displayNode.SetAndObserveColorNodeID(jacobianColorNode(scene).GetID())
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevel(2.0, 1.0)
    displayNode.SetInterpolate(False)


def showJacobian(jacobianVolumeNode, backgroundVolumeNode=None, opacity: float = 0.5) -> bool:
    """Show the det J volume (coloured by :func:`setJacobianDisplay`) as the foreground of the
    slice views over ``backgroundVolumeNode``. Returns False (and shows nothing) when there
    is no layout manager (slicer-core, or Slicer without a main window)."""
    setJacobianDisplay(jacobianVolumeNode)
    app = getattr(slicer, "app", None)
    if app is None or not hasattr(app, "layoutManager") or app.layoutManager() is None:
        return False
    slicer.util.setSliceViewerLayers(
        background=backgroundVolumeNode, foreground=jacobianVolumeNode, foregroundOpacity=opacity
    )
    return True
