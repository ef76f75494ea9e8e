"""``python -m fmfast.train``: the same as ``fmfast train`` (see ``fmfast.cli.train``)."""
if __name__ == "__main__":
    from fmfast.cli import command
    from fmfast.cli.common import run_main

    raise SystemExit(run_main(command("train")))
