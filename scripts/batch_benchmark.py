#!/usr/bin/env python
"""Throughput of ``cnnreg batch`` against the same registrations as serial ``cnnreg register``
commands, in one run: 8 pairs of the 96^3 case (mni2mm with seeds 0-7: the MNI152 2 mm crop and
8 known smooth warps of it), the default command, on this machine.

Configurations: serial (8 commands one after another, all cores each), batch with 1 worker (all
cores), batch with one worker per core (1 thread each).  Reported: wall time, pairs per hour, the
ratio to serial, mean Dice, and the peak resident memory of the largest registration process
(psutil, sampled every 0.2 s over the command's process tree).  Writes docs/batch-benchmark.md.

    python scripts/batch_benchmark.py [--pairs 8] [--out benchmark/batch]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def prepare(pairs: int, cases: Path) -> Path:
    import prepare_cases

    rows = []
    for seed in range(pairs):
        folder = cases / f"mni2mm-seed{seed}"
        if not (folder / "case.json").exists():
            prepare_cases.prepare_case("mni2mm", folder, seed=seed)
        rows.append(
            {
                "fixed": str(folder / "fixed.nii.gz"),
                "moving": str(folder / "moving.nii.gz"),
                "moving_labels": str(folder / "moving_labels.nii.gz"),
                "fixed_labels": str(folder / "fixed_labels.nii.gz"),
                "name": f"pair{seed}",
            }
        )
    table = cases / "pairs.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table


def timed(command: list[str], env: dict) -> tuple[float, float, int]:
    """(wall s, peak RSS MiB of the largest process in the tree, exit code)."""
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    done = threading.Event()

    def sample():
        nonlocal peak
        parent = psutil.Process(process.pid)
        while not done.is_set():
            try:
                for member in [parent, *parent.children(recursive=True)]:
                    peak = max(peak, member.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return time.perf_counter() - start, peak, process.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmark" / "batch"))
    parser.add_argument("--report", default=str(ROOT / "docs" / "batch-benchmark.md"))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out / "runs", ignore_errors=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    table = prepare(args.pairs, ROOT / "benchmark" / "cases" / "batch")
    with open(table, encoding="utf-8") as handle:
        pairs = list(csv.DictReader(handle))
    cores = os.cpu_count() or 1
    env = dict(os.environ)
    python = [sys.executable, "-m", "cnnreg"]
    rows = []

    serial_dir = out / "runs" / "serial"
    serial_dir.mkdir()
    start = time.perf_counter()
    peak = 0.0
    for pair in pairs:
        command = [*python, "register", "--fixed", pair["fixed"], "--moving", pair["moving"]]
        command += ["--moving-labels", pair["moving_labels"], "--no-qc", "--progress", "none", "--threads", str(cores)]
        _, rss, code = timed([*command, "--out", str(serial_dir / pair["name"])], env)
        assert code == 0, "a serial registration failed"
        peak = max(peak, rss)
    rows.append(
        {"configuration": f"serial register, {cores} threads", "wall_s": time.perf_counter() - start, "peak": peak}
    )
    dice_of = {}
    from cnnreg.batch import _dice

    dice_of["serial"] = [
        _dice(p["fixed_labels"], str(serial_dir / p["name"] / "warped_labels.nii.gz"))[1] for p in pairs
    ]
    for workers, threads in ((1, cores), (cores, 1)):
        name = f"batch-{workers}x{threads}"
        command = [*python, "batch", "--pairs", str(table), "--out", str(out / "runs" / name), "--no-qc"]
        command += ["--workers", str(workers), "--threads", str(threads), "--progress", "none", "--dashboard", "none"]
        wall, rss, code = timed(command, env)
        assert code == 0, f"{name} failed"
        rows.append({"configuration": f"batch, {workers} worker(s) x {threads} thread(s)", "wall_s": wall, "peak": rss})
        result = json.loads((out / "runs" / name / "batch.json").read_text())["pairs"]
        dice_of[name] = [row["dice_mean"] for row in result]
    serial_wall = rows[0]["wall_s"]
    lines = [
        "# `cnnreg batch` throughput",
        "",
        f"Generated by `scripts/batch_benchmark.py` ({time.strftime('%Y-%m-%dT%H:%M')}, {platform.machine()}, "
        f"{cores} CPUs, Python {platform.python_version()}): {len(pairs)} pairs of the 96^3 case (mni2mm, seeds "
        f"0-{len(pairs) - 1}), the default command, every configuration in this one run. Peak memory: the largest "
        "single process of the command's tree (a registration, or a Dask worker).",
        "",
        "| configuration | wall s | pairs per hour | wall / serial | mean Dice | peak MiB per process |",
        "|---|---|---|---|---|---|",
    ]
    for row, dice in zip(rows, dice_of.values()):
        values = [d for d in dice if d is not None]
        lines.append(
            f"| {row['configuration']} | {row['wall_s']:.1f} | {3600 * len(pairs) / row['wall_s']:.0f} | "
            f"{row['wall_s'] / serial_wall:.2f} | {sum(values) / len(values):.4f} | {row['peak']:.0f} |"
        )
    Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
