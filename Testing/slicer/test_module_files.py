"""Static checks of the module's files that need no Slicer application: the .ui against the
Python code and the parameter node, the CMake lists, the settings against the backend, and
that the Slicer glue imports without Qt."""

import ast
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

pytest.importorskip("slicer")

from mrmlhelpers import MODULE_DIR, ROOT  # noqa: E402

MODULE_FILE = os.path.join(MODULE_DIR, "CNNRegistration.py")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "CNNRegistration.ui")


def uiWidgets():
    """name -> (class, {property name: text}) for every widget of the .ui file."""
    tree = ElementTree.parse(UI_FILE)
    widgets = {}
    for element in tree.iter("widget"):
        properties = {}
        for prop in element.findall("property"):
            value = next(iter(prop), None)
            properties[prop.get("name")] = None if value is None else (value.text or "")
        widgets[element.get("name")] = (element.get("class"), properties)
    return widgets


def parameterNodeFields():
    """name -> annotation source of the @parameterNodeWrapper class in CNNRegistration.py."""
    tree = ast.parse(open(MODULE_FILE, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            getattr(decorator, "id", None) == "parameterNodeWrapper" for decorator in node.decorator_list
        ):
            return {
                item.target.id: ast.unparse(item.annotation) for item in node.body if isinstance(item, ast.AnnAssign)
            }
    raise AssertionError("no @parameterNodeWrapper class in CNNRegistration.py")


def test_every_widget_used_in_python_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", open(MODULE_FILE, encoding="utf-8").read()))
    assert used, "the widget code uses no self.ui.* names?"
    missing = used - set(uiWidgets())
    assert not missing, f"widgets used in CNNRegistration.py but absent from the .ui: {sorted(missing)}"


def test_parameter_bindings_match_the_parameter_node():
    fields = parameterNodeFields()
    widgets = uiWidgets()
    bound = {
        props["SlicerParameterName"]: (name, cls)
        for name, (cls, props) in widgets.items()
        if "SlicerParameterName" in props
    }
    assert set(bound) == set(fields), (
        f"unbound fields {sorted(set(fields) - set(bound))}, unknown bindings {sorted(set(bound) - set(fields))}"
    )
    # The parameter node wrapper only connects these widget classes to these types.
    for parameter, (_name, cls) in bound.items():
        annotation = fields[parameter]
        if "vtkMRML" in annotation:
            assert cls == "qMRMLNodeComboBox", (parameter, cls)
        elif annotation.startswith("Annotated[float"):
            assert cls == "ctkSliderWidget", (parameter, cls)
        elif annotation.startswith("Annotated[int"):
            assert cls == "QSpinBox", (parameter, cls)
        elif annotation == "bool":
            assert cls == "QCheckBox", (parameter, cls)
        elif annotation == "str":
            assert cls == "QLineEdit", (parameter, cls)
        elif annotation.startswith("Annotated[str, Choice("):
            assert cls == "QComboBox", (parameter, cls)
        else:
            assert (
                annotation in ("Mode", "Similarity", "Regularizer", "Interpolation", "Normalization", "Device")
                and cls == "QComboBox"
            ), (
                parameter,
                cls,
            )


def test_ui_layout_requirements():
    widgets = uiWidgets()
    cls, props = widgets["advancedCollapsibleButton"]
    assert cls == "ctkCollapsibleButton" and props.get("collapsed") == "true"
    assert widgets["deviceLabel"][0] == "QLabel"
    for name, (cls, props) in widgets.items():
        if cls == "qMRMLNodeComboBox":
            assert "SlicerParameterName" in props, name
    # Every node selector gets the scene from the module widget.
    tree = ElementTree.parse(UI_FILE)
    receivers = {
        c.findtext("receiver") for c in tree.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert receivers == {name for name, (cls, _) in widgets.items() if cls == "qMRMLNodeComboBox"}


def test_cmake_lists_every_python_file_and_resource():
    cmake = open(os.path.join(MODULE_DIR, "CMakeLists.txt"), encoding="utf-8").read()
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", cmake))
    present = {name for name in os.listdir(os.path.join(MODULE_DIR, "CNNRegistrationLib")) if name.endswith(".py")}
    assert listed == present
    assert "cnnreg/*.py" in cmake and "${MODULE_NAME}.py" in cmake
    for resource in re.findall(r"^\s+(Resources/\S+)$", cmake, flags=re.MULTILINE):
        assert os.path.isfile(os.path.join(MODULE_DIR, resource.replace("${MODULE_NAME}", "CNNRegistration"))), resource
    top = open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8").read()
    assert 'EXTENSION_DEPENDS "PyTorch"' in top and 'EXTENSION_CATEGORY "Registration"' in top
    assert "add_subdirectory(CNNRegistration)" in top
    # the icon and screenshot URLs point at files of this repository (main branch)
    for url in re.findall(r'"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/([^"]+)"', top):
        assert os.path.isfile(os.path.join(ROOT, url)), url
    assert len(re.findall(r"raw\.githubusercontent", top)) == 2
    assert "MIT License" in open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    testing = open(os.path.join(ROOT, "Testing", "Python", "CMakeLists.txt"), encoding="utf-8").read()
    assert "slicer_add_python_unittest" in testing and "CNNRegistration.py" in testing


def test_the_interpolation_tooltip_states_each_modes_default():
    from cnnreg.settings import DEFAULT_INTERPOLATION

    tip = uiWidgets()["interpolationComboBox"][1]["toolTip"]
    stated = re.search(r"cubic B-spline for ([\w ,-]+); linear for ([\w ,-]+)\)", tip)
    assert stated, tip
    for interpolation, text in zip(("cubic", "linear"), stated.groups()):
        modes = {m.strip() for m in re.split(r",| and ", text) if m.strip()}
        assert modes == {m.value for m, i in DEFAULT_INTERPOLATION.items() if i.value == interpolation}, tip


def test_icon_is_128_pixels():
    from PIL import Image

    with Image.open(os.path.join(MODULE_DIR, "Resources", "Icons", "CNNRegistration.png")) as icon:
        assert icon.size == (128, 128)


def test_module_files_stay_small():
    files = [MODULE_FILE] + [
        os.path.join(MODULE_DIR, "CNNRegistrationLib", name)
        for name in os.listdir(os.path.join(MODULE_DIR, "CNNRegistrationLib"))
        if name.endswith(".py")
    ]
    for path in files:
        assert sum(1 for _ in open(path, encoding="utf-8")) < 600, path


BLOCK_QT = r"""
import importlib.abc, sys
BLOCKED = {"qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.split(".")[0] in {"qt", "ctk", "PythonQt"} or name.startswith("qSlicer") \
                or name in EXTRA:
            raise ImportError(f"blocked for the test: {name}")
        return None
EXTRA = set(sys.argv[1].split(",")) if len(sys.argv) > 1 and sys.argv[1] else set()
sys.meta_path.insert(0, Blocker())
sys.path.insert(0, sys.argv[2])
for module in sys.argv[3].split(","):
    __import__(module)
print("ok")
"""


@pytest.mark.parametrize(
    "blocked, modules",
    [
        (
            "",
            "CNNRegistrationLib.nodes,CNNRegistrationLib.process,CNNRegistrationLib.backendjob,CNNRegistrationLib.simulation,CNNRegistrationLib.sampledata,"
            "CNNRegistrationLib.panel,CNNRegistrationLib.dependencies",
        ),
        # The process runner and the settings need neither Slicer nor VTK.
        ("slicer,vtk,vtkmodules", "CNNRegistrationLib.process,CNNRegistrationLib.panel"),
    ],
)
def test_glue_imports_without_qt(blocked, modules):
    completed = subprocess.run(
        [sys.executable, "-c", BLOCK_QT, blocked, MODULE_DIR, modules], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr


GLUE_FILES = [MODULE_FILE] + [
    os.path.join(MODULE_DIR, "CNNRegistrationLib", name)
    for name in sorted(os.listdir(os.path.join(MODULE_DIR, "CNNRegistrationLib")))
    if name.endswith(".py")
]


def test_the_glue_imports_only_the_settings_and_grid_of_the_backend():
    """The Slicer glue talks to the backend through files and a process; the modules it imports
    are the torch-free ``cnnreg.settings`` (choices, defaults, exit codes, file names) and
    ``cnnreg.grid`` (the same-grid rule)."""
    imported = set()
    for path in GLUE_FILES:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                imported |= {(os.path.basename(path), n) for n in names if n.split(".")[0] == "cnnreg"}
            elif isinstance(node, ast.Import):
                imported |= {(os.path.basename(path), a.name) for a in node.names if a.name.split(".")[0] == "cnnreg"}
    backend = {name for _, name in imported}
    assert backend, "the glue should take its choices from cnnreg.settings"
    allowed = {"cnnreg", "cnnreg.settings", "cnnreg.grid"}
    assert all(name in allowed or name.rsplit(".", 1)[0] in allowed - {"cnnreg"} for name in backend), sorted(imported)


def test_the_backend_grid_rule_imports_no_torch():
    code = "import sys; import cnnreg.grid; print('torch' in sys.modules)"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=MODULE_DIR
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


def test_the_backend_settings_import_neither_torch_nor_numpy():
    code = (
        "import sys; import cnnreg.settings; "
        "print(sorted(m for m in ('torch', 'numpy', 'SimpleITK') if m in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=MODULE_DIR
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_the_panel_defaults_are_the_backend_defaults():
    from cnnreg import settings as backend
    from CNNRegistrationLib import panel

    defaults = panel.PanelSettings()
    assert defaults.backendSettings() == backend.RegistrationSettings()
    for mode in backend.Mode:
        assert panel.PanelSettings(mode=mode).backendSettings() == backend.RegistrationSettings(mode=mode)
    assert [i.value for i in panel.SIMILARITY_INTERPOLATIONS] == ["linear", "cubic"]
    assert panel.Mode is backend.Mode and panel.Interpolation is backend.Interpolation


def test_settings_command_line_and_presets():
    from CNNRegistrationLib import panel

    arguments = panel.PanelSettings(mode="learned", weight=2, iterations=0).commandLineArguments()
    assert arguments[:2] == ["--mode", "learned"] and "--iterations" not in arguments and "--seed" not in arguments
    assert arguments[arguments.index("--weight") + 1] == "2.0"
    refine = panel.PanelSettings(mode="learned-refine", iterations=20).commandLineArguments()
    assert refine == ["--mode", "learned-refine", "--refine-iterations", "20"]
    with pytest.raises(ValueError, match="nearest"):
        panel.PanelSettings(interpolation="nearest")
    with pytest.raises(ValueError, match="weight"):
        panel.PanelSettings(weight=101)
    with pytest.raises(ValueError):
        panel.PanelSettings(mode="fast")
    for name in panel.PRESETS:
        backend = panel.presetSettings(name).backendSettings()
        requested = backend.iterations_requested()
        assert all(n > 0 for n in (requested if isinstance(requested, list) else [requested])), name
    # the brain preset is the default command, whose numbers the benchmark reports
    assert panel.presetSettings("Brain MRI").commandLineArguments() == ["--mode", "instance"]
    # one definition: each panel preset is the backend's preset of that label, which is also
    # `python -m cnnreg register --preset NAME`
    from cnnreg import settings as backend
    from cnnreg.cli import build_parser

    assert list(panel.PRESETS) == [preset.label for preset in backend.PRESETS.values()]
    parser = build_parser()[0]
    inputs = ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out", "o"]
    for preset in backend.PRESETS.values():
        values = panel.presetSettings(preset.label)
        from_command_line = backend.settings_from_args(parser.parse_args([*inputs, "--preset", preset.name]))
        assert values.backendSettings() == preset.settings() == from_command_line, preset.name
        # and the command the panel runs gives the same settings back
        again = backend.settings_from_args(parser.parse_args([*inputs, *values.commandLineArguments()]))
        assert again == preset.settings(), preset.name
    ct = panel.presetSettings("Phantom to CT").commandLineArguments()
    assert dict(zip(ct[::2], ct[1::2]))["--normalization"] == "ct" and "--affine" in ct
    # every preset fills the same settings, so choosing one resets what another set
    filled = {name: set(values) for name, values in panel.PRESETS.items()}
    assert all(keys == filled["Brain MRI"] for keys in filled.values()) and "window" in filled["Brain MRI"]
    assert {"normalization", "affine", "workingSpacing"} <= filled["Brain MRI"]
    # the quick learned preset is the benchmark's learned-refine configuration
    quick = panel.presetSettings("Brain MRI, quick (learned)").commandLineArguments()
    assert dict(zip(quick[::2], quick[1::2])) == {
        "--mode": "learned-refine",
        "--window": "3",
        "--weight": "0.5",
        "--refine-iterations": "4",
    }
    # the LNCC window: passed on when not the default, checked by the backend (odd)
    assert panel.PanelSettings(window=7).backendSettings().optimization.window == 7
    assert panel.PanelSettings(window=5).commandLineArguments() == ["--mode", "instance"]
    with pytest.raises(ValueError, match="window: must be odd"):
        panel.PanelSettings(window=4)
    # phantom mode only: other modes ignore it and pass no option
    instance = panel.PanelSettings(mode="instance", fullResolutionIterations=50)
    assert instance.backendSettings().optimization.cnn_full_resolution_iterations == 0
    assert "--cnn-full-resolution-iterations" not in instance.commandLineArguments()
    with pytest.raises(ValueError, match="full-resolution iterations"):
        panel.PanelSettings(fullResolutionIterations=-1)
    assert all(
        member.label()
        for enum in (panel.Mode, panel.Similarity, panel.Regularizer, panel.Interpolation, panel.Device)
        for member in enum
    )


def test_dependencies_without_installing(tmp_path):
    from CNNRegistrationLib import dependencies

    requirements = dependencies.readRequirements()
    assert {dependencies.requirementName(line).lower() for line in requirements} >= {"simpleitk", "numpy", "psutil"}
    assert dependencies.missingRequirements() == []  # all present in the test environment
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\nnumpy>=1.0\nsurely-not-installed-package-xyz==1.0  # why\n")
    assert dependencies.missingRequirements(str(path)) == ["surely-not-installed-package-xyz==1.0"]
    assert isinstance(dependencies.describeComputeDevice(), str)


def test_every_text_names_the_det_j_colours_of_the_backend():
    """One colour language for det J: the tooltips, the README and the Slicer docs say what
    cnnreg.settings defines (folds yellow), and nothing else."""
    widgets = uiWidgets()
    texts = [widgets["outputJacobianSelector"][1]["toolTip"], widgets["showJacobianCheckBox"][1]["toolTip"]]
    texts += [open(os.path.join(ROOT, name), encoding="utf-8").read() for name in ("README.md", "docs/slicer.md")]
    for text in texts:
        flat = " ".join(text.split()).lower()
        assert "yellow" in flat and "blue" in flat and "red" in flat, text[:200]
        assert "green" not in flat and "lime" not in flat and "purple" not in flat and "folds in red" not in flat
