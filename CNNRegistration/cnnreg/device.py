"""Compute device resolution (the one place "auto" is decided) and out-of-memory reporting."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
import random
import threading

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


#: glibc's mallopt parameters, and the values a process starts with
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
#: freed memory the process may keep at the top of its heap during an optimisation loop
RETAINED_FREE_BYTES = 1 << 30


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_reuse_lock = threading.Lock()
_reuse_open = 0  # reuse_freed_memory blocks open in any thread: the first sets, the last restores


def _fill_small_chunk_cache(libc: ctypes.CDLL) -> None:
    """Fill glibc's per-thread cache of small chunks (7 per size).  PyTorch's 64-byte-aligned
    allocations leave a remainder of under 128 bytes behind each block; while that cache has room
    the remainder sits in it, still "in use" between the freed block and the heap's top, so the
    block can never merge back and the same request grows the heap again: with the cache full,
    remainders are coalesced at once and a freed block is reused."""
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(size) for size in range(8, 128, 16) for _ in range(8)]
    for chunk in chunks:
        libc.free(chunk)


@contextlib.contextmanager
def reuse_freed_memory(device: torch.device | str = "cpu"):
    """Within the block, CPU tensors freed are kept by the allocator for the next ones instead of
    being handed back to the system; on leaving it, the unused memory is handed back.

    glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on free, so
    each new large tensor pays a page fault per 4 KiB on first touch: on a 1 mm head (8.7 M voxels,
    100 MiB per field) that costs more than the arithmetic of an iteration (docs/decisions.md).
    Inside the block such requests come from the heap, which keeps up to
    :data:`RETAINED_FREE_BYTES` free.  The setting is the process's: blocks may nest or overlap in
    threads, and it holds until the last one closes.  No effect on CUDA (its allocator caches) or
    without glibc."""
    global _reuse_open
    libc = _glibc() if torch.device(device).type == "cpu" else None
    if libc is None:
        yield
        return
    with _reuse_lock:
        _reuse_open += 1
        if _reuse_open == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, RETAINED_FREE_BYTES)
            _fill_small_chunk_cache(libc)
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_open -= 1
            if _reuse_open == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


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
