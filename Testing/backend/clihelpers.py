"""Shared by the command-line tests (test_cli.py, test_cli_outputs.py): the small 3D input pair,
the register command lines, folder snapshots (the input pair itself is conftest's ``inputs``)."""

from __future__ import annotations

from pathlib import Path

from cnnreg.cli import main

FAST = ["--device", "cpu", "--levels", "1", "--iterations", "4", "--features", "4", "--threads", "2"]
SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"


def register_args(inputs, out, *extra, moving="moving.nii.gz", fixed="fixed.nii.gz", labels="labels.nii.gz"):
    args = ["register", "--fixed", inputs[fixed], "--moving", inputs[moving], "--out", str(out)]
    if labels:
        args += ["--moving-labels", inputs[labels]]
    return args + list(extra)


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def first_run(inputs, out):
    assert main(register_args(inputs, out, "--progress", "none", *FAST)) == 0
    return snapshot(out)


def sample_args(out, *extra):
    images = ["--fixed", str(SAMPLE / "fixed.nii.gz"), "--moving", str(SAMPLE / "moving.nii.gz")]
    return [
        "register",
        *images,
        "--out",
        str(out),
        "--device",
        "cpu",
        "--threads",
        "2",
        "--no-qc",
        "--progress",
        "none",
        *extra,
    ]
