"""Export for simulation: a registration's result nodes -> ``python -m cnnreg simulation-inputs``.

No Qt. :func:`exportForSimulation` writes the warped organs (label map or segmentation), the
Jacobian map, the run's summary (from the transform node) and, when given, the patient's CT into
a temporary result folder, runs the backend's ``simulation-inputs`` on it (the same files as
the command line: organ, activity and attenuation maps, organ volumes) and loads the organ map
back as a segmentation carrying the organ names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import slicer

from cnnreg.grid import same_grid
from cnnreg.settings import OUTPUT_FILES

from . import nodes
from .process import BackendProcess

#: what ``simulation-inputs`` writes, in the order it is tried when loading the organ map back
ORGAN_MAP_FILES = ("organs.nii.gz", "organs.mhd")


class SimulationExportError(RuntimeError):
    """The export could not be done; the message names the problem (the backend's when it ran)."""


@dataclasses.dataclass
class SimulationExport:
    """What :func:`exportForSimulation` wrote: the folder, its ``simulation.json`` record (organ
    volumes, warnings) and the segmentation loaded from the organ map (None if not loaded)."""

    outputDirectory: str
    record: dict
    organsSegmentation: object | None


def parseEnergies(text: str) -> list:
    """Photon energies (keV) from a comma or space separated list (:class:`SimulationExportError`
    naming a bad entry)."""
    energies = []
    for entry in text.replace(",", " ").split():
        try:
            energy = float(entry)
        except ValueError:
            raise SimulationExportError(f"photon energy {entry!r} is not a number (keV, e.g. 140)") from None
        if not 0 < energy < 1e4:
            raise SimulationExportError(f"photon energy {entry} keV is out of range")
        energies.append(energy)
    return energies


def labelImageAndTable(organsNode, referenceVolumeNode) -> tuple:
    """Label map or segmentation node -> (label image on the reference grid, table).

    The table is a list of ``{"label", "name", "color"}``: a segmentation's segments (label =
    position + 1), or the names and colours of a label map's colour node for the labels present
    (``label_N`` where it has none)."""
    if organsNode.IsA("vtkMRMLSegmentationNode"):
        image, table = nodes.segmentationToLabelImage(organsNode, referenceVolumeNode)
        return image, [{key: entry[key] for key in ("label", "name", "color")} for entry in table]
    image = nodes.resampleLabelsToGrid(
        nodes.sitkImageFromVolumeNode(organsNode), nodes.sitkImageFromVolumeNode(referenceVolumeNode)
    )
    display = organsNode.GetDisplayNode()
    colors = display.GetColorNode() if display is not None else None
    table = []
    for label in (int(v) for v in np.unique(sitk.GetArrayViewFromImage(image)) if v != 0):
        name, color = f"label_{label}", (0.5, 0.5, 0.5)
        if colors is not None and 0 <= label < colors.GetNumberOfColors():
            known = colors.GetColorName(label)
            if known and known != "(none)":
                name = known
            rgba = [0.0, 0.0, 0.0, 0.0]
            colors.GetColor(label, rgba)
            color = tuple(rgba[:3])
        table.append({"label": label, "name": name, "color": color})
    return image, table


def _relabelByName(image: sitk.Image, table: list, target: list) -> sitk.Image:
    """``image`` labelled per ``table`` renumbered to the labels ``target`` gives the same names
    (organs absent from ``target`` become background)."""
    byName = {entry["name"]: entry["label"] for entry in target}
    array = sitk.GetArrayViewFromImage(image)
    out = np.zeros(array.shape, np.uint16)
    for entry in table:
        if entry["name"] in byName:
            out[array == entry["label"]] = byName[entry["name"]]
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


def exportForSimulation(
    transformNode,
    organsNode,
    outputDirectory: str,
    jacobianNode=None,
    ctVolumeNode=None,
    phantomLabelsNode=None,
    energies: Sequence[float] = (),
    activityTable: str | None = None,
    materialsTable: str | None = None,
    perOrgan: bool = False,
    formats: Sequence[str] = ("nifti",),
    overwrite: bool = False,
    loadOrgans: bool = True,
    python: str | None = None,
    extraPythonPath: Sequence[str] = (),
    timeout: float | None = 3600.0,
) -> SimulationExport:
    """Write the simulator inputs of a phantom -> patient registration into ``outputDirectory``.

    Args:
        transformNode: the registration's grid transform node (it carries the run's summary and
            references to the fixed volume and, after a run, the Jacobian map).
        organsNode: the warped organs on the fixed (patient) grid: label map or segmentation.
        jacobianNode: det J on the fixed grid (default: the one the run made).
        ctVolumeNode: the patient's CT in HU (an attenuation map from it at each energy).
        phantomLabelsNode: the phantom's organs as registered (for their volumes before warping).
        energies: photon energies, keV (e.g. 140 for Tc-99m).
        activityTable, materialsTable: files (CSV organ,value or JSON) as on the command line.
        formats: of ``nifti``, ``mhd``, ``interfile``.
        overwrite: replace an earlier simulation-inputs folder (never any other folder).
    Raises :class:`SimulationExportError` naming the problem; nothing is added to the scene then.
    """
    if transformNode is None or organsNode is None:
        raise SimulationExportError("select the registration's transform and the warped organs")
    if not outputDirectory:
        raise SimulationExportError("choose an output folder")
    summaryText = transformNode.GetAttribute(nodes.SUMMARY_ATTRIBUTE)
    if not summaryText:
        raise SimulationExportError(
            f"transform '{transformNode.GetName()}' was not made by a CNN registration (it carries no summary)"
        )
    fixedVolumeNode = transformNode.GetNodeReference(nodes.FIXED_VOLUME_REFERENCE)
    jacobianNode = jacobianNode or transformNode.GetNodeReference(nodes.JACOBIAN_REFERENCE)
    if fixedVolumeNode is None or jacobianNode is None:
        raise SimulationExportError(
            "the registration's fixed volume or Jacobian map is no longer in the scene; select the Jacobian map"
        )
    if (ctVolumeNode is not None or materialsTable) and not energies:
        raise SimulationExportError("an attenuation map needs a photon energy (keV), e.g. 140")
    workDirectory = tempfile.mkdtemp(prefix="CNNRegistration-simulation-")
    try:
        result = os.path.join(workDirectory, "result")
        os.mkdir(result)
        organs, table = labelImageAndTable(organsNode, fixedVolumeNode)
        if not table:
            raise SimulationExportError(f"'{organsNode.GetName()}' holds no organ (every voxel is background)")
        sitk.WriteImage(sitk.Cast(organs, sitk.sitkUInt16), os.path.join(result, OUTPUT_FILES["warped_labels"]))
        jacobian = nodes.sitkImageFromVolumeNode(jacobianNode)
        if not same_grid(jacobian, organs):
            raise SimulationExportError(f"the Jacobian map '{jacobianNode.GetName()}' is not on the fixed grid")
        sitk.WriteImage(sitk.Cast(jacobian, sitk.sitkFloat32), os.path.join(result, OUTPUT_FILES["jacobian"]))
        with open(os.path.join(result, OUTPUT_FILES["summary"]), "w", encoding="utf-8") as stream:
            stream.write(summaryText)
        namesPath = os.path.join(workDirectory, "organs.json")
        with open(namesPath, "w", encoding="utf-8") as stream:
            json.dump({str(entry["label"]): entry["name"] for entry in table}, stream)
        arguments = ["-m", "cnnreg", "simulation-inputs", "--result", result, "--label-names", namesPath]
        if ctVolumeNode is not None:
            ctPath = os.path.join(workDirectory, "ct.nrrd")
            ct = nodes.sitkImageFromVolumeNode(ctVolumeNode)
            if not same_grid(ct, organs):
                raise SimulationExportError(
                    f"the CT '{ctVolumeNode.GetName()}' is not on the registration's fixed grid; choose the fixed volume"
                )
            sitk.WriteImage(ct, ctPath)
            arguments += ["--ct", ctPath]
        if phantomLabelsNode is not None:
            movingVolumeNode = transformNode.GetNodeReference(nodes.MOVING_VOLUME_REFERENCE) or phantomLabelsNode
            if phantomLabelsNode.IsA("vtkMRMLSegmentationNode") and not movingVolumeNode.IsA("vtkMRMLVolumeNode"):
                raise SimulationExportError("the phantom's segmentation needs the registration's moving volume")
            phantom, phantomTable = labelImageAndTable(phantomLabelsNode, movingVolumeNode)
            phantomPath = os.path.join(workDirectory, "phantom_labels.nrrd")
            sitk.WriteImage(_relabelByName(phantom, phantomTable, table), phantomPath)
            arguments += ["--moving-labels", phantomPath]
        for energy in energies:
            arguments += ["--energy", f"{float(energy):g}"]
        if activityTable:
            arguments += ["--activity", activityTable] + (["--per-organ"] if perOrgan else [])
        if materialsTable:
            arguments += ["--materials", materialsTable]
        arguments += ["--format", ",".join(formats), "--out", outputDirectory] + (["--overwrite"] if overwrite else [])
        _runBackend(arguments, python, extraPythonPath, workDirectory, timeout)
        with open(os.path.join(outputDirectory, "simulation.json"), encoding="utf-8") as stream:
            record = json.load(stream)
        segmentation = None
        if loadOrgans:
            segmentation = _loadOrgans(outputDirectory, table, organsNode, fixedVolumeNode)
        return SimulationExport(outputDirectory, record, segmentation)
    finally:
        shutil.rmtree(workDirectory, ignore_errors=True)


def exportFromPanel(
    parameterNode, outputDirectory: str, activityTable: str = "", materialsTable: str = ""
) -> SimulationExport:
    """:func:`exportForSimulation` with the module panel's choices (its parameter node: the last
    run's transform and Jacobian, ``simulation*`` fields); an earlier export folder is replaced."""
    formats = [
        name
        for name, chosen in (
            ("nifti", parameterNode.simulationNifti),
            ("mhd", parameterNode.simulationMetaImage),
            ("interfile", parameterNode.simulationInterfile),
        )
        if chosen
    ]
    return exportForSimulation(
        parameterNode.outputTransform,
        parameterNode.simulationOrgans,
        outputDirectory,
        jacobianNode=parameterNode.outputJacobian,
        ctVolumeNode=parameterNode.simulationCT,
        phantomLabelsNode=parameterNode.movingLabels,
        energies=parseEnergies(parameterNode.simulationEnergies),
        activityTable=activityTable or None,
        materialsTable=materialsTable or None,
        perOrgan=parameterNode.simulationPerOrgan,
        formats=formats or ["nifti"],
        overwrite=True,
    )


def _runBackend(arguments, python, extraPythonPath, workDirectory, timeout) -> None:
    process = BackendProcess(arguments, python=python, extraPythonPath=extraPythonPath, workingDirectory=workDirectory)
    process.start()
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.cancel()
        raise SimulationExportError(f"simulation-inputs did not finish within {timeout:g} s") from None
    except BaseException:
        process.cancel()
        raise
    if code != 0:  # the command names the problem on stderr
        detail = process.stderrTail(8) or "no message"
        raise SimulationExportError(f"simulation-inputs failed (exit code {code}): {detail}")


def _loadOrgans(folder: str, table: list, organsNode, fixedVolumeNode):
    """The written organ map as a new segmentation named after the organs node (None when only
    Interfile was written: SimpleITK does not read it)."""
    for name in ORGAN_MAP_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            scene = organsNode.GetScene() or slicer.mrmlScene
            return nodes.labelImageToSegmentation(
                sitk.ReadImage(path),
                table,
                scene.GenerateUniqueName(f"{organsNode.GetName()} for simulation"),
                fixedVolumeNode,
                scene,
            )
    return None
