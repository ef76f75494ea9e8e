"""Shared command-line plumbing: one-line errors with exit code 2, atomic file writes."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line on stderr and exit code 2."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def run_main(main, argv=None) -> int:
    """Run a CLI ``main(argv)``; expected input problems become one line and exit code 2."""
    from fmfast.checkpoint import CheckpointError
    from fmfast.data.errors import DataError

    try:
        return main(argv) or 0
    except (UserError, DataError, CheckpointError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success,
    so a crash or kill never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
