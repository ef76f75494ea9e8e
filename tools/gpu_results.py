"""Results table of a ``tools/gpu_check.sh`` run: ``python tools/gpu_results.py OUTDIR``.

Reads what the check left in OUTDIR -- ``stages.txt`` (exit status per stage), ``environment.txt``,
``gpu_tests.xml`` (JUnit), the pytest-benchmark JSON files (``bench_*.json``; each case's
``extra_info`` holds its title, the milliseconds of ours and every peer, ratios and evaluated
targets) and the bench logs (the printed tables, kept verbatim as an appendix) -- and writes
``results.md`` and ``results.json`` there. Ratios are peer time / ours (> 1: ours is faster).
"""
from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def stages(out: Path) -> list[dict]:
    rows = []
    f = out / "stages.txt"
    for line in (f.read_text().splitlines() if f.is_file() else []):
        parts = line.split()
        if len(parts) >= 2:
            status = {"0": "passed", "124": "ran out of time", "137": "killed (out of time or memory)",
                      "skipped": "skipped (budget spent)"}.get(parts[1], f"failed ({parts[1]})")
            rows.append({"stage": parts[0], "status": status, "seconds": int(parts[2]) if len(parts) > 2 else None})
    return rows


def tests(out: Path) -> dict:
    f = out / "gpu_tests.xml"
    if not f.is_file():
        return {}
    root = ET.parse(f).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**total, "failed": failed}


def _rows(extra: dict) -> dict[str, float]:
    """name -> ms: fmfast's ``report`` stores them under ``ms``; the kernel benches flat."""
    if isinstance(extra.get("ms"), dict):
        return {k: float(v) for k, v in extra["ms"].items()}
    skip = {"title", "bytes_min", "bytes_modeled", "flop_rate_vs_dense", "ratio", "loop_ms", "batch_ms"}
    return {k: float(v) for k, v in extra.items() if k not in skip and isinstance(v, (int, float))}


def benches(out: Path) -> list[dict]:
    cases = []
    for f in sorted(out.glob("bench_*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        machine = data.get("machine_info", {})
        for b in data.get("benchmarks", []):
            extra = b.get("extra_info", {})
            rows = _rows(extra)
            ours = next(iter(rows.values()), None)
            cases.append({
                "file": f.name, "name": b.get("fullname") or b.get("name"), "title": extra.get("title", b.get("name")),
                "ms": rows, "ratios": extra.get("ratios") or ({k: v / ours for k, v in rows.items()} if ours else {}),
                "samples_per_s": extra.get("samples_per_s", {}), "checks": extra.get("checks", []),
                "extra": {k: v for k, v in extra.items() if k in ("peak_mem_mb", "epoch_2.2M_s", "epoch_host_work_s",
                                                               "bytes_min", "bytes_modeled", "flop_rate_vs_dense",
                                                               "ratio", "loop_ms", "batch_ms")},
                "pytest_benchmark_median_ms": 1e3 * b.get("stats", {}).get("median", float("nan")),
                "host": machine.get("node"),
            })
    return cases


# bench case title prefix -> (cost-model component, its key for ours): the model's predictions
# (tools/kernel_report.py --components) printed beside what the GPU measured, to correct the model
MODEL_MATCH = {"paper tokenizer fwd+bwd from a frame store": ("tokenizer_us", "ours"),
               "paper stage fwd+bwd: B=256": ("attention_layer_us", "ours"),  # self + cross launches
               "training step": ("step_us", "ours")}


def cost_model(out: Path) -> dict | None:
    """The cost model's components: this run's (gpu_check's cost_model stage), else the ones
    committed in bench/cost_model.json."""
    for f in (out / "cost_model.json", Path(__file__).resolve().parents[1] / "bench" / "cost_model.json"):
        if f.is_file():
            try:
                return json.loads(f.read_text()) | {"source": str(f)}
            except json.JSONDecodeError:
                continue
    return None


def model_vs_measured(model: dict | None, cases: list[dict]) -> list[str]:
    if not model:
        return ["", "## Cost model vs measured", "", "No cost-model prediction found (tools/kernel_report.py)."]
    out = ["", "## Cost model vs measured", "", f"Predictions: `{model['source']}` (B=256, bf16, H200 ceilings).", "",
           "| bench case | ours measured ms | ours predicted ms | measured / predicted |", "|---|---:|---:|---:|"]
    for case in cases:
        for prefix, (part, key) in MODEL_MATCH.items():
            if case["title"].startswith(prefix) and case["ms"]:
                ours = next(iter(case["ms"].values()))
                pred = model.get(part, {}).get(key, float("nan")) / 1e3
                out.append(f"| {case['title']} | {ours:.3f} | {pred:.3f} | {ours / pred:.2f} |")
    out += ["", "| component (model) | ours ms | peers ms |", "|---|---:|---|"]
    for part in ("tokenizer_us", "attention_layer_us", "layer_us", "step_us"):
        d = dict(model.get(part, {}))
        ours = d.pop("ours", float("nan"))
        out.append(f"| {part[:-3].replace('_', ' ')} | {ours / 1e3:.3f} | "
                   + ", ".join(f"{k} {v / 1e3:.3f}" for k, v in d.items()) + " |")
    out += ["", "| target on the model | ratio |", "|---|---:|"]
    out += [f"| {k} | {v:.2f}x |" for k, v in model.get("ratios", {}).items()]
    return out


def markdown(env: str, st: list[dict], tt: dict, cases: list[dict], logs: dict[str, str],
             model: dict | None = None) -> str:
    out = [f"# fmfast GPU check -- {time.strftime('%Y-%m-%d %H:%M %Z')}", "", "```", env.strip(), "```", ""]
    out += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    out += [f"| {s['stage']} | {s['status']} | {s['seconds'] if s['seconds'] is not None else ''} |" for s in st]
    if tt:
        out += ["", f"GPU tests: {tt['tests']} run, {tt['failures']} failed, {tt['errors']} errors, "
                    f"{tt['skipped']} skipped."]
        out += [f"- FAILED {name}" for name in tt["failed"]]
    checks = [(c, case) for case in cases for c in case["checks"]]
    out += ["", "## Targets", ""]
    if checks:
        out += ["| target | measured | goal | met |", "|---|---|---|---|"]
        out += [f"| {c['target']} | {c['value']} | {c['goal']} | {'yes' if c['met'] else '**no**'} |" for c, _ in checks]
    else:
        out += ["No target was evaluated (the end-to-end benchmarks did not run to completion)."]
    out += ["", "## Benchmarks", "", "Ratios are peer time / ours (> 1: ours faster); GPU times are CUDA-event medians."]
    for case in cases:
        out += ["", f"### {case['title']}", f"`{case['name']}`", "", "| | ms | ratio | samples/s |", "|---|---:|---:|---:|"]
        for name, ms in case["ms"].items():
            rate = case["samples_per_s"].get(name)
            out.append(f"| {name} | {ms:.3f} | {case['ratios'].get(name, float('nan')):.2f} | "
                       f"{'' if rate is None else f'{rate:,.0f}'} |")
        for k, v in case["extra"].items():
            out.append(f"\n{k}: `{json.dumps(v)}`")
    out += model_vs_measured(model, cases)
    if logs:
        out += ["", "## Printed tables (verbatim)", ""]
        for name, text in logs.items():
            out += [f"<details><summary>{name}</summary>", "", "```", text.strip(), "```", "</details>", ""]
    return "\n".join(out) + "\n"


def _printed(log: Path) -> str:
    """The benchmark tables a bench log printed (title lines and their indented rows)."""
    keep = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("  ") or (line and not line.startswith(("=", "-", "Name", "Legend", "test_", "SKIPPED",
                                                                     "PASSED", "FAILED", "..", "bench/"))):
            keep.append(line.rstrip())
    return "\n".join(keep[-400:])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    out = Path(argv[0])
    if not out.is_dir():
        print(f"{out}: no such folder", file=sys.stderr)
        return 2
    env = (out / "environment.txt").read_text() if (out / "environment.txt").is_file() else "(no environment.txt)"
    st, tt, cases = stages(out), tests(out), benches(out)
    logs = {p.name: _printed(p) for p in sorted(out.glob("bench_*.log"))}
    (out / "results.json").write_text(json.dumps({"environment": env, "stages": st, "gpu_tests": tt, "benchmarks": cases},
                                                 indent=2, default=str))
    (out / "results.md").write_text(markdown(env, st, tt, cases, logs, cost_model(out)))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}: {len(cases)} benchmark cases, "
          f"{sum(len(c['checks']) for c in cases)} targets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
