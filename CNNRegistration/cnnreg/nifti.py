"""What a NIfTI file holds, checked from its own bytes before SimpleITK reads it (no torch).

SimpleITK (ITK's NIfTI reader) reads a truncated ``.nii``/``.nii.gz`` without an error
(the missing voxels become zeros) and turns stored NaN/Inf values into 0, so neither can be
seen in the image it returns.  :func:`check_nifti` reads the header (NIfTI-1 or -2, either
byte order), then streams the data -- through ``gzip`` for ``.nii.gz``, which checks the
stream's length and CRC -- and raises :class:`~cnnreg.errors.InputError` naming the file
when the data is shorter than the header says, the gzip stream is cut or corrupt, or a
floating-point voxel is NaN/Inf.  :func:`nifti_header` alone gives the grid size and bytes
per voxel (for memory estimates before anything large is read).  :class:`ParallelGzipWriter`
writes a ``.gz`` file on several threads.
"""

from __future__ import annotations

import collections
import gzip
import math
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import InputError

#: NIfTI datatype code -> numpy dtype (little-endian; byte-swapped for big-endian files)
DATATYPES = {
    2: np.uint8,
    4: np.int16,
    8: np.int32,
    16: np.float32,
    32: np.complex64,
    64: np.float64,
    128: np.uint8,  # RGB24: 3 bytes per voxel, read as bytes
    256: np.int8,
    512: np.uint16,
    768: np.uint32,
    1024: np.int64,
    1280: np.uint64,
}
CHUNK_BYTES = 1 << 24


@dataclass
class NiftiHeader:
    shape: tuple[int, ...]  # dim[1..dim[0]], NIfTI order (i, j, k, t, ...)
    datatype: int
    bits_per_voxel: int
    data_offset: int
    byte_order: str  # "<" or ">"

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.bits_per_voxel // 8

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)


def is_nifti(path: str | os.PathLike) -> bool:
    name = os.fspath(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _open(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _parse(head: bytes, path: str, role: str) -> NiftiHeader:
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            ndim = struct.unpack(order + "h", head[40:42])[0]
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            offset = struct.unpack(order + "f", head[108:112])[0]
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            ndim = dims[0]
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        raise InputError(f"cannot read {role} file {path}: not a NIfTI file (no NIfTI-1/2 header)")
    if not 1 <= ndim <= 7 or any(d < 0 for d in dims[1 : ndim + 1]) or bitpix <= 0:
        raise InputError(
            f"cannot read {role} file {path}: invalid NIfTI header (dim {list(dims[: ndim + 1])}, bitpix {bitpix})"
        )
    header_bytes = 352 if struct.unpack(order + "i", head[:4])[0] == 348 else 544
    if offset < header_bytes and not path.lower().endswith((".hdr", ".img")):
        raise InputError(
            f"cannot read {role} file {path}: invalid NIfTI header (vox_offset {offset:g}: in a single-file NIfTI the "
            f"voxel data start at byte {header_bytes} or later, and readers would take header bytes for voxels); "
            "rewrite the file with the tool that made it"
        )
    return NiftiHeader(tuple(int(d) for d in dims[1 : ndim + 1]), int(datatype), int(bitpix), int(offset), order)


def nifti_header(path: str | os.PathLike, role: str = "image") -> NiftiHeader:
    """The header of a ``.nii``/``.nii.gz`` file (reads only its first bytes)."""
    path = os.fspath(path)
    try:
        with _open(path) as handle:
            head = handle.read(540)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"cannot read {role} file {path}: {error}") from None
    return _parse(head, path, role)


def check_nifti(path: str | os.PathLike, role: str = "image") -> NiftiHeader:
    """Stream the whole file; InputError if it is truncated/corrupt or holds NaN/Inf floats."""
    path = os.fspath(path)
    header = nifti_header(path, role)
    dtype = DATATYPES.get(header.datatype)
    floats = dtype in (np.float32, np.float64, np.complex64)
    element = np.dtype(dtype).newbyteorder(header.byte_order) if floats else None
    bad = 0
    received = 0
    try:
        with _open(path) as handle:
            handle.read(header.data_offset)
            leftover = b""
            while received < header.data_bytes:
                chunk = handle.read(min(CHUNK_BYTES, header.data_bytes - received))
                if not chunk:
                    break
                received += len(chunk)
                if floats:
                    data = leftover + chunk
                    usable = len(data) - len(data) % element.itemsize
                    values = np.frombuffer(data[:usable], dtype=element)
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                    leftover = data[usable:]
            if path.lower().endswith(".gz"):
                handle.read()  # to the end of the stream: gzip checks its length and CRC there
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{role} file {path} is truncated or corrupt ({error})") from None
    if received < header.data_bytes:
        raise InputError(
            f"{role} file {path} is truncated: its header promises {header.data_bytes} bytes of voxel data "
            f"({'x'.join(map(str, header.shape))} voxels, {header.bits_per_voxel} bits each) but it holds {received}"
        )
    if bad:
        raise InputError(f"{role} file {path} contains {bad} NaN or infinite voxels")
    return header


def _deflate_block(block: bytes, level: int) -> bytes:
    """``block`` as raw deflate data ending on a byte boundary (a sync flush, not final)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(block) + compressor.flush(zlib.Z_SYNC_FLUSH)


class ParallelGzipWriter:
    """A ``.gz`` file written as one ordinary gzip member whose deflate stream is compressed in
    independent blocks on ``threads`` threads (zlib releases the GIL; the idea of pigz): a
    100 MiB displacement field takes about 1/threads of ``gzip.open``'s time, and any gzip reader
    reads it.  Use as a context manager; :meth:`write` takes bytes."""

    BLOCK_BYTES = 1 << 22

    def __init__(self, path: str | os.PathLike, threads: int = 2, level: int = 6):
        self._threads, self._level = max(1, int(threads)), level
        self._file = open(path, "wb")
        self._file.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # deflate, no name, no time, OS unknown
        self._pool = ThreadPoolExecutor(self._threads)
        self._pending: collections.deque = collections.deque()
        self._buffer = bytearray()
        self._crc, self._size = 0, 0

    def write(self, data: bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self._buffer += data
        while len(self._buffer) >= self.BLOCK_BYTES:
            self._submit(bytes(self._buffer[: self.BLOCK_BYTES]))
            del self._buffer[: self.BLOCK_BYTES]

    def _submit(self, block: bytes) -> None:
        self._pending.append(self._pool.submit(_deflate_block, block, self._level))
        while len(self._pending) > 2 * self._threads:  # bounded memory: write what is done, in order
            self._file.write(self._pending.popleft().result())

    def close(self) -> None:
        try:
            if self._buffer:
                self._submit(bytes(self._buffer))
                self._buffer.clear()
            while self._pending:
                self._file.write(self._pending.popleft().result())
            self._file.write(zlib.compressobj(self._level, zlib.DEFLATED, -15).flush())  # the final, empty block
            self._file.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        finally:
            self._pool.shutdown(cancel_futures=True)
            self._file.close()

    def __enter__(self) -> ParallelGzipWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
