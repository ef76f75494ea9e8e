"""Without Triton (macOS, Windows, a CPU-only install) fmfast imports and runs its reference and
fused paths with the same numbers; only launching a kernel is an error, and one that says why."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from helpers.models import model_inputs
from fmfast.models import build_model, call
from fmfast.models.config import ModelConfig

TESTS = Path(__file__).resolve().parents[1]
CFG = dict(task="segmentation", image_size=32, num_frames=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=32,
           current_len=8, seg_hidden_dims=(8, 8, 8))

CHILD = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # `import triton` now raises ImportError, as where it is not installed
    import torch
    torch.set_num_threads(1)  # as the test process: the same reduction order
    from helpers.models import model_inputs
    from fmfast.kernels import tokenize, attention
    from fmfast.kernels.triton_shim import HAVE_TRITON
    from fmfast.models import build_model, call
    from fmfast.models.config import ModelConfig
    from fmfast.nn.backend import implementation
    assert not HAVE_TRITON
    assert implementation("fast", torch.device("cuda")) == "fused"
    torch.manual_seed(0)
    cfg = ModelConfig(**{cfg})
    m = build_model("fmformer", cfg).eval()
    x = model_inputs(cfg)
    out = {{}}
    with torch.no_grad():
        for b in ("reference", "auto", "fast"):
            m.set_backend(b)
            out[b] = call(m, "fmformer", *x)
    torch.save(out, sys.argv[1])
    try:
        tokenize._tokenize_fwd[(1,)]()
    except ImportError as e:
        print("launch:", e)
""")


def test_without_triton_the_model_runs_the_same(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-c", CHILD.format(cfg=CFG), str(tmp_path / "out.pt")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "launch: " in p.stdout and "Triton is not installed" in p.stdout, p.stdout
    torch.manual_seed(0)
    cfg = ModelConfig(**CFG)
    m = build_model("fmformer", cfg).eval().set_backend("reference")
    with torch.no_grad():
        want = call(m, "fmformer", *model_inputs(cfg))
    got = torch.load(tmp_path / "out.pt")
    assert torch.equal(got["reference"], want)  # the same ops, the same bits
    for b in ("auto", "fast"):  # the fused path (SDPA) within fp32 rounding
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
