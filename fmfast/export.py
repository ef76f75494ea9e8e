"""``python -m fmfast.export``: the same as ``fmfast export`` (see ``fmfast.cli.export``)."""
if __name__ == "__main__":
    from fmfast.cli import command
    from fmfast.cli.common import run_main

    raise SystemExit(run_main(command("export")))
