"""``cnnreg batch`` on a real Dask LocalCluster (two worker processes on 127.0.0.1, tiny pairs)."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

distributed = pytest.importorskip("distributed")

from cnnreg import batch  # noqa: E402
from cnnreg.cli import main  # noqa: E402

METHOD = [
    "--mode",
    "instance",
    "--similarity",
    "mse",
    "--levels",
    "2",
    "--iterations",
    "40,40",
    "--no-qc",
    "--seed",
    "0",
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, synth):
    """Three moving images (shifted blobs with labels) onto one fixed image, and a pairs CSV."""
    folder = tmp_path_factory.mktemp("cohort")
    geometry = dict(spacing=(1.2, 1.0, 1.5), origin=(-8.0, 3.0, 1.0))
    fixed = synth.blob_array((14, 16, 15), seed=5)

    def labels_of(array):
        return (array > 0.4 * array.max()).astype(np.uint8)

    sitk.WriteImage(synth.make_image(fixed, **geometry), str(folder / "fixed.nii.gz"))
    sitk.WriteImage(synth.make_image(labels_of(fixed), **geometry), str(folder / "fixed_labels.nii.gz"))
    rows = []
    for index, shift in enumerate([(1, 0, 0), (0, 1, -1), (-1, 0, 1)]):
        moving = np.roll(fixed, shift, axis=(0, 1, 2))
        sitk.WriteImage(synth.make_image(moving, **geometry), str(folder / f"moving{index}.nii.gz"))
        sitk.WriteImage(synth.make_image(labels_of(moving), **geometry), str(folder / f"labels{index}.nii.gz"))
        rows.append(f"fixed.nii.gz,moving{index}.nii.gz,labels{index}.nii.gz,fixed_labels.nii.gz,subject{index}")
    (folder / "pairs.csv").write_text("fixed,moving,moving_labels,fixed_labels,name\n" + "\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with distributed.Client(cluster) as connected:
        yield connected
    cluster.close()


def test_every_pair_is_registered_verified_and_a_rerun_skips_them(cohort, client, tmp_path):
    pairs = batch.read_pairs(cohort / "pairs.csv")
    assert [p["name"] for p in pairs] == ["subject0", "subject1", "subject2"]
    out = str(tmp_path / "batch")
    os.makedirs(out)
    events = []
    rows = batch.run_batch(client, pairs, out, METHOD, threads=1, report=events.append)
    assert [r["status"] for r in rows] == ["done"] * 3, rows
    from cnnreg.evaluate import dice_per_label

    fixed_labels = sitk.ReadImage(str(cohort / "fixed_labels.nii.gz"))
    for row, pair in zip(rows, pairs):
        assert row["similarity_after"] < 0.5 * row["similarity_before"]  # MSE at least halved
        before = dice_per_label(fixed_labels, sitk.ReadImage(pair["moving_labels"]))[1]
        assert row["dice_mean"] > before + 0.05 and row["folding_percent"] < 0.01, (row, before)
        assert batch.finished_summary(next(p for p in pairs if p["name"] == row["name"]), row["out"]) is not None
    assert events[-1]["done"] == 3 and events[-1]["failed"] == 0
    with open(os.path.join(out, "batch.csv"), encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [t["status"] for t in table] == ["done"] * 3
    # a rerun: nothing is registered again
    mtimes = {r["name"]: os.path.getmtime(os.path.join(r["out"], "displacement.nii.gz")) for r in rows}
    again = batch.run_batch(client, pairs, out, METHOD, threads=1)
    assert [r["status"] for r in again] == ["skipped"] * 3
    assert all(os.path.getmtime(os.path.join(r["out"], "displacement.nii.gz")) == mtimes[r["name"]] for r in again)
    # a changed input is not "done": its pair runs again
    sitk.WriteImage(sitk.ReadImage(str(cohort / "moving2.nii.gz")), str(tmp_path / "moving2_copy.nrrd"))
    changed = [dict(pairs[2], moving=str(tmp_path / "moving2_copy.nrrd"))]
    assert batch.run_batch(client, changed, out, METHOD, threads=1)[0]["status"] == "done"


def test_the_same_pair_gives_the_serial_register_result(cohort, client, tmp_path):
    pair = batch.read_pairs(cohort / "pairs.csv")[1]
    out = str(tmp_path / "batch")
    os.makedirs(out)
    [row] = batch.run_batch(client, [pair], out, METHOD, threads=1)
    serial = str(tmp_path / "serial")
    assert main(batch.register_arguments(pair, serial, METHOD, threads=1)) == 0
    by_batch = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(row["out"], "displacement.nii.gz")))
    by_register = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(serial, "displacement.nii.gz")))
    np.testing.assert_array_equal(by_batch, by_register)


def test_a_pair_whose_worker_is_killed_is_rescheduled_and_completes(cohort, client, tmp_path):
    pair = dict(batch.read_pairs(cohort / "pairs.csv")[0], options="--iterations 400")
    out = str(tmp_path / "batch")
    os.makedirs(out)
    result = {}
    runner = threading.Thread(target=lambda: result.update(rows=batch.run_batch(client, [pair], out, METHOD, 1)))
    runner.start()
    deadline = time.time() + 60
    victim = None
    while victim is None and time.time() < deadline:
        busy = [worker for worker, keys in client.processing().items() if keys]
        victim = busy[0] if busy else None
        time.sleep(0.2)
    assert victim is not None, "the pair never started"
    time.sleep(1.0)  # mid-registration
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive()
    [row] = result["rows"]
    assert row["status"] == "done", row
    assert batch.finished_summary(pair, row["out"]) is not None
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker for the next tests


def test_the_command_records_a_bad_pair_alone_and_says_so(cohort, tmp_path, capsys):
    (tmp_path / "nan.nii.gz").write_bytes(b"not an image")
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving,name\n"
        f"{cohort / 'fixed.nii.gz'},{cohort / 'moving0.nii.gz'},subject0\n"
        f"{cohort / 'fixed.nii.gz'},{tmp_path / 'nan.nii.gz'},broken\n"
    )
    out = tmp_path / "cohort"
    arguments = ["batch", "--pairs", str(tmp_path / "pairs.csv"), "--out", str(out), "--workers", "2", "--threads", "1"]
    code = main([*arguments, *METHOD, "--progress", "none", "--dashboard", "none"])
    err = capsys.readouterr().err
    assert code == 4, err
    table = {row["name"]: row for row in json.loads((out / "batch.json").read_text())["pairs"]}
    assert table["subject0"]["status"] == "done" and table["broken"]["status"] == "failed"
    assert "nan.nii.gz" in table["broken"]["message"] and "broken failed" in err
    assert not (out / "broken" / "summary.json").exists()


def test_the_two_shorthands_and_bad_pair_files(cohort, tmp_path):
    import argparse

    from cnnreg.errors import InputError

    def args(**given):
        base = dict(pairs=None, moving=None, moving_labels=None, fixed_folder=None, fixed=None, moving_folder=None)
        return argparse.Namespace(**{**base, **given})

    subjects = tmp_path / "subjects"
    subjects.mkdir()
    for index in range(2):
        (subjects / f"sub-0{index}.nii.gz").write_bytes((cohort / f"moving{index}.nii.gz").read_bytes())
    (subjects / "notes.txt").write_text("not an image")
    to_template = batch.pairs_from_arguments(args(fixed=str(cohort / "fixed.nii.gz"), moving_folder=str(subjects)))
    assert [p["name"] for p in to_template] == ["sub-00", "sub-01"]
    assert {p["fixed"] for p in to_template} == {str(cohort / "fixed.nii.gz")}
    phantom = batch.pairs_from_arguments(
        args(
            moving=str(cohort / "moving0.nii.gz"),
            moving_labels=str(cohort / "labels0.nii.gz"),
            fixed_folder=str(subjects),
        )
    )
    assert [(p["name"], p["moving_labels"]) for p in phantom] == [
        ("sub-00", str(cohort / "labels0.nii.gz")),
        ("sub-01", str(cohort / "labels0.nii.gz")),
    ]
    with pytest.raises(InputError, match="give one of"):
        batch.pairs_from_arguments(args(pairs="x.csv", fixed_folder=str(subjects)))
    (tmp_path / "bad.csv").write_text("fixed,image\na.nii.gz,b.nii.gz\n")
    with pytest.raises(InputError, match="needs the columns fixed and moving"):
        batch.read_pairs(tmp_path / "bad.csv")
    (tmp_path / "twice.csv").write_text("fixed,moving,name\na.nii.gz,b.nii.gz,x\nc.nii.gz,d.nii.gz,x\n")
    with pytest.raises(InputError, match="repeated"):
        batch.read_pairs(tmp_path / "twice.csv")


def test_an_atlas_on_the_cluster_equals_the_serial_atlas(cohort, client):
    """build_atlas with its registrations on two Dask workers (1 thread each) gives the serial
    atlas (1 thread) bit for bit: the results are summed in the subjects' order."""
    import torch

    from cnnreg.atlas import build_atlas
    from cnnreg.settings import OptimizationSettings, RegistrationSettings

    images = [sitk.ReadImage(str(cohort / f"moving{i}.nii.gz")) for i in range(3)]
    labels = [sitk.ReadImage(str(cohort / f"labels{i}.nii.gz")) for i in range(3)]
    settings = RegistrationSettings(
        device="cpu", seed=0, optimization=OptimizationSettings(similarity="mse", levels=2, iterations=(20, 20))
    )
    events = []
    remote = build_atlas(
        images, settings, labels=labels, iterations=2, client=client, threads=1, callback=events.append
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = build_atlas(images, settings, labels=labels, iterations=2)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(remote.template), sitk.GetArrayFromImage(serial.template))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(remote.probabilities[1]), sitk.GetArrayFromImage(serial.probabilities[1])
    )
    assert [e["subject"] for e in events if e["event"] == "atlas"] == [1, 2, 3, 1, 2, 3]
    assert remote.history[-1]["similarity_after"] == serial.history[-1]["similarity_after"]


def test_workers_get_glibcs_allocator_back(client):
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ (every large tensor mapped anew:
    a registration 3.5x slower); a pair's task resets the thresholds on glibc."""
    import platform

    assert client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))  # what the workers start with
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert all(client.run(batch.worker_allocator).values())


def test_a_terminal_sees_one_bar_over_the_pairs(capsys):
    """In a terminal: one line redrawn (pairs done, failed, running, to go, ETA), ended when the last
    pair is in."""
    from types import SimpleNamespace

    terminal = batch._pair_reporter(SimpleNamespace(jsonl=False, bar=True))
    for done, remaining in ((1, 2), (2, 1), (3, 0)):
        event = {"done": done, "failed": 0, "running": min(2, remaining), "remaining": remaining, "total": 3}
        terminal({**event, "eta_s": 10.0 * remaining, "name": f"p{done}", "status": "done"})
    err = capsys.readouterr().err
    assert err.count("\r[") == 3 and err.endswith("\n") and err.count("\n") == 1
    assert "pairs 3 done, 0 failed, 0 running, 0 to go, ETA 0 s" in err


def test_a_pair_runs_the_register_command_line_and_reports_its_errors(cohort, tmp_path):
    """run_pair is the ``register`` command: a bad input is its exit code 2 and message, a pair
    option register does not know is argparse's refusal, both as PairFailed; nothing is written."""
    pair = {"fixed": str(cohort / "fixed.nii.gz"), "moving": str(tmp_path / "missing.nii.gz"), "name": "p"}
    with pytest.raises(batch.PairFailed, match=r"exit code 2: .*missing\.nii\.gz"):
        batch.run_pair(pair, str(tmp_path / "a"), METHOD, 1)
    pair = {"fixed": str(cohort / "fixed.nii.gz"), "moving": str(cohort / "moving0.nii.gz"), "options": "--bogus 3"}
    with pytest.raises(batch.PairFailed, match=r"exit code 2: .*unrecognized arguments: --bogus 3"):
        batch.run_pair(pair, str(tmp_path / "b"), METHOD, 1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
