"""``keep_freed_memory``: glibc's malloc keeps freed buffers, so a loop that allocates the same
buffers again touches no fresh pages; the switches leave malloc alone, in words."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fmfast.engine import cpu_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# three 10 MB blocks at once, written, freed, eight times over (malloc itself: torch's own
# allocations in between made the default's count vary from run to run): by default glibc raises
# its mmap threshold to 10 MB after the first free and trims the heap's 30 MB free top back to the
# system (its trim threshold is then 20 MB), so every round faults its pages in again
LOOP = """
import ctypes, resource, sys
from fmfast.engine.cpu_memory import keep_freed_memory
print(keep_freed_memory()[1], file=sys.stderr)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(10 << 20) for _ in range(3)]
    for b in blocks:
        libc.memset(b, 1, 10 << 20)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[1:]))
"""


def faults_per_round(**env) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "FMFAST_CPU_MALLOC"))} | env
    p = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: Linux with glibc only")
def test_freed_buffers_are_reused_without_page_faults():
    pages = 3 * (10 << 20) // 4096
    assert faults_per_round(FMFAST_CPU_MALLOC="0") > pages // 2  # the default: fresh pages each round
    assert faults_per_round() < pages // 20


@pytest.mark.parametrize("env, says", [
    ({"FMFAST_CPU_MALLOC": "0"}, "malloc left alone (FMFAST_CPU_MALLOC=0)"),
    ({"FMFAST_CPU_MALLOC": "yes"}, "malloc left alone: FMFAST_CPU_MALLOC='yes' is not one of auto, 0"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "malloc left alone: MALLOC_TRIM_THRESHOLD_ is set"),
])
def test_switches_leave_malloc_alone(monkeypatch, env, says):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cpu_memory.keep_freed_memory.cache_clear()
    try:
        assert cpu_memory.keep_freed_memory() == (False, says)
    finally:
        cpu_memory.keep_freed_memory.cache_clear()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: Linux with glibc only")
def test_a_cpu_predictor_says_it(tmp_path):
    import torch

    from fmfast.engine.predictor import Predictor
    from fmfast.models import build_model
    from fmfast.models.config import ModelConfig

    cfg = ModelConfig(image_size=32, num_frames=4, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32, current_len=8)
    pred = Predictor(build_model("fmformer", cfg), "cpu", "fp32", batch_size=2, compile="off")
    assert pred.memory == (True, "freed memory kept for reuse (malloc)")
    assert pred.path.endswith(", freed memory kept for reuse (malloc)")
    assert pred(torch.zeros(2, 3, 4, 32, 32, dtype=torch.uint8), torch.zeros(2, 8, 3)).shape == (2, 2)
