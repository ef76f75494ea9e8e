"""``python -m fmfast.ingest``: the same as ``fmfast ingest`` (see ``fmfast.cli.ingest``)."""
if __name__ == "__main__":
    from fmfast.cli import command
    from fmfast.cli.common import run_main

    raise SystemExit(run_main(command("ingest")))
