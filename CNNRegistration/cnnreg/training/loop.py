"""Train a learned registration network (FAIM- or VoxelMorph-style), unsupervised.

Command line: :mod:`cnnreg.training.cli` (``python -m cnnreg train``).  As a function: :func:`train` on in-memory :class:`cnnreg.training.augment.Sample` lists, or
:func:`train_from_files`.

Loss per pair (``u`` on the fixed grid, voxels; :mod:`cnnreg.settings`)::

    similarity_loss(fixed, warp(moving, u))                       (default LNCC, 9-voxel window)
    + weight x regularization(u)                                  (default diffusion)
    + jacobian_weight x negative_jacobian(u)                      (FAIM's folding penalty; mean)
    + dice_weight x (1 - soft Dice(fixed labels, warp(one-hot moving labels, u)))   (optional)
    + cycle_weight x similarity_loss(x, x warped there and back)  (cycle-consistent training)

Cycle-consistent training registers both directions (one batched forward pass) and adds
the similarity of each image with itself warped by the composed fields (there and back).
The refinement variant trains a :class:`~cnnreg.networks.CascadeNet` alternately: for
``alternate_every`` epochs the base network alone (loss on its own field), then as many the
refinement network with the base frozen (loss on the composed field), and so on.

Pairs are drawn on the fly (:class:`cnnreg.training.augment.PairSampler`): different images, and
images vs randomly deformed copies of themselves, with intensity augmentation; all images
are resampled to the working grid.  Each epoch: validation on held-out pairs (Dice of
labels warped with nearest neighbour when labels exist, similarity, folding), a checkpoint
``<out>.last.pt`` (with optimizer state, for ``--resume``), ``<out>`` when validation
improves, and a training-curve picture ``<out stem>_curve.png``.  Progress: JSON lines on
standard output (events ``start``, ``progress``, ``epoch``, ``done``) and a bar on standard
error when it is a terminal, as for ``register``.

Distributed data parallel: under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) each process
initialises ``torch.distributed`` (gloo on CPU, NCCL on CUDA), wraps the network(s) in
``DistributedDataParallel``, draws its own pairs (random stream seeded by rank) and
validates its share of the validation pairs; only rank 0 writes files and progress.
``batch_size`` is per process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import load_checkpoint, plain, save_checkpoint
from ..device import describe_device, seed_everything
from ..errors import InputError
from ..image import expand_paths
from ..jacobian import folding_fraction, jacobian_determinant
from ..losses import similarity_loss, similarity_options
from ..networks import SHORT_NAMES, CascadeNet, build_network, parameter_count
from ..spatial import compose, warp
from .augment import PairBatch, PairSampler, Sample, validation_pairs
from .dataset import index_labels, load_samples
from .distributed import Distributed, all_reduce_sum, init_distributed
from .losses import field_error, registration_loss
from .settings import TrainSettings
from .synth import SynthPairSampler

#: loss terms reported per epoch (averaged over the steps and processes that have them)
_TERMS = ("loss", "similarity_loss", "regularization", "negative_jacobian", "dice", "cycle", "field_error")


@dataclass
class Trainable:
    """The network being trained and its (possibly DDP-wrapped) parts.

    ``network`` is the plain module (checkpointed, validated); ``base``/``refiner`` are the
    modules called in training steps (``DistributedDataParallel`` wrappers under DDP)."""

    network: nn.Module
    base: nn.Module
    refiner: nn.Module | None = None

    @property
    def is_cascade(self) -> bool:
        return isinstance(self.network, CascadeNet)


def forward_field(parts: Trainable, pair: torch.Tensor, phase: str = "base") -> torch.Tensor:
    """Field for ``pair`` ``(N, 2, *S)``: the base network's, or in the ``refine`` phase of a
    cascade the refined field with the base network frozen."""
    if not parts.is_cascade or phase == "base":
        return parts.base(pair)
    with torch.no_grad():
        u0 = parts.network.base(pair)
    return parts.network.refine(pair, u0, refiner=parts.refiner)


def training_step(
    parts: Trainable, batch: PairBatch, settings: TrainSettings, phase: str = "base", warmup: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one batch (no backward).  With ``settings.cycle`` both directions are registered
    in one forward pass and the there-and-back similarity is added (``terms["cycle"]``).
    ``warmup``: the supervised field error alone (the batch must carry ``true_field``); else the
    supervised term is added with ``settings.supervised_weight`` when the batch has a true field."""
    if warmup and batch.true_field is None:
        raise ValueError("the supervised warm-up needs pairs with a known field")
    fixed, moving = batch.fixed, batch.moving
    fixed_labels, moving_labels = batch.fixed_labels, batch.moving_labels
    if settings.cycle:
        fixed, moving = torch.cat([batch.fixed, batch.moving]), torch.cat([batch.moving, batch.fixed])
        if fixed_labels is not None:
            fixed_labels = torch.cat([batch.fixed_labels, batch.moving_labels])
            moving_labels = torch.cat([batch.moving_labels, batch.fixed_labels])
    u = forward_field(parts, torch.cat([moving, fixed], dim=1), phase)
    if warmup:
        error = field_error(u, batch.true_field, batch.foreground)
        return error, {"field_error": error}
    total, terms = registration_loss(settings, u, fixed, moving, fixed_labels, moving_labels)
    if batch.true_field is not None and settings.supervised_weight > 0 and not settings.cycle:
        error = field_error(u, batch.true_field, batch.foreground)
        total = total + settings.supervised_weight * error
        terms["field_error"] = error
    if settings.cycle:
        n = batch.fixed.shape[0]
        back = torch.cat([u[n:], u[:n]])  # the opposite direction of each item
        there_and_back = warp(moving, compose(u, back))
        options = similarity_options(settings.similarity, settings.window)
        cycle = similarity_loss(settings.similarity, moving, there_and_back, **options)
        total = total + settings.cycle_weight * cycle
        terms["cycle"] = cycle
    return total, terms


# ---------------------------------------------------------------------------------------
# distributed data parallel
# ---------------------------------------------------------------------------------------


def wrap_parallel(network: nn.Module, info: Distributed, device: torch.device) -> Trainable:
    """The :class:`Trainable` for ``network`` (already on ``device``), DDP-wrapped when distributed."""

    def wrap(module: nn.Module) -> nn.Module:
        if not info.enabled:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    if isinstance(network, CascadeNet):
        return Trainable(network, wrap(network.base), wrap(network.refiner))
    return Trainable(network, wrap(network))


# ---------------------------------------------------------------------------------------
# network, validation, plotting
# ---------------------------------------------------------------------------------------


def build_training_network(settings: TrainSettings, ndim: int) -> nn.Module:
    """The network described by ``settings`` (a CascadeNet when ``settings.refine``)."""
    name = SHORT_NAMES.get(settings.architecture, settings.architecture)
    config = {"ndim": ndim, "diffeomorphic": settings.diffeomorphic, **settings.network}
    try:
        if not settings.refine:
            return build_network(name, config)
        refiner = {
            "ndim": ndim,
            "in_channels": 2 + ndim,
            "diffeomorphic": settings.diffeomorphic,
            **settings.refine_network,
        }
        return CascadeNet({"architecture": name, "config": config}, {"architecture": "FAIMNet", "config": refiner})
    except (TypeError, ValueError, KeyError) as error:
        raise InputError(f"cannot build the {settings.architecture} network from {config}: {error}") from None


def validate(
    network: nn.Module, pairs: Sequence[PairBatch], settings: TrainSettings, info: Distributed, device: torch.device
) -> dict:
    """Validation metrics over ``pairs`` (this rank's share; summed over ranks): mean loss,
    similarity loss, Dice after/before (labels warped with nearest neighbour; pairs with labels
    only), folding percent, and on pairs with a known field the mean end-point error (voxels,
    over the pair's foreground).  Dice / error values are None without such pairs."""
    from ..evaluate import dice_per_label

    network.eval()
    sums = [0.0] * 9  # loss, similarity, folding, pairs, dice, dice_before, labelled pairs, error, known pairs
    with torch.no_grad():
        for pair in list(pairs)[info.rank :: info.world_size]:
            pair = pair.to(device)
            u = network(torch.cat([pair.moving, pair.fixed], dim=1))
            total, terms = registration_loss(settings, u, pair.fixed, pair.moving)
            sums[0] += float(total)
            sums[1] += float(terms["similarity_loss"])
            sums[2] += 100.0 * folding_fraction(jacobian_determinant(u.double()))
            sums[3] += 1
            if pair.true_field is not None:
                length = (u - pair.true_field).pow(2).sum(1, keepdim=True).sqrt()
                weights = pair.foreground if pair.foreground is not None else torch.ones_like(length)
                sums[7] += float((length * weights).sum() / weights.sum().clamp_min(1.0))
                sums[8] += 1
            if pair.fixed_labels is not None and pair.moving_labels is not None:
                fixed_labels = pair.fixed_labels[0, 0].round().long().cpu().numpy()
                warped = warp(pair.moving_labels, u, interpolation="nearest")[0, 0].round().long().cpu().numpy()
                before = pair.moving_labels[0, 0].round().long().cpu().numpy()
                try:
                    after_dice = dice_per_label(fixed_labels, warped)
                    before_dice = dice_per_label(fixed_labels, before)
                except InputError:
                    continue
                sums[4] += float(np.nanmean(list(after_dice.values())))
                sums[5] += float(np.nanmean(list(before_dice.values())))
                sums[6] += 1
    sums = all_reduce_sum(sums, info, device)
    count, labelled = max(sums[3], 1), sums[6]
    return {
        "val_loss": sums[0] / count,
        "val_similarity_loss": sums[1] / count,
        "val_folding_percent": sums[2] / count,
        "val_pairs": int(sums[3]),
        "val_dice": sums[4] / labelled if labelled else None,
        "val_dice_before": sums[5] / labelled if labelled else None,
        "val_end_point_error": sums[7] / sums[8] if sums[8] else None,
    }


def plot_history(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Training curve (loss per epoch; validation Dice on a second axis) as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(epochs, [h["train_loss"] for h in history], "o-", label="training loss")
    axis.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation loss")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    lines, names = axis.get_legend_handles_labels()
    if any(h.get("val_dice") is not None for h in history):
        dice_axis = axis.twinx()
        dice_axis.plot(epochs, [h.get("val_dice") for h in history], "^-", color="tab:green", label="validation Dice")
        dice_axis.set_ylabel("Dice")
        more_lines, more_names = dice_axis.get_legend_handles_labels()
        lines, names = lines + more_lines, names + more_names
    axis.legend(lines, names, loc="best", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def output_paths(out: str | os.PathLike) -> dict[str, str]:
    """``best`` = ``out``; ``last`` = ``<out stem>.last.pt``; ``curve`` = ``<out stem>_curve.png``."""
    out = os.path.abspath(os.fspath(out))
    stem = out[: -len(".pt")] if out.endswith(".pt") else out
    return {"best": out, "last": stem + ".last.pt", "curve": stem + "_curve.png"}


def epoch_learning_rate(settings: TrainSettings, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based): cosine from ``learning_rate`` at the first epoch to
    ``final_learning_rate`` at the last (constant when that is None)."""
    if settings.final_learning_rate is None or settings.epochs <= 1:
        return settings.learning_rate
    t = min(epoch, settings.epochs - 1) / (settings.epochs - 1)
    final = settings.final_learning_rate
    return final + (settings.learning_rate - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def _better(metrics: dict, best: dict | None) -> bool:
    if best is None:
        return True
    if metrics.get("val_dice") is not None and best.get("val_dice") is not None:
        return metrics["val_dice"] > best["val_dice"]
    return metrics["val_loss"] < best["val_loss"]


# ---------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------


def train(
    settings: TrainSettings,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample] | None,
    out: str | os.PathLike,
    resume: str | os.PathLike | None = None,
    callback: Callable[[dict], None] | None = None,
    info: Distributed | None = None,
    device: torch.device | None = None,
    val_pairs: Sequence[PairBatch] | None = None,
    time_limit: float | None = None,
    initial_weights: str | os.PathLike | None = None,
    until_epoch: int | None = None,
) -> dict:
    """Train and write checkpoints (see the module docstring); returns a summary dict.

    Args:
        settings: training settings.
        train_samples: images on the working grid (labels as consecutive indices, see
            :func:`index_labels`).
        val_samples: held-out images; None/empty = validation pairs from fresh deformations
            of the training images (seeded apart from the training stream).
        out: best checkpoint path; ``<stem>.last.pt`` and ``<stem>_curve.png`` go next to it.
        resume: a ``.last.pt`` checkpoint to continue from (network, optimizers, epoch, history).
        callback: receives progress dicts (rank 0 only).
        info, device: distributed context and device (default: :func:`init_distributed`).
        val_pairs: the validation pairs (instead of the ones made from ``val_samples``).
        time_limit: seconds; no epoch is started that would (at the last epoch's pace) end after
            it (none at all when <= 0: only the summary of a resumed run), so a long run can be split into sessions (``resume`` continues it).  The
            summary then has ``"stopped": True``.
        initial_weights: a checkpoint of the same network (architecture and configuration)
            whose weights start a new run, e.g. to fine-tune on a finer working grid; the
            optimiser, epochs and history start afresh.  Ignored when ``resume`` is given.
        until_epoch: stop after this epoch (default ``settings.epochs``); the learning-rate
            schedule still spans ``settings.epochs``, so a run cut short here is the first part of
            the full one.
    """
    if not train_samples:
        raise InputError("no training images")
    ndim = train_samples[0].image.dim() - 1
    settings.validate(ndim)
    if info is None or device is None:
        info, device = init_distributed(settings.device)
    seed_everything(settings.seed)
    report = callback if (callback is not None and info.is_main) else (lambda event: None)
    paths = output_paths(out)
    working_shape = tuple(train_samples[0].image.shape[1:])
    if settings.dice_weight > 0 and any(s.labels is None for s in train_samples):
        raise InputError("dice_weight > 0 needs a label map for every training image (--labels)")

    network = build_training_network(settings, ndim).to(device)
    start_epoch, history, best = 0, [], None
    optimizer_states = None
    start_from = resume if resume is not None else initial_weights
    if start_from is not None:
        checkpoint = load_checkpoint(start_from, expected_ndim=ndim)
        if checkpoint.architecture != type(network).__name__ or plain(checkpoint.network.config) != plain(
            network.config
        ):
            raise InputError(
                f"cannot {'resume' if resume is not None else 'start'} from {start_from}: it holds "
                f"{checkpoint.architecture} {plain(checkpoint.network.config)} "
                f"but the settings build {type(network).__name__} {plain(network.config)}"
            )
        network.load_state_dict(checkpoint.network.state_dict())
    if resume is not None:
        start_epoch = int(checkpoint.extra.get("epoch", 0))
        history = list(checkpoint.training.get("history", []))
        best = checkpoint.training.get("best")
        optimizer_states = checkpoint.extra.get("optimizers")
    last_epoch = settings.epochs if until_epoch is None else min(int(until_epoch), settings.epochs)
    parts = wrap_parallel(network, info, device)
    groups = {"base": network.base if parts.is_cascade else network}
    if parts.is_cascade:
        groups["refine"] = network.refiner
    optimizers = {
        name: torch.optim.Adam(module.parameters(), lr=settings.learning_rate) for name, module in groups.items()
    }
    if optimizer_states:
        for name, state in optimizer_states.items():
            if name in optimizers:
                optimizers[name].load_state_dict(state)

    train_samples = [_on_device(sample, device) for sample in train_samples]  # sampled every step
    held_out = bool(val_samples) or bool(val_pairs)
    if val_pairs is None:
        val_pairs = validation_pairs(
            list(val_samples) if val_samples else list(train_samples),
            settings.augment,
            settings.val_pairs_per_image,
            cross_pairs=settings.val_cross_pairs and bool(val_samples),
            seed=settings.seed + 12345,
            others=list(train_samples) if settings.val_cross_train else (),
        )
    val_pairs = list(val_pairs)
    report(
        {
            "event": "start",
            "architecture": type(network).__name__,
            "parameters": parameter_count(network),
            "ndim": ndim,
            "working_shape": list(working_shape),
            "train_images": len(train_samples),
            "val_images": len(val_samples or []),
            "val_pairs": len(val_pairs),
            "device": describe_device(device),
            "world_size": info.world_size,
            "start_epoch": start_epoch,
            "initial_weights": None if resume is not None or initial_weights is None else os.fspath(initial_weights),
            "out": paths["best"],
        }
    )
    total_steps = settings.epochs * settings.steps_per_epoch
    started = time.perf_counter()
    stopped = False
    for epoch in range(start_epoch, last_epoch):
        last_seconds = history[-1]["seconds"] if history and epoch > start_epoch else 0.0
        out_of_time = time_limit is not None and (
            time_limit <= 0 or (epoch > start_epoch and time.perf_counter() - started + last_seconds > time_limit)
        )
        if out_of_time:
            stopped = True
            break
        phase = "refine" if parts.is_cascade and (epoch // settings.alternate_every) % 2 == 1 else "base"
        optimizer = optimizers[phase]
        for group in optimizer.param_groups:
            group["lr"] = epoch_learning_rate(settings, epoch)
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch * 1009 + info.rank)
        if settings.synthetic is not None:
            sampler = SynthPairSampler(train_samples, settings.synthetic, generator)
        else:
            sampler = PairSampler(train_samples, settings.augment, generator)
        network.train()
        epoch_start = time.perf_counter()
        sums = dict.fromkeys(_TERMS, 0.0)
        counts = dict.fromkeys(_TERMS, 0.0)
        for step in range(settings.steps_per_epoch):
            batch = sampler.sample(settings.batch_size, device)
            optimizer.zero_grad(set_to_none=True)
            warmup = epoch * settings.steps_per_epoch + step < settings.warmup_steps
            loss, terms = training_step(parts, batch, settings, phase, warmup=warmup)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}"
                )
            loss.backward()
            if settings.grad_clip > 0:
                nn.utils.clip_grad_norm_(groups[phase].parameters(), settings.grad_clip)
            optimizer.step()
            values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
            for key, value in values.items():
                sums[key] += value
                counts[key] += 1
            done = epoch * settings.steps_per_epoch + step + 1
            report(
                {
                    "event": "progress",
                    "stage": f"epoch {epoch + 1}/{settings.epochs}"
                    + (f" ({phase})" if parts.is_cascade else "")
                    + (" (warm-up)" if warmup else ""),
                    "iteration": step + 1,
                    "iterations": settings.steps_per_epoch,
                    "fraction": done / total_steps,
                    **values,
                }
            )
        reduced = all_reduce_sum([sums[k] for k in _TERMS] + [counts[k] for k in _TERMS], info, device)
        train_terms = {
            f"train_{k}": total / count for k, total, count in zip(_TERMS, reduced, reduced[len(_TERMS) :]) if count > 0
        }
        metrics = validate(network, val_pairs, settings, info, device)
        record = {
            "epoch": epoch + 1,
            "phase": phase,
            **train_terms,
            **metrics,
            "seconds": round(time.perf_counter() - epoch_start, 2),
            "learning_rate": optimizer.param_groups[0]["lr"],
            "threads": torch.get_num_threads(),
        }
        history.append(record)
        improved = _better(metrics, best)
        if improved:
            best = {"epoch": epoch + 1, **metrics}
        training = {
            "settings": settings.to_dict(),
            "history": history,
            "best": best,
            "train_images": [s.name for s in train_samples],
            "val_images": [s.name for s in val_samples or []],
            "val_held_out": held_out,
            "parameters": parameter_count(network),
            "world_size": info.world_size,
            "device": describe_device(device),
            "torch": torch.__version__,
        }
        extra = {"working_shape": working_shape, "normalization": settings.normalization, "training": training}
        if info.is_main:
            save_checkpoint(
                paths["last"],
                network,
                {**extra, "epoch": epoch + 1, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}},
            )
            if improved:
                save_checkpoint(paths["best"], network, extra)
            plot_history(history, paths["curve"])
        report({"event": "epoch", **record, "best_epoch": best["epoch"], "improved": improved})
        if info.enabled:
            dist.barrier()
    summary = {
        "best": best,
        "epochs": settings.epochs,
        "epochs_done": len(history),
        "stopped": stopped,
        "training_seconds": round(sum(h["seconds"] for h in history), 1),
        "seconds": round(time.perf_counter() - started, 2),
        "files": paths,
        "parameters": parameter_count(network),
    }
    report({"event": "done", "summary": summary})
    return summary


def _on_device(sample: Sample, device: torch.device) -> Sample:
    labels = None if sample.labels is None else sample.labels.to(device)
    return dataclasses.replace(sample, image=sample.image.to(device), labels=labels)


def split_validation(samples: list[Sample], val_count: int | None, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``val_count`` samples (None = 20 % when there are at least 3) chosen by a seeded shuffle."""
    count = val_count if val_count is not None else (max(1, round(0.2 * len(samples))) if len(samples) >= 3 else 0)
    if count <= 0:
        return samples, []
    if count >= len(samples):
        raise InputError(f"val_count {count} leaves no training image out of {len(samples)}")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    val = [samples[i] for i in sorted(order[:count])]
    return [samples[i] for i in sorted(order[count:])], val


def train_from_files(
    settings: TrainSettings,
    images: Sequence[str] | str,
    out: str | os.PathLike,
    labels: Sequence[str] | str | None = None,
    val_images: Sequence[str] | str | None = None,
    val_labels: Sequence[str] | str | None = None,
    resume: str | os.PathLike | None = None,
    callback: Callable[[dict], None] | None = None,
    info: Distributed | None = None,
    device: torch.device | None = None,
) -> dict:
    """Read images (folders, list files or paths) and :func:`train`."""
    image_paths = expand_paths(images)
    if not image_paths:
        raise InputError("no training images given (--images DIR_OR_LIST)")
    samples = load_samples(image_paths, expand_paths(labels), settings)
    ndim = samples[0].image.dim() - 1
    val = load_samples(expand_paths(val_images), expand_paths(val_labels), settings, ndim) if val_images else []
    index_labels(samples + val)
    if not val:
        samples, val = split_validation(samples, settings.val_count, settings.seed)
    return train(settings, samples, val, out, resume=resume, callback=callback, info=info, device=device)
