"""The rich progress bar used by every long-running command."""
from __future__ import annotations

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:8.1f} samples/s" if speed else "    ... samples/s")


class _Loss(ProgressColumn):
    def render(self, task) -> Text:
        loss = task.fields.get("loss")
        return Text(f"loss {loss:.4f}" if loss is not None and loss == loss else "")


def progress_bar(console=None, disable: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Loss(),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=True,
    )
