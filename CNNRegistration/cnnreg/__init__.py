"""cnnreg: deformable image registration with convolutional networks (PyTorch, SimpleITK).

The backend of the CNNRegistration 3D Slicer extension; it never imports Slicer, VTK or Qt.
Conventions (axes, units, field direction) are defined in :mod:`cnnreg.settings`.
"""

__version__ = "0.1.0"
