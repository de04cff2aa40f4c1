#!/usr/bin/env python
"""Regenerate the shipped learned-mode weights (``Resources/Models``) from scratch.

Usage::

    python scripts/train_weights.py                       # both models -> Resources/Models (GPU advised)
    python scripts/train_weights.py --only 3d --device cuda
    python scripts/train_weights.py --quick               # 2 tiny epochs per model -> a temporary folder

Data (installed by package managers on a fresh machine; nothing is downloaded at run time):

* MNI152 2009a T1 (nilearn, ``load_mni152_template``), the fixed reference: the 3D grid is
  the template at 2 mm cropped to 96^3 around the brain (the ``mni2mm`` benchmark grid);
* Colin27 ``ch2bet`` (Debian ``mricron-data``, /usr/share/mricron/templates; the brain-extracted
  version of ``ch2``, because the MNI template is brain-only too);
* ITK's KmeansTest T1 times its skull-strip brain mask (Debian ``insighttoolkit5-examples``:
  ``KmeansTest_T1UCharRaw`` x (``KmeansTest_T1RawSkullStrip`` > 0)) -- **held out**: it is used
  only for validation.

Colin27 and the ITK T1 are affinely aligned to MNI152 (SimpleITK, Mattes MI; the learned
networks assume affine pre-alignment), resampled onto the reference grid, scaled by their
99.9th percentile and clipped to [0, 1].  Labels for validation Dice: 3-class Otsu tissue
classes (1 = GM, 2 = WM) of each brain, one consistent definition for all three.  The 2D
model uses axial slices (every 4 mm from z = -24 to +56 mm) of the same three brains at
1 mm, cropped to 160 x 192 (the ``2d`` benchmark framing); pairs of different images are
only made between slices at the same height.

Training turns these few images into many pairs on the fly (cnnreg.augment): image vs a
randomly deformed copy of itself, and different images each mildly deformed, plus
intensity changes (gamma, contrast, smooth bias field, noise).  Each model's best epoch
(validation Dice on the held-out brain) is copied to the output folder with its training
curve; ``models.json`` (file, dimension, SHA-256, settings, validation numbers) and the
model card ``README.md`` are written there.

The shared data loaders (MNI volume, Otsu tissues, reproducible affine) come from
``scripts/prepare_cases.py``, so the benchmark cases and the training data agree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import cnnreg  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "CNNRegistration"))

import prepare_cases as cases  # noqa: E402
import torch  # noqa: E402

from cnnreg import image as im  # noqa: E402
from cnnreg.augment import AugmentSettings  # noqa: E402
from cnnreg.checkpoint import file_sha256, load_checkpoint, plain, write_manifest, write_sidecar  # noqa: E402
from cnnreg.cli import ProgressReporter  # noqa: E402
from cnnreg.dataset import index_labels, make_sample  # noqa: E402
from cnnreg.train import TrainSettings, output_paths, train  # noqa: E402

DEFAULT_OUT = ROOT / "Resources" / "Models"
ITK_T1 = cases.ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"
ITK_T1_BRAIN_MASK = cases.ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz"  # a brain mask (values 0, 4, 5, 6)
COLIN = cases.MRICRON / "ch2bet.nii.gz"
SLICE_HEIGHTS_MM = list(range(-24, 57, 4))

#: the recipe: per model, the output file, the training settings, and the --quick overrides
RECIPES = {
    "3d": {
        "file": "faim3d_brain.pt",
        "description": "3D brain T1 (skull-stripped, affinely aligned to MNI152), FAIM-style network",
        "settings": {
            "architecture": "faim",
            "working_shape": [64, 64, 64],
            "similarity": "lncc",
            "window": 9,
            "regularizer": "diffusion",
            "weight": 1.0,
            "jacobian_weight": 0.1,
            "epochs": 100,
            "steps_per_epoch": 200,
            "batch_size": 2,
            "learning_rate": 1e-4,
            "val_pairs_per_image": 4,
            "augment": {"max_displacement": 4.0, "pair_displacement": 1.5, "control_spacing": 8},
        },
        "quick": {
            "working_shape": [32, 32, 32],
            "epochs": 2,
            "steps_per_epoch": 2,
            "batch_size": 1,
            "val_pairs_per_image": 1,
        },
    },
    "2d": {
        "file": "faim2d_brain.pt",
        "description": "2D axial brain T1 slices (skull-stripped, aligned to MNI152), FAIM-style network",
        "settings": {
            "architecture": "faim",
            "working_shape": [128, 128],
            "similarity": "lncc",
            "window": 9,
            "regularizer": "diffusion",
            "weight": 1.0,
            "jacobian_weight": 0.1,
            "epochs": 100,
            "steps_per_epoch": 200,
            "batch_size": 8,
            "learning_rate": 1e-4,
            "val_pairs_per_image": 1,
            "augment": {"max_displacement": 6.0, "pair_displacement": 2.0, "control_spacing": 12},
        },
        "quick": {
            "working_shape": [64, 64],
            "epochs": 2,
            "steps_per_epoch": 2,
            "batch_size": 2,
            "val_pairs_per_image": 1,
        },
    },
}


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


def scaled(image: sitk.Image) -> sitk.Image:
    """Divide by the 99.9th percentile and clip to [0, 1] (robust max normalisation)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    top = float(np.percentile(array, 99.9))
    out = sitk.GetImageFromArray(np.clip(array / max(top, 1e-6), 0.0, 1.0))
    out.CopyInformation(image)
    return out


def itk_brain() -> sitk.Image:
    """ITK's KmeansTest T1 (whole head) times its skull-strip brain mask: a skull-stripped T1."""
    raw = sitk.Cast(sitk.ReadImage(str(ITK_T1)), sitk.sitkFloat32)
    mask = sitk.Cast(sitk.ReadImage(str(ITK_T1_BRAIN_MASK)) > 0, sitk.sitkFloat32)
    mask.CopyInformation(raw)
    return raw * mask


def alignment(reference: sitk.Image, image: sitk.Image, name: str, work_dir: Path, quick: bool) -> sitk.Transform:
    """Affine reference -> image physical transform, cached in ``work_dir``.

    Full runs use prepare_cases.affine_to (single-threaded, full sampling: bitwise reproducible);
    --quick uses cnnreg's faster sampled version with fewer iterations."""
    path = work_dir / f"affine_{name}{'_quick' if quick else ''}.tfm"
    if path.is_file():
        return sitk.ReadTransform(str(path))
    transform = im.affine_prealign(reference, image, iterations=50) if quick else cases.affine_to(reference, image)
    sitk.WriteTransform(transform, str(path))
    return transform


def brains(
    reference: sitk.Image, sources: dict[str, tuple[sitk.Image, sitk.Transform]]
) -> dict[str, tuple[sitk.Image, sitk.Image]]:
    """``{name: (image, tissue labels)}``: each source image (with its reference -> image
    transform) resampled onto ``reference``'s grid, anti-aliased, scaled; Otsu tissue labels."""
    out = {}
    for name, (image, transform) in sources.items():
        sigma = [max(0.0, 0.5 * (r - s)) for r, s in zip(reference.GetSpacing(), image.GetSpacing())]
        if max(sigma) > 0:  # anti-aliasing before going to a coarser grid
            image = sitk.DiscreteGaussian(image, [s * s for s in sigma], 32, 0.01, True)
        on_grid = scaled(sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        out[name] = (on_grid, cases.otsu_tissues(on_grid))
    return out


def load_data(work_dir: Path, quick: bool, log) -> dict:
    """Reference grids and the three brains on them (3D at 2 mm; 1 mm for the 2D slices)."""
    reference_3d, _ = cases.mni_2mm((96, 96, 96))
    colin = sitk.Cast(sitk.ReadImage(str(COLIN)), sitk.sitkFloat32)
    itk_t1 = itk_brain()
    log("affine alignment of Colin27 and the ITK T1 to MNI152 ...")
    transforms = {
        "colin27": alignment(reference_3d, colin, "colin27", work_dir, quick),
        "itk_t1": alignment(reference_3d, itk_t1, "itk_t1", work_dir, quick),
    }
    mni_1mm = sitk.Cast(cases.mni_volume(1)[0], sitk.sitkFloat32)
    sources = {
        "mni152": (mni_1mm, sitk.Transform(3, sitk.sitkIdentity)),
        "colin27": (colin, transforms["colin27"]),
        "itk_t1": (itk_t1, transforms["itk_t1"]),
    }
    first, last = cases.bounding_box(sitk.GetArrayViewFromImage(mni_1mm) > 0.02)
    center = (first + last) / 2.0
    heights = SLICE_HEIGHTS_MM[::5] if quick else SLICE_HEIGHTS_MM
    k_low = mni_1mm.TransformPhysicalPointToIndex((0.0, 0.0, float(min(heights))))[2]
    k_high = mni_1mm.TransformPhysicalPointToIndex((0.0, 0.0, float(max(heights))))[2]
    center[0] = (k_low + k_high) / 2.0
    reference_2d = cases.crop_around(mni_1mm, center, (160, 192, abs(k_high - k_low) + 1))
    return {
        "3d": brains(reference_3d, sources),
        "2d_volumes": brains(reference_2d, sources),
        "heights": heights,
        "transforms": {k: list(t.GetParameters()) for k, t in transforms.items()},
    }


def samples_3d(data: dict, settings: TrainSettings):
    train_samples, val_samples = [], []
    for name, (image, labels) in data["3d"].items():
        sample = make_sample(
            name,
            sitk.GetArrayFromImage(image),
            settings.shape_for(3),
            settings.normalization,
            sitk.GetArrayFromImage(labels),
            "tissue",
        )
        (val_samples if name == "itk_t1" else train_samples).append(sample)
    return train_samples, val_samples


def samples_2d(data: dict, settings: TrainSettings):
    train_samples, val_samples = [], []
    for name, (image, labels) in data["2d_volumes"].items():
        for height in data["heights"]:
            k = image.TransformPhysicalPointToIndex((0.0, 0.0, float(height)))[2]
            plane = sitk.GetArrayFromImage(image)[k]
            plane_labels = sitk.GetArrayFromImage(labels)[k]
            if plane.max() <= 0:
                continue
            sample = make_sample(
                f"{name}_z{height:+d}",
                plane,
                settings.shape_for(2),
                settings.normalization,
                plane_labels,
                "tissue",
                group=f"z{height:+d}",
            )
            (val_samples if name == "itk_t1" else train_samples).append(sample)
    return train_samples, val_samples


# ---------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def model_card(entries: list[dict], command: str, quick: bool) -> str:
    lines = [
        "# Learned-mode weights (model card)",
        "",
        "Weights for `cnnreg register --mode learned|learned-refine` when `--model` is not given.",
        "Regenerate them from scratch with the command below; `models.json` lists every file with its",
        "SHA-256, which `cnnreg` checks before loading (a mismatch is refused).",
        "",
    ]
    if quick:
        lines += ["> **QUICK RUN** (`--quick`): 2 tiny epochs, for testing the recipe only. Not usable weights.", ""]
    lines += [
        "| file | dim | network | parameters | working grid | epochs | best epoch | val. Dice before -> after | val. folding % | SHA-256 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        best = e["best"] or {}
        lines.append(
            f"| `{e['file']}` | {e['ndim']}D | {e['architecture']} | {e['parameters']:,} | {'x'.join(map(str, e['working_shape']))} "
            f"| {e['settings']['epochs']} | {best.get('epoch')} | {_fmt(best.get('val_dice_before'))} -> {_fmt(best.get('val_dice'))} "
            f"| {_fmt(best.get('val_folding_percent'), 4)} | `{e['sha256'][:16]}...` |"
        )
    lines += [
        "",
        "## Intended use",
        "",
        "Deformable registration of **skull-stripped T1-weighted brain MRI that is already affinely aligned**",
        "(e.g. `--affine`, or images in MNI space), framed roughly like the training data: the brain filling",
        "a ~192 mm cube (3D) or a 160 x 192 mm axial slice (2D).  Inputs are max-normalised",
        "(`--normalization max`, the default).  `cnnreg.learned.predict_field` resamples the pair to the",
        "working grid, runs one forward pass and resamples the field back (grids more than 4x larger or",
        "smaller than the working grid along an axis are refused).  Use `learned-refine` for accuracy:",
        "the prediction is then the start of a short instance optimisation.  Research software: not for",
        "clinical use.",
        "",
        "## Data",
        "",
        "| image | source | licence | role |",
        "|---|---|---|---|",
        "| MNI152 2009a T1 (2 mm; 1 mm for 2D) | nilearn `load_mni152_template` | MNI template licence (permissive, see below) | training, reference grid |",
        "| Colin27 `ch2bet` | Debian `mricron-data` | see `debian/copyright` of mricron-data | training |",
        "| ITK KmeansTest T1 x its skull-strip mask | Debian `insighttoolkit5-examples` | Apache-2.0 | **held out: validation only** |",
        "",
        "Colin27 and the ITK T1 are affinely aligned to MNI152 (SimpleITK, Mattes MI, 3 levels), resampled",
        "onto the reference grid, divided by their 99.9th percentile and clipped to [0, 1].  Validation labels:",
        "3-class Otsu tissue classes (GM, WM) of each brain.  The 2D model uses axial slices every 4 mm from",
        "z = -24 to +56 mm of the same brains at 1 mm, cropped to 160 x 192; pairs of different images are",
        "made only between slices at the same height.  The images are not redistributed here.",
        "",
        "## Training",
        "",
        "Unsupervised: LNCC (9-voxel window) + 1.0 x diffusion regularizer + 0.1 x mean negative-Jacobian",
        "penalty; Adam 1e-4.  Pairs are drawn on the fly (`cnnreg.augment`): an image vs a copy of itself",
        "deformed by a random smooth diffeomorphic field (coarse noise, upsampled, Gaussian-smoothed,",
        "integrated; up to `max_displacement` voxels of the working grid), or two different images each",
        "mildly deformed; each image then gets random gamma, contrast, a smooth multiplicative bias field and",
        "Gaussian noise.  Validation each epoch on the held-out brain: deformed copies of it (known labels)",
        "and its pairs with each training brain (both ways); the epoch with the best validation Dice is kept.",
        "",
    ]
    for e in entries:
        lines += [f"### `{e['file']}`", "", "```json", json.dumps(e["settings"], indent=2), "```", ""]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "bash scripts/setup test                 # torch, nilearn, ...; apt: mricron-data insighttoolkit5-examples",
        command,
        "```",
        "",
        "Training data and pairs are seeded; GPU kernels are not bitwise deterministic, so retrained weights",
        "differ in their last digits (and SHA-256) but not in behaviour.  Each run also leaves",
        "`<name>_curve.png` (training curve) here and its checkpoints (`*.last.pt`, resumable) in the work folder.",
        "",
        "## Licences of the data",
        "",
        "* " + cases.MNI_LICENCE,
        "* " + cases.COLIN_LICENCE,
        "* " + cases.ITK_LICENCE,
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, commit {_git_commit()}, torch {torch.__version__}.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        help=f"where the weights, models.json and README.md go (default {DEFAULT_OUT}; "
        "with --quick a temporary folder)",
    )
    parser.add_argument(
        "--work-dir", help="checkpoints, cached affine transforms (default <out-dir>/../../build/train_weights)"
    )
    parser.add_argument("--only", choices=sorted(RECIPES), help="train one model only")
    parser.add_argument("--quick", action="store_true", help="2 tiny epochs per model, to check the recipe runs")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--steps-per-epoch", type=int, help="override the recipe's steps per epoch")
    parser.add_argument(
        "--resume", action="store_true", help="continue each model from its .last.pt in the work folder"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", default="auto", choices=["auto", "jsonl", "bar", "none"])
    args = parser.parse_args(argv)

    out_dir = (
        Path(args.out_dir)
        if args.out_dir
        else (Path(tempfile.mkdtemp(prefix="cnnreg-quick-weights-")) if args.quick else DEFAULT_OUT)
    )
    work_dir = (
        Path(args.work_dir) if args.work_dir else (out_dir / "work" if args.quick else ROOT / "build" / "train_weights")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[train_weights] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    data = load_data(work_dir, args.quick, log)
    log(f"data ready in {time.perf_counter() - started:.0f} s")
    report = ProgressReporter(args.progress)
    entries = []
    for key in [args.only] if args.only else sorted(RECIPES, reverse=True):
        recipe = RECIPES[key]
        values = {
            **recipe["settings"],
            **(recipe["quick"] if args.quick else {}),
            "seed": args.seed,
            "device": args.device,
        }
        values["augment"] = AugmentSettings(**values["augment"])
        if args.epochs:
            values["epochs"] = args.epochs
        if args.steps_per_epoch:
            values["steps_per_epoch"] = args.steps_per_epoch
        settings = TrainSettings(**values)
        train_samples, val_samples = (samples_3d if key == "3d" else samples_2d)(data, settings)
        index_labels(train_samples + val_samples)
        log(
            f"{key}: {len(train_samples)} training and {len(val_samples)} held-out validation images at {settings.working_shape}"
        )
        run_path = work_dir / recipe["file"]
        resume = (
            output_paths(run_path)["last"] if args.resume and os.path.isfile(output_paths(run_path)["last"]) else None
        )
        summary = train(settings, train_samples, val_samples, run_path, resume=resume, callback=report)
        target = out_dir / recipe["file"]
        shutil.copyfile(run_path, target)
        sha256 = write_sidecar(target)
        curve = output_paths(run_path)["curve"]
        shutil.copyfile(curve, out_dir / Path(curve).name)
        checkpoint = load_checkpoint(target, require_hash=True)
        entries.append(
            {
                "file": recipe["file"],
                "ndim": checkpoint.ndim,
                "default": True,
                "description": recipe["description"],
                "architecture": checkpoint.architecture,
                "parameters": summary["parameters"],
                "working_shape": list(checkpoint.working_shape),
                "normalization": checkpoint.normalization,
                "sha256": sha256,
                "best": checkpoint.training.get("best"),
                "settings": plain(settings.to_dict()),
                "train_images": checkpoint.training.get("train_images"),
                "val_images": checkpoint.training.get("val_images"),
                "quick": args.quick,
            }
        )
        best = summary["best"] or {}
        log(
            f"{key}: best epoch {best.get('epoch')}, validation Dice {_fmt(best.get('val_dice_before'))} -> "
            f"{_fmt(best.get('val_dice'))}, folding {_fmt(best.get('val_folding_percent'), 4)} %; {target}"
        )
    if args.only and (out_dir / "models.json").is_file():  # keep the other model's entry
        others = [
            e
            for e in json.loads((out_dir / "models.json").read_text())["models"]
            if e["file"] not in {x["file"] for x in entries}
        ]
        entries = others + entries
    for entry in entries:  # the recorded hashes must match the files that are there now
        if (out_dir / entry["file"]).is_file():
            entry["sha256"] = file_sha256(out_dir / entry["file"])
    write_manifest(out_dir, entries)
    command = (
        "python scripts/train_weights.py"
        + (" --quick" if args.quick else "")
        + (f" --device {args.device}" if args.device != "auto" else "")
    )
    (out_dir / "README.md").write_text(model_card(entries, command, args.quick), encoding="utf-8")
    log(f"done in {time.perf_counter() - started:.0f} s; weights, models.json and README.md in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
