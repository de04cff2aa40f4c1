"""``python -m cnnreg``: see :mod:`cnnreg.cli`."""

import sys

from .cli import main

sys.exit(main())
