"""Shared set-up of the backend tests: import path, thread count, small synthetic images.

The backend tests run on CPU with plain pytest (no Slicer).  ``cnnreg`` is imported from the
installed package when there is one, else from the checkout's ``CNNRegistration/`` folder.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

BACKEND_ROOT = Path(__file__).resolve().parents[2] / "CNNRegistration"

# OpenMP worker threads that spin-wait make 2-thread torch 10-30x slower when the 2 cores are
# shared with other processes (measured: a small U-Net step 865 ms active vs 47 ms passive).
# libgomp reads this when torch is first imported, so it is set before any torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import cnnreg  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(BACKEND_ROOT))
    import cnnreg  # noqa: F401

# the tests' shared helper modules (clihelpers) beside this file (--import-mode=importlib adds none)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)


@pytest.fixture(scope="session")
def subprocess_env() -> dict:
    """Environment for ``python -m cnnreg`` subprocesses: the backend importable, 2 threads."""
    env = dict(os.environ)
    package_parent = str(Path(cnnreg.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "2"
    env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    env["MKL_NUM_THREADS"] = "2"
    return env


@pytest.fixture(scope="session")
def mni_template() -> np.ndarray:
    """MNI152 2 mm template, ``(99, 117, 95)`` float32 in [0, 1] (nilearn's axis order; any order works
    for the training tests)."""
    datasets = pytest.importorskip("nilearn.datasets")
    array = datasets.load_mni152_template(resolution=2).get_fdata().astype(np.float32)
    return array / array.max()


@pytest.fixture(autouse=True)
def keep_sigterm_handler():
    """``cnnreg.cli.main`` installs a SIGTERM handler; restore pytest's after every test."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def gaussian_blobs(points: np.ndarray, centres, widths, amplitudes) -> np.ndarray:
    """Sum of isotropic Gaussians evaluated at ``points`` ``(..., dim)`` (any units, e.g. mm)."""
    points = np.asarray(points, dtype=np.float64)
    value = np.zeros(points.shape[:-1])
    for centre, width, amplitude in zip(centres, widths, amplitudes):
        squared = np.sum((points - np.asarray(centre, dtype=np.float64)) ** 2, axis=-1)
        value += amplitude * np.exp(-0.5 * squared / width**2)
    return value


def blob_array(shape, seed: int = 0, count: int = 6) -> np.ndarray:
    """Smooth test content on a voxel grid ``shape`` (2D or 3D): a few Gaussian blobs, values ~[0, 1]."""
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    grids = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    centres = [rng.uniform(0.25, 0.75, len(shape)) * np.asarray(shape) for _ in range(count)]
    widths = rng.uniform(0.08, 0.16, count) * min(shape)
    amplitudes = rng.uniform(0.5, 1.0, count)
    return gaussian_blobs(grids, centres, widths, amplitudes).astype(np.float32)


def make_image(array: np.ndarray, spacing=None, origin=None, direction=None) -> sitk.Image:
    """SimpleITK image from an array in SimpleITK's ``(k, j, i)`` order, with optional geometry."""
    image = sitk.GetImageFromArray(np.asarray(array))
    if spacing is not None:
        image.SetSpacing(tuple(float(s) for s in spacing))
    if origin is not None:
        image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    return image


def rotation_matrix(axis, angle_degrees: float) -> np.ndarray:
    """Rotation about ``axis`` (any length) by ``angle_degrees`` (Rodrigues' formula)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    angle = np.deg2rad(angle_degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def planted_fold(shape, box=(3, 7)):
    """Displacement along axis 0 only, ``u_0 = f(x_0)`` inside ``x_1 in [box)`` (and every other
    axis), zero elsewhere, with ``f(x) = -1.5 (clip(x, 5, 8) - 5)`` (f = 0, 0, ..., 0, -1.5, -3, -4.5, ...).

    With ``u_1 = u_2 = 0`` every cofactor with ``d u_{1,2} / dx`` vanishes, so ``det J = 1 + d u_0 / d x_0``:

    * central differences: at x_0 = 5: (f6 - f4) / 2 = -0.75 -> det 0.25; x_0 = 6: (f7 - f5) / 2 = -1.5 -> -0.5;
      x_0 = 7: (f8 - f6) / 2 = -1.5 -> -0.5; x_0 = 8: (f9 - f7) / 2 = -0.75 -> 0.25; else det 1.
      Folded (det <= 0): x_0 in {6, 7}, x_1 in box.
    * forward differences: f(x + 1) - f(x) = -1.5 at x_0 in {5, 6, 7} -> det -0.5 there.
    """
    ndim = len(shape)
    x0 = torch.arange(shape[0], dtype=torch.float64)
    f = -1.5 * (x0.clamp(5, 8) - 5)
    u = torch.zeros(1, ndim, *shape, dtype=torch.float64)
    inside = [slice(None)] * ndim
    inside[1] = slice(*box)
    profile = f.view(-1, *([1] * (ndim - 1))).expand(*shape)
    u[(0, 0, *inside)] = profile[tuple(inside)]
    return u


@pytest.fixture(scope="session")
def synth() -> SimpleNamespace:
    """The synthetic-data helpers above, for tests (a fixture, so no test imports conftest)."""
    return SimpleNamespace(
        gaussian_blobs=gaussian_blobs,
        blob_array=blob_array,
        make_image=make_image,
        rotation_matrix=rotation_matrix,
        planted_fold=planted_fold,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synth):
    """Small 3D pair on an anisotropic, off-origin grid, labels on the moving grid, plus bad inputs."""
    folder = tmp_path_factory.mktemp("inputs")
    geometry = dict(spacing=(1.1, 0.9, 1.6), origin=(-10.0, 5.0, 2.5))
    fixed_array = synth.blob_array((16, 20, 18), seed=8)
    moving_array = np.roll(fixed_array, (1, -1, 2), axis=(0, 1, 2))
    labels_array = (moving_array > 0.3 * moving_array.max()).astype(np.uint8) + (
        moving_array > 0.6 * moving_array.max()
    ).astype(np.uint8)
    paths = {}

    def save(name, image):
        paths[name] = str(folder / name)
        sitk.WriteImage(image, paths[name])

    save("fixed.nii.gz", synth.make_image(fixed_array, **geometry))
    save("moving.nii.gz", synth.make_image(moving_array, **geometry))
    save("labels.nii.gz", synth.make_image(labels_array, **geometry))
    nan_array = moving_array.copy()
    nan_array[3, 4, 5] = np.nan
    save("nan.nrrd", synth.make_image(nan_array, **geometry))
    save("constant.nii.gz", synth.make_image(np.full_like(moving_array, 0.5), **geometry))
    save("slice2d.nii.gz", synth.make_image(fixed_array[8]))
    save("labels_elsewhere.nii.gz", synth.make_image(labels_array[:, :, :-2], **geometry))
    (folder / "garbage.nii.gz").write_bytes(b"not an image at all" * 40)
    paths["garbage.nii.gz"] = str(folder / "garbage.nii.gz")
    paths["folder"] = folder
    return paths
