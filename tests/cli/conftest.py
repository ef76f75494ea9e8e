"""Fixtures of the CLI tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """2 synthetic recordings x 600 frames of 32x32 px: long enough for a validation block at the
    end of each behind its guard gap (4-frame clips + 8 s of current ~ 204 frames)."""
    from fmfast.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("syn") / "data", recordings=2, frames=600, seed=3, size=32)
