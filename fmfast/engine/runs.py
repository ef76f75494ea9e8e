"""Run folders: what makes two training runs "the same run", checking a run folder before
anything is written to it, and finding the newest run that ``--resume auto`` continues."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from fmfast.errors import SettingsError
from fmfast.files import atomic_write


class RunFolderTaken(SettingsError):
    """The run folder holds another run, or this run without resuming it."""


def comparable(settings: dict) -> dict:
    """The settings that make two runs the same run: all but where it is written, how long it
    goes and how steps are launched (not what they compute)."""
    s = json.loads(json.dumps(settings))
    s["train"].pop("out", None)
    s["train"].pop("epochs", None)
    s["train"].pop("cuda_graphs", None)
    s["train"].pop("patience", None)  # when to stop, like epochs
    return s


def settings_diff(a, b, where: str = "") -> list[str]:
    """Dotted names of the settings that differ between ``a`` and ``b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in settings_diff(a.get(k), b.get(k), f"{where}{k}.")]
    return [] if a == b else [where.rstrip(".")]


def prepare_run_folder(out: Path, settings: dict, resume: str | None, write: bool = True) -> None:
    """Refuse a folder that holds a different run (or this one, unless resuming); then, if
    ``write``, create it and write the resolved ``config.yaml``."""
    cfg_file = out / "config.yaml"
    if cfg_file.is_file():
        try:
            old = yaml.safe_load(cfg_file.read_text())
        except yaml.YAMLError:
            raise SettingsError(f"{cfg_file}: unreadable run config; choose another run folder") from None
        diff = settings_diff(comparable(old or {}), comparable(settings))
        if diff:
            raise RunFolderTaken(f"{out}: holds a different run (settings differ in {', '.join(diff[:6])}); "
                                 "choose another run folder")
        if not resume and (out / "last.pt").exists():
            raise RunFolderTaken(f"{out}: already holds this run; resume it, or choose another run folder")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(cfg_file) as tmp:
            tmp.write_text(yaml.safe_dump(settings, sort_keys=False))


def find_resumable(settings: dict, runs: Path = Path("runs")) -> Path | None:
    """The newest run folder under ``runs`` that holds the same run and a ``last.pt``."""
    for last in sorted(runs.glob("*/last.pt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            old = yaml.safe_load((last.parent / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(old, dict) and comparable(old) == comparable(settings):
            return last.parent
    return None
