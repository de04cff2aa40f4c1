#!/usr/bin/env python3
"""Benchmark: our registration configurations vs SimpleITK demons, ANTs SyN and elastix,
on the same prepared cases, in the same run.

    scripts/benchmark                                   # every case, every method
    scripts/benchmark --cases mni2mm,itk_t1,2d --quick  # smoke test (few iterations)
    scripts/benchmark --methods demons,phantom-lncc     # a subset
    scripts/benchmark --rerun-peers                     # ignore cached peer results

Steps: install missing peers (pip), prepare the cases (``scripts/prepare_cases.py``, seeded,
into ``benchmark/cases/``), run every method in its own child process with the same thread
budget (``scripts/peers.py``), evaluate with :mod:`cnnreg.evaluate` (Dice per structure and
mean, HD95, folding %, TRE against the known field, wall time, peak memory) and write
``benchmark/results.md`` (tables + time/memory ratios of each of our configurations vs each
peer), ``benchmark/results.json``, ``benchmark/results.csv``, ``benchmark/qc_<case>.png`` and
``benchmark/dice_<case>.png`` (Dice per structure, one box per method); the reports are
rewritten after every case, so an interrupted run keeps the cases it finished.

Peer results are cached per case, seed and quick flag in ``benchmark/cache/`` (ANTs SyN takes
minutes on 2 cores); our configurations always run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
try:
    import cnnreg  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "CNNRegistration"))

import peers  # noqa: E402
import prepare_cases  # noqa: E402

from cnnreg import evaluate, evaluate_cli, qc  # noqa: E402

# ---------------------------------------------------------------------------------------
# What to run.  Our configurations: name -> `cnnreg register` arguments (besides the files).
# ---------------------------------------------------------------------------------------
_INSTANCE_LNCC = ["--mode", "instance", "--similarity", "lncc", "--regularizer", "diffusion"]
# tuned on mni2mm for smooth warps and speed: 3-voxel LNCC window, regularizer weight 0.5,
# control grid 6 voxels, FAIM's folding-penalty weight 1 (the coarser grid costs ~0.03 Dice on
# the real pair mni_colin, whose differences are less smooth)
_SMOOTH_WARPS = ["--window", "3", "--weight", "0.5", "--control-spacing", "6", "--jacobian-weight", "1"]
_LINEAR = ["--interpolation", "linear"]
_PHANTOM_LNCC = ["--mode", "phantom", "--similarity", "lncc", "--regularizer", "diffusion"]
_PHANTOM_FINE = ["--cnn-full-resolution-iterations", "120"]
OUR_CONFIGS: dict[str, list[str]] = {
    # instance mode with its defaults: what `cnnreg register` does without options (cubic
    # B-spline sampling, LNCC window 5, control grid 2 voxels, 100/60/60 iterations; see
    # cnnreg.settings)
    "instance-lncc": _INSTANCE_LNCC,
    # the fast setting: linear interpolation, 20 iterations at full resolution
    "instance-fast": [*_INSTANCE_LNCC, *_SMOOTH_WARPS, *_LINEAR, "--iterations", "100,60,20"],
    # the smooth-warp setting with the moving image sampled by cubic B-spline (linear
    # interpolation biases the optimum by a few tenths of a voxel), 40 iterations at each of
    # the two finer levels (the "instance-accurate" of the runs before 2026-12-04)
    "instance-smooth": [*_INSTANCE_LNCC, *_SMOOTH_WARPS, "--interpolation", "cubic", "--iterations", "100,40,40"],
    # instance mode with mutual information (for the phantom-to-image case, whose intensities differ)
    "instance-mi": ["--mode", "instance", "--similarity", "mi", "--regularizer", "diffusion"],
    # learned mode: one forward pass of the shipped weights (cnnreg/models, see the model card)
    "learned": ["--mode", "learned"],
    # the shipped network's field refined for 4 iterations at full resolution with the 3-voxel
    # LNCC window and weight 0.5 of instance-fast, on the default 2-voxel control grid with
    # cubic B-spline sampling (mni2mm: 0.9705; on instance-fast's 6-voxel grid 10 iterations
    # gave 0.9697 and 8 gave 0.9674; the backend's default is 50 iterations with window 5 and
    # weight 1: 0.968 on mni2mm, 0.793 on the real pair mni_colin)
    "learned-refine": ["--mode", "learned-refine", "--window", "3", "--weight", "0.5", "--refine-iterations", "4"],
    # phantom mode with its defaults (the U-Net works on <= 128^3 voxels, 100/60/80 iterations,
    # at the finest level on the previous level's images with the loss at full size, cubic
    # B-spline sampling, field upsampled to the fixed grid)
    "phantom-lncc": _PHANTOM_LNCC,
    # then 120 iterations with the U-Net on the full-size images: the finer field the
    # phantom-to-image case (phantom_mni), where the anatomy differs, needs (the Slicer
    # "Phantom to CT" preset)
    "phantom-long": [*_PHANTOM_LNCC, *_PHANTOM_FINE],
    # Chen et al. 2020's loss for XCAT -> CT (PCC+SSIM, gradient-L2 weight 0.8) with the
    # full-size stage
    "phantom-pcc-ssim": [
        "--mode",
        "phantom",
        "--similarity",
        "pcc+ssim",
        "--regularizer",
        "diffusion",
        "--weight",
        "0.8",
        *_PHANTOM_FINE,
    ],
    # phantom to patient CT (the xcat_ct case): the presets of `cnnreg register --preset NAME`
    # and of the Slicer module (cnnreg.settings.PRESETS)
    "phantom-to-ct": ["--preset", "phantom-to-ct"],
}
#: appended to every configuration with --quick
QUICK_ARGS: list[str] = ["--iterations", "20,10,5"]
#: appended to every configuration always (peers get the same thread budget)
COMMON_ARGS: list[str] = ["--device", "cpu", "--no-qc", "--overwrite"]
DEFAULT_CASES = ["mni2mm", "colin1mm", "itk_t1", "2d", "mni_colin", "phantom_mni"]
THREADS = 2

BENCHMARK = ROOT / "benchmark"


def prepare(case: str, seed: int) -> Path:
    """The case folder, prepared unless an identical-version copy exists."""
    folder = BENCHMARK / "cases" / f"{case}-seed{seed}"
    record = folder / "case.json"
    if record.exists():
        info = json.loads(record.read_text())
        if info.get("generator", "").endswith(f"(version {prepare_cases.GENERATOR_VERSION})"):
            return folder
    print(f"[{case}] preparing case (seed {seed}) -> {folder}", flush=True)
    prepare_cases.prepare_case(case, folder, seed)
    return folder


def run_peer(method: str, case_dir: Path, case: str, seed: int, quick: bool, rerun: bool, timeout: float) -> dict:
    tag = f"{case}-seed{seed}" + ("-quick" if quick else "")
    out = BENCHMARK / "cache" / tag / method
    cached = out / "result.json"
    if cached.exists() and not rerun:
        row = json.loads(cached.read_text())
        if row.get("status") == "ok" and "wall_s" in row:
            row["cached"] = True
            # the cache may have moved with the checkout: files live next to result.json
            row["files"] = {key: str(out / Path(name).name) for key, name in row.get("files", {}).items()}
            print(f"[{case}] {method}: cached ({row['wall_s']:.0f} s wall)", flush=True)
            return row
    print(f"[{case}] {method}: running ...", flush=True)
    load = os.getloadavg()[0]
    row = peers.run_method(method, case_dir, out, quick=quick, threads=THREADS, timeout=timeout, seed=seed)
    row["load_average_before"] = load
    row["cached"] = False
    # keep the parent's numbers with the cache
    cached.write_text(json.dumps(row, indent=2, default=str) + "\n")
    return row


def run_ours(
    name: str, arguments: Sequence[str], case_dir: Path, case: str, seed: int, quick: bool, timeout: float
) -> dict:
    tag = f"{case}-seed{seed}" + ("-quick" if quick else "")
    out = BENCHMARK / "runs" / tag / name
    extra = [*arguments, *COMMON_ARGS, "--threads", str(THREADS), "--seed", str(seed), *(QUICK_ARGS if quick else [])]
    print(f"[{case}] {name}: running cnnreg register {' '.join(extra)}", flush=True)
    load = os.getloadavg()[0]
    row = peers.run_method(
        "cnnreg", case_dir, out, quick=quick, threads=THREADS, timeout=timeout, extra_args=extra, seed=seed
    )
    row["method"] = name
    row["load_average_before"] = load
    row["cached"] = False
    row["arguments"] = list(extra)
    return row


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------


def _read(path: Path, vector: bool = False) -> sitk.Image:
    return sitk.ReadImage(str(path), sitk.sitkVectorFloat64 if vector else sitk.sitkUnknown)


def evaluate_row(row: dict, case_dir: Path, info: dict) -> dict:
    """Add ``metrics`` (cnnreg.evaluate) to a method's row; the TRE/folding region is the fixed labels."""
    fixed_labels = _read(case_dir / "fixed_labels.nii.gz")
    true_path = case_dir / "true_displacement.nii.gz"
    true_field = _read(true_path, vector=True) if true_path.exists() else None
    mask = sitk.GetArrayFromImage(fixed_labels) > 0
    names = {int(k): v for k, v in info.get("label_names", {}).items()}
    many_labels = len(names) > 20
    if row["method"] == "before":
        warped_labels = _read(case_dir / "moving_labels.nii.gz")
        if warped_labels.GetSize() != fixed_labels.GetSize() or warped_labels.GetOrigin() != fixed_labels.GetOrigin():
            # a pair on two grids (xcat_ct): the moving labels where they fall on the fixed grid
            identity = sitk.Transform(fixed_labels.GetDimension(), sitk.sitkIdentity)
            warped_labels = sitk.Resample(warped_labels, fixed_labels, identity, sitk.sitkNearestNeighbor, 0)
        field = sitk.Image(fixed_labels.GetSize(), sitk.sitkVectorFloat64, fixed_labels.GetDimension())
        field.CopyInformation(fixed_labels)
    elif row.get("status") == "ok":
        warped_labels = _read(Path(row["files"]["warped_labels"]))
        field = _read(Path(row["files"]["displacement"]), vector=True)
    else:
        return row
    metrics = evaluate.evaluate_registration(
        fixed_labels, warped_labels, field=field, true_field=true_field, mask=mask, label_names=names
    )
    if many_labels:  # keep the table readable: per-label values stay in results.json
        metrics["dice_min"] = float(min(metrics["dice"].values()))
    row["metrics"] = metrics
    own = Path(row.get("files", {}).get("displacement", "")).parent / "cnnreg_warped_labels.nii.gz"
    if row["method"] != "before" and own.exists():
        # our CLI's own warped labels vs the common SimpleITK resampling of its field
        agree = sitk.GetArrayFromImage(_read(own)) == sitk.GetArrayFromImage(warped_labels)
        row["cli_label_agreement_percent"] = float(100.0 * agree.mean())
    return row


# ---------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict) -> str:
    lines = [
        "# Registration benchmark",
        "",
        f"Generated by `scripts/benchmark` on {results['date']} ({results['machine']}). "
        f"Every method ran in its own process with {THREADS} threads "
        "(`OMP_NUM_THREADS`, `ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`)"
        + (" with **--quick** (few iterations; smoke test only)." if results["quick"] else "."),
        "",
        "* Dice: per structure between the fixed labels and the moving labels resampled (nearest neighbour) "
        "through each method's displacement field with SimpleITK; HD95: symmetric 95th-percentile surface "
        "distance (mm; quantised by the voxel size); ASSD: average symmetric surface distance (mm); folding: % of voxels inside the fixed labels with det J <= 0; TRE: mean |d − d_true| (mm) "
        "inside the fixed labels.",
        "* Time: `reg s` = the registration call as timed inside the child (for cnnreg: the `seconds` of its "
        "summary); `wall s` = the whole child process (interpreter start, imports, file I/O). Peak memory: "
        "the child's own high-water mark (`VmHWM`; runs before 2026-12-02T04:10 used `ru_maxrss`, which starts at "
        "the benchmark process's own RSS). `load` = 1-minute load average when the method started (the machine is shared: "
        "timings above ~2 are inflated).",
        "",
    ]
    for case, block in results["cases"].items():
        info = block["info"]
        rows = block["rows"]
        names = {int(k): v for k, v in info.get("label_names", {}).items()}
        shown_labels = sorted(names)[:6] if len(names) <= 6 else []
        lines += [f"## {case}", "", info.get("description", ""), ""]
        if block.get("date") and block["date"] != results["date"]:
            lines += [f"(Run of {block['date']}, merged with `--merge`.)", ""]
        header = (
            ["method", "status"]
            + [f"Dice {names[k]}" for k in shown_labels]
            + [
                "Dice mean",
                "HD95 mm",
                "ASSD mm",
                "folding %",
                "TRE mm",
                "reg s",
                "wall s",
                "peak MiB",
                "load",
            ]
        )
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in rows:
            m = row.get("metrics") or {}
            dice = {int(k): v for k, v in (m.get("dice") or {}).items()}
            status = row.get("status", "")
            if row.get("error"):
                status += f": {row['error'][:80]}"
            cells = [method_label(row, block) + (" (cached)" if row.get("cached") else ""), status]
            cells += [_fmt(dice.get(k)) for k in shown_labels]
            tre = m.get("tre") or {}
            cells += [
                _fmt(m.get("dice_mean")),
                _fmt(m.get("hd95_mean"), 2),
                _fmt(m.get("assd_mean"), 2),
                _fmt(m.get("folding_percent"), 4),
                _fmt(tre.get("mean"), 2),
                _fmt(row.get("registration_s"), 1),
                _fmt(row.get("wall_s"), 1),
                _fmt(row.get("peak_rss_mib"), 0),
                _fmt(row.get("load_average_before"), 1),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        ours = [r for r in rows if r["method"] in OUR_CONFIGS and r.get("status") == "ok"]
        others = [r for r in rows if r["method"] in peers.PEERS and r.get("status") == "ok"]
        if ours and others:
            lines += [
                f"Ratios on {case} (ours / peer; < 1 means ours is faster or smaller):",
                "",
                "| ours | peer | reg time | wall time | peak memory | Δ Dice mean |",
                "|---|---|---|---|---|---|",
            ]
            for mine in ours:
                for peer in others:

                    def ratio(key: str, mine=mine, peer=peer) -> float:
                        return (mine.get(key) or np.nan) / (peer.get(key) or np.nan)

                    delta = (mine.get("metrics") or {}).get("dice_mean", np.nan) - (peer.get("metrics") or {}).get(
                        "dice_mean", np.nan
                    )
                    lines.append(
                        f"| {mine['method']} | {peer['method']} | {_fmt(ratio('registration_s'), 2)} | "
                        f"{_fmt(ratio('wall_s'), 2)} | {_fmt(ratio('peak_rss_mib'), 2)} | {delta:+.3f} |"
                    )
            lines.append("")
        if block.get("dice_figure"):
            lines += [f"![Dice {case}]({Path(block['dice_figure']).name})", ""]
        if block.get("figure"):
            lines += [f"![QC {case}]({Path(block['figure']).name})", ""]
    lines += ["## Method settings", ""]
    seen = set()
    for block in results["cases"].values():
        for row in block["rows"]:
            if row["method"] in seen or row["method"] == "before":
                continue
            seen.add(row["method"])
            settings = json.dumps(row.get("arguments") or row.get("parameters") or {})
            settings = re.sub(r"(?:/[^\s\"/]+)+/([^\s\"/]+)", r"\1", settings)  # a case's paths as file names
            lines.append(f"* **{row['method']}**: `{settings}` {json.dumps(row.get('versions', {}))}")
    lines.append("")
    return "\n".join(lines)


def comparison_figure(case: str, case_dir: Path, rows: list[dict], path: Path) -> str | None:
    """The methods side by side on the middle slice (array axis 0), a row each: warped image with
    the fixed labels' contours, |warped - fixed|, det J in the colours of every run's qc.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = sitk.GetArrayFromImage(_read(case_dir / "fixed.nii.gz")).astype(np.float64)
    labels = sitk.GetArrayFromImage(_read(case_dir / "fixed_labels.nii.gz"))
    shown = [r for r in rows if r["method"] == "before" or (r.get("status") == "ok" and r.get("files"))]
    if not shown:
        return None

    def middle(array):
        return array[array.shape[0] // 2] if array.ndim == 3 else array

    # a CT in HU is shown in the soft-tissue/lung window, other images from 0 to their 99.5th percentile
    low, high = (-1000.0, 400.0) if fixed.min() < -500 else (0.0, float(np.percentile(fixed, 99.5)) or 1.0)
    scale = high - low
    figure, axes = plt.subplots(len(shown), 3, figsize=(9, 3 * len(shown)), squeeze=False)
    dets = []
    for row in shown:
        if row["method"] == "before":
            dets.append(np.ones_like(fixed))
        else:
            dets.append(evaluate.field_jacobian_determinant(_read(Path(row["files"]["displacement"]), vector=True)))
    colours, norm = qc.jacobian_colours(np.concatenate([middle(d).ravel() for d in dets]))
    for axis_row, row, det in zip(axes, shown, dets):
        if row["method"] == "before":
            moving = _read(case_dir / "moving.nii.gz")
            reference = _read(case_dir / "fixed.nii.gz")
            if moving.GetSize() != reference.GetSize() or moving.GetOrigin() != reference.GetOrigin():
                moving = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            warped = sitk.GetArrayFromImage(moving).astype(np.float64)
        else:
            warped = sitk.GetArrayFromImage(_read(Path(row["files"]["warped"]))).astype(np.float64)
        dice = (row.get("metrics") or {}).get("dice_mean")
        axis_row[0].imshow(middle(warped), cmap="gray", vmin=low, vmax=high, origin="lower")
        axis_row[0].contour(
            middle(labels), levels=np.unique(labels)[1:] - 0.5, colors="tab:orange", linewidths=0.5, origin="lower"
        )
        axis_row[0].set_title(f"{row['method']}  Dice {_fmt(dice)}", fontsize=9)
        axis_row[1].imshow(
            np.abs(middle(warped) - middle(fixed)), cmap="magma", vmin=0, vmax=0.5 * scale, origin="lower"
        )
        axis_row[1].set_title("|warped − fixed|", fontsize=9)
        image = qc.draw_jacobian(axis_row[2], np.flipud(middle(det)), colours, norm)
        axis_row[2].set_title(f"det J (min {det.min():.2f}; folds yellow)", fontsize=9)
        for axis in axis_row:
            axis.axis("off")
    figure.colorbar(image, ax=axes[:, 2].tolist(), shrink=0.6)
    figure.suptitle(f"{case}: middle slice (array axis 0); contours = fixed labels", fontsize=10)
    figure.savefig(path, dpi=60)
    plt.close(figure)
    return str(path)


def case_dice_boxplot(case: str, rows: list[dict], path: Path) -> str | None:
    """The Dice box plot of ``cnnreg evaluate`` over the case's evaluated methods."""
    shown = [r for r in rows if (r.get("metrics") or {}).get("dice")]
    if not shown:
        return None
    labels = list(dict.fromkeys(label for r in shown for label in r["metrics"]["dice"]))
    results = [{"method": r["method"], "subject": case, "dice": r["metrics"]["dice"]} for r in shown]
    evaluate_cli.dice_boxplot(results, [r["method"] for r in shown], labels, {}, str(path), title=f"{case}: Dice")
    return str(path)


README_START, README_END = "<!-- benchmark-summary:start -->", "<!-- benchmark-summary:end -->"


def method_label(row: dict, block: dict) -> str:
    """The method's name, with the date of its run when it was kept from an earlier run (--merge)."""
    run = row.get("run_date")
    earlier = run and block.get("date") and run[:16] != str(block["date"])[:16]
    return row["method"] + (f" (run {run[:10]})" if earlier else "")


def summary_table(results: dict) -> str:
    """One row per case and method: mean Dice, HD95, folding, TRE, wall time, peak memory."""
    lines = [
        "| case | method | Dice mean | HD95 mm | folding % | TRE mm | wall s | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, block in results["cases"].items():
        for row in block["rows"]:
            m = row.get("metrics") or {}
            status = row.get("status", "")
            if status != "ok":
                lines.append(
                    f"| {case} | {method_label(row, block)} | {status}: {(row.get('error') or '')[:40]} | | | | | |"
                )
                continue
            lines.append(
                f"| {case} | {method_label(row, block)} | {_fmt(m.get('dice_mean'))} | {_fmt(m.get('hd95_mean'), 2)} | "
                f"{_fmt(m.get('folding_percent'), 4)} | {_fmt((m.get('tre') or {}).get('mean'), 2)} | "
                f"{_fmt(row.get('wall_s'), 1)} | {_fmt(row.get('peak_rss_mib'), 0)} |"
            )
    return "\n".join(lines) + "\n"


def voxels(block: dict) -> int:
    """Voxels of a case's fixed grid."""
    return int(np.prod(block["info"].get("fixed_grid", {}).get("size", [0])))


#: the methods of the cost table: the default command, phantom mode, the phantom-to-CT presets, Greedy
COST_METHODS = ("instance-lncc", "phantom-lncc", "phantom-to-ct", "greedy")


def cost_table(results: dict) -> str:
    """Wall time and peak memory against the fixed grid's voxel count (cases in size order), for
    :data:`COST_METHODS`; a ratio column divides each by Greedy's in the same case."""
    lines = [
        "| case | fixed voxels | method | wall s | peak MiB | wall / Greedy's | memory / Greedy's |",
        "|---|---|---|---|---|---|---|",
    ]

    for case, block in sorted(results["cases"].items(), key=lambda item: voxels(item[1])):
        rows = {r["method"]: r for r in block["rows"] if r.get("status") == "ok" and r["method"] in COST_METHODS}
        greedy = rows.get("greedy", {})
        for method in COST_METHODS:
            row = rows.get(method)
            if row is None:
                continue
            ratios = [
                _fmt(row[key] / greedy[key], 2) if greedy.get(key) and row.get(key) else "–"
                for key in ("wall_s", "peak_rss_mib")
            ]
            lines.append(
                f"| {case} | {voxels(block):,} | {method} | {_fmt(row.get('wall_s'), 1)} | "
                f"{_fmt(row.get('peak_rss_mib'), 0)} | {ratios[0]} | {ratios[1]} |"
            )
    return "\n".join(lines) + "\n"


#: the README's short table: (column, methods tried in order: the first with a result in the case)
README_COLUMNS = (
    ("default", ("instance-lncc",)),
    ("phantom mode", ("phantom-to-ct", "phantom-lncc")),  # the CT case: its preset
    ("learned-refine", ("learned-refine",)),
    ("Greedy", ("greedy",)),
    ("ANTs SyN", ("ants_syn",)),
    ("demons", ("demons",)),
)


def readme_table(results: dict) -> str:
    """One row per case (by size): mean Dice (wall s) of the default command, phantom mode (the
    phantom-to-CT preset on the CT case), learned-refine and the peers; the full tables are in
    results.md."""
    lines = [
        "| case | voxels | " + " | ".join(name for name, _ in README_COLUMNS) + " |",
        "|---|---|" + "---|" * len(README_COLUMNS),
    ]
    for case, block in sorted(results["cases"].items(), key=lambda item: voxels(item[1])):
        rows = {row["method"]: row for row in block["rows"] if row.get("status") == "ok"}
        cells = []
        for _, methods in README_COLUMNS:
            row = next((rows[m] for m in methods if m in rows), None)
            dice = (row or {}).get("metrics", {}).get("dice_mean") if row else None
            cells.append("–" if dice is None else f"{dice:.3f} ({row.get('wall_s', 0):.0f} s)")
        lines.append(f"| {case} | {voxels(block):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(results: dict, readme: Path = ROOT / "README.md") -> bool:
    """Replace the README's generated summary (between the two markers) by :func:`readme_table`."""
    if not readme.exists():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    stamp = (
        f"Generated by `scripts/benchmark` ({results['date']}, {results['machine']}, {THREADS} threads per method).\n\n"
    )
    readme.write_text(head + README_START + "\n" + stamp + readme_table(results) + README_END + tail)
    return True


def write_reports(results: dict, report: Path) -> None:
    """results.json (paths relative to the checkout), results.csv and results.md."""
    stored = json.loads(json.dumps(results, default=str))
    for block in stored["cases"].values():
        for row in block["rows"]:
            row["files"] = {key: _relative(path) for key, path in row.get("files", {}).items()}
        for key in ("figure", "dice_figure"):
            block[key] = _relative(block[key]) if block.get(key) else None
    evaluate.write_json(stored, report / "results.json")
    table_rows = [
        {
            "case": case,
            "method": row["method"],
            "status": row.get("status"),
            "wall_s": row.get("wall_s"),
            "registration_s": row.get("registration_s"),
            "peak_rss_mib": row.get("peak_rss_mib"),
            **(row.get("metrics") or {}),
        }
        for case, block in stored["cases"].items()
        for row in block["rows"]
    ]
    evaluate.evaluation_table(table_rows, csv_path=report / "results.csv")
    cost = (
        "\n## Cost against image size\n\nWall time and peak memory of the default command (`instance-lncc`), "
        "phantom mode and the phantom-to-CT presets against Greedy's in the same case and run.\n\n"
    )
    (report / "results.md").write_text(markdown(stored) + cost + cost_table(stored))
    if report.resolve() == BENCHMARK.resolve() and update_readme(stored):
        print("updated the README's benchmark summary", flush=True)
    print(f"wrote {report / 'results.md'}, results.json, results.csv", flush=True)


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", default=",".join(DEFAULT_CASES), help=f"comma list from {', '.join(prepare_cases.CASES)}"
    )
    parser.add_argument(
        "--methods",
        default=",".join([*peers.PEERS, *OUR_CONFIGS]),
        help=f"comma list from peers {', '.join(peers.PEERS)} and our configurations {', '.join(OUR_CONFIGS)}",
    )
    parser.add_argument("--quick", action="store_true", help="few iterations everywhere (smoke test)")
    parser.add_argument("--rerun-peers", action="store_true", help="run peers even when a cached result exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="per method, seconds")
    parser.add_argument("--no-install", action="store_true", help="do not pip-install missing peers")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md from results.json; run nothing")
    parser.add_argument("--out", default=str(BENCHMARK), help="folder for results.md/json/csv and QC figures")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other cases of an existing results.json in --out, and in the cases rerun the rows of the "
        "methods not rerun (each row keeps the date of its run)",
    )
    args = parser.parse_args(argv)
    report = Path(args.out)
    report.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((report / "results.json").read_text())
        for case, block in results["cases"].items():
            case_dir = BENCHMARK / "cases" / f"{case}-seed{results['seed']}"
            for row in block["rows"]:
                row["files"] = {key: str(ROOT / name) for key, name in row.get("files", {}).items()}
            files = [Path(p) for r in block["rows"] for p in r["files"].values()]
            if case_dir.exists() and all(p.exists() for p in files):
                block["figure"] = comparison_figure(case, case_dir, block["rows"], report / f"qc_{case}.png")
                block["dice_figure"] = case_dice_boxplot(case, block["rows"], report / f"dice_{case}.png")
        write_reports(results, report)
        return 0
    cases = [c for c in args.cases.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    for case in cases:
        if case not in prepare_cases.CASES:
            parser.error(f"unknown case {case!r}; choose from {', '.join(prepare_cases.CASES)}")
    for method in methods:
        if method not in peers.PEERS and method not in OUR_CONFIGS:
            parser.error(f"unknown method {method!r}; choose from {', '.join([*peers.PEERS, *OUR_CONFIGS])}")
    BENCHMARK.mkdir(exist_ok=True)
    chosen_peers = [m for m in methods if m in peers.PEERS]
    install = {} if args.no_install else peers.install_peers(chosen_peers)
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "threads": THREADS,
        "quick": args.quick,
        "seed": args.seed,
        "install": install,
        "our_configs": OUR_CONFIGS,
        "cases": {},
    }
    previous = report / "results.json"
    earlier_rows: dict[str, list[dict]] = {}
    if args.merge and previous.exists():
        earlier = json.loads(previous.read_text())
        results["cases"] = {case: block for case, block in earlier["cases"].items() if case not in cases}
        for block in results["cases"].values():
            block.setdefault("date", earlier.get("date"))
        for case in cases:
            block = earlier["cases"].get(case)
            if block:
                # rows of configurations no longer defined here are dropped
                retired = {r["method"] for r in block["rows"]} - {"before", *OUR_CONFIGS, *peers.PEERS}
                if retired:
                    print(f"[{case}] dropping the rows of retired configurations {sorted(retired)}", flush=True)
                skip = {"before", *retired, *methods}
                kept = [r for r in block["rows"] if r["method"] not in skip]
                for row in kept:
                    row.setdefault("run_date", block.get("date", earlier.get("date")))
                    row["files"] = {}  # their files belong to the earlier run
                earlier_rows[case] = kept
    for case in cases:
        case_dir = prepare(case, args.seed)
        info = json.loads((case_dir / "case.json").read_text())
        rows = [{"method": "before", "status": "ok"}]
        for method in methods:
            if method in peers.PEERS:
                row = run_peer(method, case_dir, case, args.seed, args.quick, args.rerun_peers, args.timeout)
            else:
                row = run_ours(method, OUR_CONFIGS[method], case_dir, case, args.seed, args.quick, args.timeout)
            rows.append(row)
            if row.get("status") != "ok":
                print(f"[{case}] {method}: {row.get('status')} ({row.get('error')})", flush=True)
        started = time.perf_counter()
        for row in rows:
            row.setdefault("run_date", results["date"])
            evaluate_row(row, case_dir, info)
            m = row.get("metrics")
            if m:
                print(
                    f"[{case}] {row['method']}: Dice mean {m['dice_mean']:.3f} "
                    f"{ {int(k): round(v, 3) for k, v in list(m['dice'].items())[:6]} }, wall {_fmt(row.get('wall_s'), 1)} s, "
                    f"peak {_fmt(row.get('peak_rss_mib'), 0)} MiB",
                    flush=True,
                )
        print(f"[{case}] evaluated in {time.perf_counter() - started:.1f} s", flush=True)
        rows += earlier_rows.get(case, [])
        figure = comparison_figure(case, case_dir, rows, report / f"qc_{case}.png")
        dice_figure = case_dice_boxplot(case, rows, report / f"dice_{case}.png")
        results["cases"][case] = {
            "info": info,
            "rows": rows,
            "figure": figure,
            "dice_figure": dice_figure,
            "date": results["date"],
        }
        write_reports(results, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
