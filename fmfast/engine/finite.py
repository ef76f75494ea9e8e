"""Non-finite training is an error: a loss or a weight that became NaN/inf stops the run with
the step it happened at, before anything non-finite is saved (last.pt and best.pt keep the last
good state). Checked where the trainer already reads values: the losses, read in groups (every
step on a CPU), and the weights, once before each checkpoint is written."""
from __future__ import annotations

import math

import torch

from fmfast.errors import TrainingError

HINT = "lower the learning rate (--lr), or train in float32 (--amp off)"


def check_losses(losses: list[float], last_step: int, saved: str) -> None:
    """``losses`` are those of the global steps ``last_step - len(losses) + 1 .. last_step``."""
    for k, v in enumerate(losses):
        if not math.isfinite(v):
            step = last_step - len(losses) + 1 + k
            raise TrainingError(f"training diverged: the loss is {v} at step {step}; {saved}; {HINT}")


def check_weights(model: torch.nn.Module, step: int, saved: str) -> None:
    """Before a checkpoint is written: every parameter and buffer is finite."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TrainingError(f"training diverged: weight '{name}' is non-finite after step {step}; "
                                f"{saved}; {HINT}")


def saved_note(out, step: int | None) -> str:
    if step is None:
        return "no checkpoint was written"
    return f"{out}/last.pt keeps the last good state (step {step})"
