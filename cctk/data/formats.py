"""On-disk formats and the data errors.

IDX (the MNIST / Fashion-MNIST format), big-endian::

    byte 0, 1   0x00 0x00
    byte 2      element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64
    byte 3      number of dimensions n
    4 * n       dimension sizes (uint32, big-endian)
    the data    prod(sizes) * itemsize bytes, row-major

Files may be gzip-compressed (recognised by the gzip magic ``1f 8b``, not by the name).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Optional

import numpy as np

__all__ = ["DataError", "DataNotFoundError", "CorruptDataError", "read_idx", "IDX_DTYPES"]


class DataError(Exception):
    """Base class of cctk.data's user-facing errors (bad name/split, missing or corrupt data)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The data files are not where they were looked for; the message says what to do."""


class CorruptDataError(DataError, ValueError):
    """A data file exists but cannot be what it claims (bad magic, truncated, bad values)."""


class DatasetArgumentError(DataError, ValueError):
    """Unknown dataset name, bad split name or bad option."""


IDX_DTYPES = {
    0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise CorruptDataError(
                f"{path}: corrupt or truncated gzip stream ({exc}); delete the file and fetch it "
                f"again") from exc
    return raw


def read_idx(path: str, ndim: Optional[int] = None) -> np.ndarray:
    """Read an IDX file (plain or gzip) into a native-endian numpy array, checking the magic
    number, the element type, the number of dimensions (when ``ndim`` is given) and that the
    payload is exactly ``prod(dims) * itemsize`` bytes."""
    path = os.fspath(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise CorruptDataError(f"{path}: {len(buf)} bytes, too short for an IDX header (truncated?)")
    zero0, zero1, code, nd = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES:
        raise CorruptDataError(
            f"{path}: bad IDX magic number 0x{struct.unpack('>I', buf[:4])[0]:08x} (expected "
            f"0x0000TTNN with type TT in {{08,09,0B,0C,0D,0E}}): not an IDX file, or corrupt")
    if ndim is not None and nd != ndim:
        raise CorruptDataError(f"{path}: IDX file has {nd} dimensions, expected {ndim}")
    header = 4 + 4 * nd
    if len(buf) < header:
        raise CorruptDataError(f"{path}: truncated IDX header ({len(buf)} of {header} bytes)")
    dims = struct.unpack(f">{nd}I", buf[4:header]) if nd else ()
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(buf) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise CorruptDataError(
            f"{path}: IDX file {what}: header says {'x'.join(map(str, dims))} of {dtype.name} "
            f"= {expected} data bytes, found {got}; delete the file and fetch it again")
    arr = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)
