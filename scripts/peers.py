#!/usr/bin/env python
"""Run peer registration tools (and our own CLI) on a case folder, one subprocess each.

Every method runs in its own child process (``python scripts/peers.py --child METHOD ...``)
with ``OMP_NUM_THREADS`` / ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` set to the thread budget;
the child reports its own peak memory (``VmHWM`` of ``/proc/self/status``, plus the
``ru_maxrss`` of any process it waited for) and the time of the registration call, and the parent
adds the wall time of the whole child (interpreter start, imports and file I/O included).

Methods
    ``demons``          SimpleITK FastSymmetricForcesDemons, 3-level pyramid, histogram matching
                        (on a pair that is not aligned, ``case.json`` ``"aligned": false``, a
                        SimpleITK affine first, moments + Mattes MI, composed into the field).
    ``ants_syn``        antspyx ``ants.registration(type_of_transform="SyN", syn_metric="CC",
                        syn_sampling=4, reg_iterations=(100, 70, 50))`` (affine + SyN).  For CC
                        antspyx passes ``syn_sampling`` as the window *radius*; its default 32
                        costs ~100 s per half-resolution iteration at 96^3 on 2 cores (hours in
                        all), so we use radius 4, ANTs' usual CC setting (antsRegistrationSyN.sh).
                        Above ``ANTS_CC_MAX_VOXELS`` fixed voxels (the 35 M voxel CT, where SyN-CC
                        would take ~9 h on 2 threads) antspyx's default ``type_of_transform="SyN"``
                        (Mattes MI, 40x20x0: the full-resolution level skipped).
    ``elastix_bspline`` itk-elastix B-spline, AdvancedNormalizedCorrelation, 3 resolutions
                        (elastix's affine map first on a pair that is not aligned).
    ``greedy``          Greedy (picsl-greedy wheel, PICSL): deformable, NCC 2x2x2, 100x50x20
                        iterations on a 3-level pyramid (its documented brain setting); on cases
                        whose pair is not pre-aligned (``case.json`` ``"aligned": false``) an
                        affine (12 dof, image centres, NCC) first, and the two composed into one
                        field with ``-rc``.
    ``cnnreg``          ``python -m cnnreg register ...`` run in-process via ``cnnreg.cli.main``.

Each child writes into its output folder ``displacement.nii.gz`` (ITK field, LPS mm, fixed
grid, pull), ``warped.nii.gz`` and ``warped_labels.nii.gz`` (the moving image and labels
resampled through that field with SimpleITK -- the same code for every method) and
``result.json``.  A method that cannot be imported or fails still yields a row with its
``status`` and ``error``; it is never dropped.

Usage::

    python scripts/peers.py benchmark/cases/mni2mm benchmark/runs/mni2mm --methods demons,elastix_bspline
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("demons", "elastix_bspline", "ants_syn", "greedy")
#: above this many fixed voxels ANTs runs antspyx's default SyN (Mattes MI, 40x20x0) instead of SyN-CC
ANTS_CC_MAX_VOXELS = 16_000_000
METHODS = (*PEERS, "cnnreg")
#: pip distribution that provides each peer's Python module
PIP_NAMES = {"ants_syn": "antspyx", "elastix_bspline": "itk-elastix", "greedy": "picsl-greedy"}
IMPORT_NAMES = {"ants_syn": "ants", "elastix_bspline": "itk", "demons": "SimpleITK", "greedy": "picsl_greedy"}


def thread_environment(threads: int) -> dict[str, str]:
    """The environment of a child: every thread pool limited to ``threads``."""
    env = dict(os.environ)
    for key in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
        "ITK_DEFAULT_NUMBER_OF_THREADS",
    ):
        env[key] = str(threads)
    # OMP_WAIT_POLICY is left as the caller has it: every method runs with its runtime's default
    # on an idle machine (PASSIVE, right for shared cores, made phantom mode ~1.5x slower there)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "CNNRegistration"), env.get("PYTHONPATH", "")]))
    return env


def peer_available(method: str) -> bool:
    """True when the peer's Python module can be found (without importing it)."""
    import importlib.util

    name = IMPORT_NAMES.get(method)
    if name is None:
        return True
    if method == "elastix_bspline":
        return importlib.util.find_spec("itk") is not None and importlib.util.find_spec("itk_elastix") is not None
    return importlib.util.find_spec(name) is not None


def install_peers(methods: Sequence[str]) -> dict[str, str]:
    """``pip install`` the peers that are missing; returns ``{method: "present"|"installed"|"failed: ..."}``."""
    report = {}
    for method in methods:
        if method not in PIP_NAMES or peer_available(method):
            report[method] = "present"
            continue
        process = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", PIP_NAMES[method]], capture_output=True, text=True
        )
        if process.returncode == 0:
            report[method] = "installed"
        else:
            tail = (process.stderr or process.stdout).strip().splitlines()[-1:] or ["pip failed"]
            report[method] = f"failed: {tail[0]}"
    return report


# ---------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------


def run_method(
    method: str,
    case_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    quick: bool = False,
    threads: int = 2,
    timeout: float = 3600.0,
    extra_args: Sequence[str] = (),
    seed: int = 0,
) -> dict:
    """Run ``method`` on the case in a child process and return its result row.

    Returns:
        ``{"method", "status" ("ok" | "failed" | "not installed" | "timeout"), "error",
        "wall_s" (whole child process), "registration_s" (the registration call, as timed by
        the child), "peak_rss_mib", "files": {"displacement", "warped", "warped_labels"},
        "parameters", "versions", "threads"}``.
    """
    out = Path(out_dir).resolve()
    case_dir = Path(case_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "result.json"
    if result_path.exists():
        result_path.unlink()
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        method,
        str(case_dir),
        str(out),
        "--threads",
        str(threads),
        "--seed",
        str(seed),
    ]
    if quick:
        command.append("--quick")
    if extra_args:
        command += ["--", *extra_args]
    start = time.perf_counter()
    log_path = out / "log.txt"
    with open(log_path, "w") as log:
        # cwd = the output folder: tools that drop files in the working directory (transformix
        # writes deformationField.nii) leave them there
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=thread_environment(threads), cwd=str(out)
        )
        # wait4 gives the rusage of this child alone (ru_maxrss in KiB on Linux)
        deadline = start + timeout
        timed_out = False
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                timed_out = True
                break
            time.sleep(0.2)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if timed_out:
        return _failed_row(method, "timeout", f"killed after {timeout:.0f} s", wall, usage.ru_maxrss / 1024, threads)
    returncode = process.returncode
    if not result_path.exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return _failed_row(
            method,
            "failed",
            f"child exited {returncode} without a result: {' | '.join(tail)}",
            wall,
            usage.ru_maxrss / 1024,
            threads,
        )
    row = json.loads(result_path.read_text())
    row["wall_s"] = wall
    row["returncode"] = returncode
    row["peak_rss_mib_wait4"] = usage.ru_maxrss / 1024
    return row


def _failed_row(method, status, error, wall, rss_mib, threads) -> dict:
    return {
        "method": method,
        "status": status,
        "error": error,
        "wall_s": wall,
        "registration_s": None,
        "peak_rss_mib": rss_mib,
        "files": {},
        "parameters": {},
        "versions": {},
        "threads": threads,
    }


# ---------------------------------------------------------------------------------------
# child side: the methods
# ---------------------------------------------------------------------------------------


def _read_case(case_dir: Path) -> dict:
    import SimpleITK as sitk

    info_path = case_dir / "case.json"
    return {
        "info": json.loads(info_path.read_text()) if info_path.exists() else {},
        "fixed": sitk.ReadImage(str(case_dir / "fixed.nii.gz"), sitk.sitkFloat32),
        "moving": sitk.ReadImage(str(case_dir / "moving.nii.gz"), sitk.sitkFloat32),
        "moving_labels": sitk.ReadImage(str(case_dir / "moving_labels.nii.gz")),
        "paths": {
            name: str(case_dir / f"{name}.nii.gz") for name in ("fixed", "moving", "fixed_labels", "moving_labels")
        },
    }


def _demons(case: dict, out: Path, quick: bool, threads: int, seed: int, extra: Sequence[str]) -> dict:
    """Multi-resolution FastSymmetricForces demons (histogram-matched moving image)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    fixed, moving = case["fixed"], case["moving"]
    start = time.perf_counter()
    affine = _sitk_affine(fixed, moving) if case["info"].get("aligned", True) is False else None
    if affine is not None:  # demons needs the pair aligned: the moving image through the affine first
        moving = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, float(_minimum(moving)), sitk.sitkFloat32)
    moving = sitk.HistogramMatching(
        moving, fixed, numberOfHistogramLevels=1024, numberOfMatchPoints=7, thresholdAtMeanIntensity=True
    )
    shrink_factors = [4, 2, 1]
    smoothing_mm = [2.0 * s for s in (2.0, 1.0, 0.0)]
    iterations = [20, 10, 5] if quick else [100, 70, 40]
    standard_deviations = 1.0
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetStandardDeviations(standard_deviations)
    demons.SetSmoothDisplacementField(True)
    field = None
    for shrink, sigma, count in zip(shrink_factors, smoothing_mm, iterations):
        levels = []
        for image in (fixed, moving):
            smoothed = sitk.SmoothingRecursiveGaussian(image, sigma) if sigma > 0 else image
            levels.append(sitk.Shrink(smoothed, [shrink] * image.GetDimension()) if shrink > 1 else smoothed)
        if field is None:
            field = sitk.Image(levels[0].GetSize(), sitk.sitkVectorFloat64, levels[0].GetDimension())
            field.CopyInformation(levels[0])
        else:
            identity = sitk.Transform(levels[0].GetDimension(), sitk.sitkIdentity)
            field = sitk.Resample(field, levels[0], identity, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        demons.SetNumberOfIterations(count)
        field = demons.Execute(levels[0], levels[1], field)
    if affine is not None:  # one field: x -> A(x + d(x))
        steps = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)])
        field = sitk.TransformToDisplacementField(
            steps, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection()
        )
    seconds = time.perf_counter() - start
    sitk.WriteImage(field, str(out / "displacement.nii.gz"), useCompression=True)
    return {
        "registration_s": seconds,
        "parameters": {
            "affine_first": affine is not None,
            "filter": "FastSymmetricForcesDemonsRegistrationFilter",
            "shrink_factors": shrink_factors,
            "smoothing_sigmas_mm": smoothing_mm,
            "iterations": iterations,
            "standard_deviations": standard_deviations,
            "histogram_matching": True,
        },
        "versions": {"SimpleITK": sitk.Version_VersionString()},
    }


def _minimum(image) -> float:
    import SimpleITK as sitk

    return float(sitk.GetArrayViewFromImage(image).min())


def _sitk_affine(fixed, moving):
    """SimpleITK affine fixed -> moving (moments initialisation, Mattes MI, 3 levels), for the
    peers without an affine stage of their own on pairs that are not aligned."""
    import SimpleITK as sitk

    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.05, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([8, 4, 2])
    method.SetSmoothingSigmasPerLevel([4, 2, 1])
    method.SetInitialTransform(initial, inPlace=False)
    result = method.Execute(fixed, moving)
    if isinstance(result, sitk.CompositeTransform):
        result = result.GetNthTransform(0) if result.GetNumberOfTransforms() == 1 else result
    return sitk.AffineTransform(result)


def _ants_syn(case: dict, out: Path, quick: bool, threads: int, seed: int, extra: Sequence[str]) -> dict:
    """antspyx SyN with the CC metric (affine stage first, as type_of_transform='SyN' does)."""
    import ants
    import SimpleITK as sitk

    if hasattr(ants, "config") and hasattr(ants.config, "_random_seed"):
        ants.config._random_seed = seed  # the affine stage samples randomly; no public setter keeps 2 threads
    fixed = ants.image_read(case["paths"]["fixed"])
    moving = ants.image_read(case["paths"]["moving"])
    radius = 4  # antspyx passes syn_sampling as the CC radius; its default (32) is prohibitively slow
    if math.prod(fixed.shape) > ANTS_CC_MAX_VOXELS:
        # SyN-CC costs ~15 us per voxel and iteration on 2 threads (mni2mm: 800 s): ~9 h on a 35 M voxel CT
        options = {} if not quick else {"reg_iterations": (10, 0, 0)}
        call = "ants.registration(type_of_transform='SyN')"
        note = "antspyx defaults (affine stage, then SyN with Mattes MI, 40x20x0: the full-resolution level skipped)"
    else:
        iterations = (20, 10, 0) if quick else (100, 70, 50)
        options = {"syn_metric": "CC", "syn_sampling": radius, "reg_iterations": iterations}
        call = f"ants.registration(type_of_transform='SyN', syn_metric='CC', syn_sampling={radius}, reg_iterations={iterations})"
        note = "antspyx defaults otherwise (affine stage included); syn_sampling is the CC radius in voxels"
    start = time.perf_counter()
    registration = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(out / "ants_"), **options)
    seconds = time.perf_counter() - start
    composite = ants.apply_transforms(
        fixed, moving, transformlist=registration["fwdtransforms"], compose=str(out / "ants_")
    )
    field = sitk.ReadImage(composite, sitk.sitkVectorFloat64)
    sitk.WriteImage(field, str(out / "displacement.nii.gz"), useCompression=True)
    # keep ANTs' own warped labels to cross-check our resampling of its field
    ants_labels = ants.apply_transforms(
        fixed,
        ants.image_read(case["paths"]["moving_labels"]),
        transformlist=registration["fwdtransforms"],
        interpolator="nearestNeighbor",
    )
    ants.image_write(ants_labels, str(out / "ants_warped_labels.nii.gz"))
    for path in registration["fwdtransforms"] + registration["invtransforms"] + [composite]:
        if os.path.exists(path) and Path(path).parent == out and path.endswith((".nii.gz", ".mat")):
            os.remove(path)
    return {
        "registration_s": seconds,
        "parameters": {
            "call": call,
            "note": note,
        },
        "versions": {"antspyx": getattr(ants, "__version__", "?")},
    }


def _elastix_bspline(case: dict, out: Path, quick: bool, threads: int, seed: int, extra: Sequence[str]) -> dict:
    """itk-elastix B-spline (elastix's default "bspline" map: 3 resolutions, 10 mm final grid,
    adaptive stochastic gradient descent) with AdvancedNormalizedCorrelation as the only metric."""
    import itk
    import SimpleITK as sitk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    fixed = itk.imread(case["paths"]["fixed"], itk.F)
    moving = itk.imread(case["paths"]["moving"], itk.F)
    parameters = itk.ParameterObject.New()
    bspline = parameters.GetDefaultParameterMap("bspline", 3, 10.0)
    bspline["Registration"] = ["MultiResolutionRegistration"]
    bspline["Metric"] = ["AdvancedNormalizedCorrelation"]
    for key in ("Metric0Weight", "Metric1Weight"):
        if key in bspline:
            del bspline[key]
    bspline["MaximumNumberOfIterations"] = ["30" if quick else "256"]
    bspline["RandomSeed"] = [str(121 + seed)]
    bspline["WriteResultImage"] = ["false"]
    bspline["MaximumNumberOfThreads"] = [str(threads)]
    aligned = case["info"].get("aligned", True) is not False
    if not aligned:  # elastix's own affine stage first (centres of gravity), then the B-spline
        affine = parameters.GetDefaultParameterMap("affine")
        affine["AutomaticTransformInitialization"] = ["true"]
        affine["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        affine["MaximumNumberOfThreads"] = [str(threads)]
        affine["WriteResultImage"] = ["false"]
        parameters.AddParameterMap(affine)
    parameters.AddParameterMap(bspline)
    start = time.perf_counter()
    _, transform = itk.elastix_registration_method(
        fixed, moving, parameter_object=parameters, log_to_console=False, number_of_threads=threads
    )
    seconds = time.perf_counter() - start
    deformation = itk.transformix_deformation_field(moving, transform)  # also writes ./deformationField.nii
    # itk -> SimpleITK through a lossless MetaImage file (vectors in LPS mm, fixed grid)
    temporary = out / "elastix_field.mha"
    itk.imwrite(deformation, str(temporary))
    field = sitk.ReadImage(str(temporary), sitk.sitkVectorFloat64)
    temporary.unlink()
    stray = Path("deformationField.nii")
    if stray.exists() and stray.resolve().parent == out.resolve():
        stray.unlink()
    sitk.WriteImage(field, str(out / "displacement.nii.gz"), useCompression=True)
    shown = {
        key: list(bspline[key])
        for key in (
            "Metric",
            "NumberOfResolutions",
            "FinalGridSpacingInPhysicalUnits",
            "MaximumNumberOfIterations",
            "NumberOfSpatialSamples",
            "Optimizer",
        )
    }
    shown["affine_first"] = not aligned
    return {
        "registration_s": seconds,
        "parameters": shown,
        "versions": {"itk-elastix": _distribution_version("itk-elastix"), "itk": itk.Version.GetITKVersion()},
    }


def _greedy(case: dict, out: Path, quick: bool, threads: int, seed: int, extra: Sequence[str]) -> dict:
    """Greedy (affine first on unaligned pairs), one displacement field composed with ``-rc``."""
    del seed  # Greedy is deterministic
    from picsl_greedy import Greedy3D

    paths = case["paths"]
    iterations = "20x10x0" if quick else "100x50x20"
    base = f"-d 3 -threads {threads}"
    commands = []
    start = time.perf_counter()
    affine = case["info"].get("aligned", True) is False
    if affine:
        commands.append(
            f"{base} -a -dof 12 -ia-image-centers -i {paths['fixed']} {paths['moving']} -m NCC 2x2x2 "
            f"-n {'20x10x0' if quick else '100x50x10'} -o {out / 'affine.mat'}"
        )
    commands.append(
        f"{base} -i {paths['fixed']} {paths['moving']} -m NCC 2x2x2 -n {iterations} -s 2.0vox 0.5vox"
        + (f" -it {out / 'affine.mat'}" if affine else "")
        + f" -o {out / 'warp.nii.gz'}"
        + (" " + " ".join(extra) if extra else "")
    )
    # one field fixed -> moving: the deformable warp, then the affine (greedy -r order: last applied first)
    transforms = f"{out / 'warp.nii.gz'}" + (f" {out / 'affine.mat'}" if affine else "")
    commands.append(f"{base} -rf {paths['fixed']} -r {transforms} -rc {out / 'displacement.nii.gz'}")
    for command in commands:
        Greedy3D().execute(command)
    return {
        "registration_s": time.perf_counter() - start,
        "parameters": {"commands": commands},
        "versions": {"picsl-greedy": _distribution_version("picsl_greedy")},
    }


def _cnnreg(case: dict, out: Path, quick: bool, threads: int, seed: int, extra: Sequence[str]) -> dict:
    """Our CLI, in-process: ``cnnreg.cli.main(["register", ...])``; its own outputs are kept."""
    import torch

    torch.set_num_threads(threads)
    import cnnreg.cli

    argv = [
        "register",
        "--fixed",
        case["paths"]["fixed"],
        "--moving",
        case["paths"]["moving"],
        "--moving-labels",
        case["paths"]["moving_labels"],
        "--out",
        str(out),
        "--progress",
        "none",
        "--overwrite-any-folder",  # the folder also holds this script's log.txt
        *extra,
    ]
    os.chdir(out.parent)  # the output folder replaces itself: never run from inside it
    start = time.perf_counter()
    try:
        code = cnnreg.cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    seconds = time.perf_counter() - start
    if code not in (0, None):
        raise RuntimeError(f"cnnreg register exited with {code}: {' '.join(argv)}")
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if (out / "warped_labels.nii.gz").exists():
        os.replace(out / "warped_labels.nii.gz", out / "cnnreg_warped_labels.nii.gz")
    if (out / "warped.nii.gz").exists():
        os.replace(out / "warped.nii.gz", out / "cnnreg_warped.nii.gz")
    return {
        # the algorithm's own time (summary "seconds") is what the peers' registration_s measures
        "registration_s": float(summary.get("seconds", seconds)),
        "cli_s": seconds,
        "parameters": {"argv": argv[:1] + ["..."] + list(extra)},
        "versions": {"torch": torch.__version__},
        "summary": summary,
    }


RUNNERS = {
    "demons": _demons,
    "ants_syn": _ants_syn,
    "elastix_bspline": _elastix_bspline,
    "greedy": _greedy,
    "cnnreg": _cnnreg,
}


def _distribution_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def warp_outputs(case: dict, out: Path) -> dict:
    """Resample the moving image (linear) and labels (nearest) through ``out/displacement.nii.gz``
    onto the fixed grid -- one code path for every method."""
    import SimpleITK as sitk

    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    fixed = case["fixed"]
    warped = sitk.Resample(case["moving"], fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    transform = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    )
    labels = sitk.Resample(
        case["moving_labels"], fixed, transform, sitk.sitkNearestNeighbor, 0, case["moving_labels"].GetPixelID()
    )
    files = {
        "displacement": out / "displacement.nii.gz",
        "warped": out / "warped.nii.gz",
        "warped_labels": out / "warped_labels.nii.gz",
    }
    sitk.WriteImage(warped, str(files["warped"]), useCompression=True)
    sitk.WriteImage(labels, str(files["warped_labels"]), useCompression=True)
    return {key: str(path) for key, path in files.items()}


def own_peak_rss_kib() -> float:
    """Peak resident memory of this process image, KiB.

    On Linux ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` is no good for a child, as the
    kernel carries the spawning process's high-water mark across fork + exec, so every method
    would weigh at least as much as the benchmark process that started it.  Elsewhere
    ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform == "darwin" else float(peak)


def _peak_rss_mib() -> float:
    """Peak memory of this child (and of any process it waited for), MiB."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # 0 when none ran
    return max(own_peak_rss_kib(), float(children)) / 1024.0


def child_main(
    method: str, case_dir: str, out_dir: str, quick: bool, threads: int, seed: int, extra: Sequence[str]
) -> int:
    started = time.perf_counter()
    out = Path(out_dir)
    row = {
        "method": method,
        "status": "ok",
        "error": None,
        "threads": threads,
        "quick": quick,
        "seed": seed,
        "files": {},
    }
    try:
        case = _read_case(Path(case_dir))
        row.update(RUNNERS[method](case, out, quick, threads, seed, extra))
        row["files"] = warp_outputs(case, out)
    except ImportError as error:
        row.update(status="not installed", error=f"{type(error).__name__}: {error}")
    except Exception as error:  # noqa: BLE001 -- every failure becomes a row
        traceback.print_exc()
        row.update(
            status="failed",
            error=f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}",
        )
    row["child_wall_s"] = time.perf_counter() - started
    row["peak_rss_mib"] = _peak_rss_mib()
    (out / "result.json").write_text(json.dumps(row, indent=2, default=str) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description="Run peer registration tools on a case folder.")
    parser.add_argument("--child", metavar="METHOD", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("case_dir")
    parser.add_argument("out_dir", help="results go to OUT_DIR/<method>/ (OUT_DIR itself with --child)")
    parser.add_argument("--methods", default=",".join(PEERS), help=f"comma list from {', '.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.case_dir, args.out_dir, args.quick, args.threads, args.seed, extra)
    for method in args.methods.split(","):
        row = run_method(
            method, args.case_dir, Path(args.out_dir) / method, args.quick, args.threads, args.timeout, extra, args.seed
        )
        print(
            f"{method}: {row['status']} wall {row['wall_s']:.1f} s, registration "
            f"{row.get('registration_s') or float('nan'):.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB"
            + (f" ({row['error']})" if row.get("error") else ""),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
