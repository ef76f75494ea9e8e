import os

# Triton kernels run on the CPU through the interpreter; this must be set before any
# kernel module is imported (the @triton.jit decorator reads it at definition time).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # the test shapes are tiny: on a 2-core machine shared with other jobs, intra-op threads
    # only spin against each other (measured 10x slower with two)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
