"""A stand-in for ``python -m cnnreg register`` used by the tests (copied to
``<tmp>/cnnreg/__main__.py``). It follows the backend's file and progress contract with
a known answer: a constant LPS translation. Behaviour from ``FAKE_CNNREG``:

* ``ok`` (default): write warped/displacement/jacobian/summary (+ warped labels), exit 0.
* ``fail``: an ``error`` event and a stderr message, exit 2 (bad input).
* ``interrupted``: exit 130 without being cancelled; ``garbage``: exit 0 with an unreadable
  warped volume.
* ``sleep``: start a grandchild process (pid written to ``FAKE_CNNREG_PIDFILE``) and print
  progress lines forever, to be cancelled.
"""

import argparse
import json
import os
import subprocess
import sys
import time

#: The answer of the fake registration: displacement in LPS millimetres.
TRANSLATION_LPS = (1.5, -2.0, 1.0)


def emit(**event):
    print(json.dumps(event), flush=True)


def main():
    parser = argparse.ArgumentParser(prog="cnnreg")
    parser.add_argument("command")
    parser.add_argument("--fixed", required=True)
    parser.add_argument("--moving", required=True)
    parser.add_argument("--moving-labels")
    parser.add_argument("--fixed-mask")
    parser.add_argument("--out", required=True)
    arguments, rest = parser.parse_known_args()
    behaviour = os.environ.get("FAKE_CNNREG", "ok")
    emit(event="start", arguments=sys.argv[1:])
    print("a line that is not JSON", flush=True)

    if behaviour == "fail":
        emit(event="error", message="moving image is constant (every voxel is 0); nothing to register")
        print("InputError: moving image is constant", file=sys.stderr, flush=True)
        return 2

    if behaviour == "interrupted":  # the backend's own exit code for Ctrl-C, not asked for by the module
        print("KeyboardInterrupt", file=sys.stderr, flush=True)
        return 130

    if behaviour == "sleep":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open(os.environ["FAKE_CNNREG_PIDFILE"], "w") as stream:
            stream.write(f"{os.getpid()} {child.pid}")
        iteration = 0
        while True:
            iteration += 1
            emit(
                event="progress",
                stage="level 1/1",
                iteration=iteration,
                iterations=10**6,
                fraction=iteration / 10**6,
                loss=1.0 / iteration,
                similarity=0.5,
                regularization=0.1,
            )
            time.sleep(0.05)

    import numpy as np
    import SimpleITK as sitk

    fixed = sitk.ReadImage(arguments.fixed)
    moving = sitk.ReadImage(arguments.moving)
    os.makedirs(arguments.out, exist_ok=True)
    size = fixed.GetSize()
    vectors = np.broadcast_to(np.array(TRANSLATION_LPS, dtype=np.float64), (size[2], size[1], size[0], 3))
    field = sitk.GetImageFromArray(np.ascontiguousarray(vectors), isVector=True)
    field.CopyInformation(fixed)
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    for iteration in range(1, 4):
        emit(
            event="progress",
            stage="level 1/1",
            iteration=iteration,
            iterations=3,
            fraction=iteration / 3,
            loss=1.0 / iteration,
            similarity=-0.5 - 0.1 * iteration,
            regularization=0.01,
        )
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sitk.WriteImage(warped, os.path.join(arguments.out, "warped.nii.gz"))
    sitk.WriteImage(field, os.path.join(arguments.out, "displacement.nii.gz"))
    jacobian = sitk.Image(fixed.GetSize(), sitk.sitkFloat32) + 1.0
    jacobian.CopyInformation(fixed)
    sitk.WriteImage(jacobian, os.path.join(arguments.out, "jacobian.nii.gz"))
    if arguments.moving_labels:
        labels = sitk.ReadImage(arguments.moving_labels)
        warpedLabels = sitk.Resample(labels, fixed, transform, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
        sitk.WriteImage(warpedLabels, os.path.join(arguments.out, "warped_labels.nii.gz"))
    summary = {
        "mode": "fake",
        "similarity": "lncc",
        "regularizer": "diffusion",
        "weight": 1.0,
        "device": "cpu",
        "iterations": 3,
        "seconds": 0.1,
        "similarity_before": -0.5,
        "similarity_after": -0.8,
        "folding_fraction": 0.0,
        "folding_percent": 0.0,
        "min_jacobian": 1.0,
        "sdlogj": 0.0,
        "arguments": rest,
        "fixed_mask": arguments.fixed_mask,
    }
    with open(os.path.join(arguments.out, "summary.json"), "w") as stream:
        json.dump(summary, stream)
    if behaviour == "garbage":  # exit 0, but the warped volume does not read back
        with open(os.path.join(arguments.out, "warped.nii.gz"), "wb") as stream:
            stream.write(b"not an image")
    emit(event="done", summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
