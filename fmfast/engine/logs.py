"""A run's experiment logs: ``metrics.jsonl`` (one row per epoch with its ``val`` metrics, then
a final row with the ``test`` metrics of the selected checkpoint), the same scalars flattened
into ``metrics.csv`` (``val/f1``, ``test/at_threshold/f1`` ...), and, when the ``tensorboard``
package is installed, TensorBoard event files under ``tensorboard/`` with those scalars plus
the curves and confusion images. Without tensorboard the event files are simply not written."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from fmfast.files import atomic_write


def flatten(row: dict, prefix: str = "") -> dict:
    """The scalar entries of a nested row as ``{"a/b": value}`` (lists are left out)."""
    out = {}
    for k, v in row.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = v
    return out


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=str(folder))


class RunLog:
    """The logs of the run folder ``out`` (written by the main process only)."""

    def __init__(self, out: Path, tensorboard: bool = True):
        self.out = Path(out)
        self.tb = _tensorboard_writer(self.out / "tensorboard") if tensorboard else None

    def write(self, history: list[dict], final: dict | None) -> None:
        """Rewrite metrics.jsonl and metrics.csv from all rows (atomic: never half a file)."""
        rows = history + ([final] if final else [])
        with atomic_write(self.out / "metrics.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        flat = [flatten(r) for r in rows]
        columns = list(dict.fromkeys(k for f in flat for k in f))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
        w.writeheader()
        w.writerows(flat)
        with atomic_write(self.out / "metrics.csv") as tmp:
            tmp.write_text(buf.getvalue())

    def scalars(self, row: dict, step: int) -> None:
        if self.tb is None:
            return
        for k, v in flatten(row).items():
            if k != "epoch" and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def images(self, step: int, names=("curves.png", "confusion.png")) -> None:
        """The run folder's plots, as images at ``step``."""
        if self.tb is None:
            return
        import matplotlib.image as mpimg

        for name in names:
            if (self.out / name).is_file():
                self.tb.add_image(name.removesuffix(".png"), mpimg.imread(self.out / name)[..., :3], step,
                                  dataformats="HWC")
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
