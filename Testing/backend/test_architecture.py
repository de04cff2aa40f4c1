"""docs/architecture.md names every module of the backend and of the Slicer glue, and no other."""

from __future__ import annotations

import re
from pathlib import Path

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
