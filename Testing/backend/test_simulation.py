"""``python -m cnnreg simulation-inputs``: organ, activity and attenuation maps on the patient
grid, organ volumes, and the formats simulators read, against closed forms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from cnnreg import simulation
from cnnreg.cli import main

# NIST XCOM, total mass attenuation with coherent scattering (cm^2/g), water: 0.1707 at 100 keV,
# 0.1505 at 150, 0.1370 at 200, 0.1186 at 300; log-log interpolation gives 0.1538 at 140 keV
# (Tc-99m) and 0.1351 at 208 keV (Lu-177).  Air (1.205 mg/cm^3): 0.1541 at 100 keV, 0.1356 at
# 150, 0.1233 at 200, 0.1067 at 300 keV.
WATER_MU = {140.0: 0.1538, 208.0: 0.1351}
AIR_MU = {140.0: 0.001205 * 0.1388, 208.0: 0.001205 * 0.1216}


@pytest.mark.parametrize("energy", [140.0, 208.0])
def test_mu_of_water_and_air_are_the_nist_values(energy):
    mu = simulation.mu_from_hu(np.array([0.0, -1000.0, -3024.0, 750.0]), energy)
    assert mu[0] == pytest.approx(WATER_MU[energy], rel=2e-3)
    assert mu[1] == pytest.approx(AIR_MU[energy], rel=1e-2) and mu[2] == mu[1]  # padding reads as air
    bone = simulation.linear_attenuation("bonecortical", energy)
    assert mu[3] == pytest.approx((WATER_MU[energy] + bone) / 2, rel=2e-3)  # halfway to cortical bone
    with pytest.raises(simulation.InputError, match="outside the table"):
        simulation.linear_attenuation("water", 5.0)


def test_every_format_reads_back_with_its_voxel_size(tmp_path):
    array = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)  # (k, j, i)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    written = simulation.write_map(image, str(tmp_path), "map", simulation.FORMATS)
    assert set(written) == {"map.nii.gz", "map.mhd", "map.raw", "map.h33", "map.i33"}
    for name in ("map.nii.gz", "map.mhd"):
        back = sitk.ReadImage(str(tmp_path / name))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
        assert back.GetSpacing() == pytest.approx((0.7, 0.8, 2.5))
    data, spacing = simulation.read_interfile(tmp_path / "map.h33")
    np.testing.assert_array_equal(data, array)
    assert spacing == pytest.approx((0.7, 0.8, 2.5))
    # i fastest in the raw file: the first 7 floats are the first row of the first slice
    np.testing.assert_array_equal(np.fromfile(tmp_path / "map.i33", "<f4")[:7], array[0, 0])


def test_an_affine_map_scales_each_organ_by_its_determinant():
    """Phantom organs pulled through a known affine x -> A x (det A = 1.0972): the warped organs'
    volumes are the phantom's / det A, and the det J integral gives the phantom's back, within 1 %."""
    shape = (40, 44, 48)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    labels = np.zeros(shape, np.uint8)
    labels[np.linalg.norm(index - [20, 22, 16], axis=-1) <= 9] = 1
    labels[np.linalg.norm(index - [20, 22, 33], axis=-1) <= 7] = 2
    phantom = sitk.GetImageFromArray(labels)
    phantom.SetSpacing((2.0, 2.0, 2.0))
    matrix = np.diag([1.1, 0.95, 1.05])
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetCenter(phantom.TransformContinuousIndexToPhysicalPoint([23.5, 21.5, 19.5]))
    # the patient grid: 1.5 mm, covering the phantom's extent
    patient = sitk.Image([64, 60, 56], sitk.sitkUInt8)
    patient.SetSpacing((1.5, 1.5, 1.5))
    patient.SetOrigin((-3.0, -3.0, -3.0))
    warped = sitk.Resample(phantom, patient, affine, sitk.sitkNearestNeighbor, 0)
    jacobian = sitk.Image(patient.GetSize(), sitk.sitkFloat32)
    jacobian.CopyInformation(patient)
    jacobian += 1.0  # the deformable part is the identity: det J of the whole map is det A
    rows, warnings = simulation.organ_volumes(warped, jacobian, float(np.linalg.det(matrix)), {1: "a", 2: "b"}, phantom)
    assert not warnings
    for row in rows:
        assert row["warped_ml"] == pytest.approx(row["phantom_ml"] / np.linalg.det(matrix), rel=0.01)
        assert row["jacobian_ml"] == pytest.approx(row["phantom_ml"], rel=0.01)


@pytest.fixture(scope="module")
def result(tmp_path_factory, synth):
    """A real registration result (instance mode, a few iterations) of a small labelled pair."""
    folder = tmp_path_factory.mktemp("simulation")
    geometry = dict(spacing=(1.5, 1.5, 2.0), origin=(-10.0, 4.0, 2.0))
    fixed = synth.blob_array((16, 20, 18), seed=3)
    moving = np.roll(fixed, (1, 0, -1), axis=(0, 1, 2))
    labels = (moving > 0.3 * moving.max()).astype(np.uint8) + (moving > 0.6 * moving.max()).astype(np.uint8)
    ct = np.where(fixed > 0.3 * fixed.max(), 40.0, -1000.0).astype(np.int16)
    paths = {}
    for name, array in (("fixed", fixed), ("moving", moving), ("labels", labels), ("ct", ct)):
        paths[name] = str(folder / f"{name}.nii.gz")
        sitk.WriteImage(synth.make_image(array, **geometry), paths[name])
    out = folder / "registration"
    arguments = ["--fixed", paths["fixed"], "--moving", paths["moving"], "--moving-labels", paths["labels"]]
    fast = ["--device", "cpu", "--levels", "1", "--iterations", "5", "--progress", "none", "--no-qc"]
    assert main(["register", *arguments, "--out", str(out), *fast]) == 0
    (folder / "names.json").write_text(json.dumps({"1": "liver", "2": "kidney"}))
    (folder / "activity.csv").write_text("organ,kBq/ml\nliver,10\n2,250\n")
    (folder / "materials.csv").write_text("liver,muscle\nkidney,water:1.05\n")
    return {"folder": folder, "out": out, **paths}


def test_simulation_inputs_write_every_map(result, tmp_path, capsys):
    out = tmp_path / "sim"
    code = main(
        [
            "simulation-inputs",
            "--result", str(result["out"]),
            "--label-names", str(result["folder"] / "names.json"),
            "--activity", str(result["folder"] / "activity.csv"),
            "--per-organ",
            "--ct", result["ct"],
            "--materials", str(result["folder"] / "materials.csv"),
            "--moving-labels", result["labels"],
            "--energy", "140", "--energy", "208",
            "--format", "nifti,interfile",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "simulation.json").read_text())
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(result["out"] / "warped_labels.nii.gz")))
    organs = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "organs.nii.gz")))
    np.testing.assert_array_equal(organs, warped)
    # the names go through: JSON and a Slicer colour table with the same labels
    assert json.loads((out / "organs.json").read_text()) == {"1": "liver", "2": "kidney"}
    assert simulation.read_label_names(out / "organs.ctbl") == {0: "background", 1: "liver", 2: "kidney"}
    # the summed activity = sum over organs of concentration x warped volume
    voxel_ml = math.prod(sitk.ReadImage(str(out / "organs.nii.gz")).GetSpacing()) / 1000
    activity = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "activity.nii.gz")))
    expected = 10 * (warped == 1).sum() * voxel_ml + 250 * (warped == 2).sum() * voxel_ml
    assert activity.sum() * voxel_ml == pytest.approx(expected, rel=1e-6)
    assert record["total_activity"] == pytest.approx(expected, rel=1e-6)
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "activity_liver.nii.gz")))
    assert set(np.unique(liver)) == {0.0, 10.0}
    # attenuation from the CT (HU 40 and -1000) and from the labels' materials
    mu = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mu_ct_140keV.nii.gz")))
    assert mu.max() == pytest.approx(float(simulation.mu_from_hu(np.array([40.0]), 140.0)[0]))
    mu_labels, _ = simulation.read_interfile(out / "mu_labels_208keV.h33")
    assert mu_labels[warped == 2].mean() == pytest.approx(simulation.linear_attenuation("water", 208.0, 1.05))
    # the organ volume table: label counts on both grids and the det J integral
    volumes = {row["organ"]: row for row in record["organ_volumes"]}
    assert volumes["liver"]["warped_ml"] == pytest.approx((warped == 1).sum() * voxel_ml)
    assert volumes["kidney"]["phantom_ml"] > 0 and volumes["kidney"]["jacobian_ml"] > 0


def test_simulation_inputs_bad_input_is_named(result, tmp_path, capsys):
    base = ["simulation-inputs", "--result", str(result["out"]), "--out", str(tmp_path / "x")]
    assert main([*base, "--ct", result["ct"]]) == 2 and "--energy" in capsys.readouterr().err
    assert main([*base, "--format", "dicom"]) == 2 and "dicom" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("pancreas,5\n")
    args = [*base, "--label-names", str(result["folder"] / "names.json"), "--activity", str(tmp_path / "bad.csv")]
    assert main(args) == 2 and "unknown organ 'pancreas'" in capsys.readouterr().err
    assert main(["simulation-inputs", "--result", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_mass_preserving_apply_keeps_the_total_activity(tmp_path):
    """A uniform concentration inside a ball pulled through a field that scales by 0.9 in every
    axis (x -> 0.9 x about the centre: the ball grows by 1/0.9^3 = 1.37 on the grid): the plain
    warp multiplies the total by 1.37; --mass-preserving (x det J = 0.729) keeps it within 2 %."""
    shape = (48, 48, 48)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    concentration = np.where(np.linalg.norm(index - 23.5, axis=-1) <= 12, 100.0, 0.0).astype(np.float32)
    image = sitk.GetImageFromArray(concentration)
    points = index[..., ::-1]  # (x, y, z) = (i, j, k) mm with spacing 1, origin 0
    field = sitk.GetImageFromArray((0.9 * (points - 23.5) + 23.5) - points, isVector=True)
    sitk.WriteImage(image, str(tmp_path / "activity.nii.gz"))
    sitk.WriteImage(field, str(tmp_path / "field.nii.gz"))
    totals = {}
    for flag in ((), ("--mass-preserving",)):
        out = tmp_path / f"warped{len(flag)}.nii.gz"
        args = ["apply", "--displacement", str(tmp_path / "field.nii.gz"), "--image", str(tmp_path / "activity.nii.gz")]
        assert main([*args, *flag, "--out", str(out)]) == 0
        totals[bool(flag)] = float(sitk.GetArrayFromImage(sitk.ReadImage(str(out))).sum())
    assert totals[False] / concentration.sum() == pytest.approx(1 / 0.9**3, rel=0.03)
    assert totals[True] / concentration.sum() == pytest.approx(1.0, rel=0.02)


def test_a_rerun_with_other_options_replaces_its_own_folder_only(result, tmp_path, capsys):
    out = tmp_path / "sim"
    base = ["simulation-inputs", "--result", str(result["out"]), "--out", str(out)]
    assert main([*base, "--ct", result["ct"], "--energy", "208", "--format", "nifti,mhd"]) == 0
    assert (out / "mu_ct_208keV.mhd").exists()
    # the earlier run's attenuation maps are this command's files: --overwrite replaces them
    assert main([*base, "--overwrite"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "organ_volumes.csv", "organs.ctbl", "organs.json", "organs.nii.gz", "simulation.json"
    ]  # fmt: skip
    # a file that is not one of its names keeps the folder from being replaced
    (out / "notes.txt").write_text("mine")
    assert main([*base, "--overwrite"]) == 2 and "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
