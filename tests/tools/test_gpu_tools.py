"""tools/gpu_check.sh and tools/gpu_results.py, without a GPU: the script parses and refuses a
missing OUTDIR; the results table is built from pytest-benchmark JSON, JUnit XML and stage codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_parses_and_needs_outdir():
    assert subprocess.run(["bash", "-n", str(ROOT / "tools/gpu_check.sh")]).returncode == 0
    p = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh")], capture_output=True, text=True)
    assert p.returncode != 0 and "usage: tools/gpu_check.sh OUTDIR" in p.stderr


def test_gpu_results_table(tmp_path):
    (tmp_path / "environment.txt").write_text("torch 2.11.0 cuda 12.8\ntriton 3.6.0\ndevice NVIDIA H200\n")
    (tmp_path / "stages.txt").write_text("install 0 9\ngpu_tests 1 80\nbench_model 0 190\nbench_train 137 140\nbench_rest 124 150\n")
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_graphs" name="test_gpu_a"/>'
        '<testcase classname="tests.test_graphs" name="test_gpu_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_backend" name="test_gpu_c"/></testsuite></testsuites>')
    checks = [{"target": "training throughput vs (a) reference eager fp32 (x)", "value": 5.2, "goal": ">= 4", "met": True},
              {"target": "epoch over 2.2M samples incl. gather (s)", "value": 71.0, "goal": "<= 60", "met": False}]
    ours = {"name": "test_bench_gpu_train_step", "fullname": "bench/test_bench_train.py::test_bench_gpu_train_step",
            "stats": {"median": 0.02}, "extra_info": {
                "title": "training step B=256", "ms": {"ours": 8.0, "(a) reference": 41.6},
                "ratios": {"ours": 1.0, "(a) reference": 5.2}, "samples_per_s": {"ours": 32000.0, "(a) reference": 6154.0},
                "checks": checks, "peak_mem_mb": {"ours": 900.0, "(a)": 25000.0}, "epoch_2.2M_s": 71.0}}
    flat = {"name": "test_bench_paper_tokenizer[256]", "fullname": "bench/test_bench_tokenize.py::x",
            "stats": {"median": 0.001}, "extra_info": {"title": "tokenizer", "ours (fused Triton)": 0.5,
                                                      "(a) reference": 3.0, "bytes_min": 10}}
    (tmp_path / "bench_model.json").write_text(json.dumps({"machine_info": {"node": "h200"}, "benchmarks": [ours]}))
    (tmp_path / "bench_rest.json").write_text(json.dumps({"benchmarks": [flat]}))
    (tmp_path / "bench_model.log").write_text("training step B=256\n  ours   8.000 ms  x  1.00\n....\n")
    p = subprocess.run([sys.executable, str(ROOT / "tools/gpu_results.py"), str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "results.md").read_text()
    assert "| gpu_tests | failed (1) | 80 |" in md and "| bench_rest | ran out of time | 150 |" in md
    assert "| bench_train | killed (out of time or memory) | 140 |" in md
    assert "3 run, 1 failed" in md and "FAILED tests.test_graphs::test_gpu_b" in md
    assert "| epoch over 2.2M samples incl. gather (s) | 71.0 | <= 60 | **no** |" in md
    assert "| (a) reference | 41.600 | 5.20 | 6,154 |" in md
    assert "| (a) reference | 3.000 | 6.00 |  |" in md  # flat extra_info: ratio computed against ours
    assert "NVIDIA H200" in md and "  ours   8.000 ms  x  1.00" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["benchmarks"]) == 2 and data["benchmarks"][0]["extra"]["epoch_2.2M_s"] == 71.0


def test_gpu_check_writes_the_table_when_a_stage_runs_out_of_the_budget(tmp_path):
    """A stage that eats the whole budget (here: every pytest hangs) still leaves results.md: the
    results stage runs in the reserve instead of being skipped as 'budget spent'."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    'case " $* " in\n'
                    '  *" -m pytest "*) exec sleep 60 ;;\n'
                    '  *" -m pip "*|*" -c "*) exit 0 ;;\n'
                    f'  *) exec "{sys.executable}" "$@" ;;\n'
                    "esac\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**__import__("os").environ, "PYTHON": str(fake), "GPU_CHECK_BUDGET": "41"}
    p = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), str(out)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    md = (out / "results.md").read_text()
    assert "| gpu_tests | ran out of time |" in md and "| bench_rest | skipped (budget spent) |" in md, md
    assert "| results |" not in md  # written by that stage, before its own row exists


def test_gpu_cases_skip_under_the_interpreter_on_a_cuda_machine(monkeypatch):
    """The README's test command on a GPU machine runs the interpreter; its GPU cases must skip
    with a reason instead of running interpreted kernels on CUDA tensors (bf16 wrong, no capture)."""
    import importlib.util
    from types import SimpleNamespace

    import pytest
    import torch

    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)

    def item(gpu):
        marks = []
        return SimpleNamespace(marks=marks, add_marker=marks.append,
                               get_closest_marker=lambda name: pytest.mark.gpu.mark if gpu and name == "gpu" else None)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for interpret, skipped in (("1", True), ("0", False)):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        items = [item(True), item(False)]
        root_conftest.pytest_collection_modifyitems(None, items)
        assert [bool(i.marks) for i in items] == [skipped, False]
        if skipped:
            assert "TRITON_INTERPRET=0" in items[0].marks[0].kwargs["reason"]
