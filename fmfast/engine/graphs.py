"""CUDA graphs: a captured inference forward and a captured training step, replayed on static
input buffers.

At FmFormer's shapes (about 640 tokens x 96 dims) a step is hundreds of small kernels and the GPU
waits on their launches; a graph replays them all with one launch. A graph fixes shapes and
addresses, so:

- inputs are copied into static buffers (``StaticForward``/``TrainStep`` own them); a forward
  takes any batch size (smaller ones fill the first rows, larger ones run in chunks); a training
  step takes exactly its batch size -- pad a short batch with :func:`pad_batch` and let the
  0-weight rows of :func:`masked_cross_entropy` ignore the padding, unless the model couples
  samples in training (BatchNorm, :func:`batch_coupled`), where a short batch must run eagerly;
- the optimiser must be capturable (Adam/AdamW, :func:`make_capturable`): its learning rate a
  device tensor that the LR scheduler fills in place, so each replay reads the current value;
- parameters must stay where they are (in-place updates only; no ``.to()`` after capture).

Every class has an eager twin with the same buffers (``graph=False``), which is what runs on a
CPU and what the CPU tests check the buffer, padding and mask logic with; capture itself needs
CUDA. Warm-up steps before a capture (on a side stream, as PyTorch's CUDA-graph notes describe)
really run, so the training step snapshots weights, buffers and optimiser state first and puts
them back: a captured run trains exactly like an eager one.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fmfast.engine.device import autocast

Tensor = torch.Tensor


class CaptureError(RuntimeError):
    """The CUDA-graph capture itself failed (the eager warm-up before it had run fine)."""


def _capture(graph, fn: Callable[[], object]):
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            return fn()
    except Exception as e:
        raise CaptureError(f"CUDA-graph capture failed: {type(e).__name__}: {e}") from e


# ---- losses and padding ------------------------------------------------------------------------
def masked_cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over the samples whose ``mask`` is 1 (padding rows weigh 0).

    Classification ``[B, C]`` vs ``[B]``; segmentation ``[B, C, H, W]`` vs ``[B, H, W]`` (each
    sample's pixel mean first: with equal pixel counts that is the plain mean). ``mask=None`` is
    ``F.cross_entropy``."""
    if mask is None:
        return F.cross_entropy(logits, labels)
    per = F.cross_entropy(logits, labels, reduction="none")
    if per.dim() > 1:
        per = per.flatten(1).mean(1)
    return (per * mask).sum() / mask.sum()


def pad_batch(idx: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Sample indices padded to ``size`` by repeating the first one, and the float mask
    ``[size]`` (1 for real rows, 0 for padding)."""
    n = idx.numel()
    if not 1 <= n <= size:
        raise ValueError(f"pad_batch: need 1..{size} indices, got {n}")
    idx = idx.reshape(-1)
    mask = torch.zeros(size, dtype=torch.float32, device=idx.device)
    mask[:n] = 1
    if n == size:
        return idx, mask
    return torch.cat([idx, idx[:1].expand(size - n)]), mask


def batch_coupled(model: nn.Module) -> bool:
    """True if, in training mode, a sample's result depends on the rest of its batch (BatchNorm),
    so padded rows would change the real ones."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``(start, rows)`` pieces of at most ``size`` rows covering ``n`` rows."""
    if n < 1 or size < 1:
        raise ValueError(f"chunks: need n >= 1 and size >= 1, got {n}, {size}")
    return [(s, min(size, n - s)) for s in range(0, n, size)]


# ---- optimisers --------------------------------------------------------------------------------
CAPTURABLE = (torch.optim.Adam, torch.optim.AdamW)


def make_capturable(opt: torch.optim.Optimizer, device: torch.device) -> torch.optim.Optimizer:
    """Adam/AdamW in place: ``capturable`` on, each group's learning rate a 0-d fp32 tensor on
    ``device`` (LR schedulers fill it in place), ``step`` counters on ``device``."""
    if not isinstance(opt, CAPTURABLE):
        raise ValueError(f"make_capturable: {type(opt).__name__} cannot be captured in a CUDA graph (use Adam or AdamW)")
    for g in opt.param_groups:
        g["capturable"] = True
        lr = g["lr"]
        if isinstance(lr, Tensor):
            g["lr"] = lr.to(device=device, dtype=torch.float32)
        else:
            g["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
    for state in opt.state.values():
        if isinstance(state.get("step"), Tensor):
            state["step"] = state["step"].to(device=device, dtype=torch.float32)
    return opt


def portable_state_dict(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with float learning rates and ``capturable`` off, so a checkpoint of a
    captured run resumes under any setting (a captured run re-applies :func:`make_capturable`)."""
    sd = opt.state_dict()
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        if isinstance(g.get("lr"), Tensor):
            g["lr"] = float(g["lr"])
        if "capturable" in g:
            g["capturable"] = False
        groups.append(g)
    return {"state": sd["state"], "param_groups": groups}


def _capture_problem(opt: torch.optim.Optimizer, device: torch.device) -> str | None:
    if not isinstance(opt, CAPTURABLE):
        return f"{type(opt).__name__} is not capturable (Adam/AdamW are)"
    for g in opt.param_groups:
        if not g.get("capturable"):
            return "optimizer capturable=False (call fmfast.engine.graphs.make_capturable)"
        lr = g["lr"]
        if not isinstance(lr, Tensor) or lr.device != device:
            return f"optimizer lr must be a tensor on {device} (call fmfast.engine.graphs.make_capturable)"
    return None


def backward_step(loss: Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
    """The one backward + optimiser update of every training step, captured or eager (the
    caller zeroes the gradients). ``scaler``: fp16's GradScaler (eager only: its overflow check
    reads the GPU from the host)."""
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


# ---- snapshots (warm-up must not change what is trained) ---------------------------------------
def _snapshot(model: nn.Module, opt: torch.optim.Optimizer | None):
    tensors = [t for t in model.parameters()] + [b for b in model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    opt_saved = {}
    if opt is not None:
        for p, state in opt.state.items():
            opt_saved[p] = {k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in state.items()}
    return tensors, saved, opt_saved


@torch.no_grad()
def _restore(snapshot, opt: torch.optim.Optimizer | None) -> None:
    """Put values back *in place* (a captured graph keeps the addresses)."""
    tensors, saved, opt_saved = snapshot
    for t, s in zip(tensors, saved):
        t.copy_(s)
    if opt is None:
        return
    for p, state in opt.state.items():
        before = opt_saved.get(p, {})
        for k, v in state.items():
            if not isinstance(v, Tensor):
                if k in before:
                    state[k] = before[k]
            elif k in before and isinstance(before[k], Tensor):
                v.copy_(before[k])
            else:  # created by the warm-up: a fresh optimiser starts from zeros
                v.zero_()


def _warmup(fn: Callable[[], object], iters: int) -> None:
    """Run ``fn`` on a side stream (PyTorch's recipe before capture: lazy init, kernel compiles,
    allocator pools settle away from the capture stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(iters):
            fn()
    torch.cuda.current_stream().wait_stream(s)


def _check_like(where: str, static: Tensor, x: Tensor, exact: bool) -> None:
    ok_shape = tuple(x.shape) == tuple(static.shape) if exact else tuple(x.shape[1:]) == tuple(static.shape[1:])
    if not ok_shape or x.dtype != static.dtype:
        want = tuple(static.shape) if exact else ("B",) + tuple(static.shape[1:])
        raise ValueError(f"{where}: expected {static.dtype} of shape {list(want)}, got {x.dtype} {list(x.shape)}")


# ---- inference ---------------------------------------------------------------------------------
class StaticForward:
    """``fn(*inputs)`` on static input buffers, replayed as a CUDA graph (``graph=True``) or
    run eagerly on the same buffers (``graph=False``, the CPU twin).

    Inputs listed in ``shared`` (positions; e.g. a frame store) are used in place: a call passes
    the same tensor, or one of the same shape that is then copied in. The others are batched on
    dim 0 with the static batch size of ``example_inputs``: a call may pass any batch size;
    each chunk of at most that size is copied into the first rows, the stale rows behind it are
    computed and dropped (fine for inference, where samples are independent). Returns fresh
    tensors (a tensor or a tuple, as ``fn`` does) cut to the call's batch size.
    """

    def __init__(self, fn: Callable, example_inputs: Sequence[Tensor], shared: Sequence[int] = (),
                 amp_dtype: torch.dtype | None = None, graph: bool = True, warmup: int = 2):
        self.fn, self.shared, self.amp_dtype, self.graph_mode = fn, frozenset(shared), amp_dtype, graph
        batched = [x for i, x in enumerate(example_inputs) if i not in self.shared]
        if not batched:
            raise ValueError("StaticForward: at least one input must be batched")
        self.batch = batched[0].shape[0]
        if any(x.shape[0] != self.batch for x in batched):
            raise ValueError("StaticForward: batched example inputs differ in batch size")
        self.device = batched[0].device
        if graph and self.device.type != "cuda":
            raise ValueError(f"StaticForward: a CUDA graph needs CUDA inputs, got {self.device}")
        with torch.inference_mode(False):  # plain tensors even when built inside inference mode
            self.static = [x if i in self.shared else x.detach().clone() for i, x in enumerate(example_inputs)]
        self.outputs: tuple[Tensor, ...] | None = None
        self.single = True
        self.cuda_graph = None
        if graph:
            with torch.inference_mode(False), torch.no_grad():
                _warmup(self._run, warmup)
                self.cuda_graph = torch.cuda.CUDAGraph()
                _capture(self.cuda_graph, self._run)

    def _run(self) -> None:
        with autocast(self.device, self.amp_dtype):
            out = self.fn(*self.static)
        self.single = isinstance(out, Tensor)
        self.outputs = (out,) if self.single else tuple(out)

    def _replay(self) -> None:
        if self.cuda_graph is not None:
            self.cuda_graph.replay()
        else:
            with torch.no_grad():
                self._run()

    def __call__(self, *inputs: Tensor):
        if len(inputs) != len(self.static):
            raise ValueError(f"StaticForward: expected {len(self.static)} inputs, got {len(inputs)}")
        n = None
        for i, (s, x) in enumerate(zip(self.static, inputs)):
            _check_like(f"StaticForward input {i}", s, x, exact=i in self.shared)
            if i not in self.shared:
                if n is not None and x.shape[0] != n:
                    raise ValueError("StaticForward: batched inputs differ in batch size")
                n = x.shape[0]
        with torch.no_grad():
            for i, (s, x) in enumerate(zip(self.static, inputs)):
                if i in self.shared and x is not s:
                    s.copy_(x)
            pieces = []
            for start, rows in chunks(n, self.batch):
                for i, (s, x) in enumerate(zip(self.static, inputs)):
                    if i not in self.shared:
                        s[:rows].copy_(x[start:start + rows], non_blocking=True)
                self._replay()
                pieces.append([o[:rows].clone() for o in self.outputs])
        out = [p[0] if len(pieces) == 1 else torch.cat(p) for p in zip(*pieces)]
        return out[0] if self.single else tuple(out)


def GraphedForward(model: Callable, example_inputs: Sequence[Tensor], shared: Sequence[int] = (),
                   amp_dtype: torch.dtype | None = None, warmup: int = 2) -> StaticForward:
    """Capture ``model(*example_inputs)`` (inference, no grad) at their batch size; call the
    result like the model. See :class:`StaticForward`."""
    return StaticForward(model, example_inputs, shared, amp_dtype, graph=True, warmup=warmup)


# ---- training ----------------------------------------------------------------------------------
class TrainStep:
    """One optimiser step on static input buffers: ``loss = step(**inputs)``.

    ``loss_fn(**buffers) -> scalar loss`` holds the forward (autocast inside it, if any).
    ``graph=True`` captures zero-grad, forward, backward and ``optimizer.step()`` as one CUDA
    graph after ``warmup`` side-stream steps whose effect on weights, buffers and optimiser
    state is undone; ``graph=False`` runs the same thing eagerly. Inputs must have exactly the
    example shapes (pad short batches). The loss returned is a fresh 0-d tensor on the device.
    GradScaler (fp16) is not supported: its overflow check reads the GPU from the host.
    """

    def __init__(self, loss_fn: Callable[..., Tensor], model: nn.Module, optimizer: torch.optim.Optimizer,
                 example_inputs: dict[str, Tensor], graph: bool = True, warmup: int = 3):
        self.loss_fn, self.model, self.opt = loss_fn, model, optimizer
        with torch.inference_mode(False):
            self.static = {k: v.detach().clone() for k, v in example_inputs.items()}
        self.loss: Tensor | None = None
        self.cuda_graph = None
        if not graph:
            return
        device = next(iter(self.static.values())).device
        if device.type != "cuda":
            raise ValueError(f"TrainStep: a CUDA graph needs CUDA inputs, got {device}")
        problem = _capture_problem(optimizer, device)
        if problem:
            raise ValueError(f"TrainStep: cannot capture the optimizer step: {problem}")
        snap = _snapshot(model, optimizer)
        _warmup(self._eager_step, warmup)
        _restore(snap, optimizer)
        optimizer.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool
        self.cuda_graph = torch.cuda.CUDAGraph()
        self.loss = _capture(self.cuda_graph, self._body)

    def _body(self) -> Tensor:
        loss = self.loss_fn(**self.static)
        backward_step(loss, self.opt)
        return loss.detach()

    def _eager_step(self) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        self.loss = self._body()
        return self.loss

    def __call__(self, **inputs: Tensor) -> Tensor:
        if inputs.keys() != self.static.keys():
            raise ValueError(f"TrainStep: expected inputs {sorted(self.static)}, got {sorted(inputs)}")
        with torch.no_grad():
            for k, x in inputs.items():
                _check_like(f"TrainStep input {k!r}", self.static[k], x, exact=True)
                if x is not self.static[k]:
                    self.static[k].copy_(x, non_blocking=True)
        if self.cuda_graph is None:
            return self._eager_step().clone()
        self.cuda_graph.replay()
        return self.loss.clone()
