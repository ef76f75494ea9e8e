"""Which epoch's weights ``best.pt`` holds, and when training stops early.

The monitored metric is a validation metric (``train.monitor``: ``val/<name>``, by default
``val/f1`` for classification and ``val/miou`` for segmentation); FDR and MDR are minimised,
the rest maximised, and a NaN never improves. Without a validation split nothing can be
monitored: best.pt is the last epoch. The calibrated threshold is the F1-maximising one of the
validation split at the selected epoch (``calibration`` in its metrics)."""
from __future__ import annotations

import math

from fmfast.errors import SettingsError

MONITORED = {
    "classification": ("f1", "accuracy", "precision", "recall", "auroc", "ap", "fdr", "mdr"),
    "segmentation": ("miou", "pixel_accuracy", "frame_accuracy", "pixel_f1", "pixel_auroc", "aupro", "image_auroc"),
}
LOWER_IS_BETTER = {"fdr", "mdr"}


def resolve_monitor(settings: dict) -> str:
    """``train.monitor`` with ``auto`` resolved, checked against the task's metrics."""
    task, monitor = settings["model"]["task"], settings["train"]["monitor"]
    if monitor == "auto":
        return "val/f1" if task == "classification" else "val/miou"
    name = monitor[4:] if monitor.startswith("val/") else None
    if name not in MONITORED[task]:
        raise SettingsError(f"train.monitor={monitor!r}: not a {task} validation metric "
                            f"(choose one of {', '.join('val/' + k for k in MONITORED[task])})")
    return monitor


class Selection:
    """The best epoch so far by the monitored metric, the threshold it calibrated, and the
    early-stopping count (``patience`` epochs without improvement stop the run; 0: never)."""

    def __init__(self, monitor: str, patience: int, has_val: bool):
        self.monitor, self.patience, self.has_val = monitor, patience, has_val
        self.key = monitor.split("/", 1)[1]
        self.value: float | None = None
        self.epoch = 0
        self.threshold: float | None = None
        self.bad = 0
        self.stopped = False

    def update(self, epoch: int, metrics: dict) -> bool:
        """Account for ``epoch``'s validation ``metrics``; -> whether it is the new best."""
        if not self.has_val:
            self.epoch = epoch
            return True
        v = float(metrics.get(self.key, math.nan))
        lower = self.key in LOWER_IS_BETTER
        better = self.value is None or (not math.isnan(v) and (
            math.isnan(self.value) or (v < self.value if lower else v > self.value)))
        if better:
            self.value, self.epoch, self.bad = v, epoch, 0
            self.threshold = metrics.get("calibration", {}).get("threshold")
        else:
            self.bad += 1
            self.stopped = bool(self.patience) and self.bad >= self.patience
        return better

    def record(self) -> dict:
        """What best.pt records about its choice."""
        if not self.has_val:
            return {"metric": None, "value": None, "epoch": self.epoch, "note": "no validation split: the last epoch"}
        return {"metric": self.monitor, "value": self.value, "epoch": self.epoch}

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("value", "epoch", "threshold", "bad", "stopped")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
