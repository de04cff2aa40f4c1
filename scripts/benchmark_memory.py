#!/usr/bin/env python3
"""Peak memory and time of phantom mode on a 160x192x224 volume (the size class of Chen et al.'s
XCAT-to-CT example, whose reference code needed ~16 GB of GPU memory).

Builds the pair from the MNI152 1 mm template (nilearn; resampled to 160x192x224 voxels of
1 mm, moving = a smooth random warp of it), runs ``cnnreg register --mode phantom`` in a
child process per device, and prints a Markdown table: wall time, CPU time (user + system;
less sensitive than wall time to other work on a shared machine), peak RSS of the child (CPU)
and ``torch.cuda.max_memory_allocated`` (CUDA).

    python scripts/benchmark_memory.py [--iterations 20,10,5] [--full-resolution-iterations 2]
        [--devices cpu,cuda] [--out benchmark/memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "CNNRegistration"))

from cnnreg.spatial import gaussian_smooth, warp  # noqa: E402

SIZE = (160, 192, 224)  # SimpleITK (i, j, k)

CHILD = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, {backend!r})
sys.path.insert(0, {scripts!r})
from cnnreg.cli import main
from peers import own_peak_rss_kib
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
code = main({argv!r})
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu_seconds = usage.ru_utime + usage.ru_stime
peak_rss = own_peak_rss_kib() / 2**20  # KiB -> GiB
cuda = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
print("RESULT " + json.dumps({{"code": code, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_gib": peak_rss,
                             "cuda_peak_gib": cuda}}))
"""


def make_pair(folder: str, seed: int = 0) -> tuple[str, str]:
    """Fixed = MNI152 1 mm resampled to 160x192x224; moving = fixed warped (<= 6 voxels)."""
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=1)
    path = os.path.join(folder, "mni1mm.nii.gz")
    template.to_filename(path)
    source = sitk.ReadImage(path, sitk.sitkFloat32)
    reference = sitk.Image(SIZE, sitk.sitkFloat32)
    reference.SetDirection(source.GetDirection())
    centre = np.asarray(source.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in source.GetSize()]))
    extent = np.asarray(source.GetDirection()).reshape(3, 3) @ ((np.asarray(SIZE) - 1) / 2)
    reference.SetOrigin(tuple(centre - extent))
    fixed = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    array = torch.from_numpy(sitk.GetArrayFromImage(fixed))[None, None]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 3, 8, 8, 8), generator=generator)
    coarse_to_fine = torch.nn.functional.interpolate(noise, size=array.shape[2:], mode="trilinear", align_corners=True)
    u = gaussian_smooth(coarse_to_fine, 3.0)
    u = u / u.abs().max() * 6.0
    moving = sitk.GetImageFromArray(warp(array, u)[0, 0].numpy())
    moving.CopyInformation(fixed)
    fixed_path, moving_path = os.path.join(folder, "fixed.nii.gz"), os.path.join(folder, "moving.nii.gz")
    sitk.WriteImage(fixed, fixed_path)
    sitk.WriteImage(moving, moving_path)
    return fixed_path, moving_path


def run(device: str, fixed: str, moving: str, out: str, iterations: str, threads: int, full_resolution: int) -> dict:
    argv = [
        "register",
        "--fixed",
        fixed,
        "--moving",
        moving,
        "--out",
        out,
        "--overwrite",
        "--mode",
        "phantom",
        "--iterations",
        iterations,
        "--cnn-full-resolution-iterations",
        str(full_resolution),
        "--device",
        device,
        "--progress",
        "none",
        "--no-qc",
    ]
    code = CHILD.format(backend=os.path.join(ROOT, "CNNRegistration"), scripts=os.path.join(ROOT, "scripts"), argv=argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        return {
            "device": device,
            "error": (process.stderr.strip().splitlines() or ["failed"])[-1],
            "wall_seconds": wall,
        }
    result = json.loads(lines[-1][len("RESULT ") :])
    summary = json.load(open(os.path.join(out, "summary.json")))
    return {
        "device": device,
        "wall_seconds": wall,
        **result,
        "similarity_before": summary["similarity_before"],
        "similarity_after": summary["similarity_after"],
        "folding_percent": summary["folding_percent"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", default="20,10,5", help="phantom-mode iterations per level")
    parser.add_argument(
        "--full-resolution-iterations",
        type=int,
        default=2,
        help="phantom mode's last stage with the CNN on the full-size images (its peak memory; 0 = none)",
    )
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmark", "memory"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        fixed, moving = make_pair(folder)
        for device in args.devices.split(","):
            if device.startswith("cuda") and not torch.cuda.is_available():
                rows.append({"device": device, "error": "no CUDA GPU on this machine"})
                continue
            rows.append(
                run(
                    device,
                    fixed,
                    moving,
                    os.path.join(folder, f"out-{device}"),
                    args.iterations,
                    args.threads,
                    args.full_resolution_iterations,
                )
            )
    lines = [
        f"Phantom mode on {SIZE[0]}x{SIZE[1]}x{SIZE[2]} (MNI152 1 mm, smooth warp <= 6 voxels), iterations "
        f"{args.iterations} + {args.full_resolution_iterations} with the CNN on the full-size images",
        "",
        "| device | wall time (s) | CPU time (s) | peak RSS (GiB) | peak CUDA memory (GiB) | LNCC before -> after "
        "| folding % |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['device']} | not run: {row['error']} | | | | | |")
            continue
        cuda = f"{row['cuda_peak_gib']:.2f}" if row.get("cuda_peak_gib") is not None else "-"
        lines.append(
            f"| {row['device']} | {row['wall_seconds']:.1f} | {row['cpu_seconds']:.1f} | "
            f"{row['peak_rss_gib']:.2f} | {cuda} | "
            f"{row['similarity_before']:.3f} -> {row['similarity_after']:.3f} | {row['folding_percent']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(args.out, "memory.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(args.out, "memory.json"), "w") as handle:
        json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
