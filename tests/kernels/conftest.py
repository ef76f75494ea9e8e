"""Fixtures of the kernel tests: compiling kernels for sm_90 without a GPU."""
import os
import subprocess
import sys

import pytest


def _lower_in_subprocess(script: str) -> str:
    """Run ``script`` (which compiles kernels down to cubin with Triton's bundled ptxas) in a fresh
    process without TRITON_INTERPRET -- Triton reads it when a kernel is defined, so this process's
    interpreted kernels cannot be compiled -- assert it succeeded and return what it printed."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture
def lower_in_subprocess():
    """``lower_in_subprocess(script) -> stdout``: compile in a fresh, uninterpreted process."""
    return _lower_in_subprocess
