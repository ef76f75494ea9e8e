"""Fixtures of the CLI tests."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """2 synthetic recordings x 600 frames of 32x32 px: long enough for a validation block at the
    end of each behind its guard gap (4-frame clips + 8 s of current ~ 204 frames)."""
    from fmfast.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("syn") / "data", recordings=2, frames=600, seed=3, size=32)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now, for a torchrun/gloo rendezvous (a fixed port
    collides with a run still in TIME_WAIT when the file runs twice in a row)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
