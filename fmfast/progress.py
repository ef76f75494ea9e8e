"""The rich progress bars every long-running job shows: samples (training, evaluation) and
frames (ingestion, detection)."""
from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=1)
def stderr_console():
    import os

    from rich.console import Console

    # a private copy of stderr: fmfast.data.video silences fd 2 while a decoder runs
    return Console(file=os.fdopen(os.dup(2), "w"), stderr=True)


def frame_progress(console, what: str, unit: str = "frames"):
    """A transient rich bar (shown only on a terminal) counting frames with their rate."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{speed:8.0f} {unit}/s" if speed else f"     ... {unit}/s")

    return Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)
