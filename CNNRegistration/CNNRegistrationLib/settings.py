"""Registration settings of the Slicer module: choices, presets and the backend command line.

Pure Python (no Slicer, VTK or Qt) so that it can be imported anywhere, including by the
tests. The string values of the enums are the command-line choices of
``python -m cnnreg register`` (defined in ``cnnreg.conventions``); a test checks that the
two stay equal.
"""

from __future__ import annotations

import dataclasses
import enum


class Mode(enum.Enum):
    """How the displacement field is obtained."""

    LEARNED = "learned"
    LEARNED_REFINE = "learned-refine"
    PHANTOM = "phantom"
    INSTANCE = "instance"

    def label(self) -> str:
        """Text shown in the GUI (the parameter node wrapper calls ``label`` for combo boxes)."""
        return _LABELS[self]


class Similarity(enum.Enum):
    """Image similarity term of the loss."""

    LNCC = "lncc"
    MSE = "mse"
    PCC = "pcc"
    SSIM = "ssim"
    MI = "mi"
    PCC_SSIM = "pcc+ssim"

    def label(self) -> str:
        return _LABELS[self]


class Regularizer(enum.Enum):
    """Smoothness / plausibility term on the displacement field."""

    DIFFUSION = "diffusion"
    TOTAL_VARIATION = "tv"
    BENDING = "bending"
    NEGATIVE_JACOBIAN = "negjac"

    def label(self) -> str:
        return _LABELS[self]


class Interpolation(enum.Enum):
    """How the moving image is sampled: in the similarity term and in the warped volume."""

    LINEAR = "linear"
    CUBIC = "cubic"

    def label(self) -> str:
        return _LABELS[self]


class Device(enum.Enum):
    """Compute device of the backend process (``auto``: CUDA when available, else CPU)."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Mode.LEARNED: "Learned (one pass of a trained network)",
    Mode.LEARNED_REFINE: "Learned + instance refinement",
    Mode.PHANTOM: "Phantom CNN (no training, optimised on this pair)",
    Mode.INSTANCE: "Instance optimisation (dense field)",
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
    Device.AUTO: "Automatic (GPU if available)",
    Device.CPU: "CPU",
    Device.CUDA: "CUDA GPU",
}


@dataclasses.dataclass
class RegistrationSettings:
    """Options of one registration run, as passed to ``python -m cnnreg register``.

    ``weight`` is the regularization weight (dimensionless, 0 to 100). ``iterations`` is
    per pyramid level for ``phantom`` and ``instance`` (``--iterations``), the number of
    refinement iterations for ``learned-refine`` (``--refine-iterations``), unused for
    ``learned``; 0 leaves it to the backend's default.  ``interpolation`` samples the moving
    image in the similarity term and in the warped volume (cubic: more accurate sub-voxel
    alignment at about 1.5x the run time).
    """

    mode: Mode = Mode.INSTANCE
    similarity: Similarity = Similarity.LNCC
    regularizer: Regularizer = Regularizer.DIFFUSION
    weight: float = 1.0
    iterations: int = 0
    interpolation: Interpolation = Interpolation.LINEAR
    device: Device = Device.AUTO
    seed: int | None = None
    keepTemporaryFiles: bool = False

    def __post_init__(self):
        # Accept the command-line strings as well as the enum members.
        self.mode = Mode(self.mode)
        self.similarity = Similarity(self.similarity)
        self.regularizer = Regularizer(self.regularizer)
        self.interpolation = Interpolation(self.interpolation)
        self.device = Device(self.device)
        if not 0.0 <= float(self.weight) <= 100.0:
            raise ValueError(f"regularization weight must be within [0, 100], got {self.weight}")
        if int(self.iterations) < 0:
            raise ValueError(f"iterations must be >= 0 (0: backend default), got {self.iterations}")

    def commandLineArguments(self) -> list:
        """The option part of the ``register`` command (inputs and ``--out`` are added by the caller)."""
        arguments = [
            "--mode",
            self.mode.value,
            "--similarity",
            self.similarity.value,
            "--regularizer",
            self.regularizer.value,
            "--weight",
            repr(float(self.weight)),
            "--interpolation",
            self.interpolation.value,
            "--device",
            self.device.value,
        ]
        if int(self.iterations) > 0 and self.mode is not Mode.LEARNED:
            option = "--refine-iterations" if self.mode is Mode.LEARNED_REFINE else "--iterations"
            arguments += [option, str(int(self.iterations))]
        if self.seed is not None:
            arguments += ["--seed", str(int(self.seed))]
        return arguments


#: Named settings that fill the GUI in one click. Values are keyword arguments of
#: :class:`RegistrationSettings`.
PRESETS = {
    # T1 brain MRI, affinely pre-aligned (as FAIM/VoxelMorph assume): dense-field instance
    # optimisation with local NCC (robust to intensity non-uniformity) and the backend's
    # default schedule.  Switch to learned-refine once trained weights ship with the extension.
    "Brain MRI": dict(
        mode=Mode.INSTANCE,
        similarity=Similarity.LNCC,
        regularizer=Regularizer.DIFFUSION,
        weight=1.0,
        iterations=60,
    ),
    # XCAT-like phantom to patient CT (Chen et al. 2020): no training, the CNN is
    # optimised on the pair with PCC+SSIM and a gradient-L2 weight of 0.8 (iterations
    # per pyramid level; the paper ran 8000 at full resolution on a GPU).
    "Phantom to CT": dict(
        mode=Mode.PHANTOM,
        similarity=Similarity.PCC_SSIM,
        regularizer=Regularizer.DIFFUSION,
        weight=0.8,
        iterations=300,
    ),
}


def presetSettings(name: str) -> RegistrationSettings:
    """Settings of a named preset (``KeyError`` listing the known names otherwise)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return RegistrationSettings(**PRESETS[name])
