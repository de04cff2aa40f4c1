"""Python packages the backend needs inside Slicer, and the compute device description.

Nothing is installed at import time. :func:`ensureDependencies` installs what is missing
after asking the user: PyTorch through the PyTorch extension (``PyTorchUtils``, which
picks the CUDA build matching the NVIDIA driver) when it is installed, otherwise with
``slicer.util.pip_install``; the other requirements come from
``Resources/requirements.txt``. Checks use package metadata only, so that torch is not
imported into the Slicer process just to test for it (the backend runs in its own process).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys

REQUIREMENTS_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "requirements.txt"
)

#: Distribution name -> import name, where they differ.
_IMPORT_NAMES = {"simpleitk": "SimpleITK", "pillow": "PIL", "scikit-image": "skimage"}


def readRequirements(path: str = REQUIREMENTS_FILE) -> list:
    """Requirement lines of ``path`` (comments and blank lines skipped)."""
    with open(path, encoding="utf-8") as stream:
        lines = [line.split("#", 1)[0].strip() for line in stream]
    return [line for line in lines if line]


def requirementName(requirement: str) -> str:
    """Distribution name of a requirement line: ``"numpy>=1.22"`` -> ``"numpy"``."""
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]


def isInstalled(distribution: str) -> bool:
    """True when the distribution has metadata or its module can be found (no import)."""
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    moduleName = _IMPORT_NAMES.get(distribution.lower(), distribution.replace("-", "_"))
    return importlib.util.find_spec(moduleName) is not None


def missingRequirements(path: str = REQUIREMENTS_FILE) -> list:
    """Requirement lines of ``path`` whose distribution is not installed."""
    return [line for line in readRequirements(path) if not isInstalled(requirementName(line))]


def torchInstalled() -> bool:
    return isInstalled("torch")


def _pyTorchUtilsLogic():
    """The PyTorch extension's logic, or None when that extension is not installed."""
    try:
        import PyTorchUtils  # noqa: F401  (module of the PyTorch extension)
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic()


def ensureTorch(askConfirmation: bool = True) -> bool:
    """Install PyTorch if missing. Returns True when torch is available afterwards."""
    if torchInstalled():
        return True
    import slicer

    pyTorchLogic = _pyTorchUtilsLogic()
    if pyTorchLogic is not None:
        # Asks its own confirmation and chooses the CUDA/CPU build for this computer.
        return pyTorchLogic.installTorch(askConfirmation=askConfirmation) is not None
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
        "CNN Registration needs PyTorch, which is not installed. Install it now with pip? "
        "This downloads about 1 GB and may take several minutes.\n\n"
        "Tip: the PyTorch extension (Extensions Manager) installs the build that matches your GPU."
    ):
        return False
    slicer.util.pip_install("torch")
    return torchInstalled()


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Make torch and the packages of ``requirements.txt`` available, asking before
    installing. Returns False if the user declined (nothing is then installed)."""
    missing = missingRequirements()
    if missing:
        import slicer

        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "CNN Registration needs these Python packages: " + ", ".join(missing) + ". Install them now?"
        ):
            return False
        for requirement in missing:
            slicer.util.pip_install(requirement)
    return ensureTorch(askConfirmation)


def checkDependencies() -> None:
    """Raise ``RuntimeError`` naming the missing packages (no installation, no dialog)."""
    missing = missingRequirements()
    if not torchInstalled():
        missing.append("torch")
    if missing:
        raise RuntimeError(
            "missing Python packages: "
            + ", ".join(missing)
            + ". Install them from the module's panel (Register asks to install them) or with "
            "slicer.util.pip_install(); PyTorch preferably through the PyTorch extension."
        )


def describeComputeDevice(timeout: float = 5.0) -> str:
    """One line naming the GPU(s) and memory the backend can use, for the device label.

    Uses ``nvidia-smi`` (no torch import in the Slicer process); when torch is already
    imported its own answer is used. Without an NVIDIA GPU: the CPU core count.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                parts = []
                for index in range(torch.cuda.device_count()):
                    properties = torch.cuda.get_device_properties(index)
                    parts.append(f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB")
                return "CUDA GPU: " + "; ".join(parts)
        except Exception as error:  # a broken CUDA set-up must not break the GUI
            logging.debug("torch.cuda query failed: %s", error)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            output = subprocess.run(
                [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=True,
            ).stdout
            gpus = [line.strip() for line in output.splitlines() if line.strip()]
            if gpus:
                return "NVIDIA GPU: " + "; ".join(gpus) + " (used with device auto/cuda if torch has CUDA)"
        except (subprocess.SubprocessError, OSError) as error:
            logging.debug("nvidia-smi failed: %s", error)
    return f"No NVIDIA GPU found: the CPU will be used ({os.cpu_count()} logical cores)."
