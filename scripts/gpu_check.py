#!/usr/bin/env python3
"""The checks to run when a GPU is lent: time and peak GPU memory of

* the phantom-to-CT presets on the real CT case (``xcat_ct``, 512x512x133: prepare it first on
  a machine with network access, ``python scripts/prepare_cases.py xcat_ct
  benchmark/cases/xcat_ct-seed0``, and carry that folder to the GPU machine), with lung and
  body Dice;
* learned and learned-refine on a 160x192x224 pair (MNI152 1 mm, a smooth random warp; the size
  class of Chen et al.'s XCAT example), the shipped weights.

    python scripts/gpu_check.py [--case benchmark/cases/xcat_ct-seed0] [--device cuda] [--out DIR]

Prints one Markdown table and writes it with the raw numbers to ``--out`` (JSON).  Each run
is a fresh ``cnnreg.registration.register`` call in this process;
``torch.cuda.max_memory_allocated`` is reset before each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CNNRegistration"))
sys.path.insert(0, str(ROOT / "scripts"))

from cnnreg.evaluate import dice_per_label  # noqa: E402
from cnnreg.registration import register  # noqa: E402
from cnnreg.settings import Mode, RegistrationSettings, preset_settings  # noqa: E402


def _timed(device: str, fixed, moving, settings, labels=None) -> tuple[object, float, float | None]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = register(fixed, moving, settings, moving_labels=labels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return result, seconds, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default=str(ROOT / "benchmark" / "cases" / "xcat_ct-seed0"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(ROOT / "benchmark" / "gpu"))
    args = parser.parse_args(argv)
    rows = []
    case = Path(args.case)
    if (case / "fixed.nii.gz").exists():
        fixed = sitk.ReadImage(str(case / "fixed.nii.gz"))
        moving = sitk.ReadImage(str(case / "moving.nii.gz"))
        labels = sitk.ReadImage(str(case / "moving_labels.nii.gz"))
        fixed_labels = sitk.ReadImage(str(case / "fixed_labels.nii.gz"))
        for mode in (Mode.PHANTOM, Mode.INSTANCE):  # the preset as it is, then with the dense field
            name = f"phantom-to-ct --mode {mode.value}"
            settings = preset_settings("phantom-to-ct")
            settings.device, settings.mode = args.device, mode
            result, seconds, peak = _timed(args.device, fixed, moving, settings, labels)
            dice = dice_per_label(fixed_labels, result.warped_labels, [1, 2])
            rows.append(
                {"run": f"xcat_ct {name}", "seconds": seconds, "peak_gpu_gib": peak, "lungs": dice[2], "body": dice[1]}
            )
            print(rows[-1], flush=True)
    else:
        print(f"no CT case at {case}: skipped (prepare it with scripts/prepare_cases.py xcat_ct)", flush=True)
    from benchmark_memory import make_pair

    with tempfile.TemporaryDirectory() as folder:
        fixed_path, moving_path = make_pair(folder)
        fixed, moving = sitk.ReadImage(fixed_path), sitk.ReadImage(moving_path)
        for mode, extra in (("learned", {}), ("learned-refine", {"refine_iterations": 50})):
            settings = RegistrationSettings(mode=mode, device=args.device, **extra)
            result, seconds, peak = _timed(args.device, fixed, moving, settings)
            rows.append({"run": f"160x192x224 {mode}", "seconds": seconds, "peak_gpu_gib": peak})
            print(rows[-1], flush=True)
    lines = ["| run | seconds | peak GPU GiB | lungs | body |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [row.get(k) for k in ("seconds", "peak_gpu_gib", "lungs", "body")]
        lines.append(f"| {row['run']} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    table = f"Device: {device}\n\n" + "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(table)
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
