"""The Scorer: a model as a function of a window batch, run through the Predictor in chunks."""
from __future__ import annotations

import torch

from fmfast.detect.scorer import CPU_CHUNK, Scorer
from fmfast.models import build_model
from fmfast.models.config import ModelConfig


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(task="classification", image_size=32, num_frames=4, dim=16, depth=1, heads=2, dim_head=8,
                      mlp_dim=32, current_len=8)
    return build_model("fmformer", cfg).eval()


META = {"model_name": "fmformer", "task": "classification", "data": {}}


def test_a_cpu_scorer_runs_big_batches_in_small_chunks_with_the_same_scores():
    """A call of 40 windows with batch 64 runs as chunks of CPU_CHUNK rows (the last one padded),
    and every window's score is the model's on that window alone."""
    model = tiny_model()
    scorer = Scorer(model, META, "cpu", batch=64)
    assert scorer.predictor.batch_size == CPU_CHUNK < 40
    assert Scorer(model, META, "cpu", batch=8).predictor.batch_size == 8  # a smaller batch is its own chunk

    store = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    index = torch.arange(40)[:, None] + torch.arange(4)[None, :]  # window i: frames i..i+3
    current = torch.randn(40, 8, 3) * 100
    prob, pmap = scorer(store, index, current)
    assert prob.shape == (40,) and pmap is None
    with torch.no_grad():
        clips = store[index].permute(0, 2, 1, 3, 4)  # [B, 3, T, W, H]
        alone = torch.cat([model(clips[i:i + 1], current[i:i + 1]).softmax(1)[:, 1] for i in range(40)])
    torch.testing.assert_close(prob, alone, atol=1e-6, rtol=0)
