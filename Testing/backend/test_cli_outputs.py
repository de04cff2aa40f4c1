"""``python -m cnnreg``: nothing of the user's is lost. Results staged, verified and swapped in
whole; output folders checked before any work and claimed against concurrent runs; failures,
cancels, links, umask and mount points.
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
from clihelpers import FAST, first_run, register_args, sample_args, snapshot

from cnnreg.cli import main
from cnnreg.errors import WriteError
from cnnreg.settings import EXIT_DEVICE, EXIT_INPUT, OUTPUT_FILES


def test_a_failed_write_leaves_the_old_results_intact(inputs, tmp_path, capsys, monkeypatch):
    from cnnreg import outputs

    out = tmp_path / "results"
    before = first_run(inputs, out)
    calls = []

    def short_write(path, expected):  # the second file "does not read back" (as on a full disk)
        calls.append(path)
        if len(calls) == 2:
            raise WriteError(f"writing {path} failed: the file does not hold what was written")

    monkeypatch.setattr(outputs, "verify_image_file", short_write)
    code = main(register_args(inputs, out, "--overwrite", "--progress", "none", "--seed", "5", *FAST))
    assert code == EXIT_DEVICE == 3 and "does not hold what was written" in capsys.readouterr().err
    assert snapshot(out) == before  # the earlier run, untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "inputs") == ["results"]


def test_cancel_during_the_write_phase_leaves_nothing_new(inputs, tmp_path, capsys, monkeypatch):
    from cnnreg import registration

    out = tmp_path / "fresh"
    original = registration.im.write_image
    count = []

    def interrupted(image, path, compress=True):
        count.append(path)
        if len(count) == 3:
            raise KeyboardInterrupt
        original(image, path, compress)

    monkeypatch.setattr(registration.im, "write_image", interrupted)
    assert main(register_args(inputs, out, "--progress", "none", *FAST)) == 130
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".fresh.")]


def test_a_link_in_the_output_folder_is_replaced_not_followed(inputs, tmp_path):
    out = tmp_path / "linked"
    out.mkdir()
    moving_bytes = Path(inputs["moving.nii.gz"]).read_bytes()
    os.symlink(inputs["moving.nii.gz"], out / "warped.nii.gz")
    assert main(register_args(inputs, out, "--overwrite", "--progress", "none", *FAST)) == 0
    assert Path(inputs["moving.nii.gz"]).read_bytes() == moving_bytes  # the input is untouched
    assert not (out / "warped.nii.gz").is_symlink()


def test_an_input_inside_the_output_folder_is_refused(inputs, tmp_path, capsys):
    out = tmp_path / "holds_input"
    out.mkdir()
    moving = out / "my_moving.nii.gz"
    moving.write_bytes(Path(inputs["moving.nii.gz"]).read_bytes())
    args = register_args(
        {**inputs, "mine": str(moving)}, out, "--overwrite", "--progress", "none", *FAST, moving="mine"
    )
    assert main(args) == EXIT_INPUT and "inside the output folder" in capsys.readouterr().err
    assert moving.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_an_unwritable_output_folder_is_found_before_any_work(inputs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(register_args(inputs, locked / "out", "--progress", "none", *FAST)) == EXIT_INPUT
    finally:
        locked.chmod(0o700)
    assert "cannot write into" in capsys.readouterr().err


def test_an_output_path_under_a_file_is_found_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    from cnnreg import registration

    monkeypatch.setattr(registration, "register", lambda *a, **k: pytest.fail("registered before checking --out"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(register_args(inputs, a_file / "out", "--progress", "none", *FAST)) == EXIT_INPUT
    assert "cannot write into" in capsys.readouterr().err


def test_a_qc_failure_does_not_cost_the_results(inputs, tmp_path, monkeypatch):
    import cnnreg.qc

    def broken(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(cnnreg.qc, "qc_figure", broken)
    out = tmp_path / "no_qc"
    assert main(register_args(inputs, out, "--progress", "none", *FAST)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "matplotlib" in summary["qc_error"] and "qc" not in summary["files"] and not (out / "qc.png").exists()
    assert (out / "displacement.nii.gz").exists()


def test_verify_image_file_finds_a_truncated_file(tmp_path):
    from cnnreg.errors import WriteError
    from cnnreg.outputs import verify_image_file

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
    path = tmp_path / "field.nii.gz"
    sitk.WriteImage(image, str(path), useCompression=True)
    verify_image_file(str(path), image)  # a good file passes
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WriteError, match="field.nii.gz"):
        verify_image_file(str(path), image)
    path.write_bytes(b"")
    with pytest.raises(WriteError, match="empty"):
        verify_image_file(str(path), image)


def test_an_empty_out_is_refused_and_the_working_folder_kept(inputs, tmp_path, monkeypatch):
    """`--out "$OUTDIR"` with the variable unset: the current folder must not be replaced."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("years of work")
    for out in ("", ".", "  "):
        assert main(register_args(inputs, out, *FAST, "--overwrite")) == EXIT_INPUT
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_a_folder_that_is_not_a_result_folder(inputs, tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "patient.nii.gz").write_bytes(b"the user's scan")
    assert main(register_args(inputs, out, *FAST, "--overwrite", "--progress", "none")) == EXIT_INPUT
    message = capsys.readouterr().err
    assert "patient.nii.gz" in message and "--overwrite-any-folder" in message
    assert (out / "patient.nii.gz").read_bytes() == b"the user's scan"
    # a result folder is replaced by --overwrite alone; any folder with the second flag
    result = tmp_path / "result"
    assert main(register_args(inputs, result, *FAST, "--progress", "none")) == 0
    assert main(register_args(inputs, result, *FAST, "--overwrite", "--progress", "none")) == 0
    assert main(register_args(inputs, out, *FAST, "--overwrite", "--overwrite-any-folder", "--progress", "none")) == 0
    assert not (out / "patient.nii.gz").exists() and (out / OUTPUT_FILES["summary"]).exists()


def test_a_folder_another_run_is_writing_into_is_refused(inputs, tmp_path, capsys):
    from cnnreg.outputs import LOCK_NAME

    out = tmp_path / "busy"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{os.getpid()} 2026-12-06T10:00:00+00:00")  # a live process holds it
    for extra in ((), ("--overwrite",)):
        assert main(register_args(inputs, out, *FAST, *extra, "--progress", "none")) == EXIT_INPUT
        assert f"another cnnreg run (process {os.getpid()}" in capsys.readouterr().err
    # the lock of a process that has ended (a killed run) is ignored and replaced
    (out / LOCK_NAME).write_text("999999999 2026-12-06T10:00:00+00:00")
    assert main(register_args(inputs, out, *FAST, "--progress", "none")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        json.loads((out / "summary.json").read_text())["files"].values()
    )


def test_two_runs_at_once_on_one_folder_second_refused(inputs, tmp_path, subprocess_env):
    """Two `cnnreg register` processes started together on the same new folder: one writes its
    results, the other exits 2 naming the first (before, both exited 0 and the second won)."""
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "cnnreg", *register_args(inputs, out, *FAST, "--progress", "none")]
    first = subprocess.Popen(command, env=subprocess_env, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, env=subprocess_env, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, EXIT_INPUT], results
    refused = next(text for code, text in results if code == EXIT_INPUT)
    assert "another cnnreg run (process" in refused or "not empty" in refused
    assert (out / OUTPUT_FILES["summary"]).exists()


def test_a_file_written_into_the_folder_during_the_run_is_kept(tmp_path):
    from cnnreg.errors import InputError
    from cnnreg.outputs import claimed_folder, staged_folder

    out = tmp_path / "results"
    with claimed_folder(out) as claim:
        (out / "notes.txt").write_text("written while the run went on")
        with pytest.raises(InputError, match=r"notes.txt appeared in the output folder .* results are in"):
            with staged_folder(out, claim) as stage:
                Path(stage, "summary.json").write_text("{}")
    assert (out / "notes.txt").read_text() == "written while the run went on"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("results.results-")]
    assert len(kept) == 1 and (kept[0] / "summary.json").exists()
    # a claim that fails leaves no folder it created
    with pytest.raises(RuntimeError):
        with claimed_folder(tmp_path / "fresh"):
            raise RuntimeError("the run failed")
    assert not (tmp_path / "fresh").exists()


def test_results_respect_the_umask_and_keep_a_shared_folders_mode(inputs, tmp_path):
    """Output folders used to be 0700 and apply's files 0600 whatever the umask, and --overwrite
    reset a shared folder's 2775 to 0700."""
    previous = os.umask(0o022)
    try:
        out = tmp_path / "new"
        assert main(register_args(inputs, out, *FAST, "--progress", "none")) == 0
        assert out.stat().st_mode & 0o7777 == 0o755
        out.chmod(0o2775)
        assert main(register_args(inputs, out, *FAST, "--progress", "none", "--overwrite")) == 0
        assert out.stat().st_mode & 0o7777 == 0o2775
        applied = tmp_path / "applied.nii.gz"
        field = str(out / "displacement.nii.gz")
        assert main(["apply", "--displacement", field, "--image", inputs["moving.nii.gz"], "--out", str(applied)]) == 0
        assert applied.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def test_stale_partials_of_killed_runs_are_removed_and_live_ones_kept(inputs, tmp_path):
    dead = tmp_path / ".res.partial-999999999-abc"
    live = tmp_path / f".res.partial-{os.getppid()}-xyz"  # the parent of this process is alive
    for folder in (dead, live):
        folder.mkdir()
    assert main(register_args(inputs, tmp_path / "res", *FAST, "--progress", "none")) == 0
    assert not dead.exists() and live.exists()


def test_inputs_that_are_not_files_are_named(inputs, tmp_path, capsys):
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(tmp_path / "loop.nii.gz")
    cases = ((str(tmp_path), "is a folder"), (str(loop), "broken symbolic link (or a loop of links)"))
    for path, message in cases:
        assert (
            main(["register", "--fixed", path, "--moving", inputs["moving.nii.gz"], "--out", str(tmp_path / "o")]) == 2
        )
        assert message in capsys.readouterr().err


def test_a_closed_terminal_cancels_cleanly(tmp_path, subprocess_env):
    """SIGHUP (the terminal closed) is handled as SIGTERM and Ctrl-C: exit 130, nothing left."""
    import signal

    out = tmp_path / "hup"
    arguments = sample_args(out, "--mode", "instance", "--iterations", "500,500,500", "--progress", "jsonl")
    command = [sys.executable, "-m", "cnnreg", *arguments]
    process = subprocess.Popen(
        command, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    for line in process.stdout:  # wait until it is optimising
        if '"progress"' in line:
            break
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=120) == 130
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hup.")]


def test_messages_name_the_real_problem(inputs, tmp_path, capsys):
    """apply with an unknown output format used to exit 3 naming a hidden temporary file; a .nii
    with vox_offset 0 was refused as 'NaN voxels'; apply on a constant image said 'nothing to
    register'; a truncated .mha said 'No such file or directory'."""
    import struct

    field = str(tmp_path / "field.nii.gz")
    reference = sitk.ReadImage(inputs["fixed.nii.gz"])
    zero = sitk.Image(reference.GetSize(), sitk.sitkVectorFloat32, 3)
    zero.CopyInformation(reference)
    sitk.WriteImage(zero, field)
    apply = ["apply", "--displacement", field, "--image"]
    assert main([*apply, inputs["moving.nii.gz"], "--out", str(tmp_path / "out.xyz")]) == 2
    assert f"cannot write {tmp_path / 'out.xyz'}: unknown image format" in capsys.readouterr().err
    assert main([*apply, inputs["constant.nii.gz"], "--out", str(tmp_path / "constant.nii.gz")]) == 0
    assert not list(tmp_path.glob(".*partial*"))
    plain = tmp_path / "offset.nii"
    sitk.WriteImage(sitk.ReadImage(inputs["moving.nii.gz"]), str(plain))
    data = bytearray(plain.read_bytes())
    data[108:112] = struct.pack("<f", 0.0)
    plain.write_bytes(bytes(data))
    assert main([*apply, str(plain), "--out", str(tmp_path / "o.nii.gz")]) == 2
    assert "vox_offset 0" in capsys.readouterr().err
    mha = tmp_path / "short.mha"
    sitk.WriteImage(sitk.ReadImage(inputs["moving.nii.gz"]), str(mha))
    mha.write_bytes(mha.read_bytes()[:-500])
    assert main([*apply, str(mha), "--out", str(tmp_path / "o.nii.gz")]) == 2
    message = capsys.readouterr().err
    assert "damaged" in message and "No such file" not in message


def test_a_mount_point_as_out_is_refused_before_any_work(inputs, tmp_path, capsys, monkeypatch):
    """The swap of a mount point failed only after the computation ("Device or resource busy")."""
    import cnnreg.outputs

    mount = tmp_path / "mnt"
    mount.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(cnnreg.outputs.os.path, "ismount", lambda path: str(path) == str(mount) or real(path))
    assert main(register_args(inputs, mount, *FAST, "--progress", "none")) == 2
    assert "is a mount point" in capsys.readouterr().err and list(mount.iterdir()) == []
