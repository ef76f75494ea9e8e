"""A trained model as a function: a batch of windows -> p(abnormal) per window (and per pixel)."""
from __future__ import annotations

import sys

import torch

from fmfast.data.csvfiles import RATE
from fmfast.data.gather import gather_clip
from fmfast.engine.graphs import CaptureError, GraphedForward
from fmfast.errors import CheckpointError
from fmfast.models import call


class Scorer:
    """A model as a function: a batch of windows -> p(abnormal) per window (and per pixel)."""

    def __init__(self, model, meta: dict, device: str = "cpu", batch: int = 64, cuda_graphs: bool = True):
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
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # on CUDA: a forward captured for `batch` windows (fmfast.engine.graphs), built at the first call
        self.batch, self.graphed = batch, None
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor, frame_index: torch.Tensor, current: torch.Tensor):
        """frames: a store [N,3,W,H] uint8; frame_index [B,T] into it; current [B,2S,3] float32.
        -> (prob [B] float32, prob_map [B,W,H] float32 or None), on the CPU."""
        dev = self.device
        if self.cuda_graphs:
            out = self._replay(frames, frame_index, current)
        else:
            out = call(self.model, self.name, frames.to(dev), current.to(dev), frame_index.to(dev))
        p = out.float().softmax(1)[:, 1]
        if p.ndim == 3:
            return p.flatten(1).amax(1).cpu(), p.cpu()
        return p.cpu(), None

    def _replay(self, frames: torch.Tensor, frame_index: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The captured forward; only the windows' clips go to the GPU, not the frame buffer."""
        inputs = []
        if self.uses_video:
            inputs.append(gather_clip(frames, frame_index.to(frames.device)).to(self.device))  # [B, 3, T, W, H]
        if self.uses_current:
            inputs.append(current.to(self.device))
        if self.graphed is None:
            try:
                self.graphed = GraphedForward(self.model, [x[:1].expand(self.batch, *x.shape[1:]) for x in inputs])
            except CaptureError as e:
                print(f"detect: CUDA graph capture failed, scoring eagerly ({e})", file=sys.stderr)
                self.cuda_graphs = False
                return self.model(*inputs)
        return self.graphed(*inputs)
