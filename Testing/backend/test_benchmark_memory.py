"""The benchmark's peak-memory figure is the method's own, not the benchmark process's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_child_peak_memory_is_its_own_not_the_spawning_process():
    held = np.ones(64 * 2**20 // 8 * 6)  # 384 MiB resident in this (spawning) process
    held[::512] = 2.0  # touch every page
    code = (
        "import resource, sys; sys.path.insert(0, sys.argv[1]); import peers; "
        "print(peers._peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    completed = subprocess.run([sys.executable, "-c", code, str(SCRIPTS)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    own, inherited = (float(value) for value in completed.stdout.split())
    # the kernel's ru_maxrss of the child starts at this process's RSS; the figure must not
    assert inherited > 384, inherited
    assert own < 300, own
    assert held.sum() > 0
