"""Static checks over the whole tree: the GPU-only code paths (captured steps, compiled kernels,
GPU benchmarks) never execute on a CPU machine, so an undefined name there would only surface on
the first GPU run. ruff's pyflakes rules find those without running anything."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# syntax errors, undefined names (F821-F823), misused comparisons/statements (F63, F7)
RULES = "E9,F63,F7,F821,F822,F823"


def test_no_undefined_names_or_syntax_errors():
    import importlib.util

    assert importlib.util.find_spec("ruff"), "ruff is not installed: pip install -e '.[dev]'"
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", RULES,
                        "--output-format", "concise", "fmfast", "kernels", "bench", "tests", "tools"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
