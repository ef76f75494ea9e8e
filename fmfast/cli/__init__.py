"""The ``fmfast`` command: ``fmfast train|evaluate|ingest|detect|export|check ...``.

Each subcommand lives in its own module here (argument parsing, then one call into the library)
and is also reachable as ``python -m fmfast.<command>``. Library errors (``fmfast.errors``) become
one ``error:`` line and exit code 2 here, and only here.

May import anything in fmfast. Nothing imports it but the entry points (``fmfast/__main__.py``,
``fmfast/detect/__main__.py`` and the ``python -m fmfast.<command>`` shims).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "train a model (default: FmFormer on the built-in synthetic furnace data)",
    "evaluate": "evaluate a checkpoint on a dataset split",
    "ingest": "turn an own recording (video + current log) into the FMF V2 layout",
    "detect": "slide a trained model over a recording and raise alarms",
    "export": "export a trained model (ONNX, pt2, OpenVINO, the reference code's state_dict)",
    "check": "check a dataset or a recording and report every problem found",
}


def _usage() -> str:
    from fmfast import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: fmfast COMMAND [options]   (fmfast {__version__})", "",
             "Fast, faithful FmFormer: cross-modal (furnace video + arc current) anomaly detection.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    lines += ["", "fmfast COMMAND --help shows a command's options and their defaults.",
              "fmfast --version prints the version."]
    return "\n".join(lines)


def command(name: str):
    """The ``main(argv)`` of subcommand ``name``."""
    return importlib.import_module(f"fmfast.cli.{name}").main


def main(argv=None) -> int:
    from fmfast.cli.common import fail, run_main

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fmfast import __version__

        print(f"fmfast {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        fail(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)} (see fmfast --help)")
    return run_main(command(name), rest)
