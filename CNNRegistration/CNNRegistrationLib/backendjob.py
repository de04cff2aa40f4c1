"""One registration run: input nodes -> temporary files -> backend process -> output nodes.

No Qt: the module widget drives a :class:`RegistrationJob` with ``start``/``poll``/``finish``
from a ``QTimer``; scripts and tests call :meth:`RegistrationJob.run`, which blocks.
Nothing is added to the scene before the backend has finished successfully, and the
temporary folder is removed in every case unless ``keepTemporaryFiles`` is set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Callable

import SimpleITK as sitk
import slicer

from cnnreg.settings import EXIT_CANCELLED, EXIT_DEVICE, EXIT_INPUT, EXIT_NUMERIC, OUTPUT_FILES

from . import nodes
from .panel import PanelSettings
from .process import BackendProcess, insideSlicer


class RegistrationError(RuntimeError):
    """The backend failed; ``returncode`` is its exit code (2 bad input, 3 device, 4 numerical)."""

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode


class RegistrationCancelled(RegistrationError):
    """The run was cancelled by the user."""


@dataclasses.dataclass
class JobResult:
    """Output nodes of a run and the backend's ``summary.json`` (keys include
    ``similarity_before``, ``similarity_after``, ``folding_percent``, ``min_jacobian``,
    ``sdlogj``, ``seconds``, ``device``)."""

    outputVolume: object
    outputTransform: object
    outputJacobian: object | None
    outputLabels: object | None
    summary: dict
    workDirectory: str | None = None  # kept only with keepTemporaryFiles
    qcImagePath: str | None = None  # idem


class RegistrationJob:
    """Register ``movingVolumeNode`` to ``fixedVolumeNode`` with the ``cnnreg`` backend.

    Args:
        fixedVolumeNode, movingVolumeNode: scalar volume nodes (their world geometry,
            including a linear parent transform, is used; they are never modified).
        settings: :class:`PanelSettings` (defaults when None).
        movingLabelsNode: optional label map volume or segmentation node on the moving
            image, warped with nearest-neighbour interpolation into a new node of the same kind.
        fixedMaskNode: optional label map or segmentation on the fixed image (non-zero = inside).
        outputVolumeNode, outputTransformNode, outputJacobianNode: nodes to fill; created
            when None (a ``vtkMRMLGridTransformNode`` for the transform).
        python: interpreter for the backend (default: :func:`process.pythonExecutable`).
        extraPythonPath: folders put before the bundled backend on the child's
            ``PYTHONPATH`` (e.g. a development checkout of ``cnnreg``).
        temporaryDirectory: parent of the run's temporary folder (default: Slicer's
            temporary path in the application, the system's otherwise).
    """

    def __init__(
        self,
        fixedVolumeNode,
        movingVolumeNode,
        settings: PanelSettings | None = None,
        movingLabelsNode=None,
        fixedMaskNode=None,
        outputVolumeNode=None,
        outputTransformNode=None,
        outputJacobianNode=None,
        python: str | None = None,
        extraPythonPath: Sequence[str] = (),
        temporaryDirectory: str | None = None,
    ):
        if fixedVolumeNode is None or movingVolumeNode is None:
            raise ValueError("select both a fixed and a moving volume")
        if fixedVolumeNode is movingVolumeNode:
            raise ValueError("the fixed and moving volumes must be different nodes")
        inputs = [node for node in (fixedVolumeNode, movingVolumeNode, movingLabelsNode, fixedMaskNode) if node]
        outputs = [node for node in (outputVolumeNode, outputTransformNode, outputJacobianNode) if node]
        if any(output is node for output in outputs for node in inputs):
            raise ValueError("an output node is also an input; choose or create another output volume")
        if outputVolumeNode is not None and outputVolumeNode is outputJacobianNode:
            raise ValueError("the registered volume and the Jacobian map need two different nodes")
        self.fixedVolumeNode = fixedVolumeNode
        self.movingVolumeNode = movingVolumeNode
        self.settings = settings or PanelSettings()
        self.movingLabelsNode = movingLabelsNode
        self.fixedMaskNode = fixedMaskNode
        self.outputVolumeNode = outputVolumeNode
        self.outputTransformNode = outputTransformNode
        self.outputJacobianNode = outputJacobianNode
        self.python = python
        self.extraPythonPath = tuple(extraPythonPath)
        if temporaryDirectory is None and insideSlicer():
            temporaryDirectory = slicer.app.temporaryPath
        self.temporaryDirectory = temporaryDirectory
        self.scene = fixedVolumeNode.GetScene() or slicer.mrmlScene
        self.workDirectory: str | None = None
        self.process: BackendProcess | None = None
        self.lastProgress: dict | None = None
        self.summary: dict | None = None
        self.errorMessage: str | None = None
        self._segmentTable: list | None = None

    # -- running --------------------------------------------------------------------------

    @property
    def outputDirectory(self) -> str | None:
        return os.path.join(self.workDirectory, "output") if self.workDirectory else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def start(self) -> None:
        """Write the inputs to a new temporary folder and start the backend (returns at once)."""
        if self.process is not None:
            raise RuntimeError("this job was already started; create a new RegistrationJob")
        self.workDirectory = tempfile.mkdtemp(prefix="CNNRegistration-", dir=self.temporaryDirectory)
        try:
            arguments = self._writeInputs()
            self.process = BackendProcess(
                arguments, python=self.python, extraPythonPath=self.extraPythonPath, workingDirectory=self.workDirectory
            )
            self.process.start()
        except BaseException:
            self.cleanup()
            raise

    def poll(self) -> list:
        """New backend events (see :class:`process.BackendProcess`); remembers the last
        ``progress`` event, the ``done`` summary and the ``error`` message."""
        if self.process is None:
            return []
        events = self.process.poll()
        for event in events:
            kind = event.get("event")
            if kind == "progress":
                self.lastProgress = event
            elif kind == "done":
                self.summary = event.get("summary")
            elif kind == "error":
                self.errorMessage = event.get("message")
            elif kind in ("log", "stderr"):
                logging.debug("cnnreg: %s", event.get("message"))
        return events

    def cancel(self) -> None:
        """Kill the backend process tree and remove the temporary folder (unless kept)."""
        try:
            if self.process is not None:
                self.process.cancel()
        finally:
            self.cleanup()

    def finish(self) -> JobResult:
        """After the process has ended: load the outputs into nodes. Raises
        :class:`RegistrationCancelled` or :class:`RegistrationError`. Always cleans up."""
        try:
            if self.process is None:
                raise RuntimeError("the job was not started")
            if self.process.running:
                raise RuntimeError("the backend is still running; wait, or cancel it first")
            self.poll()
            if self.process.cancelled:  # only what the user asked for is "cancelled"
                raise RegistrationCancelled("Registration cancelled.", self.process.returncode)
            if self.process.returncode != 0:
                raise RegistrationError(self._failureMessage(), self.process.returncode)
            return self._loadOutputs()
        finally:
            self.cleanup()

    def run(
        self,
        progressCallback: Callable[[dict], None] | None = None,
        pollInterval: float = 0.1,
        timeout: float | None = None,
    ) -> JobResult:
        """Start, wait (calling ``progressCallback`` with every event) and finish. The process
        is cancelled if this call is interrupted or runs longer than ``timeout`` seconds."""
        self.start()
        started = time.monotonic()
        try:
            while self.running:
                for event in self.poll():
                    if progressCallback:
                        progressCallback(event)
                if timeout is not None and time.monotonic() - started > timeout:
                    raise RegistrationError(f"the backend did not finish within {timeout:g} s")
                time.sleep(pollInterval)
            for event in self.poll():
                if progressCallback:
                    progressCallback(event)
        except BaseException:
            self.cancel()
            raise
        return self.finish()

    def cleanup(self) -> None:
        """Remove the temporary folder unless ``settings.keepTemporaryFiles``."""
        if not self.workDirectory or not os.path.isdir(self.workDirectory):
            return
        if self.settings.keepTemporaryFiles:
            logging.info("CNNRegistration: temporary files kept in %s", self.workDirectory)
            return
        shutil.rmtree(self.workDirectory, ignore_errors=True)

    # -- inputs and outputs -------------------------------------------------------------

    def _writeInputs(self) -> list:
        """Write input files (NRRD keeps double-precision geometry); return the backend arguments."""
        folder = self.workDirectory
        fixedPath = os.path.join(folder, "fixed.nrrd")
        movingPath = os.path.join(folder, "moving.nrrd")
        nodes.writeVolumeNode(self.fixedVolumeNode, fixedPath)
        moving = nodes.writeVolumeNode(self.movingVolumeNode, movingPath)
        arguments = ["-m", "cnnreg", "register", "--fixed", fixedPath, "--moving", movingPath]
        if self.movingLabelsNode is not None:
            if self.movingLabelsNode.IsA("vtkMRMLSegmentationNode"):
                labels, self._segmentTable = nodes.segmentationToLabelImage(
                    self.movingLabelsNode, self.movingVolumeNode
                )
            else:
                labels = nodes.resampleLabelsToGrid(nodes.sitkImageFromVolumeNode(self.movingLabelsNode), moving)
            labelsPath = os.path.join(folder, "moving_labels.nrrd")
            sitk.WriteImage(labels, labelsPath, useCompression=False)
            arguments += ["--moving-labels", labelsPath]
        if self.fixedMaskNode is not None:
            maskPath = os.path.join(folder, "fixed_mask.nrrd")
            sitk.WriteImage(
                nodes.maskImageFromNode(self.fixedMaskNode, self.fixedVolumeNode), maskPath, useCompression=False
            )
            arguments += ["--fixed-mask", maskPath]
        arguments += self.settings.commandLineArguments()
        arguments += ["--progress", "jsonl", "--out", self.outputDirectory, "--overwrite"]
        return arguments

    def _failureMessage(self) -> str:
        code = self.process.returncode
        detail = self.errorMessage or self.process.stderrTail(12) or "no message"
        if code == EXIT_INPUT:
            return f"The backend rejected the input: {detail}"
        if code == EXIT_DEVICE:
            return f"The compute device cannot be used: {detail}\nTry the CPU device (Advanced section)."
        if code == EXIT_CANCELLED:
            return f"The registration backend was interrupted (exit code {code}, not cancelled here): {detail}"
        if code == EXIT_NUMERIC:
            return f"The registration failed (diverged, folded or made the images less similar): {detail}"
        return f"The registration backend failed (exit code {code}): {detail}"

    def _loadOutputs(self) -> JobResult:
        folder = self.outputDirectory
        summaryPath = os.path.join(folder, OUTPUT_FILES["summary"])
        summary = self.summary or {}
        if os.path.isfile(summaryPath):
            try:
                with open(summaryPath, encoding="utf-8") as stream:
                    summary = json.load(stream)
            except (OSError, ValueError) as error:
                raise RegistrationError(
                    f"the backend finished but its summary {summaryPath} is unreadable: {error}"
                ) from error
        for required in (OUTPUT_FILES["warped"], OUTPUT_FILES["displacement"]):
            if not os.path.isfile(os.path.join(folder, required)):
                raise RegistrationError(f"the backend finished but did not write {required} in {folder}")
        movingName = self.movingVolumeNode.GetName()
        created = []

        def ensure(node, className, name):
            if node is None:
                node = self.scene.AddNewNodeByClass(className, self.scene.GenerateUniqueName(name))
                created.append(node)
            if hasattr(node, "CreateDefaultDisplayNodes") and node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            return node

        try:
            warped = ensure(self.outputVolumeNode, "vtkMRMLScalarVolumeNode", f"{movingName} registered")
            nodes.updateVolumeNodeFromSitkImage(warped, sitk.ReadImage(os.path.join(folder, OUTPUT_FILES["warped"])))
            transform = ensure(self.outputTransformNode, "vtkMRMLGridTransformNode", f"{movingName} to fixed")
            nodes.updateGridTransformFromDisplacementImage(
                transform, sitk.ReadImage(os.path.join(folder, OUTPUT_FILES["displacement"]))
            )
            nodes.setRegistrationReferences(transform, self.fixedVolumeNode, self.movingVolumeNode, summary)
            jacobian = None
            if os.path.isfile(os.path.join(folder, OUTPUT_FILES["jacobian"])):
                jacobian = ensure(self.outputJacobianNode, "vtkMRMLScalarVolumeNode", f"{movingName} Jacobian")
                nodes.updateVolumeNodeFromSitkImage(
                    jacobian, sitk.ReadImage(os.path.join(folder, OUTPUT_FILES["jacobian"]))
                )
                nodes.setJacobianDisplay(jacobian)
                transform.SetNodeReferenceID(nodes.JACOBIAN_REFERENCE, jacobian.GetID())
            labels = self._loadLabels(os.path.join(folder, OUTPUT_FILES["warped_labels"]), created)
        except BaseException as error:
            for node in created:  # with their display nodes: nothing of a failed load stays in the scene
                displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
                for display in displays:
                    if display is not None:
                        self.scene.RemoveNode(display)
                self.scene.RemoveNode(node)
            if isinstance(error, RuntimeError) and not isinstance(error, RegistrationError):
                raise RegistrationError(
                    f"the backend finished but its outputs in {folder} could not be read: {error}"
                ) from error
            raise
        keep = self.settings.keepTemporaryFiles
        qcPath = os.path.join(folder, OUTPUT_FILES["qc"])
        return JobResult(
            outputVolume=warped,
            outputTransform=transform,
            outputJacobian=jacobian,
            outputLabels=labels,
            summary=summary,
            workDirectory=self.workDirectory if keep else None,
            qcImagePath=qcPath if keep and os.path.isfile(qcPath) else None,
        )

    def _loadLabels(self, path: str, created: list):
        if self.movingLabelsNode is None:
            return None
        if not os.path.isfile(path):
            raise RegistrationError(f"labels were given but the backend did not write {os.path.basename(path)}")
        image = sitk.ReadImage(path)
        name = self.scene.GenerateUniqueName(f"{self.movingLabelsNode.GetName()} registered")
        if self._segmentTable is not None:
            node = nodes.labelImageToSegmentation(image, self._segmentTable, name, self.fixedVolumeNode, self.scene)
            created.append(node)
            return node
        node = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        created.append(node)
        node.CreateDefaultDisplayNodes()
        nodes.updateVolumeNodeFromSitkImage(node, image)
        sourceDisplay = self.movingLabelsNode.GetDisplayNode()
        if sourceDisplay is not None and sourceDisplay.GetColorNodeID():
            node.GetDisplayNode().SetAndObserveColorNodeID(sourceDisplay.GetColorNodeID())
        return node
