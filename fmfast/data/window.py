"""Which frames and which current rows make up a sample, as the reference dataset picks them.

Clip: for labelled frame ``f``, ``T`` frames ``f-(T-1)s, ..., f-s, f`` (stride ``s``); indices
below 0 are clamped to 0 (so an early clip repeats frame 0).

Current: the window is the ``L = 2S`` rows of the ``S`` seconds ending at (and including) the
labelled frame's second. With ``end`` = one past that second's last row and ``first`` = the
recording's first row, the rows taken are ``[start, end)`` with ``start = max(end - L, first)``,
``n = end - start``. A short history (``n < L``) is stretched to ``L`` rows by index resampling
``start + trunc(linspace(0, n - 1, L))`` (numpy's linspace in float64, then a cast to int).
"""
from __future__ import annotations

import numpy as np
import torch


def clip_offsets(num_frames: int, stride: int) -> torch.Tensor:
    """How far back each clip frame lies from the labelled frame: ``[(T-1)s, ..., s, 0]``."""
    return torch.arange(num_frames - 1, -1, -1, dtype=torch.int64) * stride


def resample_rows(n: int, length: int) -> np.ndarray:
    """Row offsets (from the window start) for a history of ``n`` rows stretched to ``length``."""
    if n >= length:
        return np.arange(length, dtype=np.int64)
    return np.linspace(0, n - 1, length).astype(np.int32).astype(np.int64)


def resample_table(length: int) -> torch.Tensor:
    """``table[n - 1] = resample_rows(n, length)`` for n = 1..length: a batch of windows is then
    one gather, ``start[:, None] + table[n - 1]``."""
    return torch.from_numpy(np.stack([resample_rows(n, length) for n in range(1, length + 1)]))
