"""The bad-input corpus of checkpoints: fmfast checkpoints with a damaged description or
weights, files that are not checkpoints at all, and the reference-code loader given an fmfast
file. Each is one CheckpointError line naming the file and the problem."""
from __future__ import annotations

import pickle

import pytest
import torch

from fmfast.engine import checkpoints as ckpt
from fmfast.errors import CheckpointError
from fmfast.models import FmFormer, ModelConfig, build_model

CFG = ModelConfig(image_size=16, num_frames=4, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=16, current_len=8)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "good.pt"
    torch.manual_seed(0)
    ckpt.save(path, ckpt.model_payload("fmformer", build_model("fmformer", CFG)))
    return path


def _edit(fn):
    def make(good, path):
        obj = torch.load(good, weights_only=True)
        fn(obj)
        torch.save(obj, path)
    return make


def _raw(data: bytes):
    def make(good, path):
        path.write_bytes(data)
    return make


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


BAD = {
    "no model name": (_edit(lambda o: o.pop("model_name")), "unknown model name None"),
    "bad model name": (_edit(lambda o: o.update(model_name="transformer")), "unknown model name 'transformer'"),
    "config missing a key": (_edit(lambda o: o["model_config"].pop("dim")), "missing keys: dim"),
    "config unknown key": (_edit(lambda o: o["model_config"].update(wings=2)), "unknown keys: wings"),
    "config not a dict": (_edit(lambda o: o.update(model_config=[1, 2])), "no model config"),
    "config bad task": (_edit(lambda o: o["model_config"].update(task="detection")), "unusable model config"),
    "config dim is text": (_edit(lambda o: o["model_config"].update(dim="abc")), "cannot build the stored fmformer"),
    "config patch does not divide": (_edit(lambda o: o["model_config"].update(patch_size=5)), "divisible"),
    "no weights": (_edit(lambda o: o.pop("model")), "no weights"),
    "weights missing a key": (_edit(lambda o: o["model"].pop("video_embed.cls_token")), "missing keys (1): video_embed.cls_token"),
    "weights extra key": (_edit(lambda o: o["model"].update(extra=torch.zeros(1))), "unexpected keys (1): extra"),
    "weights wrong shape": (_edit(lambda o: o["model"].update({"video_embed.cls_token": torch.zeros(1, 1, 3)})),
                            "shape differences (1): video_embed.cls_token [1, 1, 3]"),
    "empty file": (_raw(b""), "not a readable PyTorch checkpoint"),
    "random bytes": (_raw(bytes(range(256)) * 8), "not a readable PyTorch checkpoint"),
    "pickled object": (_raw(pickle.dumps(_Evil())), "not a readable PyTorch checkpoint"),
    "a list": (lambda g, p: torch.save([1, 2], p), "expected a dict"),
    "unknown dict": (lambda g, p: torch.save({"x": torch.zeros(2)}, p), "not a reference FMF-Benchmark state_dict"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_one_line(good, tmp_path, case, capsys):
    make, what = BAD[case]
    path = tmp_path / "bad.pt"
    make(good, path)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_model(path)
    msg = str(e.value)
    assert str(path) in msg and what in msg and "\n" not in msg, msg
    assert "pwned" not in capsys.readouterr().out


def test_truncated_checkpoint(good, tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        ckpt.load_model(path)


def test_from_official_on_an_fmfast_checkpoint_names_the_right_loader(good):
    with pytest.raises(CheckpointError) as e:
        FmFormer.from_official(str(good))
    assert "an fmfast checkpoint, not a reference-code state_dict" in str(e.value) and "load_model" in str(e.value)


def test_the_good_checkpoint_loads(good):
    model, meta = ckpt.load_model(good)
    assert meta["model_name"] == "fmformer" and model.config == CFG
