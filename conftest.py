"""Shared by tests/ and bench/: GPU cases need the kernels compiled.

tests/ and bench/ run the Triton kernels through the interpreter by default (their conftests set
TRITON_INTERPRET=1, so the CPU suite can check them). On a CUDA machine that would put the GPU
cases (marked ``gpu``) through the interpreter too: nothing to time, nothing a CUDA graph can
capture, and bf16 computed wrong. They are skipped there, saying how to run them compiled.
"""
import os

import pytest

COMPILED_HOWTO = ("GPU case under the Triton interpreter: run the GPU cases compiled, "
                  "TRITON_INTERPRET=0 (tools/gpu_check.sh does)")


def pytest_collection_modifyitems(config, items):
    import torch

    if os.environ.get("TRITON_INTERPRET") != "1" or not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=COMPILED_HOWTO)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
