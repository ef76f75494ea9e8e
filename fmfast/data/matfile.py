"""MATLAB v7.3 .mat files: HDF5 with a 512-byte MATLAB header in the user block.

h5py reads MATLAB arrays with their axes reversed (MATLAB is column-major): a MATLAB video
``[H, W, C, T]`` comes back as ``[T, C, W, H]`` and a mask ``[H, W, T]`` as ``[T, W, H]``.
We keep that order everywhere (the published checkpoints were trained on it).
"""
from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np

from fmfast.errors import DataError

USERBLOCK = 512
_MATLAB_CLASS = {
    np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8",
    np.dtype(np.uint16): "uint16", np.dtype(np.int16): "int16",
    np.dtype(np.uint32): "uint32", np.dtype(np.int32): "int32",
    np.dtype(np.uint64): "uint64", np.dtype(np.int64): "int64",
    np.dtype(np.float32): "single", np.dtype(np.float64): "double",
}


def mat_header(created: str) -> bytes:
    """The 512-byte user block that makes an HDF5 file a MATLAB v7.3 file (written over its start)."""
    # MATLAB identifies a v7.3 file by this text, then 8 bytes of subsystem offset,
    # version 0x0200 and the endian mark 'IM' (little-endian) at bytes 124..127.
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {created} HDF5 schema 1.00 ."
    head = text.encode("ascii").ljust(116, b" ")[:116] + b" " * 8 + b"\x00\x02" + b"IM"
    return head.ljust(USERBLOCK, b"\x00")


def write_mat(path: str | Path, arrays: dict[str, np.ndarray], created: str | None = None,
              compress: tuple[str, ...] = ()) -> Path:
    """Write ``arrays`` as a MATLAB v7.3 file. Arrays are given in h5py (reversed) axis order.

    ``created`` is the header date; pass a fixed one for byte-identical files. Arrays named in
    ``compress`` are stored deflated in chunks of whole frames (masks shrink ~100x; frames are
    left plain so that loading them is a straight read).
    """
    path = Path(path)
    created = created or time.strftime("%a %b %d %H:%M:%S %Y")
    with h5py.File(path, "w", userblock_size=USERBLOCK, libver="earliest") as f:
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            if a.dtype == np.bool_:
                d = f.create_dataset(name, data=a.astype(np.uint8), track_times=False)
                d.attrs.create("MATLAB_class", np.bytes_("logical"))
                d.attrs.create("MATLAB_int_decode", np.int32(1))
                continue
            if a.dtype not in _MATLAB_CLASS:
                raise TypeError(f"write_mat: {name} has dtype {a.dtype}, which MATLAB cannot hold")
            packed = dict(compression="gzip", compression_opts=4, chunks=(min(len(a), 256), *a.shape[1:])) \
                if name in compress and a.ndim and a.size else {}
            d = f.create_dataset(name, data=a, track_times=False, **packed)
            d.attrs.create("MATLAB_class", np.bytes_(_MATLAB_CLASS[a.dtype]))
    with open(path, "r+b") as f:
        f.write(mat_header(created))
    return path


def open_mat(path: Path) -> h5py.File:
    """Open a v7.3 .mat for reading, or raise DataError saying why not."""
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(path, f"not a MATLAB v7.3 (HDF5) file ({e}); re-save it with save(..., '-v7.3')") from None


def dataset(f: h5py.File, path: Path, key: str, ndim: int) -> h5py.Dataset:
    """The numeric array ``key`` of an open .mat, checked for presence and rank."""
    d = f.get(key)
    if not isinstance(d, h5py.Dataset):
        raise DataError(path, f"no '{key}' array (found: {sorted(f.keys())})")
    if d.ndim != ndim:
        raise DataError(path, f"'{key}' has shape {d.shape}, expected {ndim} dimensions")
    if d.dtype.kind not in "uifb":
        raise DataError(path, f"'{key}' has non-numeric dtype {d.dtype}")
    return d


def read_into(d: h5py.Dataset, out: np.ndarray) -> None:
    """Read a whole dataset into a preallocated C-contiguous array (HDF5 converts the dtype)."""
    if d.size:
        d.read_direct(out)


def any_positive(d: h5py.Dataset, chunk: int = 4096) -> np.ndarray:
    """Per first-axis slice: is any element > 0 after conversion to uint8 (as the reference
    casts masks before thresholding). Reads in chunks to bound memory."""
    n = d.shape[0]
    out = np.zeros(n, dtype=np.uint8)
    view = d.astype(np.uint8) if d.dtype != np.uint8 else d
    for i in range(0, n, chunk):
        m = view[i:i + chunk]
        out[i:i + len(m)] = (m.reshape(len(m), -1) > 0).any(axis=1)
    return out
