"""The backend subprocess: progress lines, exit codes, cancel of the whole process tree,
and a registration job's clean-up (temporary folder, scene) on cancel and failure."""

import os
import shutil
import sys
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from mrmlhelpers import HERE, OBLIQUE, blob, makeVolume  # noqa: E402

from cnnreg.settings import EXIT_INPUT  # noqa: E402
from CNNRegistrationLib import backendjob, process  # noqa: E402
from CNNRegistrationLib.panel import PanelSettings  # noqa: E402

CHILD = r"""
import json, subprocess, sys, time
print(json.dumps({"event": "start"}), flush=True)
print("plain text", flush=True)
print("a warning", file=sys.stderr, flush=True)
if sys.argv[1] == "forever":
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(json.dumps({"event": "pids", "child": grandchild.pid}), flush=True)
    i = 0
    while True:
        i += 1
        print(json.dumps({"event": "progress", "iteration": i, "iterations": 10**6, "fraction": 0.0, "loss": 1.0}), flush=True)
        time.sleep(0.05)
if sys.argv[1] == "orphan":  # a grandchild that outlives the child and keeps its output pipes open
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(json.dumps({"event": "pids", "child": grandchild.pid}), flush=True)
print(json.dumps({"event": "done", "summary": {"seconds": 0.0}}), flush=True)
sys.exit(int(sys.argv[2]))
"""


def pidAlive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def waitForEvent(backend, kind, timeout=30.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        for event in backend.poll():
            seen.append(event)
            if event.get("event") == kind:
                return event, seen
        time.sleep(0.02)
    raise AssertionError(f"no {kind!r} event within {timeout} s; got {seen}")


def test_parse_line():
    assert process.parseLine('{"event": "progress", "iteration": 3}\n') == {"event": "progress", "iteration": 3}
    assert process.parseLine("Epoch 3 loss 0.1") == {"event": "log", "message": "Epoch 3 loss 0.1"}
    assert process.parseLine('{"no_event": 1}')["event"] == "log"
    assert process.parseLine("{broken")["event"] == "log"


def test_environment_puts_the_module_folder_on_pythonpath():
    environment = process.backendEnvironment(["/extra"], base={"PYTHONPATH": "/old"})
    assert environment["PYTHONPATH"].split(os.pathsep) == ["/extra", process.MODULE_DIR, "/old"]
    assert environment["PYTHONUNBUFFERED"] == "1"
    assert os.path.isdir(os.path.join(process.MODULE_DIR, "cnnreg"))
    assert process.pythonExecutable() == sys.executable  # not inside the Slicer application


@pytest.mark.parametrize("returncode", [0, 2])
def test_events_and_exit_code(returncode):
    backend = process.BackendProcess(["-c", CHILD, "once", str(returncode)])
    backend.start()
    assert backend.wait(timeout=60) == returncode
    events = backend.poll()
    kinds = [event["event"] for event in events]
    assert kinds[-1] == "exit" and events[-1]["returncode"] == returncode and not events[-1]["cancelled"]
    assert {"start", "log", "stderr", "done"} <= set(kinds)
    assert backend.stderrTail() == "a warning"
    assert backend.poll() == []  # the exit event is reported once


@pytest.mark.parametrize("withPsutil", [True, False])
def test_cancel_kills_the_process_tree(monkeypatch, withPsutil):
    backend = process.BackendProcess(["-c", CHILD, "forever", "0"])
    backend.start()
    pids, _ = waitForEvent(backend, "pids")
    waitForEvent(backend, "progress")
    childPid, grandchildPid = backend.process.pid, pids["child"]
    assert pidAlive(grandchildPid)
    if not withPsutil:
        monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` now fails
    started = time.monotonic()
    backend.cancel(timeout=5.0)
    monkeypatch.undo()
    assert time.monotonic() - started < 15
    assert not backend.running
    deadline = time.monotonic() + 5
    while pidAlive(grandchildPid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidAlive(childPid) and not pidAlive(grandchildPid)
    events = backend.poll()
    assert events[-1]["event"] == "exit" and events[-1]["cancelled"]


# -- a registration job with a fake backend ---------------------------------------------------


@pytest.fixture
def fakeBackend(tmp_path, monkeypatch):
    """Folder holding a fake ``cnnreg`` package (see ``fake_cnnreg_main.py``)."""
    package = tmp_path / "fake" / "cnnreg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(os.path.join(HERE, "fake_cnnreg_main.py"), package / "__main__.py")
    monkeypatch.setenv("FAKE_CNNREG_PIDFILE", str(tmp_path / "pids.txt"))
    return str(tmp_path / "fake")


def smallPair(scene):
    shape = (12, 14, 16)
    fixed = makeVolume(scene, blob(shape, (6, 7, 8), 3.0), (1.2, 1.0, 1.5), (5.0, -3.0, 2.0), OBLIQUE, "fixed")
    moving = makeVolume(scene, blob(shape, (6, 8, 7), 3.0), (1.2, 1.0, 1.5), (5.0, -3.0, 2.0), OBLIQUE, "moving")
    return fixed, moving


def sceneNodeIds(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_job_cancel_removes_the_temporary_folder_and_adds_no_nodes(scene, tmp_path, fakeBackend, monkeypatch):
    monkeypatch.setenv("FAKE_CNNREG", "sleep")
    fixed, moving = smallPair(scene)
    before = sceneNodeIds(scene)
    job = backendjob.RegistrationJob(
        fixed, moving, PanelSettings(), extraPythonPath=[fakeBackend], temporaryDirectory=str(tmp_path)
    )
    job.start()
    assert os.path.isfile(os.path.join(job.workDirectory, "fixed.nrrd"))
    waitForEvent(job, "progress")
    assert job.lastProgress["iteration"] >= 1
    pids = [int(p) for p in (tmp_path / "pids.txt").read_text().split()]
    job.cancel()
    assert not os.path.exists(job.workDirectory)
    with pytest.raises(backendjob.RegistrationCancelled):
        job.finish()
    deadline = time.monotonic() + 5
    while any(pidAlive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pidAlive(pid) for pid in pids)
    assert sceneNodeIds(scene) == before


def test_job_failure_reports_the_backend_message(scene, tmp_path, fakeBackend, monkeypatch):
    monkeypatch.setenv("FAKE_CNNREG", "fail")
    fixed, moving = smallPair(scene)
    before = sceneNodeIds(scene)
    job = backendjob.RegistrationJob(fixed, moving, extraPythonPath=[fakeBackend], temporaryDirectory=str(tmp_path))
    with pytest.raises(backendjob.RegistrationError, match="rejected the input: moving image is constant") as caught:
        job.run(timeout=60)
    assert caught.value.returncode == EXIT_INPUT
    assert not os.path.exists(job.workDirectory)
    assert sceneNodeIds(scene) == before


def test_job_refuses_bad_node_choices(scene):
    fixed, moving = smallPair(scene)
    with pytest.raises(ValueError, match="different"):
        backendjob.RegistrationJob(fixed, fixed)
    with pytest.raises(ValueError, match="output node is also an input"):
        backendjob.RegistrationJob(fixed, moving, outputVolumeNode=moving)
    with pytest.raises(ValueError, match="fixed and a moving"):
        backendjob.RegistrationJob(fixed, None)


def test_settings_reach_the_command_line(scene, tmp_path, fakeBackend):
    fixed, moving = smallPair(scene)
    settings = PanelSettings(
        mode="instance",
        similarity="pcc+ssim",
        regularizer="tv",
        weight=0.5,
        iterations=7,
        interpolation="linear",  # not the default, so it must reach the command line
        device="cpu",
        seed=3,
    )
    job = backendjob.RegistrationJob(
        fixed, moving, settings, extraPythonPath=[fakeBackend], temporaryDirectory=str(tmp_path)
    )
    result = job.run(timeout=60)
    arguments = result.summary["arguments"]
    for option, value in [
        ("--mode", "instance"),
        ("--similarity", "pcc+ssim"),
        ("--regularizer", "tv"),
        ("--weight", "0.5"),
        ("--iterations", "7"),
        ("--interpolation", "linear"),
        ("--device", "cpu"),
        ("--seed", "3"),
        ("--progress", "jsonl"),
    ]:
        assert arguments[arguments.index(option) + 1] == value
    assert "--overwrite" in arguments
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(result.outputJacobian), 1.0)


@pytest.mark.parametrize("withPsutil", [True, False])
def test_a_cancelled_process_does_not_report_success(monkeypatch, withPsutil):
    """psutil used to reap the child before Popen.wait(), which then said exit code 0."""
    backend = process.BackendProcess(["-c", CHILD, "forever", "0"])
    backend.start()
    waitForEvent(backend, "progress")
    if not withPsutil:
        monkeypatch.setitem(sys.modules, "psutil", None)
    backend.cancel(timeout=5.0)
    monkeypatch.undo()
    exit, _ = waitForEvent(backend, "exit")
    assert exit["cancelled"] and exit["returncode"] != 0


def test_a_leftover_grandchild_holding_the_pipes_does_not_keep_the_job_running():
    """The child exits 3 and leaves a grandchild with its stdout: the job ends with the child's
    exit code within seconds (it used to stay "running" and wait() to time out), and the
    leftover is stopped."""
    backend = process.BackendProcess(["-c", CHILD, "orphan", "3"])
    backend.start()
    pids, _ = waitForEvent(backend, "pids")
    started = time.monotonic()
    assert backend.wait(timeout=30) == 3
    assert time.monotonic() - started < 15
    exit, _ = waitForEvent(backend, "exit", timeout=10)
    assert exit["returncode"] == 3 and not exit["cancelled"]
    deadline = time.monotonic() + 5
    while pidAlive(pids["child"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidAlive(pids["child"])


@pytest.mark.parametrize(
    "behaviour, message",
    [("interrupted", "interrupted \\(exit code 130, not cancelled here\\)"), ("garbage", "could not be read")],
)
def test_job_failures_are_named_and_leave_the_scene_as_it_was(
    scene, tmp_path, fakeBackend, monkeypatch, behaviour, message
):
    """A backend exit 130 the user did not ask for is a failure, not "cancelled"; outputs that do not
    read back after exit 0 are a RegistrationError (not a raw RuntimeError) and leave no node,
    display nodes included."""
    monkeypatch.setenv("FAKE_CNNREG", behaviour)
    fixed, moving = smallPair(scene)
    before = sceneNodeIds(scene)
    job = backendjob.RegistrationJob(fixed, moving, extraPythonPath=[fakeBackend], temporaryDirectory=str(tmp_path))
    with pytest.raises(backendjob.RegistrationError, match=message):
        job.run(timeout=60)
    assert sceneNodeIds(scene) == before


def test_progress_percent_survives_malformed_fractions():
    assert process.progressPercent({"fraction": 0.256}) == 26
    assert process.progressPercent({"fraction": 1.7}) == 100
    for bad in (float("nan"), float("inf"), "abc", None, [1]):
        assert process.progressPercent({"fraction": bad}) is None
