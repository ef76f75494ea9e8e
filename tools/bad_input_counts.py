"""Run the bad-input corpus and print, per reader and per command, how many bad inputs (and
harmless oddities) were tried and how many were handled as they must be: a clean one-line
error (exit 2 from a command) or acceptance with the right values.

    python tools/bad_input_counts.py [--junit FILE]

Each corpus case is one pytest case (a parametrized id or a hypothesis test, which itself
tries many generated inputs); "handled" counts the cases that passed. To check your own files
with the same rules use `fmfast check DATA` instead.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (test file, test function prefix) -> group; the first match wins
GROUPS = [
    ("tests/data/test_bad_inputs.py", "test_v2_harmless", "reader: V2 dataset, harmless oddities (BOM, CRLF, ...)"),
    ("tests/data/test_bad_inputs.py", "test_v2_bad", "reader: V2 dataset (mat, currents, timestamps, split JSON)"),
    ("tests/data/test_bad_inputs.py", "test_damaged_hdf5", "reader: mat / HDF5 (damaged bytes)"),
    ("tests/data/test_bad_inputs.py", "test_current_log", "reader: current CSV"),
    ("tests/data/test_bad_inputs.py", "test_any_", "reader: current CSV"),
    ("tests/data/test_bad_inputs.py", "test_frame_times", "reader: frame timestamps CSV"),
    ("tests/data/test_bad_inputs.py", "test_start_time", "reader: frame timestamps CSV"),
    ("tests/data/test_dataset.py", "test_bad_input", "reader: V2 dataset (mat, currents, timestamps, split JSON)"),
    ("tests/data/test_dataset.py", "test_v1_bad", "reader: V1 mat"),
    ("tests/data/test_media_bad_inputs.py", "test_ingest_onto", "command: ingest (full / read-only disk)"),
    ("tests/data/test_media_bad_inputs.py", "", "reader: video (lying headers, cut files, decoder crash)"),
    ("tests/data/test_ingest.py", "test_bad_input", "command: ingest"),
    ("tests/engine/test_checkpoint_bad_inputs.py", "", "reader: checkpoint"),
    ("tests/cli/test_check.py", "test_yaml", "reader: YAML settings"),
    ("tests/cli/test_check.py", "", "command: check"),
    ("tests/cli/test_train_reliability.py", "", "command: train (non-finite, disk, lock, resume)"),
    ("tests/cli/test_distributed_reliability.py", "", "command: train (distributed peer loss)"),
    ("tests/cli/test_train.py", "test_train_bad_input", "command: train"),
    ("tests/cli/test_train.py", "test_evaluate_bad_input", "command: evaluate"),
    ("tests/detect/test_detect.py", "test_bad_inputs", "command: detect"),
    ("tests/detect/test_detect_reliability.py", "", "command: detect (--out, --follow rotation)"),
]


def group(file: str, name: str) -> str | None:
    for f, prefix, g in GROUPS:
        if file == f and name.startswith(prefix):
            return g
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--junit", help="read this JUnit XML of an earlier corpus run instead of running it")
    a = p.parse_args(argv)
    files = sorted({f for f, _, _ in GROUPS})
    if a.junit:
        xml = Path(a.junit)
    else:
        xml = Path(tempfile.mkdtemp()) / "corpus.xml"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *files],
                       cwd=ROOT, env=env, stdout=subprocess.DEVNULL, timeout=1800)
    tried, handled = defaultdict(int), defaultdict(int)
    for case in ET.parse(xml).getroot().iter("testcase"):
        file = case.get("classname", "").replace(".", "/") + ".py"
        g = group(file, case.get("name", ""))
        if g is None or case.find("skipped") is not None:
            continue
        tried[g] += 1
        handled[g] += case.find("failure") is None and case.find("error") is None
    width = max(map(len, tried), default=10)
    print(f"{'reader / command':<{width}}  tried  handled")
    for g in sorted(tried):
        print(f"{g:<{width}}  {tried[g]:>5}  {handled[g]:>7}")
    print(f"{'total':<{width}}  {sum(tried.values()):>5}  {sum(handled.values()):>7}")
    return 0 if sum(tried.values()) == sum(handled.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
