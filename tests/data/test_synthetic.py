"""Synthetic furnace generator: determinism, the V2 layout it writes, and the scenario design
(each modality alone must be fooled somewhere, both together never)."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from fmfast.data import FMFDataset
from fmfast.data.synthetic import generate, main


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def arrays(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted((root / "videos").glob("*.mat")):
        with h5py.File(p, "r") as f:
            out.update({f"{p.stem}/{k}": f[k][()] for k in ("data", "label")})
    return out


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def test_same_seed_same_bytes_other_seed_differs(synth, tmp_path):
    again = generate(tmp_path / "again", recordings=2, frames=600, seed=5, size=16)
    a, b = files(synth), files(again)
    assert a.keys() == b.keys() and len(a) == 9
    for name in a:
        assert a[name] == b[name], name
    other = generate(tmp_path / "other", recordings=2, frames=600, seed=6, size=16)
    x, y = arrays(synth), arrays(other)
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].shape == y[k].shape and not np.array_equal(x[k], y[k]), k
    assert files(synth)["currents/furnace_000.csv"] != files(other)["currents/furnace_000.csv"]


def test_writes_matlab_v73_files(synth):
    for p in (synth / "videos").glob("*.mat"):
        head = p.read_bytes()[:128]
        assert head.startswith(b"MATLAB 7.3 MAT-file") and head[124:128] == b"\x00\x02IM"
        with h5py.File(p, "r") as f:
            assert f["data"].shape == (600, 3, 16, 16) and f["data"].dtype == np.uint8
            assert f["label"].shape == (600, 16, 16) and set(np.unique(f["label"][()])) <= {0, 1}
            assert f["data"].attrs["MATLAB_class"] == b"uint8"


def test_clocks_and_current_log(synth):
    for name in ("furnace_000", "furnace_001"):
        stamps = [r[0] for r in read_csv(synth / "timestamps" / f"{name}.csv")]
        assert len(stamps) == 600
        per_second = Counter(stamps)
        inner = list(per_second.values())[1:-1]  # first and last seconds are partial
        assert min(inner) >= 24 and max(inner) <= 26
        rows = read_csv(synth / "currents" / f"{name}.csv")
        seconds = [r[0] for r in rows]
        assert len(rows) % 2 == 0 and seconds[0::2] == seconds[1::2]  # 2 rows per second
        assert len(set(seconds[0::2])) == len(rows) // 2
        assert set(stamps) <= set(seconds)
        values = np.array([[float(x) for x in r[1:4]] for r in rows])
        assert np.isfinite(values).all() and 5000 < values.min() and values.max() < 15000


def test_splits_cover_frames_by_whole_segments(synth):
    meta = json.loads((synth / "synthetic.json").read_text())["recordings"]
    train = json.loads((synth / "train.json").read_text())
    test = json.loads((synth / "test.json").read_text())
    n_test = 0
    for name, rec in meta.items():
        tr, te = set(train[f"{name}.mat"]), set(test[f"{name}.mat"])
        assert not tr & te and tr | te == set(range(600))
        n_test += len(te)
        for seg in rec["segments"]:
            frames = set(range(seg["start"], seg["end"]))
            assert frames <= (te if seg["split"] == "test" else tr)
    assert 0.1 < n_test / 1200 < 0.4
    for split in ("train", "test"):
        labels = FMFDataset(synth, split=split, num_frames=2, current_seconds=4).labels
        assert 0.1 < labels.float().mean() < 0.5, split  # both classes, roughly balanced


def test_cli_writes_dataset(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--recordings", "1", "--frames", "60", "--seed", "2", "--size", "16"])
    assert "wrote" in capsys.readouterr().out
    ds = FMFDataset(tmp_path / "cli", split="train", num_frames=2, current_seconds=2)
    assert ds.names == ["furnace_000"] and ds.frames.shape[1:] == (3, 16, 16)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--frames", "10"])


@pytest.fixture(scope="module")
def furnace32(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("f32"), recordings=1, frames=3600, seed=11, size=32)
    meta = json.loads((root / "synthetic.json").read_text())["recordings"]["furnace_000"]
    with h5py.File(root / "videos" / "furnace_000.mat", "r") as f:
        video, label = f["data"][()], f["label"][()]
    rows = read_csv(root / "currents" / "furnace_000.csv")
    amps = np.array([[float(x) for x in r[1:4]] for r in rows])
    first_row = {}
    for j, r in enumerate(rows):
        first_row.setdefault(r[0], j)
    stamps = [r[0] for r in read_csv(root / "timestamps" / "furnace_000.csv")]
    return meta["segments"], video, label, amps, first_row, stamps


def test_scenario_evidence_per_modality(furnace32):
    """At each event's midpoint: the current is imbalanced exactly for anomalies and load
    disturbances, the video shows hot pixels exactly for visible anomalies and glare, a hidden
    anomaly is masked but barely visible, and only anomalies carry mask pixels."""
    segments, video, label, amps, first_row, stamps = furnace32
    kinds = {s["kind"] for s in segments}
    assert {"anomaly", "hidden", "glare", "disturbance", "mist"} <= kinds
    for s in segments:
        a, b = s["event"]
        t = (a + b) // 2
        j = first_row[stamps[t]]
        cur = amps[j:j + 2]
        imbalance = float((cur.min(1) / cur.mean(1)).mean())
        img = video[t].astype(int)  # [3, W, H]
        hot = int(((img[0] > 200) & (img[0] - img[2] > 100))[:, 12:].sum())  # below the furnace mouth
        mask = label[t] > 0
        kind = s["kind"]
        assert (imbalance < 0.9) == (kind in ("anomaly", "hidden", "disturbance")), (kind, imbalance)
        assert (mask.sum() > 0) == (kind in ("anomaly", "hidden")), kind
        if kind in ("anomaly", "glare"):
            assert hot >= 5, (kind, hot)
        else:
            assert hot <= 2, (kind, hot)
        if kind in ("anomaly", "hidden"):
            contrast = img[0][mask].mean() - img[0][~mask].mean()
            assert (contrast > 80) if kind == "anomaly" else (contrast < 30), (kind, contrast)


def test_masks_only_inside_anomaly_events(furnace32):
    segments, _, label, *_ = furnace32
    abnormal = label.reshape(len(label), -1).any(1)
    inside = np.zeros(len(label), bool)
    for s in segments:
        if s["kind"] in ("anomaly", "hidden"):
            inside[s["event"][0]:s["event"][1]] = True
    assert not (abnormal & ~inside).any()
    assert abnormal[inside].mean() > 0.9  # a spot is on for nearly its whole event


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="frames"):
        generate(tmp_path, frames=10)
    with pytest.raises(ValueError, match="size"):
        generate(tmp_path, size=20)
