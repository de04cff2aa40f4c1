"""CNNRegistration.py outside the application: its Logic and its self-test run against the
real MRML scene with stand-ins for the pieces only the application has (``qt``,
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``). The stand-in wrapper
keeps plain attributes; the real one (type checks, GUI binding) is exercised in Slicer."""

import enum
import importlib
import subprocess
import sys
import types
import typing
import unittest

import pytest

slicer = pytest.importorskip("slicer")

from CNNRegistrationLib import process  # noqa: E402


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


class Choice:
    def __init__(self, choices):
        self.choices = choices


def parameterNodeWrapper(cls):
    """Stand-in: attributes with the declared defaults, ``parameterNode`` = the MRML node."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for name, value in defaults.items():
            setattr(self, name, value)

    return type(cls.__name__, (), {"__init__": __init__, "hints": hints, "defaults": defaults})


class ScriptedLoadableModuleLogic:
    def getParameterNode(self):
        return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "CNNRegistration")


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        print(message)


def stubModules():
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, parent: None})
    scripted.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})
    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameterNodeWrapper
    wrapper.WithinRange = WithinRange
    wrapper.Choice = Choice
    return {
        "qt": types.ModuleType("qt"),
        "slicer.ScriptedLoadableModule": scripted,
        "slicer.parameterNodeWrapper": wrapper,
    }


@pytest.fixture
def module(scene, monkeypatch):
    for name, stub in stubModules().items():
        monkeypatch.setitem(sys.modules, name, stub)
    monkeypatch.delitem(sys.modules, "CNNRegistration", raising=False)
    loaded = importlib.import_module("CNNRegistration")
    yield loaded
    sys.modules.pop("CNNRegistration", None)


def test_parameter_node_declaration(module):
    wrapper = module.CNNRegistrationParameterNode
    hints, defaults = wrapper.hints, wrapper.defaults
    # every setting of a run can be set and saved with the scene: the panel's settings are fields
    # of the parameter node under the same names (settingsFromParameterNode reads them so)
    import dataclasses

    from CNNRegistrationLib.panel import PARAMETER_NODE_FIELDS, PanelSettings

    assert set(PARAMETER_NODE_FIELDS) == {f.name for f in dataclasses.fields(PanelSettings)} - {"seed"}
    assert set(PARAMETER_NODE_FIELDS) <= set(hints), set(PARAMETER_NODE_FIELDS) - set(hints)
    for name in ("mode", "similarity", "regularizer", "device"):
        assert issubclass(hints[name], enum.Enum) and isinstance(defaults[name], hints[name])
    # interpolation: the mode's default or a choice the similarity term allows (the enum also
    # holds nearest, for labels); the panel starts at the mode's default
    kind, choice = typing.get_args(hints["interpolation"])
    assert kind is str and choice.choices == ["default", "linear", "cubic"] and defaults["interpolation"] == "default"
    for name in ("weight", "window", "iterations", "fullResolutionIterations"):
        limits = typing.get_args(hints[name])[1]
        assert limits.minimum <= defaults[name] <= limits.maximum
    assert typing.get_args(hints["weight"])[1].maximum == 100
    # Optional node slots must include None for the real wrapper to accept "no node".
    for name in ("movingLabels", "fixedMask", "outputVolume", "outputTransform", "outputJacobian"):
        assert type(None) in typing.get_args(hints[name]), name


def test_logic_settings_presets_and_summary_text(module):
    logic = module.CNNRegistrationLogic()
    parameterNode = logic.getParameterNode()
    logic.applyPreset(parameterNode, "Phantom to CT")
    settings = logic.settingsFromParameterNode(parameterNode)
    from cnnreg.settings import PRESETS

    preset = PRESETS["phantom-to-ct"].settings()  # the one definition the panel reads
    assert settings.mode.value == "phantom" and settings.similarity.value == "lncc"
    assert (settings.weight, settings.jacobianWeight) == (
        preset.optimization.weight,
        preset.optimization.jacobian_weight,
    )
    assert settings.jacobianWeight != type(preset.optimization)().jacobian_weight  # not the default
    assert (settings.normalization.value, settings.affine) == ("ct", True) and settings.workingSpacing > 0
    assert settings.interpolation is None  # the mode's default (cubic for phantom)
    assert settings.backendSettings().optimization.interpolation_for(settings.mode).value == "cubic"
    assert "--interpolation" not in settings.commandLineArguments()
    parameterNode.interpolation = "linear"
    settings = logic.settingsFromParameterNode(parameterNode)
    assert settings.commandLineArguments()[settings.commandLineArguments().index("--interpolation") + 1] == "linear"
    logic.applyPreset(parameterNode, "Brain MRI")  # the benchmark's default command: no options
    settings = logic.settingsFromParameterNode(parameterNode)
    assert settings.commandLineArguments() == ["--mode", "instance"]
    # the preset resets what the phantom-to-CT preset set
    assert (parameterNode.normalization.value, parameterNode.affine, parameterNode.workingSpacing) == (
        "max",
        False,
        0.0,
    )
    logic.applyPreset(parameterNode, "Brain MRI, quick (learned)")
    settings = logic.settingsFromParameterNode(parameterNode)
    assert (settings.mode.value, settings.window, settings.weight, settings.iterations) == ("learned-refine", 3, 0.5, 4)
    assert settings.backendSettings().refine_iterations == 4
    logic.applyPreset(parameterNode, "Brain MRI")  # resets the window and the iterations
    assert (parameterNode.window, parameterNode.iterations) == (5, 0)
    text = logic.formatSummary(
        {
            "similarity": "lncc",
            "similarity_before": -0.2,
            "similarity_after": -0.6,
            "folding_percent": 0.0123,
            "min_jacobian": 0.2,
            "sdlogj": 0.05,
            "iterations": [100, 60, 30],
            "seconds": 12.3,
            "device": "cpu",
        },
        "/tmp/kept",
    )
    assert "-0.2 before, -0.6 after" in text and "0.012 %" in text and "/tmp/kept" in text
    assert "190 (100 + 60 + 30) iterations in 12.3 s" in text
    assert "n/a" in logic.formatSummary({})
    assert "Warning: the lncc similarity did not improve" in logic.formatSummary(
        {"warnings": ["the lncc similarity did not improve (0.3 -> 0.2)"]}
    )


def test_logic_exports_for_simulation_with_the_panel_choices(module, tmp_path):
    from mrmlhelpers import simulationResultNodes

    nodes = simulationResultNodes(slicer.mrmlScene)
    logic = module.CNNRegistrationLogic()
    parameters = logic.getParameterNode()
    parameters.outputTransform = nodes["transform"]
    parameters.movingLabels = None
    parameters.simulationOrgans = nodes["segmentation"]
    parameters.simulationCT = nodes["fixed"]
    parameters.simulationEnergies = "140, 208"
    parameters.simulationInterfile = True
    out = tmp_path / "sim"
    export = logic.exportForSimulation(parameters, str(out))
    assert export.record["energies_kev"] == [140.0, 208.0] and export.record["formats"] == ["nifti", "interfile"]
    for name in ("mu_ct_140keV.nii.gz", "mu_ct_208keV.h33", "mu_ct_208keV.i33", "organs.ctbl"):
        assert (out / name).is_file(), name
    # the panel replaces its own earlier export, never a folder of the user's
    parameters.simulationCT = None
    assert logic.exportForSimulation(parameters, str(out)).record["energies_kev"] == [140.0, 208.0]
    assert not (out / "mu_ct_140keV.nii.gz").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(module.simulation.SimulationExportError, match="notes.txt"):
        logic.exportForSimulation(parameters, str(out))
    parameters.simulationEnergies = "140 keV"
    with pytest.raises(module.simulation.SimulationExportError, match="'keV' is not a number"):
        logic.exportForSimulation(parameters, str(tmp_path / "other"))


def backendImportable() -> bool:
    completed = subprocess.run(
        [sys.executable, "-c", "import cnnreg.cli"], env=process.backendEnvironment(), capture_output=True, timeout=120
    )
    return completed.returncode == 0


@pytest.mark.skipif(not backendImportable(), reason="cnnreg.cli is not importable yet")
def test_self_test_passes_outside_the_application(module, monkeypatch):
    """The module's own self-test (a real registration of a shifted blob) with slicer-core."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny volume, shared test machine
    result = unittest.TextTestRunner(verbosity=0).run(
        unittest.TestLoader().loadTestsFromTestCase(module.CNNRegistrationTest)
    )
    assert result.wasSuccessful(), result.failures + result.errors


def test_self_test_skips_where_torch_is_missing(module, monkeypatch):
    """On a machine without the backend's packages (a build machine) the registration test is
    skipped with the reason, not failed; the presets test still runs."""
    monkeypatch.setattr(module.dependencies, "torchInstalled", lambda: False)
    test = module.CNNRegistrationTest("test_RegisterShiftedBlob")
    result = unittest.TestResult()
    test.run(result)
    assert not result.failures and not result.errors
    assert [reason for _, reason in result.skipped] == ["needs torch (installed by the module on the first Register)"]


def test_the_sample_pair_is_offered_with_its_checksums():
    """The Sample Data sources name the bundled files at the repository's raw URL with their SHA-256."""
    import hashlib
    import os

    from mrmlhelpers import ROOT

    from CNNRegistrationLib.sampledata import FOLDER, REPOSITORY_FILES, sampleDataSources

    sources = sampleDataSources()
    assert [s["sampleName"] for s in sources] == ["CNNRegistration brain pair", "CNNRegistration brain labels"]
    assert sources[1]["loadFileProperties"] == {"labelmap": True} and sources[0]["loadFileProperties"] == {}
    cmake = open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8").read()
    assert REPOSITORY_FILES.rstrip("/").replace("raw.githubusercontent.com", "github.com").rsplit("/", 1)[0] in cmake
    for source in sources:
        for uri, name, checksum in zip(source["uris"], source["fileNames"], source["checksums"]):
            assert uri == REPOSITORY_FILES + FOLDER + name
            with open(os.path.join(ROOT, FOLDER, name), "rb") as handle:
                assert checksum == "SHA256:" + hashlib.sha256(handle.read()).hexdigest(), name


def test_the_module_reads_the_summary_by_its_defined_names():
    """Every summary key CNNRegistration.py reads is one cnnreg.settings defines."""
    import ast
    import os

    from mrmlhelpers import MODULE_DIR

    from cnnreg.settings import REGISTRATION_SUMMARY, WRITTEN_SUMMARY

    tree = ast.parse(open(os.path.join(MODULE_DIR, "CNNRegistration.py"), encoding="utf-8").read())
    read = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            owner = getattr(function, "value", None)
            if (name == "get" and getattr(owner, "id", "") == "summary") or name == "number":
                read.add(node.args[0].value)
        if isinstance(node, ast.Subscript) and "summary" in ast.unparse(node.value):
            if isinstance(node.slice, ast.Constant):
                read.add(node.slice.value)
    assert {"similarity_before", "folding_percent", "device"} <= read
    assert read <= set(REGISTRATION_SUMMARY) | set(WRITTEN_SUMMARY), read - set(REGISTRATION_SUMMARY)
