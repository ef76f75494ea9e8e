"""``fmfast.Predictor``: the one way to run a trained model, on the fastest path for the device.

    pred = Predictor("runs/.../best.pt")                     # or Predictor(model)
    logits = pred(video, current)                            # [B, classes] or [B, classes, W, H], fp32
    probs = pred.probabilities(video, current)               # softmax over the classes
    pred(store, current, frame_index=table)                  # frames read from a store by a [B, T] table

Inputs are those of the model (video ``[B,3,T,W,H]`` uint8 or float 0..255, current
``[B,2S,3]`` float amperes; a video-only or current-only model ignores the other). A call may
pass any batch size: it runs in chunks of ``batch_size`` rows, the last one padded, so the
compiled or captured program always sees one shape.

What runs (``pred.path`` says it in words, ``pred.note`` why, e.g. a fallback):

- CPU: the fused backend, bf16 autocast where the CPU has native bf16 matrix units (AMX-BF16 or
  AVX512-BF16; fp32 elsewhere, never slower) with its attention in fmfast's CPU kernels
  (``fmfast.kernels.cpu_attention``: the bf16 kernel, or in fp32 the AVX2 kernel where the CPU
  has no AVX-512; PyTorch's SDPA where neither runs), in bf16 on AVX512-BF16 CPUs without AMX the
  feed-forwards of chunks with enough rows in fmfast's MLP kernel (``fmfast.kernels.cpu_mlp``),
  in bf16 on AVX512-BF16 CPUs the tokenizer's tubelet LayerNorm in its patch-norm kernel
  (``fmfast.kernels.cpu_patch_norm``),
  fp32 chunks of ``ONEDNN_MIN_BATCH`` rows or more compiled with a symbolic batch (oneDNN's
  Linears), and
  ``torch.compile`` (inductor with weight freezing; chunks of at most ``CPP_WRAPPER_MAX_BATCH``
  rows with inductor's C++ wrapper), compiled and warmed up once, at
  construction, outside any timed loop. Where compilation is unavailable or fails, the same
  model eagerly, with the reason. When the process uses every CPU it may run on, the OpenMP
  worker threads are pinned one to a CPU (``cpu_attention.pin_threads``; ``pred.threads`` says
  what was done): a call after idle, as in a plant scoring once a second, otherwise ran up to 1.5x
  slower on 2 cores while a woken worker shared its waker's core. glibc's malloc is set to keep
  freed memory for reuse (``fmfast.engine.cpu_memory``): each call's buffers otherwise came back
  as fresh zero-filled pages, thousands of page faults per forward.
- CUDA: the Triton kernels in bf16 and the forward captured as one CUDA graph (replayed per
  chunk); eager, with the reason, where capture fails.
- An exported file (``fmfast export``: .onnx, OpenVINO .xml, .pt2): its own runtime
  (onnxruntime, OpenVINO, torch.export) on the CPU in fp32, chunked as above.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fmfast.data.gather import gather_clip
from fmfast.engine.cpu_memory import keep_freed_memory
from fmfast.engine.device import auto_dtype, autocast, resolve_device
from fmfast.engine.exported import ExportedModel
from fmfast.errors import SettingsError
from fmfast.kernels import cpu_attention
from fmfast.models import INPUTS, MODELS, call

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Tensor = torch.Tensor


def model_name(model) -> str:
    for name, cls in MODELS.items():
        if isinstance(model, cls):
            return name
    raise SettingsError(f"Predictor: {type(model).__name__} is not one of fmfast's models ({', '.join(MODELS)})")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``None`` is fp32. auto: bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise SettingsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return auto_dtype(device)
    if precision == "fp16" and device.type != "cuda":
        raise SettingsError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Predictor:
    """``Predictor(checkpoint_or_model, device="auto", precision="auto", batch_size=32,
    compile="auto")``: see the module docstring. ``model`` may also be an exported file (or
    its ``fmfast.engine.exported.ExportedModel``): it runs in its own runtime on the CPU, fp32.
    ``compile``: "auto" (compile on a CPU, capture on CUDA), "off" (eager), "on" (a failure to
    compile is an error)."""

    def __init__(self, model, device: str = "auto", precision: str = "auto", batch_size: int = 32,
                 compile: str = "auto", meta: dict | None = None):
        if isinstance(model, (str, os.PathLike)):
            from fmfast.engine.checkpoints import load_model

            model, meta = load_model(Path(model))
        if compile not in ("auto", "on", "off"):
            raise SettingsError(f"compile must be auto, on or off, got {compile!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SettingsError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.meta = dict(meta or {})
        self.batch_size = batch_size
        self.pinned, self.threads = False, ""  # an exported file runs its own runtime's threads
        self.memory = (False, "")  # (malloc set to keep freed memory, in words): CPU only
        if isinstance(model, ExportedModel):
            self._exported(model, device, precision, compile)
            return
        self.name = self.meta.get("model_name") or model_name(model)
        self.inputs = INPUTS[self.name]
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.config = self.model.config
        if self.device.type == "cpu":  # a call after idle then starts on every core at once
            self.pinned, self.threads = cpu_attention.pin_threads()
            self.memory = keep_freed_memory()  # no page faults on every call's fresh buffers
        self._run = self._eager
        self.note = "eager (compile off)" if compile == "off" else ""
        kind = "captured CUDA graph" if self.device.type == "cuda" else "torch.compile (inductor, freezing)"
        self.wrapper_note = ""  # the compiled program's wrapper, where it is not the default
        if compile != "off":
            try:
                self._run = self._build()
                self.note = f"{kind[:-1]}, {self.wrapper_note})" if self.wrapper_note else kind
            except Exception as e:  # noqa: BLE001 -- any compiler/capture failure: run eagerly, say why
                if compile == "on":
                    raise SettingsError(f"Predictor: {kind} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
                self._run = self._eager
                self.note = f"eager ({kind} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160]})"

    def _exported(self, model: ExportedModel, device: str, precision: str, compile: str) -> None:
        """An exported file: its own runtime, on the CPU, in fp32, as it was checked at export."""
        what = f"the exported {model.runtime} model {model.path}"
        self.device = torch.device("cpu") if device == "auto" else resolve_device(device)
        model.to(self.device)  # a CUDA device is refused, in words
        if precision not in ("auto", "fp32"):
            resolve_precision(precision, self.device)  # an unknown name: that error
            raise SettingsError(f"precision {precision}: {what} runs in fp32")
        if compile == "on":
            raise SettingsError(f"compile on: {what} runs in its own runtime, not torch.compile")
        self.name, self.model, self.config, self.dtype = model.name, model, model.config, None
        self.inputs = INPUTS[self.name]
        self.note = f"exported file ({model.path.suffix[1:]})"
        self._run = self._eager

    @property
    def path(self) -> str:
        prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        backend = "triton kernels" if self.device.type == "cuda" else "fused SDPA"
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            ok, why = cpu_attention.available()
            backend = f"{cpu_attention.variant()} attention" if ok else f"fused SDPA (fmfast's CPU attention: {why})"
        elif self.device.type == "cpu" and self.dtype is None:
            ok, why = cpu_attention.prefers_f32()
            backend = "AVX2 fp32 attention" if ok else f"fused SDPA (fmfast's fp32 CPU attention: {why})"
        if getattr(self.model, "backend", "auto") == "reference":  # as the caller built it: kept, and said
            backend = "the reference math (model.backend = 'reference')"
        if isinstance(self.model, ExportedModel):
            backend = self.model.runtime
        pinned = f", {self.threads}" if self.pinned else ""
        memory = f", {self.memory[1]}" if self.memory[0] else ""
        return f"{self.name} on {self.device.type}, {backend}, {prec}, {self.note}{pinned}{memory}"

    # ---- the forward on one padded chunk -------------------------------------------------
    def _forward(self, video: Tensor | None, current: Tensor | None) -> Tensor:
        with autocast(self.device, self.dtype):
            return call(self.model, self.name, video, current).float()

    def _eager(self, video, current):
        with torch.inference_mode():
            return self._forward(video, current)

    def _example(self) -> tuple[Tensor | None, Tensor | None]:
        c, b = self.config, self.batch_size
        video = torch.zeros(b, c.channels, c.num_frames, *c.frame_hw, dtype=torch.uint8, device=self.device)
        current = torch.zeros(b, c.current_len, c.current_channels, device=self.device)
        return (video if "video" in self.inputs else None), (current if "current" in self.inputs else None)

    def _build(self):
        return self._build_captured() if self.device.type == "cuda" else self._build_compiled()

    def _build_captured(self, graph: bool = True):
        """The forward on static buffers at ``batch_size``, replayed as a CUDA graph (``graph=False``:
        its eager twin on the same buffers, which the CPU tests check)."""
        from fmfast.engine.graphs import StaticForward

        args = [x for x in self._example() if x is not None]
        static = StaticForward(lambda *xs: self._forward(*self._split(xs)), args, graph=graph)
        return lambda v, c: static(*[x for x in (v, c) if x is not None])

    def _build_compiled(self):
        video, current = self._example()
        # fp32 at large batches: a symbolic batch makes freezing pack the Linears for oneDNN
        # (its fused epilogues included) instead of MKL, which inductor takes for static fp32 shapes
        # and has no setting against: B=32 at the paper shape 7.8-16% faster on a Zen 3 (three
        # interleaved A/B runs). At B=8 it was level and at B=1 (401 rows) MKL's calls are faster;
        # a size-1 batch is specialised anyway. 16-bit weights take oneDNN at any shape.
        dynamic = self.dtype is None and self.batch_size >= ONEDNN_MIN_BATCH
        # Tiny chunks: the program's wrapper in C++ instead of Python. At B=1 a forward is ~150
        # small kernels, whose Python calls were 8-10% of it (bf16 at the paper shape on a Zen 4:
        # 17.2 -> 15.8 ms, B=2 29.8 -> 26.9; fp32 at B=1 5%); from B=8 on it measured level, and
        # it costs ~9 s more to compile. Where it fails to build, the Python wrapper, said in note.
        cpp = self.batch_size <= CPP_WRAPPER_MAX_BATCH
        try:
            compiled = self._compile(video, current, dynamic, cpp_wrapper=cpp)
        except Exception as e:  # noqa: BLE001 -- any failure of the C++ wrapper: the Python one
            if not cpp:
                raise
            compiled = self._compile(video, current, dynamic, cpp_wrapper=False)
            self.wrapper_note = f"Python wrapper (C++ wrapper failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})"
        else:
            self.wrapper_note = "C++ wrapper" if cpp else ""
        return self._skip_guards(compiled, video, current)

    def _compile(self, video, current, dynamic: bool, cpp_wrapper: bool):
        """``torch.compile`` of the forward, compiled and warmed up on the example inputs."""
        import torch._inductor.config as inductor_config

        compiled = torch.compile(self._forward, dynamic=None if dynamic else False)
        if dynamic:
            for x in (video, current):
                if x is not None:
                    torch._dynamo.mark_dynamic(x, 0)
        # Freezing (weights as constants: bf16 casts folded, oneDNN-packed Linear with fused
        # epilogues) is read from inductor's global config when the first call compiles; passed
        # as torch.compile(options=...) it is silently not applied (torch 2.13): the weights
        # stayed graph inputs, cast to bf16 on every call.
        with torch.no_grad(), inductor_config.patch(freezing=True, cpp_wrapper=cpp_wrapper):
            for _ in range(2):  # compile, then one warm run: the first timed call is a steady one
                compiled(video, current)
        return compiled

    @staticmethod
    def _skip_guards(compiled, video, current):
        # Dynamo re-checks ~200 guards per call (0.9 ms: 8% of a B=1 forward). Inputs of the
        # compiled example's signature skip them: the weights are frozen into the program anyway
        # (it is a snapshot of the model), and any other input runs the guarded call, which
        # compiles a program of its own.
        example = _signature(video, current)
        stance = getattr(torch.compiler, "set_stance", None)

        def run(v, c):
            if stance is not None and _signature(v, c) == example:
                with stance(skip_guard_eval_unsafe=True):
                    return _no_grad(compiled, v, c)
            return _no_grad(compiled, v, c)
        return run

    def _split(self, xs):
        it = iter(xs)
        return (next(it) if "video" in self.inputs else None), (next(it) if "current" in self.inputs else None)

    # ---- the public calls ------------------------------------------------------------------
    def __call__(self, video: Tensor | None = None, current: Tensor | None = None,
                 frame_index: Tensor | None = None) -> Tensor:
        """Logits, float32, on the predictor's device. See the module docstring for shapes."""
        if "video" in self.inputs:
            if video is None:
                raise ValueError(f"Predictor: the {self.name} model needs a video")
            if frame_index is not None:  # one shape for the compiled program: the clips themselves
                video = gather_clip(video, frame_index.to(video.device))
            video = video.to(self.device, non_blocking=True)
        else:
            video = None
        if "current" in self.inputs:
            if current is None:
                raise ValueError(f"Predictor: the {self.name} model needs a current window")
            current = current.to(self.device, dtype=torch.float32, non_blocking=True)
        else:
            current = None
        n = (video if video is not None else current).shape[0]
        out = []
        for s in range(0, n, self.batch_size):
            v, c = (x[s:s + self.batch_size] if x is not None else None for x in (video, current))
            rows = (v if v is not None else c).shape[0]
            if rows < self.batch_size:  # pad with the first row: samples are independent
                v, c = (_pad(x, self.batch_size) if x is not None else None for x in (v, c))
            # contiguous, as the example it was compiled for: other strides would recompile it
            v, c = (x.contiguous() if x is not None else None for x in (v, c))
            out.append(self._run(v, c)[:rows].clone())
        return out[0] if len(out) == 1 else torch.cat(out)

    def probabilities(self, video: Tensor | None = None, current: Tensor | None = None,
                      frame_index: Tensor | None = None) -> Tensor:
        """Class probabilities ``[B, classes]`` (or ``[B, classes, W, H]``), float32."""
        return self(video, current, frame_index).softmax(1)

    def __repr__(self) -> str:
        return f"Predictor({self.path}, batch_size={self.batch_size})"


ONEDNN_MIN_BATCH = 16  # fp32 CPU batches from here compile with a symbolic batch (_build_compiled)
CPP_WRAPPER_MAX_BATCH = 2  # CPU chunks up to this compile with inductor's C++ wrapper (_build_compiled)


def _signature(*xs: Tensor | None) -> tuple:
    return tuple(None if x is None else (x.dtype, x.shape, x.device, x.is_contiguous()) for x in xs)


def _pad(x: Tensor, size: int) -> Tensor:
    return torch.cat([x, x[:1].expand(size - x.shape[0], *x.shape[1:])])


def _no_grad(fn, *args):
    with torch.no_grad():  # (freezing needs no_grad; inference_mode tensors would reach it as constants)
        return fn(*args)
