#!/usr/bin/env python
"""Seconds per iteration, per pyramid level, of the phantom and instance modes (same run).

    python scripts/phantom_timing.py [--threads 2] [--iterations 6] [--case mni2mm]

Registers the benchmark case's pair (default mni2mm: MNI152 at 2 mm, 96^3) with each mode for a
few iterations per level, times every iteration from the progress callback, and prints the
median seconds per iteration of each level with the level's grid, the phantom/instance ratio,
and the cost of the default cubic B-spline sampling against linear sampling (instance mode
with ``interpolation="linear"``).  Peers are not involved; this is the profile that sizes the
phantom mode's schedule and the instance defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from cnnreg.pyramid import pyramid_shapes  # noqa: E402
from cnnreg.registration import register  # noqa: E402
from cnnreg.settings import OptimizationSettings, RegistrationSettings  # noqa: E402


def time_levels(fixed, moving, mode: str, iterations: int, **optimization) -> dict[str, float]:
    stamps: dict[str, list[float]] = {}
    last = [time.perf_counter()]

    def callback(event: dict) -> None:
        now = time.perf_counter()
        if event.get("event") == "progress":
            stamps.setdefault(event["stage"], []).append(now - last[0])
        last[0] = now

    settings = RegistrationSettings(
        mode=mode,
        device="cpu",
        optimization=OptimizationSettings(iterations=iterations, patience=10**6, **optimization),
    )
    register(fixed, moving, settings, callback=callback)
    # the first iteration of a level also builds it (resampling, network); report the median
    return {stage: statistics.median(times[1:] or times) for stage, times in stamps.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--iterations", type=int, default=6, help="iterations per level (default 6)")
    parser.add_argument("--case", default="mni2mm", help="benchmark case (default mni2mm)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import benchmark

    folder = benchmark.prepare(args.case, 0)
    fixed = sitk.ReadImage(str(folder / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(folder / "moving.nii.gz"))
    shape = sitk.GetArrayViewFromImage(fixed).shape
    shapes = pyramid_shapes(shape, 3)
    phantom = time_levels(fixed, moving, "phantom", args.iterations)
    instance = time_levels(fixed, moving, "instance", args.iterations)  # defaults: cubic B-spline
    linear = time_levels(fixed, moving, "instance", args.iterations, interpolation="linear")
    print(f"{args.case} {tuple(shape)}, {args.threads} threads, median s/iteration of {args.iterations} per level")
    print(
        "| level | grid | phantom s/it | instance s/it | phantom / instance | instance linear s/it | cubic / linear |"
    )
    print("|---|---|---|---|---|---|---|")
    for (stage, cnn), cubic, lin, grid in zip(phantom.items(), instance.values(), linear.values(), shapes):
        size = "x".join(map(str, grid))
        print(f"| {stage} | {size} | {cnn:.3f} | {cubic:.3f} | {cnn / cubic:.1f} | {lin:.3f} | {cubic / lin:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
