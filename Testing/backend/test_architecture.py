"""docs/architecture.md names every module of the backend and of the Slicer glue, and no other."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_architecture_page_lists_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    backend = {p.stem for p in (ROOT / "CNNRegistration" / "cnnreg").glob("*.py") if p.stem != "__init__"}
    glue = {p.stem for p in (ROOT / "CNNRegistration" / "CNNRegistrationLib").glob("*.py") if p.stem != "__init__"}
    section = text.split("## Training")[0].split("## The backend")[1]
    named = set(
        re.findall(r"`(\w+)`", " ".join(line.split("|")[1] for line in section.splitlines() if line.startswith("| `")))
    )
    assert named == backend, (sorted(backend - named), sorted(named - backend))
    training = {p.stem for p in (ROOT / "CNNRegistration" / "cnnreg" / "training").glob("*.py") if p.stem != "__init__"}
    assert set(re.findall(r"`training/(\w+)`", text)) == training
    glue_named = set(re.findall(r"`CNNRegistrationLib/(\w+)`", text))
    assert glue_named == glue, (sorted(glue - glue_named), sorted(glue_named - glue))


def test_the_tracked_tree_is_light():
    """Under 10 MiB apart from the shipped weights; no training resume state or duplicated weights."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [ROOT / p for p in files.decode().split("\0") if p]
    present = [p for p in paths if p.is_file()]
    weights = [p for p in present if p.parent.name == "models" and p.suffix == ".pt"]
    size = sum(p.stat().st_size for p in present if p not in weights)
    assert size < 10 * 2**20, f"{size / 2**20:.1f} MiB tracked apart from the weights"
    assert not [p for p in present if p.name.endswith(".last.pt")]
    assert [p for p in present if p.suffix == ".pt"] == weights
