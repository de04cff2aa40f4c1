"""Simulator inputs from a phantom-to-patient registration: ``python -m cnnreg simulation-inputs``.

From a ``register`` result folder (the phantom warped onto the patient's CT grid) it writes what a
SPECT/PET simulation needs, on the patient grid:

* ``organs``: the warped organ label map, with the organ names carried through
  (``organs.json``, and ``organs.ctbl``, a Slicer colour table);
* ``activity``: an activity-concentration map from a table organ -> concentration (kBq/ml or
  relative units), and with ``--per-organ`` one map per organ (``activity_<organ>``);
* ``mu_ct_<E>keV``: a linear attenuation map (1/cm) at photon energy E from the patient's CT
  (bilinear HU -> mu, :func:`mu_from_hu`) and, with ``--materials``, ``mu_labels_<E>keV`` from
  the warped labels and a table label -> material (:func:`mu_from_labels`);
* ``organ_volumes.csv``: each organ's volume in the phantom, after warping (label counts) and
  as the integral of det J over the warped organ, with warnings where they disagree;
* ``simulation.json``: units, axis order, energies, sources, the volume table, the warnings.

Formats (``--format``, comma list): ``nifti`` (``.nii.gz``), ``mhd`` (MetaImage ``.mhd`` +
``.raw``, what GATE reads), ``interfile`` (``.h33`` header + ``.i33`` raw little-endian
float32, SIMIND and STIR): voxel sizes in mm; in the raw files the first index ``i`` varies
fastest, then ``j``, then ``k`` (the image's own index axes; their world directions are in the
NIfTI/MetaImage headers, LPS).  Attenuation data: NIST XCOM (``cnnreg/data/attenuation.json``).
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import functools
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .grid import describe_grid, same_grid

ATTENUATION_TABLE = Path(__file__).resolve().parent / "data" / "attenuation.json"
#: CT number of cortical bone on the upper line of the bilinear HU -> mu conversion (compact
#: bone of a 120 kVp CT is ~1500-1900 HU; below 0 HU the line runs from air to water)
CORTICAL_BONE_HU = 1500.0
FORMATS = ("nifti", "mhd", "interfile")
SUFFIXES = {"nifti": (".nii.gz",), "mhd": (".mhd", ".raw"), "interfile": (".h33", ".i33")}
#: the names this command writes (what an earlier run with other options may have left)
OWN_FILE_NAMES = re.compile(
    r"(organs|activity(_[A-Za-z0-9_.-]+)?|mu_(ct|labels)_[0-9.]+keV)\.(nii\.gz|mhd|raw|h33|i33)"
    r"|organs\.json|organs\.ctbl|organ_volumes\.csv|simulation\.json"
)
#: warn when the label-count and det J volumes of an organ differ by more than this (relative)
VOLUME_TOLERANCE = 0.05


# ----------------------------------------------------------------------------- attenuation


@functools.lru_cache(maxsize=1)
def attenuation_data() -> dict:
    """The NIST XCOM table of :data:`ATTENUATION_TABLE` (materials -> density, energy rows)."""
    return json.loads(ATTENUATION_TABLE.read_text())


def _material(name: str) -> dict:
    """The table entry of a NIST material; InputError naming the known ones otherwise."""
    materials = attenuation_data()["materials"]
    if name not in materials:
        raise InputError(f"unknown material {name!r}; known: {sorted(materials)}")
    return materials[name]


def linear_attenuation(material: str, energy_kev: float, density: float | None = None) -> float:
    """Linear attenuation coefficient (1/cm) of a NIST material at ``energy_kev``: the mass
    attenuation coefficient interpolated log-log between the table's energies, times the density
    (g/cm^3; the table's when None)."""
    entry = _material(material)
    table = np.asarray(entry["energy_kev_mass_attenuation_cm2_per_g"], dtype=np.float64)
    if not table[0, 0] <= energy_kev <= table[-1, 0]:
        raise InputError(f"photon energy {energy_kev} keV is outside the table ({table[0, 0]:g}-{table[-1, 0]:g} keV)")
    mass = math.exp(np.interp(math.log(energy_kev), np.log(table[:, 0]), np.log(table[:, 1])))
    return mass * (entry["density_g_per_cm3"] if density is None else float(density))


def mu_from_hu(hu: np.ndarray, energy_kev: float) -> np.ndarray:
    """Bilinear HU -> linear attenuation (1/cm) at ``energy_kev``: from air (-1000 HU) to water
    (0 HU), then from water to cortical bone (:data:`CORTICAL_BONE_HU`), each linear; values
    below -1000 HU (padding) are air; never negative."""
    air, water = linear_attenuation("air", energy_kev), linear_attenuation("water", energy_kev)
    bone = linear_attenuation("bonecortical", energy_kev)
    hu = np.maximum(np.asarray(hu, dtype=np.float64), -1000.0)
    low = air + (water - air) * (hu + 1000.0) / 1000.0
    high = water + (bone - water) * hu / CORTICAL_BONE_HU
    return np.maximum(np.where(hu <= 0, low, high), 0.0).astype(np.float32)


def mu_from_labels(
    labels: np.ndarray, materials: Mapping[int, tuple[str, float | None]], energy_kev: float
) -> np.ndarray:
    """Linear attenuation (1/cm) per voxel from a label map and ``{label: (material, density)}``
    (density g/cm^3, None = the material's); labels not in the table (background) are air."""
    out = np.full(labels.shape, linear_attenuation("air", energy_kev), dtype=np.float32)
    for label, (material, density) in materials.items():
        out[labels == label] = linear_attenuation(material, energy_kev, density)
    return out


# ----------------------------------------------------------------------------- tables


def read_label_names(path: str | os.PathLike) -> dict[int, str]:
    """Organ names: a JSON object ``{"1": "body", ...}`` or a Slicer colour table (lines
    ``value name r g b a``, ``#`` comments)."""
    text = _read_text(path, "label table")
    if str(path).lower().endswith(".json"):
        try:
            return {int(key): str(value) for key, value in json.loads(text).items()}
        except (ValueError, AttributeError) as error:
            raise InputError(f"label table {path}: expected a JSON object label -> name ({error})") from None
    names = {}
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 2 or not parts[0].lstrip("-").isdigit():
            raise InputError(f"label table {path}, line {number}: expected 'value name r g b a', got {line!r}")
        names[int(parts[0])] = parts[1]
    return names


def slicer_color_table(names: Mapping[int, str]) -> str:
    """A Slicer colour table (``.ctbl``): one line ``value name r g b a`` per label."""
    lines = [
        "# Color table file written by cnnreg simulation-inputs",
        f"# {len(names) + 1} values",
        "0 background 0 0 0 0",
    ]
    for label, name in sorted(names.items()):
        hue = (label * 0.618033988749895) % 1.0  # well-spread colours, the same for a label every time
        r, g, b = (int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.65, 0.95))
        lines.append(f"{label} {re.sub(r'[^A-Za-z0-9_.-]', '_', name)} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


def read_value_table(path: str | os.PathLike, names: Mapping[int, str], what: str) -> dict[int, str]:
    """A two-column table organ -> value (CSV ``organ,value`` with an optional header, or a JSON
    object); an organ is a label number or a name of ``names``.  Values are returned as text."""
    text = _read_text(path, what)
    if str(path).lower().endswith(".json"):
        try:
            rows = list(json.loads(text).items())
        except (ValueError, AttributeError) as error:
            raise InputError(f"{what} {path}: expected a JSON object organ -> value ({error})") from None
    else:
        rows = [row for row in csv.reader(text.splitlines()) if row and not row[0].startswith("#")]
    by_name = {name.lower(): label for label, name in names.items()}
    table = {}
    for row in rows:
        if len(row) < 2:
            raise InputError(f"{what} {path}: expected 'organ,value' rows, got {row!r}")
        organ, value = str(row[0]).strip(), row[1]
        if organ.lstrip("-").isdigit():
            table[int(organ)] = value
        elif organ.lower() in by_name:
            table[by_name[organ.lower()]] = value
        elif table or _is_number(value):
            raise InputError(f"{what} {path}: unknown organ {organ!r}; known: {sorted(names.values())}")
        # else: a header row such as "organ,concentration"
    return table


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _read_text(path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror or error}") from None


# ----------------------------------------------------------------------------- organ volumes


def organ_volumes(
    warped_labels: sitk.Image,
    jacobian: sitk.Image,
    affine_determinant: float,
    names: Mapping[int, str],
    phantom_labels: sitk.Image | None = None,
) -> tuple[list[dict], list[str]]:
    """Per organ, in ml: ``warped_ml`` (label count x voxel volume on the patient grid),
    ``jacobian_ml`` (the integral of det J of the whole mapping over the warped organ: the
    phantom volume that landed there; det J = ``jacobian`` x ``affine_determinant``),
    ``phantom_ml`` (label count on the phantom grid, when given), the smallest det J and the
    folded voxels in the organ.  Returns the rows and warnings (volumes apart by more than
    :data:`VOLUME_TOLERANCE`, folding, an organ partly outside the patient's field of view)."""
    labels = sitk.GetArrayViewFromImage(warped_labels)
    determinant = sitk.GetArrayViewFromImage(jacobian).astype(np.float64) * affine_determinant
    voxel_ml = math.prod(warped_labels.GetSpacing()) / 1000.0
    phantom = sitk.GetArrayViewFromImage(phantom_labels) if phantom_labels is not None else None
    phantom_voxel_ml = math.prod(phantom_labels.GetSpacing()) / 1000.0 if phantom_labels is not None else None
    rows, warnings = [], []
    present = sorted(set(np.unique(labels).tolist()) | set(names)) if names else sorted(np.unique(labels).tolist())
    for label in (v for v in present if v != 0):
        inside = labels == label
        name = names.get(label, str(label))
        row = {
            "label": int(label),
            "organ": name,
            "warped_ml": float(inside.sum() * voxel_ml),
            "jacobian_ml": float(determinant[inside].sum() * voxel_ml),
            "phantom_ml": float((phantom == label).sum() * phantom_voxel_ml) if phantom is not None else None,
            "min_jacobian": float(determinant[inside].min()) if inside.any() else None,
            "folded_voxels": int((determinant[inside] <= 0).sum()),
        }
        rows.append(row)
        if row["folded_voxels"]:
            warnings.append(f"{name}: {row['folded_voxels']} folded voxels (det J <= 0) inside the warped organ")
        if row["phantom_ml"] and abs(row["jacobian_ml"] / row["phantom_ml"] - 1) > VOLUME_TOLERANCE:
            warnings.append(
                f"{name}: the det J integral over the warped organ ({row['jacobian_ml']:.1f} ml) differs from its "
                f"phantom volume ({row['phantom_ml']:.1f} ml) by more than {100 * VOLUME_TOLERANCE:.0f} %: the "
                "organ is partly outside the patient's field of view, or the labels were resampled coarsely"
            )
    return rows, warnings


# ----------------------------------------------------------------------------- formats


def write_interfile(image: sitk.Image, header_path: str | os.PathLike) -> list[str]:
    """Interfile 3.3 header (``.h33``) + raw little-endian float32 data (``.i33``) of a 3D
    image; ``i`` varies fastest.  Returns the two paths."""
    header_path = os.fspath(header_path)
    data_path = os.path.splitext(header_path)[0] + ".i33"
    array = sitk.GetArrayFromImage(image).astype("<f4")  # (k, j, i): i fastest in C order
    if array.ndim != 3:
        raise InputError(f"Interfile output needs a 3D image, got {array.ndim}D")
    array.tofile(data_path)
    size, spacing = image.GetSize(), image.GetSpacing()
    lines = [
        "!INTERFILE :=",
        "!imaging modality := nucmed",
        "!version of keys := 3.3",
        f"!name of data file := {os.path.basename(data_path)}",
        "!GENERAL DATA :=",
        "!data offset in bytes := 0",
        "imagedata byte order := LITTLEENDIAN",
        "!GENERAL IMAGE DATA :=",
        "!type of data := Tomographic",
        f"!total number of images := {size[2]}",
        "!number format := float",
        "!number of bytes per pixel := 4",
        "number of dimensions := 3",
        "matrix axis label [1] := x",
        f"!matrix size [1] := {size[0]}",
        f"scaling factor (mm/pixel) [1] := {spacing[0]:.6f}",
        "matrix axis label [2] := y",
        f"!matrix size [2] := {size[1]}",
        f"scaling factor (mm/pixel) [2] := {spacing[1]:.6f}",
        "matrix axis label [3] := z",
        f"!matrix size [3] := {size[2]}",
        f"scaling factor (mm/pixel) [3] := {spacing[2]:.6f}",
        f"slice thickness (pixels) := {1.0:.1f}",
        "!END OF INTERFILE :=",
    ]
    Path(header_path).write_text("\n".join(lines) + "\n")
    return [header_path, data_path]


def read_interfile(header_path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...]]:
    """The array ``(k, j, i)`` and spacing ``(s_i, s_j, s_k)`` (mm) of an Interfile written by
    :func:`write_interfile` (the keys it writes; no general Interfile reader)."""
    keys = {}
    for line in Path(header_path).read_text().splitlines():
        if ":=" in line:
            key, _, value = line.partition(":=")
            keys[key.strip().lstrip("!").lower()] = value.strip()
    size = [int(keys[f"matrix size [{n}]"]) for n in (1, 2, 3)]
    spacing = tuple(float(keys[f"scaling factor (mm/pixel) [{n}]"]) for n in (1, 2, 3))
    dtype = "<f4" if keys.get("imagedata byte order", "LITTLEENDIAN").upper() == "LITTLEENDIAN" else ">f4"
    data = np.fromfile(Path(header_path).parent / keys["name of data file"], dtype=dtype)
    return data.reshape(size[::-1]), spacing


def write_map(image: sitk.Image, folder: str, stem: str, formats: Sequence[str]) -> list[str]:
    """Write ``image`` as ``folder/stem`` in each format; returns the file names written."""
    from .outputs import write_verified_image

    written = []
    for fmt in formats:
        if fmt == "nifti":
            write_verified_image(image, os.path.join(folder, stem + ".nii.gz"))
        elif fmt == "mhd":
            sitk.WriteImage(image, os.path.join(folder, stem + ".mhd"), useCompression=False)
        else:
            write_interfile(sitk.Cast(image, sitk.sitkFloat32), os.path.join(folder, stem + ".h33"))
        written += [stem + suffix for suffix in SUFFIXES[fmt]]
    return written


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .outputs import add_overwrite_any_folder_argument

    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--result", required=True, help="a `cnnreg register` output folder (phantom -> patient)")
    parser.add_argument("--label-names", help="organ names: JSON {label: name} or a Slicer colour table")
    parser.add_argument("--moving-labels", help="the phantom's label map as registered (for its organ volumes)")
    parser.add_argument(
        "--activity", help="organ -> activity concentration (kBq/ml or relative): CSV organ,value or JSON"
    )
    parser.add_argument("--per-organ", action="store_true", help="also one activity map per organ")
    parser.add_argument("--ct", help="the patient's CT in HU on the registration's fixed grid (attenuation map)")
    parser.add_argument(
        "--materials",
        help="label -> material for an attenuation map from the warped labels: CSV organ,material[:density g/cm3] "
        f"or JSON; materials: {', '.join(sorted(attenuation_data()['materials']))}",
    )
    parser.add_argument(
        "--energy", type=float, action="append", help="photon energy, keV (repeatable; e.g. 140 Tc-99m, 208 Lu-177)"
    )
    parser.add_argument("--format", default="nifti", help=f"comma list of {', '.join(FORMATS)}")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing simulation-inputs folder")
    add_overwrite_any_folder_argument(parser)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def run(args: argparse.Namespace) -> int:
    from . import image as im
    from .outputs import check_output_folder, claimed_folder, staged_folder, write_verified_text
    from .settings import OUTPUT_FILES

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(f"unknown --format {unknown or args.format!r}; choose from {list(FORMATS)}")
    energies = args.energy or []
    if (args.ct or args.materials) and not energies:
        raise InputError("an attenuation map needs --energy KEV (e.g. --energy 140)")
    result = Path(args.result)
    summary_path = result / OUTPUT_FILES["summary"]
    labels_path = result / OUTPUT_FILES["warped_labels"]
    if not summary_path.is_file() or not labels_path.is_file():
        raise InputError(
            f"{result} is not a `cnnreg register` result with warped labels ({OUTPUT_FILES['summary']} and "
            f"{OUTPUT_FILES['warped_labels']}); register with --moving-labels"
        )
    summary = json.loads(summary_path.read_text())
    warped = im.read_image(labels_path, "warped labels", allow_constant=True)
    jacobian = im.read_image(result / OUTPUT_FILES["jacobian"], "Jacobian determinant", allow_constant=True)
    present = sorted(v for v in np.unique(sitk.GetArrayViewFromImage(warped)).tolist() if v != 0)
    names = read_label_names(args.label_names) if args.label_names else {}
    names = {label: names.get(label, f"label_{label}") for label in sorted(set(present) | set(names))}
    activity = (
        {k: float(v) for k, v in read_value_table(args.activity, names, "activity table").items()}
        if args.activity
        else {}
    )
    materials = {}
    if args.materials:
        for label, value in read_value_table(args.materials, names, "material table").items():
            material, _, density = str(value).partition(":")
            _material(material.strip())  # an unknown material is named before anything is written
            materials[label] = (material.strip(), float(density) if density else None)
    ct = None
    if args.ct:
        ct = im.read_image(args.ct, "CT")
        if not same_grid(ct, warped):
            raise InputError(f"the CT {args.ct} is not on the registration's fixed grid ({describe_grid(warped)})")
    phantom = im.read_image(args.moving_labels, "phantom labels", allow_constant=True) if args.moving_labels else None

    stems = ["organs"]
    if activity:
        stems += ["activity"] + ([f"activity_{_slug(names[k])}" for k in activity] if args.per_organ else [])
    stems += [f"mu_ct_{e:g}keV" for e in energies if ct is not None]
    stems += [f"mu_labels_{e:g}keV" for e in energies if materials]
    files = [name for stem in stems for fmt in formats for name in (stem + s for s in SUFFIXES[fmt])]
    files += ["organs.json", "organs.ctbl", "organ_volumes.csv", "simulation.json"]
    if os.path.isdir(args.out):  # an earlier run's maps (other energies or organs) are ours to replace
        files += [entry for entry in os.listdir(args.out) if OWN_FILE_NAMES.fullmatch(entry)]
    inputs = [
        p for p in (args.result, args.label_names, args.activity, args.ct, args.materials, args.moving_labels) if p
    ]
    out_dir = check_output_folder(args.out, args.overwrite, inputs, files, args.overwrite_any_folder)

    labels = sitk.GetArrayViewFromImage(warped)
    affine = summary.get("affine_determinant", 1.0)
    rows, warnings = organ_volumes(warped, jacobian, float(affine), names, phantom)
    voxel_ml = math.prod(warped.GetSpacing()) / 1000.0
    record = {
        "result": os.path.abspath(args.result),
        "grid": {
            "size": list(warped.GetSize()),
            "spacing_mm": list(warped.GetSpacing()),
            "origin_lps_mm": list(warped.GetOrigin()),
            "direction": list(warped.GetDirection()),
        },
        "axis_order": "raw data (.raw, .i33): i fastest, then j, then k (the patient grid's index axes; "
        "their LPS directions are in the NIfTI/MetaImage headers)",
        "formats": formats,
        "units": {"activity": "as the activity table (e.g. kBq/ml) per voxel", "mu": "1/cm", "volumes": "ml"},
        "energies_kev": energies,
        "attenuation_source": attenuation_data()["source"],
        "hu_to_mu": f"bilinear: air (-1000 HU) to water (0 HU), water to cortical bone ({CORTICAL_BONE_HU:g} HU)",
        "organs": {str(k): v for k, v in names.items()},
        "activity_concentration": {names[k]: v for k, v in activity.items()},
        "total_activity": float(sum(v * (labels == k).sum() * voxel_ml for k, v in activity.items())),
        "materials": {names[k]: {"material": m, "density_g_per_cm3": d} for k, (m, d) in materials.items()},
        "organ_volumes": rows,
        "warnings": warnings,
    }

    def image_like(array: np.ndarray) -> sitk.Image:
        return im.array_to_image(array, warped)

    with claimed_folder(out_dir) as claim, staged_folder(out_dir, claim) as stage:
        write_map(sitk.Cast(warped, sitk.sitkUInt16), stage, "organs", formats)
        write_verified_text(os.path.join(stage, "organs.json"), json.dumps(record["organs"], indent=2))
        write_verified_text(os.path.join(stage, "organs.ctbl"), slicer_color_table(names))
        if activity:
            summed = np.zeros(labels.shape, np.float32)
            for label, value in activity.items():
                summed[labels == label] = value
            write_map(image_like(summed), stage, "activity", formats)
            if args.per_organ:
                for label, value in activity.items():
                    organ = np.where(labels == label, np.float32(value), np.float32(0))
                    write_map(image_like(organ), stage, f"activity_{_slug(names[label])}", formats)
        for energy in energies:
            if ct is not None:
                write_map(
                    image_like(mu_from_hu(sitk.GetArrayViewFromImage(ct), energy)),
                    stage,
                    f"mu_ct_{energy:g}keV",
                    formats,
                )
            if materials:
                write_map(
                    image_like(mu_from_labels(labels, materials, energy)), stage, f"mu_labels_{energy:g}keV", formats
                )
        with open(os.path.join(stage, "organ_volumes.csv"), "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["label", "organ"])
            writer.writeheader()
            writer.writerows(rows)
        write_verified_text(os.path.join(stage, "simulation.json"), json.dumps(record, indent=2))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"cnnreg simulation-inputs: wrote {len(stems)} maps ({', '.join(formats)}) into {out_dir}", file=sys.stderr)
    return 0
