"""Registration settings of the Slicer module: what the panel sets, presets, the command line.

Pure Python (no Slicer, VTK or Qt). The choices, their labels, defaults and the mapping to
``python -m cnnreg register`` options come from the backend's torch-free ``cnnreg.settings``
(the one module of the backend the Slicer glue imports); this module only adds what the
panel needs: a flat settings object with camelCase names, the weight range of its slider,
"0 iterations = backend default", and named presets.
"""

from __future__ import annotations

import dataclasses

from cnnreg import settings as backend
from cnnreg.settings import SIMILARITY_INTERPOLATIONS, Device, Interpolation, Mode, Regularizer, Similarity

__all__ = [
    "MODE_DEFAULT",
    "PRESETS",
    "SIMILARITY_INTERPOLATIONS",
    "Device",
    "Interpolation",
    "Mode",
    "RegistrationSettings",
    "Regularizer",
    "Similarity",
    "presetSettings",
]

_DEFAULTS = backend.RegistrationSettings()

#: the panel's interpolation choice that leaves it to the mode (``interpolation=None``)
MODE_DEFAULT = "default"

#: range of the panel's regularization-weight slider
WEIGHT_RANGE = (0.0, 100.0)


@dataclasses.dataclass
class RegistrationSettings:
    """Options of one registration run as the panel sets them.

    ``weight`` is the regularization weight (dimensionless, within :data:`WEIGHT_RANGE`);
    ``window`` the side of the local-NCC window, voxels (odd; used by the LNCC similarity).
    ``iterations`` is per pyramid level for ``phantom`` and ``instance`` (``--iterations``), the
    number of refinement iterations for ``learned-refine`` (``--refine-iterations``), unused for
    ``learned``; 0 leaves it to the backend's default.  ``fullResolutionIterations`` (phantom
    only, ``--cnn-full-resolution-iterations``): iterations after the finest level with the CNN
    on the full-size images (finer detail, ~2x the cost per iteration; 0 = none).
    ``interpolation`` samples the moving
    image in the similarity term and in the warped volume (one of
    :data:`SIMILARITY_INTERPOLATIONS`, or None / :data:`MODE_DEFAULT` for the mode's default:
    cubic B-spline for instance, learned-refine and phantom, linear for learned). Defaults
    are the backend's.
    """

    mode: Mode = _DEFAULTS.mode
    similarity: Similarity = _DEFAULTS.optimization.similarity
    regularizer: Regularizer = _DEFAULTS.optimization.regularizer
    weight: float = _DEFAULTS.optimization.weight
    window: int = _DEFAULTS.optimization.window
    iterations: int = 0
    fullResolutionIterations: int = _DEFAULTS.optimization.cnn_full_resolution_iterations
    interpolation: Interpolation | None = _DEFAULTS.optimization.interpolation
    device: Device = Device(_DEFAULTS.device)
    seed: int | None = None
    keepTemporaryFiles: bool = False

    def __post_init__(self):
        # Accept the command-line strings as well as the enum members.
        self.mode = Mode(self.mode)
        self.similarity = Similarity(self.similarity)
        self.regularizer = Regularizer(self.regularizer)
        self.interpolation = None if self.interpolation in (None, MODE_DEFAULT) else Interpolation(self.interpolation)
        self.device = Device(self.device)
        if not WEIGHT_RANGE[0] <= float(self.weight) <= WEIGHT_RANGE[1]:
            raise ValueError(f"regularization weight must be within {list(WEIGHT_RANGE)}, got {self.weight}")
        if int(self.iterations) < 0:
            raise ValueError(f"iterations must be >= 0 (0: backend default), got {self.iterations}")
        if int(self.fullResolutionIterations) < 0:
            raise ValueError(f"full-resolution iterations must be >= 0, got {self.fullResolutionIterations}")
        self.backendSettings()  # the backend's own checks (e.g. interpolation allowed in the similarity)

    def backendSettings(self) -> backend.RegistrationSettings:
        """The backend's settings for this run (``cnnreg.settings.RegistrationSettings``)."""
        iterations = int(self.iterations) or None
        optimization = backend.OptimizationSettings(
            similarity=self.similarity,
            regularizer=self.regularizer,
            weight=float(self.weight),
            window=int(self.window),
            interpolation=self.interpolation,
            iterations=iterations if self.mode in (Mode.INSTANCE, Mode.PHANTOM) else None,
            cnn_full_resolution_iterations=int(self.fullResolutionIterations) if self.mode is Mode.PHANTOM else 0,
        )
        run = dict(mode=self.mode, optimization=optimization, device=self.device.value)
        if self.mode is Mode.LEARNED_REFINE and iterations:
            run["refine_iterations"] = iterations
        if self.seed is not None:
            run["seed"] = int(self.seed)
        return backend.RegistrationSettings(**run)

    def commandLineArguments(self) -> list:
        """The option part of the ``register`` command (inputs and ``--out`` are added by the caller):
        the options whose values differ from the backend's defaults."""
        return backend.command_line_arguments(self.backendSettings())


def _preset(mode: Mode, **changes) -> dict:
    """Every setting a preset fills (so that choosing one resets what another set): local NCC
    with window 5, diffusion regularization of weight 1, the mode's iterations and
    interpolation, no full-resolution stage; then ``changes``."""
    values = dict(
        mode=mode,
        similarity=Similarity.LNCC,
        regularizer=Regularizer.DIFFUSION,
        weight=1.0,
        window=5,
        iterations=0,
        fullResolutionIterations=0,
        interpolation=MODE_DEFAULT,
    )
    unknown = set(changes) - set(values)
    if unknown:
        raise KeyError(f"not preset settings: {sorted(unknown)}")
    return {**values, **changes}


#: Named settings that fill the panel in one click. Values are keyword arguments of
#: :class:`RegistrationSettings`.
PRESETS = {
    # T1 brain MRI, affinely pre-aligned (as FAIM/VoxelMorph assume): dense-field instance
    # optimisation with local NCC (robust to intensity non-uniformity) and the backend's
    # accurate defaults (cubic B-spline sampling, 2-voxel control grid, 100/60/60 iterations),
    # the setting that led the benchmark on the brain cases (README, Results).
    "Brain MRI": _preset(Mode.INSTANCE),
    # The same images in seconds: the shipped network's prediction polished by 4 dense-field
    # iterations at full resolution with a 3-voxel LNCC window and weight 0.5 (the benchmark's
    # learned-refine: mni2mm 0.9705 in 2.2 s against the fast instance setting's 0.9695 in
    # 8.0 s; itk_t1 0.944 like the Brain MRI preset in a ninth of its time; on the real pair
    # MNI152 -> Colin27 0.761 against Brain MRI's 0.797, README, Results).  For skull-stripped
    # T1 near MNI152 (the network's training domain); otherwise use Brain MRI.
    "Brain MRI, quick (learned)": _preset(Mode.LEARNED_REFINE, weight=0.5, window=3, iterations=4),
    # XCAT-like phantom to patient CT (Chen et al. 2020): no training, the CNN is optimised on
    # the pair with the backend's phantom schedule (100/60/80 iterations on a working grid of
    # <= 128^3) and 120 more with the CNN on the full-size images: a phantom warped to another
    # anatomy needs that finer field.  Local NCC rather than the paper's PCC+SSIM (still a
    # choice of the panel): on the benchmark's phantom-to-image case phantom_mni it reached 0.793
    # against 0.773 (demons 0.788), on the real pair mni_colin 0.781 against 0.771 (README,
    # Results: phantom-long is this preset).  The paper ran 8000 iterations on a GPU.
    "Phantom to CT": _preset(Mode.PHANTOM, fullResolutionIterations=120),
}


def presetSettings(name: str) -> RegistrationSettings:
    """Settings of a named preset (``KeyError`` listing the known names otherwise)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return RegistrationSettings(**PRESETS[name])
