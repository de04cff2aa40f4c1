"""``python -m cnnreg register|apply``: outputs, progress lines, exit codes, no partial output.

One real subprocess run (the command a user and the Slicer module run); everything else calls
``cnnreg.cli.main([...])`` in-process, which returns the same exit code ``__main__`` exits with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from clihelpers import FAST, SAMPLE, register_args, sample_args, snapshot

from cnnreg.cli import main
from cnnreg.settings import (
    EXIT_DEVICE,
    EXIT_INPUT,
    OUTPUT_FILES,
    REGISTRATION_SUMMARY,
)

SUMMARY_KEYS = set(REGISTRATION_SUMMARY) | {"files", "provenance"}  # the one definition (cnnreg.settings)


@pytest.fixture(scope="module")
def cli_run(inputs, tmp_path_factory, subprocess_env):
    """``python -m cnnreg register`` in a subprocess (phantom mode, tiny schedule)."""
    out = tmp_path_factory.mktemp("runs") / "result"
    command = [sys.executable, "-m", "cnnreg", *register_args(inputs, out, *FAST)]
    completed = subprocess.run(command, capture_output=True, text=True, env=subprocess_env, timeout=300)
    return dict(out=out, completed=completed)


# --------------------------------------------------------------------------------------
# register: a successful run
# --------------------------------------------------------------------------------------


def test_summary_records_what_made_the_result(cli_run, inputs):
    """Provenance: the command line, every input with its SHA-256 (the file's bytes), versions."""
    import hashlib

    import SimpleITK

    assert cli_run["completed"].returncode == 0, cli_run["completed"].stderr
    provenance = json.loads((cli_run["out"] / "summary.json").read_text())["provenance"]
    assert provenance["command_line"][:2] == ["cnnreg", "register"] and "--fixed" in provenance["command_line"]
    fixed = inputs["fixed.nii.gz"]
    with open(fixed, "rb") as handle:
        assert provenance["inputs"]["fixed"] == {
            "path": os.path.abspath(fixed),
            "sha256": hashlib.sha256(handle.read()).hexdigest(),
        }
    assert set(provenance["inputs"]) == {"fixed", "moving", "moving_labels"}
    assert provenance["versions"]["torch"] == torch.__version__
    assert provenance["versions"]["SimpleITK"] == SimpleITK.Version.VersionString()
    assert "weights" not in provenance  # phantom mode uses no shipped weights


def test_register_writes_all_six_outputs(cli_run):
    completed = cli_run["completed"]
    assert completed.returncode == 0, completed.stderr
    out = cli_run["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES.values())
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "jacobian.nii.gz"):
        image = sitk.ReadImage(str(out / name))
        assert image.GetSize() == (18, 20, 16)
        np.testing.assert_allclose(image.GetSpacing(), (1.1, 0.9, 1.6), rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), (-10.0, 5.0, 2.5), atol=1e-5)
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSize() == (18, 20, 16)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert (out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_register_summary_json(cli_run):
    summary = json.loads((cli_run["out"] / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["mode"] == "instance" and summary["similarity"] == "lncc" and summary["regularizer"] == "diffusion"
    assert summary["iterations"] == [4] and summary["levels"] == 1 and summary["seed"] == 0
    assert summary["iterations_requested"] == 4
    assert summary["device"].startswith("cpu")
    assert summary["files"] == {k: v for k, v in OUTPUT_FILES.items()}
    assert 0.0 <= summary["folding_fraction"] <= 1.0
    assert summary["folding_percent"] == pytest.approx(100 * summary["folding_fraction"])
    assert summary["min_jacobian"] <= summary["max_jacobian"]
    assert summary["fixed_size"] == [18, 20, 16]


def test_register_progress_lines(cli_run):
    lines = [line for line in cli_run["completed"].stdout.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["iteration"] for e in progress] == [1, 2, 3, 4]
    assert progress[-1]["fraction"] == pytest.approx(1.0)
    for event in progress:
        assert {"stage", "iterations", "loss", "similarity_loss", "regularization"} <= set(event)
    done = events[-1]
    assert done["summary"]["mode"] == "instance"
    assert set(done["files"]) == set(OUTPUT_FILES)


def test_second_run_without_overwrite_is_refused_and_leaves_files_untouched(cli_run, inputs, capsys):
    out = cli_run["out"]
    before = snapshot(out)
    code = main(register_args(inputs, out, *FAST))
    captured = capsys.readouterr()
    assert code == EXIT_INPUT == 2
    assert str(out) in captured.err and "--overwrite" in captured.err
    error = json.loads(captured.out.strip().splitlines()[-1])
    assert error["event"] == "error" and error["exit_code"] == 2 and str(out) in error["message"]
    assert snapshot(out) == before


def test_overwrite_replaces_the_results(inputs, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(register_args(inputs, out, "--progress", "none", *FAST)) == 0  # an earlier run, with its QC
    assert (out / "qc.png").exists()
    code = main(register_args(inputs, out, "--overwrite", "--mode", "instance", "--no-qc", "--progress", "none", *FAST))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == ""  # --progress none: no JSON lines
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "instance"
    assert not (out / "qc.png").exists() and "qc" not in summary["files"]
    # --overwrite: the folder holds exactly this run (no stale file of an earlier one)
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["files"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".again.")]  # no staging left


# --------------------------------------------------------------------------------------
# register: bad input -> non-zero exit, a clear message, no output folder
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"fixed": "missing.nii.gz"}, "fixed image file not found"),
        ({"moving": "garbage.nii.gz"}, "cannot read moving image file"),
        ({"moving": "nan.nrrd"}, "NaN or infinite"),
        ({"moving": "constant.nii.gz"}, "is constant"),
        ({"fixed": "slice2d.nii.gz"}, "both must be 2D or both 3D"),
        ({"labels": "labels_elsewhere.nii.gz"}, "not on the moving image grid"),
    ],
    ids=["missing", "garbage", "nan", "constant", "2d-vs-3d", "labels-off-grid"],
)
def test_bad_input_exits_2_with_a_message_and_no_output(inputs, tmp_path, capsys, arguments, message):
    paths = dict(inputs)
    paths["missing.nii.gz"] = str(inputs["folder"] / "missing.nii.gz")
    out = tmp_path / "never"
    code = main(register_args(paths, out, *FAST, **arguments))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("cnnreg register: error: ") and message in captured.err
    assert not out.exists()


@pytest.mark.parametrize(
    "option, value",
    [
        ("--similarity", "ncc"),
        ("--mode", "magic"),
        ("--regularizer", "l3"),
        ("--normalization", "zscore"),
        ("--iterations", "10,x"),
        ("--interpolation", "nearest"),
    ],
)
def test_unknown_option_values_are_rejected_by_the_parser(inputs, tmp_path, capsys, option, value):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main(register_args(inputs, out, option, value))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and value in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_a_gpu_exits_3(inputs, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(register_args(inputs, out, "--device", "cuda", "--iterations", "1"))
    assert code == EXIT_DEVICE == 3
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_learned_mode_without_weights_is_a_clear_input_error(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CNNREG_MODELS_DIR", str(tmp_path / "no_models"))
    out = tmp_path / "never"
    code = main(register_args(inputs, out, "--mode", "learned", "--device", "cpu"))
    assert code == 2
    assert "no shipped 3D weights" in capsys.readouterr().err
    assert not out.exists()


def test_zero_features_is_a_clear_input_error(inputs, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:  # refused while parsing, exit code 2
        main(register_args(inputs, out, *FAST, "--features", "0"))
    assert exit_info.value.code == 2 and "--features: must be >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_bad_input_in_a_real_process(inputs, tmp_path, subprocess_env):
    out = tmp_path / "never"
    command = [sys.executable, "-m", "cnnreg", *register_args(inputs, out, moving="constant.nii.gz")]
    completed = subprocess.run(command, capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert completed.returncode == 2
    assert "is constant" in completed.stderr and "Traceback" not in completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1])["event"] == "error"
    assert not out.exists()


# --------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------


def test_apply_nearest_reproduces_warped_labels_exactly(cli_run, inputs, tmp_path, capsys):
    out = cli_run["out"]
    applied = tmp_path / "labels_applied.nii.gz"
    code = main(
        [
            "apply",
            "--displacement", str(out / "displacement.nii.gz"),
            "--image", inputs["labels.nii.gz"],
            "--interpolation", "nearest",
            "--out", str(applied),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    ours = sitk.ReadImage(str(applied))
    reference = sitk.ReadImage(str(out / "warped_labels.nii.gz"))
    assert ours.GetPixelID() == reference.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference))
    assert ours.GetOrigin() == reference.GetOrigin() and ours.GetDirection() == reference.GetDirection()


def test_apply_reproduces_warped_image(cli_run, inputs, tmp_path):
    out = cli_run["out"]
    applied = tmp_path / "moving_applied.nii.gz"
    args = ["apply", "--displacement", str(out / "displacement.nii.gz"), "--image", inputs["moving.nii.gz"]]
    # the run sampled with the default cubic B-spline: apply the field the same way
    assert json.loads((out / "summary.json").read_text())["interpolation"] == "cubic"
    args += ["--interpolation", "cubic"]
    assert main([*args, "--reference", inputs["fixed.nii.gz"], "--out", str(applied)]) == 0
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(sitk.ReadImage(str(applied))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"))),
        atol=1e-5,
    )


def test_register_and_apply_with_cubic_interpolation(inputs, tmp_path, capsys):
    out = tmp_path / "cubic"
    args = register_args(inputs, out, *FAST, "--mode", "instance", "--interpolation", "cubic")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interpolation"] == "cubic" and summary["similarity_after"] > summary["similarity_before"]
    applied = tmp_path / "moving_applied.nii.gz"
    apply = ["apply", "--displacement", str(out / "displacement.nii.gz"), "--image", inputs["moving.nii.gz"]]
    apply += ["--reference", inputs["fixed.nii.gz"]]
    assert main([*apply, "--interpolation", "cubic", "--out", str(applied)]) == 0
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(applied))), warped, atol=1e-5)
    # B-spline resampling differs from linear resampling of the same field
    linear = tmp_path / "moving_linear.nii.gz"
    assert main([*apply, "--out", str(linear)]) == 0
    assert np.abs(sitk.GetArrayFromImage(sitk.ReadImage(str(linear))) - warped).max() > 1e-3


def test_apply_refuses_to_overwrite(cli_run, inputs, tmp_path, capsys):
    out = cli_run["out"]
    target = tmp_path / "applied.nii.gz"
    args = ["apply", "--displacement", str(out / "displacement.nii.gz"), "--image", inputs["labels.nii.gz"]]
    args += ["--interpolation", "nearest", "--out", str(target)]
    assert main(args) == 0
    before = (target.stat().st_mtime_ns, target.read_bytes())
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "--overwrite" in err
    assert (target.stat().st_mtime_ns, target.read_bytes()) == before
    assert main([*args, "--overwrite"]) == 0


def test_apply_refuses_to_write_over_an_input(cli_run, inputs, capsys):
    field = str(cli_run["out"] / "displacement.nii.gz")
    before = Path(field).read_bytes()
    code = main(["apply", "--displacement", field, "--image", inputs["moving.nii.gz"], "--out", field, "--overwrite"])
    assert code == 2 and "one of the inputs" in capsys.readouterr().err
    assert Path(field).read_bytes() == before


def test_apply_replaces_a_link_at_the_output_never_its_target(cli_run, inputs, tmp_path, capsys):
    field = str(cli_run["out"] / "displacement.nii.gz")
    target = tmp_path / "mine.nii.gz"
    target.write_bytes(Path(inputs["moving.nii.gz"]).read_bytes())
    link = tmp_path / "applied.nii.gz"
    os.symlink(target, link)
    before = target.read_bytes()
    args = ["apply", "--displacement", field, "--image", inputs["labels.nii.gz"], "--interpolation", "nearest"]
    assert main([*args, "--out", str(link), "--overwrite"]) == 0
    assert target.read_bytes() == before and not link.is_symlink()
    # a link that points at an input is refused outright
    os.remove(link)
    os.symlink(inputs["labels.nii.gz"], link)
    assert main([*args, "--out", str(link), "--overwrite"]) == 2 and "one of the inputs" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_apply_bad_inputs(cli_run, inputs, tmp_path, capsys):
    target = tmp_path / "x.nii.gz"
    code = main(
        ["apply", "--displacement", inputs["moving.nii.gz"], "--image", inputs["moving.nii.gz"], "--out", str(target)]
    )
    assert code == 2 and "not a displacement field" in capsys.readouterr().err
    field = str(cli_run["out"] / "displacement.nii.gz")
    code = main(["apply", "--displacement", field, "--image", inputs["slice2d.nii.gz"], "--out", str(target)])
    assert code == 2 and "2D but the displacement field is 3D" in capsys.readouterr().err
    assert not target.exists()


def test_apply_nearest_accepts_a_single_label_mask(cli_run, synth, tmp_path, capsys):
    mask = synth.make_image(np.ones((16, 20, 18), np.uint8), spacing=(1.1, 0.9, 1.6), origin=(-10.0, 5.0, 2.5))
    mask_path = tmp_path / "mask.nii.gz"
    sitk.WriteImage(mask, str(mask_path))
    field = str(cli_run["out"] / "displacement.nii.gz")
    code = main(
        [
            "apply",
            "--displacement",
            field,
            "--image",
            str(mask_path),
            "--interpolation",
            "nearest",
            "--out",
            str(tmp_path / "o.nii.gz"),
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "register" in text and "apply" in text


def test_cli_does_not_import_slicer_vtk_or_qt(subprocess_env):
    code = (
        "import sys, cnnreg.cli, cnnreg.registration, cnnreg.qc\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('slicer', 'vtk', 'qt', 'ctk', 'PythonQt')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


@pytest.mark.parametrize("mode", ["instance", "phantom", "learned", "learned-refine"])
@pytest.mark.parametrize("command", ["register", "atlas"])
def test_python_api_and_command_line_defaults_agree(mode, command):
    from cnnreg.cli import build_parser
    from cnnreg.settings import DEFAULT_ITERATIONS, Mode, RegistrationSettings, settings_from_args

    parser, _ = build_parser()
    inputs = {
        "register": ["--fixed", "f.nii", "--moving", "m.nii", "--out", "o"],
        "atlas": ["--images", "a.nii", "b.nii", "--out", "o"],
    }[command]
    args = parser.parse_args([command, *inputs, "--mode", mode])
    from_command_line, from_python = settings_from_args(args), RegistrationSettings(mode=mode)
    assert from_command_line == from_python
    assert from_command_line.mode is Mode(mode)  # strings became enums, once
    assert from_command_line.iterations_requested() == from_python.iterations_requested()
    if mode in ("instance", "phantom"):
        assert from_python.iterations_requested() == list(DEFAULT_ITERATIONS[Mode(mode)])


def test_settings_survive_the_command_line():
    """command_line_arguments (what the Slicer module runs) parses back to the same settings."""
    from cnnreg.cli import build_parser
    from cnnreg.settings import OptimizationSettings, RegistrationSettings, command_line_arguments, settings_from_args

    parser, _ = build_parser()
    inputs = ["register", "--fixed", "f.nii", "--moving", "m.nii", "--out", "o"]
    assert command_line_arguments(RegistrationSettings()) == ["--mode", "instance"]
    changed = RegistrationSettings(
        mode="learned-refine",
        seed=7,
        affine=True,
        refine_iterations=[30, 15],
        optimization=OptimizationSettings(similarity="mi", weight=0.25, iterations=(5, 4), interpolation="cubic"),
    )
    arguments = command_line_arguments(changed)
    assert arguments[:2] == ["--mode", "learned-refine"] and "--affine" in arguments
    assert settings_from_args(parser.parse_args(inputs + arguments)) == changed


def test_register_without_mode_is_instance_mode():
    from cnnreg.cli import build_parser
    from cnnreg.settings import RegistrationSettings

    parser, _ = build_parser()
    args = parser.parse_args(["register", "--fixed", "f.nii", "--moving", "m.nii", "--out", "o"])
    assert args.mode == "instance" == RegistrationSettings().mode
    text = parser._subparsers._group_actions[0].choices["register"].format_help()
    options = text[text.index("options:") :]
    for option in ("--mode", "--similarity", "--weight", "--window", "--iterations", "--seed", "--features"):
        entry = options[options.index("  " + option) :].split("\n  --")[0]
        assert "default" in entry, entry


# --------------------------------------------------------------------------------------
# writing results: staged, verified, never through links, never half
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# reading inputs: what SimpleITK hides, and options refused at parse time
# --------------------------------------------------------------------------------------


def _nifti_pair(tmp_path, synth, **changes):
    array = synth.blob_array((16, 18, 20), seed=3).astype(np.float32)
    fixed = tmp_path / "f.nii.gz"
    sitk.WriteImage(synth.make_image(array), str(fixed))
    for name, change in changes.items():
        changed = array.copy()
        change(changed)
        sitk.WriteImage(synth.make_image(changed), str(tmp_path / name), useCompression=name.endswith(".gz"))
    return fixed


@pytest.mark.parametrize("name", ["m.nii.gz", "m.nii"])
def test_nan_and_inf_stored_in_nifti_are_refused(tmp_path, synth, capsys, name):
    def plant(a):
        a[2, 3, 4], a[5, 5, 5] = np.nan, np.inf

    fixed = _nifti_pair(tmp_path, synth, **{name: plant})
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))).all()  # what SimpleITK shows
    args = ["register", "--fixed", str(fixed), "--moving", str(tmp_path / name), "--out", str(tmp_path / "o"), *FAST]
    assert main(args) == EXIT_INPUT
    assert "2 NaN or infinite voxels" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["m.nii.gz", "m.nii"])
def test_truncated_nifti_is_refused(tmp_path, synth, capsys, name):
    fixed = _nifti_pair(tmp_path, synth, **{name: lambda a: None})
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    sitk.ReadImage(str(path))  # SimpleITK reads it without complaint
    apply_args = ["apply", "--displacement", str(path), "--image", str(fixed), "--out", str(tmp_path / "a.nii.gz")]
    args = ["register", "--fixed", str(fixed), "--moving", str(path), "--out", str(tmp_path / "o"), *FAST]
    assert main(args) == EXIT_INPUT
    assert "truncated" in capsys.readouterr().err and str(path) in str(path)
    assert main(apply_args) == EXIT_INPUT and "truncated" in capsys.readouterr().err


def test_a_volume_too_large_for_the_memory_is_refused_from_its_header(tmp_path, capsys):
    import gzip
    import struct

    header = bytearray(352)  # NIfTI-1, 1000^3 uint8 zeros: ~1 MB of gzip, 1 GB of voxels
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 1000, 1000, 1000, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 2, 8)
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\x00"
    path = tmp_path / "huge.nii.gz"
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(bytes(header))
        for _ in range(100):
            handle.write(bytes(10**7))
    args = ["register", "--fixed", str(path), "--moving", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main(args) == EXIT_DEVICE
    captured = capsys.readouterr()
    error = json.loads(captured.out.strip().splitlines()[-1])
    assert error["event"] == "error" and "GiB" in error["message"] and "1000x1000x1000" in error["message"]


@pytest.mark.parametrize(
    "option, value",
    [
        ("--threads", "-4"),
        ("--threads", "0"),
        ("--seed", "99999999999999999999"),
        ("--seed", "-1"),
        ("--weight", "nan"),
        ("--weight", "-1"),
        ("--field-smoothing", "-3"),
        ("--field-smoothing", "nan"),
        ("--jacobian-weight", "inf"),
        ("--learning-rate", "0"),
        ("--control-spacing", "0.5"),
        ("--levels", "0"),
    ],
)
def test_bad_numbers_are_refused_at_parse_time(inputs, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(register_args(inputs, tmp_path / "o", option, value))
    assert exit_info.value.code == 2 and option in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_unknown_device_is_bad_input(inputs, tmp_path, capsys):
    assert main(register_args(inputs, tmp_path / "o", "--device", "tpu", *FAST[2:])) == EXIT_INPUT
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_apply_with_a_reference_of_another_dimension_is_bad_input(cli_run, inputs, tmp_path, capsys):
    field = str(cli_run["out"] / "displacement.nii.gz")
    args = [
        "apply",
        "--displacement",
        field,
        "--image",
        inputs["moving.nii.gz"],
        "--reference",
        inputs["slice2d.nii.gz"],
    ]
    assert main([*args, "--out", str(tmp_path / "a.nii.gz")]) == EXIT_INPUT
    assert "reference grid is 2D" in capsys.readouterr().err


def test_a_single_slice_stored_as_3d_is_refused_clearly(tmp_path, synth, capsys):
    array = synth.blob_array((24, 26), seed=2)[None]  # (k, j, i) = (1, 24, 26): SimpleITK size (26, 24, 1)
    fixed, moving = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(fixed))
    sitk.WriteImage(sitk.GetImageFromArray(np.roll(array, 2, axis=2)), str(moving))
    assert sitk.ReadImage(str(fixed)).GetSize() == (26, 24, 1)
    args = ["register", "--fixed", str(fixed), "--moving", str(moving), "--out", str(tmp_path / "o"), *FAST]
    assert main(args) == EXIT_INPUT
    assert "single slice stored as a 3D image" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, levels, ran",
    [
        (["--iterations", "1,2"], 3, [1, 1, 2]),  # padded at the coarse end
        (["--levels", "3", "--iterations", "3,3,2,2"], 3, [3, 2, 2]),  # the last three
        (["--levels", "2", "--iterations", "2"], 2, [2, 2]),
    ],
)
def test_summary_records_the_schedule_that_ran(tmp_path, extra, levels, ran):
    assert main(sample_args(tmp_path / "o", "--mode", "instance", *extra)) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["levels"] == levels and summary["iterations"] == ran


def test_a_diverged_optimisation_is_a_numerical_failure(tmp_path, capsys):
    code = main(sample_args(tmp_path / "o", "--mode", "instance", "--learning-rate", "1e6", "--iterations", "3"))
    assert code == 4 and "diverged" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_every_option_of_every_command_has_help_and_shows_its_default():
    import argparse

    from cnnreg.cli import DefaultsHelpFormatter, build_parser

    parser, _ = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"register", "apply", "evaluate", "atlas", "train"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help line"
            meaningful = action.default is not None and action.default is not False and not action.required
            if meaningful and action.option_strings:
                line = DefaultsHelpFormatter("cnnreg")._get_help_string(action)
                assert "default" in line, f"{name} {action.option_strings}: default {action.default!r} not shown"
        assert "%(default)" not in text


def test_a_registration_that_lowers_the_similarity_fails(inputs, tmp_path, capsys, monkeypatch):
    """A field that makes the pair less similar (here: a forced 2-voxel shift of an image
    registered to itself) is a failed registration: exit 4 and nothing written; with
    --keep-failed the results are written, the summary says why, and the exit code is still 4."""
    import cnnreg.registration

    def shifted(settings, fixed, moving, mask, callback):
        callback({"event": "progress", "stage": "level 1/1", "iteration": 1})
        u = fixed.new_zeros((1, 3, *fixed.shape[2:]))
        u[:, 0] = 2.0
        return u

    monkeypatch.setattr(cnnreg.registration, "_estimate_field", shifted)
    out = tmp_path / "worse"
    extra = ["--mode", "instance", "--no-qc", "--progress", "none", *FAST]
    code = main(register_args(inputs, out, *extra, moving="fixed.nii.gz"))
    captured = capsys.readouterr()
    assert code == 4 and "the lncc similarity got worse" in captured.err and "--keep-failed" in captured.err
    assert not out.exists()
    code = main(register_args(inputs, out, *extra, "--keep-failed", moving="fixed.nii.gz"))
    captured = capsys.readouterr()
    assert code == 4 and "results kept in" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["similarity_overlap_after"] < summary["similarity_overlap_before"]  # LNCC: higher is better
    assert "got worse" in summary["failed"]


# ------------------------------------------------------------------ nothing of the user's is lost


# ------------------------------------------------------------------ apply: label maps stay label maps


def test_apply_decides_by_the_image_label_maps_keep_their_organs(tmp_path, capsys):
    """The sample's moving labels (uint8) pulled through the known field onto the fixed grid:
    with no --interpolation they stay labels (no new values) and every organ keeps its volume
    within 2 % of the fixed labels'; linear interpolation, as the default was, changed WM by 25 %
    (and now warns)."""
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE / "fixed_labels.nii.gz")))
    apply = ["apply", "--displacement", str(SAMPLE / "true_displacement.nii.gz"), "--image"]
    grid = ["--reference", str(SAMPLE / "fixed_labels.nii.gz")]
    out = tmp_path / "labels.nii.gz"
    assert main([*apply, str(SAMPLE / "moving_labels.nii.gz"), *grid, "--out", str(out)]) == 0
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert set(np.unique(warped)) <= set(np.unique(fixed_labels))
    for label in (1, 2):
        assert abs((warped == label).sum() / (fixed_labels == label).sum() - 1) < 0.02, label
    linear = tmp_path / "linear.nii.gz"
    command = [*apply, str(SAMPLE / "moving_labels.nii.gz"), *grid, "--interpolation", "linear", "--out", str(linear)]
    capsys.readouterr()
    assert main(command) == 0
    assert "--interpolation nearest or label" in capsys.readouterr().err
    changed = sitk.GetArrayFromImage(sitk.ReadImage(str(linear)))
    assert abs((changed == 2).sum() / (fixed_labels == 2).sum() - 1) > 0.1  # what the warning is about
    # a float image is still interpolated linearly by default
    image = tmp_path / "image.nii.gz"
    assert main([*apply, str(SAMPLE / "moving.nii.gz"), "--out", str(image)]) == 0
    assert "(linear interpolation)" in capsys.readouterr().err


def test_label_aware_warp_onto_a_finer_grid_is_closer_to_the_true_shape():
    """A ball of radius 10 mm labelled on a 3 mm grid, brought onto a 1 mm grid (identity field):
    nearest neighbour keeps the 3 mm staircase (Dice 0.91 against the ball drawn at 1 mm);
    label-aware gives its smooth iso-surface (0.94)."""
    from cnnreg import image as im
    from cnnreg.evaluate import dice_per_label

    def ball(n, spacing):
        axis = np.arange(n) * spacing - (n - 1) * spacing / 2
        points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)
        inside = np.linalg.norm(points - [0.3, -0.4, 0.2], axis=-1) <= 10.0
        image = sitk.GetImageFromArray(inside.astype(np.uint8) * 2)
        image.SetSpacing([spacing] * 3)
        image.SetOrigin([-(n - 1) * spacing / 2] * 3)
        return image

    coarse, fine = ball(12, 3.0), ball(34, 1.0)
    identity = sitk.GetImageFromArray(np.zeros((34, 34, 34, 3)), isVector=True)
    identity.CopyInformation(fine)
    aware = dice_per_label(fine, im.apply_displacement(coarse, identity, fine, "label"), [2])[2]
    nearest = dice_per_label(fine, im.apply_displacement(coarse, identity, fine, "nearest"), [2])[2]
    assert aware > nearest + 0.02 and aware > 0.93, (aware, nearest)
    # the default rule: label-aware onto a grid with voxels under half the labels', else nearest
    assert im.label_interpolation(coarse, fine).value == "label"
    assert im.label_interpolation(fine, fine).value == "nearest" == im.label_interpolation(fine, coarse).value
    ramp = sitk.Cast(sitk.GetImageFromArray(np.arange(60.0).reshape(3, 4, 5)), sitk.sitkUInt8)
    assert im.is_label_map(coarse) and not im.is_label_map(ramp)


def test_a_partly_diverged_run_is_a_failure_not_a_success(tmp_path, capsys):
    """No regularisation and a large step on the sample pair fold ~2 % of the voxels: exit 4 and
    nothing written (it used to exit 0 up to 25 %); --keep-failed writes the results, still exit 4."""
    unstable = ["--mode", "instance", "--weight", "0", "--jacobian-weight", "0", "--learning-rate", "0.4"]
    out = tmp_path / "diverged"
    assert main(sample_args(out, *unstable, "--iterations", "20,10,10")) == 4
    message = capsys.readouterr().err
    assert "folds" in message and "at most 1 % is accepted" in message and not out.exists()
    assert main(sample_args(out, *unstable, "--iterations", "20,10,10", "--keep-failed")) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folding_percent"] > 1.0 and "folds" in summary["failed"]


def test_similarity_is_judged_where_both_images_have_data(synth, tmp_path):
    """Images with a bright background (0.8, not 0) shifted by 3 voxels: the warped moving image is
    zero-filled where it leaves its grid, which lowers MSE over the whole grid; over the voxels
    where both images are defined the registration is an improvement, so the run succeeds."""
    shape = (24, 28, 26)
    fixed = 0.8 + 0.2 * synth.blob_array(shape, seed=5)
    moving = np.roll(fixed, 3, axis=2)
    moving[:, :, :3] = 0.8
    paths = []
    for name, array in (("f.nii.gz", fixed), ("m.nii.gz", moving)):
        paths.append(str(tmp_path / name))
        sitk.WriteImage(synth.make_image(array.astype(np.float32), spacing=(1.0, 1.0, 1.0)), paths[-1])
    out = tmp_path / "o"
    args = ["register", "--fixed", paths[0], "--moving", paths[1], "--out", str(out), "--similarity", "mse"]
    assert main([*args, "--device", "cpu", "--iterations", "60,40", "--levels", "2", "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] is None
    assert summary["similarity_overlap_after"] < 0.9 * summary["similarity_overlap_before"]  # MSE: lower is better
    # over the whole grid, with the zero-filled border, the same run reads as much worse
    assert summary["similarity_after"] > 10 * summary["similarity_before"]


def test_options_without_sensible_use_are_bounded_and_memory_failures_named(inputs, tmp_path, capsys, monkeypatch):
    """--features 100000 used to die with a traceback (exit 1) and --field-smoothing 1e6 ran an
    uncapped kernel: both are refused before any work; the memory estimate grows with the CNN's
    width; the CPU allocator's failure is exit 3 with advice, not a traceback."""
    from cnnreg.registration import BASELINE_BYTES, estimate_memory_bytes

    for option, value in (("--features", "100000"), ("--field-smoothing", "1e6")):
        with pytest.raises(SystemExit) as error:
            main(register_args(inputs, tmp_path / "o", option, value))
        assert error.value.code == 2 and option in capsys.readouterr().err
    narrow = estimate_memory_bytes((96,) * 3, (96,) * 3, "phantom", features=16)
    wide = estimate_memory_bytes((96,) * 3, (96,) * 3, "phantom", features=256)
    images = BASELINE_BYTES + 16 * 96**3  # the part that does not depend on the network
    assert (wide - images) == pytest.approx(16 * (narrow - images), rel=1e-6)  # 256 / 16 features
    import cnnreg.registration

    def allocation_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(cnnreg.registration, "_estimate_field", allocation_fails)
    assert main(register_args(inputs, tmp_path / "o", *FAST, "--progress", "none")) == 3
    assert "out of memory" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "arguments",
    [["--help"], ["register", "--help"], ["simulation-inputs", "--help"], ["register", "--fixed", "f.nii"]],
)
def test_help_and_argument_errors_leave_torch_unimported(arguments):
    """The parser builds only the command it runs: help and usage errors answer without loading
    torch (seconds on a cold disk)."""
    probe = (
        "import sys\nfrom cnnreg.cli import main\n"
        f"try:\n    main({arguments!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert completed.stdout.split()[-2:] == ["NO-TORCH", "2" if "--fixed" in arguments else "0"], completed.stderr


def test_a_terminal_gets_a_bar_and_a_summary_not_json(tmp_path, subprocess_env):
    """``register`` on a pseudo-terminal (the default --progress auto): a progress bar and a
    one-line human summary, no JSON lines; piped, the same run writes JSON lines."""
    import pty
    import select

    def command_into(out):
        arguments = sample_args(out, "--iterations", "2,2,2")
        at = arguments.index("--progress")
        return [sys.executable, "-m", "cnnreg", *arguments[:at], *arguments[at + 2 :]]

    out = tmp_path / "tty"
    command = command_into(out)
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, stdout=terminal, stderr=terminal, env=subprocess_env, close_fds=True)
    os.close(terminal)
    chunks = []
    while True:
        ready, _, _ = select.select([controller], [], [], 300)
        if not ready:
            process.kill()
            break
        try:
            data = os.read(controller, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    assert process.wait(timeout=60) == 0
    text = b"".join(chunks).decode("utf-8", "replace")
    assert '{"event"' not in text, text[-2000:]
    assert "%" in text and " it " in text  # the bar
    assert "registered in" in text and f"results in {out}" in text and "->" in text
    piped = subprocess.run(
        command_into(tmp_path / "piped"), capture_output=True, text=True, env=subprocess_env, timeout=300
    )
    assert piped.returncode == 0 and '"event": "done"' in piped.stdout
