"""Attention, forward and backward, for x86 CPUs with bf16 hardware, and in fp32 for any AVX2
CPU: the C kernels in
``csrc/cpu_attention.c``, built once with the system C compiler in one of two builds -- on AMX-BF16
tiles (Intel Sapphire Rapids and later) or on AVX512-BF16 registers (AMD Zen 4/5, Intel Cooper
Lake), the same code with the tile products emulated by vdpbf16ps -- called through ctypes inside
custom ops with a registered autograd, and the plain-PyTorch ``cpu_attention_ref``.

``cpu_attention(q, k, v, scale) -> o``: q ``[B, H, N, D]``, k and v ``[B, H, M, D]``, bf16, CPU,
D in ``HEAD_DIMS``; o ``[B, H, N, D]`` bf16 = ``softmax(q k^T * scale) v``, laid out as
``[B, N, H, D]`` (``o.transpose(1, 2)`` is contiguous, so merging heads copies nothing). Any
strides with a unit stride over D (the model's q, k, v are views of one qkv projection).
Gradients (dq, dk, dv, bf16) come from the backward kernel, which recomputes P from the
forward's saved log-sum-exp, as flash attention does.

``cpu_attention_pair(q1, k1, v1, q2, k2, v2, scale1, scale2) -> (o1, o2)``: two independent
attentions (any B, H, N, M, D and scale per pair member) in one kernel call, whose work items share one thread
pool: the same outputs and gradients as two ``cpu_attention`` calls, bit for bit, for one call's
overhead (the custom op's dispatch and Python body, about 20 µs, and a parallel region). FmFormer
runs each layer's two self-attentions and its two cross-attentions as pairs.

Why kernels of our own: at head dim 32 PyTorch's CPU flash attention is most of a compiled bf16
FmFormer forward (56% at B=32) and about half a training step. Short segments let a 16-query
block hold its logits over all keys in cache, so the softmax is exact in one AVX-512 pass between
two AMX products, with no online rescaling; the backward runs keys outside and all queries
inside, key-major, so its softmax terms are per-lane vectors (the C file says how).
``bench/test_bench_cpu.py -k "attention_forward or attention_backward"`` times them against SDPA.

``cpu_attention`` on fp32 inputs runs the fp32 kernels of ``csrc/cpu_attention_f32.c`` instead,
built with AVX2 + FMA (every x86-64 CPU since about 2015), forward and backward: the same
blocking (exact softmax over all keys of a query block, no rescaling; the backward recomputes P
from the saved lse) on register-blocked FMA micro-kernels, in fp32 throughout. ``takes`` routes
fp32 here except under ``torch.export``, whose graph must run without fmfast. At head dim 32,
B=32, on a 2-core Zen 3: forward 1.3-1.5x PyTorch's fp32 flash attention at 241-401 tokens
(1.2x at 41; level at B=1), forward + backward 1.26-1.35x
(``bench/test_bench_cpu.py -k "attention_forward_fp32 or attention_backward_fp32"``).
``available_f32()`` says whether it runs here, ``prefers_f32()`` whether ``takes`` routes fp32 to
it (by default only on CPUs without AVX-512: see there). Its errors against float64 are those of fp32
SDPA (exp2 by a degree-5 polynomial, relative error 1.6e-7).

Calls without autograd (``torch.no_grad``, inference mode; not under ``torch.export``) go to
``fmfast::cpu_attention_infer`` / ``fmfast::cpu_attention_infer_pair`` instead: C++ operators
(``csrc/cpu_attention_op.cpp``, built once against the installed torch with the system C++
compiler) that call the same kernel entry, so the same bits, without the Python custom op's
dispatch, body and lse output. A call costs ~3 µs instead of 40-70; at B=1 the paper-shape
FmFormer forward on a Zen 4 went 14.3-15.2 -> 12.1-13.3 ms (three interleaved process pairs).
``FMFAST_CPU_ATTENTION_OP=0`` keeps the Python ops; where the build fails they are kept, with the
reason (``_library_op()``).

``pin_threads()`` pins the OpenMP pool's worker threads (PyTorch's intra-op pool, which the kernel
shares) one to a CPU, leaving the calling thread free: a call after idle then starts on every core
at once (the C file says why). ``fmfast.Predictor`` calls it on a CPU.

``available()`` says whether it can run here and, if not, why (no bf16 hardware, not Linux x86-64,
no C compiler, a failed build); callers then use SDPA. ``variant()`` names the build that runs;
``FMFAST_CPU_ATTENTION`` = amx, avx512 or 0 (off) overrides the choice. The built library is
cached under ``$FMFAST_KERNEL_CACHE`` (default ``~/.cache/fmfast/kernels``), keyed by a hash of the source and
the compiler command, and written by temp file and rename so concurrent first uses are safe.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HEAD_DIMS = (32, 64)
SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.c"
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl",
         "-mavx512bf16"]
# the two builds of SOURCE: its tile products on AMX tiles, or on AVX-512 registers (vdpbf16ps)
VARIANTS = {"AMX": ["-mamx-tile", "-mamx-bf16"], "AVX512-BF16": ["-DFMF_SOFT_TILES"]}
SOURCE_F32 = Path(__file__).parent / "csrc" / "cpu_attention_f32.c"
SOURCE_OP = Path(__file__).parent / "csrc" / "cpu_attention_op.cpp"  # the C++ inference operators
FLAGS_F32 = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma"]
_CHOICE = {"amx": "AMX", "avx512": "AVX512-BF16"}  # FMFAST_CPU_ATTENTION values
_ERRORS = {1: "unsupported head dim", 2: "the kernel refused AMX tile state (arch_prctl)", 3: "out of memory"}


def cache_dir() -> Path:
    return Path(os.environ.get("FMFAST_KERNEL_CACHE") or Path.home() / ".cache" / "fmfast" / "kernels")


def _build(cc: str, source: Path, flags: list[str], libs: tuple[str, ...] = ("-lm",)) -> Path:
    """Compile ``source`` into the cache (once per source, its headers and the command); returns
    the library's path."""
    cmd = [cc, *flags, *libs]
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(cmd).encode()).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, "-o", tmp, str(source), *libs], capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _refused_here() -> str | None:
    """Why neither library can run here (not Linux on x86-64, or ``FMFAST_CPU_ATTENTION=0``), or None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64 (this is {platform.system()} {platform.machine()})"
    if os.environ.get("FMFAST_CPU_ATTENTION", "auto") == "0":
        return "turned off (FMFAST_CPU_ATTENTION=0)"
    return None


def build_and_load(source: Path, flags: list[str]) -> tuple[ctypes.CDLL | None, str]:
    """``source`` built with the system C compiler (or found in the cache) and loaded -> (lib, "")
    or (None, why not: no compiler, a failed build)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc or gcc) to build it"
    try:
        return ctypes.CDLL(str(_build(cc, source, flags))), ""
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        return None, f"its build failed: {e}"


def load_switched(var: str, refusal: str | None, source: Path, flags: list[str]) -> tuple[ctypes.CDLL | None, str]:
    """A kernel library behind the environment switch ``var`` (auto, the default, or 0: off):
    ``build_and_load(source, flags)``, unless this platform, the switch or ``refusal`` (why this
    CPU should not run it, or None) says no -> (lib, "") or (None, why not)."""
    refused = _refused_here()
    if refused:
        return None, refused
    ask = os.environ.get(var, "auto")
    if ask == "0":
        return None, f"turned off ({var}=0)"
    if ask != "auto":
        return None, f"{var}={ask!r} is not one of auto, 0"
    if refusal:
        return None, refusal
    return build_and_load(source, flags)


def availability(library):
    """For a kernel whose ``library()`` gives (lib, "") or (None, why not): ``available() -> (ok,
    why)``, and ``constant() -> ok``, which torch.compile takes as a constant (so it never traces
    the build)."""
    def available() -> tuple[bool, str]:
        lib, why = library()
        return lib is not None, why

    @torch.compiler.assume_constant_result
    def constant() -> bool:
        return available()[0]
    return available, constant


def _load(source: Path, flags: list[str], fwd: str, bwd: str) -> tuple[ctypes.CDLL | None, str]:
    """``source`` built and loaded (``build_and_load``), its entry points declared: the forward
    ``fwd`` over _Problem structures, the backward ``bwd`` and fmf_pin_threads -> (lib, "") or
    (None, why not)."""
    lib, why = build_and_load(source, flags)
    if lib is None:
        return None, why
    getattr(lib, fwd).restype = getattr(lib, bwd).restype = lib.fmf_pin_threads.restype = ctypes.c_int
    getattr(lib, fwd).argtypes = [ctypes.POINTER(_Problem), ctypes.c_int, ctypes.c_int]
    getattr(lib, bwd).argtypes = ([ctypes.c_void_p] * 9 + [ctypes.c_int64] * 5
                                  + [ctypes.POINTER(ctypes.c_int64), ctypes.c_float, ctypes.c_int])
    lib.fmf_pin_threads.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    return lib, ""


def supported_variants() -> list[str]:
    """The builds this CPU can run, fastest first: AMX where it has AMX-BF16 tiles (it then has
    AVX512-BF16 too), AVX512-BF16 where it has bf16 dot products but no tiles."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    return (["AMX"] if amx and bf16 else []) + (["AVX512-BF16"] if bf16 else [])


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel, its variant) or (None, why it cannot run here). The variant is the
    fastest this CPU supports, or the one ``FMFAST_CPU_ATTENTION`` names (amx, avx512; 0: off)."""
    refused = _refused_here()
    if refused:
        return None, refused
    ask = os.environ.get("FMFAST_CPU_ATTENTION", "auto")
    have = supported_variants()
    if ask in _CHOICE:
        if _CHOICE[ask] not in have:
            return None, f"FMFAST_CPU_ATTENTION={ask}: this CPU has no {_CHOICE[ask]}"
        variant = _CHOICE[ask]
    elif ask != "auto":
        return None, f"FMFAST_CPU_ATTENTION={ask!r} is not one of auto, amx, avx512, 0"
    elif not have:
        return None, "this CPU has neither AMX-BF16 tiles nor AVX512-BF16"
    else:
        variant = have[0]
    lib, why = _load(SOURCE, FLAGS + VARIANTS[variant], "fmf_attention_fwd_many", "fmf_attention_bwd")
    if lib is None:
        return None, why
    if not lib.fmf_amx_init():
        return None, "the OS refused AMX tile state (arch_prctl)"
    return lib, variant


def available() -> tuple[bool, str]:
    """(True, "") where the kernel runs on this machine, else (False, the reason)."""
    lib, why = _library()
    return lib is not None, "" if lib is not None else why


def variant() -> str | None:
    """The build that runs here ("AMX" or "AVX512-BF16"), None where none does."""
    lib, name = _library()
    return name if lib is not None else None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def _library_f32() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded fp32 kernel, "") or (None, why it cannot run here): it needs Linux on x86-64
    with AVX2 and FMA; ``FMFAST_CPU_ATTENTION=0`` turns it off too."""
    refused = _refused_here()
    if refused:
        return None, refused
    if not {"avx2", "fma"} <= _cpu_flags():
        return None, "this CPU lacks AVX2 with FMA"
    return _load(SOURCE_F32, FLAGS_F32, "fmf_attention_f32_fwd_many", "fmf_attention_f32_bwd")


def available_f32() -> tuple[bool, str]:
    """(True, "") where the fp32 kernels (AVX2) run on this machine, else (False, the reason)."""
    lib, why = _library_f32()
    return lib is not None, why


def prefers_f32() -> tuple[bool, str]:
    """Whether ``takes`` routes fp32 to the AVX2 kernels, and why: by default only on CPUs without
    AVX-512, where they were measured faster than PyTorch's fp32 flash attention (a Zen 3); on
    AVX-512 CPUs SDPA's 512-bit code is unmeasured against them, so fp32 keeps SDPA there.
    ``FMFAST_CPU_ATTENTION_F32`` = auto (that rule), 1 (wherever they run), 0 (never)."""
    ok, why = available_f32()
    ask = os.environ.get("FMFAST_CPU_ATTENTION_F32", "auto")
    if not ok:
        return False, why
    if ask not in ("auto", "0", "1"):
        return False, f"FMFAST_CPU_ATTENTION_F32={ask!r} is not one of auto, 0, 1"
    if ask == "0":
        return False, "turned off (FMFAST_CPU_ATTENTION_F32=0)"
    if ask == "auto" and "avx512f" in _cpu_flags():
        return False, "this CPU has AVX-512: fp32 keeps PyTorch's SDPA (FMFAST_CPU_ATTENTION_F32=1 takes the kernels)"
    return True, ""


_PINNED: dict[int, tuple[bool, str]] = {}  # thread count -> what pin_threads did for it


def pin_threads() -> tuple[bool, str]:
    """Pins worker t (1 .. n-1) of the n = ``torch.get_num_threads()`` OpenMP threads to the t-th
    CPU this process may run on; the calling thread (t = 0) keeps its affinity, so threads and
    processes it starts later keep theirs. -> (pinned, what it did in words). ``FMFAST_PIN_THREADS``:
    auto (default: only when n equals the number of CPUs this process may use, so no guess about
    hyperthread siblings or other processes is made), 1 (whenever n fits), 0 (never)."""
    n, ask = torch.get_num_threads(), os.environ.get("FMFAST_PIN_THREADS", "auto")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if ask not in ("auto", "0", "1"):
        return False, f"threads not pinned: FMFAST_PIN_THREADS={ask!r} is not one of auto, 0, 1"
    if ask == "0":
        return False, "threads not pinned (FMFAST_PIN_THREADS=0)"
    if n < 2:
        return False, "threads not pinned: one thread"
    if n > len(cpus) or (ask == "auto" and n != len(cpus)):
        return False, f"threads not pinned: {n} threads on {len(cpus)} CPUs (FMFAST_PIN_THREADS=1 pins whenever they fit)"
    if n not in _PINNED:
        lib, why = _library()
        lib = lib or _library_f32()[0]  # (both libraries hold the same fmf_pin_threads)
        if lib is None:
            return False, f"threads not pinned: {why}"
        got = lib.fmf_pin_threads((ctypes.c_int * n)(-1, *cpus[1:n]), n)
        _PINNED[n] = ((True, f"{n - 1} worker thread(s) pinned to CPUs {cpus[1:n]}") if got == n - 1
                      else (False, f"threads not pinned: {got} of {n - 1} workers took their CPU"))
    return _PINNED[n]


@functools.lru_cache(maxsize=None)
def _library_op() -> tuple[bool, str]:
    """The C++ operators ``fmfast::cpu_attention_infer`` and ``fmfast::cpu_attention_infer_pair``
    (``csrc/cpu_attention_op.cpp``) loaded and pointed at the kernels that run here -> (True, "")
    or (False, why not: no C++ compiler, a failed build, neither kernel here, or
    ``FMFAST_CPU_ATTENTION_OP=0``)."""
    refused = _refused_here()
    if refused:
        return False, refused
    if os.environ.get("FMFAST_CPU_ATTENTION_OP", "auto") == "0":
        return False, "turned off (FMFAST_CPU_ATTENTION_OP=0)"
    bf16, f32 = _library()[0], _library_f32()[0]
    if bf16 is None and f32 is None:
        return False, "neither kernel runs here"
    shim, why = _op_shim()
    if shim is None:
        return False, why
    shim.fmf_op_set_entries(*(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value if lib else None
                              for lib, name in ((bf16, "fmf_attention_fwd_many"), (f32, "fmf_attention_f32_fwd_many"))))
    return True, ""


@functools.lru_cache(maxsize=None)
def _op_shim() -> tuple[ctypes.CDLL | None, str]:
    """``csrc/cpu_attention_op.cpp`` built against this torch (once, into the cache), loaded as
    torch operators with their fake implementations -> (its library, "") or (None, why not)."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        return None, "no C++ compiler (c++ or g++) to build it"
    from torch.utils import cpp_extension

    torch_lib = cpp_extension.library_paths()[0]
    # (FMF_TORCH_VERSION is unused by the source: it keys the cache, so a torch upgraded in place rebuilds)
    flags = ["-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-DFMF_TORCH_VERSION={torch.__version__}", *(f"-I{p}" for p in cpp_extension.include_paths())]
    try:
        path = str(_build(cxx, SOURCE_OP, flags, (f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}")))
        torch.ops.load_library(path)
        shim = ctypes.CDLL(path)  # (the same handle: the entries it is given are the operators')
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        return None, f"its build failed: {e}"
    shim.fmf_op_set_entries.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    _register_infer_fakes()
    return shim, ""


@functools.lru_cache(maxsize=None)
def _register_infer_fakes() -> None:
    # once per process (a second registration is an error), however often the shim is reloaded
    torch.library.register_fake("fmfast::cpu_attention_infer")(lambda q, k, v, scale: _output(q))
    torch.library.register_fake("fmfast::cpu_attention_infer_pair")(
        lambda q1, k1, v1, q2, k2, v2, scale1, scale2: (_output(q1), _output(q2)))


def _infers() -> bool:
    """Whether a call now takes the C++ inference operators: no autograd recording (no_grad or
    inference mode), not under ``torch.export`` (its graph keeps the Python ops), and the operator
    loaded here."""
    return not torch.is_grad_enabled() and not torch.compiler.is_exporting() and _op_constant()


@torch.compiler.assume_constant_result
def _op_constant() -> bool:
    return _library_op()[0]


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``cpu_attention`` runs these inputs, head dim in HEAD_DIMS on a CPU (forward and
    backward): bf16 where the bf16 kernel is available, fp32 where the AVX2 kernels are and
    ``prefers_f32`` says so, unless under ``torch.export`` (the exported graph must run where
    fmfast is not installed)."""
    if q.device.type != "cpu" or not q.dtype == k.dtype == v.dtype or q.shape[-1] not in HEAD_DIMS:
        return False
    if q.dtype == torch.bfloat16:
        return _available_constant()
    return q.dtype == torch.float32 and not torch.compiler.is_exporting() and _prefers_f32_constant()


@torch.compiler.assume_constant_result
def _available_constant() -> bool:
    # a constant to torch.compile, which so never traces the build
    return available()[0]


@torch.compiler.assume_constant_result
def _prefers_f32_constant() -> bool:
    return prefers_f32()[0]


class _Problem(ctypes.Structure):
    """The C side's fmf_fwd_problem: one forward attention."""
    _fields_ = ([(f, ctypes.c_void_p) for f in ("q", "k", "v", "o", "lse")]
                + [(f, ctypes.c_int64) for f in ("B", "H", "n", "m", "d")]
                + [(f, ctypes.c_int64 * 3) for f in ("sq", "sk", "sv", "so")] + [("scale", ctypes.c_float)])


def _forward(*problems: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(q, k, v, scale) each, all bf16 or all fp32 -> [(o, lse)], all computed in one call of that
    dtype's kernel."""
    f32 = problems[0][0].dtype == torch.float32
    want = torch.float32 if f32 else torch.bfloat16
    lib, outs, cs = None, [], (_Problem * len(problems))()
    for c, (q, k, v, scale) in zip(cs, problems):
        lib = _check(q, k, v, _library_f32() if f32 else None)
        if not q.dtype == k.dtype == v.dtype == want:  # (the C side reads the bytes as `want`)
            raise ValueError(f"cpu_attention: q, k, v all {want}, got {q.dtype}, {k.dtype}, {v.dtype}")
        q, k, v = _unit(q), _unit(k), _unit(v)
        o, lse = _output(q), q.new_empty(q.shape[:3], dtype=torch.float32)
        c.q, c.k, c.v, c.o, c.lse = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr()
        c.B, c.H, c.n, c.d = q.shape
        c.m, c.scale = k.shape[2], scale
        c.sq[:], c.sk[:], c.sv[:], c.so[:] = q.stride()[:3], k.stride()[:3], v.stride()[:3], o.stride()[:3]
        outs.append((o, lse))
    entry = lib.fmf_attention_f32_fwd_many if f32 else lib.fmf_attention_fwd_many
    _raise(entry(cs, len(problems), torch.get_num_threads()), *problems[0][:2])
    return outs


def _strides(*xs: torch.Tensor):
    """The (b, h, row) strides of each of ``xs``, in one int64 array for the C side."""
    return (ctypes.c_int64 * (3 * len(xs)))(*[s for x in xs for s in x.stride()[:3]])


def _output(q: torch.Tensor) -> torch.Tensor:
    # [B, H, N, D] as a view of [B, N, H, D]: merging the heads afterwards is then free
    b, h, n, d = q.shape
    return q.new_empty((b, n, h, d)).transpose(1, 2)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, library=None) -> ctypes.CDLL:
    lib, why = library or _library()
    if lib is None:
        raise RuntimeError(f"fmfast.kernels.cpu_attention: {why}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"cpu_attention: q [B, H, N, D] and k, v [B, H, M, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] not in HEAD_DIMS or k.shape[2] == 0:
        raise ValueError(f"cpu_attention: head dim must be one of {HEAD_DIMS} and M >= 1, got {tuple(k.shape)}")
    return lib


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _raise(rc: int, q: torch.Tensor, k: torch.Tensor) -> None:
    if rc:
        raise RuntimeError(f"cpu_attention: {_ERRORS.get(rc, rc)} (q {tuple(q.shape)}, k {tuple(k.shape)})")


@torch.library.custom_op("fmfast::cpu_attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o [B, H, N, D] over a [B, N, H, D] buffer, lse [B, H, N] fp32: the backward's input)."""
    return _forward((q, k, v, scale))[0]


def _fake_forward(q, k, v, scale):
    return _output(q), q.new_empty(q.shape[:3], dtype=torch.float32)


_attention_fwd.register_fake(_fake_forward)


@torch.library.custom_op("fmfast::cpu_attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), bf16, contiguous."""
    return _run_backward(_check(q, k, v).fmf_attention_bwd, torch.bfloat16, do, q, k, v, o, lse, scale)


def _run_backward(entry, dtype: torch.dtype, do, q, k, v, o, lse, scale: float):
    """(dq, dk, dv) in ``dtype``, contiguous, from the C backward ``entry`` (one of the libraries'
    fmf_attention_bwd / fmf_attention_f32_bwd: the same signature)."""
    do, q, k, v, o = (_unit(x.to(dtype)) for x in (do, q, k, v, o))
    lse = lse.contiguous()
    dq, dk, dv = (torch.empty(x.shape, dtype=dtype) for x in (q, k, v))
    b, h, n, d = q.shape
    if n and b * h:
        st = _strides(q, k, v, o, do, dq, dk, dv)
        _raise(entry(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), do.data_ptr(), lse.data_ptr(),
                     dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), b, h, n, k.shape[2], d, st, scale,
                     torch.get_num_threads()), q, k)
    else:
        dk.zero_(), dv.zero_()
    return dq, dk, dv


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, scale):
    return (torch.empty(q.shape, dtype=torch.bfloat16), torch.empty(k.shape, dtype=torch.bfloat16),
            torch.empty(v.shape, dtype=torch.bfloat16))


@torch.library.custom_op("fmfast::cpu_attention_pair_fwd", mutates_args=())
def _attention_pair_fwd(q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor,
                        v2: torch.Tensor, scale1: float, scale2: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (o1, lse1, o2, lse2): ``_attention_fwd`` of both triples, in one kernel call."""
    (o1, lse1), (o2, lse2) = _forward((q1, k1, v1, scale1), (q2, k2, v2, scale2))
    return o1, lse1, o2, lse2


def _fake_pair_forward(q1, k1, v1, q2, k2, v2, scale1, scale2):
    return (*_fake_forward(q1, k1, v1, scale1), *_fake_forward(q2, k2, v2, scale2))


_attention_pair_fwd.register_fake(_fake_pair_forward)


def _setup(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _grads(do, q, k, v, o, lse, scale):
    return (_attention_f32_bwd if q.dtype == torch.float32 else _attention_bwd)(do, q, k, v, o, lse, scale)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _grads(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_attention_fwd.register_autograd(_backward, setup_context=_setup)


def _setup_pair(ctx, inputs, output):
    o1, lse1, o2, lse2 = output
    ctx.save_for_backward(*inputs[:6], o1, lse1, o2, lse2)
    ctx.scales = inputs[6:]


def _backward_pair(ctx, do1, _dlse1, do2, _dlse2):
    # training runs at batch sizes where one call's overhead is noise: two backward calls
    q1, k1, v1, q2, k2, v2, o1, lse1, o2, lse2 = ctx.saved_tensors
    return (*_grads(do1, q1, k1, v1, o1, lse1, ctx.scales[0]),
            *_grads(do2, q2, k2, v2, o2, lse2, ctx.scales[1]), None, None)


_attention_pair_fwd.register_autograd(_backward_pair, setup_context=_setup_pair)


@torch.library.custom_op("fmfast::cpu_attention_f32_fwd", mutates_args=())
def _attention_f32_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (o [B, H, N, D] over a [B, N, H, D] buffer, lse [B, H, N]: the backward's input)."""
    return _forward((q, k, v, scale))[0]


_attention_f32_fwd.register_fake(_fake_forward)


@torch.library.custom_op("fmfast::cpu_attention_f32_bwd", mutates_args=())
def _attention_f32_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), fp32, contiguous."""
    entry = _check(q, k, v, _library_f32()).fmf_attention_f32_bwd
    return _run_backward(entry, torch.float32, do, q, k, v, o, lse, scale)


@_attention_f32_bwd.register_fake
def _(do, q, k, v, o, lse, scale):
    return torch.empty(q.shape), torch.empty(k.shape), torch.empty(v.shape)


@torch.library.custom_op("fmfast::cpu_attention_f32_pair_fwd", mutates_args=())
def _attention_f32_pair_fwd(q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, q2: torch.Tensor,
                            k2: torch.Tensor, v2: torch.Tensor, scale1: float, scale2: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (o1, lse1, o2, lse2): ``_attention_f32_fwd`` of both triples, in one kernel call."""
    (o1, lse1), (o2, lse2) = _forward((q1, k1, v1, scale1), (q2, k2, v2, scale2))
    return o1, lse1, o2, lse2


_attention_f32_pair_fwd.register_fake(_fake_pair_forward)


_attention_f32_fwd.register_autograd(_backward, setup_context=_setup)
_attention_f32_pair_fwd.register_autograd(_backward_pair, setup_context=_setup_pair)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v``, differentiable (see the module docstring for shapes)."""
    if _infers():
        return torch.ops.fmfast.cpu_attention_infer(q, k, v, scale)
    return (_attention_f32_fwd if q.dtype == torch.float32 else _attention_fwd)(q, k, v, scale)[0]


def cpu_attention_pair(q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor,
                       v2: torch.Tensor, scale1: float, scale2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cpu_attention(q1, k1, v1, scale1), cpu_attention(q2, k2, v2, scale2))`` in one kernel call
    (both triples of one dtype)."""
    if q1.dtype != q2.dtype:
        raise ValueError(f"cpu_attention_pair: both triples of one dtype, got {q1.dtype} and {q2.dtype}")
    if _infers():
        return torch.ops.fmfast.cpu_attention_infer_pair(q1, k1, v1, q2, k2, v2, scale1, scale2)
    pair = _attention_f32_pair_fwd if q1.dtype == torch.float32 else _attention_pair_fwd
    o1, _, o2, _ = pair(q1, k1, v1, q2, k2, v2, scale1, scale2)
    return o1, o2


def cpu_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention in fp32 PyTorch, returned in q's dtype."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(s.softmax(-1), v.float()).to(q.dtype)
