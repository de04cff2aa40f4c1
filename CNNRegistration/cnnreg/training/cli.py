"""Train a learned registration network from image files: ``python -m cnnreg train``.

Command line (also ``torchrun --nproc_per_node=N -m cnnreg train ...`` for data parallel)::

    python -m cnnreg train --images DIR_OR_LIST [--labels DIR_OR_LIST] [--config FILE] --out model.pt

Settings come from :class:`cnnreg.training.settings.TrainSettings` (a JSON/YAML ``--config`` file, then the
flags that are given); the training itself is :func:`cnnreg.training.loop.train_from_files`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from ..errors import InputError
from ..progress import ProgressReporter, add_progress_argument
from ..settings import Normalization, Regularizer, Similarity, choices
from .distributed import init_distributed, leave_distributed
from .loop import output_paths, train_from_files
from .settings import DEFAULT_WORKING_SHAPE, TrainSettings, settings_from_dict


def load_config(path: str | os.PathLike) -> dict:
    """Read a JSON (or, when PyYAML is installed, YAML) training config into a dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{path} is YAML but PyYAML is not installed; use a JSON config") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise InputError(f"cannot parse the YAML config {path}: {error}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"cannot parse the JSON config {path}: {error}") from None
    if not isinstance(data, dict):
        raise InputError(f"config {path} must hold an object of settings, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------

#: command-line flag -> setting (flags left unset keep the config file's value)
_FLAG_SETTINGS = (
    "architecture",
    "diffeomorphic",
    "working_shape",
    "normalization",
    "similarity",
    "window",
    "regularizer",
    "weight",
    "jacobian_weight",
    "dice_weight",
    "cycle",
    "refine",
    "epochs",
    "steps_per_epoch",
    "batch_size",
    "learning_rate",
    "val_count",
    "seed",
    "device",
)


def _shape(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"working shape must look like 64,64,64 or 128x128, got {text!r}") from None
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:

    parser.add_argument(
        "--images", nargs="+", help="training images: folders, list files (.txt, one path a line) or files"
    )
    parser.add_argument("--labels", nargs="+", help="label maps, one per training image in the same order (optional)")
    parser.add_argument(
        "--val-images", nargs="+", help="held-out validation images (default: hold out some training images)"
    )
    parser.add_argument("--val-labels", nargs="+", help="label maps of the validation images")
    parser.add_argument("--config", help="JSON (or YAML with PyYAML) file of training settings; flags override it")
    parser.add_argument(
        "--out", required=True, help="best checkpoint (.pt); <stem>.last.pt and <stem>_curve.png go next to it"
    )
    parser.add_argument(
        "--resume", nargs="?", const="auto", help="continue from <stem>.last.pt (or the given checkpoint)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out checkpoint")
    parser.add_argument("--architecture", choices=["faim", "voxelmorph"], help="network family")
    parser.add_argument(
        "--diffeomorphic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the network outputs a velocity field, integrated by scaling and squaring",
    )
    parser.add_argument("--working-shape", type=_shape, help="e.g. 64,64,64 (3D) or 128,128 (2D)")
    parser.add_argument("--normalization", choices=choices(Normalization), help="intensity normalisation")
    parser.add_argument("--similarity", choices=choices(Similarity), help="similarity measure")
    parser.add_argument("--window", type=int, help="LNCC window, voxels (odd)")
    parser.add_argument("--regularizer", choices=choices(Regularizer), help="field regularizer")
    parser.add_argument("--weight", type=float, help="regularizer weight")
    parser.add_argument("--jacobian-weight", type=float, help="weight of the negative-Jacobian (folding) penalty")
    parser.add_argument("--dice-weight", type=float, help="weight of 1 - soft Dice of the label maps (needs --labels)")
    parser.add_argument(
        "--cycle", action=argparse.BooleanOptionalAction, default=None, help="cycle-consistent training"
    )
    parser.add_argument(
        "--refine", action=argparse.BooleanOptionalAction, default=None, help="alternating refinement module"
    )
    parser.add_argument("--epochs", type=int, help="epochs (a checkpoint and a validation after each)")
    parser.add_argument("--steps-per-epoch", type=int, help="training steps per epoch")
    parser.add_argument("--batch-size", type=int, help="pairs per step and process")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate")
    parser.add_argument("--val-count", type=int, help="training images held out for validation")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--device", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (per process)")
    add_progress_argument(parser)
    defaults = TrainSettings()
    for action in parser._actions:  # the flags that override a setting show the setting's own default
        if action.dest in _FLAG_SETTINGS and action.default is None:
            value = getattr(defaults, action.dest)
            shown = "x".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            if action.dest == "working_shape":
                shown = " or ".join("x".join(map(str, v)) for v in DEFAULT_WORKING_SHAPE.values())
            action.help = f"{action.help} (default: {shown}, unless the --config file sets it)"


def run(args: argparse.Namespace) -> int:

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config) if args.config else {}
    data_keys = ("images", "labels", "val_images", "val_labels")
    data = {key: config.pop(key, None) for key in data_keys}
    for key in data_keys:
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    settings = settings_from_dict(config)
    for key in _FLAG_SETTINGS:
        value = getattr(args, key)
        if value is not None:
            setattr(settings, key, value)
    if not data["images"]:
        raise InputError('no training images: pass --images DIR_OR_LIST or put "images" in the config')
    paths = output_paths(args.out)
    resume = None
    if args.resume:
        resume = paths["last"] if args.resume == "auto" else args.resume
        if not os.path.isfile(resume):
            raise InputError(f"cannot resume: {resume} does not exist")
    elif os.path.exists(paths["best"]) and not args.overwrite:
        raise InputError(f"{paths['best']} already exists; pass --overwrite to replace it or --resume to continue")
    info, device = init_distributed(settings.device)
    report = ProgressReporter(args.progress if info.is_main else "none")
    finished = False
    try:
        summary = train_from_files(
            settings,
            data["images"],
            args.out,
            labels=data["labels"],
            val_images=data["val_images"],
            val_labels=data["val_labels"],
            resume=resume,
            callback=report,
            info=info,
            device=device,
        )
        finished = True
    finally:
        leave_distributed(info, finished=finished)
    if report.summary and info.is_main:
        best = summary["best"] or {}
        dice = best.get("val_dice")
        print(
            f"trained {summary['epochs']} epochs in {summary['seconds']:.0f} s; best epoch {best.get('epoch')}: "
            f"validation loss {best.get('val_loss', math.nan):.4f}"
            + (f", Dice {dice:.3f}" if dice is not None else "")
            + f"; weights in {paths['best']}",
            file=sys.stderr,
        )
    return 0
