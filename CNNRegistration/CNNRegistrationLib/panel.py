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
from cnnreg.settings import (
    SIMILARITY_INTERPOLATIONS,
    Device,
    Interpolation,
    Mode,
    Normalization,
    Regularizer,
    Similarity,
)

__all__ = [
    "MODE_DEFAULT",
    "PRESETS",
    "SIMILARITY_INTERPOLATIONS",
    "Device",
    "Interpolation",
    "Mode",
    "Normalization",
    "PanelSettings",
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
class PanelSettings:
    """Options of one registration run as the panel sets them.

    ``weight`` is the regularization weight (dimensionless, within :data:`WEIGHT_RANGE`);
    ``jacobianWeight`` the weight of the folding (negative-Jacobian) penalty;
    ``window`` the side of the local-NCC window, voxels (odd; used by the LNCC similarity).
    ``iterations`` is per pyramid level for ``phantom`` and ``instance`` (``--iterations``), the
    number of refinement iterations for ``learned-refine`` (``--refine-iterations``), unused for
    ``learned``; 0 leaves it to the backend's default.  ``fullResolutionIterations`` (phantom
    only, ``--cnn-full-resolution-iterations``): iterations after the finest level with the CNN
    on the full-size images (finer detail, ~2x the cost per iteration; 0 = none).
    ``interpolation`` samples the moving
    image in the similarity term and in the warped volume (one of
    :data:`SIMILARITY_INTERPOLATIONS`, or None / :data:`MODE_DEFAULT` for the mode's default:
    cubic B-spline for instance, learned-refine and phantom, linear for learned).
    ``normalization`` (e.g. ``ct`` for images in HU), ``affine`` (pre-alignment) and
    ``workingSpacing`` (mm of the grid the field is estimated on; 0 = the fixed grid) are the
    backend's ``normalization``, ``affine`` and ``working_spacing``. Defaults are the backend's.
    """

    mode: Mode = _DEFAULTS.mode
    similarity: Similarity = _DEFAULTS.optimization.similarity
    regularizer: Regularizer = _DEFAULTS.optimization.regularizer
    weight: float = _DEFAULTS.optimization.weight
    jacobianWeight: float = _DEFAULTS.optimization.jacobian_weight
    window: int = _DEFAULTS.optimization.window
    iterations: int = 0
    fullResolutionIterations: int = _DEFAULTS.optimization.cnn_full_resolution_iterations
    interpolation: Interpolation | None = _DEFAULTS.optimization.interpolation
    normalization: Normalization = _DEFAULTS.normalization
    affine: bool = _DEFAULTS.affine
    workingSpacing: float = _DEFAULTS.working_spacing
    device: Device = Device(_DEFAULTS.device)
    seed: int | None = None
    keepTemporaryFiles: bool = False

    def __post_init__(self):
        # Accept the command-line strings as well as the enum members.
        self.mode = Mode(self.mode)
        self.normalization = Normalization(self.normalization)
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
        """The backend's settings for this run (``cnnreg.settings.PanelSettings``)."""
        iterations = int(self.iterations) or None
        optimization = backend.OptimizationSettings(
            similarity=self.similarity,
            regularizer=self.regularizer,
            weight=float(self.weight),
            jacobian_weight=float(self.jacobianWeight),
            window=int(self.window),
            interpolation=self.interpolation,
            iterations=iterations if self.mode in (Mode.INSTANCE, Mode.PHANTOM) else None,
            cnn_full_resolution_iterations=int(self.fullResolutionIterations) if self.mode is Mode.PHANTOM else 0,
        )
        run = dict(
            mode=self.mode,
            optimization=optimization,
            device=self.device.value,
            normalization=self.normalization,
            affine=bool(self.affine),
            working_spacing=float(self.workingSpacing),
        )
        if self.mode is Mode.LEARNED_REFINE and iterations:
            run["refine_iterations"] = iterations
        if self.seed is not None:
            run["seed"] = int(self.seed)
        return backend.RegistrationSettings(**run)

    def commandLineArguments(self) -> list:
        """The option part of the ``register`` command (inputs and ``--out`` are added by the caller):
        the options whose values differ from the backend's defaults."""
        return backend.command_line_arguments(self.backendSettings())


def panelValues(settings: backend.RegistrationSettings) -> dict:
    """The panel's values (keyword arguments of :class:`PanelSettings`) that give the
    backend's ``settings`` back through :meth:`PanelSettings.backendSettings`."""
    optimization = settings.optimization
    iterations = 0
    if settings.mode is Mode.LEARNED_REFINE and settings.refine_iterations != _DEFAULTS.refine_iterations:
        iterations = int(settings.refine_iterations)
    elif settings.mode in (Mode.INSTANCE, Mode.PHANTOM) and optimization.iterations is not None:
        iterations = int(optimization.iterations)  # the panel sets one number for every level
    return dict(
        mode=settings.mode,
        similarity=optimization.similarity,
        regularizer=optimization.regularizer,
        weight=optimization.weight,
        jacobianWeight=optimization.jacobian_weight,
        window=optimization.window,
        iterations=iterations,
        fullResolutionIterations=optimization.cnn_full_resolution_iterations,
        interpolation=optimization.interpolation.value if optimization.interpolation else MODE_DEFAULT,
        normalization=settings.normalization,
        affine=settings.affine,
        workingSpacing=settings.working_spacing,
    )


#: Named settings that fill the panel in one click: the backend's presets
#: (``cnnreg.settings.PRESETS``, also ``python -m cnnreg register --preset NAME``) by their
#: label, as keyword arguments of :class:`PanelSettings`.  Every panel setting is filled,
#: so choosing one preset resets what another set.
PRESETS = {preset.label: panelValues(preset.settings()) for preset in backend.PRESETS.values()}


#: the panel's settings the module's parameter node holds, under the same names (the panel's runs
#: keep the default seed)
PARAMETER_NODE_FIELDS = tuple(f.name for f in dataclasses.fields(PanelSettings) if f.name != "seed")


def settingsFrom(values) -> PanelSettings:
    """The :class:`PanelSettings` held by ``values`` (e.g. the module's parameter node), read
    by the names of :data:`PARAMETER_NODE_FIELDS`."""
    return PanelSettings(**{name: getattr(values, name) for name in PARAMETER_NODE_FIELDS})


def presetSettings(name: str) -> PanelSettings:
    """Settings of a named preset (``KeyError`` listing the known names otherwise)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PanelSettings(**PRESETS[name])
