"""Untrusted media, made with PyAV: a header that lies about its frame count, files cut off
while recording, decoders that crash. Each ends in one error line naming the file (exit 2), or,
with --allow-truncated, in the frames the file holds and one warning saying how many were kept.
And ingest into a full or read-only disk: one line naming the path, nothing left behind."""
from __future__ import annotations

import subprocess

import h5py
import pytest

from fmfast.cli.common import run_main
from fmfast.cli.ingest import main
from fmfast.data.decoders import importable
from fmfast.data.probe import probe
from fmfast.errors import DataError
from helpers.recordings import cut_file, frames, lying_avi, stamp, v2_current, write_video


def ingest(*argv):
    try:
        return run_main(main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    full = write_video(d / "full.mkv", frames(250), fps=25)  # 10 s
    cur, _ = v2_current(d / "cur.csv", first=-5, seconds=20)
    return d, full, cur


# every installed decoder (decord is absent where it has no wheel)
DECODERS = [b for b in ("decord", "pyav") if importable(b)]


def lines(capfd):
    return [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]


def test_lying_avi_header_is_refused_before_decord_sees_it(media, tmp_path, capfd):
    d, _, cur = media
    avi = lying_avi(tmp_path / "lie.avi")
    assert ingest(avi, cur, "--out", tmp_path / "root", "--start", stamp(0), "--size", "16") == 2
    err = lines(capfd)
    assert len(err) == 1 and "lie.avi" in err[0] and "declares 2000000000 frames" in err[0], err
    assert not (tmp_path / "root").exists()


@pytest.mark.skipif("decord" not in DECODERS, reason="decord (the decoder that aborts) is not installed")
def test_a_decoder_abort_is_an_error_naming_the_file_with_what_it_said(media, tmp_path, capfd, monkeypatch):
    """Without the header check (no PyAV, or a container it misreads) decord itself meets the
    lie and aborts with std::bad_alloc: in the probe's child, so it is one line here."""
    d, _, cur = media
    avi = lying_avi(tmp_path / "lie.avi")
    monkeypatch.setenv("FMFAST_PROBE_HEADER", "0")
    with pytest.raises(DataError) as e:
        probe(avi)
    assert "lie.avi" in str(e.value) and "crashed (SIGABRT)" in str(e.value) and "bad_alloc" in str(e.value)
    assert ingest(avi, cur, "--out", tmp_path / "root", "--start", stamp(0), "--size", "16") == 2
    err = lines(capfd)
    assert len(err) == 1 and "crashed" in err[0] and "lie.avi" in err[0], err


@pytest.mark.parametrize("decoder", DECODERS)
def test_half_cut_mkv_is_an_error_unless_truncation_is_allowed(media, tmp_path, capfd, decoder):
    d, full, cur = media
    cut = cut_file(full, tmp_path / "cut.mkv")
    assert ingest(cut, cur, "--out", tmp_path / "root", "--start", stamp(0), "--size", "16", "--decoder", decoder) == 2
    err = lines(capfd)
    assert len(err) == 1 and "cut.mkv: truncated video: the container header declares 250 frames" in err[0], err
    assert not (tmp_path / "root").exists()

    assert ingest(cut, cur, "--out", tmp_path / "root", "--start", stamp(0), "--size", "16", "--allow-truncated",
                  "--decoder", decoder) == 0
    err = lines(capfd)
    kept = probe(cut, backend=decoder).indexed
    assert 0 < kept < 250
    assert [ln for ln in err if ln.startswith("warning: ")] == [
        f"warning: {cut}: truncated video: kept the {kept} frames in the file of the 250 its header declares"], err
    with h5py.File(tmp_path / "root" / "videos" / "cut.mat") as f:
        assert f["data"].shape[0] == kept


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.9])
def test_cut_anywhere_is_clean(media, tmp_path, capfd, fraction, decoder):
    d, full, cur = media
    cut = cut_file(full, tmp_path / "cut.mkv", fraction)
    code = ingest(cut, cur, "--out", tmp_path / "root", "--start", stamp(0), "--size", "16", "--decoder", decoder)
    err = lines(capfd)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "cut.mkv" in err[0], err


@pytest.mark.parametrize("decoder", DECODERS)
def test_the_probe_of_a_good_file(media, decoder):
    p = probe(media[1], backend=decoder)
    assert (p.declared, p.indexed, p.fps, p.height, p.width) == (250, 250, 25.0, 48, 80)


def test_pyav_reads_the_frames_of_a_lying_avi_decord_aborts_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FMFAST_PROBE_HEADER", "0")  # (the header check refuses it first otherwise)
    p = probe(lying_avi(tmp_path / "lie.avi", n_frames=20), backend="pyav")
    assert (p.declared, p.indexed, p.height, p.width) == (0, 20, 48, 80)


def _tmpfs(path, opts):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    return path


@pytest.mark.parametrize("opts, says", [("size=64k", "no space left"), ("size=1m,ro", "read-only file system")])
def test_ingest_onto_a_full_or_read_only_disk(media, tmp_path, capfd, opts, says):
    d, full, cur = media
    mnt = _tmpfs(tmp_path / "disk", opts)
    try:
        code = ingest(full, cur, "--out", mnt / "root", "--start", stamp(0), "--size", "64")
        err = lines(capfd)
        assert code == 2 and len(err) == 1 and says in err[0] and str(mnt) in err[0], err
        assert list(mnt.iterdir()) == []  # no staging folder, no half-written .mat
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_killed_ingest_leaves_no_staging_folder_behind_next_time(media, tmp_path):
    import subprocess as sp
    import sys

    d, full, cur = media
    dead = sp.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".root.ingest.{dead.pid}.abcd1234"
    (stale / "videos").mkdir(parents=True)
    (stale / "videos" / "half.mat").write_bytes(b"half")
    assert ingest(full, cur, "--out", tmp_path / "root", "--start", stamp(0), "--size", "16") == 0
    assert not stale.exists() and (tmp_path / "root" / "videos" / "full.mat").is_file()
