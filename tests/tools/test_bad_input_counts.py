"""tools/bad_input_counts.py without running the corpus: every corpus file it names exists and
holds tests its groups catch, and counts come from JUnit XML (a failure is not "handled")."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool():
    spec = importlib.util.spec_from_file_location("bad_input_counts", ROOT / "tools/bad_input_counts.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bad_input_counts"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_group_matches_tests_that_exist():
    t = tool()
    for file, prefix, g in t.GROUPS:
        names = re.findall(r"^def (test_\w+)", (ROOT / file).read_text(), re.M)
        assert any(n.startswith(prefix) for n in names), (file, prefix, g)


def test_counts_from_junit(tmp_path, capsys):
    xml = tmp_path / "j.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="tests.data.test_bad_inputs" name="test_current_log_bad_input[NaN]"/>
      <testcase classname="tests.data.test_bad_inputs" name="test_current_log_bad_input[1e300]"><failure/></testcase>
      <testcase classname="tests.engine.test_checkpoint_bad_inputs" name="test_bad_checkpoint_is_one_line[a]"/>
      <testcase classname="tests.cli.test_check" name="test_yaml_settings_bad_input[x]"><skipped/></testcase>
      <testcase classname="tests.data.test_dataset" name="test_unrelated"/>
    </testsuite></testsuites>""")
    assert tool().main(["--junit", str(xml)]) == 1  # one case not handled
    out = capsys.readouterr().out
    assert re.search(r"reader: current CSV\s+2\s+1", out) and re.search(r"reader: checkpoint\s+1\s+1", out)
    assert "YAML" not in out and re.search(r"total\s+3\s+2", out)
