"""tools/kernel_report.py without a GPU: every kernel variant compiled for sm_90 through the
kernels' own host code, and the resource targets read off ptxas and the SASS.

The report compiles in a subprocess (Triton reads TRITON_INTERPRET when a kernel is defined, and
this suite runs the kernels interpreted). Paper shape: B=256, bf16 autocast, the training step's
frame-store tokenizer and both attention phases."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMEM_LIMIT = 227 * 1024  # sm_90: the most shared memory one block may use
FIELDS = ("kernel", "variant", "dtype", "regs", "spill_bytes", "smem_bytes", "blocks_per_sm", "mma", "est_us")


def _run_report(tmp: Path, *args: str) -> tuple[list, dict | None, str]:
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    rows, comp = tmp / "rows.json", tmp / "components.json"
    p = subprocess.run([sys.executable, str(ROOT / "tools/kernel_report.py"), "--json", str(rows),
                        "--components", str(comp), *args], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(rows.read_text()), json.loads(comp.read_text()) if comp.exists() else None, p.stdout


@pytest.fixture(scope="module")
def paper_bf16(tmp_path_factory):
    """The report at the paper shape in bf16 (the training step's dtype), run once."""
    return _run_report(tmp_path_factory.mktemp("kernel_report"), "--dtypes", "bfloat16")


@pytest.mark.slow
def test_dkdv_launch_settings_change_the_dkdv_programs_only(paper_bf16, tmp_path):
    """--dkdv compiles the attention backward's dk/dv programs with other launch settings (the
    A/B lead on paper); every other launch compiles as before."""
    rows, _, out = _run_report(tmp_path, "--dtypes", "bfloat16", "--dkdv", "num_stages=1")
    assert "dk/dv programs compiled with {'num_stages': 1}" in out
    base = {(r["kernel"], r["variant"]): r for r in paper_bf16[0]}
    assert set(base) == {(r["kernel"], r["variant"]) for r in rows}
    for r in rows:
        b = base[(r["kernel"], r["variant"])]
        if r["kernel"] == "attn_bwd_dkdv":
            assert r["regs"] != b["regs"], r  # a single stage holds no prefetched tile
        else:
            assert (r["regs"], r["smem_bytes"]) == (b["regs"], b["smem_bytes"]), r


@pytest.mark.slow
def test_report_covers_every_launch_with_the_promised_fields(paper_bf16):
    rows, comp, md = paper_bf16
    kinds = {(r["kernel"], r["shape"].get("source"), r["shape"].get("cross")) for r in rows}
    for k in ("tokenize_prep", "tokenize_fwd", "tokenize_bwd_tok", "tokenize_bwd_w", "tokenize_bwd_sum"):
        assert {(k, "clip", None), (k, "store", None)} <= kinds, kinds
    attn = {r["kernel"] for r in rows if r["kernel"].startswith("attn")}
    assert "attn_fwd" in attn and any("bwd" in k for k in attn), attn
    for r in rows:
        assert all(f in r for f in FIELDS), sorted(r)
        assert r["regs"] > 0 and r["est_us"] > 0 and r["arch"].startswith("sm_90"), r
    assert "| target (cost model) |" in md and "| tokenize_fwd |" in md
    # the cost model's components: ours and the peers at the paper shape, positive and finite
    for part in ("tokenizer_us", "attention_layer_us", "step_us"):
        assert all(0 < v < 1e7 for v in comp[part].values()), comp[part]


def _gemm_kernel(name: str) -> bool:
    # the launches without a tl.dot: prep permutes the weights, bwd_tok reads the saved z, bwd_sum
    # reduces the partials
    return name not in ("tokenize_prep", "tokenize_bwd_tok", "tokenize_bwd_sum")


@pytest.mark.slow
def test_bf16_paper_variants_have_no_spills_two_blocks_per_sm_and_wgmma(paper_bf16):
    """The issue's occupancy target for every bf16 launch at the paper shape: no spills, at least 2
    resident blocks per SM, and every GEMM on wgmma (HGMMA in the SASS; HMMA alone is mma.sync,
    FFMA alone is no tensor core)."""
    rows, _, _ = paper_bf16
    short = []
    for r in rows:
        why = []
        if r["spill_bytes"]:
            why.append(f"{r['spill_bytes']} B spilled")
        if r["blocks_per_sm"] < 2:
            why.append(f"{r['blocks_per_sm']} block/SM ({r['regs']} regs, {r['smem_bytes']} B smem)")
        if _gemm_kernel(r["kernel"]) and ("HGMMA" not in r["mma"] or "HMMA" in r["mma"]):
            why.append(f"MMA {r['mma'] or 'none'} (every GEMM on HGMMA)")
        if why:
            short.append(f"{r['kernel']} [{r['variant']}]: " + ", ".join(why))
    assert not short, "bf16 paper-shape launches short of the target:\n" + "\n".join(short)


@pytest.mark.slow
def test_every_promised_size_fits_shared_memory_and_launches(tmp_path):
    """The dtypes and widths the docstrings promise (tokenizer D <= 1024, attention head dims
    16..128) fit sm_90's 227 KB per block -- checked at the widest width of each tile bucket in
    fp32 and at the widest in bf16 (tools/kernel_variants.sweep says why that bounds the rest;
    ``--full-sweep`` compiles them all) -- and the attention grid launches a batch whose
    batch x heads is past grid axis 1's 65535."""
    rows, _, _ = _run_report(tmp_path, "--sweep-only")
    over = [f"{r['kernel']} [{r['variant']}]: {r['smem_bytes']} B" for r in rows if r["smem_bytes"] > SMEM_LIMIT]
    assert not over, "over sm_90's shared-memory limit:\n" + "\n".join(over)
    bad_grid = [f"{r['kernel']} [{r['variant']}]: grid {r['grid']}" for r in rows if not r["grid_ok"]]
    assert not bad_grid, "grids that cannot launch:\n" + "\n".join(bad_grid)
    assert {r["dtype"] for r in rows} >= {"bf16", "fp32"}
    assert max(r["shape"].get("dim", 0) for r in rows) == 1024
    assert max(r["shape"]["batch"] * r["shape"].get("heads", 1) for r in rows) > 65535


_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, R5 ;
        /*0020*/                   FADD R6, R6, R7 ;
        /*0030*/                   HGMMA.64x32x16.F32.BF16 R8, gdesc[UR4], R8 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   IADD3 R9, R9, 0x1, RZ ;
        /*0060*/              @!P1 BRA 0x10 ;
        /*0070*/                   BRA 0x90 ;
        /*0080*/                   NOP ;
        /*0090*/                   EXIT ;
"""


def test_loop_bodies_count_nested_loops_once_and_issue_slots_add_up():
    """tools/sm90.loop_bodies on a hand-made SASS listing: an inner loop (0x20-0x40, 3
    instructions) inside an outer one (0x10-0x60: 3 more of its own); a forward branch is no
    loop. tools/kernel_costs.issue_ops: bodies x trips + the 4 instructions in no loop once per
    program, x warps x 32 lanes."""
    from tools import kernel_costs as kc
    from tools import sm90
    assert sm90.loop_bodies(_SASS) == [3, 3]
    res = dict(loops=[3, 3], instrs=10, num_warps=4)
    assert kc.issue_ops(res, [100, 10], 2) == 32 * 4 * (3 * 100 + 3 * 10 + 4 * 2)
    # a kernel the compiler shaped differently: every instruction at the most trips (upper bound)
    assert kc.issue_ops(dict(res, loops=[6]), [100, 10], 2) == 32 * 4 * 10 * 100


@pytest.mark.parametrize("args, says", [
    (["--dtypes", "float8"], "--dtypes: float8 is not one of bfloat16, float32"),
    (["--json", "{file}/rows.json"], "is not a folder"),
    (["--dkdv", "num_stages=one"], "--dkdv: 'num_stages=one' is not KEY=INT"),
    (["--dkdv", "block_m=64"], "with KEY one of num_warps, num_stages, maxnreg"),
])
def test_bad_arguments_fail_in_one_line_before_compiling(tmp_path, args, says):
    """A wrong dtype, or an output under a file, is refused with one line and exit code 2 before
    anything compiles (which takes a while), and nothing is written."""
    f = tmp_path / "a_file"
    f.write_text("x")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, str(ROOT / "tools/kernel_report.py"), *[a.format(file=f) for a in args]],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout[-500:])
    assert p.stderr.strip().count("\n") == 0 and says in p.stderr, p.stderr
    assert f.read_text() == "x"
