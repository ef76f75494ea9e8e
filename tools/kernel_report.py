"""Compiled-resource report and cost model of fmfast's Triton kernels for an H200, without a GPU.

    python tools/kernel_report.py [--sweep | --sweep-only] [--dtypes bfloat16,float32] [--json FILE]
                                  [--components FILE] [--markdown FILE] [--dkdv num_stages=1,...]

Compiles every kernel variant the model launches at the paper shape (tools/kernel_variants.py),
through the kernels' own host code, for sm_90 (tools/sm90.py), reads ptxas -v and the SASS, and
prints per launch: registers, spills, stack, shared memory, blocks per SM and occupancy, the MMA
instruction kinds, global load widths, the grid against 132 SMs, and the cost model's time
(tools/cost_model.py, tools/kernel_costs.py). Then the components against their peers and
targets: tokenizer fwd+bwd, one encoder layer's attention, the whole training step and an epoch.
``--sweep`` adds every width the docstrings promise (small batch) for the shared-memory limit.
``--dkdv KEY=INT,...`` compiles the attention backward's dk/dv programs with these launch
settings (num_warps, num_stages, maxnreg) instead of the kernel's: an A/B lead on paper.
Nothing runs on a GPU: every time here is a model's estimate, to be checked by tools/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before anything defines a kernel: compile, not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmfast.errors import OutputError  # noqa: E402
from fmfast.files import atomic_write, check_output  # noqa: E402
from tools import cost_model as cm  # noqa: E402
from tools import kernel_costs as kc  # noqa: E402
from tools import sm90  # noqa: E402

DTYPES = ("bfloat16", "float32")  # the paper-shape dtypes the variants are built for
EPOCH_SAMPLES = 2_200_000
TARGETS = {  # name: (goal, compare)
    "tokenizer fwd+bwd vs reference eager bf16": 5.0,
    "attention per layer fwd+bwd vs SDPA flash x4": 1.5,
    "attention per layer fwd+bwd vs FlexAttention x2": 1.3,
    "training step vs reference eager fp32": 4.0,
    "training step vs torch.compile bf16": 2.0,
}


def measure(rows: list[dict]) -> list[dict]:
    """Resources, grid facts and the cost model's time of every captured launch."""
    with ThreadPoolExecutor(2) as pool:
        res = list(pool.map(lambda r: sm90.resources(r["launch"].compiled, r["launch"].meta.get("ptxas_log")), rows))
    out = []
    for r, x in zip(rows, res):
        g = sm90.grid_facts(r["grid"], x["blocks_per_sm"])
        w = kc.our_work(r, x)
        est = cm.ours_us(w, x, g) if x["launches"] and g["grid_ok"] else float("inf")
        out.append({k: v for k, v in r.items() if k != "launch"} | x | g | dict(
            est_us=est, floor_us=w.floor_us(), bound=w.bound(), terms_us=w.terms_us()))
    return out


def _sum(rows, dtype, kernel_prefix, **shape) -> float:
    sel = [r for r in rows if r["dtype"] == dtype and r["kernel"].startswith(kernel_prefix)
           and all(r["shape"].get(k) == v for k, v in shape.items())]
    return sum(r["est_us"] for r in sel)


def components(rows: list[dict]) -> dict:
    """The paper-shape components of the training step (bf16 autocast, frame-store source). The
    tokenizer is its launches alone: no torch op is left around them (not counted: the wrapper's
    stacking of the per-scale parameters, 7 small launches forward, their views backward)."""
    tok = _sum(rows, "bf16", "tokenize", source="store", batch=kc_b(rows))
    att = _sum(rows, "bf16", "attn", batch=kc_b(rows))
    peers = kc.attention_layer_peers(kc.issue_per_element(rows))
    layer_ours = att + cm.peer_us(kc.layer_torch_ops(), cm.GAP_GRAPH_US)
    layer_ref32 = peers["reference eager fp32"] + cm.peer_us(kc.layer_torch_ops(dtype="fp32"))
    layer_comp = peers["SDPA flash x4"] + cm.peer_us(kc.layer_torch_ops(fused=True), cm.GAP_GRAPH_US)
    tok_ref = cm.peer_us(kc.tokenizer_reference())
    step = {
        "ours": tok + kc.DEPTH * layer_ours + cm.peer_us(kc.step_rest(), cm.GAP_GRAPH_US),
        "reference eager fp32": cm.peer_us(kc.tokenizer_reference(dtype="fp32")) + kc.DEPTH * layer_ref32
        + cm.peer_us(kc.step_rest(dtype="fp32")),
        "torch.compile bf16": cm.peer_us(kc.tokenizer_compiled(), cm.GAP_GRAPH_US) + kc.DEPTH * layer_comp
        + cm.peer_us(kc.step_rest(fused=True), cm.GAP_GRAPH_US),
    }
    steps = -(-EPOCH_SAMPLES // 256)
    return dict(
        tokenizer_us=dict(ours=tok, reference=tok_ref),
        attention_layer_us=dict(ours=att, **peers),
        layer_us=dict(ours=layer_ours, reference_fp32=layer_ref32, compiled=layer_comp),
        step_us=step, epoch_s=step["ours"] * steps * 1e-6, epoch_steps=steps,
        ratios={
            "tokenizer fwd+bwd vs reference eager bf16": tok_ref / tok,
            "attention per layer fwd+bwd vs SDPA flash x4": peers["SDPA flash x4"] / att,
            "attention per layer fwd+bwd vs FlexAttention x2": peers["FlexAttention x2"] / att,
            "training step vs reference eager fp32": step["reference eager fp32"] / step["ours"],
            "training step vs torch.compile bf16": step["torch.compile bf16"] / step["ours"],
        })


def kc_b(rows):
    return max(r["shape"]["batch"] for r in rows)


def _fmt_ldg(ldg: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in ldg.items())


def markdown(rows: list[dict], comp: dict | None) -> str:
    lines = ["| kernel | variant | grid (waves) | regs | spill B | stack B | smem KB | blocks/SM (occ., limit) "
             "| MMA | LDG widths (static count) | floor µs (bound) | est µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        occ = f"{r['blocks_per_sm']} ({r['occupancy']:.0%}, {r['limit']})"
        grid = "x".join(map(str, r["grid"])) + f" ({r['waves']})" + ("" if r["grid_ok"] else " **grid > 65535**")
        smem = f"{r['smem_bytes'] / 1024:.1f}" + ("" if r["launches"] else " **> 227**")
        mma = "+".join(r["mma"]) or ("FFMA" if r["ffma"] > 512 else "-")
        lines.append(f"| {r['kernel']} | {r['variant']} | {grid} | {r['regs']} | {r['spill_bytes']} | "
                     f"{r['stack_bytes']} | {smem} | {occ} | {mma} | {_fmt_ldg(r['ldg'])} | "
                     f"{r['floor_us']:.1f} ({r['bound']}) | {r['est_us']:.1f} |")
    if comp:
        lines += ["", "| component (B=256, bf16) | ours µs | peers µs |", "|---|---|---|"]
        for name in ("tokenizer_us", "attention_layer_us", "layer_us", "step_us"):
            d = dict(comp[name])
            ours = d.pop("ours")
            lines.append(f"| {name[:-3].replace('_', ' ')} | {ours:.0f} | "
                         + ", ".join(f"{k} {v:.0f}" for k, v in d.items()) + " |")
        lines.append(f"| epoch ({EPOCH_SAMPLES:,} samples, {comp['epoch_steps']} steps) | {comp['epoch_s']:.1f} s "
                     f"| target < 60 s |")
        lines += ["", "| target (cost model) | ratio | goal | met |", "|---|---|---|---|"]
        for name, goal in TARGETS.items():
            v = comp["ratios"][name]
            lines.append(f"| {name} | {v:.2f}x | >= {goal}x | {'yes' if v >= goal else 'NO'} |")
        lines.append(f"| epoch time | {comp['epoch_s']:.1f} s | < 60 s | {'yes' if comp['epoch_s'] < 60 else 'NO'} |")
    return "\n".join(lines) + "\n"


def report(sweep: bool = False, paper: bool = True, dtypes=("bfloat16", "float32"),
           full_sweep: bool = False) -> tuple[list[dict], dict | None]:
    sm90.install_stub_driver()
    from tools import kernel_variants as kv

    rows = measure(kv.paper(dtypes)) if paper else []
    comp = components(rows) if paper and "bfloat16" in dtypes else None
    if sweep:
        rows += measure(kv.sweep(full_sweep))
    return rows, comp


LAUNCH_KEYS = ("num_warps", "num_stages", "maxnreg")


def parse_launch(text: str) -> dict:
    """"num_stages=1,maxnreg=168" -> {"num_stages": 1, "maxnreg": 168}; a bad item is an OutputError."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        if key not in LAUNCH_KEYS or not value.isdigit() or int(value) < 1:
            raise OutputError(f"--dkdv: {item!r} is not KEY=INT with KEY one of {', '.join(LAUNCH_KEYS)}")
        out[key] = int(value)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also every promised width, for the smem limit")
    ap.add_argument("--sweep-only", action="store_true", help="only the sweep (no paper shape, no components)")
    ap.add_argument("--full-sweep", action="store_true", help="the sweep over every width and dtype (slow)")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="paper-shape dtypes, comma separated")
    ap.add_argument("--json", type=Path, help="write the per-launch rows as a JSON list")
    ap.add_argument("--components", type=Path, help="write the components, ratios and targets as JSON")
    ap.add_argument("--markdown", type=Path, help="write the tables to this file too")
    ap.add_argument("--dkdv", default="", help="dk/dv launch settings to try, e.g. num_stages=1,maxnreg=168")
    a = ap.parse_args(argv)
    dtypes = tuple(a.dtypes.split(","))
    bad = [d for d in dtypes if d not in DTYPES]
    outs = {"markdown": a.markdown, "json": a.json, "components": a.components}
    try:
        if bad:
            raise OutputError(f"--dtypes: {', '.join(bad)} is not one of {', '.join(DTYPES)}")
        dkdv = parse_launch(a.dkdv)
        for p in outs.values():  # before the compiling, which takes a while
            if p:
                check_output(p, kind="file")
    except OutputError as e:
        print(f"kernel_report: {e}", file=sys.stderr)
        return 2
    if dkdv:
        from fmfast.kernels import attention
        attention.DKDV_OVERRIDES.update(dkdv)
        print(f"dk/dv programs compiled with {dkdv}")
    rows, comp = report(a.sweep or a.sweep_only or a.full_sweep, not a.sweep_only, dtypes, a.full_sweep)
    md = markdown(rows, comp)
    print(md, end="")
    texts = {"markdown": md, "json": json.dumps(rows, indent=1, default=str),
             "components": json.dumps(comp | dict(targets=TARGETS), indent=1) if comp else None}
    for name, p in outs.items():
        if p and texts[name] is not None:
            with atomic_write(p) as tmp:
                tmp.write_text(texts[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
