"""``python -m fmfast.evaluate``: the same as ``fmfast evaluate`` (see ``fmfast.cli.evaluate``)."""
if __name__ == "__main__":
    from fmfast.cli import command
    from fmfast.cli.common import run_main

    raise SystemExit(run_main(command("evaluate")))
