"""Fixtures shared by the whole suite. Helpers that are not fixtures (writers of small
recordings, the published model's stand-in) live in tests/helpers/."""
import os

# Triton kernels run on the CPU through the interpreter; this must be set before any
# kernel module is imported (the @triton.jit decorator reads it at definition time).
os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

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


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory) -> Path:
    """Two hand-made recordings whose values encode where they came from (helpers/tiny_data.py)."""
    from helpers.tiny_data import write_tiny_v2

    return write_tiny_v2(tmp_path_factory.mktemp("tiny_v2"))


@pytest.fixture
def tiny_copy(tiny_v2, tmp_path) -> Path:
    """A private copy of tiny_v2 that a test may break."""
    return Path(shutil.copytree(tiny_v2, tmp_path / "ds"))


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A small generated dataset: 2 recordings x 600 frames of 16x16 pixels."""
    from fmfast.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synth"), recordings=2, frames=600, seed=5, size=16)
