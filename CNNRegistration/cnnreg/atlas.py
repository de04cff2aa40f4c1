"""build an unbiased average image (template) and probabilistic label atlas from many subjects

Template construction in the spirit of ANTs' ``buildtemplateparallel`` and of the FAIM
LPBA40 atlas experiment, with any registration mode (everything goes through
:func:`cnnreg.registration.register`)::

    result = build_atlas(images, RegistrationSettings(mode="instance"), labels=label_maps, iterations=3)
    write_atlas(result, "atlas/")

Algorithm (all on the reference grid, default: the first image's grid):

1. Every subject is intensity-normalised (the settings' normalization) so that scanners'
   scales do not dominate the mean; the initial template is the voxelwise mean of the
   subjects resampled onto the reference grid with the identity transform.
2. Each iteration registers every subject (moving) to the current template (fixed); the new
   template is the mean of the warped subjects.
3. Shape update: the mean displacement ``ubar`` (LPS mm, on the reference grid) says where,
   on average, the subjects sit relative to the template.  The new template is pulled with
   ``-ubar`` (first-order inverse of the mean transform): ``T(x) = mean_warped(x - ubar(x))``,
   so that the template converges to the subjects' average shape (and average pose when the
   affine pre-alignment is on) instead of staying at the initial template's shape.
4. With label maps (last iteration): the probability of label ``l`` is the fraction of
   subjects whose warped label (nearest neighbour) is ``l``, moved by the same shape update
   (linear interpolation); the winning label is the argmax over the background probability
   (``1 - sum_l p_l``) and the label probabilities, background winning ties.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from . import image as im
from .errors import InputError
from .outputs import add_overwrite_any_folder_argument
from .progress import ProgressReporter, add_progress_argument, set_threads, wants_bar, wants_jsonl, wants_summary
from .settings import Normalization, RegistrationSettings, add_method_arguments, settings_from_args

#: file names inside the output folder
ATLAS_FILES = {
    "template": "template.nii.gz",
    "winning_labels": "winning_labels.nii.gz",
    "summary": "atlas.json",
    "probabilities": "probabilities",  # folder of label_<n>.nii.gz
    "fields": "fields",  # folder of subject_<nnn>.nii.gz (with keep_fields)
}

AtlasCallback = Callable[[dict], None]


@dataclass
class AtlasResult:
    """Atlas on the reference grid.

    Attributes:
        template: float32 image, normalised intensities (mean of normalised subjects).
        probabilities: label value -> float32 image in [0, 1] (fraction of subjects with that label).
        winning_labels: majority-vote label map (uint8/uint16/uint32, or signed when labels are
            negative), 0 where background wins; None without label maps.
        history: one dict per iteration (see :func:`build_atlas`).
        summary: settings, subjects, labels, history, seconds (what ``atlas.json`` holds).
        displacements: with ``keep_fields``: per subject, the ITK displacement field (LPS mm,
            vector float32, on the reference grid) mapping the final template onto that subject
            (pull: ``subject(x + d(x))`` ~ template(x)); else None.
    """

    template: sitk.Image
    probabilities: dict[int, sitk.Image]
    winning_labels: sitk.Image | None
    history: list[dict]
    summary: dict
    displacements: list[sitk.Image] | None = None


# ---------------------------------------------------------------------------------------
# checks and small helpers
# ---------------------------------------------------------------------------------------


def check_subjects(
    images: Sequence[sitk.Image],
    labels: Sequence[sitk.Image] | None = None,
    reference: sitk.Image | None = None,
    names: Sequence[str] | None = None,
) -> list[str]:
    """Raise InputError unless the subjects can make an atlas; returns their display names.

    Needs at least two images, all scalar, finite, non-constant and of one dimension (2D or 3D,
    stored alike; checked against the first image and against ``reference``), and, when given,
    one label map per image on that image's grid.
    """
    names = list(names) if names is not None else [f"image {n + 1}" for n in range(len(images))]
    if len(names) != len(images):
        raise InputError(f"got {len(names)} names for {len(images)} images")
    if len(images) < 2:
        raise InputError(f"an atlas needs at least 2 images, got {len(images)}")
    for image, name in zip(images, names):
        im.check_image(image, name)
    first, first_name = images[0], names[0]
    for image, name in zip(images[1:], names[1:]):
        im.check_pair(image, first, name, first_name)
    if reference is not None:
        im.check_image(reference, "reference image", allow_constant=True)
        im.check_pair(reference, first, "reference image", f"the subjects ({first_name})")
    if labels is not None:
        if len(labels) != len(images):
            raise InputError(
                f"got {len(labels)} label maps for {len(images)} images; pass one label map per image, in the same order"
            )
        for image, label, name in zip(images, labels, names):
            im.check_labels(label, image, name=f"labels of {name}")
    return names


def _normalized(image: sitk.Image, method: Normalization | str) -> sitk.Image:
    """Float32 copy of ``image`` (same grid) with normalised intensities."""
    array = im.normalize(sitk.GetArrayFromImage(image).astype(np.float32), method)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def _label_values(labels: Sequence[sitk.Image]) -> list[int]:
    values: set[int] = set()
    for label in labels:
        values.update(int(v) for v in np.unique(np.rint(sitk.GetArrayViewFromImage(label))))
    values.discard(0)
    return sorted(values)


def _label_dtype(values: Sequence[int]) -> type:
    low, high = (min(values), max(values)) if values else (0, 0)
    for dtype in (np.uint8, np.uint16, np.uint32, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise InputError(f"label values {low}..{high} do not fit a 64-bit integer")


def _settings_summary(settings: RegistrationSettings) -> dict:
    data = asdict(settings)
    return json.loads(json.dumps(data, default=str))


def winning_labels(probabilities: dict[int, np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """Majority vote: per voxel, the label with the highest probability, 0 where the background
    probability ``1 - sum_l p_l`` is at least as high as every label's (ties between labels go to
    the smaller label value).  ``probabilities``: label -> array of ``shape``, values in [0, 1]."""
    values = sorted(probabilities)
    total = np.zeros(shape, dtype=np.float64)
    for value in values:
        total += probabilities[value]
    best = 1.0 - total  # background probability
    winner = np.zeros(shape, dtype=_label_dtype([0, *values]))
    for value in values:
        better = probabilities[value] > best
        winner[better] = value
        best = np.where(better, probabilities[value], best)
    return winner


# ---------------------------------------------------------------------------------------
# the atlas
# ---------------------------------------------------------------------------------------


def build_atlas(
    images: Sequence[sitk.Image],
    settings: RegistrationSettings | None = None,
    labels: Sequence[sitk.Image] | None = None,
    iterations: int = 3,
    reference: sitk.Image | None = None,
    callback: AtlasCallback | None = None,
    names: Sequence[str] | None = None,
    initial: sitk.Image | None = None,
    keep_fields: bool = False,
    client=None,
    threads: int | None = None,
) -> AtlasResult:
    """Unbiased template (and label probability maps) of ``images`` by iterated group-wise registration.

    Args:
        images: scalar 2D or 3D subjects (any grids, one dimension).
        settings: :class:`cnnreg.registration.RegistrationSettings` used for every registration
            (any mode); its ``normalization`` also normalises the subjects before averaging.
        labels: optional label maps, one per image, each on its own image's grid.
        iterations: template iterations (each registers every subject once), >= 1.
        reference: grid of the atlas (only its geometry is used); default: the first image.
        callback: receives progress dicts: ``{"event": "atlas", "iteration", "iterations",
            "subject", "subjects", "fraction"}`` before each registration (1-based counters,
            overall fraction 0..1); the registration's own events with ``atlas_iteration``,
            ``subject`` and ``atlas_fraction`` added; and ``{"event": "atlas_update",
            "iteration", "iterations", "fraction", ...history entry}`` after each iteration.
            Raising stops the run.
        names: display names of the subjects (e.g. file paths) for messages and the summary.
        initial: optional initial template (any grid; resampled onto the reference grid and
            normalised) instead of the subjects' mean.
        keep_fields: also return each subject's displacement to the final template (memory:
            subjects x dim x voxels x 4 bytes).
        client: a ``distributed.Client``: each iteration's registrations run on its workers
            (``threads`` CPU threads each, retried once on failure), the results summed in the
            subjects' order so the atlas equals the serial one; None = one after another here.

    Returns:
        :class:`AtlasResult`.  ``history[t]`` holds ``iteration``, ``mean_displacement_mm``
        (mean over subjects and voxels of the registration displacement length, mm),
        ``shape_update_mm`` / ``max_shape_update_mm`` (mean / max length of the mean
        displacement, mm), ``template_change_rms`` (RMS intensity change of the template,
        normalised units), ``similarity_before`` / ``similarity_after`` (mean over subjects,
        the measure's natural units), ``max_folding_percent`` and ``seconds``.

    Raises:
        InputError for bad images or settings (see :func:`check_subjects`), DeviceError for
        device problems, and whatever ``callback`` raises.
    """
    from .device import describe_device, resolve_device
    from .registration import register

    settings = settings or RegistrationSettings()
    settings.validate()
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise InputError(f"atlas iterations must be an integer >= 1, got {iterations!r}")
    names = check_subjects(images, labels, reference, names)
    reference = reference if reference is not None else images[0]
    if initial is not None:
        im.check_image(initial, "initial template")
        im.check_pair(initial, images[0], "initial template", "the subjects")
    start = time.perf_counter()
    count = len(images)
    dim = reference.GetDimension()
    shape = sitk.GetArrayViewFromImage(reference).shape
    subjects = [_normalized(image, settings.normalization) for image in images]
    label_values = _label_values(labels) if labels is not None else []

    if initial is not None:
        template_array = sitk.GetArrayFromImage(
            im.resample(_normalized(initial, settings.normalization), reference)
        ).astype(np.float64)
    else:
        template_array = np.zeros(shape, dtype=np.float64)
        for subject in subjects:
            template_array += sitk.GetArrayFromImage(im.resample(subject, reference))
        template_array /= count
    template = im.array_to_image(template_array.astype(np.float32), reference)
    if float(template_array.max()) == float(template_array.min()):
        raise InputError(
            "the initial template is constant on the reference grid: the subjects do not overlap it; "
            "choose a reference grid that covers them or pre-align them"
        )

    def emit(event: dict) -> None:
        if callback is not None:
            callback(event)

    history: list[dict] = []
    counts: dict[int, np.ndarray] = {}
    fields: list[sitk.Image] = []
    update_field = None
    for iteration in range(1, iterations + 1):
        last = iteration == iterations
        iteration_start = time.perf_counter()
        warped_sum = np.zeros(shape, dtype=np.float64)
        displacement_sum = np.zeros((*shape, dim), dtype=np.float64)
        displacement_length = 0.0
        before, after, folding = [], [], []
        if last and labels is not None:
            count_dtype = np.uint16 if count < 2**16 else np.uint32
            counts = {value: np.zeros(shape, dtype=count_dtype) for value in label_values}
        moving_labels_of = [labels[i] if last and labels is not None else None for i in range(count)]
        remote = (
            [
                client.submit(
                    _register_subject, template, subject, settings, moving_labels_of[i], threads, retries=1, pure=False
                )
                for i, subject in enumerate(subjects)
            ]
            if client is not None
            else None
        )
        for index, subject in enumerate(subjects):
            done = (iteration - 1) * count + index
            emit(
                {
                    "event": "atlas",
                    "iteration": iteration,
                    "iterations": iterations,
                    "subject": index + 1,
                    "subjects": count,
                    "fraction": done / (iterations * count),
                }
            )

            def forward(
                event: dict, done: int = done, subject_number: int = index + 1, iteration: int = iteration
            ) -> None:
                fraction = min(max(float(event.get("fraction", 0.0)), 0.0), 1.0)
                emit(
                    {
                        **event,
                        "atlas_iteration": iteration,
                        "subject": subject_number,
                        "atlas_fraction": (done + fraction) / (iterations * count),
                    }
                )

            moving_labels = moving_labels_of[index]
            if remote is not None:
                result = remote[index].result()  # in the subjects' order: the sums are the serial ones
                remote[index] = None
            else:
                result = register(template, subject, settings, moving_labels=moving_labels, callback=forward)
            warped_sum += sitk.GetArrayFromImage(result.warped)
            d = sitk.GetArrayFromImage(result.displacement)  # (*shape, dim) LPS mm
            displacement_sum += d
            displacement_length += float(np.mean(np.linalg.norm(d, axis=-1)))
            before.append(float(result.summary["similarity_before"]))
            after.append(float(result.summary["similarity_after"]))
            folding.append(float(result.summary["folding_percent"]))
            if moving_labels is not None:
                warped_labels = np.rint(sitk.GetArrayViewFromImage(result.warped_labels)).astype(np.int64)
                for value, total in counts.items():
                    total += warped_labels == value
            if last and keep_fields:
                fields.append(sitk.Cast(result.displacement, sitk.sitkVectorFloat32))
            del result

        mean_displacement = displacement_sum / count  # (*shape, dim) LPS mm
        update_field = im.array_to_image(-mean_displacement, reference, is_vector=True)
        new_array = warped_sum / count
        new_template = _pull(im.array_to_image(new_array.astype(np.float32), reference), update_field)
        new_template_array = sitk.GetArrayFromImage(new_template).astype(np.float64)
        update_length = np.linalg.norm(mean_displacement, axis=-1)
        entry = {
            "iteration": iteration,
            "mean_displacement_mm": displacement_length / count,
            "shape_update_mm": float(update_length.mean()),
            "max_shape_update_mm": float(update_length.max()),
            "template_change_rms": float(np.sqrt(np.mean((new_template_array - template_array) ** 2))),
            "similarity_before": float(np.mean(before)),
            "similarity_after": float(np.mean(after)),
            "max_folding_percent": float(np.max(folding)),
            "seconds": round(time.perf_counter() - iteration_start, 3),
        }
        history.append(entry)
        template, template_array = new_template, new_template_array
        emit(
            {
                "event": "atlas_update",
                "iterations": iterations,
                "fraction": iteration / iterations,
                **entry,
            }
        )

    probabilities: dict[int, sitk.Image] = {}
    winner_image = None
    if labels is not None:
        arrays = {}
        for value, total in counts.items():
            fraction = im.array_to_image((total.astype(np.float64) / count).astype(np.float32), reference)
            moved = _pull(fraction, update_field)
            arrays[value] = np.clip(sitk.GetArrayFromImage(moved), 0.0, 1.0).astype(np.float32)
            probabilities[value] = im.array_to_image(arrays[value], reference)
        counts.clear()
        winner_image = im.array_to_image(winning_labels(arrays, shape), reference)

    displacements = None
    if keep_fields:
        displacements = [_compose_with_update(field, update_field, reference) for field in fields]

    summary = {
        "subjects": names,
        "labels": label_values,
        "atlas_iterations": iterations,
        "reference": "first image" if reference is images[0] else "given reference grid",
        "initial": "given template" if initial is not None else "mean of the subjects",
        "reference_size": list(reference.GetSize()),
        "reference_spacing": list(reference.GetSpacing()),
        "reference_origin": list(reference.GetOrigin()),
        "mode": settings.mode.value,
        "device": describe_device(resolve_device(settings.device)),
        "settings": _settings_summary(settings),
        "history": history,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return AtlasResult(
        template=sitk.Cast(template, sitk.sitkFloat32),
        probabilities=probabilities,
        winning_labels=winner_image,
        history=history,
        summary=summary,
        displacements=displacements,
    )


def _register_subject(template, subject, settings, moving_labels, threads):
    """One atlas registration on a Dask worker (``threads`` CPU threads); what the atlas sums."""
    import dataclasses

    import torch

    from .batch import worker_allocator
    from .registration import register

    worker_allocator()
    if threads:
        torch.set_num_threads(threads)
    result = register(template, subject, settings, moving_labels=moving_labels)
    return dataclasses.replace(
        result, jacobian=None, inverse_displacement=None, u=None, fixed=None, moving_on_fixed=None
    )


def _pull(image: sitk.Image, field: sitk.Image) -> sitk.Image:
    """``image(x + v(x))`` (linear) with ``field`` ``v`` (LPS mm on ``image``'s grid); a zero field
    returns ``image`` itself (exact, where linear interpolation would add rounding noise)."""
    if not np.any(sitk.GetArrayViewFromImage(field)):
        return image
    return im.apply_displacement(image, field)


def _compose_with_update(field: sitk.Image, update: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Field of pulling by ``update`` first and then by ``field`` (both LPS mm on ``reference``):
    ``w(x) = v(x) + d(x + v(x))``; returns a float32 vector image on ``reference``."""
    composite = sitk.CompositeTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(update, sitk.sitkVectorFloat64)))  # first
    combined = sitk.TransformToDisplacementField(
        composite,
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )
    return sitk.Cast(combined, sitk.sitkVectorFloat32)


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------


def output_paths(out_dir: str | os.PathLike) -> dict[str, str]:
    """Absolute paths of the atlas outputs in ``out_dir`` (probabilities and fields are folders)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    return {key: os.path.join(out_dir, name) for key, name in ATLAS_FILES.items()}


def write_atlas(result: AtlasResult, out_dir: str | os.PathLike, claim=None) -> dict[str, str]:
    """Write the atlas into ``out_dir``; returns name -> path.

    Everything is written into a new folder beside ``out_dir``, each image read back and
    compared, and that folder then replaces ``out_dir`` (:func:`cnnreg.outputs.staged_folder`):
    a failure leaves ``out_dir`` as it was, and afterwards it holds exactly this atlas.
    """
    from .outputs import staged_folder, write_verified_image, write_verified_text

    paths = output_paths(out_dir)
    out_dir = os.path.dirname(paths["template"])
    write = write_verified_image
    with staged_folder(out_dir, claim) as staging:
        stage = output_paths(staging)
        written = {"template": paths["template"]}
        write(result.template, stage["template"])
        if result.probabilities:
            os.makedirs(stage["probabilities"])
            for value, image in result.probabilities.items():
                write(image, os.path.join(stage["probabilities"], f"label_{value}.nii.gz"))
            written["probabilities"] = paths["probabilities"]
        if result.winning_labels is not None:
            write(result.winning_labels, stage["winning_labels"])
            written["winning_labels"] = paths["winning_labels"]
        field_files = {}
        if result.displacements:
            os.makedirs(stage["fields"])
            for number, (field, name) in enumerate(zip(result.displacements, result.summary["subjects"]), start=1):
                file_name = f"subject_{number:03d}.nii.gz"
                write(field, os.path.join(stage["fields"], file_name))
                field_files[file_name] = name
            written["fields"] = paths["fields"]
        summary = {
            **result.summary,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "files": {key: os.path.basename(path) for key, path in written.items()},
        }
        if result.probabilities:
            summary["probability_files"] = {
                str(value): f"{ATLAS_FILES['probabilities']}/label_{value}.nii.gz" for value in result.probabilities
            }
        if field_files:
            summary["field_files"] = {f"{ATLAS_FILES['fields']}/{k}": v for k, v in field_files.items()}
        write_verified_text(stage["summary"], json.dumps(summary, indent=2, default=str))
        written["summary"] = paths["summary"]
    return written


# ---------------------------------------------------------------------------------------
# command line: python -m cnnreg atlas
# ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="subject images: files, list files (.txt, one path a line) or folders; at least 2",
    )
    parser.add_argument(
        "--labels", nargs="+", help="label maps, one per image in the same order, each on its image's grid (optional)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace atlas outputs in an existing folder")
    add_overwrite_any_folder_argument(parser)
    parser.add_argument(
        "--atlas-iterations",
        type=int,
        default=3,
        help="template iterations, each registering every subject once (default 3); "
        "--iterations is the registration's own iterations per level",
    )
    parser.add_argument("--reference", help="atlas grid (default: the first image's grid)")
    parser.add_argument("--initial", help="initial template (default: the mean of the subjects)")
    parser.add_argument(
        "--keep-fields", action="store_true", help="also write each subject's displacement to the final template"
    )
    add_method_arguments(parser)
    add_progress_argument(parser)
    from .batch import add_cluster_arguments

    add_cluster_arguments(parser, "each iteration's registrations run on Dask workers (default: one after another)")


def _bar_event(event: dict) -> dict | None:
    """Atlas or registration event -> the ``progress`` event the terminal bar draws (overall fraction)."""
    kind = event.get("event")
    if kind == "atlas":
        return {
            "event": "progress",
            "fraction": event["fraction"],
            "stage": f"atlas {event['iteration']}/{event['iterations']} subject {event['subject']}/{event['subjects']}",
        }
    if kind == "progress" and "atlas_fraction" in event:
        return {
            **event,
            "fraction": event["atlas_fraction"],
            "stage": f"atlas {event['atlas_iteration']} subject {event['subject']} {event.get('stage', '')}".rstrip(),
        }
    if kind in ("done", "error"):
        return event
    return None


def run(args: argparse.Namespace) -> int:
    from .device import describe_device, resolve_device
    from .image import expand_paths
    from .outputs import check_output_folder, claimed_folder
    from .registration import check_memory

    image_paths = expand_paths(args.images)
    label_paths = expand_paths(args.labels) if args.labels else None
    if len(image_paths) < 2:
        raise InputError(f"an atlas needs at least 2 images, got {len(image_paths)}: {image_paths}")
    if label_paths is not None and len(label_paths) != len(image_paths):
        raise InputError(
            f"got {len(label_paths)} label maps for {len(image_paths)} images; "
            "pass one label map per image, in the same order"
        )
    if args.atlas_iterations < 1:
        raise InputError(f"--atlas-iterations must be >= 1, got {args.atlas_iterations}")
    inputs = [*image_paths, *(label_paths or []), args.reference, args.initial]
    # the outputs replace the whole folder: an input inside it is refused
    out_dir = check_output_folder(
        args.out, args.overwrite, [p for p in inputs if p], ATLAS_FILES.values(), args.overwrite_any_folder
    )
    outputs = output_paths(out_dir)
    for path in filter(None, inputs):
        path = os.path.abspath(path)
        if any(path == p or path.startswith(p + os.sep) for p in outputs.values()):
            raise InputError(f"input {path} would be overwritten by an atlas output; choose another output folder")
    settings = settings_from_args(args)  # checked on construction
    set_threads(args.threads)
    reference_size = im.size_from_header(args.reference or image_paths[0], "reference image")
    for path in image_paths:  # from the headers, before anything large is read
        check_memory(reference_size, im.size_from_header(path, "image"), settings)

    json_report = ProgressReporter("jsonl" if wants_jsonl(args.progress) else "none")
    bar = ProgressReporter("bar") if wants_bar(args.progress) else None

    def report(event: dict) -> None:
        json_report(event)
        shown = _bar_event(event) if bar is not None else None
        if shown is not None:
            bar(shown)

    try:
        images = [im.read_image(path, "image") for path in image_paths]
        labels = (
            [im.read_image(path, "label map", allow_constant=True) for path in label_paths]
            if label_paths is not None
            else None
        )
        reference = im.read_image(args.reference, "reference image", allow_constant=True) if args.reference else None
        initial = im.read_image(args.initial, "initial template") if args.initial else None
        check_subjects(images, labels, reference, image_paths)
        report(
            {
                "event": "start",
                "command": "atlas",
                "images": len(images),
                "labels": label_paths is not None,
                "atlas_iterations": args.atlas_iterations,
                "mode": args.mode,
                "device": describe_device(resolve_device(args.device)),
                "out": out_dir,
            }
        )
        client = cluster = None
        threads = args.threads
        if args.scheduler or args.cluster or args.workers:
            from .batch import connect

            pairs = [{"fixed": args.reference or image_paths[0], "moving": path} for path in image_paths]
            client, cluster, threads = connect(args, pairs, settings)
        try:
            result = build_atlas(
                images,
                settings,
                labels=labels,
                iterations=args.atlas_iterations,
                reference=reference,
                callback=report,
                names=image_paths,
                initial=initial,
                keep_fields=args.keep_fields,
                client=client,
                threads=threads,
            )
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
        with claimed_folder(out_dir) as claim:
            paths = write_atlas(result, out_dir, claim)
    except BaseException:
        if bar is not None:
            bar({"event": "error"})  # ends the bar's line before the error message
        raise
    report({"event": "done", "summary": {k: v for k, v in result.summary.items() if k != "settings"}, "files": paths})
    if wants_summary(args.progress):
        last = result.history[-1]
        print(
            f"atlas of {len(images)} images in {result.summary['seconds']:.1f} s on {result.summary['device']}: "
            f"{args.atlas_iterations} iterations, mean displacement {last['mean_displacement_mm']:.2f} mm, "
            f"shape update {last['shape_update_mm']:.3f} mm, similarity {last['similarity_after']:.4f}"
            + (f", {len(result.probabilities)} labels" if labels is not None else "")
            + f"; results in {out_dir}",
            file=sys.stderr,
        )
    return 0
