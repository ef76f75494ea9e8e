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


# What h5py raises on a damaged file (a broken heap, B-tree or chunk; a checksum): these are
# problems with the file, not bugs, and become one DataError line naming it.
H5_ERRORS = (OSError, RuntimeError, ValueError, KeyError, OverflowError, TypeError)


def _h5_problem(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def open_mat(path: Path) -> h5py.File:
    """Open a v7.3 .mat for reading, or raise DataError saying why not."""
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(path, f"not a MATLAB v7.3 (HDF5) file ({e}); re-save it with save(..., '-v7.3')") from None
    except H5_ERRORS as e:
        raise DataError(path, f"damaged HDF5 file ({_h5_problem(e)})") from None


def dataset(f: h5py.File, path: Path, key: str, ndim: int) -> h5py.Dataset:
    """The numeric array ``key`` of an open .mat, checked for presence and rank."""
    try:
        d = f.get(key)
        if isinstance(d, h5py.Dataset):
            shape, kind = d.shape, d.dtype.kind
        keys = sorted(f.keys())
    except H5_ERRORS as e:
        raise DataError(path, f"damaged HDF5 file: cannot read '{key}' ({_h5_problem(e)})") from None
    if not isinstance(d, h5py.Dataset):
        raise DataError(path, f"no '{key}' array (found: {keys})")
    if len(shape) != ndim:
        raise DataError(path, f"'{key}' has shape {shape}, expected {ndim} dimensions")
    if kind not in "uifb":
        raise DataError(path, f"'{key}' has non-numeric dtype {d.dtype}")
    return d


def _where(d: h5py.Dataset) -> str:
    return f"{d.file.filename}"


def _check_uint8_range(d: h5py.Dataset, a: np.ndarray, first: int) -> None:
    """Values of a non-uint8 array read as uint8 must be whole numbers in 0..255: HDF5's
    conversion clips and truncates without notice (NaN -> 0, 300 -> 255)."""
    flat = a.reshape(len(a), -1)
    bad = ~np.isfinite(flat) | (flat < 0) | (flat > 255) if a.dtype.kind == "f" else (flat < 0) | (flat > 255)
    if bad.any():
        i = int(np.flatnonzero(bad.any(1))[0])
        v = flat[i][bad[i]][0]
        raise DataError(_where(d), f"'{d.name.lstrip('/')}' frame {first + i}: value {v} is not a pixel value "
                                   f"(expected 0..255 for a {d.dtype} array)")
    if a.dtype.kind == "f" and (flat != np.round(flat)).any():
        i = int(np.flatnonzero((flat != np.round(flat)).any(1))[0])
        raise DataError(_where(d), f"'{d.name.lstrip('/')}' frame {first + i}: value {flat[i][flat[i] != np.round(flat[i])][0]} "
                                   f"is not a whole number (expected uint8 pixel values 0..255)")


def read_into(d: h5py.Dataset, out: np.ndarray, chunk: int = 256) -> None:
    """Read a whole dataset into a preallocated C-contiguous uint8 array. A uint8 array is
    one straight read; any other dtype is read in chunks and checked to hold pixel values."""
    try:
        if not d.size:
            return
        if d.dtype == out.dtype:
            d.read_direct(out)
            return
        for i in range(0, d.shape[0], chunk):
            a = d[i:i + chunk]
            _check_uint8_range(d, a, i)
            out[i:i + len(a)] = a
    except DataError:
        raise
    except H5_ERRORS as e:
        raise DataError(_where(d), f"damaged HDF5 file: cannot read '{d.name.lstrip('/')}' ({_h5_problem(e)})") from None


def read_all(d: h5py.Dataset, dtype=None) -> np.ndarray:
    """A whole (small) dataset as numpy, a damaged one raising DataError."""
    try:
        return np.asarray(d[()], dtype=dtype)
    except H5_ERRORS as e:
        raise DataError(_where(d), f"damaged HDF5 file: cannot read '{d.name.lstrip('/')}' ({_h5_problem(e)})") from None


def read_slice(d: h5py.Dataset, lo: int, hi: int) -> np.ndarray:
    """Frames ``lo:hi`` of a dataset as uint8, checked like ``read_into``."""
    try:
        a = d[lo:hi]
    except H5_ERRORS as e:
        raise DataError(_where(d), f"damaged HDF5 file: cannot read '{d.name.lstrip('/')}' frames {lo}..{hi - 1} "
                                   f"({_h5_problem(e)})") from None
    if a.dtype != np.uint8:
        _check_uint8_range(d, a, lo)
    return a.astype(np.uint8, copy=False)


def any_positive(d: h5py.Dataset, chunk: int = 4096) -> np.ndarray:
    """Per first-axis slice: is any element > 0 after conversion to uint8 (as the reference
    casts masks before thresholding). Reads in chunks to bound memory."""
    n = d.shape[0]
    out = np.zeros(n, dtype=np.uint8)
    try:
        for i in range(0, n, chunk):
            m = d[i:i + chunk]
            if m.dtype != np.uint8:
                _check_uint8_range(d, m, i)
            out[i:i + len(m)] = (m.reshape(len(m), -1) > 0).any(axis=1)
    except DataError:
        raise
    except H5_ERRORS as e:
        raise DataError(_where(d), f"damaged HDF5 file: cannot read '{d.name.lstrip('/')}' ({_h5_problem(e)})") from None
    return out
