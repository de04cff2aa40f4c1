"""The contract of the backend, defined once: conventions, options, defaults, exit codes.

Conventions (axis order, units, direction of fields)
====================================================

Tensors
    Images are ``(N, C, D, H, W)`` in 3D and ``(N, C, H, W)`` in 2D.  The spatial axes
    ``D, H, W`` are SimpleITK's array axes ``(k, j, i)`` (``sitk.GetArrayFromImage``),
    which are also Slicer's ``arrayFromVolume`` axes.

Displacement fields inside the backend
    ``u`` has shape ``(N, ndim, *spatial)``, lives on the **fixed** image grid, is
    expressed in **voxels of that grid**, and channel ``c`` is the displacement along
    spatial tensor axis ``c`` -- that is ``(k, j, i)`` order in 3D and ``(j, i)`` in 2D.
    It *pulls* the moving image::

        warped(x) = moving(x + u(x))

    This is ITK's resampling direction (fixed -> moving) and Slicer's "from parent"
    direction of a grid transform.

Displacement fields at the boundaries (each converted once)
    * ITK displacement-field files: millimetres, **LPS** world axes ``(x, y, z)``, on the
      fixed grid, vector image components in ``(x, y, z)`` order.  Voxels <-> LPS mm is
      :func:`cnnreg.image.displacement_image` / :func:`cnnreg.image.read_displacement` (with
      :func:`cnnreg.spatial.voxel_to_lps` / :func:`cnnreg.spatial.lps_to_voxel`).
    * Slicer: millimetres, **RAS** world axes: ``ras = (-x, -y, z)`` of the LPS vector.  The
      backend only writes ITK (LPS) files; the Slicer module flips x and y when it reads the
      field into a grid transform (``CNNRegistrationLib.nodes``, with :data:`LPS_TO_RAS_SIGNS`).

    For a grid with spacing ``s = (s_i, s_j, s_k)`` and direction matrix ``R`` (columns =
    world direction of the ``i, j, k`` index axes), a voxel displacement ``u`` reordered to
    ``(i, j, k)`` maps to ``d_lps = R @ diag(s) @ u_ijk``.

Options
=======

The option enums (whose values are the command-line strings and whose :meth:`Choice.label`
is the text the Slicer module shows), the per-mode defaults, the exit codes and output file
names, and the two dataclasses :class:`OptimizationSettings` and :class:`RegistrationSettings`.
The command line is built from the dataclass fields (:func:`add_method_arguments`,
:func:`settings_from_args`) and turned back into arguments (:func:`command_line_arguments`,
used by the Slicer module), so the Python API, ``cnnreg register`` and the Slicer module
share one set of defaults and bounds.

This module imports only the standard library (and :mod:`cnnreg.errors`): the Slicer module
imports it directly, without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import numbers
from collections.abc import Sequence
from typing import Any

from .errors import InputError

#: sign per world axis from LPS to RAS (3D): ``ras = LPS_TO_RAS_SIGNS * lps``
LPS_TO_RAS_SIGNS = (-1.0, -1.0, 1.0)

#: det J colours (RGB 0..1), the same in qc.png, the Slicer overlay and the docs: a diverging map
#: centred on det J = 1 (contraction blue, volume kept white, expansion red), and folds
#: (det J <= 0) in yellow, a colour the map never takes
JACOBIAN_CONTRACTION_RGB = (0.13, 0.40, 0.80)
JACOBIAN_KEPT_RGB = (1.0, 1.0, 1.0)
JACOBIAN_EXPANSION_RGB = (0.80, 0.12, 0.10)
JACOBIAN_FOLD_RGB = (1.0, 0.85, 0.0)


def jacobian_rgb(value: float, span: float = 1.0) -> tuple[float, float, float]:
    """Colour of det J ``value``: :data:`JACOBIAN_FOLD_RGB` at or below 0, otherwise white at 1
    blending linearly to blue at ``1 - span`` and to red at ``1 + span`` (clipped beyond)."""
    if value <= 0:
        return JACOBIAN_FOLD_RGB
    t = max(-1.0, min(1.0, (value - 1.0) / span))
    end = JACOBIAN_EXPANSION_RGB if t > 0 else JACOBIAN_CONTRACTION_RGB
    return tuple(k + (e - k) * abs(t) for k, e in zip(JACOBIAN_KEPT_RGB, end))


class Choice(str, enum.Enum):
    """Base of the option enums: a member is its command-line string; ``label()`` is GUI text."""

    def __str__(self) -> str:
        return self.value

    def label(self) -> str:
        """Text shown for this choice in the Slicer module (its combo boxes call ``label``)."""
        return LABELS.get(self, self.value)


class Mode(Choice):
    """How the displacement field is obtained."""

    INSTANCE = "instance"  # per-pair dense-field optimisation
    LEARNED = "learned"  # one forward pass of a trained network
    LEARNED_REFINE = "learned-refine"  # learned + instance optimisation
    PHANTOM = "phantom"  # per-pair CNN optimisation, no prior training (Chen et al. 2020)


class Similarity(Choice):
    """Image similarity term of the loss."""

    LNCC = "lncc"
    MSE = "mse"
    PCC = "pcc"
    SSIM = "ssim"
    MI = "mi"
    PCC_SSIM = "pcc+ssim"


class Regularizer(Choice):
    """Smoothness / plausibility term on the displacement field."""

    DIFFUSION = "diffusion"
    TOTAL_VARIATION = "tv"
    BENDING = "bending"
    NEGATIVE_JACOBIAN = "negjac"


class Interpolation(Choice):
    """How an image is sampled at warped positions.

    Nearest neighbour and label-aware are for label maps and masks only: they have no gradient,
    so the similarity term of the iterative modes refuses them (:data:`SIMILARITY_INTERPOLATIONS`).
    """

    LINEAR = "linear"
    CUBIC = "cubic"  # cubic B-spline: no bias towards whole-voxel shifts, ~3x slower per warp
    NEAREST = "nearest"
    LABEL = "label"  # label maps: each label's indicator smoothed slightly, warped linearly, arg-max

    @property
    def differentiable(self) -> bool:
        """Whether it may sample the moving image inside the similarity term."""
        return self not in (Interpolation.NEAREST, Interpolation.LABEL)


#: interpolations allowed in the similarity term (and for the warped intensity image)
SIMILARITY_INTERPOLATIONS = tuple(member for member in Interpolation if member.differentiable)


class Normalization(Choice):
    """Intensity normalisation of both images before registration."""

    MAX = "max"  # divide by the maximum (FAIM, Chen et al.)
    PERCENTILE = "percentile"  # robust: clip to [p0.5, p99.5] and scale to [0, 1]
    CT = "ct"  # Hounsfield units: clip to CT_WINDOW_HU and scale to [0, 1] (air and padding -> 0)
    NONE = "none"


#: the HU window of ``--normalization ct``: air (and padding such as -2048 or -3024) at 0, the
#: lungs' parenchyma, fat and soft tissue apart, bone and contrast saturated at 1
CT_WINDOW_HU = (-1000.0, 400.0)


class Optimizer(Choice):
    """Optimiser of the dense field (instance mode, refinement); the phantom CNN uses Adam."""

    GLOBAL_ADAM = "global-adam"  # Adam with one second moment per tensor (steps follow the gradient)
    ADAM = "adam"
    GREEDY = "greedy"  # demons-like: normalised, smoothed gradient steps


class Device(Choice):
    """Compute device; the command line also takes ``cuda:N`` and ``gpu`` (= ``cuda``)."""

    AUTO = "auto"  # CUDA when available, else CPU
    CPU = "cpu"
    CUDA = "cuda"


LABELS: dict[Choice, str] = {
    Mode.INSTANCE: "Instance optimisation (dense field)",
    Mode.LEARNED: "Learned (one pass of a trained network)",
    Mode.LEARNED_REFINE: "Learned + instance refinement",
    Mode.PHANTOM: "Phantom CNN (no training, optimised on this pair)",
    Similarity.LNCC: "Local normalised cross-correlation (LNCC)",
    Similarity.MSE: "Mean squared error (MSE)",
    Similarity.PCC: "Pearson correlation (PCC)",
    Similarity.SSIM: "Structural similarity (SSIM)",
    Similarity.MI: "Mutual information (MI)",
    Similarity.PCC_SSIM: "PCC + SSIM",
    Regularizer.DIFFUSION: "Diffusion (gradient L2)",
    Regularizer.TOTAL_VARIATION: "Total variation",
    Regularizer.BENDING: "Bending energy",
    Regularizer.NEGATIVE_JACOBIAN: "Negative-Jacobian penalty",
    Interpolation.LINEAR: "Linear (fast)",
    Interpolation.CUBIC: "Cubic B-spline (sub-voxel accurate, slower)",
    Interpolation.NEAREST: "Nearest neighbour (label maps)",
    Interpolation.LABEL: "Label-aware (smoothed indicators, arg-max)",
    Normalization.MAX: "Divide by the maximum (MRI)",
    Normalization.PERCENTILE: "Robust range (0.5-99.5 percentiles)",
    Normalization.CT: f"CT window ({CT_WINDOW_HU[0]:g} to {CT_WINDOW_HU[1]:g} HU)",
    Normalization.NONE: "None",
    Device.AUTO: "Automatic (GPU if available)",
    Device.CPU: "CPU",
    Device.CUDA: "CUDA GPU",
}


def choices(enum_type: type[enum.Enum]) -> list[str]:
    """The accepted string values of an enum, for argument parsers and messages."""
    return [member.value for member in enum_type]


def as_choice(value: Any, enum_type: type[Choice], what: str) -> Choice:
    """``value`` (a member or its string) as a member of ``enum_type``; InputError otherwise."""
    try:
        return enum_type(value)
    except ValueError:
        raise InputError(f"unknown {what} {value!r}; choose one of {choices(enum_type)}") from None


# ----------------------------------------------------------------------------- defaults

#: iterations per pyramid level, coarse to fine, when none are given (phantom: 80 at the finest
#: level keeps it within 10x demons' time; measured in docs/decisions.md)
DEFAULT_ITERATIONS: dict[Mode, tuple[int, ...]] = {Mode.INSTANCE: (100, 60, 60), Mode.PHANTOM: (100, 60, 80)}

#: with the default schedule, a pyramid level of more voxels than LARGE_LEVEL_VOXELS runs at most
#: LARGE_LEVEL_ITERATIONS iterations: its iterations cost several times their share (a 1 mm head's
#: 8.7 M voxels: ~2.7 s each on 2 threads), and 10 there, after 60 on the level of half its size,
#: reach Greedy's Dice in less time (docs/decisions.md)
LARGE_LEVEL_VOXELS = 2**21
LARGE_LEVEL_ITERATIONS = 10

#: learned-refine's dense-field iterations after the prediction when none are given (one level,
#: at most LARGE_LEVEL_ITERATIONS on a grid of more than LARGE_LEVEL_VOXELS)
DEFAULT_REFINE_ITERATIONS = 50


def default_level_iterations(iterations: int, voxels: int | None) -> int:
    """A default schedule's ``iterations`` on a level of ``voxels`` voxels (None: not known):
    at most :data:`LARGE_LEVEL_ITERATIONS` on a level of more than :data:`LARGE_LEVEL_VOXELS`."""
    return min(iterations, LARGE_LEVEL_ITERATIONS) if voxels is not None and voxels > LARGE_LEVEL_VOXELS else iterations


#: how the moving image is sampled when no interpolation is given: the cubic B-spline for the
#: optimising modes (lower TRE, higher Dice: docs/decisions.md), linear for the learned network's
#: one pass (it was trained with linear warps)
DEFAULT_INTERPOLATION: dict[Mode, Interpolation] = {
    Mode.INSTANCE: Interpolation.CUBIC,
    Mode.LEARNED_REFINE: Interpolation.CUBIC,
    Mode.PHANTOM: Interpolation.CUBIC,
    Mode.LEARNED: Interpolation.LINEAR,
}

#: default step of each dense-field optimiser: voxels per step for an RMS-sized gradient
#: (global-adam), per element (adam), largest voxel step (greedy); larger global-adam steps
#: overshoot at level changes (docs/decisions.md)
DENSE_LEARNING_RATES: dict[Optimizer, float] = {
    Optimizer.GLOBAL_ADAM: 0.05,
    Optimizer.ADAM: 0.02,
    Optimizer.GREEDY: 0.25,
}

#: Adam step of the phantom CNN's weights (its last layer gets a larger one, see cnnreg.phantom);
#: larger steps reach further but 3e-3 is close to unstable (docs/decisions.md)
CNN_LEARNING_RATE = 2e-3

#: bounds of options that have no sensible use beyond them (and cost memory without bound): a
#: field-update smoothing wider than 20 voxels smooths the field away; the CNN of Chen et al. has 24
#: features, 256 costs ~16x the memory of the default 16
MAX_FIELD_SMOOTHING = 20.0
MAX_FEATURES = 256

#: random seeds: what numpy, Python and torch all accept
MAX_SEED = 2**32 - 1

# ----------------------------------------------------------------------------- files and exit codes

#: exit codes of every ``cnnreg`` command
EXIT_OK, EXIT_INPUT, EXIT_DEVICE, EXIT_NUMERIC, EXIT_CANCELLED = 0, 2, 3, 4, 130

#: files of a registration's output folder
OUTPUT_FILES = {
    "warped": "warped.nii.gz",
    "displacement": "displacement.nii.gz",
    "warped_labels": "warped_labels.nii.gz",
    "inverse_displacement": "inverse_displacement.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "summary": "summary.json",
    "qc": "qc.png",
}

#: summary.json, defined once: key -> what it holds.  ``cnnreg.registration.register`` builds
#: exactly these keys (it checks), ``write_result`` adds ``files`` and ``qc_error``, the command line
#: ``provenance``; the Slicer module and the tests read them by these names.
REGISTRATION_SUMMARY: dict[str, str] = {
    "mode": "the mode run",
    "similarity": "similarity measure",
    "regularizer": "regularizer",
    "weight": "regularizer weight",
    "jacobian_weight": "folding-penalty weight",
    "levels": "pyramid levels run",
    "iterations": "iterations run per level (early stops included)",
    "iterations_requested": "iterations asked for",
    "device": "the device, in words",
    "seed": "random seed",
    "affine": "whether an affine pre-alignment ran",
    "affine_matrix": "its matrix (LPS, fixed -> moving), or null",
    "affine_offset_mm": "its translation, mm, or null",
    "affine_determinant": "its determinant (1 without one)",
    "normalization": "intensity normalisation",
    "working_grid": "size and spacing (mm) of the grid the field was estimated on",
    "interpolation": "how the moving image was sampled",
    "labels_interpolation": "how the labels were warped (nearest or label-aware), or null",
    "seconds": "registration time, s",
    "similarity_before": "similarity before, over the whole fixed grid",
    "similarity_after": "similarity after",
    "similarity_overlap_before": "similarity before, where both images have data",
    "similarity_overlap_after": "similarity after, where both images have data",
    "failed": "why the registration failed, or null",
    "warnings": "list of warnings",
    "inverse_residual_mm": "forward after inverse residual, mm (mean, p95, max), or null",
    "fixed_size": "fixed grid size (i, j, k)",
    "fixed_spacing": "fixed grid spacing, mm",
    "folding_fraction": "fraction of voxels with det J <= 0",
    "folding_percent": "the same, %",
    "min_jacobian": "smallest det J",
    "max_jacobian": "largest det J",
    "sdlogj": "standard deviation of log det J",
}
#: keys the writer and the command line add to :data:`REGISTRATION_SUMMARY`
WRITTEN_SUMMARY: dict[str, str] = {
    "files": "role -> file name of each output written",
    "qc_error": "why qc.png could not be drawn (only then)",
    "provenance": "command line, input files with SHA-256, versions, weights (command line only)",
}

# ----------------------------------------------------------------------------- option values


class Number:
    """A bounded, finite int or float option: parses command-line text (argparse ``type``) and
    checks values given from Python, with the same bounds and messages."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, *, low_open=False, odd=False):
        self.kind, self.low, self.high, self.low_open, self.odd = kind, low, high, low_open, odd
        self.__name__ = kind.__name__  # argparse names the type in its messages

    def problem(self, value) -> str | None:
        """Why ``value`` is not allowed, or None."""
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            return f"expected an integer, got {value!r}"
        if self.kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            return f"expected a number, got {value!r}"
        if not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'>' if self.low_open else '>='} {self.low}, got {value}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high}, got {value}"
        if self.odd and value % 2 == 0:
            return f"must be odd, got {value}"
        return None

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if self.kind is int else 'a number'}, got {text!r}"
            ) from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value


class Schedule:
    """Iterations per pyramid level, coarse to fine: ``N`` or ``N1,N2,...`` (each >= 0)."""

    __name__ = "schedule"

    def problem(self, value) -> str | None:
        values = as_schedule(value)
        if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0 for v in values):
            return f"must be integers >= 0, got {value!r}"
        return None

    def __call__(self, text: str) -> int | list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"iterations must be an integer or a comma list like 150,100,50, got {text!r}"
            ) from None
        if min(values) < 0:
            raise argparse.ArgumentTypeError(f"iterations must be >= 0, got {text!r}")
        return values[0] if len(values) == 1 else values


def as_schedule(iterations: int | Sequence[int]) -> list[int]:
    """Iterations as a list per level (one number = one level)."""
    return [iterations] if isinstance(iterations, int) else list(iterations)


def _option(
    default: Any = None,
    help: str | None = None,
    value: Any = None,
    values: Sequence | None = None,
    choice: type[Choice] | None = None,
):
    """A dataclass field that is also a command-line option (``help`` given): ``value`` parses and
    checks it (:class:`Number`, :class:`Schedule`); an enum default, or ``choice`` (an enum class,
    for a default of None = per mode), makes it a choice (``values`` restricts the choices); a bool
    default makes it a flag."""
    if choice is None and isinstance(default, Choice):
        choice = type(default)
    metadata = {"help": help, "value": value, "values": values, "choice": choice}
    return dataclasses.field(default=default, metadata=metadata)


def _interpolation_help() -> str:
    modes_of: dict[Interpolation, list[str]] = {}
    for mode, interpolation in DEFAULT_INTERPOLATION.items():
        modes_of.setdefault(interpolation, []).append(mode.value)
    per_mode = "; ".join(f"{', '.join(modes)} {interpolation.value}" for interpolation, modes in modes_of.items())
    return (
        "how the moving image is sampled, in the similarity term and in warped.nii.gz: linear, or cubic "
        f"B-spline (more accurate sub-voxel alignment, slower) (default per mode: {per_mode})"
    )


def _iterations_help() -> str:
    per_mode = "; ".join(f"{mode.value} {','.join(map(str, its))}" for mode, its in DEFAULT_ITERATIONS.items())
    return (
        f"iterations per level, coarse to fine: N or N1,N2,N3 (default per mode: {per_mode}; at most "
        f"{LARGE_LEVEL_ITERATIONS} on a level of more than 2^{LARGE_LEVEL_VOXELS.bit_length() - 1} voxels)"
    )


def _learning_rate_help() -> str:
    dense = ", ".join(f"{optimizer.value} {rate:g}" for optimizer, rate in DENSE_LEARNING_RATES.items())
    return f"optimiser step (default per mode: dense-field optimisers {dense}; phantom CNN Adam {CNN_LEARNING_RATE:g})"


@dataclasses.dataclass
class OptimizationSettings:
    """Settings of the iterative modes (loss, schedule, optimiser).

    Attributes:
        similarity, regularizer, weight: loss = similarity loss + weight x regularizer.
        jacobian_weight: weight of the negative-Jacobian penalty mean(max(0, -det J)) (FAIM),
            summed over forward and central differences (the latter is what the folding %
            reports), added on top of the regularizer to discourage folding; 0 = off.
        window: LNCC window in voxels (odd).
        levels: pyramid levels (each halves the size; coarse levels stop at 16 voxels).
        iterations: iterations per level, coarse to fine (one number = every level); None =
            the mode's default (:data:`DEFAULT_ITERATIONS`).
        learning_rate: optimiser step; None = the default of the mode and optimiser
            (:data:`DENSE_LEARNING_RATES`, :data:`CNN_LEARNING_RATE`).
        field_smoothing: Gaussian sigma (voxels) applied to the optimised field update.
        control_spacing: dense-field modes optimise the update on a control grid with this
            spacing in voxels of the fixed grid (interpolated linearly; 1 = every voxel).
        optimizer: dense-field optimiser (:class:`Optimizer`).
        interpolation: how the similarity term (and the warped image) samples the moving
            image: linear or cubic B-spline; None = the mode's default
            (:data:`DEFAULT_INTERPOLATION`).  Linear interpolation blurs by an amount that
            depends on the sub-voxel part of ``x + u(x)``, so a blurred moving image is matched
            best by shifts near whole voxels (a bias of a few tenths of a voxel); the cubic
            B-spline hardly has this bias, at ~1.3x the cost per iteration (docs/decisions.md).
        features: width of the phantom CNN.
        max_cnn_voxels: the phantom CNN runs on at most this many voxels (default 128^3); its
            field is upsampled to the fixed grid.  This bounds time and memory on large images;
            a smaller working grid costs accuracy (docs/decisions.md).
        cnn_full_resolution_iterations: the phantom CNN sees the previous level's images at the
            finest level (its field, at half its input resolution, is resized to the finest grid,
            where the loss is evaluated); this many iterations follow with the CNN on the
            full-size images (0 = none): see :func:`cnnreg.phantom.optimize_cnn`.
        final_learning_rate: fraction of the learning rate reached at the end of each level
            (cosine decay; 1 = constant).
        patience, tolerance: stop a level when the loss has not improved by ``tolerance``
            (relative) for ``patience`` iterations.

    The defaults are the accurate setting, chosen with ``scripts/benchmark`` (README, Results):
    cubic B-spline sampling in the dense-field modes, a 2-voxel control grid (a coarser grid
    costs Dice on the real inter-subject pair MNI152 <-> Colin27, whose differences are not
    smooth), update smoothing
    1.25 voxels and 60 iterations at full resolution (less costs TRE on the smooth known warps),
    and a folding-penalty weight of 5 (with the 2-voxel grid, weight 1 left up to 0.05 % of the
    voxels folded on the real pair).  Tuned on mni2mm, itk_t1 and mni_colin; checked on
    colin1mm, phantom_mni and 2d.

    Strings are accepted for the enum fields and converted once, on construction; values
    out of range raise :class:`cnnreg.errors.InputError` naming the option.
    """

    similarity: Similarity = _option(Similarity.LNCC, "similarity measure")
    regularizer: Regularizer = _option(Regularizer.DIFFUSION, "regularizer")
    weight: float = _option(1.0, "regularizer weight (>= 0)", Number(float, 0))
    jacobian_weight: float = _option(
        5.0, "weight of the negative-Jacobian (folding) penalty added to the loss; 0 = off", Number(float, 0)
    )
    window: int = _option(5, "LNCC window, voxels (odd)", Number(int, 1, odd=True))
    levels: int = _option(3, "pyramid levels", Number(int, 1, 12))
    iterations: Sequence[int] | int | None = _option(None, _iterations_help(), Schedule())
    learning_rate: float | None = _option(None, _learning_rate_help(), Number(float, 0, low_open=True))
    field_smoothing: float = _option(
        1.25, "Gaussian sigma of the field update, voxels (0 to 20)", Number(float, 0, MAX_FIELD_SMOOTHING)
    )
    control_spacing: float = _option(
        2.0, "dense-field control grid spacing, voxels (1 = every voxel)", Number(float, 1)
    )
    optimizer: Optimizer = _option(Optimizer.GLOBAL_ADAM, "dense-field optimiser")
    interpolation: Interpolation | None = _option(
        None, _interpolation_help(), values=SIMILARITY_INTERPOLATIONS, choice=Interpolation
    )
    features: int = _option(16, "phantom-mode CNN width (1 to 256)", Number(int, 1, MAX_FEATURES))
    max_cnn_voxels: int = _option(2**21, "phantom-mode working-grid size limit (voxels)", Number(int, 1))
    cnn_full_resolution_iterations: int = _option(
        0,
        "phantom mode: after the finest level (where the CNN sees the previous level's images and only the loss "
        "is evaluated at full size), this many more iterations with the CNN on the full-size images: finer "
        "detail, ~2x the cost per iteration",
        Number(int, 0),
    )
    final_learning_rate: float = _option(0.1, value=Number(float, 0, 1))
    patience: int = _option(20, value=Number(int, 1))
    tolerance: float = _option(1e-4, value=Number(float, 0))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Convert strings to enums and check every value (InputError naming the option)."""
        _check_fields(self)
        if self.interpolation is not None and not self.interpolation.differentiable:
            raise InputError(
                f"interpolation {self.interpolation.value!r} cannot sample the moving image in the similarity "
                f"term (it has no gradient); choose one of {[i.value for i in SIMILARITY_INTERPOLATIONS]}"
            )

    def interpolation_for(self, mode: Mode | str) -> Interpolation:
        """The interpolation of a run in ``mode``: the one set, or the mode's default."""
        return DEFAULT_INTERPOLATION[Mode(mode)] if self.interpolation is None else self.interpolation

    def iterations_per_level(
        self, levels: int, mode: Mode | str = Mode.INSTANCE, shapes: Sequence[Sequence[int]] | None = None
    ) -> list[int]:
        """Iterations of each of ``levels`` levels, coarse to fine: the ones set, or ``mode``'s
        default, in which a level of ``shapes`` (grid sizes, coarse to fine) with more than
        :data:`LARGE_LEVEL_VOXELS` voxels runs at most :data:`LARGE_LEVEL_ITERATIONS`."""
        iterations = DEFAULT_ITERATIONS[Mode(mode)] if self.iterations is None else self.iterations
        if isinstance(iterations, int):
            return [iterations] * levels
        values = list(iterations)
        if len(values) < levels:  # pad at the coarse end with the first value
            values = [values[0]] * (levels - len(values)) + values
        values = values[-levels:]
        if self.iterations is None and shapes is not None:
            values = [default_level_iterations(n, math.prod(shape)) for n, shape in zip(values, shapes)]
        return values


@dataclasses.dataclass
class RegistrationSettings:
    """Everything that defines a registration run (:class:`OptimizationSettings` holds the loss).

    ``refine_iterations`` (learned-refine): dense-field iterations after the prediction, at full
    resolution (a number) or per pyramid level, coarse to fine (a list: as many levels as entries).
    """

    mode: Mode = _option(
        Mode.INSTANCE,
        "instance: the displacement field is optimised directly; phantom: a CNN is "
        "optimised on this pair (no training data); learned / learned-refine: shipped network weights",
    )
    optimization: OptimizationSettings = dataclasses.field(default_factory=OptimizationSettings)
    device: str = _option(Device.AUTO.value, "auto (CUDA if available), cpu, cuda, cuda:N")
    seed: int | None = _option(
        0,
        "random seed, 0 to 2^32 - 1 (instance mode repeats exactly at the same thread count; phantom mode on several threads can differ slightly from run to run)",
        Number(int, 0, MAX_SEED),
    )
    normalization: Normalization = _option(
        Normalization.MAX,
        "intensity normalisation of both images: max (MRI), percentile, ct (both images in Hounsfield units: "
        f"window {CT_WINDOW_HU[0]:g} to {CT_WINDOW_HU[1]:g} HU), none",
    )
    affine: bool = _option(False, "affine pre-alignment with SimpleITK first (needed when the images are not aligned)")
    working_spacing: float = _option(
        0.0,
        "register on an isotropic grid of this spacing (mm) over the fixed image's extent, with the field returned "
        "on the fixed grid; axes already coarser keep their spacing; 0 = the fixed image's own grid",
        Number(float, 0),
    )
    # 9 M: a whole 1 mm head (8.7 M voxels) keeps its own grid, in about 4 GB on a CPU
    max_working_voxels: int = _option(
        9_000_000,
        "the largest grid the field is estimated on (voxels): a fixed image with more voxels is registered on "
        "the finest isotropic working grid within this many (the field still returned on the fixed grid); "
        "0 = no limit",
        Number(int, 0),
    )
    model: str | None = _option(None, "learned modes: weights file (default: the shipped weights)")
    refine_iterations: int | Sequence[int] | None = _option(
        None,
        "learned-refine: dense-field iterations after the prediction, at full resolution (N) or per "
        f"level, coarse to fine (N1,N2: as many levels as numbers) (default {DEFAULT_REFINE_ITERATIONS}, at most "
        f"{LARGE_LEVEL_ITERATIONS} on a grid of more than 2^{LARGE_LEVEL_VOXELS.bit_length() - 1} voxels)",
        Schedule(),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Convert strings to enums and check every value, here and in ``optimization``."""
        if not isinstance(self.optimization, OptimizationSettings):
            raise InputError(f"optimization must be OptimizationSettings, got {type(self.optimization).__name__}")
        _check_fields(self)
        self.optimization.validate()
        self.device = getattr(self.device, "value", self.device)
        if not isinstance(self.device, str) or not self.device:
            raise InputError(f"device must be a name like {choices(Device)} or cuda:N, got {self.device!r}")

    def refine_schedule(self, voxels: int | None = None) -> list[int]:
        """learned-refine's iterations per level, coarse to fine, on a grid of ``voxels`` voxels:
        the ones set, or the default (:data:`DEFAULT_REFINE_ITERATIONS`, one level)."""
        if self.refine_iterations is not None:
            return as_schedule(self.refine_iterations)
        return [default_level_iterations(DEFAULT_REFINE_ITERATIONS, voxels)]

    def iterations_requested(self) -> int | list[int]:
        """Iterations the mode runs: per level (phantom, instance; phantom's full-resolution stage
        last), refinement steps, or 0 (learned)."""
        if self.mode is Mode.LEARNED:
            return 0
        if self.mode is Mode.LEARNED_REFINE:
            return DEFAULT_REFINE_ITERATIONS if self.refine_iterations is None else self.refine_iterations
        iterations = self.optimization.iterations
        iterations = list(DEFAULT_ITERATIONS[self.mode]) if iterations is None else iterations
        full_resolution = self.optimization.cnn_full_resolution_iterations
        if self.mode is Mode.PHANTOM and full_resolution > 0:  # the last stage (see optimize_cnn)
            return [*as_schedule(iterations), full_resolution]
        return iterations


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named setting for one use, the same on the command line (``--preset NAME``), in the
    Python API (:meth:`settings`) and in the Slicer module (``label``).

    ``options``: :class:`RegistrationSettings` fields, with ``"optimization"`` a dict of
    :class:`OptimizationSettings` fields; everything else keeps its default."""

    name: str
    label: str
    use: str
    options: dict = dataclasses.field(default_factory=dict)

    def settings(self) -> RegistrationSettings:
        """The preset's :class:`RegistrationSettings`."""
        options = dict(self.options)
        optimization = OptimizationSettings(**options.pop("optimization", {}))
        return RegistrationSettings(**options, optimization=optimization)


#: the presets; the benchmark numbers behind them: README (Results) and docs/phantom-to-ct.md
PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "brain-mri",
            "Brain MRI",
            "T1 brain MRI pairs, affinely pre-aligned: the backend's defaults (instance mode, local NCC)",
        ),
        Preset(
            "brain-mri-quick",
            "Brain MRI, quick (learned)",
            "skull-stripped T1 near MNI152 in seconds: the shipped network, polished by 4 dense-field iterations",
            {"mode": Mode.LEARNED_REFINE, "refine_iterations": 4, "optimization": {"weight": 0.5, "window": 3}},
        ),
        Preset(
            "phantom-to-ct",
            "Phantom to CT",
            "a computational phantom in HU (XCAT family) onto a patient CT of any size and field of view with the "
            "per-pair CNN of Chen et al. 2020 (phantom mode): CT window, affine pre-alignment, a 3 mm working grid, "
            "the field on the CT's own grid",
            {
                "mode": Mode.PHANTOM,
                "normalization": Normalization.CT,
                "affine": True,
                "working_spacing": 3.0,
                "optimization": {"weight": 0.5, "jacobian_weight": 60.0},
            },
        ),
    )
}


def preset_settings(name: str) -> RegistrationSettings:
    """The :class:`RegistrationSettings` of the preset ``name`` (InputError naming the known ones)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return PRESETS[name].settings()


def _check_fields(settings) -> None:
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        default = f.default
        what = f.name.replace("_", " ")
        if f.metadata.get("choice") is not None:
            if value is not None or default is not None:  # ``values``: checked by the owner
                setattr(settings, f.name, as_choice(value, f.metadata["choice"], what))
        elif value is not None and f.metadata.get("value") is not None:
            problem = f.metadata["value"].problem(value)
            if problem:
                raise InputError(f"{what}: {problem}")
            if isinstance(f.metadata["value"], Schedule) and not isinstance(value, numbers.Integral):
                setattr(settings, f.name, [int(v) for v in value])  # one form of a per-level schedule
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise InputError(f"{what} must be True or False, got {value!r}")


# ----------------------------------------------------------------------------- command line


def _command_line_fields():
    """(dataclass, field) of every setting that is a command-line option, in --help order."""
    for owner in (RegistrationSettings, OptimizationSettings):
        for f in dataclasses.fields(owner):
            if f.metadata.get("help"):
                yield owner, f


def _flag(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


#: the attribute of a parsed namespace that lists the method options given on the command line
GIVEN_OPTIONS = "given_options"


def _recording(action_class: type[argparse.Action]) -> type[argparse.Action]:
    """``action_class`` that also records its destination in :data:`GIVEN_OPTIONS` (an option
    given on the command line wins over the preset's value, even when it equals the default)."""

    class Recording(action_class):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            given = set(getattr(namespace, GIVEN_OPTIONS, None) or ())
            setattr(namespace, GIVEN_OPTIONS, given | {self.dest})

    return Recording


_STORE, _BOOLEAN = _recording(argparse._StoreAction), _recording(argparse.BooleanOptionalAction)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The registration method's options, one per setting of :class:`RegistrationSettings` and
    :class:`OptimizationSettings` with the same defaults and bounds (read back with
    :func:`settings_from_args`), and ``--preset``; shared by every command that registers images."""
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="start from a named setting (the Slicer module's presets); options given as well override it: "
        + "; ".join(f"{p.name}: {p.use}" for p in PRESETS.values()),
    )
    parser.set_defaults(**{GIVEN_OPTIONS: set()})
    for _, f in _command_line_fields():
        help, default = f.metadata["help"], f.default
        if f.metadata.get("choice") is not None:
            allowed = f.metadata.get("values") or list(f.metadata["choice"])
            value = default.value if default is not None else None
            parser.add_argument(_flag(f), action=_STORE, default=value, choices=[a.value for a in allowed], help=help)
        elif isinstance(default, bool):
            parser.add_argument(_flag(f), action=_BOOLEAN, default=default, help=help)
        else:
            parser.add_argument(_flag(f), action=_STORE, type=f.metadata.get("value"), default=default, help=help)
    parser.add_argument(
        "--threads", type=Number(int, 1, 1024), default=None, help="CPU threads for torch (default: torch's choice)"
    )


def settings_from_args(args: argparse.Namespace) -> RegistrationSettings:
    """:class:`RegistrationSettings` from the options of :func:`add_method_arguments`: the
    preset's (``--preset``) or the defaults, with every option given on the command line on top."""
    base = preset_settings(args.preset) if getattr(args, "preset", None) else RegistrationSettings()
    given = getattr(args, GIVEN_OPTIONS, None)
    values: dict[type, dict] = {
        RegistrationSettings: {f.name: getattr(base, f.name) for f in dataclasses.fields(RegistrationSettings)},
        OptimizationSettings: dataclasses.asdict(base.optimization),
    }
    del values[RegistrationSettings]["optimization"]
    for owner, f in _command_line_fields():
        if given is None or f.name in given:  # a namespace built by hand (no record) gives every option
            values[owner][f.name] = getattr(args, f.name)
    return RegistrationSettings(
        **values[RegistrationSettings], optimization=OptimizationSettings(**values[OptimizationSettings])
    )


def command_line_arguments(settings: RegistrationSettings) -> list[str]:
    """The options of ``cnnreg register`` that give ``settings``: ``--mode`` (always, so the
    command says what it runs) and every option whose value differs from its default;
    :func:`settings_from_args` of them gives ``settings`` back."""
    settings.validate()
    arguments = []
    for owner, f in _command_line_fields():
        value = getattr(settings if owner is RegistrationSettings else settings.optimization, f.name)
        if value == f.default and f.name != "mode":
            continue
        if isinstance(f.default, bool):
            arguments.append(_flag(f) if value else "--no-" + _flag(f)[2:])
        elif isinstance(value, (list, tuple)):
            arguments += [_flag(f), ",".join(str(int(v)) for v in value)]
        elif isinstance(value, float):
            arguments += [_flag(f), repr(value)]
        else:
            arguments += [_flag(f), str(value)]
    return arguments
