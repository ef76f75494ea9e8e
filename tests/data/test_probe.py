"""``probe_ahead``: the probe started in a background thread, taken by the next ``probe`` of
the same unchanged file -- its answer, or its error -- and never by a changed file."""
from __future__ import annotations

import pytest

import fmfast.data.probe as probe_mod
from fmfast.data.probe import probe, probe_ahead
from fmfast.errors import DataError
from helpers.recordings import frames, lying_avi, write_video


def wait_ahead():
    for thread, _ in list(probe_mod._AHEAD.values()):
        thread.join(timeout=120)


def no_child(*a, **k):
    raise AssertionError("probe ran a second child")


def test_probe_takes_the_answer_started_ahead(tmp_path, monkeypatch):
    video = write_video(tmp_path / "a.mkv", frames(30), fps=25)
    probe_ahead(video, backend="pyav")
    wait_ahead()
    monkeypatch.setattr(probe_mod, "_run_child", no_child)
    p = probe(video, backend="pyav")
    assert (p.declared, p.indexed, p.fps) == (30, 30, 25.0)
    assert not probe_mod._AHEAD  # taken once: the next probe runs its own child
    with pytest.raises(AssertionError, match="second child"):
        probe(video, backend="pyav")


def test_a_file_changed_after_the_probe_ahead_is_probed_again(tmp_path):
    video = write_video(tmp_path / "a.mkv", frames(30), fps=25)
    probe_ahead(video, backend="pyav")
    wait_ahead()
    write_video(tmp_path / "b.mkv", frames(12), fps=25).replace(video)  # a new inode, size, mtime
    assert probe(video, backend="pyav").indexed == 12
    probe_mod._AHEAD.clear()


def test_another_backend_does_not_take_it(tmp_path, monkeypatch):
    video = write_video(tmp_path / "a.mkv", frames(30), fps=25)
    probe_ahead(video, backend="pyav")
    wait_ahead()
    calls = []
    monkeypatch.setattr(probe_mod, "_run_child", lambda path, timeout, backend: calls.append(backend))
    probe(video, backend="decord")
    assert calls == ["decord"]
    probe_mod._AHEAD.clear()


def test_the_error_of_a_probe_ahead_is_raised_by_probe(tmp_path):
    avi = lying_avi(tmp_path / "lie.avi")
    probe_ahead(avi, backend="pyav")
    with pytest.raises(DataError, match=r"lie\.avi.*declares 2000000000 frames"):
        probe(avi, backend="pyav")


def test_a_missing_file_starts_nothing(tmp_path):
    probe_ahead(tmp_path / "none.mkv")
    assert not probe_mod._AHEAD
