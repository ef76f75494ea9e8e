"""Own recordings on the CPU: ingestion frames/s and detection windows/s, each against decoding
the same file with PyAV (the plain-FFmpeg peer), parity asserted first.

The file: 240 frames of 320x240 furnace-like H.264 at 25 fps (9.6 s), stored at 64x64.
- ingest: decord decode + resize + HDF5 write + current alignment, end to end;
- decode: decord chunks + resize vs PyAV decode + the same resize (the decoder alone), and
  fmfast's PyAV decoder (the fallback where decord does not install) through the same chunks;
- detect: the paper-size FmFormer (untrained) scoring every 24th window, decoding included.

Run: ``python -m pytest -q bench/test_bench_ingest.py -s`` (``-s`` prints the ratios).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _common import best_of

av = pytest.importorskip("av", reason="PyAV is the decoding peer (dev extra 'av')")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers
from helpers.recordings import stamp, v2_current, write_video  # noqa: E402

from fmfast.data.video import VideoReader, resize_frames  # noqa: E402

N, H, W, FPS, SIZE = 240, 240, 320, 25, 64


def furnace_frames(n=N, h=H, w=W, seed=0) -> np.ndarray:
    """Smooth moving glow plus noise: compresses like a camera picture, not like flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        cx, cy = w / 2 + 40 * np.sin(i / 20), h / 2 + 30 * np.cos(i / 25)
        glow = 200 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 50.0 ** 2))
        base = glow[..., None] * np.array([1.0, 0.6, 0.3]) + rng.normal(0, 6, (h, w, 1))
        out[i] = np.clip(base + 30, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_ingest")
    video = write_video(d / "furnace.mp4", furnace_frames(), fps=FPS, crf=23)  # a camera's usual quality
    cur, _ = v2_current(d / "cur.csv", first=-130, seconds=145)
    return d, video, cur


def pyav_decode(path: Path, resize: bool = False) -> torch.Tensor:
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    x = torch.from_numpy(frames)
    return resize_frames(x, (SIZE, SIZE)) if resize else x


def decord_decode(path: Path, decoder: str = "decord") -> torch.Tensor:
    # decoding alone, as PyAV's: the header probe (a child process, ~1 s once per file) is left out
    r = VideoReader(path, probe=False, decoder=decoder)
    return torch.cat([f for _, f in r.chunks((SIZE, SIZE), chunk=64)])


def test_bench_decode_vs_pyav(benchmark, recording):
    _, video, _ = recording
    ours, peer = decord_decode(video), pyav_decode(video, resize=True)
    assert ours.shape == peer.shape == (N, 3, SIZE, SIZE)
    # same FFmpeg decoder underneath; colour conversion may differ by a level or two
    assert (ours.float() - peer.float()).abs().mean() < 2.0
    fallback = decord_decode(video, "pyav")  # fmfast's own PyAV decoder, where decord does not install
    assert (fallback.float() - ours.float()).abs().max() <= 2.0
    t_peer, t_fallback = best_of(lambda: pyav_decode(video, resize=True), lambda: decord_decode(video, "pyav"))
    benchmark.pedantic(decord_decode, args=(video,), rounds=3, iterations=1)
    t_ours = benchmark.stats.stats.min
    import decord

    print(f"\ndecode+resize {N} frames {W}x{H} h264 -> [{N},3,{SIZE},{SIZE}] uint8: decord {decord.__version__} "
          f"{N / t_ours:.0f} frames/s, PyAV {N / t_peer:.0f} frames/s, ratio {t_peer / t_ours:.2f}x; "
          f"fmfast's PyAV decoder (the fallback) {N / t_fallback:.0f} frames/s, {t_ours / t_fallback:.2f}x decord")


def test_bench_ingest_vs_pyav(benchmark, recording, tmp_path):
    import h5py

    from fmfast.data.ingest import ingest

    d, video, cur = recording
    runs = iter(range(100))

    def run():
        out = tmp_path / f"root{next(runs)}"
        ingest(str(video), str(cur), str(out), start=stamp(0), size=str(SIZE))
        return out

    out = run()
    with h5py.File(out / "videos" / "furnace.mat", "r") as f:
        stored = torch.from_numpy(f["data"][:])
    assert stored.shape == (N, 3, SIZE, SIZE)
    assert (stored.float() - pyav_decode(video, resize=True).float()).abs().mean() < 2.0
    t_peer = best_of(lambda: pyav_decode(video))[0]
    benchmark.pedantic(run, rounds=3, iterations=1)
    t_ours = benchmark.stats.stats.min
    print(f"\ningest {N} frames {W}x{H} h264 -> V2 [{N},3,{SIZE},{SIZE}] + current: {N / t_ours:.0f} frames/s; "
          f"PyAV decode alone {N / t_peer:.0f} frames/s; ingest/decode ratio {t_peer / t_ours:.2f}x")


def test_bench_detect_vs_pyav(benchmark, recording, tmp_path):
    from fmfast.detect import AlarmTracker, Scorer, WindowEngine, feed_file
    from fmfast.models import ModelConfig, build_model

    d, video, cur = recording
    torch.manual_seed(0)
    model = build_model("fmformer", ModelConfig())  # the paper's size: T=10, 64x64, 240x3 current
    meta = {"model_name": "fmformer", "task": "classification", "data": {}}
    hop = 24  # 10 windows: the paper model runs a few windows/s on a shared CPU

    def run():
        eng = WindowEngine(Scorer(model, meta), hop=hop, batch=32, tracker=AlarmTracker(0.6, 0.4, 0.0))
        feed_file(eng, str(video), str(cur), start=stamp(0))
        return eng.finish(), eng

    res, eng = run()
    want = list(range(9, N, hop))
    assert res.frames == want
    # parity: a window scored by the engine equals the model on the clip gathered by hand
    frames = torch.cat([f for _, f in VideoReader(video).chunks((SIZE, SIZE))])
    f = want[-1]
    clip = frames[f - 9:f + 1].permute(1, 0, 2, 3)[None]
    end = 2 * (int(np.floor(eng.times[f])) - eng.first_second + 1)  # one past the frame's second
    rows = torch.from_numpy(eng.current[end - 240:end])
    with torch.no_grad():
        p = model.eval()(clip, rows[None]).softmax(1)[0, 1].item()
    assert abs(p - res.probs[-1]) < 1e-4
    t_peer = best_of(lambda: pyav_decode(video))[0]
    benchmark.pedantic(run, rounds=1, iterations=1)
    t_ours = benchmark.stats.stats.min
    nw = len(want)
    print(f"\ndetect {nw} windows (hop {hop}) of [1,3,10,{SIZE},{SIZE}] + [1,240,3], paper FmFormer fp32 on "
          f"{torch.get_num_threads()} CPU threads, decoding included: {nw / t_ours:.1f} windows/s, "
          f"{N / t_ours:.0f} frames/s ({N / FPS / t_ours:.1f}x real time); PyAV decode alone {N / t_peer:.0f} "
          f"frames/s; detect/decode ratio {t_peer / t_ours:.3f}x")
