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
