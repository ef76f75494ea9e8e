"""fmfast.evaluate.evaluate: the examples it keeps for the mask overlays."""
import torch
from torch import nn

from fmfast.data import FMFDataset
from fmfast.engine.evaluation import evaluate


class AllNormal(nn.Module):
    """Predicts "normal" everywhere, so only the true masks decide what is abnormal."""

    def forward(self, video, current, frame_index=None):  # a clip, or a frame store + frame table
        out = torch.zeros(current.shape[0], 2, *video.shape[-2:])
        out[:, 0] = 1
        return out


def test_examples_are_mostly_abnormal_and_spread_over_the_split(synth):
    ds = FMFDataset(synth, split="test", task="segmentation", num_frames=4, current_seconds=8)
    abnormal = [i for i in range(len(ds)) if ds[i][2].any()]
    assert len(abnormal) >= 6, "the fixture should hold abnormal test frames"
    metrics, ex = evaluate(AllNormal(), "fmformer", ds, batch_size=16, device=torch.device("cpu"), keep=8)
    assert metrics["samples"] == len(ds)
    flags = ex["labels"].flatten(1).amax(1) > 0
    assert len(flags) == 8 and bool(flags[:6].all()) and not bool(flags[6:].any())  # 3/4 abnormal, then normal
    assert len({ds.sample_key(int(i))[0] for i in range(len(ds))}) == 1 or len({k[0] for k in ex["keys"]}) > 1
    assert torch.equal(ex["pred"], torch.zeros_like(ex["pred"]))
    for clip, key, label in zip(ex["clips"], ex["keys"], ex["labels"]):  # each example is the sample it names
        i = next(j for j in range(len(ds)) if ds.sample_key(j) == key)
        assert torch.equal(clip, ds[i][0]) and torch.equal(label, ds[i][2])
