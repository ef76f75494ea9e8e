"""GPU-resident batches: with ``ds.to("cuda")`` a batch is a handful of gathers on the device.

The video is never materialised: the model's tokenizer reads the frame store by a ``[B, T]``
frame table (``model(ds.frames, current, frame_index=...)``), the current windows and labels
are index gathers, a flipped sample's frames are entries ``~i`` that the tokenizer reads
mirrored, and its mask is flipped with a ``where``. Every step of that is
a device op without a host sync, so it can live inside a captured CUDA graph whose only input
is the batch's sample indices.

The epoch's order and flips are drawn on the host once per epoch by the same pure functions of
(seed, epoch) as on the CPU path -- so a GPU run sees exactly the samples a CPU run sees and a
resumed run continues the same sequence -- and uploaded once (8 bytes + 1 byte per sample);
per step nothing crosses PCIe.
"""
from __future__ import annotations

import torch

from fmfast.data.dataset import mirror_where
from fmfast.ops.tokenize import split_frame_index

Tensor = torch.Tensor


def gather_inputs(ds, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(frame_index [B,T], currents [B,2S,3] float32, labels [B] or [B,W,H] int64)`` of the
    samples ``idx`` (in ``[0, len(ds))``), gathered on the dataset's device; equal to
    ``ds.batch(idx)`` with the clips left in the store (``fmfast.ops.gather_clip(ds.frames,
    frame_index)``)."""
    idx = idx.reshape(-1)
    fi = ds.frame_index(idx)
    rows = ds.current_index(idx)
    currents = ds.currents.index_select(0, rows.reshape(-1)).view(rows.shape[0], rows.shape[1], -1)
    if ds.task == "classification":
        labels = ds.labels.index_select(0, idx)
    else:  # the labelled frame is a clip's last
        last, flip = split_frame_index(fi[:, -1])
        labels = mirror_where(ds.masks.index_select(0, last), flip).long()
    return fi, currents, labels


def call_model(model, model_name: str, frames: Tensor, currents: Tensor, frame_index: Tensor) -> Tensor:
    """Call any of the three models with frames read from a store by index."""
    if model_name == "current":
        return model(currents)
    if model_name == "video":
        return model(frames, frame_index=frame_index)
    return model(frames, currents, frame_index=frame_index)


class StableFlips:
    """Keeps ``ds.flips`` one tensor across ``set_epoch`` (which makes a new one), so a captured
    graph that reads it sees every epoch's flips."""

    def __init__(self, ds):
        self.ds = ds
        self.flips = ds.flips.clone()
        ds.flips = self.flips

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)
        if self.ds.flips is not self.flips:
            self.flips.copy_(self.ds.flips)
            self.ds.flips = self.flips


def store_bytes(ds) -> int:
    """Bytes ``ds.to(device)`` moves (frame store, masks, currents, index tables)."""
    return sum(v.numel() * v.element_size() for v in vars(ds).values() if isinstance(v, Tensor))


def fits_on_device(datasets, device: torch.device, reserve: int = 8 << 30) -> bool:
    """Whether the datasets fit in the device's free memory with ``reserve`` bytes to spare (for
    the model, its activations and the graphs' pools)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(store_bytes(ds) for ds in datasets) + reserve <= free
