"""``python -m cnnreg``: see :mod:`cnnreg.cli`."""

import os
import sys

# Threads wait passively: spinning OpenMP workers slow everything down on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import console_main  # noqa: E402

sys.exit(console_main())
