"""The bad-input corpus of the data readers: targeted corruptions of the tiny V2 dataset and of
own-recording logs. Each case expects a DataError naming the file, the place and the problem,
or acceptance with exactly the values of the clean data. (tools/bad_input_counts.py counts
these cases per reader.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from fmfast.data import FMFDataset
from fmfast.data.csvfiles import parse_time, read_current_csv, read_frame_times
from fmfast.errors import DataError
from helpers.corrupt import edit_line, edit_lines, flip_bytes, float_video, rewrite_mat, set_cell, set_split, set_split_text


def tiny(root, **kw):
    return FMFDataset(root, num_frames=4, stride=2, current_seconds=3, train=False, **kw)


def swap_lines(path, i, j):
    def f(ls):
        ls = list(ls)
        ls[i], ls[j] = ls[j], ls[i]
        return ls
    edit_lines(path, f)


def to_bytes(path, fn):
    path.write_bytes(fn(path.read_bytes()))


CUR, TS = "currents/a.csv", "timestamps/a.csv"
V2_BAD = {  # case -> (corruption, file named, problem named)
    "decimal comma": (lambda r: set_cell(r / CUR, 3, 1, "10142,81"), "a.csv", "line 4: 5 fields"),
    "quoted decimal comma": (lambda r: set_cell(r / CUR, 3, 1, '"10142,81"'), "a.csv", "decimal comma"),
    "float32 overflow": (lambda r: set_cell(r / CUR, 5, 2, "1e300"), "a.csv", "line 6: current out of range"),
    "float32 overflow negative": (lambda r: set_cell(r / CUR, 2, 3, "-4e38"), "a.csv", "line 3: current out of range"),
    "infinite current": (lambda r: set_cell(r / CUR, 2, 3, "inf"), "a.csv", "line 3: current is NaN or infinite"),
    "current rows unsorted": (lambda r: swap_lines(r / CUR, 2, 6), "currents/a.csv", "go backwards"),
    "current stamp with UTC offset": (lambda r: edit_line(r / CUR, 4, lambda ln: ln.replace(",", "+02:00,", 1)),
                                      "a.csv", "line 5: timestamp '2023-05-10 21:29:59+02:00' carries a time zone"),
    "frame stamps unsorted": (lambda r: swap_lines(r / TS, 3, 25), "timestamps/a.csv", "go backwards"),
    "frame stamp with Z": (lambda r: edit_line(r / TS, 7, lambda ln: ln + "Z"), "timestamps/a.csv", "time zone"),
    "frame stamp impossible date": (lambda r: edit_line(r / TS, 2, lambda ln: "2023-02-30 21:30:00"),
                                    "timestamps/a.csv", "line 3: unparseable timestamp"),
    "current log not UTF-8": (lambda r: to_bytes(r / CUR, lambda b: b.replace(b"timestamp", b"zeit\xe4", 1)),
                              "currents/a.csv", "not UTF-8"),
    "timestamps not UTF-8": (lambda r: to_bytes(r / TS, lambda b: b + b"\xff\xfe\n"), "timestamps/a.csv", "not UTF-8"),
    "split duplicate key": (lambda r: set_split_text(r, "test", '{"a.mat": [20], "b.mat": [10], "a.mat": [21]}'),
                            "test.json", "recording 'a.mat' is listed twice"),
    "split index 10**30": (lambda r: set_split(r, "test", a=[10**30]), "test.json", f"frame {10**30} out of range"),
    "split float index": (lambda r: set_split(r, "test", a=[20.0]), "test.json", "integer frame indices"),
    "split not UTF-8": (lambda r: set_split_text(r, "test", b'{"a.mat": [20], "\xff": []}'), "test.json", "not valid JSON"),
    "split nested too deep": (lambda r: set_split_text(r, "test", "[" * 100_000 + "]" * 100_000), "test.json",
                              "not valid JSON"),
    "float video NaN": (lambda r: float_video(r / "videos/a.mat", np.nan), "a.mat", "'data' frame 3: value nan"),
    "float video 300": (lambda r: float_video(r / "videos/a.mat", 300.0, (7, 1, 2, 3)), "a.mat",
                        "'data' frame 7: value 300.0 is not a pixel value"),
    "float video negative": (lambda r: float_video(r / "videos/a.mat", -1.0), "a.mat", "value -1.0"),
    "float video fraction": (lambda r: float_video(r / "videos/a.mat", 1.5), "a.mat", "not a whole number"),
    "uint16 video 256": (lambda r: rewrite_mat(r / "videos/b.mat", data=np.full((20, 3, 8, 6), 256, np.uint16)),
                         "b.mat", "'data' frame 0: value 256"),
    "float label NaN": (lambda r: rewrite_mat(r / "videos/a.mat", label=np.full((30, 8, 6), np.nan)), "a.mat",
                        "'label' frame 0: value nan"),
}


@pytest.mark.parametrize("case", list(V2_BAD))
def test_v2_bad_input(tiny_copy, case):
    mutate, where, what = V2_BAD[case]
    mutate(tiny_copy)
    with pytest.raises(DataError) as e:
        tiny(tiny_copy, split="test")
    msg = str(e.value)
    assert where in msg and what in msg and "\n" not in msg, msg


def _same(a, b):
    assert a.names == b.names and len(a) == len(b)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.currents, b.currents)
    for i in range(len(a)):
        xa, xb = a[i], b[i]
        for u, v in zip(xa if isinstance(xa, tuple) else [xa], xb if isinstance(xb, tuple) else [xb]):
            assert torch.equal(torch.as_tensor(u), torch.as_tensor(v))


def _all_text(root, fn):
    for p in [*root.glob("currents/*.csv"), *root.glob("timestamps/*.csv")]:
        p.write_bytes(fn(p.read_bytes()))


V2_HARMLESS = {
    "BOM": lambda r: (_all_text(r, lambda b: b"\xef\xbb\xbf" + b),
                      set_split_text(r, "test", b"\xef\xbb\xbf" + (r / "test.json").read_bytes())),
    "CRLF": lambda r: _all_text(r, lambda b: b.replace(b"\n", b"\r\n")),
    "ISO T in both files": lambda r: _all_text(r, lambda b: b.replace(b"-10 21:", b"-10T21:")),
    "extra column named by the header": lambda r: [edit_lines(p, lambda ls: [ls[0] + ",note"] + [x + ",ok" for x in ls[1:]])
                                                   for p in r.glob("currents/*.csv")],
    "float video of whole values": lambda r: float_video(r / "videos/a.mat"),
}


@pytest.mark.parametrize("case", list(V2_HARMLESS))
def test_v2_harmless_input_reads_the_same(tiny_v2, tiny_copy, case):
    V2_HARMLESS[case](tiny_copy)
    _same(tiny(tiny_copy, split="test"), tiny(tiny_v2, split="test"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(512, 4095), n=st.sampled_from([1, 4, 16]))
def test_damaged_hdf5_is_a_data_error_or_reads(tiny_v2, tmp_path_factory, offset, n):
    """Bytes flipped anywhere in a .mat's metadata (superblock, object headers, heaps,
    B-trees): a DataError naming the file, or a dataset that still loads -- never a raw
    h5py/OS/Overflow error."""
    import shutil

    root = shutil.copytree(tiny_v2, tmp_path_factory.mktemp("h5") / "ds")
    mat = root / "videos" / "a.mat"
    flip_bytes(mat, offset, n)
    try:
        tiny(root, split="test")
    except DataError as e:
        assert "a.mat" in str(e) and "\n" not in str(e)


def test_damaged_hdf5_known_offsets(tiny_copy):
    """At least one flipped region must be detected (the corpus is not all silent passes)."""
    mat = tiny_copy / "videos" / "a.mat"
    flip_bytes(mat, 512 + 96, 64)  # the root group's object header, right after the superblock
    with pytest.raises(DataError, match="a.mat"):
        tiny(tiny_copy, split="test")


# ---- own-recording logs (fmfast ingest / detect) ------------------------------------------
HEADER = "time,A,B,C\n"
GOOD_ROWS = "2024-01-01 10:00:00.0,1,2,3\n2024-01-01 10:00:00.5,4,5,6\n2024-01-01 10:00:01.0,7,8,9\n"
T0 = float(np.datetime64("2024-01-01T10:00:00", "us").astype(np.int64)) * 1e-6

LOG_BAD = {
    "decimal comma": (HEADER + "2024-01-01 10:00:00,10142,81,2,3\n", "line 2: 5 fields but the header names 4"),
    "1e300": (HEADER + "2024-01-01 10:00:00,1e300,2,3\n", "line 2: current out of range"),
    "NaN": (HEADER + "2024-01-01 10:00:00,nan,2,3\n", "NaN or infinite"),
    "UTC offset": (HEADER + "2024-01-01 10:00:00+01:00,1,2,3\n", "carries a time zone"),
    "mixed time zones": (HEADER + "2024-01-01 10:00:00,1,2,3\n2024-01-01 10:00:01Z,1,2,3\n", "line 3"),
    "unsorted": (HEADER + "2024-01-01 10:00:01.5,1,2,3\n2024-01-01 10:00:00.5,1,2,3\n", "line 3: timestamps go backwards"),
    "duplicated fine stamp": (HEADER + GOOD_ROWS + "2024-01-01 10:00:01.5,1,2,3\n" * 2, "line 6: timestamps repeat"),
    "latin-1": ((HEADER + GOOD_ROWS).replace("time", "Zeit\xe4").encode("latin-1"), "line 1: the current log file is not UTF-8"),
    "missing columns": ("time,A,B\n2024-01-01 10:00:00,1,2\n", "missing columns"),
    "short row": (HEADER + "2024-01-01 10:00:00,1,2\n", "line 2: 3 fields"),
    "text value": (HEADER + "2024-01-01 10:00:00,1,x,3\n", "non-numeric current 'x'"),
    "no rows": (HEADER, "no rows"),
    "empty": ("", "empty current log"),
    "unparseable stamp": (HEADER + "10:00:00 2024-01-01,1,2,3\n", "unparseable timestamp"),
}


@pytest.mark.parametrize("case", list(LOG_BAD))
def test_current_log_bad_input(tmp_path, case):
    text, what = LOG_BAD[case]
    p = tmp_path / "cur.csv"
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    with pytest.raises(DataError) as e:
        read_current_csv(p)
    assert str(p) in str(e.value) and what in str(e.value) and "\n" not in str(e.value), str(e.value)


LOG_HARMLESS = {
    "plain": (HEADER + GOOD_ROWS).encode(),
    "BOM": b"\xef\xbb\xbf" + (HEADER + GOOD_ROWS).encode(),
    "CRLF": (HEADER + GOOD_ROWS).replace("\n", "\r\n").encode(),
    "ISO T": (HEADER + GOOD_ROWS).replace(" 10:", "T10:").encode(),
    "extra named columns": ("time,A,B,C,temp,note\n" + GOOD_ROWS.replace("\n", ",20.5,x\n")).encode(),
    "blank lines": (HEADER + GOOD_ROWS.replace("\n", "\n\n")).encode(),
}


@pytest.mark.parametrize("case", list(LOG_HARMLESS))
def test_current_log_harmless_input(tmp_path, case):
    p = tmp_path / "cur.csv"
    p.write_bytes(LOG_HARMLESS[case])
    t, v = read_current_csv(p)
    np.testing.assert_allclose(t - T0, [0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_array_equal(v, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])


FRAMES_BAD = {
    "unsorted": ("t\n2024-01-01 10:00:00.2\n2024-01-01 10:00:00.1\n", "line 3: frame timestamps go backwards"),
    "duplicated fine stamp": ("t\n2024-01-01 10:00:00.1\n2024-01-01 10:00:00.1\n", "line 3: frame timestamps repeat"),
    "UTC offset": ("t\n2024-01-01 10:00:00-05:00\n", "time zone"),
    "not UTF-8": (b"t\n2024-01-01 10:00:00\n\xff\n", "line 3: the timestamps file is not UTF-8"),
    "bad stamp": ("t\nyesterday\n", "line 2: unparseable timestamp 'yesterday'"),
    "no rows": ("t\n", "no rows"),
}


@pytest.mark.parametrize("case", list(FRAMES_BAD))
def test_frame_times_bad_input(tmp_path, case):
    text, what = FRAMES_BAD[case]
    p = tmp_path / "ts.csv"
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    with pytest.raises(DataError) as e:
        read_frame_times(p)
    assert str(p) in str(e.value) and what in str(e.value), str(e.value)


def test_frame_times_whole_seconds_may_repeat_and_T_and_BOM_are_fine(tmp_path):
    p = tmp_path / "ts.csv"
    p.write_bytes(b"\xef\xbb\xbft\r\n2024-01-01T10:00:00\r\n2024-01-01 10:00:00\r\n2024-01-01 10:00:01.25\r\n")
    np.testing.assert_allclose(read_frame_times(p) - T0, [0, 0, 1.25], atol=1e-6)


@pytest.mark.parametrize("start", ["2024-01-01 10:00:00+02:00", "2024-01-01T10:00:00Z", "10:00", "2024-13-01 10:00:00"])
def test_start_time_must_be_naive_iso(start):
    with pytest.raises(DataError, match="start time: "):
        parse_time(start, "start time")


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 10**6), st.floats(-3.0000000054977558e38, 3.0000000054977558e38, allow_nan=False, width=32),
                               st.floats(-1e5, 1e5, allow_nan=False), st.integers(-10**9, 10**9)),
                     min_size=1, max_size=20, unique_by=lambda r: r[0]))
def test_any_valid_log_reads_back_exactly(tmp_path_factory, rows):
    rows = sorted(rows)
    p = tmp_path_factory.mktemp("log") / "cur.csv"
    stamps = [str(np.datetime64("2024-01-01T10:00:00", "ms") + np.timedelta64(ms, "ms")).replace("T", " ")
              for ms, *_ in rows]
    p.write_text(HEADER + "".join(f"{s},{a!r},{b!r},{c}\n" for s, (_, a, b, c) in zip(stamps, rows)))
    t, v = read_current_csv(p)
    np.testing.assert_array_equal(v, [[a, b, c] for _, a, b, c in rows])
    ms = np.array([r[0] for r in rows])
    if (ms % 1000).any():  # whole-second stamps are spread within their second on purpose
        np.testing.assert_allclose(t - T0, ms / 1000, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(line=st.integers(1, 3), col=st.integers(0, 3),
       junk=st.sampled_from(["", "x", "1,5", "1e39", "-inf", "nan", "0x10", "1.2.3", "--1", "2024-01-01",
                             "2024-01-01 10:00:00+00:00", "\x00"]))
def test_any_corrupted_cell_is_an_error_naming_its_line(tmp_path_factory, line, col, junk):
    p = tmp_path_factory.mktemp("log") / "cur.csv"
    lines = (HEADER + GOOD_ROWS).splitlines()
    cells = lines[line].split(",")
    cells[col] = junk
    lines[line] = ",".join(cells)
    p.write_text("\n".join(lines) + "\n")
    try:
        t, v = read_current_csv(p)
    except DataError as e:
        assert f"line {line + 1}" in str(e) or "line" in str(e), str(e)
        return
    # the only corruptions that may read are a stamp that is still a valid, ordered stamp
    assert col == 0 and junk == "2024-01-01" and line == 1, (junk, t, v)
