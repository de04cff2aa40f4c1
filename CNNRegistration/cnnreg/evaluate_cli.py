"""score registration results against label maps (Dice, HD95, folding, SDlogJ, TRE)

``python -m cnnreg evaluate``: compares one or several registration methods on one or several
subjects.  For every (method, subject) pair it scores the method's warped labels against the
subject's fixed labels (both on the fixed grid) and, when the method's displacement field is
given, the field's regularity and (with the true field) the target registration error.

Arrays follow :mod:`cnnreg.settings`; the metrics are those of :mod:`cnnreg.evaluate`.
Units: HD95, ASSD and TRE in mm, folding in % of voxels, det J and SDlogJ dimensionless.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import InputError
from .grid import describe_grid, same_grid
from .outputs import add_overwrite_any_folder_argument, check_output_folder

OUTPUT_FILES = {"csv": "evaluation.csv", "json": "evaluation.json", "boxplot": "dice_boxplot.png"}
NO_FILE = "-"  # placeholder for "no displacement field for this method/subject"
MAX_LABEL_COLUMNS = 8  # more labels: per-label Dice is printed as its own table (labels x methods)
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gz", ".tif", ".tiff", ".png", ".vtk")

_DESCRIPTION = """\
Score registration results against label maps: Dice per label and mean, HD95 (mm), and, from a
displacement field, folding (% voxels with det J <= 0), min det J and SDlogJ; the target
registration error (mm) when the true field is known.  Prints a table; with --out also writes
evaluation.csv (one row per method and subject), evaluation.json and dice_boxplot.png.
"""

_EPILOG = """\
methods and subjects:
  Subjects are the files of --fixed-labels, in order.  Each --warped-labels occurrence is one
  method and lists one file per subject (same order); each --result occurrence is one method
  given as `cnnreg register` output folders (one per subject), from which warped_labels.nii.gz
  and, when present, displacement.nii.gz are taken.  Methods are numbered in command-line order.
  --displacement occurs once per --warped-labels occurrence (same order), one field per subject;
  write - for a method/subject without a field.  --method and --subject, when given, name every
  method / subject (default: folder or file names).  --true-displacement and --mask take one file
  per subject (a single --mask applies to every subject).

  Labels are scored when present in both maps of a pair; labels found in only one map are left
  out and reported.  Label 0 is background.

examples:
  cnnreg evaluate --fixed-labels fixed_seg.nii.gz --result out/phantom --result out/learned
  cnnreg evaluate --fixed-labels s1/seg.nii.gz s2/seg.nii.gz \\
      --warped-labels a/s1.nii.gz a/s2.nii.gz --warped-labels b/s1.nii.gz b/s2.nii.gz \\
      --method ants --method cnn --label-names labels.txt --out evaluation/
"""


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------


class _MethodInput(argparse.Action):
    """Collects ``--warped-labels`` and ``--result`` occurrences in command-line order as
    ``(kind, [paths])`` in one list, so that methods keep the order the user gave them."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((self.const, list(values)))
        setattr(namespace, self.dest, items)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cnnreg evaluate`` (see the module docstring and ``--help``)."""
    parser.description = _DESCRIPTION
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--fixed-labels", nargs="+", required=True, metavar="FILE", help="fixed label map(s), one per subject"
    )
    parser.add_argument(
        "--warped-labels",
        dest="method_inputs",
        action=_MethodInput,
        const="labels",
        nargs="+",
        metavar="FILE",
        help="one method: its warped label map(s) on the fixed grid, one per subject; repeat per method",
    )
    parser.add_argument(
        "--result",
        dest="method_inputs",
        action=_MethodInput,
        const="result",
        nargs="+",
        metavar="DIR",
        help="one method: `cnnreg register` output folder(s), one per subject; repeat per method",
    )
    parser.add_argument(
        "--displacement",
        action="append",
        nargs="+",
        metavar="FILE",
        help="displacement field(s) of the matching --warped-labels method, one per subject (- = none)",
    )
    parser.add_argument(
        "--true-displacement", nargs="+", metavar="FILE", help="known displacement field(s), one per subject -> TRE"
    )
    parser.add_argument("--method", action="append", metavar="NAME", help="method name, once per method, in order")
    parser.add_argument("--subject", action="append", metavar="NAME", help="subject name, once per subject, in order")
    parser.add_argument(
        "--label-names",
        metavar="FILE",
        help='label names: JSON {"1": "GM"}, text lines "1 GM", or a colour table "1 GM r g b a"',
    )
    parser.add_argument(
        "--mask",
        nargs="+",
        metavar="FILE",
        help="region for folding, det J and TRE (one, or one per subject; default: the fixed labels > 0)",
    )
    parser.add_argument("--no-surface-distance", action="store_true", help="skip HD95/ASSD (the slowest metrics)")
    parser.add_argument("--out", metavar="DIR", help="output folder for evaluation.csv/.json and dice_boxplot.png")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out folder")
    add_overwrite_any_folder_argument(parser)


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------


@dataclass
class Method:
    """One method: per subject, its warped label file and displacement file (or None)."""

    name: str
    warped_labels: list[str]
    displacements: list[str | None]
    folders: list[str] = field(default_factory=list)  # where the default name comes from


def _strip_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return _strip_image_suffix(name[: -len(suffix)])
    return name


def _folder_name(folders: Sequence[str]) -> str:
    """A name for files kept in ``folders``: their common name, else their common parent's name."""
    names = {os.path.basename(os.path.abspath(f)) for f in folders}
    if len(names) == 1:
        return names.pop()
    try:
        return os.path.basename(os.path.commonpath([os.path.abspath(f) for f in folders]))
    except ValueError:  # different drives
        return ""


def _unique_or_default(names: Sequence[str], prefix: str) -> list[str]:
    if all(names) and len(set(names)) == len(names):
        return list(names)
    return [f"{prefix}{i + 1}" for i in range(len(names))]


def _check_names(given: Sequence[str] | None, count: int, what: str, option: str) -> list[str] | None:
    if given is None:
        return None
    if len(given) != count:
        raise InputError(f"{len(given)} {option} name(s) given for {count} {what}(s); give one {option} per {what}")
    if len(set(given)) != len(given):
        raise InputError(f"{option} names must be different, got {list(given)}")
    return list(given)


def _methods_from_args(args: argparse.Namespace, subjects: int) -> list[Method]:
    """The methods in command-line order, with counts checked (no file is read)."""
    inputs = args.method_inputs or []
    if not inputs:
        raise InputError("no method to evaluate: give --warped-labels FILE... or --result DIR... (once per method)")
    label_inputs = [values for kind, values in inputs if kind == "labels"]
    displacements = args.displacement or []
    if displacements and len(displacements) != len(label_inputs):
        raise InputError(
            f"--displacement was given {len(displacements)} time(s) but --warped-labels {len(label_inputs)} time(s); "
            "give one --displacement per --warped-labels (same order), with - for a method without a field"
        )
    methods = []
    next_displacement = iter(displacements)
    for number, (kind, values) in enumerate(inputs, start=1):
        option = "--warped-labels" if kind == "labels" else "--result"
        if len(values) != subjects:
            raise InputError(
                f"method {number} ({option} {' '.join(values)}) has {len(values)} file(s) but --fixed-labels has "
                f"{subjects}; give one per subject, in the same order"
            )
        if kind == "labels":
            fields = next(next_displacement, None) or [NO_FILE] * subjects
            if len(fields) != subjects:
                raise InputError(
                    f"--displacement {' '.join(fields)} for method {number} has {len(fields)} file(s) but there are "
                    f"{subjects} subject(s); give one per subject (- for none)"
                )
            methods.append(
                Method(
                    name="",
                    warped_labels=list(values),
                    displacements=[None if f == NO_FILE else f for f in fields],
                    folders=[os.path.dirname(os.path.abspath(v)) for v in values],
                )
            )
        else:
            from .registration import OUTPUT_FILES as REGISTER_FILES  # torch is imported only for --result

            warped, fields = [], []
            for folder in values:
                if not os.path.isdir(folder):
                    raise InputError(f"result folder not found: {folder} (method {number}, --result)")
                labels_path = os.path.join(folder, REGISTER_FILES["warped_labels"])
                if not os.path.isfile(labels_path):
                    raise InputError(
                        f"result folder {folder} has no {REGISTER_FILES['warped_labels']}; run `cnnreg register` with "
                        "--moving-labels to get warped labels"
                    )
                field_path = os.path.join(folder, REGISTER_FILES["displacement"])
                warped.append(labels_path)
                fields.append(field_path if os.path.isfile(field_path) else None)
            methods.append(Method(name="", warped_labels=warped, displacements=fields, folders=list(values)))
    names = _check_names(args.method, len(methods), "method", "--method")
    if names is None:
        names = [_folder_name(m.folders) for m in methods]
        if subjects == 1 and len(set(names)) != len(names):  # e.g. a.nii.gz and b.nii.gz in one folder
            names = [_strip_image_suffix(os.path.basename(m.warped_labels[0])) for m in methods]
        names = _unique_or_default(names, "method")
    for method, name in zip(methods, names):
        method.name = name
    return methods


def _subject_names(args: argparse.Namespace) -> list[str]:
    names = _check_names(args.subject, len(args.fixed_labels), "subject", "--subject")
    if names is not None:
        return names
    stems = [_strip_image_suffix(os.path.basename(p)) for p in args.fixed_labels]
    if len(set(stems)) == len(stems):
        return stems
    parents = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.fixed_labels]
    return _unique_or_default(parents, "subject")


def _per_subject(paths: Sequence[str] | None, subjects: int, option: str, allow_one: bool = False) -> list:
    if not paths:
        return [None] * subjects
    if allow_one and len(paths) == 1:
        return list(paths) * subjects
    if len(paths) != subjects:
        one = " (or one for all)" if allow_one else ""
        raise InputError(
            f"{option} has {len(paths)} file(s) but --fixed-labels has {subjects}; give one per subject{one}"
        )
    return list(paths)


def read_label_names(path: str | os.PathLike) -> dict[int, str]:
    """Label names from a file: ``{label: name}`` (label 0, background, is dropped).

    Accepted formats:

    * JSON object ``{"1": "GM", "2": "WM"}``;
    * text, one label per line: ``1 GM`` or ``1 grey matter`` (the rest of the line is the name);
    * a colour table as Slicer writes it, ``index name r g b a`` (trailing colour numbers are
      dropped), or as ITK-SNAP writes it, ``index r g b a vis mesh "name"`` (the quoted name).

    Blank lines and lines starting with ``#`` are skipped.  Duplicate names get ``_<label>``.
    Raises InputError naming the file (and line) when it cannot be read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"label names file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read label names file {path}: {error}") from None
    names: dict[int, str] = {}
    if path.lower().endswith(".json") or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"label names file {path} is not valid JSON: {error}") from None
        if not isinstance(data, Mapping):
            raise InputError(f'label names file {path} must hold a JSON object like {{"1": "GM"}}')
        for key, value in data.items():
            try:
                label = int(key)
            except (TypeError, ValueError):
                raise InputError(f"label names file {path}: key {key!r} is not an integer label") from None
            names[label] = str(value).strip()
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            quoted = re.search(r'"([^"]*)"', line)
            tokens = line.split()
            try:
                label = int(tokens[0])
            except ValueError:
                raise InputError(
                    f"label names file {path}, line {number}: {line!r} does not start with an integer label"
                ) from None
            if quoted:
                name = quoted.group(1)
            else:
                rest = tokens[1:]
                trailing = 0
                while trailing < len(rest) and re.fullmatch(r"[-+]?\d+(\.\d*)?", rest[len(rest) - 1 - trailing]):
                    trailing += 1
                if trailing in (3, 4) and len(rest) > trailing:  # colour table: name r g b [a]
                    rest = rest[: len(rest) - trailing]
                name = " ".join(rest)
            names[label] = name.strip() or str(label)
    names.pop(0, None)
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {label: (name if counts[name] == 1 else f"{name}_{label}") for label, name in names.items()}


def _check_output(out: str | None, overwrite: bool, inputs: Sequence[str], any_folder: bool = False) -> str | None:
    """Absolute output folder after checking it may receive the outputs (nothing is written)."""
    return None if out is None else check_output_folder(out, overwrite, inputs, OUTPUT_FILES.values(), any_folder)


def _check_files_exist(entries: Sequence[tuple[str, str | None]]) -> None:
    for role, path in entries:
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{role} file not found: {path}")


# ---------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------


def _read_labels(path: str, role: str):
    """A label map from ``path`` as an image, checked: scalar, integer values, not all background."""
    import numpy as np

    from . import image as im
    from .evaluate import label_array

    image = im.read_image(path, role, allow_constant=True)
    array = label_array(image, f"{role} {path}")
    if not np.any(array):
        raise InputError(f"{role} {path} are empty: every voxel is background (0); there is nothing to score")
    return image


def _check_grids(fixed, warped, fixed_path: str, warped_path: str, context: str) -> None:

    if not same_grid(fixed, warped):
        raise InputError(
            f"warped labels {warped_path} ({context}) are not on the grid of the fixed labels {fixed_path}: "
            f"{describe_grid(warped)} vs {describe_grid(fixed)}; resample them onto the fixed grid first "
            f"(cnnreg apply --reference {fixed_path} --interpolation nearest ...)"
        )


def _evaluate_pair(method: Method, index: int, subject: str, fixed, fixed_path: str, options: dict) -> dict:
    """All metrics of one (method, subject) pair as a JSON-friendly dict."""
    from . import image as im
    from .evaluate import evaluate_registration, label_set_difference

    context = f"method {method.name}, subject {subject}"
    warped_path = method.warped_labels[index]
    warped = _read_labels(warped_path, f"warped labels ({context})")
    _check_grids(fixed, warped, fixed_path, warped_path, context)
    left_out = label_set_difference(fixed, warped)
    field_path = method.displacements[index]
    displacement = im.read_displacement(field_path) if field_path else None
    if displacement is not None:
        if displacement.GetDimension() != fixed.GetDimension() or not same_grid(fixed, displacement):
            raise InputError(
                f"displacement field {field_path} ({context}) is not on the grid of the fixed labels {fixed_path}: "
                f"{displacement.GetDimension()}D {describe_grid(displacement)} vs {fixed.GetDimension()}D "
                f"{describe_grid(fixed)}; the field must live on the fixed grid"
            )
    import SimpleITK as sitk

    # field metrics (folding, det J, TRE) over the fixed mask, or by default the labelled region
    region = options["mask"] if options["mask"] is not None else sitk.GetArrayFromImage(fixed) > 0
    try:
        metrics = evaluate_registration(
            fixed,
            warped,
            field=displacement,
            true_field=options["true_field"],
            mask=region if displacement is not None else None,
            surface_distance=options["surface_distance"],
        )
    except InputError as error:
        raise InputError(f"{context} ({warped_path}): {error}") from None
    metrics.pop("label_names", None)
    if displacement is not None:
        metrics["region"] = f"mask {options['mask_path']}" if options["mask"] is not None else "fixed labels > 0"
    return {
        "method": method.name,
        "subject": subject,
        "files": {
            "fixed_labels": fixed_path,
            "warped_labels": warped_path,
            "displacement": field_path,
            "true_displacement": options["true_path"] if displacement is not None else None,
            "mask": options["mask_path"] if displacement is not None else None,
        },
        "labels_left_out": left_out,
        **metrics,
    }


def _tre_before(fixed, true_field, mask, mask_path) -> dict:
    """TRE of no registration (the true field's own length) over the region the methods are scored on."""
    import SimpleITK as sitk

    from .evaluate import target_registration_error

    zero = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, fixed.GetDimension())
    zero.CopyInformation(fixed)
    region = mask if mask is not None else sitk.GetArrayFromImage(fixed) > 0
    tre = target_registration_error(zero, true_field, region)
    return {**tre, "region": f"mask {mask_path}" if mask is not None else "fixed labels > 0"}


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values) -> float | None:
    values = _finite(values)
    return sum(values) / len(values) if values else None


_SCALAR_KEYS = ("dice_mean", "hd95_mean", "assd_mean", "folding_percent", "min_jacobian", "max_jacobian", "sdlogj")


def mean_over_subjects(results: Sequence[Mapping], methods: Sequence[str], labels: Sequence[int]) -> list[dict]:
    """Per method, the mean over its subjects of every metric (per-label Dice over the subjects
    where the label was scored; None where nothing was finite)."""
    summary = []
    for name in methods:
        rows = [r for r in results if r["method"] == name]
        entry = {"method": name, "subjects": len(rows)}
        for key in ("dice", "hd95", "assd"):
            if any(r.get(key) for r in rows):
                entry[key] = {label: _mean((r.get(key) or {}).get(label) for r in rows) for label in labels}
        for key in _SCALAR_KEYS:
            entry[key] = _mean(r.get(key) for r in rows)
        tre_rows = [r["tre"] for r in rows if r.get("tre")]
        entry["tre"] = (
            {k: _mean(t[k] for t in tre_rows) for k in ("mean", "median", "p95", "max")} if tre_rows else None
        )
        summary.append(entry)
    return summary


def _label_key(label: int, names: Mapping[int, str]) -> str:
    return names.get(label, str(label))


def csv_rows(results: Sequence[Mapping], labels: Sequence[int], names: Mapping[int, str]) -> list[dict]:
    """One flat row per (method, subject): per-label columns ``dice_<name>`` (label number when
    unnamed; empty where the label was not scored), means, field metrics, TRE, left-out labels."""
    has = {key: any(r.get(key) is not None for r in results) for key in ("hd95", "folding_percent", "tre")}
    rows = []
    for r in results:
        row = {"method": r["method"], "subject": r["subject"]}
        for key in ("dice", "hd95", "assd"):
            if key == "dice" or has["hd95"]:
                values = r.get(key) or {}
                for label in labels:
                    row[f"{key}_{_label_key(label, names)}"] = values.get(label)
                row[f"{key}_mean"] = r.get(f"{key}_mean")
        if has["folding_percent"]:
            for key in ("folding_percent", "min_jacobian", "max_jacobian", "sdlogj"):
                row[key] = r.get(key)
        if has["tre"]:
            tre = r.get("tre") or {}
            for key in ("mean", "median", "p95", "max"):
                row[f"tre_{key}_mm"] = tre.get(key)
        left = r["labels_left_out"]
        row["labels_only_in_fixed"] = " ".join(str(v) for v in left["only_in_fixed"])
        row["labels_only_in_warped"] = " ".join(str(v) for v in left["only_in_warped"])
        for key, path in r["files"].items():
            row[key] = path or ""
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# table and box plot
# ---------------------------------------------------------------------------------------


def _number(value, digits: int) -> str:
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _short(name: str, width: int = 12) -> str:
    return name if len(name) <= width else name[: width - 1] + "~"


def _aligned(header: Sequence[str], lines: Sequence[Sequence[str]], left: int) -> str:
    """Columns padded to their widest cell; the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(row[c]) for row in [header, *lines]) for c in range(len(header))]

    def render(row):
        cells = [cell.ljust(w) if c < left else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([render(header), *[render(row) for row in lines]])


def format_table(
    results: Sequence[Mapping], summary: Sequence[Mapping], labels: Sequence[int], names: Mapping[int, str]
) -> str:
    """The printed table: a line per method (per method and subject, plus a ``mean`` line per
    method, when there are several subjects).  Columns: Dice per label (when at most
    ``MAX_LABEL_COLUMNS`` labels), mean Dice, mean HD95 (mm), folding (%), min det J, SDlogJ,
    mean TRE (mm); columns without any value are left out.  With more labels, a second table
    gives the per-label Dice (mean over subjects) with a column per method."""
    several = len({r["subject"] for r in results}) > 1
    per_label = len(labels) <= MAX_LABEL_COLUMNS
    columns = []  # (header, getter, digits)
    if per_label:
        for label in labels:
            columns.append((_short(_label_key(label, names)), lambda r, lb=label: (r.get("dice") or {}).get(lb), 3))
    columns.append(("Dice", lambda r: r.get("dice_mean"), 3))
    optional = [
        ("HD95 mm", lambda r: r.get("hd95_mean"), 2),
        ("fold %", lambda r: r.get("folding_percent"), 3),
        ("min detJ", lambda r: r.get("min_jacobian"), 3),
        ("SDlogJ", lambda r: r.get("sdlogj"), 3),
        ("TRE mm", lambda r: (r.get("tre") or {}).get("mean"), 2),
    ]
    columns += [c for c in optional if any(c[1](r) is not None for r in results)]
    header = ["method", *(["subject"] if several else []), *[c[0] for c in columns]]
    lines = []
    for entry in summary:
        rows = [r for r in results if r["method"] == entry["method"]]
        shown = [(r, [r["subject"]] if several else []) for r in rows]
        if several:
            shown.append((entry, [f"mean ({entry['subjects']})"]))
        for row, subject in shown:
            lines.append([entry["method"], *subject, *[_number(get(row), digits) for _, get, digits in columns]])
    text = _aligned(header, lines, left=2 if several else 1)
    if not per_label:
        label_header = ["label", *[_short(e["method"]) for e in summary]]
        label_lines = [
            [_short(_label_key(label, names), 24), *[_number(e["dice"].get(label), 3) for e in summary]]
            for label in labels
        ]
        title = "Dice per label" + (" (mean over subjects)" if several else "")
        text += f"\n\n{title}\n" + _aligned(label_header, label_lines, left=1)
    return text


#: above this many labels the Dice box plot pools them (one box per method), as a plot per label
#: would be unreadably wide (an AAL atlas has 116)
POOLED_BOXPLOT_LABELS = 20


def dice_boxplot(
    results: Sequence[Mapping],
    methods: Sequence[str],
    labels: Sequence[int],
    names: Mapping[int, str],
    path: str,
    title: str | None = None,
) -> None:
    """Write a PNG of the Dice of each method, every value drawn as a point over its box: for each
    label (x axis, names when known) one box per method over the subjects, or, with more than
    :data:`POOLED_BOXPLOT_LABELS` labels, one box per method over every label and subject.
    ``results``: rows ``{"method", "subject", "dice": {label: value}}``."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    pooled = len(labels) > POOLED_BOXPLOT_LABELS
    groups = [list(labels)] if pooled else [[label] for label in labels]
    count = max(len(methods), 1)
    width = 0.8 / count
    figure_width = 1.5 + 1.1 * count if pooled else 1.5 + len(labels) * (0.3 + 0.35 * count)
    figure = Figure(figsize=(min(max(6.0, figure_width), 40.0), 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(count)]
    rng = np.random.default_rng(0)
    for m, method in enumerate(methods):
        rows = [r for r in results if r["method"] == method]
        positions, data = [], []
        for x, group in enumerate(groups):
            values = _finite((r.get("dice") or {}).get(label) for r in rows for label in group)
            if values:
                positions.append(x + (m - (count - 1) / 2) * width)
                data.append(values)
        if not data:
            continue
        boxes = axes.boxplot(
            data, positions=positions, widths=width * 0.8, patch_artist=True, showfliers=False, manage_ticks=False
        )
        for box in boxes["boxes"]:
            box.set_facecolor(colours[m])
            box.set_alpha(0.45)
        for median in boxes["medians"]:
            median.set_color("black")
        for position, values in zip(positions, data):
            jitter = rng.uniform(-0.15, 0.15, len(values)) * width
            axes.scatter(
                position + jitter, values, s=12, color=colours[m], edgecolors="black", linewidths=0.4, zorder=3
            )
    tick_names = [f"{len(labels)} labels" if pooled else _label_key(g[0], names) for g in groups]
    axes.set_xticks(range(len(groups)))
    rotate = max((len(n) for n in tick_names), default=0) > 6 or len(groups) > 12
    axes.set_xticklabels(tick_names, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    axes.set_xlim(-0.6, len(groups) - 0.4)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("labels, pooled" if pooled else "label")
    axes.set_ylabel("Dice")
    subjects = len({r["subject"] for r in results})
    axes.set_title(title or f"Dice per label, {subjects} subject{'s' if subjects != 1 else ''}")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(
        handles=[Patch(facecolor=c, alpha=0.45, edgecolor="black", label=m) for c, m in zip(colours, methods)],
        loc="lower left",
        fontsize="small",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------
# command
# ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """``cnnreg evaluate``: check everything, score every (method, subject), print, write."""
    from . import image as im

    subjects = _subject_names(args)
    count = len(subjects)
    methods = _methods_from_args(args, count)
    true_paths = _per_subject(args.true_displacement, count, "--true-displacement")
    mask_paths = _per_subject(args.mask, count, "--mask", allow_one=True)
    has_field = any(p for m in methods for p in m.displacements)
    if args.true_displacement and not has_field:
        raise InputError(
            "--true-displacement needs the methods' displacement fields (--displacement, or --result folders "
            "with displacement.nii.gz) to compute the target registration error"
        )
    inputs = [
        *args.fixed_labels,
        *[p for m in methods for p in m.warped_labels + m.displacements if p],
        *[p for p in true_paths + mask_paths if p],
        *([args.label_names] if args.label_names else []),
    ]
    out_dir = _check_output(args.out, args.overwrite, inputs, args.overwrite_any_folder)
    _check_files_exist(
        [("fixed labels", p) for p in args.fixed_labels]
        + [
            (f"{role} (method {m.name}, subject {s})", p)
            for m in methods
            for s, w, d in zip(subjects, m.warped_labels, m.displacements)
            for role, p in (("warped labels", w), ("displacement", d))
        ]
        + [("true displacement", p) for p in true_paths]
        + [("mask", p) for p in mask_paths]
    )
    names = read_label_names(args.label_names) if args.label_names else {}
    if args.mask and not has_field:
        print(
            "cnnreg evaluate: note: --mask only restricts field metrics and no displacement was given", file=sys.stderr
        )

    scored = {}  # (method, subject index) -> metrics; each fixed label map is read once
    before = {}  # subject -> TRE of no registration (with a true field)
    for index, (subject, fixed_path) in enumerate(zip(subjects, args.fixed_labels)):
        fixed = _read_labels(fixed_path, "fixed labels")
        mask = im.read_image(mask_paths[index], "mask", allow_constant=True) if mask_paths[index] else None
        true_field = im.read_displacement(true_paths[index]) if true_paths[index] else None
        options = {
            "true_field": true_field,
            "true_path": true_paths[index],
            "mask": mask,
            "mask_path": mask_paths[index],
            "surface_distance": not args.no_surface_distance,
        }
        for number, method in enumerate(methods):
            scored[number, index] = _evaluate_pair(method, index, subject, fixed, fixed_path, options)
        if true_field is not None:
            before[subject] = _tre_before(fixed, true_field, mask, mask_paths[index])
            print(
                f"cnnreg evaluate: before registration (u = 0), subject {subject}: TRE mean "
                f"{before[subject]['mean']:.3f} mm over {before[subject]['region']}",
                file=sys.stderr,
            )
    results = [scored[number, index] for number in range(len(methods)) for index in range(count)]

    for r in results:
        left = r["labels_left_out"]
        parts = [
            f"{', '.join(_label_key(v, names) for v in left[key])} (only in {where} labels)"
            for key, where in (("only_in_fixed", "fixed"), ("only_in_warped", "warped"))
            if left[key]
        ]
        if parts:
            print(
                f"cnnreg evaluate: note: method {r['method']}, subject {r['subject']}: labels left out: "
                f"{'; '.join(parts)}; scored only the labels present in both",
                file=sys.stderr,
            )
    labels = sorted({label for r in results for label in r["dice"]})
    method_names = [m.name for m in methods]
    summary = mean_over_subjects(results, method_names, labels)
    print(format_table(results, summary, labels, names))

    if out_dir is not None:
        from .outputs import staged_folder

        with staged_folder(out_dir) as stage:  # all files or none; --overwrite leaves exactly these
            _write_outputs(stage, results, summary, before, subjects, methods, labels, names, method_names)
        paths = {key: os.path.join(out_dir, name) for key, name in OUTPUT_FILES.items()}
        print(f"cnnreg evaluate: wrote {', '.join(paths.values())}", file=sys.stderr)
    return 0


def _write_outputs(folder, results, summary, before, subjects, methods, labels, names, method_names) -> None:
    """evaluation.csv, evaluation.json and dice_boxplot.png into ``folder``."""
    from .evaluate import evaluation_table, write_json

    paths = {key: os.path.join(folder, name) for key, name in OUTPUT_FILES.items()}
    evaluation_table(csv_rows(results, labels, names), csv_path=paths["csv"])
    write_json(
        {
            "subjects": subjects,
            "methods": [
                {"name": m.name, "warped_labels": m.warped_labels, "displacement": m.displacements} for m in methods
            ],
            "labels": labels,
            "label_names": {label: names[label] for label in labels if label in names},
            "units": {"hd95": "mm", "assd": "mm", "tre": "mm", "folding_percent": "% of voxels"},
            "results": results,
            "before_registration": before,
            "mean_over_subjects": summary,
        },
        paths["json"],
    )
    dice_boxplot(results, method_names, labels, names, paths["boxplot"])
