"""``python -m fmfast.detect``: the same as ``fmfast detect`` (see ``fmfast.cli.detect``)."""
from fmfast.cli import command
from fmfast.cli.common import run_main

raise SystemExit(run_main(command("detect")))
