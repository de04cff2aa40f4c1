"""Training settings: everything that defines a training run, and its config-file form.

A JSON/YAML ``--config`` file of ``python -m cnnreg train`` holds :class:`TrainSettings`' field
names; :func:`settings_from_dict` checks its keys and nested sections (``augment``, ``synthetic``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..checkpoint import plain
from ..errors import InputError
from ..networks import SHORT_NAMES
from ..settings import Normalization, Regularizer, Similarity, choices
from .augment import AugmentSettings
from .synth import SynthSettings

DEFAULT_WORKING_SHAPE = {2: (128, 128), 3: (64, 64, 64)}


@dataclass
class TrainSettings:
    """Everything that defines a training run (JSON config keys = these field names).

    Attributes:
        architecture: ``faim`` or ``voxelmorph`` (or a class name of cnnreg.networks).
        network: extra constructor keyword arguments of the network (e.g. ``{"features": 32}``).
        diffeomorphic: the network outputs a velocity integrated by scaling and squaring.
        working_shape: grid every image is resampled to (default 64^3 in 3D, 128^2 in 2D).
        normalization: intensity normalisation of the images (also used at inference).
        similarity, window: similarity measure and LNCC window (voxels, odd).
        regularizer, weight: field regularizer and its weight.
        jacobian_weight: weight of the mean negative-Jacobian penalty (0 = off).
        dice_weight: weight of ``1 - soft Dice`` when every training image has labels.
        cycle, cycle_weight: cycle-consistent training and the weight of its term.
        refine, refine_network, alternate_every: train a refinement network alternately with
            the base network (``refine_network`` = its FAIMNet kwargs), switching every
            ``alternate_every`` epochs.
        epochs, steps_per_epoch, batch_size, learning_rate: optimisation (Adam); batch per process.
        final_learning_rate: learning rate of the last epoch, reached by a cosine decay over the
            epochs (set at the start of each epoch, so a resumed run follows the same schedule);
            None = constant.
        grad_clip: clip the gradient norm (0 = off).
        val_count: real images held out for validation when no validation images are given
            (None = 20 % of them when there are at least 3, else none: the validation pairs are
            then fresh deformations of training images).
        val_pairs_per_image: deformed-copy validation pairs per validation image.
        val_cross_pairs: also validate on every ordered pair of different validation images and,
            with ``val_cross_train``, of each validation image with each training image (both ways).
        seed, device: random seed; ``auto``, ``cpu``, ``cuda[:N]``.
        augment: :class:`cnnreg.training.augment.AugmentSettings` (a dict in JSON).
        synthetic: :class:`cnnreg.training.synth.SynthSettings` (a dict in JSON): draw every training
            pair from :class:`cnnreg.training.synth.SynthPairSampler` (pairs with a known field; the
            training images then need label maps) instead of :class:`cnnreg.training.augment.PairSampler`.
        supervised_weight: weight of the supervised term, the mean squared error (voxels^2)
            between the predicted and the true field over the fixed image's foreground, on
            pairs with a known field.
        warmup_steps: the first steps train on the supervised term alone (needs ``synthetic``).
    """

    architecture: str = "faim"
    network: dict = field(default_factory=dict)
    diffeomorphic: bool = False
    working_shape: list[int] | None = None
    normalization: str = Normalization.MAX.value
    similarity: str = Similarity.LNCC.value
    window: int = 9
    regularizer: str = Regularizer.DIFFUSION.value
    weight: float = 1.0
    jacobian_weight: float = 0.1
    dice_weight: float = 0.0
    cycle: bool = False
    cycle_weight: float = 1.0
    refine: bool = False
    refine_network: dict = field(default_factory=lambda: {"filters": 4, "features": 16, "levels": 2})
    alternate_every: int = 1
    epochs: int = 50
    steps_per_epoch: int = 100
    batch_size: int = 2
    learning_rate: float = 1e-4
    final_learning_rate: float | None = None
    grad_clip: float = 0.0
    val_count: int | None = None
    val_pairs_per_image: int = 2
    val_cross_pairs: bool = True
    val_cross_train: bool = True
    seed: int = 0
    device: str = "auto"
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    synthetic: SynthSettings | None = None
    supervised_weight: float = 0.0
    warmup_steps: int = 0

    def validate(self, ndim: int | None = None) -> None:
        """Raise InputError for an impossible setting (names the setting and the value)."""
        for value, enum_type, what in (
            (self.similarity, Similarity, "similarity"),
            (self.regularizer, Regularizer, "regularizer"),
            (self.normalization, Normalization, "normalization"),
        ):
            try:
                enum_type(value)
            except ValueError:
                raise InputError(f"unknown {what} {value!r}; choose one of {choices(enum_type)}") from None
        name = SHORT_NAMES.get(self.architecture, self.architecture)
        if name not in ("FAIMNet", "VoxelMorphNet"):
            raise InputError(f"unknown architecture {self.architecture!r}; choose faim or voxelmorph")
        for what in ("epochs", "steps_per_epoch", "batch_size", "alternate_every", "val_pairs_per_image"):
            value = getattr(self, what)
            if not isinstance(value, int) or value < (0 if what == "val_pairs_per_image" else 1):
                raise InputError(f"{what} must be a positive integer, got {value!r}")
        if (self.warmup_steps > 0 or self.supervised_weight > 0) and self.synthetic is None:
            raise InputError("warmup_steps and supervised_weight need pairs with a known field (synthetic settings)")
        if self.warmup_steps < 0:
            raise InputError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for what in ("weight", "jacobian_weight", "dice_weight", "cycle_weight", "grad_clip", "supervised_weight"):
            if getattr(self, what) < 0:
                raise InputError(f"{what} must be >= 0, got {getattr(self, what)}")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.final_learning_rate is not None and not self.final_learning_rate > 0:
            raise InputError(f"final_learning_rate must be > 0, got {self.final_learning_rate}")
        if self.window < 1 or self.window % 2 == 0:
            raise InputError(f"window must be a positive odd number of voxels, got {self.window}")
        if self.working_shape is not None:
            if ndim is not None and len(self.working_shape) != ndim:
                raise InputError(
                    f"working_shape {list(self.working_shape)} has {len(self.working_shape)} axes but the images are {ndim}D"
                )
            if min(self.working_shape) < 8:
                raise InputError(f"working_shape {list(self.working_shape)} is too small (at least 8 voxels per axis)")

    def shape_for(self, ndim: int) -> tuple[int, ...]:
        return tuple(int(n) for n in (self.working_shape or DEFAULT_WORKING_SHAPE[ndim]))

    def to_dict(self) -> dict:
        return plain(asdict(self))


def _nested_settings(cls, values, what: str):
    """``cls(**values)`` for a dict (InputError naming unknown keys or bad values); other values as they are."""
    if not isinstance(values, dict):
        return values
    valid = {f.name for f in fields(cls)}
    bad = sorted(set(values) - valid)
    if bad:
        raise InputError(f"unknown {what} setting(s) {bad}; valid keys: {sorted(valid)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise InputError(f"bad {what} settings: {error}") from None


def settings_from_dict(data: dict) -> TrainSettings:
    """TrainSettings from a (config-file) dict; unknown keys raise InputError."""
    known = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"unknown training setting(s) {unknown}; valid keys: {sorted(known)}")
    values = dict(data)
    for key, cls in (("augment", AugmentSettings), ("synthetic", SynthSettings)):
        if key in values:
            values[key] = _nested_settings(cls, values[key], key)
    return TrainSettings(**values)
