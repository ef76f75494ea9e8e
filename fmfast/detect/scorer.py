"""A trained model as a function: a batch of windows -> p(abnormal) per window (and per pixel)."""
from __future__ import annotations

import torch

from fmfast.data.csvfiles import RATE
from fmfast.engine.device import resolve_device
from fmfast.engine.predictor import Predictor
from fmfast.errors import CheckpointError


class Scorer:
    """A model as a function: a batch of windows -> p(abnormal) per window (and per pixel).

    The forward runs through ``fmfast.Predictor`` (``precision``/``compile`` are its arguments:
    on a CPU bf16 where native and ``torch.compile``; on CUDA a captured graph); ``path`` says
    what runs. The defaults here are the exact ones (fp32, eager); ``fmfast detect`` asks for
    the fastest.

    On a CPU the model runs a call's windows in chunks of at most ``CPU_CHUNK`` (the last one
    padded), whatever ``batch`` is: see ``CPU_CHUNK``. On CUDA a chunk is ``batch``."""

    def __init__(self, model, meta: dict, device: str = "cpu", batch: int = 64, precision: str = "fp32",
                 compile: str = "off"):
        cfg = model.config
        self.name, self.task = meta["model_name"], meta["task"]
        data = meta.get("data") or {}
        self.num_frames = cfg.num_frames
        self.stride = int(data.get("stride", 1) or 1)
        self.current_seconds = cfg.current_len // RATE
        for key, want in (("num_frames", self.num_frames), ("current_seconds", self.current_seconds)):
            if data.get(key) not in (None, want):
                raise CheckpointError(f"checkpoint: data setting {key}={data[key]} disagrees with the model's {want}")
        self.size_wh = tuple(cfg.frame_hw)  # the stored (W, H) frame axes
        self.uses_video, self.uses_current = self.name != "current", self.name != "video"
        self.batch = batch
        chunk = min(batch, CPU_CHUNK) if resolve_device(device).type == "cpu" else batch
        self.predictor = Predictor(model, device, precision, batch_size=chunk, compile=compile, meta=meta)
        self.device = self.predictor.device

    @property
    def path(self) -> str:
        return self.predictor.path

    def __call__(self, frames: torch.Tensor, frame_index: torch.Tensor, current: torch.Tensor):
        """frames: a store [N,3,W,H] uint8; frame_index [B,T] into it; current [B,2S,3] float32.
        -> (prob [B] float32, prob_map [B,W,H] float32 or None), on the CPU. Only the windows'
        clips go to the device, not the frame buffer."""
        p = self.predictor.probabilities(frames if self.uses_video else None, current, frame_index)[:, 1]
        if p.ndim == 3:
            return p.flatten(1).amax(1).cpu(), p.cpu()
        return p.cpu(), None


# Windows per model call on a CPU. Per clip a forward costs the same from 8 to 64 rows there
# (paper FmFormer, bf16, 2 cores of a Zen 4: 8.6, 8.9, 8.2 and 8.7 ms a clip at 8, 16, 32 and
# 64), so a small chunk loses nothing, and the padding of a short call shrinks: a live
# recording scores a few windows a poll, and a 60 s recording (299 windows, batches of 64)
# padded 21 rows at 64 and 5 at 16: 81.9 -> 88.9 windows/s, four interleaved runs. It also
# compiles faster (16 s against 23 s).
CPU_CHUNK = 16
