"""Command line: ``python -m cnnreg <command> ...`` (also installed as ``cnnreg``).

Commands: ``register`` (two images -> warped image, displacement field, Jacobian, summary,
QC picture) and ``apply`` (warp any image with an exported field); further commands
(``evaluate``, ``atlas``, ``train``) are added by their modules when present.

Progress (``register``): one JSON object per line on standard output (``--progress jsonl``,
the default), events ``start``, ``progress`` (stage, iteration, iterations, fraction 0..1,
loss, similarity_loss, regularization), ``done`` (with the summary) or ``error`` (message);
plus a progress bar on standard error when it is a terminal.

Exit codes: 0 success, 2 bad input, 3 device problem, 4 numerical failure, 130 cancelled.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from .conventions import Interpolation, Mode, Normalization, Regularizer, Similarity, SimilarityInterpolation, choices
from .errors import CancelledError, CnnregError, DeviceError, InputError

if TYPE_CHECKING:
    from .registration import RegistrationSettings

EXIT_INPUT, EXIT_DEVICE, EXIT_NUMERIC, EXIT_CANCELLED = 2, 3, 4, 130

#: further commands: name -> module exposing ``add_arguments(parser)`` and ``run(args) -> int``
PLUGIN_COMMANDS = {
    "evaluate": "cnnreg.evaluate_cli",
    "atlas": "cnnreg.atlas",
    "train": "cnnreg.train_cli",
}


class ProgressReporter:
    """Writes progress events as JSON lines (stdout) and a bar (stderr, terminals only)."""

    def __init__(self, style: str = "auto", stream=None, bar_stream=None):
        self.stream = stream or sys.stdout
        self.bar_stream = bar_stream or sys.stderr
        self.jsonl = style in ("auto", "jsonl")
        self.bar = style == "bar" or (style == "auto" and self.bar_stream.isatty())
        self.started = time.perf_counter()

    def __call__(self, event: dict) -> None:
        if self.jsonl:
            self.stream.write(json.dumps(event, default=float) + "\n")
            self.stream.flush()
        if self.bar and event.get("event") == "progress":
            fraction = float(event.get("fraction", 0.0))
            filled = int(30 * fraction)
            self.bar_stream.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {100 * fraction:5.1f}% "
                f"{event.get('stage', '')} it {event.get('iteration')}/{event.get('iterations')} "
                f"loss {event.get('loss', float('nan')):.5f} {time.perf_counter() - self.started:6.1f}s"
            )
            self.bar_stream.flush()
        if self.bar and event.get("event") in ("done", "error"):
            self.bar_stream.write("\n")


def _iterations(text: str) -> list[int] | int:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"iterations must be an integer or a comma list like 150,100,50, got {text!r}"
        ) from None
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"iterations must be >= 0, got {text!r}")
    return values[0] if len(values) == 1 else values


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default or
    there is none to name (None, False, a required option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or nothing or action.required:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite ``kind`` (int or float) within ``[low, high]`` (``(low, high]``
    with ``low_open``), refused at parse time with the bound in the message."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _enum_option(parser: argparse.ArgumentParser, flag: str, enum_type, default, help: str) -> None:
    """``flag`` choosing a member of ``enum_type`` by value (``default``: a member or its value)."""
    parser.add_argument(flag, default=enum_type(default).value, choices=choices(enum_type), help=help)


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress`` of every command that reports progress (read by :class:`ProgressReporter`)."""
    parser.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "jsonl", "bar", "none"],
        help="JSON lines on standard output and/or a bar on standard error (auto: both, the bar on a terminal)",
    )


#: random seeds: what numpy, Python and torch all accept
MAX_SEED = 2**32 - 1


def _add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fixed", required=True, help="fixed (target) image, any SimpleITK format")
    parser.add_argument("--moving", required=True, help="moving (source) image")
    parser.add_argument("--moving-labels", help="label map on the moving grid, warped with nearest neighbour")
    parser.add_argument("--fixed-mask", help="mask on the fixed grid restricting the similarity")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs in an existing non-empty folder")
    add_method_arguments(parser)
    parser.add_argument("--no-qc", action="store_true", help="skip the QC picture")
    add_progress_argument(parser)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The registration method's options (mode, loss, schedule, device...), shared by every
    command that registers images (``register``, ``atlas``); read back with :func:`settings_from_args`.
    Defaults are those of :class:`cnnreg.registration.RegistrationSettings` and
    :class:`cnnreg.optimize.OptimizationSettings`, so the command line and the Python API agree."""
    from .optimize import DEFAULT_ITERATIONS, DENSE_LEARNING_RATES, OPTIMIZERS, CNNField, OptimizationSettings
    from .registration import RegistrationSettings

    run, opt = RegistrationSettings(), OptimizationSettings()
    iterations = ", ".join(f"{mode} {','.join(map(str, its))}" for mode, its in DEFAULT_ITERATIONS.items())
    _enum_option(
        parser,
        "--mode",
        Mode,
        run.mode,
        "instance: the displacement field is optimised (the most accurate on CPU); phantom: a CNN is "
        "optimised on this pair (no training data); learned / learned-refine: shipped network weights",
    )
    _enum_option(parser, "--similarity", Similarity, opt.similarity, "similarity measure")
    _enum_option(parser, "--regularizer", Regularizer, opt.regularizer, "regularizer")
    parser.add_argument("--weight", type=_number(float, 0), default=opt.weight, help="regularizer weight (>= 0)")
    parser.add_argument(
        "--jacobian-weight",
        type=_number(float, 0),
        default=opt.jacobian_weight,
        help="weight of the negative-Jacobian (folding) penalty added to the loss; 0 = off",
    )
    parser.add_argument("--window", type=_number(int, 1), default=opt.window, help="LNCC window, voxels (odd)")
    parser.add_argument("--levels", type=_number(int, 1, 12), default=opt.levels, help="pyramid levels")
    parser.add_argument(
        "--iterations",
        type=_iterations,
        default=None,
        help=f"per level, coarse to fine: N or N1,N2,N3 (default per mode: {iterations})",
    )
    parser.add_argument(
        "--learning-rate",
        type=_number(float, 0, low_open=True),
        default=None,
        help="optimiser step (default per mode: dense-field optimisers "
        + ", ".join(f"{k} {v:g}" for k, v in DENSE_LEARNING_RATES.items())
        + f"; phantom CNN Adam {CNNField.default_learning_rate:g})",
    )
    parser.add_argument(
        "--field-smoothing",
        type=_number(float, 0),
        default=opt.field_smoothing,
        help="Gaussian sigma of the field update, voxels (>= 0)",
    )
    parser.add_argument(
        "--control-spacing",
        type=_number(float, 1),
        default=opt.control_spacing,
        help="dense-field control grid spacing, voxels (1 = every voxel)",
    )
    parser.add_argument("--optimizer", default=opt.optimizer, choices=list(OPTIMIZERS), help="dense-field optimiser")
    _enum_option(
        parser,
        "--interpolation",
        SimilarityInterpolation,
        opt.interpolation,
        "how the moving image is sampled, in the similarity term and in warped.nii.gz: linear, or "
        "cubic B-spline (more accurate sub-voxel alignment, slower)",
    )
    parser.add_argument("--features", type=_number(int, 1), default=opt.features, help="phantom-mode CNN width")
    parser.add_argument(
        "--max-cnn-voxels",
        type=_number(int, 1),
        default=opt.max_cnn_voxels,
        help="phantom-mode working-grid size limit",
    )
    parser.add_argument("--model", help="learned modes: weights file (default: the shipped weights)")
    parser.add_argument(
        "--refine-iterations",
        type=_iterations,
        default=run.refine_iterations,
        help="learned-refine: dense-field iterations after the prediction, at full resolution (N) or per "
        "level, coarse to fine (N1,N2: as many levels as numbers)",
    )
    parser.add_argument("--affine", action="store_true", help="affine pre-alignment with SimpleITK first")
    _enum_option(parser, "--normalization", Normalization, run.normalization, "intensity normalisation of both images")
    parser.add_argument("--device", default=run.device, help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--threads", type=_number(int, 1, 1024), default=None, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument(
        "--seed",
        type=_number(int, 0, MAX_SEED),
        default=run.seed,
        help="random seed, 0 to 2^32 - 1 (runs are repeatable at the same thread count)",
    )


def settings_from_args(args: argparse.Namespace) -> RegistrationSettings:
    """:class:`cnnreg.registration.RegistrationSettings` from the options of :func:`add_method_arguments`."""
    from .optimize import OptimizationSettings
    from .registration import RegistrationSettings

    return RegistrationSettings(
        mode=args.mode,
        optimization=OptimizationSettings(
            similarity=args.similarity,
            regularizer=args.regularizer,
            weight=args.weight,
            jacobian_weight=args.jacobian_weight,
            window=args.window,
            levels=args.levels,
            iterations=args.iterations,
            learning_rate=args.learning_rate,
            field_smoothing=args.field_smoothing,
            control_spacing=args.control_spacing,
            optimizer=args.optimizer,
            interpolation=args.interpolation,
            features=args.features,
            max_cnn_voxels=args.max_cnn_voxels,
        ),
        device=args.device,
        seed=args.seed,
        normalization=args.normalization,
        affine=args.affine,
        model=args.model,
        refine_iterations=args.refine_iterations,
    )


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (CPU threads for torch) when given."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _run_register(args: argparse.Namespace) -> int:
    from . import image as im
    from .registration import check_memory, check_output_folder, register, write_result

    report = ProgressReporter(args.progress)
    set_threads(args)
    out_dir = check_output_folder(
        args.out, args.overwrite, [p for p in (args.fixed, args.moving, args.moving_labels, args.fixed_mask) if p]
    )
    settings = settings_from_args(args)
    # from the headers, before anything large is read
    fixed_size = im.size_from_header(args.fixed, "fixed image")
    check_memory(fixed_size, im.size_from_header(args.moving, "moving image"), settings)
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
    result = register(fixed, moving, settings, moving_labels=labels, fixed_mask=mask, callback=report)
    paths = write_result(result, out_dir, qc=not args.no_qc)
    report({"event": "done", "summary": result.summary, "files": paths})
    if not report.jsonl and args.progress != "none":
        s = result.summary
        print(
            f"registered in {s['seconds']:.1f} s on {s['device']}: {s['similarity']} "
            f"{s['similarity_before']:.4f} -> {s['similarity_after']:.4f}, folding {s['folding_percent']:.4f} %, "
            f"min det J {s['min_jacobian']:.3f}; results in {out_dir}",
            file=sys.stderr,
        )
    return 0


def _add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--displacement", required=True, help="ITK displacement field (e.g. displacement.nii.gz)")
    parser.add_argument("--image", required=True, help="image to warp (intensity image or label map)")
    parser.add_argument("--reference", help="output grid (default: the displacement field's grid)")
    _enum_option(
        parser,
        "--interpolation",
        Interpolation,
        Interpolation.LINEAR,
        "nearest for label maps and masks; linear or cubic (B-spline) for intensity images",
    )
    parser.add_argument("--out", required=True, help="output image file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _run_apply(args: argparse.Namespace) -> int:
    from . import image as im
    from .outputs import check_writable_parent, staged_file, write_verified_image

    out = os.path.abspath(args.out)
    if os.path.lexists(out) and not args.overwrite:
        raise InputError(f"output file {out} already exists; pass --overwrite to replace it")
    if os.path.isdir(out):
        raise InputError(f"output {out} is a folder; give an image file name (e.g. warped.nii.gz)")
    inputs = [p for p in (args.displacement, args.image, args.reference) if p]
    if os.path.realpath(out) in {os.path.realpath(p) for p in inputs}:  # through links too
        raise InputError(f"output {out} is one of the inputs; choose another output file")
    check_writable_parent(out)
    field = im.read_displacement(args.displacement)
    labels = Interpolation(args.interpolation) is Interpolation.NEAREST  # a mask may hold one label
    image = im.read_image(args.image, "image", allow_constant=labels)
    reference = im.read_image(args.reference, "reference image", allow_constant=True) if args.reference else None
    warped = im.apply_displacement(image, field, reference, args.interpolation)
    if os.path.islink(out):  # replace the link itself, never what it points to
        os.remove(out)
    with staged_file(out) as stage:
        write_verified_image(warped, stage)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="cnnreg", description="Deformable image registration with CNNs (CPU/GPU, 2D/3D)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    runners = {}
    register_parser = commands.add_parser(
        "register",
        help="register a moving image to a fixed image",
        formatter_class=DefaultsHelpFormatter,
    )
    _add_register_arguments(register_parser)
    runners["register"] = _run_register
    apply_parser = commands.add_parser(
        "apply", help="warp an image with an exported displacement field", formatter_class=DefaultsHelpFormatter
    )
    _add_apply_arguments(apply_parser)
    runners["apply"] = _run_apply
    for name, module_name in PLUGIN_COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        sub = commands.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(sub)
        sub.formatter_class = DefaultsHelpFormatter  # every default shown (descriptions kept as written)
        runners[name] = module.run
    return parser, runners


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None, handle_signals: bool = False) -> int:
    """Run one command; returns the exit code.  ``handle_signals`` (programs only, main
    thread) turns SIGTERM into a clean cancel, as Ctrl-C is."""
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    if handle_signals and hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    progress_jsonl = getattr(args, "progress", "none") in ("auto", "jsonl")

    def fail(code: int, message: str) -> int:
        if progress_jsonl:
            print(json.dumps({"event": "error", "message": message, "exit_code": code}), flush=True)
        print(f"cnnreg {args.command}: error: {message}", file=sys.stderr)
        return code

    try:
        return runners[args.command](args)
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


def console_main() -> int:
    """Entry point of the ``cnnreg`` program and of ``python -m cnnreg``."""
    return main(handle_signals=True)


if __name__ == "__main__":
    sys.exit(console_main())
