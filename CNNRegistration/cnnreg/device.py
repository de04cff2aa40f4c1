"""Compute device resolution (the one place "auto" is decided) and out-of-memory reporting."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .errors import DeviceError, InputError


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> first CUDA GPU if available, else CPU; ``"cpu"``; ``"cuda"``/``"cuda:N"``.

    ``"gpu"`` is an alias of ``"cuda"``.  Raises DeviceError when CUDA is asked for but
    unavailable, InputError when the name is unknown (bad input, exit code 2).
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda") or name == "gpu":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but no CUDA GPU is available to torch; use --device cpu")
        device = torch.device("cuda" if name == "gpu" else name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
        return device
    raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N (gpu is an alias of cuda)")


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now (``MemAvailable`` of /proc/meminfo, else free
    physical pages); None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def describe_device(device: torch.device) -> str:
    """Human description, e.g. ``"cuda:0 (NVIDIA H100, 79.1 GiB)"`` or ``"cpu (2 threads)"``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


def seed_everything(seed: int | None) -> None:
    """Seed torch (CPU and CUDA), numpy and random; None leaves them alone."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def out_of_memory_as_device_error(device: torch.device, what: str):
    """Turn a torch out-of-memory error inside the block into a DeviceError with advice."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            raise DeviceError(
                f"the GPU ran out of memory during {what} ({describe_device(device)}); "
                "try --device cpu, or a smaller working resolution (--max-cnn-voxels) or fewer features"
            ) from error
        raise DeviceError(f"out of memory during {what} on the CPU; try a smaller working resolution") from error
    except RuntimeError as error:
        if "can't allocate memory" not in str(error):
            raise
        # the CPU allocator's failure is a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")
        raise DeviceError(
            f"out of memory during {what} on the CPU; register on a coarser grid (--working-spacing), crop the "
            "images, or lower --features / --max-cnn-voxels"
        ) from error
