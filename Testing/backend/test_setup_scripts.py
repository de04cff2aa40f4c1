"""scripts/environment: which interpreter the README's two commands install into and run with."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _source(folder: Path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON")}
    environment.update(env)
    return subprocess.run(
        ["bash", "-c", 'set -euo pipefail; source scripts/environment; echo "PYTHON=$PYTHON"; echo "PIP=${PIP[*]}"'],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "environment", tmp_path / "scripts" / "environment")
    return tmp_path


def test_without_an_active_environment_a_project_venv_is_made_and_used(checkout):
    made = _source(checkout, CNNREG_BASE_PYTHON=sys.executable)
    assert made.returncode == 0, made.stderr
    python = checkout / ".venv" / "bin" / "python"
    assert f"PYTHON={python}" in made.stdout and "creating the project environment .venv" in made.stderr
    prefix = subprocess.run([str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    assert Path(prefix.stdout.strip()) == checkout / ".venv"  # not the system's site-packages
    again = _source(checkout, CNNREG_BASE_PYTHON=sys.executable)  # reused, not made again
    assert f"PYTHON={python}" in again.stdout and "creating" not in again.stderr


def test_an_active_environment_or_a_given_python_is_respected(checkout):
    active = _source(checkout, VIRTUAL_ENV="/somewhere/venv")
    assert "PYTHON=python3" in active.stdout and not (checkout / ".venv").exists()
    given = _source(checkout, PYTHON=sys.executable)
    assert f"PYTHON={sys.executable}" in given.stdout and f"PIP={sys.executable} -m pip" in given.stdout
    missing = _source(checkout, CNNREG_BASE_PYTHON="no-such-python3")
    assert missing.returncode == 1 and "install Python 3.10 or newer" in missing.stderr
