"""Slicer glue of the CNN Registration module (Slicer naming, camelCase).

Submodules (import them explicitly; this package imports nothing at load time):

* ``settings``: registration options, enums, presets (pure Python).
* ``process``: the backend subprocess, progress lines, cancel (pure Python).
* ``nodes``: MRML nodes <-> SimpleITK images, displacement fields <-> grid transforms.
* ``registration``: one run: nodes -> temporary files -> backend -> output nodes.
* ``dependencies``: PyTorch and other Python packages, compute device description.

None of them needs Qt; ``nodes`` and ``registration`` need the MRML libraries (``slicer``).
"""
