"""detect's default alarm levels: the checkpoint's threshold calibrated on validation."""
from __future__ import annotations

import pytest

from fmfast.detect.alarms import default_levels


def test_calibrated_threshold_is_the_default_on_level_with_off_below_it():
    on, off, note = default_levels(None, None, 0.42)
    assert on == 0.42 and off == pytest.approx(0.28) and "calibrated on validation" in note and "0.420" in note


def test_given_levels_win_and_no_threshold_falls_back_to_0_6():
    assert default_levels(0.7, 0.5, 0.42)[:2] == (0.7, 0.5)
    assert default_levels(0.9, None, 0.42)[:2] == (0.9, pytest.approx(0.6))
    on, off, note = default_levels(None, None, None)
    assert (on, off) == (0.6, pytest.approx(0.4)) and "no calibrated threshold" in note
