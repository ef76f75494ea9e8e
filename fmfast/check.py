"""``python -m fmfast.check``: the same as ``fmfast check`` (see ``fmfast.cli.check``)."""
if __name__ == "__main__":
    from fmfast.cli import command
    from fmfast.cli.common import run_main

    raise SystemExit(run_main(command("check")))
