"""The two video decoders (fmfast.data.decoders): decord and PyAV decode the same generated
videos to the same frames and times, in order and by random access, fail the same way on
lying, cut-off and corrupt files, and ``auto`` falls back to PyAV where decord does not import."""
from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from fmfast.cli.common import run_main
from fmfast.cli.ingest import main as ingest_main
from fmfast.data import decoders
from fmfast.data.video import VideoReader
from fmfast.errors import DataError, SettingsError
from helpers.recordings import audio_only, corrupt_tail, cut_file, frames, stamp, v2_current, write_video

pytestmark = pytest.mark.skipif(not decoders.importable("decord"), reason="decord is not installed: nothing to compare")


def index_of(decoded) -> np.ndarray:
    """Frame indices of decoded frames [n, H, W, 3] from their red level (frame i < 51: 5*i)."""
    return np.round(decoded[..., 0].float().mean((1, 2)).numpy() / 5).astype(int)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoders")
    return {"gop.mp4": write_video(d / "gop.mp4", frames(50), fps=25, gop=8),  # keyframes + B-frames
            "plain.mkv": write_video(d / "plain.mkv", frames(40), fps=10),
            "cut.mkv": cut_file(write_video(d / "full.mkv", frames(100), fps=25), d / "cut.mkv"),
            "corrupt.mp4": corrupt_tail(write_video(d / "x.mp4", frames(50)), d / "corrupt.mp4"),
            "garbage.mp4": (d / "garbage.mp4", (d / "garbage.mp4").write_bytes(b"not a video" * 50))[0],
            "audio.mp4": audio_only(d / "audio.mp4")}


def both(path, **kw):
    return [VideoReader(path, decoder=b, **kw) for b in ("decord", "pyav")]


@pytest.mark.parametrize("name", ["gop.mp4", "plain.mkv"])
def test_same_frames_and_times(videos, name):
    d, p = both(videos[name])
    assert (d.backend, p.backend) == ("decord", "pyav")
    assert (len(d), d.info.fps, d.info.height, d.info.width) == (len(p), p.info.fps, p.info.height, p.info.width)
    a, b = d.decode(list(range(len(d)))), p.decode(list(range(len(p))))
    # the same FFmpeg decoder on the same bitstream; a frame off by one would differ by 5 levels
    assert a.shape == b.shape and (a.int() - b.int()).abs().max() <= 2
    np.testing.assert_array_equal(index_of(b), np.arange(len(p)))
    np.testing.assert_allclose(p.pts(0, len(p)), d.pts(0, len(d)), atol=1e-5)
    assert p.pts(0, 3)[1] == pytest.approx(1 / d.info.fps)


def test_random_access_seeks_to_the_same_frames(videos):
    d, p = both(videos["gop.mp4"], probe=False)
    assert len(p._dec._keys) >= 6  # keyframes to seek to (every 8th frame)
    for idx in ([40, 3, 20, 21, 49, 0, 33], [30, 31, 32], [5, 5], list(range(9, 34)), [8, 7, 16, 15]):
        a, b = d.decode(idx), p.decode(idx)
        assert (a.int() - b.int()).abs().max() <= 2, idx
        np.testing.assert_array_equal(index_of(b), idx)


def _chunks(reader, allow_truncated):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            kept = sum(len(f) for _, f in reader.chunks((16, 16), chunk=8, allow_truncated=allow_truncated))
        except DataError as e:
            return str(e), [str(x.message) for x in w]
    return kept, [str(x.message) for x in w]


@pytest.mark.parametrize("name", ["cut.mkv", "corrupt.mp4"])
@pytest.mark.parametrize("allow_truncated", [False, True])
def test_cut_and_corrupt_files_end_the_same_way(videos, name, allow_truncated):
    """Same error, or same frames kept and same warning; decord's own failure point on a corrupt
    packet varies from run to run, so the second decord run must agree as well."""
    runs = [_chunks(r, allow_truncated) for r in (*both(videos[name]), VideoReader(videos[name], decoder="decord"))]
    assert runs[0] == runs[1] == runs[2], runs
    kept, said = runs[0]
    if allow_truncated:
        assert 0 < kept < (100 if name == "cut.mkv" else 50) and len(said) == 1 and "truncated" in said[0]
    else:
        assert "truncated" in kept and name in kept and said == []


@pytest.mark.parametrize("name, says", [("garbage.mp4", "invalid data"), ("audio.mp4", "no video stream")])
def test_unreadable_files_give_the_same_reason(videos, name, says):
    msgs = []
    for b in ("decord", "pyav"):
        with pytest.raises(DataError) as e:
            VideoReader(videos[name], decoder=b)
        msgs.append(str(e.value).replace("PyAV", "decord"))
    assert msgs[0] == msgs[1] and says in msgs[0] and name in msgs[0], msgs


def _ingest(*argv):
    try:
        return run_main(ingest_main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_auto_picks_pyav_where_decord_does_not_import(videos, tmp_path, monkeypatch, capfd):
    cur, _ = v2_current(tmp_path / "cur.csv", first=-5, seconds=10)
    args = [videos["plain.mkv"], cur, "--start", stamp(0), "--size", "16"]
    assert decoders.resolve("auto") == "decord"
    assert _ingest(*args, "--out", tmp_path / "a") == 0
    assert "decoded with decord" in capfd.readouterr().out

    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` raises ImportError
    assert decoders.resolve("auto") == "pyav"
    assert _ingest(*args, "--out", tmp_path / "b") == 0
    assert "decoded with PyAV" in capfd.readouterr().out
    assert (tmp_path / "b" / "videos" / "plain.mat").is_file()

    assert _ingest(*args, "--out", tmp_path / "c", "--decoder", "decord") == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert err == ["error: --decoder decord: decord is not installed (pip install decord2)"], err
    assert not (tmp_path / "c").exists()
    with pytest.raises(SettingsError, match="decoder: expected one of auto, decord, pyav"):
        decoders.resolve("opencv")
