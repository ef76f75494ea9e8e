"""The validation carving (fmfast.data.splits): guard gaps, whole synthetic events, explicit lists."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fmfast.data import FMFDataset
from fmfast.data.splits import carve, from_file, guard_frames
from fmfast.errors import DataError


@pytest.fixture(scope="module")
def train(synth):
    return FMFDataset(synth, split="train", num_frames=4, stride=2, current_seconds=2)


def min_gap(ds, t, v) -> np.ndarray:
    """Per recording, the smallest |frame distance| between a training and a validation sample."""
    rec, frame = np.asarray(ds._h_rec), np.asarray(ds._h_frame)
    gaps = np.full(len(ds.names), np.iinfo(np.int64).max)
    for r in range(len(ds.names)):
        ft, fv = frame[t][rec[t] == r], frame[v][rec[v] == r]
        if len(ft) and len(fv):
            gaps[r] = np.abs(ft[:, None] - fv[None, :]).min()
    return gaps


def test_guard_is_one_clip_span_plus_one_current_window(train):
    fps = json.loads((train.root / "synthetic.json").read_text())["recordings"]["furnace_000"]["fps"]
    # 4 frames at stride 2, plus 2 s of current at the recording's frame rate
    assert abs(guard_frames(train)[0] - (4 * 2 + 2 * fps)) <= 1


def test_carving_keeps_training_a_guard_gap_from_validation(train):
    t, v, summary = carve(train, 0.1)
    assert len(v) >= 0.1 * len(train) and len(t) > len(v)
    assert not set(t) & set(v) and summary["train"] + summary["val"] + summary["dropped"] == len(train)
    assert (min_gap(train, t, v) >= guard_frames(train)).all()
    # validation is the end of each recording: later than all its training samples
    rec, frame = np.asarray(train._h_rec), np.asarray(train._h_frame)
    for r in range(len(train.names)):
        assert frame[t][rec[t] == r].max() < frame[v][rec[v] == r].min()


def test_synthetic_validation_holds_whole_events(train):
    _, v, _ = carve(train, 0.1)
    info = json.loads((train.root / "synthetic.json").read_text())["recordings"]
    rec, frame = np.asarray(train._h_rec), np.asarray(train._h_frame)
    val = {(int(r), int(f)) for r, f in zip(rec[v], frame[v])}
    for r, name in enumerate(train.names):
        for seg in info[name]["segments"]:
            if seg["split"] != "train":
                continue
            inside = {(r, f) in val for f in range(seg["start"], seg["end"])}
            assert len(inside) == 1, (name, seg)  # a segment is wholly validation or wholly not


def test_zero_fraction_carves_nothing(train):
    t, v, _ = carve(train, 0.0)
    assert len(v) == 0 and len(t) == len(train)


def test_explicit_list_with_its_guard_gap(train, tmp_path):
    frames = [int(f) for f in np.asarray(train._h_frame)[np.asarray(train._h_rec) == 0][100:110]]
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"furnace_000.mat": frames}))
    t, v, _ = from_file(train, path)
    assert sorted(train.sample_key(int(i))[1] for i in v) == sorted(frames)
    assert (min_gap(train, t, v) >= guard_frames(train)).all()
    assert (np.asarray(train._h_rec)[t] == 1).sum() == (np.asarray(train._h_rec) == 1).sum()  # untouched


@pytest.mark.parametrize("content, says", [
    ('{"nope.mat": [1]}', "nope.mat"),
    ('{"furnace_000.mat": "x"}', "list of integer"),
    ('{"furnace_000.mat": [999999]}', "999999"),
    ("[1, 2]", "expected an object"),
    ("{", "not valid JSON"),
])
def test_bad_validation_list_names_file_and_problem(train, tmp_path, content, says):
    path = tmp_path / "val.json"
    path.write_text(content)
    with pytest.raises(DataError, match="val.json") as e:
        from_file(train, path)
    assert says in str(e.value)


def test_subset_views_share_the_store_and_do_not_flip(train):
    t, v, _ = carve(train, 0.1)
    val, tr = train.subset(v, train=False), train.subset(t, train=True)
    assert val.frames is train.frames and len(val) == len(v) and not val.flips.any()
    assert val.sample_key(0) == train.sample_key(int(v[0]))
    plain = FMFDataset(train.root, split="train", num_frames=4, stride=2, current_seconds=2, train=False)
    for got, want in zip(val[3], plain[int(v[3])]):
        assert (got == want).all()
    assert tr.flips.any()  # the training view draws its flips
