"""The extension as CMake installs it finds everything its backend needs.

``CNNRegistration/CMakeLists.txt`` names the files that ``slicerMacroBuildScriptedModule``
copies into the installed module folder (the Slicer module runs ``python -m cnnreg`` from
there).  These tests read those lists -- the ``set``/``file(GLOB)``/``list(APPEND)`` commands
they are made of -- copy exactly those files into a temporary folder, and register the
bundled sample pair from it; and they check every third-party import of ``cnnreg`` against
``Resources/requirements.txt`` (what the module's first run installs) plus PyTorch.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "CNNRegistration"
SAMPLE = ROOT / "Resources" / "SampleData"


def cmake_module_files(cmake_file: Path = MODULE_DIR / "CMakeLists.txt") -> dict[str, list[str]]:
    """``{"MODULE_PYTHON_SCRIPTS": [...], "MODULE_PYTHON_RESOURCES": [...]}``: the files (relative to
    the module folder) the CMake list hands to ``slicerMacroBuildScriptedModule``, by evaluating its
    ``set``, ``file(GLOB ... RELATIVE ...)`` and ``list(APPEND ...)`` commands."""
    text = re.sub(r"#[^\n]*", "", cmake_file.read_text(encoding="utf-8"))
    variables = {"CMAKE_CURRENT_SOURCE_DIR": str(cmake_file.parent)}

    def expand(word: str) -> list[str]:
        word = re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), "").split(";")), word)
        return word.split()

    for command, body in re.findall(r"(\w+)\s*\(([^)]*)\)", text):
        words = [w for token in body.split() for w in expand(token)]
        if command == "set" and words:
            variables[words[0]] = ";".join(words[1:])
        elif command == "list" and words[:1] == ["APPEND"]:
            name = words[1]
            variables[name] = ";".join([*filter(None, variables.get(name, "").split(";")), *words[2:]])
        elif command == "file" and words[:1] == ["GLOB"]:
            name, rest = words[1], words[2:]
            base = None
            if rest[:1] == ["RELATIVE"]:
                base, rest = rest[1], rest[2:]
            found = sorted(p for pattern in rest if pattern != "CONFIGURE_DEPENDS" for p in glob.glob(pattern))
            variables[name] = ";".join(os.path.relpath(p, base) if base else p for p in found)
    return {
        key: [f for f in variables.get(key, "").split(";") if f]
        for key in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES")
    }


def install_layout(target: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """Copy the files of the CMake lists into ``target`` as the build does (relative paths kept)."""
    lists = cmake_module_files()
    for relative in lists["MODULE_PYTHON_SCRIPTS"] + lists["MODULE_PYTHON_RESOURCES"]:
        if any(relative.startswith(prefix) for prefix in leave_out):
            continue
        source = MODULE_DIR / relative
        assert source.is_file(), f"CMakeLists.txt names {relative}, which does not exist"
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    return target


def run_backend(module_folder: Path, out: Path, *arguments: str) -> subprocess.CompletedProcess:
    """``python -m cnnreg register`` on the sample pair from ``module_folder`` (as the Slicer module's
    process.py starts it: PYTHONPATH = the module folder), importing cnnreg from there only."""
    code = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "import cnnreg, runpy; "
        "assert cnnreg.__file__.startswith(sys.path[0]), cnnreg.__file__; "
        "sys.argv[0] = 'cnnreg'; runpy.run_module('cnnreg', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(module_folder), "OMP_NUM_THREADS": "2"}
    env.pop("CNNREG_MODELS_DIR", None)
    command = [sys.executable, "-c", code, str(module_folder), "register"]
    command += ["--fixed", str(SAMPLE / "fixed.nii.gz"), "--moving", str(SAMPLE / "moving.nii.gz")]
    command += ["--moving-labels", str(SAMPLE / "moving_labels.nii.gz"), "--out", str(out), "--device", "cpu"]
    command += ["--threads", "2", "--no-qc", "--progress", "jsonl", *arguments]
    return subprocess.run(command, cwd=module_folder, env=env, capture_output=True, text=True, timeout=600)


def _summary(completed: subprocess.CompletedProcess) -> dict:
    assert completed.returncode == 0, completed.stderr[-2000:]
    done = json.loads(completed.stdout.strip().splitlines()[-1])
    assert done["event"] == "done"
    return done["summary"]


def test_the_cmake_lists_name_the_backend_and_its_shipped_weights():
    lists = cmake_module_files()
    scripts, resources = set(lists["MODULE_PYTHON_SCRIPTS"]), set(lists["MODULE_PYTHON_RESOURCES"])
    backend = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "cnnreg").rglob("*.py")}
    assert backend <= scripts, sorted(backend - scripts)
    assert "CNNRegistration.py" in scripts and "Resources/UI/CNNRegistration.ui" in resources
    manifest = MODULE_DIR / "cnnreg" / "models" / "models.json"
    if manifest.is_file():
        shipped = {f"cnnreg/models/{e['file']}" for e in json.loads(manifest.read_text())["models"]}
        assert {"cnnreg/models/models.json", "cnnreg/models/README.md", *shipped} <= resources


@pytest.mark.slow
def test_the_installed_layout_registers_the_sample_pair(tmp_path):
    folder = install_layout(tmp_path / "qt-scripted-modules")
    summary = _summary(run_backend(folder, tmp_path / "instance", "--mode", "instance", "--iterations", "20,10,5"))
    assert summary["similarity_after"] > summary["similarity_before"]
    if (folder / "cnnreg" / "models" / "models.json").is_file():
        summary = _summary(run_backend(folder, tmp_path / "learned", "--mode", "learned"))
        assert summary["mode"] == "learned" and summary["similarity_after"] > summary["similarity_before"]
        # the same layout without the weights file: the learned mode cannot run (so the test can fail)
        bare = install_layout(tmp_path / "without-weights", leave_out=("cnnreg/models/vxm",))
        failed = run_backend(bare, tmp_path / "bare", "--mode", "learned")
        assert failed.returncode == 2 and "missing" in failed.stderr


def _third_party_imports(package: Path) -> dict[str, bool]:
    """``{top-level module: required}`` over every import of ``package``'s files; an import inside a
    ``try`` that catches ImportError is optional (required False) unless also imported plainly."""
    found: dict[str, bool] = {}

    def visit(node: ast.AST, optional: bool) -> None:
        if isinstance(node, ast.Try):
            catches = any(
                h.type is None or "ImportError" in ast.unparse(h.type) or "ModuleNotFoundError" in ast.unparse(h.type)
                for h in node.handlers
            )
            for child in node.body:
                visit(child, optional or catches)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, optional)
            return
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != package.name:
                found[top] = found.get(top, False) or not optional
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    for path in package.rglob("*.py"):
        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def test_every_backend_import_is_installed_by_the_module():
    requirements = MODULE_DIR / "Resources" / "requirements.txt"
    listed = {
        re.split(r"[<>=!~\[; ]", line.strip())[0].lower()
        for line in requirements.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    }
    imports = _third_party_imports(MODULE_DIR / "cnnreg")
    assert {"torch", "numpy", "SimpleITK"} <= set(imports)
    required = {name for name, needed in imports.items() if needed}
    missing = {name for name in required - {"torch"} if name.lower() not in listed}  # torch: the PyTorch extension
    assert not missing, f"cnnreg imports {sorted(missing)} but {requirements} does not list them"
