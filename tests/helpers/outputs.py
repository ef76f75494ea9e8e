"""Output locations that are not folders, for the tests that check a command refuses them."""
from __future__ import annotations

import os
from pathlib import Path

KINDS = ["file", "symlink", "fifo", "device"]
KEPT = "keep me"


def make_not_a_folder(out: Path, kind: str) -> Path | None:
    """Make ``out`` a regular file (holding ``KEPT``), a symlink to an empty folder, a FIFO or a
    symlink to a device. -> the symlink's target folder (which must stay empty), else None."""
    if kind == "file":
        out.write_text(KEPT)
    elif kind == "symlink":
        target = out.parent / f"{out.name}-target"
        target.mkdir()
        out.symlink_to(target)
        return target
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        out.symlink_to("/dev/null")
    return None
