"""``python -m cnnreg evaluate`` (in-process through ``cnnreg.cli.main``) and the Jacobian statistics
it reports: hand-computed Dice on tiny cube volumes, TRE, det J / SDlogJ closed forms, outputs, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cnnreg import evaluate_cli
from cnnreg.cli import main
from cnnreg.errors import InputError
from cnnreg.evaluate import evaluate_registration, field_jacobian_determinant, jacobian_statistics
from cnnreg.evaluate_cli import read_label_names
from cnnreg.jacobian import sdlogj as torch_sdlogj
from cnnreg.settings import EXIT_INPUT

SHAPE = (10, 10, 10)  # array order (k, j, i)
SPACING = (1.0, 1.5, 2.0)  # SimpleITK order (s_i, s_j, s_k)


def labels(*cubes, shape=SHAPE) -> np.ndarray:
    """Label map with 4x4x4 cubes: each cube is ``(label, (k, j, i) start)``."""
    array = np.zeros(shape, dtype=np.uint8)
    for label, start in cubes:
        array[tuple(slice(s, s + 4) for s in start)] = label
    return array


def write(path: Path, array: np.ndarray, spacing=SPACING, origin=None, vector: bool = False) -> str:
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return str(path)


def linear_vectors(a: float, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """``d(x) = a x`` (LPS mm, origin 0, identity direction) as a ``(*shape, 3)`` array."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)[..., ::-1]
    return a * index * np.asarray(spacing)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# Fixed: label 1 cube at (2, 2, 2), label 2 cube at (2, 2, 6) (touching along i, no overlap).
# Warped: label 1 shifted by 2 voxels along k -> overlap 2x4x4 = 32 of 64: Dice 2*32/128 = 0.5;
# label 2 shifted by 1 voxel along j -> overlap 4x3x4 = 48 of 64: Dice 2*48/128 = 0.75.
FIXED = labels((1, (2, 2, 2)), (2, (2, 2, 6)))
WARPED = labels((1, (4, 2, 2)), (2, (2, 3, 6)))
DICE = {"1": 0.5, "2": 0.75}


@pytest.fixture
def case(tmp_path):
    fixed = write(tmp_path / "in" / "fixed_labels.nii.gz", FIXED)
    warped = write(tmp_path / "in" / "warped_labels.nii.gz", WARPED)
    field = write(tmp_path / "in" / "field.nii.gz", linear_vectors(0.1), vector=True)
    return tmp_path, fixed, warped, field


def test_dice_csv_json_boxplot_and_tre_of_true_field_against_itself(case, capsys):
    tmp_path, fixed, warped, field = case
    names = tmp_path / "in" / "names.txt"
    names.write_text("# label names\n1 left cube\n2 right\n")
    out = tmp_path / "out"
    code = main(
        ["evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--displacement", field]
        + ["--true-displacement", field, "--method", "mine", "--label-names", str(names), "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["dice_boxplot.png", "evaluation.csv", "evaluation.json"]

    (row,) = read_csv(out / "evaluation.csv")
    assert row["method"] == "mine" and row["subject"] == "fixed_labels"
    assert float(row["dice_left cube"]) == pytest.approx(DICE["1"])
    assert float(row["dice_right"]) == pytest.approx(DICE["2"])
    assert float(row["dice_mean"]) == pytest.approx(0.625)
    # label 1 moved 2 voxels along k (spacing 2 mm), label 2 one voxel along j (1.5 mm)
    assert float(row["hd95_left cube"]) == pytest.approx(4.0)
    assert float(row["hd95_right"]) == pytest.approx(1.5)
    assert float(row["tre_mean_mm"]) == 0.0 and float(row["tre_max_mm"]) == 0.0
    assert float(row["min_jacobian"]) == pytest.approx(1.1**3)
    assert float(row["sdlogj"]) == pytest.approx(0.0, abs=1e-12)
    assert float(row["folding_percent"]) == 0.0

    data = json.loads((out / "evaluation.json").read_text())
    (result,) = data["results"]
    assert result["dice"] == pytest.approx(DICE)
    assert result["tre"]["mean"] == 0.0
    assert data["label_names"] == {"1": "left cube", "2": "right"}
    assert data["mean_over_subjects"][0]["dice_mean"] == pytest.approx(0.625)

    png = (out / "dice_boxplot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    header, line = captured.out.strip().splitlines()
    assert header.split() == "method left cube right Dice HD95 mm fold % min detJ SDlogJ TRE mm".split()
    assert line.index("0.625") + len("0.625") == header.index("Dice") + len("Dice")  # right-aligned columns
    assert line.split()[:4] == ["mine", "0.500", "0.750", "0.625"]


def test_two_methods_two_subjects_give_four_rows_and_mean_lines(tmp_path, capsys):
    fixed = [write(tmp_path / s / "seg.nii.gz", FIXED) for s in ("s1", "s2")]
    method_a = [write(tmp_path / "a" / f"{s}.nii.gz", WARPED) for s in ("s1", "s2")]
    method_b = [write(tmp_path / "b" / f"{s}.nii.gz", FIXED) for s in ("s1", "s2")]
    out = tmp_path / "out"
    code = main(
        ["evaluate", "--fixed-labels", *fixed, "--warped-labels", *method_a, "--warped-labels", *method_b]
        + ["--no-surface-distance", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = read_csv(out / "evaluation.csv")
    assert [(r["method"], r["subject"]) for r in rows] == [("a", "s1"), ("a", "s2"), ("b", "s1"), ("b", "s2")]
    assert [float(r["dice_mean"]) for r in rows] == pytest.approx([0.625, 0.625, 1.0, 1.0])
    assert "hd95_mean" not in rows[0]
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 + 2 * 3  # header, per method: two subjects and a mean line
    assert lines[3].split()[:3] == ["a", "mean", "(2)"] and lines[6].split()[:3] == ["b", "mean", "(2)"]


def test_result_folders_and_label_set_differences(tmp_path, capsys):
    fixed = write(tmp_path / "fixed.nii.gz", labels((1, (2, 2, 2)), (3, (2, 2, 6))))
    result = tmp_path / "phantom"
    write(result / "warped_labels.nii.gz", labels((1, (2, 2, 2)), (5, (6, 6, 6))))
    write(result / "displacement.nii.gz", linear_vectors(0.0), vector=True)
    out = tmp_path / "out"
    code = main(["evaluate", "--fixed-labels", fixed, "--result", str(result), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "labels left out: 3 (only in fixed labels); 5 (only in warped labels)" in captured.err
    (row,) = read_csv(out / "evaluation.csv")
    assert row["method"] == "phantom" and float(row["dice_1"]) == 1.0
    assert "dice_3" not in row and "dice_5" not in row
    assert row["labels_only_in_fixed"] == "3" and row["labels_only_in_warped"] == "5"
    assert float(row["folding_percent"]) == 0.0 and float(row["min_jacobian"]) == pytest.approx(1.0)
    data = json.loads((out / "evaluation.json").read_text())
    assert data["results"][0]["labels_left_out"] == {"only_in_fixed": [3], "only_in_warped": [5]}


def test_print_only_without_out(case, capsys):
    tmp_path, fixed, warped, _ = case
    assert main(["evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--no-surface-distance"]) == 0
    header, line = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["method", "1", "2", "Dice"]
    assert line.split() == ["in", "0.500", "0.750", "0.625"]  # default name: the files' folder
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("grid", "are not on the grid of the fixed labels"),
        ("empty", "are empty: every voxel is background"),
        ("missing", "warped labels (method in, subject fixed_labels) file not found"),
        ("counts", "has 2 file(s) but --fixed-labels has 1"),
        ("displacement count", "--displacement was given 2 time(s) but --warped-labels 1 time(s)"),
        ("method names", "2 --method name(s) given for 1 method(s)"),
        ("result", "has no warped_labels.nii.gz"),
    ],
)
def test_bad_input_exits_2_with_a_message(case, capsys, problem, expected):
    tmp_path, fixed, warped, field = case
    argv = ["evaluate", "--fixed-labels", fixed, "--warped-labels", warped]
    if problem == "grid":
        argv[-1] = write(tmp_path / "in" / "moved.nii.gz", WARPED, origin=(5.0, 0.0, 0.0))
    elif problem == "empty":
        argv[-1] = write(tmp_path / "in" / "empty.nii.gz", np.zeros(SHAPE, np.uint8))
    elif problem == "missing":
        argv[-1] = str(tmp_path / "in" / "nothing.nii.gz")
    elif problem == "counts":
        argv.append(warped)
    elif problem == "displacement count":
        argv += ["--displacement", field, "--displacement", field]
    elif problem == "method names":
        argv += ["--method", "x", "--method", "y"]
    elif problem == "result":
        (tmp_path / "empty_result").mkdir()
        argv += ["--result", str(tmp_path / "empty_result")]
    assert main(argv) == EXIT_INPUT
    captured = capsys.readouterr()
    assert captured.err.startswith("cnnreg evaluate: error: ")
    assert expected in captured.err
    assert captured.out == ""  # no JSON error line: evaluate has no --progress


def test_existing_output_folder_is_left_alone(case, capsys):
    tmp_path, fixed, warped, _ = case
    out = tmp_path / "out"
    out.mkdir()
    (out / "evaluation.csv").write_text("keep me")
    assert main(["evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--out", str(out)]) == EXIT_INPUT
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["evaluation.csv"]
    assert (out / "evaluation.csv").read_text() == "keep me"
    # an output that would replace an input is refused even with --overwrite
    names = out / "evaluation.json"
    names.write_text('{"1": "a"}')
    argv = ["evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--label-names", str(names)]
    assert main([*argv, "--out", str(out), "--overwrite"]) == EXIT_INPUT
    assert "would be overwritten" in capsys.readouterr().err
    assert names.read_text() == '{"1": "a"}'


def test_read_label_names_formats(tmp_path):
    json_file = tmp_path / "names.json"
    json_file.write_text('{"0": "background", "1": "GM", "2": "WM"}')
    assert read_label_names(json_file) == {1: "GM", 2: "WM"}
    table = tmp_path / "colours.ctbl"
    table.write_text("# Slicer colour table\n0 Background 0 0 0 0\n1 GM 255 0 0 255\n2 white matter\n3 Area 51\n")
    assert read_label_names(table) == {1: "GM", 2: "white matter", 3: "Area 51"}
    snap = tmp_path / "snap.txt"
    snap.write_text('# ITK-SNAP\n    1   255    0    0        1  1  1    "Left hippocampus"\n')
    assert read_label_names(snap) == {1: "Left hippocampus"}
    duplicates = tmp_path / "dup.txt"
    duplicates.write_text("1 cortex\n2 cortex\n")
    assert read_label_names(duplicates) == {1: "cortex_1", 2: "cortex_2"}
    bad = tmp_path / "bad.txt"
    bad.write_text("one GM\n")
    with pytest.raises(InputError, match="line 1"):
        read_label_names(bad)


# --------------------------------------------------------------------------- det J and SDlogJ


def field_image(vectors: np.ndarray, spacing=SPACING) -> sitk.Image:
    image = sitk.GetImageFromArray(vectors.astype(np.float64), isVector=True)
    image.SetSpacing(spacing)
    return image


@pytest.mark.parametrize("a", [0.2, -0.3])
@pytest.mark.parametrize("dim", [2, 3])
def test_jacobian_statistics_of_linear_field(a, dim):
    # d(x) = a x -> J = (1 + a) I -> det J = (1 + a)^dim everywhere, SDlogJ = 0
    shape, spacing = SHAPE[:dim], SPACING[:dim]
    stats = jacobian_statistics(field_image(linear_vectors(a, shape, spacing), spacing))
    assert stats["min_jacobian"] == pytest.approx((1 + a) ** dim)
    assert stats["max_jacobian"] == pytest.approx((1 + a) ** dim)
    assert stats["sdlogj"] == pytest.approx(0.0, abs=1e-12)
    assert stats["folding_percent"] == 0.0 and stats["voxels"] == np.prod(shape)


def test_sdlogj_of_two_linear_regions_and_clipping():
    # d_x = a x (x = i * s_i) gives det J = 1 + a on a 3D grid; inside a mask that keeps half the
    # voxels from a field with a = 0.5 and half from a = -2 (det -1, clipped to 1e-9) the log
    # values are log 1.5 and log 1e-9, equally often: SDlogJ = |log 1.5 - log 1e-9| / 2.
    index_i = np.broadcast_to(np.arange(SHAPE[2]), SHAPE)
    for a, expected_det in ((0.5, 1.5), (-2.0, -1.0)):
        vectors = np.zeros((*SHAPE, 3))
        vectors[..., 0] = a * index_i * SPACING[0]
        stats = jacobian_statistics(field_image(vectors))
        assert stats["min_jacobian"] == pytest.approx(expected_det)
    folded = stats
    assert folded["folding_percent"] == 100.0 and folded["sdlogj"] == pytest.approx(0.0, abs=1e-12)
    vectors = np.zeros((*SHAPE, 3))
    vectors[..., 0] = np.where(np.arange(SHAPE[0])[:, None, None] < 5, 0.5, -2.0) * index_i * SPACING[0]
    mask = np.ones(SHAPE, bool)
    mask[4:6] = False  # 4 slices of each region remain (det J stays 1 + a at the switch: J is upper triangular)
    stats = jacobian_statistics(field_image(vectors), mask)
    assert stats["voxels"] == 800 and stats["folding_percent"] == 50.0
    assert stats["sdlogj"] == pytest.approx(abs(np.log(1.5) - np.log(1e-9)) / 2)


def test_jacobian_statistics_match_torch_sdlogj_and_evaluate_registration():
    rng = np.random.default_rng(0)
    field = field_image(rng.normal(scale=0.8, size=(*SHAPE, 3)))
    det = field_jacobian_determinant(field)
    mask = np.zeros(SHAPE, bool)
    mask[2:8, 1:9, 3:7] = True
    stats = jacobian_statistics(field, mask)
    reference = torch_sdlogj(torch.from_numpy(det), torch.from_numpy(mask))
    assert stats["sdlogj"] == pytest.approx(reference, rel=1e-12)
    assert stats["min_jacobian"] == pytest.approx(det[mask].min())
    metrics = evaluate_registration(
        sitk.GetImageFromArray(FIXED), sitk.GetImageFromArray(WARPED), field=field, mask=mask, surface_distance=False
    )
    assert metrics["sdlogj"] == stats["sdlogj"] and metrics["folding_percent"] == stats["folding_percent"]
    assert metrics["min_jacobian"] == stats["min_jacobian"] and metrics["max_jacobian"] == stats["max_jacobian"]
    no_field = evaluate_registration(sitk.GetImageFromArray(FIXED), sitk.GetImageFromArray(WARPED))
    assert no_field["sdlogj"] is None and no_field["min_jacobian"] is None


def test_a_field_off_the_fixed_grid_or_of_another_dimension_is_refused(case, capsys):
    tmp_path, fixed, warped, _ = case
    field_2d = write(tmp_path / "in" / "field2d.nii.gz", np.zeros((10, 10, 2)), spacing=SPACING[:2], vector=True)
    args = ["evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--displacement", field_2d]
    assert main(args) == EXIT_INPUT
    assert "is not on the grid of the fixed labels" in capsys.readouterr().err
    small = write(tmp_path / "in" / "small.nii.gz", np.zeros((8, 10, 10, 3)), vector=True)
    assert main(["evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--displacement", small]) == EXIT_INPUT


def test_tre_defaults_to_the_labelled_region_and_reports_no_registration(case, capsys):
    tmp_path, fixed, warped, _ = case
    inside = FIXED > 0
    truth = np.zeros((*SHAPE, 3))
    truth[..., 0] = 1.0  # 1 mm everywhere ...
    truth[~inside, 0] = 5.0  # ... and 5 mm outside the labels
    true_field = write(tmp_path / "in" / "true.nii.gz", truth, vector=True)
    estimate = write(tmp_path / "in" / "estimate.nii.gz", np.where(inside[..., None], truth, 0.0), vector=True)
    out = tmp_path / "tre"
    args = ["evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--displacement", estimate]
    assert main([*args, "--true-displacement", true_field, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "before registration (u = 0)" in err and "TRE mean 1.000 mm over fixed labels > 0" in err
    report = json.loads((out / "evaluation.json").read_text())
    result = report["results"][0]
    assert result["tre"]["mean"] == pytest.approx(0.0) and result["tre"]["voxels"] == int(inside.sum())
    assert result["region"] == "fixed labels > 0"
    assert report["before_registration"]["fixed_labels"]["mean"] == pytest.approx(1.0)


def test_evaluate_overwrite_leaves_exactly_its_outputs_and_a_failure_leaves_the_old_ones(case, capsys, monkeypatch):
    tmp_path, fixed, warped, field = case
    out = tmp_path / "report"
    out.mkdir()
    (out / "stale.csv").write_text("an earlier report")
    args = ["evaluate", "--fixed-labels", fixed, "--warped-labels", warped, "--out", str(out), "--overwrite"]
    assert main(args) == 2 and "stale.csv" in capsys.readouterr().err  # not an evaluate folder: kept
    assert main([*args, "--overwrite-any-folder"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dice_boxplot.png", "evaluation.csv", "evaluation.json"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import cnnreg.evaluate_cli as evaluate_cli

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate_cli, "dice_boxplot", broken)
    assert main(args) == 3 and "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_the_dice_boxplot_pools_many_labels_into_one_box_per_method(tmp_path):
    """An atlas of 116 labels would make a plot per label metres wide: above POOLED_BOXPLOT_LABELS
    the boxes are one per method, over every label."""
    import struct

    def width(labels: int) -> int:
        results = [
            {"method": m, "subject": "s", "dice": {label: 0.5 + 0.01 * label for label in range(1, labels + 1)}}
            for m in ("a", "b")
        ]
        path = tmp_path / f"box{labels}.png"
        evaluate_cli.dice_boxplot(results, ["a", "b"], list(range(1, labels + 1)), {}, str(path))
        return struct.unpack(">I", path.read_bytes()[16:20])[0]  # PNG IHDR width, pixels at 100 dpi

    few, limit, many = 3, evaluate_cli.POOLED_BOXPLOT_LABELS, evaluate_cli.POOLED_BOXPLOT_LABELS + 5
    assert width(many) == 600  # 6 inches: one group of two boxes
    assert width(limit) == round(100 * (1.5 + limit * (0.3 + 0.35 * 2)))  # a group per label
    assert width(few) == 600
