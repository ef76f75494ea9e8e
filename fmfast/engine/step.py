"""The one training step and the one evaluation forward, however they run: eagerly or as a
captured CUDA graph (``fmfast.engine.graphs``), with inputs from host batches (``ds.batch``) or
gathered on the device (``FMFDataset.inputs``, when the dataset lives where the
model does). The trainer, the benches and the tests all step through :class:`TrainRunner`."""
from __future__ import annotations

import torch

from fmfast.engine.device import autocast
from fmfast.engine.graphs import (
    CAPTURABLE,
    CaptureError,
    StaticForward,
    TrainStep,
    backward_step,
    batch_coupled,
    masked_cross_entropy,
    pad_batch,
)
from fmfast.errors import SettingsError
from fmfast.models import call

Tensor = torch.Tensor
SETTINGS = ("auto", "on", "off")


def graph_setting(value) -> str:
    """``train.cuda_graphs`` / ``--cuda-graphs``: YAML reads a bare on/off as a bool."""
    value = {True: "on", False: "off"}.get(value, value)
    if value not in SETTINGS:
        raise SettingsError(f"cuda_graphs must be one of {SETTINGS}, got {value!r}")
    return value


def use_graphs(value, device: torch.device, blockers: list[str] = ()) -> tuple[bool, str]:
    """Resolve auto/on/off -> ``(on, note)``. ``blockers``: reasons capture cannot work here;
    "on" with a blocker is an error, "auto" then runs eagerly and says why."""
    value = graph_setting(value)
    if value == "off":
        return False, "off"
    reasons = ([] if device.type == "cuda" else [f"device is {device.type}, CUDA graphs need a GPU"]) + list(blockers)
    if reasons:
        if value == "on":
            raise SettingsError(f"cuda_graphs on: {'; '.join(reasons)}")
        return False, f"off ({'; '.join(reasons)})"
    return True, "on"


def train_blockers(optimizer, amp_dtype, world: int) -> list[str]:
    """Why a training step cannot be captured in this run (empty: it can)."""
    out = []
    if not isinstance(optimizer, CAPTURABLE):
        out.append(f"{type(optimizer).__name__.lower()} is not capturable (adam/adamw are)")
    if amp_dtype == torch.float16:
        out.append("fp16 needs GradScaler, whose overflow check reads the GPU from the host (use bf16)")
    if world > 1:
        out.append("DistributedDataParallel runs are not captured")
    return out


def _on_device(ds, device: torch.device) -> bool:
    return ds.device.type == device.type and (device.type != "cuda" or ds.device == device)


class EvalRunner:
    """``runner(idx) -> (logits, labels)`` for samples ``idx`` of ``ds`` (call under no_grad).

    ``graph``: a forward captured at ``batch_size`` (CUDA). ``static`` (default: ``graph``): run
    on the static buffers of ``fmfast.engine.graphs.StaticForward`` -- with ``graph=False`` the eager
    twin the CPU tests check. ``gather`` (default: the dataset is on ``device``): the forward's
    only input is ``idx`` and the batch is gathered inside it; else host batches are copied in.
    ``strict``: a failed capture is an error; otherwise it runs eagerly and ``note`` says why."""

    def __init__(self, model, model_name: str, ds, batch_size: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, graph: bool = False, static: bool | None = None,
                 gather: bool | None = None, strict: bool = False):
        self.model, self.name, self.ds, self.batch_size = model, model_name, ds, batch_size
        self.device, self.amp_dtype, self.graph = device, amp_dtype, graph
        self.static = graph if static is None else static
        self.gather = _on_device(ds, device) if gather is None else gather
        self.runner: StaticForward | None = None
        self.strict, self.note = strict, "captured" if graph else "eager"

    def _gathered(self, idx: Tensor):
        fi, cur, labels = self.ds.inputs(idx)
        return call(self.model, self.name, self.ds.frames, cur, fi), labels

    def _hosted(self, clips: Tensor, currents: Tensor):
        return call(self.model, self.name, clips, currents)

    def __call__(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        if self.gather:
            idx = idx.to(self.device)
            if self.static and self.runner is None:
                self.runner = self._build(self._gathered, (pad_batch(idx, self.batch_size)[0],))
            if self.runner is not None:
                return self.runner(idx)
            with autocast(self.device, self.amp_dtype):
                return self._gathered(idx)
        clips, currents, labels = (x.to(self.device, non_blocking=True) for x in self.ds.batch(idx.cpu()))
        if self.static and self.runner is None:
            full = [x.to(self.device) for x in self.ds.batch(pad_batch(idx.cpu(), self.batch_size)[0])[:2]]
            self.runner = self._build(self._hosted, full)
        if self.runner is not None:
            return self.runner(clips, currents), labels
        with autocast(self.device, self.amp_dtype):
            return self._hosted(clips, currents), labels

    def _build(self, fn, example) -> StaticForward | None:
        try:
            return StaticForward(fn, example, amp_dtype=self.amp_dtype, graph=self.graph)
        except CaptureError as e:
            if self.strict:
                raise
            self.graph, self.static, self.note = False, False, f"eager: {str(e)[:300]}"
            return None


class TrainRunner:
    """``runner(idx) -> loss`` (a 0-d device tensor): one optimiser step on samples ``idx``.

    ``graph``: the step captured as one CUDA graph at ``batch_size`` (``fmfast.engine.graphs.TrainStep``).
    ``static`` (default: ``graph``): run on static buffers, padding a short batch with 0-weight
    rows -- with ``graph=False`` this is the eager twin the CPU tests check. A short batch of a
    model with BatchNorm (segmentation) runs eagerly instead, since padding would change its
    batch statistics. ``gather`` as in :class:`EvalRunner`. ``strict``: a failed capture is an
    error; otherwise the run continues eagerly and ``note`` says why. ``scaler``: a GradScaler
    for fp16 on the eager path (a captured step cannot read its overflow check)."""

    def __init__(self, model, model_name: str, ds, optimizer, batch_size: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, graph: bool = True, static: bool | None = None,
                 gather: bool | None = None, strict: bool = False, scaler: torch.amp.GradScaler | None = None):
        self.static = graph if static is None else static
        if amp_dtype == torch.float16 and (self.static or scaler is None):
            raise ValueError("TrainRunner: fp16 needs GradScaler: pass one, on the eager path (static and captured "
                             "steps cannot read its overflow check); or use bf16")
        self.model, self.name, self.ds, self.opt, self.batch_size = model, model_name, ds, optimizer, batch_size
        self.device, self.amp_dtype, self.graph = device, amp_dtype, graph
        self.gather = _on_device(ds, device) if gather is None else gather
        self.coupled = batch_coupled(model)
        self.strict, self.scaler = strict, scaler
        self.step: TrainStep | None = None
        self.note = "captured" if graph else ("static buffers, eager" if self.static else "eager")
        self.eager_steps = 0  # steps run eagerly (short coupled batches, a failed capture, static=False)

    def _inputs(self, idx: Tensor, mask: Tensor | None) -> dict[str, Tensor | None]:
        """The step's inputs: sample indices (gathered on the device inside the step) or a host batch."""
        if self.gather:
            return {"idx": idx.to(self.device), "mask": None if mask is None else mask.to(self.device)}
        clips, currents, labels = (x.to(self.device, non_blocking=True) for x in self.ds.batch(idx.cpu()))
        return {"clips": clips, "currents": currents, "labels": labels,
                "mask": None if mask is None else mask.to(self.device)}

    def _loss(self, mask: Tensor | None, idx: Tensor | None = None, clips: Tensor | None = None,
              currents: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """Forward and cross-entropy (0-weight rows where ``mask`` is 0; ``None``: plain mean)."""
        with autocast(self.device, self.amp_dtype):
            if idx is not None:
                fi, currents, labels = self.ds.inputs(idx)
                logits = call(self.model, self.name, self.ds.frames, currents, fi)
            else:
                logits = call(self.model, self.name, clips, currents)
        return masked_cross_entropy(logits.float(), labels.long(), mask)

    def _eager(self, idx: Tensor) -> Tensor:
        self.eager_steps += 1
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(**self._inputs(idx, None))
        backward_step(loss, self.opt, self.scaler)
        return loss.detach()

    def __call__(self, idx: Tensor) -> Tensor:
        n = idx.numel()
        if n > self.batch_size:
            raise ValueError(f"TrainRunner: batch of {n} > batch_size {self.batch_size}")
        if not self.static or (n < self.batch_size and self.coupled):
            return self._eager(idx)
        inputs = self._inputs(*pad_batch(idx, self.batch_size))
        if self.step is None:
            try:
                self.step = TrainStep(self._loss, self.model, self.opt, inputs, graph=self.graph)
            except CaptureError as e:  # the warm-up ran and was undone: continue eagerly, say why
                if self.strict:
                    raise
                self.static, self.note = False, f"eager: {str(e)[:300]}"
                return self._eager(idx)
        return self.step(**inputs)
