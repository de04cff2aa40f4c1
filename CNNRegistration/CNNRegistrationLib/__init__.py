"""Slicer glue of the CNN Registration module (Slicer naming, camelCase).

Submodules (import them explicitly; this package imports nothing at load time):

* ``panel``: the panel's settings (``PanelSettings``), presets, the command line they make (pure Python).
* ``process``: the backend subprocess, progress lines, cancel (pure Python).
* ``nodes``: MRML nodes <-> SimpleITK images, displacement fields <-> grid transforms.
* ``backendjob``: one run (``RegistrationJob``): nodes -> temporary files -> backend -> ``JobResult``.
* ``simulation``: "Export for simulation": result nodes -> ``simulation-inputs`` -> a named segmentation.
* ``sampledata``: the sample pair in Slicer's Sample Data module.
* ``dependencies``: PyTorch and other Python packages, compute device description.

None of them needs Qt; ``nodes``, ``backendjob`` and ``simulation`` need the MRML libraries (``slicer``).
"""
