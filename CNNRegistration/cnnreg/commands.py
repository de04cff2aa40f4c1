"""The two built-in commands, ``register`` and ``apply`` (their arguments and what they run),
and how any command's errors become exit codes (:func:`run_command`).

:mod:`cnnreg.cli` dispatches to these; :mod:`cnnreg.batch` runs ``register`` in its workers
through the same functions, so a pair in a cohort is exactly a ``register`` command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import CancelledError, CnnregError, DeviceError, InputError
from .grid import same_grid
from .outputs import add_overwrite_any_folder_argument
from .progress import ProgressReporter, add_progress_argument, set_threads, wants_jsonl
from .settings import (
    EXIT_CANCELLED,
    EXIT_DEVICE,
    EXIT_INPUT,
    EXIT_NUMERIC,
    Interpolation,
    add_method_arguments,
    choices,
    settings_from_args,
)


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fixed", required=True, help="fixed (target) image, any SimpleITK format")
    parser.add_argument("--moving", required=True, help="moving (source) image")
    parser.add_argument("--moving-labels", help="label map on the moving grid, warped with nearest neighbour")
    parser.add_argument("--fixed-mask", help="mask on the fixed grid restricting the similarity")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing result folder (the whole folder, when it is one)"
    )
    add_overwrite_any_folder_argument(parser)
    add_method_arguments(parser)
    parser.add_argument("--no-qc", action="store_true", help="skip the QC picture")
    parser.add_argument(
        "--keep-failed",
        action="store_true",
        help="write the results of a failed registration (more than 1 %% of the voxels folded, or the similarity "
        "worse than before) instead of nothing; the exit code is still 4",
    )
    add_progress_argument(parser)


def run_register(args: argparse.Namespace) -> int:
    from .outputs import claimed_folder
    from .registration import check_output_folder

    report = ProgressReporter(args.progress)
    set_threads(args.threads)
    out_dir = check_output_folder(
        args.out,
        args.overwrite,
        [p for p in (args.fixed, args.moving, args.moving_labels, args.fixed_mask) if p],
        args.overwrite_any_folder,
    )
    with claimed_folder(out_dir) as claim:  # a second run on the same folder is refused from here on
        return _register_into(args, out_dir, claim, report)


def _register_into(args: argparse.Namespace, out_dir: str, claim, report: ProgressReporter) -> int:
    from . import image as im
    from .registration import check_memory, register, write_result

    settings = settings_from_args(args)
    # from the headers, before anything large is read
    fixed_size, fixed_spacing = im.grid_from_header(args.fixed, "fixed image")
    check_memory(fixed_size, im.size_from_header(args.moving, "moving image"), settings, fixed_spacing)
    if len(fixed_size) == 3 and fixed_size[2] == 1 and min(fixed_size[:2]) > 1:
        raise InputError(
            f"the fixed image {args.fixed} is a single slice stored as a 3D image (size {fixed_size}); its 3D "
            "displacement field cannot be stored in the NIfTI outputs (they would read back as 2D). Save both "
            "images as 2D (e.g. SimpleITK Extract or Slicer's 2D export) and register those"
        )
    fixed = im.read_image(args.fixed, "fixed image")
    moving = im.read_image(args.moving, "moving image")
    labels = im.read_image(args.moving_labels, "moving labels", allow_constant=True) if args.moving_labels else None
    mask = im.read_image(args.fixed_mask, "fixed mask", allow_constant=True) if args.fixed_mask else None
    from .device import describe_device, resolve_device

    device = describe_device(resolve_device(args.device))
    report(
        {
            "event": "start",
            "fixed": args.fixed,
            "moving": args.moving,
            "mode": args.mode,
            "device": device,
            "out": out_dir,
        }
    )
    result = register(
        fixed, moving, settings, moving_labels=labels, fixed_mask=mask, callback=report, keep_failed=args.keep_failed
    )
    result.summary["provenance"] = _provenance(args, settings, len(fixed_size))
    paths = write_result(result, out_dir, qc=not args.no_qc, claim=claim)
    if result.summary.get("failed"):  # --keep-failed: the results are written, the run still failed
        raise FloatingPointError(f"the registration failed: {result.summary['failed']}; results kept in {out_dir}")
    report({"event": "done", "summary": result.summary, "files": paths})
    if not report.jsonl:  # JSON lines carry the warnings in the "done" event's summary
        s = result.summary
        for warning in s["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        if report.summary:
            print(
                f"registered in {s['seconds']:.1f} s on {s['device']}: {s['similarity']} "
                f"{s['similarity_before']:.4f} -> {s['similarity_after']:.4f}, folding {s['folding_percent']:.4f} %, "
                f"min det J {s['min_jacobian']:.3f}; results in {out_dir}",
                file=sys.stderr,
            )
    return 0


def _provenance(args: argparse.Namespace, settings, ndim: int) -> dict:
    """What made a result: the command line, each input file with its SHA-256, the versions of
    cnnreg, torch, SimpleITK, numpy and Python, and for the learned modes the weights' SHA-256."""
    import platform

    import numpy
    import SimpleITK
    import torch

    from . import __version__
    from .checkpoint import file_sha256
    from .settings import Mode

    inputs = {"fixed": args.fixed, "moving": args.moving, "moving_labels": args.moving_labels}
    inputs["fixed_mask"] = args.fixed_mask
    record = {
        "command_line": ["cnnreg", *args.argv],
        "inputs": {
            role: {"path": os.path.abspath(path), "sha256": file_sha256(path)} for role, path in inputs.items() if path
        },
        "versions": {
            "cnnreg": __version__,
            "torch": torch.__version__,
            "SimpleITK": SimpleITK.Version.VersionString(),
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
    }
    if settings.mode in (Mode.LEARNED, Mode.LEARNED_REFINE):
        from .learned import shipped_model_path

        weights = settings.model or shipped_model_path(ndim)
        record["weights"] = {"path": os.path.abspath(weights), "sha256": file_sha256(weights)}
    return record


def add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--displacement", required=True, help="ITK displacement field (e.g. displacement.nii.gz)")
    parser.add_argument("--image", required=True, help="image to warp (intensity image or label map)")
    parser.add_argument("--reference", help="output grid (default: the displacement field's grid)")
    parser.add_argument(
        "--interpolation",
        choices=choices(Interpolation),
        help="nearest or label (label-aware: each label's indicator smoothed by 0.2 voxel, warped, arg-max: "
        "smooth boundaries onto a finer grid) for label maps and masks; linear or cubic (B-spline) for intensity "
        "images (default: for a label map, i.e. a piecewise-constant image of integer type, label onto a grid "
        "with voxels less than half its own, nearest otherwise; linear for other images)",
    )
    parser.add_argument(
        "--mass-preserving",
        action="store_true",
        help="multiply by det J of the field: for concentration images (activity per ml), so that the total "
        "(concentration x volume) is kept where the field stretches or shrinks the image; not for intensities",
    )
    parser.add_argument("--out", required=True, help="output image file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


#: image file suffixes ``apply`` writes (SimpleITK picks the format from the suffix)
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".tif", ".tiff", ".vtk")


def run_apply(args: argparse.Namespace) -> int:
    import numpy as np
    import SimpleITK as sitk

    from . import image as im
    from .outputs import check_writable_parent, staged_file, write_verified_image

    out = os.path.abspath(args.out)
    if os.path.lexists(out) and not args.overwrite:
        raise InputError(f"output file {out} already exists; pass --overwrite to replace it")
    if os.path.isdir(out):
        raise InputError(f"output {out} is a folder; give an image file name (e.g. warped.nii.gz)")
    if not out.lower().endswith(WRITABLE_SUFFIXES):
        raise InputError(f"cannot write {out}: unknown image format; use one of {', '.join(WRITABLE_SUFFIXES)}")
    inputs = [p for p in (args.displacement, args.image, args.reference) if p]
    if os.path.realpath(out) in {os.path.realpath(p) for p in inputs}:  # through links too
        raise InputError(f"output {out} is one of the inputs; choose another output file")
    check_writable_parent(out)
    field = im.read_displacement(args.displacement)
    chosen = Interpolation(args.interpolation) if args.interpolation else None
    # a constant map (a mask, a uniform activity) warps fine
    image = im.read_image(args.image, "image", allow_constant=True)
    reference = im.read_image(args.reference, "reference image", allow_constant=True) if args.reference else None
    if chosen is None:
        grid = reference if reference is not None else field
        chosen = im.label_interpolation(image, grid) if im.is_label_map(image) else Interpolation.LINEAR
    elif im.is_label_map(image) and chosen.differentiable:  # linear or cubic on labels
        print(
            f"warning: {args.image} has an integer type (a label map?) and --interpolation {chosen.value} mixes "
            "its labels at boundaries (new values appear, organs change volume); use --interpolation nearest or label",
            file=sys.stderr,
        )
    if args.mass_preserving and not chosen.differentiable:  # nearest or label-aware: a label map
        raise InputError("--mass-preserving is for concentration images; a label map keeps its labels")
    warped = im.apply_displacement(image, field, reference, chosen)
    if args.mass_preserving:
        from .evaluate import field_jacobian_determinant

        determinant = sitk.GetImageFromArray(field_jacobian_determinant(field).astype(np.float32))
        determinant.CopyInformation(field)
        if reference is not None and not same_grid(reference, field):
            determinant = im.resample(determinant, reference)
        warped = sitk.Cast(warped, sitk.sitkFloat32) * determinant
    if os.path.islink(out):  # replace the link itself, never what it points to
        os.remove(out)
    with staged_file(out) as stage:
        write_verified_image(warped, stage)
    print(f"wrote {out} ({chosen.value} interpolation)", file=sys.stderr)
    return 0


def run_command(run, args: argparse.Namespace) -> int:
    """``run(args)``, its errors turned into an exit code and a message on standard error
    (``cnnreg <command>: error: ...``; also a JSON ``error`` event when progress goes out as JSON
    lines): 2 bad input, 3 device problem, 4 numerical failure, 130 cancelled."""
    progress_jsonl = wants_jsonl(getattr(args, "progress", "none"))

    def fail(code: int, message: str) -> int:
        if progress_jsonl:
            print(json.dumps({"event": "error", "message": message, "exit_code": code}), flush=True)
        print(f"cnnreg {args.command}: error: {message}", file=sys.stderr)
        return code

    try:
        return run(args)
    except InputError as error:
        return fail(EXIT_INPUT, str(error))
    except DeviceError as error:
        return fail(EXIT_DEVICE, str(error))
    except FloatingPointError as error:
        return fail(EXIT_NUMERIC, f"{error}; try a smaller learning rate or a larger regularizer weight")
    except (KeyboardInterrupt, CancelledError):
        return fail(EXIT_CANCELLED, "cancelled; no output was written")
    except CnnregError as error:
        return fail(EXIT_INPUT, str(error))
