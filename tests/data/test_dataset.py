"""FMFDataset: sample semantics against hand-computed indices, batching, flips, V1, bad input."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from helpers.tiny_data import H, TINY_TRAIN, W, tiny_frames
from fmfast.data import DataError, FMFDataset
from fmfast.data.matfile import write_mat
from fmfast.data.window import resample_rows


def tiny(root, **kw):
    kw.setdefault("train", False)
    return FMFDataset(root, num_frames=kw.pop("num_frames", 4), stride=kw.pop("stride", 2),
                      current_seconds=kw.pop("current_seconds", 3), **kw)


def clip_frames(clip):
    """Frame numbers a clip was made from (channel 0 holds the frame index)."""
    return clip[0, :, 0, 0].tolist()


# ---- sample semantics ------------------------------------------------------------------------
def test_samples_ordered_by_recording_name(tiny_v2):
    ds = tiny(tiny_v2)
    assert ds.layout == "v2" and ds.names == ["a", "b"]
    assert len(ds) == 8
    keys = [ds.sample_key(i) for i in range(len(ds))]
    assert keys == [("a", f) for f in TINY_TRAIN["a.mat"]] + [("b", f) for f in TINY_TRAIN["b.mat"]]
    assert ds.sample_key(-1) == ("b", 19)


@pytest.mark.parametrize("sample, frames", [
    (0, [0, 0, 0, 0]),      # a:0, everything clamps to frame 0
    (1, [0, 0, 0, 1]),      # a:1
    (2, [0, 1, 3, 5]),      # a:5, 5-6 = -1 clamps
    (4, [23, 25, 27, 29]),  # a:29
    (7, [13, 15, 17, 19]),  # b:19
])
def test_clip_frames_clamp_and_stride(tiny_v2, sample, frames):
    ds = tiny(tiny_v2)
    clip, _, _ = ds[sample]
    assert clip.shape == (3, 4, W, H) and clip.dtype == torch.uint8
    assert clip_frames(clip) == frames
    assert (clip[2] == (0 if sample < 5 else 1)).all()  # from the right recording
    # spatial content untouched: channel 1 is 16*w + h
    assert torch.equal(clip[1, 0].long(), 16 * torch.arange(W)[:, None] + torch.arange(H)[None])
    offset = int(ds.frame_offsets[0 if sample < 5 else 1])
    assert (ds.frame_index([sample])[0] - offset).tolist() == frames


def test_clip_stride_one_default_length(tiny_v2):
    ds = FMFDataset(tiny_v2, num_frames=10, stride=1, current_seconds=3, train=False)
    assert clip_frames(ds[4][0]) == list(range(20, 30))
    assert clip_frames(ds[3][0]) == list(range(3, 13))


@pytest.mark.parametrize("seconds, sample, rows", [
    (3, 0, [0, 1, 2, 3, 4, 5]),           # a:0, second 0 = pair 2 of a log from second -2
    (3, 3, [2, 3, 4, 5, 6, 7]),           # a:12, second 1
    (3, 4, [4, 5, 6, 7, 8, 9]),           # a:29, second 2
    (3, 5, [0, 0, 0, 0, 0, 1]),           # b:0, 2 rows stretched to 6: trunc(linspace(0, 1, 6))
    (3, 6, [0, 0, 0, 0, 0, 1]),           # b:3, same second
    (3, 7, [0, 0, 1, 1, 2, 3]),           # b:19, 4 rows: trunc([0, .6, 1.2, 1.8, 2.4, 3])
    (4, 0, [0, 0, 1, 2, 2, 3, 4, 5]),     # a:0, 6 rows to 8: trunc(linspace(0, 5, 8))
    (4, 4, [2, 3, 4, 5, 6, 7, 8, 9]),     # a:29, full 8-row history
    (4, 7, [0, 0, 0, 1, 1, 2, 2, 3]),     # b:19, trunc(linspace(0, 3, 8))
])
def test_current_window_alignment_and_resampling(tiny_v2, seconds, sample, rows):
    ds = tiny(tiny_v2, current_seconds=seconds)
    _, current, _ = ds[sample]
    assert current.shape == (2 * seconds, 3) and current.dtype == torch.float32
    assert current[:, 0].long().tolist() == rows
    assert (current[:, 1] == (0 if sample < 5 else 1)).all() and (current[:, 2] == 7).all()


def test_resample_rows_is_numpy_linspace_truncated():
    for n in range(1, 240):
        assert np.array_equal(resample_rows(n, 240), np.linspace(0, n - 1, 240).astype(np.int32))
    assert np.array_equal(resample_rows(240, 240), np.arange(240))
    assert resample_rows(1, 4).tolist() == [0, 0, 0, 0]


def test_class_labels(tiny_v2):
    train, test = tiny(tiny_v2), tiny(tiny_v2, split="test")
    assert train.labels.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert test.labels.tolist() == [0, 0, 1, 0]
    assert [int(train[i][2]) for i in range(len(train))] == train.labels.tolist()
    assert train[3][2].dtype == torch.int64 and train[3][2].ndim == 0


def test_segmentation_masks(tiny_v2):
    ds = tiny(tiny_v2, task="segmentation")
    mask = ds[3][2]  # a:12, stored value 255
    assert mask.shape == (W, H) and mask.dtype == torch.int64
    expect = torch.zeros(W, H, dtype=torch.int64)
    expect[1, 0] = 1
    assert torch.equal(mask, expect)
    assert int(ds[0][2].sum()) == 0
    assert ds.labels.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]


# ---- flips -------------------------------------------------------------------------------------
def test_flip_is_last_axis_of_clip_and_mask(tiny_v2):
    plain = tiny(tiny_v2, task="segmentation")
    for seed in range(20):  # find a seed that flips sample 3 (a:12, the abnormal one)
        ds = tiny(tiny_v2, task="segmentation", train=True, seed=seed)
        if ds.flips[3]:
            break
    assert ds.flips[3]
    for i in range(len(ds)):
        clip, cur, mask = ds[i]
        ref_clip, ref_cur, ref_mask = plain[i]
        flip = bool(ds.flips[i])
        assert torch.equal(clip, ref_clip.flip(-1) if flip else ref_clip)
        assert torch.equal(mask, ref_mask.flip(-1) if flip else ref_mask)
        assert torch.equal(cur, ref_cur)
    clip, _, mask = ds[3]
    assert torch.equal(clip[1, 0].long(), 16 * torch.arange(W)[:, None] + (H - 1 - torch.arange(H))[None])
    assert mask[1, H - 1] == 1 and int(mask.sum()) == 1


def test_no_flips_outside_training(tiny_v2):
    assert not tiny(tiny_v2, split="train", train=False).flips.any()
    assert not FMFDataset(tiny_v2, split="test", num_frames=2, current_seconds=2).flips.any()
    assert FMFDataset(tiny_v2, split="train", num_frames=2, current_seconds=2).train


def test_flips_reproducible_per_seed_and_epoch(synth):
    a = FMFDataset(synth, train=True, seed=1, num_frames=2, current_seconds=4)
    b = FMFDataset(synth, train=True, seed=1, num_frames=2, current_seconds=4)
    c = FMFDataset(synth, train=True, seed=2, num_frames=2, current_seconds=4)
    e0 = a.flips.clone()
    assert torch.equal(e0, b.flips)
    assert not torch.equal(e0, c.flips)
    assert 0.4 < e0.float().mean() < 0.6
    a.set_epoch(1)
    b.set_epoch(1)
    assert torch.equal(a.flips, b.flips) and not torch.equal(a.flips, e0)
    a.set_epoch(0)
    assert torch.equal(a.flips, e0)


def test_frame_index_marks_flipped_samples_and_the_store_has_no_mirrored_copy(tiny_v2):
    from fmfast.data.gather import gather_clip

    ds = tiny(tiny_v2, train=True, seed=3)
    assert ds.frames.shape[0] == ds.num_store_frames == int(ds.frame_offsets[-1])
    assert ds.flips.any() and not ds.flips.all()
    g = ds.frame_index(range(len(ds)))
    assert torch.equal((g < 0).all(1), ds.flips) and torch.equal((g < 0).any(1), ds.flips)
    clips = gather_clip(ds.frames, g)  # [B, 3, T, W, H]
    for i in range(len(ds)):
        assert torch.equal(clips[i], ds[i][0])  # ds[i] flips its clip itself (the definition)


def test_flip_rows_cpu_loop_and_gpu_where_agree():
    from fmfast.data.gather import flip_rows, mirror_where

    x = torch.randint(0, 255, (5, 3, 2, 4, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flips = torch.tensor([True, False, False, True, True])
    want = torch.stack([x[b].flip(-1) if flips[b] else x[b] for b in range(5)])
    assert torch.equal(mirror_where(x, flips), want)
    assert torch.equal(flip_rows(x.clone(), flips), want)


# ---- batching ----------------------------------------------------------------------------------
def load_corpus(ds):
    """A fresh load of the dataset's files (what the definition below reads)."""
    from fmfast.data.v1 import load_v1
    from fmfast.data.v2 import load_v2

    return (load_v2 if ds.layout == "v2" else load_v1)(ds.root, ds.split, masks=ds.task == "segmentation")


def sample_by_definition(ds, c, i):
    """Sample i straight from the definition, one at a time, from the loaded files ``c``:
    clip frames f-(T-1)s .. f clamped at the recording's frame 0, the 2S current rows of the S
    seconds ending at f's second (index-resampled when fewer exist), the label, the flip."""
    from fmfast.data.window import clip_offsets

    r, f = int(c.sample_recording[i]), int(c.sample_frame[i])
    first = int(c.frame_offsets[r])
    ids = first + np.maximum(f - clip_offsets(ds.num_frames, ds.stride).numpy(), 0)
    clip = c.frames[torch.from_numpy(ids)]  # [T, 3, W, H]
    L = 2 * ds.current_seconds
    end = int(c.row_end[first + f])
    start = max(end - L, int(c.row_offsets[r]))
    current = c.currents[torch.from_numpy(start + resample_rows(end - start, L))]
    label = torch.tensor(int(c.frame_labels[first + f])) if ds.task == "classification" else c.masks[first + f].long()
    if ds.flips[i]:
        clip, label = clip.flip(-1), (label.flip(-1) if label.ndim else label)
    return clip.permute(1, 0, 2, 3), current, label


def assert_batch_is_stacked_definition(ds, idx):
    clips, currents, labels = ds.batch(idx)
    n = len(ds)
    c = load_corpus(ds)
    items = [sample_by_definition(ds, c, int(i) % n) for i in idx]
    for got, k in ((clips, 0), (currents, 1), (labels, 2)):
        assert torch.equal(got, torch.stack([it[k] for it in items]).to(got.dtype)), k
    assert clips.is_contiguous() and clips.dtype == torch.uint8
    first = ds[int(idx[0])]  # ds[i] is batch([i])'s sample
    assert all(torch.equal(a, b[0]) for a, b in zip(first, (clips, currents, labels)))
    return clips, currents, labels


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("train", [False, True])
def test_batch_equals_the_definition_tiny(tiny_v2, task, train):
    ds = tiny(tiny_v2, task=task, train=train, seed=4)
    idx = [7, 0, 3, 3, 5, -1, 4]
    clips, currents, labels = assert_batch_is_stacked_definition(ds, idx)
    assert clips.shape == (7, 3, 4, W, H) and currents.shape == (7, 6, 3)
    assert labels.shape == ((7,) if task == "classification" else (7, W, H))


@pytest.mark.parametrize("stride", [1, 5])
def test_batch_equals_the_definition_synth(synth, stride):
    ds = FMFDataset(synth, num_frames=10, stride=stride, current_seconds=120, task="segmentation", seed=9)
    idx = torch.randint(0, len(ds), (64,), generator=torch.Generator().manual_seed(0))
    clips, currents, labels = assert_batch_is_stacked_definition(ds, idx)
    assert clips.shape == (64, 3, 10, 16, 16) and currents.shape == (64, 240, 3)
    assert torch.equal(labels.flatten(1).amax(1), ds.labels[idx])


def test_batch_index_forms_and_bounds(tiny_v2):
    ds = tiny(tiny_v2)
    ref = ds.batch([1, 2])
    for form in (np.array([1, 2]), torch.tensor([1, 2]), (1, 2)):
        assert all(torch.equal(a, b) for a, b in zip(ds.batch(form), ref))
    with pytest.raises(IndexError):
        ds.batch([8])
    with pytest.raises(IndexError):
        ds[-9]


@pytest.mark.gpu
def test_to_device_moves_everything(tiny_v2):
    ds = tiny(tiny_v2, train=True, seed=1)
    assert ds.to("cpu") is ds and ds.device.type == "cpu"
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to move to")
    ref = ds.batch(range(len(ds)))
    ds.to("cuda")
    got = ds.batch(torch.arange(len(ds)))
    assert all(g.device.type == "cuda" for g in got)
    assert all(torch.equal(g.cpu(), r) for g, r in zip(got, ref))
    assert torch.equal(ds[3][0].cpu(), ref[0][3])


def test_argument_errors(tiny_v2):
    with pytest.raises(ValueError, match="split"):
        FMFDataset(tiny_v2, split="val")
    with pytest.raises(ValueError, match="task"):
        FMFDataset(tiny_v2, task="detection")
    with pytest.raises(ValueError, match="num_frames"):
        FMFDataset(tiny_v2, num_frames=0)
    with pytest.raises(ValueError, match="stride"):
        FMFDataset(tiny_v2, stride=0)


# ---- V1 layout ---------------------------------------------------------------------------------
def write_v1(path, n=25, test_from=20, r=0):
    idx = (np.arange(n) >= test_from).astype(np.float64)[:, None]  # MATLAB [1, N] -> h5py [N, 1]
    label = np.zeros((n, W, H), np.uint8)
    label[7, 2, 3] = 1
    current = np.stack([np.arange(n), np.full(n, r), np.full(n, 7)], 1).astype(np.float64)
    write_mat(path, {"video": tiny_frames(n, r), "current": current, "label": label, "train_test_index": idx})
    return path


def test_v1_single_file(tmp_path):
    path = write_v1(tmp_path / "v1a.mat")
    ds = tiny(path)
    assert ds.layout == "v1" and ds.names == ["v1a"] and len(ds) == 20
    clip, current, label = ds[5]
    assert clip.shape == (3, 4, W, H)  # same [3, T, W, H] order as V2
    assert clip_frames(clip) == [0, 1, 3, 5]
    assert torch.equal(clip[1, 0].long(), 16 * torch.arange(W)[:, None] + torch.arange(H)[None])
    assert current[:, 0].long().tolist() == [0, 1, 2, 3, 4, 5]  # one row per frame, ending at frame 5
    assert ds[2][1][:, 0].long().tolist() == [0, 0, 0, 1, 1, 2]  # 3 rows stretched to 6
    assert ds[19][1][:, 0].long().tolist() == [14, 15, 16, 17, 18, 19]
    assert ds.labels.tolist() == [int(f == 7) for f in range(20)]
    test = tiny(path, split="test", task="segmentation")
    assert [test.sample_key(i) for i in range(len(test))] == [("v1a", f) for f in range(20, 25)]
    seg = tiny(path, task="segmentation")
    assert seg[7][2][2, 3] == 1 and int(seg[7][2].sum()) == 1
    assert_batch_is_stacked_definition(tiny(path, train=True, seed=2), list(range(20)))


def test_v1_folder_sorted_by_name(tmp_path):
    write_v1(tmp_path / "z.mat", n=12, test_from=10, r=1)
    write_v1(tmp_path / "m.mat", n=25, test_from=20, r=0)
    ds = tiny(tmp_path)
    assert ds.names == ["m", "z"] and len(ds) == 30
    clip, current, _ = ds[29]  # z:9
    assert clip_frames(clip) == [3, 5, 7, 9] and (clip[2] == 1).all()
    assert current[:, 0].long().tolist() == [4, 5, 6, 7, 8, 9] and (current[:, 1] == 1).all()


def test_matlab_header_and_classes(tmp_path):
    path = write_v1(tmp_path / "h.mat")
    head = path.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head[124:128] == b"\x00\x02IM"
    with h5py.File(path, "r") as f:
        assert f["video"].attrs["MATLAB_class"] == b"uint8"
        assert f["current"].attrs["MATLAB_class"] == b"double"


# ---- bad input ---------------------------------------------------------------------------------
def rewrite_mat(path, **change):
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in f}
    arrays.update(change)
    path.unlink()
    write_mat(path, {k: v for k, v in arrays.items() if v is not None})


def edit_lines(path, fn):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


def set_split(root, split, **entries):
    m = json.loads((root / f"{split}.json").read_text())
    m.update({f"{k}.mat": v for k, v in entries.items()})
    (root / f"{split}.json").write_text(json.dumps(m))


BAD = {
    "missing folder": (lambda r: shutil.rmtree(r / "currents"), "currents", "missing folder"),
    "missing current file": (lambda r: (r / "currents" / "b.csv").unlink(), "b.csv", "not found"),
    "missing timestamps file": (lambda r: (r / "timestamps" / "a.csv").unlink(), "a.csv", "not found"),
    "missing split file": (lambda r: (r / "train.json").unlink(), "train.json", "not found"),
    "no videos": (lambda r: [p.unlink() for p in (r / "videos").glob("*.mat")], "videos", "no .mat"),
    "mat without data": (lambda r: rewrite_mat(r / "videos" / "a.mat", data=None), "a.mat", "'data'"),
    "mat without label": (lambda r: rewrite_mat(r / "videos" / "b.mat", label=None), "b.mat", "'label'"),
    "mat not hdf5": (lambda r: (r / "videos" / "a.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200)),
                     "a.mat", "v7.3"),
    "data not 3 channels": (lambda r: rewrite_mat(r / "videos" / "a.mat", data=np.zeros((30, 4, W, H), np.uint8)),
                            "a.mat", "'data' has shape"),
    "label shape": (lambda r: rewrite_mat(r / "videos" / "a.mat", label=np.zeros((30, W, H + 1), np.uint8)),
                    "a.mat", "'label' has shape"),
    "label frames": (lambda r: rewrite_mat(r / "videos" / "b.mat", label=np.zeros((19, W, H), np.uint8)),
                     "b.mat", "'label' has shape"),
    "frame size differs": (lambda r: rewrite_mat(r / "videos" / "b.mat", data=np.zeros((20, 3, W, W), np.uint8),
                                                 label=np.zeros((20, W, W), np.uint8)), "b.mat", "frame shape"),
    "timestamps too short": (lambda r: edit_lines(r / "timestamps" / "a.csv", lambda l: l[:-1]),
                             "a.csv", "29 timestamps but a.mat has 30 frames"),
    "timestamps empty": (lambda r: (r / "timestamps" / "b.csv").write_text("timestamp\n"), "b.csv", "no data rows"),
    "labelled frame without currents": (lambda r: edit_lines(r / "currents" / "a.csv", lambda l: l[:-4]),
                                        "currents/a.csv", "no current rows for second"),
    "nan current": (lambda r: edit_lines(r / "currents" / "a.csv", lambda l: l[:3] + [l[3].rsplit(",", 1)[0] + ",nan"]
                                         + l[4:]), "a.csv", "line 4: current is NaN"),
    "empty current": (lambda r: edit_lines(r / "currents" / "b.csv", lambda l: l[:2] + [l[2].rsplit(",", 1)[0] + ","]
                                           + l[3:]), "b.csv", "line 3: non-numeric"),
    "text current": (lambda r: edit_lines(r / "currents" / "b.csv", lambda l: l[:5] + [l[5].replace(",1,", ",x1,")]
                                          + l[6:]), "b.csv", "line 6: non-numeric current 'x1'"),
    "odd current rows": (lambda r: edit_lines(r / "currents" / "b.csv", lambda l: l[:-1]), "b.csv", "even"),
    "too few current columns": (lambda r: edit_lines(r / "currents" / "b.csv", lambda l: l[:2] + [l[2].rsplit(",", 1)[0]]
                                                     + l[3:]), "b.csv", "line 3: 3 columns"),
    "split unknown recording": (lambda r: set_split(r, "train", zzz=[0]), "train.json", "unknown recording 'zzz.mat'"),
    "split frame out of range": (lambda r: set_split(r, "train", b=[0, 20]), "train.json", "frame 20 out of range"),
    "split negative frame": (lambda r: set_split(r, "train", a=[-1]), "train.json", "frame -1 out of range"),
    "split not integers": (lambda r: set_split(r, "train", a=["3"]), "train.json", "integer"),
    "split not json": (lambda r: (r / "train.json").write_text("{a.mat: [1]"), "train.json", "not valid JSON"),
    "split empty": (lambda r: (r / "train.json").write_text("{}"), "train.json", "no labelled frames"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_data_error(tiny_copy, case):
    mutate, where, what = BAD[case]
    mutate(tiny_copy)
    with pytest.raises(DataError) as e:
        tiny(tiny_copy)
    msg = str(e.value)
    assert where in msg and what in msg, msg


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="not found"):
        FMFDataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no V1 .mat files"):
        FMFDataset(tmp_path)


V1_BAD = {
    "no current": (dict(current=None), "'current'"),
    "current shape": (dict(current=np.zeros((24, 3))), "'current' has shape"),
    "current nan": (dict(current=np.full((25, 3), np.nan)), "NaN"),
    "index values": (dict(train_test_index=np.full((25, 1), 2.0)), "train_test_index"),
    "index length": (dict(train_test_index=np.zeros((24, 1))), "train_test_index"),
    "video channels": (dict(video=np.zeros((25, 1, W, H), np.uint8)), "'video' has shape"),
}


@pytest.mark.parametrize("case", list(V1_BAD))
def test_v1_bad_input(tmp_path, case):
    change, what = V1_BAD[case]
    path = write_v1(tmp_path / "bad.mat")
    rewrite_mat(path, **change)
    with pytest.raises(DataError) as e:
        tiny(path)
    assert "bad.mat" in str(e.value) and what in str(e.value), str(e.value)
