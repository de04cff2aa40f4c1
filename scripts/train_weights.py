#!/usr/bin/env python
"""Regenerate the shipped learned-mode weights (``CNNRegistration/cnnreg/models``) from scratch.

Usage::

    python scripts/train_weights.py --threads 2                      # both models, to the end of the recipe
    python scripts/train_weights.py --only 3d --time-limit 3h --resume  # one session's share, then stop
    python scripts/train_weights.py --quick                          # tiny run of each recipe -> a temporary folder

Training is resumable and can span sessions: every epoch (about 5 minutes of CPU at one
thread) writes ``Resources/Training/<model>.last.pt`` (network, optimiser, epoch; the pairs of
an epoch are drawn from a generator seeded by the seed and the epoch, so a resumed run draws
what an uninterrupted one would), appends the epoch to ``Resources/Training/<model>_log.jsonl``
and redraws the curve; ``--time-limit`` starts no epoch that would end after the limit.
Whenever a run stops, the best epoch so far (validation Dice) is copied to the shipped folder
with ``models.json`` (SHA-256, settings, validation numbers, steps, CPU hours) and the model
card ``README.md``; ``--resume`` continues from the ``.last.pt``.

Data (installed by package managers on a fresh machine; nothing is downloaded at run time):

* MNI152 2009a T1 (nilearn, ``load_mni152_template``), also the reference grid: 2 mm, cropped
  to 96^3 around the brain (the ``mni2mm`` benchmark grid); the 3D network is trained on it
  resampled to 64^3 (3 mm), then fine-tuned on the 96^3 grid itself (the ``finetune`` stage);
* Colin27 ``ch2bet`` with the AAL atlas (Debian ``mricron-data``), affinely aligned to MNI152;
* ITK's KmeansTest T1 times its skull-strip brain mask (Debian ``insighttoolkit5-examples``)
  -- **held out**, validation only; so is the real MNI152 <-> Colin27 pair (training never
  pairs the two brains).

Training pairs (:mod:`cnnreg.training.synth`): a brain is moved by a random affine map and smooth
deformation into a new "subject", its image taken as it is or synthesised from its label map
(AAL regions + Otsu tissue classes, a random intensity per label, random blobs around the
brain, blur), then paired with a copy of itself deformed by a random multi-scale
diffeomorphism whose exact inverse is known; gamma, contrast, bias and noise change each side.
The first ``warmup_steps`` train on the known field alone; then LNCC + diffusion +
negative-Jacobian penalty + ``supervised_weight`` x the field error.

Validation each epoch (the best epoch is shipped): the held-out ITK brain vs copies of it
deformed by known fields (Dice of its Otsu tissues, end-point error) and MNI152 <-> Colin27
both ways (Dice of the Otsu GM/WM classes of each brain).  The 2D model is the same on axial
slices (every 4 mm from z = -24 to +56 mm) at 1 mm, 192 x 160 (the ``2d`` benchmark framing).

The shared data loaders (MNI volume, Otsu tissues, reproducible affine) come from
``scripts/prepare_cases.py``, so the benchmark cases and the training data agree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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
from cnnreg.checkpoint import file_sha256, load_checkpoint, plain, write_manifest  # noqa: E402
from cnnreg.progress import ProgressReporter  # noqa: E402
from cnnreg.spatial import integrate_velocity  # noqa: E402
from cnnreg.training.augment import PairBatch, Sample, deform  # noqa: E402
from cnnreg.training.dataset import make_sample  # noqa: E402
from cnnreg.training.loop import output_paths, train  # noqa: E402
from cnnreg.training.settings import settings_from_dict  # noqa: E402
from cnnreg.training.synth import multiscale_velocity  # noqa: E402


class Stage(NamedTuple):
    """One training run of a recipe: its resumable run file, settings and last epoch (None = all)."""

    name: str
    run_path: Path
    settings: object  # cnnreg.training.settings.TrainSettings
    until_epoch: int | None

    @property
    def planned_epochs(self) -> int:
        return self.until_epoch or self.settings.epochs


DEFAULT_OUT = ROOT / "CNNRegistration" / "cnnreg" / "models"
DEFAULT_WORK = ROOT / "Resources" / "Training"
ITK_T1 = cases.ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"
ITK_T1_BRAIN_MASK = cases.ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz"  # a brain mask (values 0, 4, 5, 6)
COLIN = cases.MRICRON / "ch2bet.nii.gz"
AAL = cases.MRICRON / "aal.nii.gz"
SLICE_HEIGHTS_MM = list(range(-24, 57, 4))

_SYNTHETIC = {
    "synthetic_fraction": 0.5,
    "spacings": [4, 8, 16],
    "subject_displacement": 3.0,
    "rotation_degrees": 8.0,
    "scaling": 0.1,
    "translation": 0.04,
    "blob_probability": 0.3,
    "max_blur": 1.0,
}

#: the recipe: per model, the output file, the training settings, and the --quick overrides
RECIPES = {
    "3d": {
        "file": "vxm3d_brain.pt",
        "description": "3D brain T1 (skull-stripped, affinely aligned to MNI152), VoxelMorph-style U-Net, "
        "half-resolution velocity field",
        "settings": {
            "architecture": "voxelmorph",
            "network": {"encoder": [16, 32, 32, 32], "decoder": [32, 32, 32, 32, 16], "half_resolution": True},
            "diffeomorphic": True,
            "working_shape": [64, 64, 64],
            "similarity": "lncc",
            "window": 9,
            "regularizer": "diffusion",
            "weight": 1.0,
            "jacobian_weight": 0.1,
            "supervised_weight": 0.5,
            "warmup_steps": 2000,
            "epochs": 80,
            "steps_per_epoch": 500,
            "batch_size": 1,
            "learning_rate": 3e-4,
            "final_learning_rate": 3e-5,
            "synthetic": {**_SYNTHETIC, "max_displacement": 5.0},
        },
        # the 64^3 stage stops after this epoch (its learning-rate schedule spans the 80 planned)
        "until_epoch": 42,
        "quick": {"working_shape": [32, 32, 32], "epochs": 2, "steps_per_epoch": 3, "warmup_steps": 2},
        "quick_until_epoch": 1,
        # then the same network is fine-tuned on the reference grid itself (96^3, 2 mm), which
        # learned mode runs at: lengths in voxels scaled by 1.5 to keep them in mm
        "finetune": {
            "run": "vxm3d_brain_96.pt",
            "settings": {
                "working_shape": [96, 96, 96],
                "warmup_steps": 0,
                "epochs": 20,
                "steps_per_epoch": 200,
                "learning_rate": 1e-4,
                "final_learning_rate": 1e-5,
                "synthetic": {
                    **_SYNTHETIC,
                    "max_displacement": 7.5,
                    "spacings": [6, 12, 24],
                    "subject_displacement": 4.5,
                    "max_blur": 1.5,
                },
            },
            "quick": {"working_shape": [48, 48, 48], "epochs": 2, "steps_per_epoch": 2},
        },
    },
    "2d": {
        "file": "vxm2d_brain.pt",
        "description": "2D axial brain T1 slices (skull-stripped, aligned to MNI152), VoxelMorph-style U-Net, "
        "half-resolution velocity field",
        "settings": {
            "architecture": "voxelmorph",
            "network": {"encoder": [16, 32, 32, 32], "decoder": [32, 32, 32, 32, 16], "half_resolution": True},
            "diffeomorphic": True,
            "working_shape": [192, 160],
            "similarity": "lncc",
            "window": 9,
            "regularizer": "diffusion",
            "weight": 1.0,
            "jacobian_weight": 0.1,
            "supervised_weight": 0.5,
            "warmup_steps": 2000,
            "epochs": 40,
            "steps_per_epoch": 500,
            "batch_size": 4,
            "learning_rate": 3e-4,
            "final_learning_rate": 3e-5,
            "synthetic": {**_SYNTHETIC, "max_displacement": 6.0, "spacings": [6, 12, 24]},
        },
        "quick": {"working_shape": [64, 64], "epochs": 2, "steps_per_epoch": 3, "warmup_steps": 2, "batch_size": 2},
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


def synthesis_labels(tissues: np.ndarray, aal: np.ndarray) -> np.ndarray:
    """Label map to synthesise images from: the AAL regions (1..n, consecutive), then the Otsu
    tissue classes outside them (WM n+1, GM n+2, the rest of the brain n+3)."""
    values = np.unique(aal[aal > 0])
    out = np.zeros(aal.shape, np.int32)
    out[aal > 0] = np.searchsorted(values, aal[aal > 0]) + 1
    n = len(values)
    free = out == 0
    brain = tissues >= 0  # tissues: -1 outside the brain, 0 CSF-like, 1 GM, 2 WM
    out[free & (tissues == 2)] = n + 1
    out[free & (tissues == 1)] = n + 2
    out[free & brain & (tissues == 0)] = n + 3
    return out


def brains(reference: sitk.Image, sources: dict[str, tuple[sitk.Image, sitk.Transform]]) -> dict[str, dict]:
    """``{name: {"image", "tissues", "synth"}}``: each source image (with its reference -> image
    transform) resampled onto ``reference``'s grid (anti-aliased, scaled), its Otsu tissue
    classes, and its synthesis label map (AAL through the same transform + tissues)."""
    aal = sitk.ReadImage(str(AAL))
    out = {}
    for name, (image, transform) in sources.items():
        sigma = [max(0.0, 0.5 * (r - s)) for r, s in zip(reference.GetSpacing(), image.GetSpacing())]
        if max(sigma) > 0:  # anti-aliasing before going to a coarser grid
            image = sitk.DiscreteGaussian(image, [s * s for s in sigma], 32, 0.01, True)
        on_grid = scaled(sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        tissues = cases.otsu_tissues(on_grid)
        array = sitk.GetArrayFromImage(on_grid)
        classes = np.where(array > 0.02, sitk.GetArrayFromImage(tissues).astype(np.int32), -1)
        # AAL is in the Colin27 (MNI) space: through Colin's transform for Colin, the identity otherwise
        aal_transform = transform if name == "colin27" else sitk.Transform(3, sitk.sitkIdentity)
        aal_on_grid = sitk.GetArrayFromImage(
            sitk.Resample(aal, reference, aal_transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        )
        aal_on_grid = np.where(classes >= 0, aal_on_grid, 0)
        out[name] = {"image": on_grid, "tissues": tissues, "synth": synthesis_labels(classes, aal_on_grid)}
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


def _brain_samples(name: str, brain: dict, shape, normalization: str, plane: int | None = None, group=None):
    """(training source with its synthesis labels, validation sample with its tissue classes)."""
    image = sitk.GetArrayFromImage(brain["image"])
    tissues = sitk.GetArrayFromImage(brain["tissues"])
    synth = brain["synth"]
    if plane is not None:
        image, tissues, synth = image[plane], tissues[plane], synth[plane]
    source = make_sample(name, image, shape, normalization, synth, "synth", group)
    evaluation = make_sample(name, image, shape, normalization, tissues, "tissue", group)
    return source, evaluation


def deformed_copy_pairs(samples: list[Sample], sizes: list[float], spacings, seed: int) -> list[PairBatch]:
    """Each sample (fixed) vs copies of it deformed by known diffeomorphisms of the given largest
    lengths (moving, labels with nearest neighbour); the true field and the foreground travel along."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for sample in samples:
        fixed = sample.image[None]
        foreground = (fixed > 0.02).float()
        for size in sizes:
            velocity = multiscale_velocity(fixed.shape[2:], size, spacings, generator)
            moving, moving_labels = deform(fixed, integrate_velocity(velocity), sample.labels[None])
            pairs.append(
                PairBatch(
                    fixed,
                    moving,
                    sample.labels[None].float(),
                    moving_labels,
                    [f"{sample.name} deformed (|u| <= {size:g})"],
                    true_field=integrate_velocity(-velocity),
                    foreground=foreground,
                )
            )
    return pairs


def real_pairs(a: Sample, b: Sample) -> list[PairBatch]:
    """``a`` vs ``b`` both ways, unchanged (labels in the same space)."""
    return [
        PairBatch(f.image[None], m.image[None], f.labels[None].float(), m.labels[None].float(), [f"{m.name}->{f.name}"])
        for f, m in ((a, b), (b, a))
    ]


def datasets(key: str, data: dict, settings) -> tuple[list[Sample], list[PairBatch], list[str]]:
    """Training sources, validation pairs and the names of the held-out images for one recipe."""
    shape, normalization = settings.shape_for(3 if key == "3d" else 2), settings.normalization
    spacings = settings.synthetic.spacings
    if key == "3d":
        made = {name: _brain_samples(name, brain, shape, normalization) for name, brain in data["3d"].items()}
        sources = [made["mni152"][0], made["colin27"][0]]
        val = deformed_copy_pairs([made["itk_t1"][1]], [1.5, 2.5, 3.5, 4.5], spacings, seed=12345)
        val += real_pairs(made["mni152"][1], made["colin27"][1])
        return sources, val, ["itk_t1", "mni152<->colin27 pair"]
    sources, held_out, evaluation = [], [], {}
    volumes = data["2d_volumes"]
    for height in data["heights"]:
        k = volumes["mni152"]["image"].TransformPhysicalPointToIndex((0.0, 0.0, float(height)))[2]
        for name, brain in volumes.items():
            if sitk.GetArrayViewFromImage(brain["image"])[k].max() <= 0:
                continue
            source, sample = _brain_samples(f"{name}_z{height:+d}", brain, shape, normalization, k, f"z{height:+d}")
            if name == "itk_t1":
                held_out.append(sample)
            else:
                sources.append(source)
                evaluation[(name, height)] = sample
    val = deformed_copy_pairs(held_out, [3.0], spacings, seed=12345)
    for height in data["heights"][::2]:
        if ("mni152", height) in evaluation and ("colin27", height) in evaluation:
            val += real_pairs(evaluation[("mni152", height)], evaluation[("colin27", height)])
    return sources, val, ["itk_t1 slices", "mni152<->colin27 slice pairs"]


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
        "`models.json` lists every file with its SHA-256, which `cnnreg` checks before loading (a",
        "mismatch is refused).  Regenerate or continue them with `scripts/train_weights.py` (below).",
        "",
    ]
    if quick:
        lines += ["> **QUICK RUN** (`--quick`): a few tiny steps, for testing the recipe only. Not usable weights.", ""]
    lines += [
        "| file | dim | network | parameters | working grid | trained | best epoch | CPU hours | threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        t = e["training_run"]
        stages = e.get("stages") or [
            {
                "name": "",
                "working_shape": e["working_shape"],
                "epochs_done": t["epochs_done"],
                "epochs_planned": e["settings"]["epochs"],
            }
        ]
        epochs = ", ".join(
            f"{(s['name'] + ' ') if len(stages) > 1 else ''}{'x'.join(map(str, s['working_shape']))}: "
            f"{s['epochs_done']}/{s['epochs_planned']} epochs"
            for s in stages
        )
        best = (e["best"] or {}).get("epoch")
        lines.append(
            f"| `{e['file']}` | {e['ndim']}D | {e['architecture']} | {e['parameters']:,} | "
            f"{'x'.join(map(str, e['working_shape']))} | {t['steps_done']:,} of {t['steps_planned']:,} steps "
            f"({epochs}){'' if t['finished'] else ', **in progress**'} | "
            f"{best}{' of ' + stages[-1]['name'] if len(stages) > 1 else ''} | {t['cpu_hours']:.1f} | {t['threads']} |"
        )
    lines += ["", "## Validation (held out; numbers of the shipped epoch)", ""]
    lines += [
        "| file | validation pairs | pairs | Dice before | Dice after | end-point error (voxels) | folding % |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        for group, m in e["validation"].items():
            lines.append(
                f"| `{e['file']}` | {group} | {m['val_pairs']} | {_fmt(m['val_dice_before'])} | {_fmt(m['val_dice'])} "
                f"| {_fmt(m['val_end_point_error'], 2)} | {_fmt(m['val_folding_percent'], 4)} |"
            )
    lines += [
        "",
        "Dice: mean over the Otsu GM and WM classes of each brain, labels warped with nearest",
        "neighbour.  End-point error: mean length of (predicted - true) field over the brain, in voxels of the",
        "working grid (3 mm in 3D, 1 mm in 2D), on copies deformed by known fields.  The benchmark",
        "(`scripts/benchmark`, README) measures the shipped weights on its cases with the peers.",
        "",
        "## Intended use",
        "",
        "Deformable registration of **skull-stripped T1-weighted brain MRI that is already affinely aligned**",
        "(e.g. `--affine`, or images in MNI space), framed roughly like the training data: the brain filling",
        "a ~192 mm cube (3D) or a 160 x 192 mm axial slice (2D).  Inputs are max-normalised",
        "(`--normalization max`, the default).  `cnnreg.learned.predict_field` resamples the pair to the",
        "working grid, runs one forward pass (a batch of four: the pair both ways, each also mirrored",
        "left-right; the velocity is (v(m, f) - v(f, m)) / 2 averaged with its mirrored-back twin, so",
        "swapping the images gives the inverse map; see cnnreg.learned) and resamples the field",
        "back (grids more than 4x larger or smaller than the working grid along an axis are refused).",
        "Use `learned-refine` for accuracy:",
        "the prediction is then the start of a short instance optimisation.  Research software: not for",
        "clinical use.",
        "",
        "## Data",
        "",
        "| image | source | licence | role |",
        "|---|---|---|---|",
        "| MNI152 2009a T1 (2 mm; 1 mm for 2D) | nilearn `load_mni152_template` | MNI template licence (permissive, see below) | training source, reference grid |",
        "| Colin27 `ch2bet` + AAL atlas | Debian `mricron-data` | see `debian/copyright` of mricron-data | training source |",
        "| ITK KmeansTest T1 x its skull-strip mask | Debian `insighttoolkit5-examples` | Apache-2.0 | **held out: validation only** |",
        "| the real MNI152 <-> Colin27 pair | (the two above) | | **held out: never paired in training** |",
        "",
        "Colin27 and the ITK T1 are affinely aligned to MNI152 (SimpleITK, Mattes MI, 3 levels), resampled",
        "onto the reference grid (MNI152 at 2 mm cropped to 96^3), divided by",
        "their 99.9th percentile and clipped to [0, 1].  The images are not redistributed here.",
        "",
        "## Training",
        "",
        "Pairs with a known answer are synthesised on the fly (`cnnreg.training.synth`, SynthMorph-style): a brain is",
        "moved by a random affine map and a smooth deformation into a new subject; its image is the real one",
        "or, half of the time, synthesised from its label map (116 AAL regions + Otsu tissue classes, a random",
        "intensity per label, random blobs in the background, blur); the pair is that image and a copy",
        "deformed by a random multi-scale diffeomorphism exp(v) (either side), whose inverse exp(-v) is exact;",
        "gamma, contrast, bias field and noise change each side independently.  The first `warmup_steps`",
        "minimise the squared error to the known field alone; then LNCC (9 voxels) + diffusion + 0.1 x",
        "negative-Jacobian penalty + `supervised_weight` x the field error.  Adam, cosine decay per epoch.",
        "The 3D recipe runs in two stages: 64^3 (3 mm) for the first epochs of a longer cosine schedule,",
        "then the same network, from the best 64^3 epoch, fine-tuned on the 96^3 reference grid (2 mm, the",
        "grid learned mode runs at) with lengths in voxels scaled by 1.5 and a lower learning rate; the",
        "settings below are the shipped stage's.",
        "",
    ]
    for e in entries:
        lines += [f"### `{e['file']}`", "", "```json", json.dumps(e["settings"], indent=2), "```", ""]
    lines += [
        "## Reproduce / continue",
        "",
        "```bash",
        "bash scripts/setup test                 # torch, nilearn, ...; apt: mricron-data insighttoolkit5-examples",
        command,
        "```",
        "",
        "Training is resumable (`--resume`, from `Resources/Training/<model>.last.pt`, kept out of git; per-epoch log",
        "`<model>_log.jsonl` and curve `<model>_curve.png` there).  Data and pairs are seeded; on a GPU or",
        "with other thread counts the last digits differ.",
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


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``45m``, ``3h``, ``1h30m`` -> seconds."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"a duration looks like 3h, 45m, 1h30m or 600, got {text!r}")
    hours, minutes, seconds = (float(v) if v else 0.0 for v in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _validation_groups(network, pairs: list[PairBatch], settings) -> dict[str, dict]:
    """Validation metrics of ``network`` per kind of held-out pair (deformed copies, real pairs)."""
    from cnnreg.training.distributed import Distributed
    from cnnreg.training.loop import validate

    groups = {
        "held-out brain vs known deformations": [p for p in pairs if p.true_field is not None],
        "MNI152 <-> Colin27 (real pair)": [p for p in pairs if p.true_field is None],
    }
    info = Distributed()
    return {
        name: validate(network, group, settings, info, torch.device("cpu")) for name, group in groups.items() if group
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        help=f"where the shipped weights, models.json and README.md go (default {DEFAULT_OUT}; "
        "with --quick a temporary folder)",
    )
    parser.add_argument(
        "--work-dir",
        help=f"resumable checkpoints, logs, curves, cached affine transforms (default {DEFAULT_WORK}; "
        "with --quick inside the out folder)",
    )
    parser.add_argument("--only", choices=sorted(RECIPES), help="train one model only (default: 3d, then 2d)")
    parser.add_argument("--quick", action="store_true", help="a few tiny steps per model, to check the recipe runs")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument(
        "--time-limit",
        type=parse_duration,
        help="stop (after a finished epoch, with a checkpoint) before this much time has passed, e.g. 3h; "
        "shared by the models in order (default: none)",
    )
    parser.add_argument(
        "--package",
        action="store_true",
        help="train nothing: ship the best epoch of each resumable run in the work folder (models.json, model card)",
    )
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--steps-per-epoch", type=int, help="override the recipe's steps per epoch")
    parser.add_argument(
        "--resume", action="store_true", help="continue each model from its .last.pt in the work folder"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--progress", default="auto", choices=["auto", "jsonl", "bar", "none"], help="default auto")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    out_dir = (
        Path(args.out_dir)
        if args.out_dir
        else (Path(tempfile.mkdtemp(prefix="cnnreg-quick-weights-")) if args.quick else DEFAULT_OUT)
    )
    work_dir = Path(args.work_dir) if args.work_dir else (out_dir / "work" if args.quick else DEFAULT_WORK)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[train_weights] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    data = load_data(work_dir, args.quick, log)
    log(f"data ready in {time.perf_counter() - started:.0f} s")
    reporter = ProgressReporter(args.progress)
    entries = []
    for key in [args.only] if args.only else sorted(RECIPES, reverse=True):
        recipe = RECIPES[key]
        values = {**recipe["settings"], **(recipe["quick"] if args.quick else {}), "seed": args.seed}
        values["device"] = args.device
        if args.epochs:
            values["epochs"] = args.epochs
        if args.steps_per_epoch:
            values["steps_per_epoch"] = args.steps_per_epoch
        stages = [
            Stage(
                "base",
                work_dir / recipe["file"],
                settings_from_dict(values),
                recipe.get("quick_until_epoch" if args.quick else "until_epoch"),
            )
        ]
        if "finetune" in recipe:
            tune = recipe["finetune"]
            tuned = {**values, **tune["settings"], **(tune.get("quick", {}) if args.quick else {})}
            stages.append(Stage("finetune", work_dir / tune["run"], settings_from_dict(tuned), None))
        if not (args.resume or args.package or args.quick):
            existing = [str(output_paths(st.run_path)["last"]) for st in stages]
            existing = [path for path in existing if Path(path).is_file()]
            if existing:
                log(f"{existing[0]} exists: pass --resume to continue it, or remove it to start again")
                return 2
        done_stages = []  # (stage, train()'s summary) of each stage that ran, in order
        for index, stage in enumerate(stages):
            sources, val_pairs, held_out = datasets(key, data, stage.settings)
            log(
                f"{key} ({stage.name}): {len(sources)} training sources, {len(val_pairs)} held-out validation "
                f"pairs at {stage.settings.working_shape}"
            )
            paths = output_paths(stage.run_path)
            resume = paths["last"] if Path(paths["last"]).is_file() and (args.resume or args.package) else None
            if args.package and resume is None:
                log(f"{key} ({stage.name}): nothing to package ({paths['last']} does not exist)")
                break
            initial = done_stages[-1][0].run_path if index > 0 else None  # the previous stage's best epoch
            epoch_log = work_dir / f"{stage.run_path.stem}_log.jsonl"

            def report(event: dict, epoch_log=epoch_log) -> None:
                if event.get("event") == "epoch":
                    with open(epoch_log, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(plain(event)) + "\n")
                reporter(event)

            if args.package:
                limit = 0.0
            elif args.time_limit is not None:
                limit = args.time_limit - (time.perf_counter() - started)
            else:
                limit = None
            summary = train(
                stage.settings,
                sources,
                [],
                stage.run_path,
                resume=resume,
                callback=report,
                val_pairs=val_pairs,
                time_limit=limit,
                initial_weights=initial,
                until_epoch=stage.until_epoch,
            )
            done_stages.append((stage, summary))
            if summary["stopped"] or summary["epochs_done"] < stage.planned_epochs:
                break
        if not done_stages:
            continue
        stage, summary = done_stages[-1]  # its sources and validation pairs are the loop's last
        settings = stage.settings
        target = out_dir / recipe["file"]
        shutil.copyfile(stage.run_path, target)
        checkpoint = load_checkpoint(stage.run_path)  # (the copy is checked against models.json once that is rewritten)
        history = checkpoint.training.get("history", [])
        runs = [load_checkpoint(output_paths(st.run_path)["last"]).training.get("history", []) for st, _ in done_stages]
        epochs = [h for run in runs for h in run]
        steps_done = sum(len(run) * st.settings.steps_per_epoch for run, (st, _) in zip(runs, done_stages))
        steps_planned = sum(st.planned_epochs * st.settings.steps_per_epoch for st in stages)
        finished = len(done_stages) == len(stages) and len(runs[-1]) >= stage.planned_epochs
        earlier_steps = steps_done - len(runs[-1]) * settings.steps_per_epoch
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
                "sha256": file_sha256(target),
                "best": checkpoint.training.get("best"),
                "validation": _validation_groups(checkpoint.network, val_pairs, settings),
                "held_out": held_out,
                "settings": plain(settings.to_dict()),
                "stages": [
                    {
                        "name": st.name,
                        "working_shape": list(st.settings.shape_for(checkpoint.ndim)),
                        "epochs_done": len(run),
                        "epochs_planned": st.planned_epochs,
                        "steps_per_epoch": st.settings.steps_per_epoch,
                        "best": stage_summary["best"] or {},
                    }
                    for run, (st, stage_summary) in zip(runs, done_stages)
                ],
                "training_run": {
                    "epochs_done": len(epochs),
                    "steps_done": steps_done,
                    "steps_planned": steps_planned,
                    "finished": finished,
                    "cpu_hours": round(sum(h["seconds"] * h.get("threads", 1) for h in epochs) / 3600.0, 2),
                    "wall_hours": round(sum(h["seconds"] for h in epochs) / 3600.0, 2),
                    "threads": sorted({h.get("threads", 1) for h in epochs}),
                    "shipped_epoch_steps": earlier_steps + len(history) * settings.steps_per_epoch,
                },
                "train_sources": [s.name for s in sources],
                "quick": args.quick,
            }
        )
        best = summary["best"] or {}
        log(
            f"{key}: {len(epochs)} epochs ({steps_done} steps) so far, shipped: {stage.name} stage, best epoch "
            f"{best.get('epoch')}, validation Dice {_fmt(best.get('val_dice_before'))} -> {_fmt(best.get('val_dice'))}, "
            f"end-point error {_fmt(best.get('val_end_point_error'), 2)}; "
            f"{'packaged' if args.package else 'stopped at the time limit' if summary['stopped'] else 'done'}; {target}"
        )
        if summary["stopped"] and not args.package:
            break
    if (out_dir / "models.json").is_file():  # keep the entries of models not trained in this run
        others = [
            e
            for e in json.loads((out_dir / "models.json").read_text())["models"]
            if e["file"] not in {x["file"] for x in entries} and (out_dir / e["file"]).is_file()
        ]
        entries = others + entries
    for entry in entries:  # the recorded hashes must match the files that are there now
        entry["sha256"] = file_sha256(out_dir / entry["file"])
    write_manifest(out_dir, entries)
    command = "python scripts/train_weights.py --threads 1 --time-limit 3h --resume" + (
        " --quick" if args.quick else ""
    )
    (out_dir / "README.md").write_text(model_card(entries, command, args.quick), encoding="utf-8")
    log(f"done in {time.perf_counter() - started:.0f} s; weights, models.json and README.md in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
