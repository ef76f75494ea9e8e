"""Compile Triton kernels for sm_90 (H100/H200) on a machine with no GPU, through their own host code,
and read what the compiler made of them: registers, spills, stack, shared memory, occupancy, the
MMA and global-load instructions in the SASS.

How: a driver stub whose target is ``GPUTarget("cuda", 90, 32)`` stands in for the CUDA driver;
``capture(module, names)`` swaps a module's kernels for recorders, so the host code's own
``kernel[grid](*args, **meta)`` call becomes ``kernel.warmup(..., grid=grid)`` (compile, no launch)
with exactly the arguments, strides, constexprs and specialisation a GPU launch would use. The
host code runs on CPU tensors of the real shapes. Import this module before anything defines a
Triton kernel, in a process without TRITON_INTERPRET=1 (the interpreter cannot compile).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# sm_90 limits (CUDA occupancy calculator, compute capability 9.0)
SMS = 132
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024  # the opt-in maximum one block may use
SMEM_RESERVED_PER_BLOCK = 1024
MAX_GRID_YZ = 65535


def install_stub_driver():
    """Make Triton believe an sm_90 GPU is the current device (compile only: nothing launches)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("tools/sm90.py: unset TRITON_INTERPRET; the interpreter cannot compile for sm_90")
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _Stub:
        target = GPUTarget("cuda", 90, 32)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    driver.set_active(_Stub())


@dataclass
class Launch:
    """One captured launch: kernel name, grid, the compiled kernel and the constexpr/meta kwargs."""
    name: str
    grid: tuple
    compiled: object
    meta: dict = field(default_factory=dict)


@contextlib.contextmanager
def capture(module, names):
    """Inside the block, ``module.<name>[grid](...)`` compiles for sm_90 and records a Launch in
    the yielded list instead of running."""
    launches: list[Launch] = []
    saved = {n: getattr(module, n) for n in names}

    class _Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kw):
                # Triton runs ptxas -v itself and drops the log: keep it (no second ptxas run, and
                # the numbers are those of Triton's own flags); a cache hit leaves it empty
                from triton import knobs
                out = io.StringIO()
                with knobs.nvidia.scope(), contextlib.redirect_stdout(out):
                    knobs.nvidia.dump_ptxas_log = True
                    k = self.fn.warmup(*args, grid=grid, **kw)
                meta = dict(kw, ptxas_log=out.getvalue() if "Used" in out.getvalue() else None)
                launches.append(Launch(self.name, tuple(grid), k, meta))
            return launch

    try:
        for n, fn in saved.items():
            setattr(module, n, _Recorder(n, fn))
        yield launches
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def _bin(tool: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


_MMA = ("HGMMA", "HMMA", "IMMA", "QGMMA", "DMMA")


def loop_bodies(sass: str) -> list[int]:
    """Instruction count of each loop body in the SASS, in the order of the loops' closing branches
    (a loop is a backward ``BRA``; its body runs from the branch target to the branch). A nested
    loop's instructions count for it alone, not for the loops around it, so a kernel's issue slots
    are sum(body * trips) + the instructions in no loop once per program (warp-instructions; an SM
    issues 4 a clock)."""
    ins = [int(a, 16) for a in re.findall(r"^\s+/\*([0-9a-f]+)\*/\s+", sass, re.M)]
    loops = [(int(m.group(2), 16), int(m.group(1), 16))
             for m in re.finditer(r"^\s+/\*([0-9a-f]+)\*/\s+[^;]*?\bBRA\b[^;]*?0x([0-9a-f]+)", sass, re.M)
             if int(m.group(2), 16) < int(m.group(1), 16)]
    counts = [0] * len(loops)
    for a in ins:  # each instruction belongs to the innermost (shortest) loop around it
        inside = [i for i, (lo, hi) in enumerate(loops) if lo <= a <= hi]
        if inside:
            counts[min(inside, key=lambda i: loops[i][1] - loops[i][0])] += 1
    return counts


def resources(k, ptxas_log: str | None = None) -> dict:
    """ptxas -v and SASS facts of a compiled kernel, plus sm_90 occupancy. ``ptxas_log``: the log
    of Triton's own ptxas run (``Launch.meta``); without it ptxas runs again with Triton's flags."""
    with tempfile.TemporaryDirectory() as d:
        ptx, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        ptx.write_text(k.asm["ptx"])
        cubin.write_bytes(k.asm["cubin"])
        arch = re.search(r"\.target\s+(sm_\w+)", k.asm["ptx"]).group(1)
        v = ptxas_log or subprocess.run(
            [_bin("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(ptx),
             "-o", str(Path(d) / "v.cubin")], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", v).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", v))
    stack = int(re.search(r"(\d+) bytes stack frame", v).group(1))
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass, re.M)
    mma = sorted({o.split(".")[0] for o in ops if o.split(".")[0] in _MMA})
    ffma = sum(o.startswith("FFMA") for o in ops)
    loads: dict[str, int] = {}
    for o in ops:
        if o.startswith("LDG"):
            w = re.search(r"\.(U8|S8|U16|S16|64|128)\b", o)
            width = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}.get(w.group(1) if w else "", 4)
            loads[f"{width}B"] = loads.get(f"{width}B", 0) + 1
    smem = int(k.metadata.shared)
    warps = int(k.metadata.num_warps)
    return dict(regs=regs, spill_bytes=spill, stack_bytes=stack, smem_bytes=smem, num_warps=warps,
                mma=mma, ffma=ffma, ldg=dict(sorted(loads.items(), key=lambda kv: int(kv[0][:-1]))),
                local_ops=sum(o.startswith(("LDL", "STL")) for o in ops), arch=arch, instrs=len(ops), loops=loop_bodies(sass),
                **occupancy(regs, smem, warps))


def occupancy(regs: int, smem: int, warps: int) -> dict:
    """Resident blocks per SM on sm_90 and what limits them (registers are allocated per warp in
    units of 256, i.e. per thread in multiples of 8)."""
    regs_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_warp * warps)
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK) if smem <= SMEM_PER_BLOCK else 0
    by_warps = MAX_WARPS_PER_SM // warps
    bps = min(by_regs, by_smem, by_warps, MAX_BLOCKS_PER_SM)
    limit = "smem" if smem > SMEM_PER_BLOCK else min(
        (("regs", by_regs), ("smem", by_smem), ("warps", by_warps)), key=lambda kv: kv[1])[0]
    return dict(blocks_per_sm=bps, occupancy=bps * warps / MAX_WARPS_PER_SM, limit=limit,
                launches=smem <= SMEM_PER_BLOCK)


def grid_facts(grid: tuple, blocks_per_sm: int) -> dict:
    """Programs, waves over 132 SMs at the resident blocks per SM, wave efficiency, and whether
    the grid is launchable (axes 1 and 2 are capped at 65535)."""
    g = tuple(grid) + (1,) * (3 - len(grid))
    programs = g[0] * g[1] * g[2]
    slots = SMS * max(blocks_per_sm, 1)
    waves = -(-programs // slots)
    return dict(programs=programs, waves=waves, wave_eff=programs / (waves * slots),
                grid_ok=g[0] < 2 ** 31 and g[1] <= MAX_GRID_YZ and g[2] <= MAX_GRID_YZ)
