"""The ``fmfast`` command: subcommands, --help with every default, --version, and the module
entry points (``python -m fmfast``, ``python -m fmfast.train`` ...) that stay as thin shims."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import fmfast
from fmfast.cli import COMMANDS, main
from fmfast.engine.settings import QUICK

SUBCOMMANDS = ["train", "evaluate", "ingest", "detect", "export", "check"]


def run(*args, timeout=120):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def test_the_commands():
    assert list(COMMANDS) == SUBCOMMANDS


def test_console_script_lists_commands_and_version():
    exe = shutil.which("fmfast")
    assert exe, "the fmfast console script is not installed (pip install -e .)"
    p = run(exe, "--help")
    assert p.returncode == 0, p.stderr
    for name in SUBCOMMANDS:
        assert f"  {name}  " in p.stdout or f"  {name} " in p.stdout, p.stdout
    v = run(exe, "--version")
    assert v.returncode == 0 and v.stdout.strip() == f"fmfast {fmfast.__version__}"


def test_python_dash_m_fmfast_lists_commands():
    p = run(sys.executable, "-m", "fmfast")
    assert p.returncode == 0, p.stderr
    assert all(name in p.stdout for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_module_shims_run_the_same_command(name):
    p = run(sys.executable, "-m", f"fmfast.{name}", "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: fmfast {name}") or f"fmfast {name}" in p.stdout.splitlines()[0], p.stdout[:200]


def test_unknown_command_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown command 'frobnicate'"), err


def test_subcommand_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--checkpoint", "/nonexistent/best.pt"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "best.pt" in err[0], err


def help_text(name, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks


def test_train_help_shows_each_default_and_the_cpu_profile(capsys):
    text = help_text("train", capsys)
    quick = QUICK["train"]["epochs"]  # the profile is tuned over time; the help must follow it
    for needle in (f"--epochs EPOCHS (default: 3; with no --data: {quick})", "--batch-size BATCH_SIZE (default: 32)",
                   "(default: 0.0005; with no --data: 0.001)", "(default: 10; with no --data: 4)",
                   "(default: 120; with no --data: 8)", "(default: the built-in synthetic benchmark)",
                   "(default: runs/<model>-<task>-<time>)", "(default: adam)", "(default: auto)"):
        assert needle in text, needle


@pytest.mark.parametrize("name, needles", [
    ("evaluate", ["--batch-size BATCH_SIZE samples per forward pass (default: 128)", "(default: test)"]),
    ("ingest", ["(default: 64)", "(default: 5.0)", "(default: test)"]),
    ("detect", ["frames between window ends (default: 10)", "(default: the threshold calibrated on validation", "(default: 2/3 of --on)"]),
    ("export", ["ONNX opset (onnx and openvino) (default: 18)", "use pt2"]),
])
def test_other_helps_show_defaults(name, needles, capsys):
    text = help_text(name, capsys)
    assert text.startswith(f"usage: fmfast {name}")
    for n in needles:
        assert n in text, n
