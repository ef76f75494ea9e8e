"""What every command shares: argument parsing whose mistakes are one line, the one place where
library errors become ``error: ...`` lines with exit code 2, and the metrics table."""
from __future__ import annotations

import argparse
import sys
import warnings

from fmfast.errors import DataWarning, FmfastError


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each option's default to its help
    (``--help`` then shows what a run does when the flag is left out)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" in help or action.default in (None, argparse.SUPPRESS, False) or not action.option_strings:
            return help
        return f"{help} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line on stderr and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def add_predictor_flags(p: argparse.ArgumentParser, compiled_when: str = "") -> None:
    """``--precision`` and ``--compile``: the arguments of ``fmfast.Predictor``, for the commands
    that run a trained model through it."""
    from fmfast.engine.predictor import PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 on CUDA and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help=f"auto: torch.compile on a CPU{compiled_when}, a captured CUDA graph on a GPU; eager "
                        "(saying why) where that is unavailable")


def run_main(main, argv=None) -> int:
    """Run a command's ``main(argv)``; the library's errors become one line and exit code 2."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DataWarning)
            other = warnings.showwarning

            def show(message, category, *args, **kwargs):  # input used in part: one line, no source
                if issubclass(category, DataWarning):
                    print(f"warning: {message}", file=sys.stderr)
                else:
                    other(message, category, *args, **kwargs)

            warnings.showwarning = show
            return main(argv) or 0
    except FmfastError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def metrics_table(metrics: dict, title: str = "metrics"):
    """A rich table of the scalar (and short list) entries of ``metrics``."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.4f}")
        elif isinstance(v, int):
            table.add_row(k, str(v))
        elif isinstance(v, list) and v and not isinstance(v[0], list):
            table.add_row(k, " ".join(f"{x:.4f}" for x in v))
    return table
