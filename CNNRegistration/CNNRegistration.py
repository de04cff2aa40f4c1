"""CNN Registration: deformable registration with convolutional networks in 3D Slicer.

Thin module glue: the parameter node, the panel and the self-test. The work is done by
``CNNRegistrationLib`` (nodes <-> files, the backend process) and by the ``cnnreg``
backend, which runs as a separate process (``python -m cnnreg register``) so that the
application never freezes and Cancel is a process kill.
"""

import logging
from typing import Annotated, Optional, Union

import numpy as np
import qt
import slicer
import vtk
from slicer import (
    vtkMRMLGridTransformNode,
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CNNRegistrationLib import backendjob, dependencies, nodes, process, simulation
from CNNRegistrationLib.panel import (
    MODE_DEFAULT,
    PRESETS,
    SIMILARITY_INTERPOLATIONS,
    WEIGHT_RANGE,
    Device,
    Mode,
    Normalization,
    PanelSettings,
    Regularizer,
    Similarity,
    settingsFrom,
)

#
# CNNRegistration
#


class CNNRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CNN Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["CNNRegistration contributors"]
        self.parent.helpText = """
Deformable registration of a moving volume to a fixed volume with convolutional networks:
a trained network (<i>learned</i>, optionally refined on the pair), a randomly initialised
network optimised on the pair alone (<i>phantom</i>, no training data needed), or a dense
displacement field optimised directly (<i>instance</i>).<br>
Outputs: the moving volume resampled on the fixed grid, a grid transform (from parent:
fixed to moving, RAS) that can be applied to any node of the moving image, the Jacobian
determinant map (blue: contraction, red: expansion, yellow: folding, det J &le; 0) and warped labels or segments.
The computation runs in a separate process (PyTorch, GPU when available).
"""
        self.parent.acknowledgementText = """
Reimplements ideas of FAIM (Kuang and Schmah, 2018) and of Chen et al., Medical Physics 47:6366 (2020).
"""
        # the bundled sample pair in Sample Data, once the application has started
        slicer.app.connect("startupCompleted()", self._registerSampleData)

    def _registerSampleData(self) -> None:
        from CNNRegistrationLib.sampledata import registerSampleData

        registerSampleData(self.resourcePath("Icons/CNNRegistration.png"))


#
# Parameter node
#


#: the backend's defaults, as the panel shows them
_DEFAULT_SETTINGS = PanelSettings()


@parameterNodeWrapper
class CNNRegistrationParameterNode:
    """Module settings stored in the scene.

    weight: regularization weight (dimensionless). window: local-NCC window, voxels (odd).
    iterations: per pyramid level (phantom, instance) or refinement iterations
    (learned-refine); 0 = backend default.
    fullResolutionIterations: phantom mode's iterations with the CNN on the full-size images.
    Output nodes are created by the run when left empty.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    movingLabels: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    fixedMask: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    mode: Mode = _DEFAULT_SETTINGS.mode
    similarity: Similarity = _DEFAULT_SETTINGS.similarity
    regularizer: Regularizer = _DEFAULT_SETTINGS.regularizer
    weight: Annotated[float, WithinRange(*WEIGHT_RANGE)] = _DEFAULT_SETTINGS.weight
    jacobianWeight: Annotated[float, WithinRange(*WEIGHT_RANGE)] = _DEFAULT_SETTINGS.jacobianWeight
    window: Annotated[int, WithinRange(1, 99)] = _DEFAULT_SETTINGS.window
    iterations: Annotated[int, WithinRange(0, 100000)] = 0
    fullResolutionIterations: Annotated[int, WithinRange(0, 100000)] = _DEFAULT_SETTINGS.fullResolutionIterations
    # the mode's default, or one of the interpolations the similarity term allows (nearest is
    # for label maps)
    interpolation: Annotated[str, Choice([MODE_DEFAULT, *(i.value for i in SIMILARITY_INTERPOLATIONS)])] = MODE_DEFAULT
    normalization: Normalization = _DEFAULT_SETTINGS.normalization
    affine: bool = _DEFAULT_SETTINGS.affine
    workingSpacing: Annotated[float, WithinRange(0.0, 20.0)] = _DEFAULT_SETTINGS.workingSpacing
    device: Device = _DEFAULT_SETTINGS.device
    keepTemporaryFiles: bool = False
    showJacobian: bool = False
    outputVolume: Optional[vtkMRMLScalarVolumeNode]
    outputTransform: Optional[vtkMRMLGridTransformNode]
    outputJacobian: Optional[vtkMRMLScalarVolumeNode]
    # Export for simulation (energies: comma list, keV)
    simulationOrgans: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    simulationCT: Optional[vtkMRMLScalarVolumeNode]
    simulationEnergies: str = "140"
    simulationPerOrgan: bool = False
    simulationNifti: bool = True
    simulationMetaImage: bool = False
    simulationInterfile: bool = False


#
# CNNRegistrationWidget
#


class CNNRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: inputs, settings, Register/Cancel, progress and results."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.job = None
        self.lastResult = None
        self.pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CNNRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CNNRegistrationLogic()

        self.ui.presetComboBox.addItem("Choose a preset...")
        for name in PRESETS:
            self.ui.presetComboBox.addItem(name)
        self.ui.progressBar.setVisible(False)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.presetComboBox.connect("activated(int)", self.onPresetActivated)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.exportTransformButton.connect("clicked(bool)", self.onExportTransform)
        self.ui.showJacobianCheckBox.connect("toggled(bool)", self.onShowJacobianToggled)
        self.ui.exportSimulationButton.connect("clicked(bool)", self.onExportSimulation)

        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self.updateDeviceLabel)  # nvidia-smi may take a moment

    def cleanup(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.job = None
        if self.pollTimer is not None:
            self.pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRegister)

    def onSceneStartClose(self, caller, event) -> None:
        if self.job is not None:
            self.job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            volumes = [
                node
                for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if not node.IsA("vtkMRMLLabelMapVolumeNode")
            ]
            if len(volumes) >= 2:
                self._parameterNode.fixedVolume = volumes[0]
                self._parameterNode.movingVolume = volumes[1]

    def setParameterNode(self, inputParameterNode: Optional[CNNRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRegister)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRegister)
            self._checkCanRegister()

    def _checkCanRegister(self, caller=None, event=None) -> None:
        if self.job is not None:
            return  # the button is Cancel while running
        parameters = self._parameterNode
        ready = bool(
            parameters
            and parameters.fixedVolume
            and parameters.movingVolume
            and parameters.fixedVolume != parameters.movingVolume
        )
        self.ui.registerButton.enabled = ready
        self.ui.registerButton.toolTip = (
            "Register the moving volume to the fixed volume"
            if ready
            else "Select two different fixed and moving volumes"
        )
        self.ui.exportTransformButton.enabled = bool(parameters and parameters.outputTransform)

    def updateDeviceLabel(self) -> None:
        self.ui.deviceLabel.text = dependencies.describeComputeDevice()

    # -- actions -----------------------------------------------------------------------

    def onPresetActivated(self, index: int) -> None:
        name = self.ui.presetComboBox.itemText(index)
        if name in PRESETS:
            self.logic.applyPreset(self._parameterNode, name)
            self.ui.statusLabel.text = f"Preset '{name}' applied."

    def onRegisterButton(self) -> None:
        if self.job is not None:
            self.ui.registerButton.enabled = False
            self.ui.statusLabel.text = "Cancelling..."
            self.job.cancel()  # the poll timer then sees the end of the process
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the registration.", waitCursor=True):
            if not dependencies.ensureDependencies(askConfirmation=True):
                self.ui.statusLabel.text = "Registration needs PyTorch and the packages listed in requirements.txt."
                return
            self.lastResult = None
            self.ui.resultsLabel.text = ""
            self.job = self.logic.startRegistration(self._parameterNode)
            self.setRunning(True)
            self.pollTimer.start()

    def onPollTimer(self) -> None:
        if self.job is None:
            self.pollTimer.stop()
            return
        for event in self.job.poll():
            self.showEvent(event)
        if self.job.running:
            return
        self.pollTimer.stop()
        job, self.job = self.job, None
        self.setRunning(False)
        self.ui.statusLabel.text = "Registration failed."  # replaced below on success or cancel
        with slicer.util.tryWithErrorDisplay("Registration failed.", waitCursor=True):
            try:
                result = job.finish()  # loads the output nodes, removes the temporary folder
            except backendjob.RegistrationCancelled:
                self.ui.statusLabel.text = "Registration cancelled."
                return
            self.showResult(result)

    def showEvent(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            percent = process.progressPercent(event)
            if percent is not None:
                self.ui.progressBar.value = percent
            text = f"{event.get('stage', 'optimising')}: iteration {event.get('iteration')}/{event.get('iterations')}"
            if isinstance(event.get("loss"), (int, float)):
                text += f", loss {float(event['loss']):.4g}"
            self.ui.statusLabel.text = text
        elif kind == "start":
            self.ui.statusLabel.text = f"Backend started ({event.get('mode', '')} mode)."
        elif kind == "error":
            self.ui.statusLabel.text = f"Error: {event.get('message')}"
        elif kind in ("log", "stderr"):
            logging.info("cnnreg: %s", event.get("message"))

    def setRunning(self, running: bool) -> None:
        self.ui.registerButton.text = "Cancel" if running else "Register"
        self.ui.registerButton.toolTip = (
            "Stop the registration" if running else "Register the moving volume to the fixed volume"
        )
        self.ui.registerButton.enabled = True
        for widget in (
            self.ui.inputsCollapsibleButton,
            self.ui.settingsCollapsibleButton,
            self.ui.outputsCollapsibleButton,
            self.ui.advancedCollapsibleButton,
            self.ui.presetComboBox,
        ):
            widget.enabled = not running
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.value = 0
        if running:
            self.ui.statusLabel.text = "Starting the backend..."
        else:
            self._checkCanRegister()

    def showResult(self, result) -> None:
        self.lastResult = result
        parameters = self._parameterNode
        parameters.outputVolume = result.outputVolume
        parameters.outputTransform = result.outputTransform
        if result.outputJacobian is not None:
            parameters.outputJacobian = result.outputJacobian
        if result.outputLabels is not None:  # ready for "Export for simulation"
            parameters.simulationOrgans = result.outputLabels
            if parameters.normalization == Normalization.CT:
                parameters.simulationCT = parameters.fixedVolume
        self.ui.statusLabel.text = "Registration finished."
        self.ui.resultsLabel.text = CNNRegistrationLogic.formatSummary(result.summary, result.workDirectory)
        self.logic.showResult(result, parameters.fixedVolume, parameters.showJacobian)

    def onShowJacobianToggled(self, checked: bool) -> None:
        if self.lastResult is not None:
            self.logic.showResult(self.lastResult, self._parameterNode.fixedVolume, checked)

    def onExportTransform(self) -> None:
        transformNode = self._parameterNode.outputTransform
        if transformNode is None:
            return
        path = qt.QFileDialog.getSaveFileName(
            None,
            "Export displacement field",
            f"{transformNode.GetName()}.nii.gz",
            "ITK displacement field (*.nii.gz *.nrrd *.mha);;ITK transform file (*.h5)",
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Failed to export the transform.", waitCursor=True):
            nodes.exportTransformToDisplacementFile(transformNode, path)
            self.ui.statusLabel.text = f"Transform written to {path} (LPS, from parent / resampling direction)."

    def onExportSimulation(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Failed to export for simulation.", waitCursor=True):
            export = self.logic.exportForSimulation(
                parameters,
                self.ui.simulationOutputPathLineEdit.currentPath,
                self.ui.simulationActivityPathLineEdit.currentPath,
                self.ui.simulationMaterialsPathLineEdit.currentPath,
            )
            warnings = export.record.get("warnings") or []
            self.ui.statusLabel.text = "\n".join(
                [f"Simulation inputs written to {export.outputDirectory}"] + [f"Warning: {w}" for w in warnings]
            )


#
# CNNRegistrationLogic
#


class CNNRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration without the GUI: ``process`` blocks, ``startRegistration`` returns a
    running :class:`CNNRegistrationLib.backendjob.RegistrationJob` to poll."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CNNRegistrationParameterNode(super().getParameterNode())

    @staticmethod
    def settingsFromParameterNode(parameterNode) -> PanelSettings:
        return settingsFrom(parameterNode)

    @staticmethod
    def applyPreset(parameterNode, name: str) -> None:
        """Fill the settings of ``parameterNode`` from a named preset (see ``settings.PRESETS``)."""
        with slicer.util.NodeModify(parameterNode.parameterNode):
            for key, value in PRESETS[name].items():
                setattr(parameterNode, key, value)

    @staticmethod
    def exportForSimulation(parameterNode, outputDirectory: str, activityTable: str = "", materialsTable: str = ""):
        """Simulator inputs from the last result's nodes and the panel's export choices."""
        return simulation.exportFromPanel(parameterNode, outputDirectory, activityTable, materialsTable)

    def startRegistration(self, parameterNode) -> backendjob.RegistrationJob:
        """Write the inputs and start the backend; returns the running job (non-blocking)."""
        p = parameterNode
        job = self.process(
            p.fixedVolume, p.movingVolume, self.settingsFromParameterNode(p), p.movingLabels, p.fixedMask,
            p.outputVolume, p.outputTransform, p.outputJacobian, wait=False,
        )  # fmt: skip
        job.start()
        return job

    def process(
        self,
        fixedVolume,
        movingVolume,
        settings: Optional[PanelSettings] = None,
        movingLabels=None,
        fixedMask=None,
        outputVolume=None,
        outputTransform=None,
        outputJacobian=None,
        progressCallback=None,
        timeout: Optional[float] = None,
        wait: bool = True,
    ):
        """Register and wait (a :class:`~CNNRegistrationLib.backendjob.JobResult`); with ``wait``
        False, the job, not started. Raises RuntimeError when packages are missing (nothing is
        installed from here) and RegistrationError when the backend fails."""
        job = backendjob.RegistrationJob(
            fixedVolume,
            movingVolume,
            settings,
            movingLabelsNode=movingLabels,
            fixedMaskNode=fixedMask,
            outputVolumeNode=outputVolume,
            outputTransformNode=outputTransform,
            outputJacobianNode=outputJacobian,
        )
        if not wait:
            return job
        dependencies.checkDependencies()
        return job.run(progressCallback=progressCallback, timeout=timeout)

    @staticmethod
    def showResult(result, fixedVolume, showJacobian: bool = False) -> None:
        """Slice views: the warped volume over the fixed one, or the Jacobian map over the warped volume."""
        if showJacobian and result.outputJacobian is not None:
            if nodes.showJacobian(result.outputJacobian, result.outputVolume):
                return
        if slicer.app.layoutManager() is not None:
            slicer.util.setSliceViewerLayers(
                background=fixedVolume, foreground=result.outputVolume, foregroundOpacity=0.5, fit=True
            )

    @staticmethod
    def formatSummary(summary: dict, workDirectory: Optional[str] = None) -> str:
        """Multi-line text of the backend's summary for the results label."""

        def number(key, form="{:.4g}"):
            value = summary.get(key)
            return "n/a" if value is None else form.format(value)

        ran = summary.get("iterations")
        if isinstance(ran, list):  # per pyramid level, coarse to fine
            iterations = f"{sum(ran)} ({' + '.join(map(str, ran))})" if len(ran) > 1 else str(sum(ran))
        else:
            iterations = "n/a" if ran is None else str(ran)
        lines = [
            f"Similarity ({summary.get('similarity', '?')}): {number('similarity_before')} before, "
            f"{number('similarity_after')} after",
            f"Folding (det J \u2264 0): {number('folding_percent', '{:.3f}')} % of voxels; "
            f"min det J {number('min_jacobian')}; SD log det J {number('sdlogj')}",
            f"{iterations} iterations in {number('seconds', '{:.1f}')} s on {summary.get('device', '?')}",
        ]
        lines += [f"Warning: {warning}" for warning in summary.get("warnings") or []]
        if workDirectory:
            lines.append(f"Files kept in {workDirectory}")
        return "\n".join(lines)


#
# CNNRegistrationTest
#


class CNNRegistrationTest(ScriptedLoadableModuleTest):
    """Runs a small real registration (synthetic 24^3 blob volumes, CPU, seconds to a minute)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_Presets()
        self.setUp()
        self.test_RegisterShiftedBlob()

    def test_Presets(self):
        from cnnreg.settings import PRESETS as BACKEND_PRESETS

        logic = CNNRegistrationLogic()
        parameterNode = logic.getParameterNode()
        for preset in BACKEND_PRESETS.values():  # each panel preset runs exactly the command line's --preset
            logic.applyPreset(parameterNode, preset.label)
            self.assertEqual(logic.settingsFromParameterNode(parameterNode).backendSettings(), preset.settings())
        logic.applyPreset(parameterNode, "Phantom to CT")
        self.assertEqual(parameterNode.mode, Mode.PHANTOM)
        self.assertEqual(parameterNode.normalization, Normalization.CT)
        logic.applyPreset(parameterNode, "Brain MRI")
        self.assertEqual(parameterNode.mode, Mode.INSTANCE)
        self.assertEqual(parameterNode.workingSpacing, 0.0)
        self.assertFalse(parameterNode.affine)

    @staticmethod
    def _blobVolume(name, center, shape=(24, 24, 24), spacing=(1.5, 1.5, 1.5)):
        k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
        radius2 = (k - center[0]) ** 2 + (j - center[1]) ** 2 + ((i - center[2]) / 1.3) ** 2
        array = (100.0 * np.exp(-radius2 / (2 * 4.0**2))).astype(np.float32)
        node = slicer.util.addVolumeFromArray(array, name=name)
        node.SetSpacing(*spacing)
        node.SetOrigin(-20.0, 15.0, -8.0)
        return node, array

    def test_RegisterShiftedBlob(self):
        missing = dependencies.missingRequirements() + ([] if dependencies.torchInstalled() else ["torch"])
        if missing:  # e.g. a build machine of the Extensions Index: the panel installs them on first use
            self.delayDisplay(
                f"Registration test skipped: the backend's packages are not installed ({', '.join(missing)})"
            )
            self.skipTest(f"needs {', '.join(missing)} (installed by the module on the first Register)")
        self.delayDisplay("Registering a blob shifted by 2 voxels (instance optimisation, CPU)")
        fixed, fixedArray = self._blobVolume("fixed", (12, 12, 12))
        moving, movingArray = self._blobVolume("moving", (12, 13, 10))
        settings = PanelSettings(
            mode=Mode.INSTANCE,
            similarity=Similarity.MSE,
            regularizer=Regularizer.DIFFUSION,
            weight=0.1,
            iterations=60,
            device=Device.CPU,
            seed=0,
        )
        progress = []
        result = CNNRegistrationLogic().process(fixed, moving, settings, progressCallback=progress.append, timeout=600)

        self.assertTrue(any(event.get("event") == "progress" for event in progress))
        warped = slicer.util.arrayFromVolume(result.outputVolume)
        before = float(np.mean((movingArray - fixedArray) ** 2))
        after = float(np.mean((warped - fixedArray) ** 2))
        self.delayDisplay(f"MSE before {before:.3f}, after {after:.3f}; summary {result.summary}")
        self.assertLess(after, 0.5 * before)
        self.assertLess(float(result.summary["folding_percent"]), 1.0)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), movingArray)  # input unchanged
        # The grid transform applied to the moving volume reproduces the warped volume.
        resampled = nodes.resampleThroughTransform(moving, fixed, result.outputTransform)
        inside = (resampled > 1.0) & (warped > 1.0)
        self.assertLess(float(np.abs(resampled - warped)[inside].max()), 0.02 * float(fixedArray.max()))
        self.delayDisplay("Test passed")
