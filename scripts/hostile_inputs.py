#!/usr/bin/env python3
"""Hostile inputs against ``python -m cnnreg``: each case runs the real command in a fresh
folder and is judged on its exit code, its message, the debris it leaves (partial folders, lock
files) and whether anything of the user's changed (every file present before is compared
byte for byte afterwards).

    python scripts/hostile_inputs.py [--out benchmark/hostile.md]

Prints a table (case, expected exit code, exit code, clean error, debris, data lost) and the
totals: cases, clean errors, wrong codes, debris, data lost.  Exit code 0 only when every case
behaves.  Fast cases of the same kinds run in the test suite (Testing/backend/test_cli.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--levels", "1", "--iterations", "3", "--threads", "2", "--no-qc", "--progress", "none"]


def _image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> str:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return str(path)


def _inputs(folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in (16, 18, 20)], indexing="ij"), -1)
    blob = np.exp(-((index - [8, 9, 10]) ** 2).sum(-1) / 20.0).astype(np.float32)
    paths = {
        "fixed": _image(folder / "fixed.nii.gz", blob),
        "moving": _image(folder / "moving.nii.gz", np.roll(blob, 1, axis=2)),
        "labels": _image(folder / "labels.nii.gz", (np.roll(blob, 1, axis=2) > 0.3).astype(np.uint8)),
        "nan": _image(folder / "nan.nrrd", np.where(rng.random(blob.shape) < 0.01, np.nan, blob).astype(np.float32)),
        "constant": _image(folder / "constant.nii.gz", np.full(blob.shape, 0.5, np.float32)),
        "empty2d": _image(folder / "slice.nii.gz", blob[8]),
        "ct_padded": _image(folder / "ct.nii.gz", np.where(blob > 0.05, 40.0, -3024.0).astype(np.float32)),
        "elsewhere_labels": _image(folder / "labels_small.nii.gz", (blob[:, :, :-2] > 0.3).astype(np.uint8)),
    }
    (folder / "garbage.nii.gz").write_bytes(b"not an image" * 50)
    paths["garbage"] = str(folder / "garbage.nii.gz")
    offset = folder / "offset.nii"
    sitk.WriteImage(sitk.ReadImage(paths["moving"]), str(offset))
    data = bytearray(offset.read_bytes())
    data[108:112] = struct.pack("<f", 0.0)
    offset.write_bytes(bytes(data))
    paths["vox_offset0"] = str(offset)
    mha = folder / "short.mha"
    sitk.WriteImage(sitk.ReadImage(paths["moving"]), str(mha))
    mha.write_bytes(mha.read_bytes()[:-300])
    paths["truncated"] = str(mha)
    (folder / "a_folder").mkdir()
    paths["folder"] = str(folder / "a_folder")
    os.symlink(folder / "loop", folder / "loop")
    paths["loop"] = str(folder / "loop")
    (folder / "thesis").mkdir()
    (folder / "thesis" / "chapter1.tex").write_text("years of work")
    paths["thesis"] = str(folder / "thesis")
    return paths


def _register(p: dict, *extra: str, fixed="fixed", moving="moving", out="out") -> list[str]:
    return ["register", "--fixed", p[fixed], "--moving", p[moving], "--out", out, *FAST, *extra]


def cases(p: dict) -> list[tuple[str, list[str], int]]:
    """(name, command-line arguments, expected exit code)."""
    field = "out_ok/displacement.nii.gz"
    return [
        ("a plain run (the reference)", _register(p, out="out_ok"), 0),
        ("--out '' with --overwrite", _register(p, "--overwrite", out=""), 2),
        ("--out . with --overwrite", _register(p, "--overwrite", out="."), 2),
        ("--overwrite of a folder with the user's files", _register(p, "--overwrite", out=p["thesis"]), 2),
        ("existing non-empty folder without --overwrite", _register(p, out=p["thesis"]), 2),
        ("fixed image is a folder", _register(p, fixed="folder"), 2),
        ("moving image is a symlink loop", _register(p, moving="loop"), 2),
        ("NaN voxels", _register(p, moving="nan"), 2),
        ("constant moving image", _register(p, moving="constant"), 2),
        ("2D fixed with 3D moving", _register(p, fixed="empty2d"), 2),
        ("not an image", _register(p, moving="garbage"), 2),
        ("single-file NIfTI with vox_offset 0", _register(p, moving="vox_offset0"), 2),
        ("truncated MetaImage", _register(p, moving="truncated"), 2),
        ("labels on another grid", _register(p, "--moving-labels", p["elsewhere_labels"]), 2),
        ("--features 100000", _register(p, *["--mode", "phantom", "--features", "100000"]), 2),
        ("--field-smoothing 1e6", _register(p, *["--field-smoothing", "1e6"]), 2),
        ("CT window on an image that is not HU", _register(p, *["--normalization", "ct"]), 2),
        (
            "a CT padded with -3024 (CT window)",
            _register(p, "--normalization", "ct", fixed="ct_padded", moving="ct_padded", out="out_ct"),
            0,
        ),
        (
            "a diverging run (no regularisation, step 5)",
            _register(p, *["--weight", "0", "--jacobian-weight", "0", "--learning-rate", "5", "--iterations", "30"]),
            4,
        ),
        (
            "apply: unknown output format",
            ["apply", "--displacement", field, "--image", p["moving"], "--out", "x.xyz"],
            2,
        ),
        (
            "apply: output is an input",
            ["apply", "--displacement", field, "--image", p["moving"], "--out", p["moving"]],
            2,
        ),
        (
            "apply: a constant image",
            ["apply", "--displacement", field, "--image", p["constant"], "--out", "c.nii.gz"],
            0,
        ),
        (
            "evaluate: --out '' with --overwrite",
            ["evaluate", "--fixed-labels", p["labels"], "--warped-labels", p["labels"], "--out", "", "--overwrite"],
            2,
        ),
    ]


def _snapshot(folder: Path) -> dict[str, str]:
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table to this Markdown file (e.g. docs/hostile-inputs.md)")
    args = parser.parse_args(argv)
    environment = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "CNNRegistration"), os.environ.get("PYTHONPATH", "")])
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        paths = _inputs(folder)
        for name, arguments, expected in cases(paths):
            before = _snapshot(folder)
            start = time.perf_counter()
            process = subprocess.run(
                [sys.executable, "-m", "cnnreg", *arguments],
                cwd=folder,
                env=environment,
                capture_output=True,
                text=True,
            )
            after = _snapshot(folder)
            lost = sorted(k for k, digest in before.items() if after.get(k) != digest)
            debris = sorted(k for k in after if ".partial-" in k or ".cnnreg-running" in k or ".old-" in k)
            message = (process.stderr.strip().splitlines() or [""])[-1]
            clean = process.returncode == 0 or ("Traceback" not in process.stderr and message.startswith("cnnreg"))
            rows.append(
                {
                    "case": name,
                    "expected": expected,
                    "code": process.returncode,
                    "clean": clean,
                    "debris": debris,
                    "lost": lost,
                    "seconds": time.perf_counter() - start,
                    "message": message[:110],
                }
            )
            for path in folder.glob("out*"):  # the next case starts from the same inputs
                if path.name != "out_ok":
                    shutil.rmtree(path, ignore_errors=True)
    lines = [
        "| case | expected | exit | clean error | debris | data lost | message |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['expected']} | {r['code']} | {'yes' if r['clean'] else 'NO'} | "
            f"{', '.join(r['debris']) or '-'} | {', '.join(r['lost']) or '-'} | {r['message'].replace('|', '/')} |"
        )
    wrong = sum(r["code"] != r["expected"] for r in rows)
    totals = (
        f"cases {len(rows)}, clean errors {sum(r['clean'] for r in rows)}, wrong codes {wrong}, "
        f"debris {sum(bool(r['debris']) for r in rows)}, data lost {sum(bool(r['lost']) for r in rows)}"
    )
    table = "\n".join(lines) + "\n\n" + totals + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text("# Hostile inputs (`scripts/hostile_inputs.py`)\n\n" + table)
    bad = wrong or any(not r["clean"] or r["debris"] or r["lost"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
