"""Fixtures for the Slicer-side tests: a real MRML scene from the ``slicer-core`` wheel.

Every test module starts with ``pytest.importorskip("slicer")``, so the folder is skipped
where slicer-core is not installed. Helpers live in ``mrmlhelpers.py``.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODULE_DIR = os.path.join(ROOT, "CNNRegistration")
for path in (MODULE_DIR, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture
def scene():
    """A fresh ``vtkMRMLScene`` installed as ``slicer.mrmlScene`` for the test."""
    slicer = pytest.importorskip("slicer")
    previous = getattr(slicer, "mrmlScene", None)
    mrmlScene = slicer.vtkMRMLScene()
    slicer.mrmlScene = mrmlScene
    yield mrmlScene
    mrmlScene.Clear(1)
    slicer.mrmlScene = previous
