"""Atlas construction (``cnnreg.atlas``): exactness on identical subjects, unbiasedness on
translated copies, the majority vote, and ``python -m cnnreg atlas`` end to end and on bad input.

Tiny 2D images, instance mode, a few iterations, CPU.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from cnnreg import image as im
from cnnreg.atlas import build_atlas, winning_labels
from cnnreg.cli import main
from cnnreg.errors import InputError
from cnnreg.grid import same_grid
from cnnreg.settings import EXIT_INPUT, OptimizationSettings, RegistrationSettings

SIZE = 32
SHIFT = 3.0  # mm (= voxels): the two subjects sit at +SHIFT and -SHIFT along x
FAST_CLI = ["--mode", "instance", "--similarity", "mse", "--levels", "1", "--iterations", "5", "--device", "cpu"]


def _settings(iterations=30, levels=2) -> RegistrationSettings:
    return RegistrationSettings(
        mode="instance",
        device="cpu",
        optimization=OptimizationSettings(similarity="mse", levels=levels, iterations=iterations),
    )


def _blob(centre=(15.5, 15.5), sigma=3.5) -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    return np.exp(-0.5 * ((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / sigma**2).astype(np.float32)


def _physical_centroid(image: sitk.Image) -> np.ndarray:
    """Intensity-weighted mean of the voxels' LPS positions (mm), ``(x, y)``."""
    weights = np.clip(sitk.GetArrayFromImage(image).astype(np.float64), 0, None)
    points = im.physical_points(image)
    return (points * weights[..., None]).sum(axis=(0, 1)) / weights.sum()


@pytest.fixture(scope="module")
def files(tmp_path_factory, synth):
    """Three small 2D subjects with label maps, a 3D image, and a list file of the subjects."""
    folder = tmp_path_factory.mktemp("atlas_inputs")
    paths = {"images": [], "labels": []}
    for number, shift in enumerate((-2, 0, 2)):
        array = np.roll(synth.blob_array((SIZE, SIZE), seed=4), shift, axis=1)
        labels = (array > 0.4 * array.max()).astype(np.uint8) + (array > 0.75 * array.max()).astype(np.uint8)
        for key, data in (("images", array * (1 + 9 * number)), ("labels", labels)):  # different intensity scales
            path = folder / f"{key}_{number}.nii.gz"
            sitk.WriteImage(synth.make_image(data, spacing=(1.2, 1.0), origin=(4.0, -3.0)), str(path))
            paths[key].append(str(path))
    paths["volume"] = str(folder / "volume.nii.gz")
    sitk.WriteImage(synth.make_image(synth.blob_array((8, SIZE, SIZE), seed=5)), paths["volume"])
    paths["list"] = str(folder / "subjects.txt")
    with open(paths["list"], "w", encoding="utf-8") as handle:
        handle.write("# subjects\n" + "\n".join(p.rsplit("/", 1)[-1] for p in paths["images"]) + "\n")
    return paths


# --------------------------------------------------------------------------------------
# the algorithm
# --------------------------------------------------------------------------------------


def test_atlas_of_identical_images_is_the_image(synth):
    """No deformation (0 registration iterations): template = normalised image, probabilities 0/1,
    winning labels = labels, exactly; a subject at 10x the intensity weighs the same."""
    array = synth.blob_array((SIZE, SIZE), seed=2)
    labels = (array > 0.4 * array.max()).astype(np.uint8) + (array > 0.7 * array.max()).astype(np.uint8)
    images = [synth.make_image(array * scale, spacing=(0.8, 1.1)) for scale in (1.0, 1.0, 10.0)]
    label_maps = [synth.make_image(labels, spacing=(0.8, 1.1)) for _ in images]
    events = []
    result = build_atlas(
        images, _settings(iterations=0, levels=1), labels=label_maps, iterations=2, callback=events.append
    )

    np.testing.assert_allclose(sitk.GetArrayFromImage(result.template), array / array.max(), atol=1e-5)
    assert result.template.GetSpacing() == images[0].GetSpacing()
    assert sorted(result.probabilities) == [1, 2]
    for value, probability in result.probabilities.items():
        np.testing.assert_array_equal(sitk.GetArrayFromImage(probability), (labels == value).astype(np.float32))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.winning_labels), labels)
    assert result.winning_labels.GetPixelID() == sitk.sitkUInt8
    assert [h["iteration"] for h in result.history] == [1, 2]
    assert all(h["shape_update_mm"] == 0 and h["template_change_rms"] < 1e-6 for h in result.history)

    atlas_events = [e for e in events if e["event"] == "atlas"]
    assert [(e["iteration"], e["subject"]) for e in atlas_events] == [(t, s) for t in (1, 2) for s in (1, 2, 3)]
    assert all(e["iterations"] == 2 and e["subjects"] == 3 for e in atlas_events)
    fractions = [e["fraction"] for e in atlas_events]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] < 1
    assert [e["event"] for e in events].count("atlas_update") == 2


@pytest.mark.parametrize("initial", ["mean", "first subject"])
def test_atlas_of_translated_copies_sits_at_their_mean_position(initial):
    """Two copies of a blob at x = +3 and -3 mm (grids with different origins; the first image's grid
    is the reference): the template's blob is at the middle, also when starting from the first
    subject (the shape update removes that bias), and each kept field maps its subject onto it."""
    subjects = []
    for sign in (1, -1):
        image = sitk.GetImageFromArray(_blob())
        image.SetOrigin((sign * SHIFT, 0.0))
        subjects.append(image)
    start = subjects[0] if initial == "first subject" else None
    result = build_atlas(subjects, _settings(), iterations=2, initial=start, keep_fields=True)

    assert same_grid(result.template, subjects[0])
    centroids = [_physical_centroid(s)[0] for s in subjects]
    middle = float(np.mean(centroids))
    found = _physical_centroid(result.template)[0]
    assert abs(found - middle) < 1.0, (found, centroids)
    assert min(abs(found - c) for c in centroids) > SHIFT - 1.0
    assert result.history[-1]["shape_update_mm"] < 0.5
    if initial == "first subject":
        assert result.history[0]["shape_update_mm"] > 0.5 * SHIFT  # the update moved the template

    template = sitk.GetArrayFromImage(result.template)
    for subject, field in zip(subjects, result.displacements):
        assert field.GetPixelID() == sitk.sitkVectorFloat32 and same_grid(field, subjects[0])
        mapped = sitk.GetArrayFromImage(im.apply_displacement(subject, field, reference=result.template))
        assert np.abs(mapped - template).max() < 0.1


def test_winning_label_is_the_majority_and_background_wins_ties():
    p1 = np.array([[0.6, 0.5, 0.4, 0.0, 0.3]], dtype=np.float32)
    p2 = np.array([[0.2, 0.0, 0.4, 0.0, 0.35]], dtype=np.float32)
    # background = 1 - p1 - p2 = [0.2, 0.5, 0.2, 1.0, 0.35]
    winner = winning_labels({1: p1, 300: p2}, p1.shape)
    np.testing.assert_array_equal(winner, [[1, 0, 1, 0, 0]])
    assert winner.dtype == np.uint16


def test_build_atlas_rejects_bad_subjects(synth):
    flat = synth.make_image(synth.blob_array((SIZE, SIZE), seed=1))
    volume = synth.make_image(synth.blob_array((6, SIZE, SIZE), seed=1))
    with pytest.raises(InputError, match="at least 2 images"):
        build_atlas([flat], _settings())
    with pytest.raises(InputError, match="scan_b.nii is 3D.*same dimension"):
        build_atlas([flat, volume], _settings(), names=["scan_a.nii", "scan_b.nii"])
    with pytest.raises(InputError, match="1 label maps for 2 images"):
        build_atlas([flat, flat], _settings(), labels=[flat])
    shifted = synth.make_image(np.zeros((SIZE, SIZE), np.uint8), origin=(5.0, 0.0))
    with pytest.raises(InputError, match="not on the moving image grid"):
        build_atlas([flat, flat], _settings(), labels=[shifted, shifted])
    with pytest.raises(InputError, match="atlas iterations"):
        build_atlas([flat, flat], _settings(), iterations=0)


# --------------------------------------------------------------------------------------
# python -m cnnreg atlas
# --------------------------------------------------------------------------------------


def test_atlas_command_writes_the_atlas(files, tmp_path, capsys):
    out = tmp_path / "atlas"
    labels = files["labels"]
    code = main(
        ["atlas", "--images", files["list"], "--labels", *labels, "--out", str(out), "--atlas-iterations", "2"]
        + ["--keep-fields", "--progress", "jsonl", *FAST_CLI]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    events = [json.loads(line) for line in captured.out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("atlas") == 6 and kinds.count("atlas_update") == 2 and "progress" in kinds
    assert all(0 <= e["atlas_fraction"] <= 1 for e in events if e["event"] == "progress")

    names = sorted(p.name for p in out.iterdir())
    assert names == ["atlas.json", "fields", "probabilities", "template.nii.gz", "winning_labels.nii.gz"]
    assert sorted(p.name for p in (out / "probabilities").iterdir()) == ["label_1.nii.gz", "label_2.nii.gz"]
    assert len(list((out / "fields").iterdir())) == 3
    template = sitk.ReadImage(str(out / "template.nii.gz"))
    first = sitk.ReadImage(files["images"][0])
    assert same_grid(template, first) and template.GetPixelID() == sitk.sitkFloat32
    assert float(sitk.GetArrayViewFromImage(template).max()) <= 1.01  # normalised, not the 10x subject's scale
    probability = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "probabilities" / "label_1.nii.gz")))
    assert probability.min() >= 0 and probability.max() <= 1 and probability.max() > 0.5
    winner = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "winning_labels.nii.gz")))
    assert set(np.unique(winner)) == {0, 1, 2}
    summary = json.loads((out / "atlas.json").read_text())
    assert summary["subjects"] == files["images"] and summary["labels"] == [1, 2]
    assert len(summary["history"]) == 2 and summary["settings"]["mode"] == "instance"
    assert summary["settings"]["optimization"]["iterations"] == 5
    assert summary["probability_files"]["2"] == "probabilities/label_2.nii.gz"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cnnreg-atlas-")]  # staging removed


def _atlas(files, out, *extra):
    return ["atlas", "--out", str(out), "--atlas-iterations", "1", "--progress", "none", *FAST_CLI, *extra]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (lambda f: ["--images", f["images"][0]], "at least 2 images"),
        (lambda f: ["--images", f["images"][0], f["volume"]], "volume.nii.gz is 3D.*same dimension"),
        (lambda f: ["--images", *f["images"], "--labels", *f["labels"][:2]], "2 label maps for 3 images"),
        (lambda f: ["--images", *f["images"][:2], "--labels", f["labels"][0], f["volume"]], "not on the"),
        (lambda f: ["--images", *f["images"][:2], "--reference", f["volume"]], "reference image is 3D"),
        (lambda f: ["--images", *f["images"][:2], "--atlas-iterations", "0"], "atlas-iterations must be >= 1"),
    ],
)
def test_atlas_command_bad_input_exits_2_and_writes_nothing(files, tmp_path, capsys, arguments, message):
    out = tmp_path / "atlas"
    code = main(_atlas(files, out, *arguments(files)))
    assert code == EXIT_INPUT
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_atlas_command_refuses_a_non_empty_folder_before_any_work(files, tmp_path, capsys):
    out = tmp_path / "atlas"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = main(_atlas(files, out, "--images", *files["images"]))
    assert code == EXIT_INPUT
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    # --overwrite alone keeps a folder that is not an atlas folder (notes.txt would be deleted)
    code = main(_atlas(files, out, "--images", *files["images"][:2], "--overwrite", "--iterations", "0"))
    assert code == EXIT_INPUT and "--overwrite-any-folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    arguments = ["--images", *files["images"][:2], "--overwrite", "--overwrite-any-folder", "--iterations", "0"]
    code = main(_atlas(files, out, *arguments))
    assert code == 0, capsys.readouterr().err
    # --overwrite: the folder holds exactly the new atlas (as register's outputs)
    assert sorted(p.name for p in out.iterdir()) == ["atlas.json", "template.nii.gz"]


def test_atlas_help_lists_the_method_options(capsys):
    with pytest.raises(SystemExit):
        main(["atlas", "--help"])
    text = capsys.readouterr().out
    for option in ("--images", "--labels", "--atlas-iterations", "--reference", "--keep-fields", "--mode", "--weight"):
        assert option in text


def test_atlas_refuses_an_input_inside_the_output_folder(files, tmp_path, capsys):
    import shutil

    out = tmp_path / "atlas_with_input"
    out.mkdir()
    inside = out / "subject.nii.gz"
    shutil.copyfile(files["images"][0], inside)
    code = main(_atlas(files, out, "--images", str(inside), *files["images"][1:], "--overwrite"))
    assert code == EXIT_INPUT and "inside the output folder" in capsys.readouterr().err
    assert inside.exists()


def test_atlas_command_on_dask_workers_writes_the_serial_atlas(files, tmp_path, capsys):
    """``--workers 2``: the iterations' registrations on a local Dask cluster, the same template
    as the serial command at the same thread count."""
    pytest.importorskip("distributed")
    base = ["atlas", "--images", files["list"], "--atlas-iterations", "2", "--progress", "none", "--threads", "1"]
    assert main([*base, *FAST_CLI, "--out", str(tmp_path / "serial")]) == 0, capsys.readouterr().err
    code = main([*base, *FAST_CLI, "--out", str(tmp_path / "dask"), "--workers", "2", "--dashboard", "none"])
    assert code == 0, capsys.readouterr().err
    serial, remote = (sitk.ReadImage(str(tmp_path / name / "template.nii.gz")) for name in ("serial", "dask"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(remote), sitk.GetArrayFromImage(serial))
