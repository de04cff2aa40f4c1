"""cnnreg.settings: one definition of every choice, default and bound, shared by the Python
API, the command line and the Slicer module."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os

import pytest

import cnnreg
from cnnreg import settings
from cnnreg.errors import InputError
from cnnreg.settings import (
    Interpolation,
    Mode,
    Number,
    OptimizationSettings,
    RegistrationSettings,
    Schedule,
    add_method_arguments,
    command_line_arguments,
    settings_from_args,
)

PACKAGE = os.path.dirname(cnnreg.__file__)
GLUE = os.path.join(os.path.dirname(PACKAGE), "CNNRegistrationLib")


def _modules(folder):
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            path = os.path.join(folder, name)
            yield name, ast.parse(open(path, encoding="utf-8").read())


def test_no_backend_module_imports_the_command_line():
    for name, tree in _modules(PACKAGE):
        if name in ("cli.py", "__main__.py", "batch.py"):  # batch runs the register command in each worker
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                assert target not in (".cli", "cnnreg.cli"), f"{name} imports {target}"
                assert not (target == "." and any(a.name == "cli" for a in node.names)), name


def test_every_enum_is_defined_in_settings_only():
    """Backend and Slicer glue alike: the option enums live in cnnreg/settings.py alone."""
    module_file = os.path.join(os.path.dirname(PACKAGE), "CNNRegistration.py")
    trees = [(PACKAGE, name, tree) for name, tree in _modules(PACKAGE)]
    trees += [(GLUE, name, tree) for name, tree in _modules(GLUE)]
    trees.append((os.path.dirname(module_file), "CNNRegistration.py", ast.parse(open(module_file).read())))
    defined = [
        (folder, name, node.name)
        for folder, name, tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(word in ast.unparse(base) for base in node.bases for word in ("Enum", "Choice"))
    ]
    assert len(defined) >= 7  # Choice, Mode, Similarity, Regularizer, Interpolation, Normalization, Optimizer, Device
    assert {(folder, name) for folder, name, _ in defined} == {(PACKAGE, "settings.py")}, defined


def test_the_parser_defaults_are_the_dataclass_defaults():
    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    defaults = vars(parser.parse_args([]))
    run, optimization = RegistrationSettings(), OptimizationSettings()
    compared = 0
    for owner in (run, optimization):
        for field in dataclasses.fields(owner):
            if field.name in defaults:
                value = getattr(owner, field.name)
                assert defaults[field.name] == (value.value if isinstance(value, settings.Choice) else value), (
                    field.name
                )
                compared += 1
    assert compared >= 20  # every option of the method is a setting


@pytest.mark.parametrize(
    "name, value, option, text",
    [
        ("window", 4, "--window", "4"),
        ("levels", 13, "--levels", "13"),
        ("weight", -0.5, "--weight", "-0.5"),
        ("learning_rate", 0.0, "--learning-rate", "0"),
        ("iterations", [3, -1], "--iterations", "3,-1"),
    ],
)
def test_one_bound_refuses_a_value_from_python_and_from_the_command_line(name, value, option, text):
    with pytest.raises(InputError, match=name.replace("_", " ")):
        OptimizationSettings(**{name: value})
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_method_arguments(parser)
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args([option, text])


def test_strings_become_enums_once_and_nearest_is_refused_in_the_similarity():
    run = RegistrationSettings(
        mode="phantom", optimization=OptimizationSettings(similarity="mi", interpolation="cubic")
    )
    assert run.mode is Mode.PHANTOM and run.optimization.interpolation is Interpolation.CUBIC
    assert run.optimization.similarity is settings.Similarity.MI and str(run.optimization.similarity) == "mi"
    with pytest.raises(InputError, match="no gradient"):
        OptimizationSettings(interpolation=Interpolation.NEAREST)
    assert Interpolation.NEAREST not in settings.SIMILARITY_INTERPOLATIONS


def test_every_choice_has_a_label_and_per_mode_defaults_cover_the_iterative_modes():
    for enum_type in (
        settings.Mode,
        settings.Similarity,
        settings.Regularizer,
        settings.Interpolation,
        settings.Device,
    ):
        for member in enum_type:
            assert member.label() != member.value, member
    assert set(settings.DEFAULT_ITERATIONS) == {Mode.INSTANCE, Mode.PHANTOM}
    assert set(settings.DEFAULT_INTERPOLATION) == set(Mode)
    assert set(settings.DEFAULT_INTERPOLATION.values()) <= set(settings.SIMILARITY_INTERPOLATIONS)


def test_interpolation_defaults_per_mode_and_an_explicit_choice_wins():
    unset = OptimizationSettings()
    assert unset.interpolation is None
    assert unset.interpolation_for("instance") is Interpolation.CUBIC
    assert unset.interpolation_for(Mode.LEARNED_REFINE) is Interpolation.CUBIC
    assert unset.interpolation_for("phantom") is Interpolation.CUBIC
    assert unset.interpolation_for(Mode.LEARNED) is Interpolation.LINEAR
    assert OptimizationSettings(interpolation="linear").interpolation_for("instance") is Interpolation.LINEAR
    # the command line: no option = None (the mode's default), and the help says which
    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    assert parser.parse_args([]).interpolation is None
    help_text = " ".join(parser.format_help().split())
    assert "instance, learned-refine, phantom cubic" in help_text and "learned linear" in help_text
    run = settings_from_args(parser.parse_args(["--mode", "phantom", "--interpolation", "cubic"]))
    assert run.optimization.interpolation is Interpolation.CUBIC
    assert command_line_arguments(run) == ["--mode", "phantom", "--interpolation", "cubic"]
    assert set(settings.DENSE_LEARNING_RATES) == set(settings.Optimizer)


def test_number_and_schedule_checks():
    assert Number(int, 1, odd=True).problem(5) is None
    assert "odd" in Number(int, 1, odd=True).problem(6)
    assert "integer" in Number(int).problem(2.5)
    assert "finite" in Number(float).problem(float("nan"))
    assert Schedule()("30,15") == [30, 15] and Schedule()("7") == 7
    assert "integers >= 0" in Schedule().problem([1, -2])


def test_the_defaults_the_readme_states_are_the_settings():
    """Where the README or the command-line reference names a default in a form a program can
    read, it is cnnreg.settings'."""
    import re
    from pathlib import Path

    from cnnreg.settings import DEFAULT_INTERPOLATION, DEFAULT_ITERATIONS, PRESETS, Mode, OptimizationSettings

    root = Path(__file__).resolve().parents[2]
    readme = " ".join((root / "README.md").read_text(encoding="utf-8").split())
    reference = " ".join((root / "docs" / "command-line.md").read_text(encoding="utf-8").split())
    defaults, budget = OptimizationSettings(), RegistrationSettings().max_working_voxels
    # the README's option table
    assert f"`lncc` (default, window {defaults.window} voxels)" in readme
    assert f"`diffusion` (default, weight {defaults.weight:g})" in readme
    assert f"images over {budget / 1e6:g} M voxels get one by default" in readme
    assert f"`--iterations {','.join(map(str, DEFAULT_ITERATIONS[Mode.INSTANCE]))}`" in readme
    assert re.search(r"`--preset NAME` \| " + ", ".join(f"`{name}`" for name in PRESETS), readme)
    # the command-line reference
    stated = re.search(r"Iterations per level default to ([\d,]+) \(instance\) and ([\d,]+) \(phantom\)", reference)
    assert stated, "docs/command-line.md no longer states the iterations per level"
    assert stated.group(1) == ",".join(map(str, DEFAULT_ITERATIONS[Mode.INSTANCE]))
    assert stated.group(2) == ",".join(map(str, DEFAULT_ITERATIONS[Mode.PHANTOM]))
    stated_budget = re.search(
        r"`--max-working-voxels N` \(a fixed image of more than N voxels, default ([\d,]+)", reference
    )
    assert stated_budget and int(stated_budget.group(1).replace(",", "")) == budget
    assert f"folding-penalty weight {defaults.jacobian_weight:g}" in reference
    cubic = sorted(m.value for m, i in DEFAULT_INTERPOLATION.items() if i.value == "cubic")
    assert "cubic for instance, learned-refine and phantom" in reference
    assert cubic == ["instance", "learned-refine", "phantom"]
