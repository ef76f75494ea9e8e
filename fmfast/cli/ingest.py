"""Turn an own recording (a video file + a 3-phase current log) into the V2 layout.

    fmfast ingest VIDEO CURRENT.csv --out DIR [--start "YYYY-MM-DD HH:MM:SS"]
        [--timestamps FRAMES.csv] [--labels MASKS] [--size 64] [--max-gap 5] [--name NAME]

Frames are decoded by decord (--decoder auto, the default: where it is installed; else, or with
--decoder pyav, by PyAV) in bounded chunks, resized (antialiased bilinear) to the model's
frame size and stored in the V2 axis order [T,3,W,H]. Each frame's time comes from the
timestamps file (one row per frame, header first) or from --start plus the frame's
presentation time in the video. The current log (any rate; stamps to the second or finer) is
resampled to 2 rows per second over the seconds the frames need, with up to --current-seconds
of history before the first frame: each half second is the mean of the samples in it, or the
linear interpolation between its neighbours when it holds none; a gap longer than --max-gap
seconds is an error. Frames outside the log's time span are dropped. Labels (optional): a .npy [N,H,W] or a folder of
mask images, one per frame in name order, >0 = hot spot; without labels the masks are zeros.

Splits: the recording's key lists every frame with a full clip history (index >=
num_frames*stride - 1, the frames the reference loader uses as they are) in test.json
(--split test, the default: data to evaluate or detect on), in train.json (--split train),
or in neither (--split none). It is a key of both files either way. Ingesting into an
existing root adds the recording to it.
"""
from __future__ import annotations

from fmfast.cli.common import Parser
from fmfast.data.csvfiles import format_seconds, parse_time
from fmfast.data.decoders import LABEL
from fmfast.data.decoders import NAMES as DECODERS
from fmfast.data.decoders import resolve as resolve_decoder
from fmfast.data.ingest import ingest
from fmfast.data.video import parse_size
from fmfast.errors import SettingsError

def build_parser(prog: str = "fmfast ingest") -> Parser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("video", help="video file (mp4, avi, mkv, ... anything FFmpeg reads)")
    p.add_argument("current", help="current log CSV: header, then timestamp, phase A, B, C per row")
    p.add_argument("--out", required=True, help="V2 root folder to create or add to")
    p.add_argument("--start", help='time of the first frame, "YYYY-MM-DD HH:MM:SS[.fff]"')
    p.add_argument("--timestamps", help="CSV with a header and the time of each frame in column 0")
    p.add_argument("--labels", help="hot-spot masks: .npy [N,H,W] or a folder of mask images")
    p.add_argument("--size", default="64", help="stored frame size: N or WIDTHxHEIGHT")
    p.add_argument("--max-gap", type=float, default=5.0, help="longest tolerated gap in the current log, s")
    p.add_argument("--name", help="recording name (default: the video's file name)")
    p.add_argument("--split", default="test", choices=("test", "train", "none"),
                   help="which split lists the frames")
    p.add_argument("--num-frames", type=int, default=10, help="clip length T, for the split lists")
    p.add_argument("--stride", type=int, default=1, help="clip stride s, for the split lists")
    p.add_argument("--current-seconds", type=int, default=120, help="current history S kept before the first frame")
    p.add_argument("--chunk", type=int, default=64, help="frames decoded per batch (bounds memory)")
    p.add_argument("--decode-timeout", type=float, default=60.0, help="seconds one chunk may take to decode")
    p.add_argument("--allow-truncated", action="store_true", help="keep the decodable frames of a cut-off video")
    p.add_argument("--decoder", default="auto", choices=DECODERS,
                   help="video decoder: decord, pyav (PyAV), or auto: decord where it is installed, else PyAV")
    p.add_argument("--overwrite", action="store_true", help="replace a recording of the same name")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    for flag in ("chunk", "num_frames", "stride"):
        if getattr(a, flag) < 1:
            raise SettingsError(f"--{flag.replace('_', '-')} must be >= 1")
    if a.current_seconds < 1:
        raise SettingsError("--current-seconds must be >= 1")
    parse_size(a.size, "--size")  # flag values are checked, naming the flag, before any decoding
    decoder = resolve_decoder(a.decoder, "--decoder")
    if a.start is not None:
        parse_time(a.start, "--start")
    if a.start is None and a.timestamps is None:
        raise SettingsError('frame times unknown: pass --start "YYYY-MM-DD HH:MM:SS" (the time of the first frame) '
                            "or --timestamps FRAMES.csv")
    r = ingest(a.video, a.current, a.out, a.start, a.timestamps, a.labels, a.size, a.max_gap, a.name, a.split,
               a.num_frames, a.stride, a.current_seconds, a.chunk, a.overwrite, a.allow_truncated, a.decode_timeout,
               decoder=decoder)
    msg = (f"{r.root}/videos/{r.name}.mat: {r.frames} frames, current {format_seconds(r.first_second)} "
           f"+ {r.seconds} s at 2 rows/s")
    if r.dropped:
        msg += f"; {r.dropped} frames outside the current log's time span dropped"
    print(f"{msg} ({r.frames / max(r.wall, 1e-9):.0f} frames/s, decoded with {LABEL[r.decoder]})")
    return 0
