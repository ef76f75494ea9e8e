"""Run folders: what makes two training runs "the same run", checking a run folder before
anything is written to it, and finding the newest run that ``--resume auto`` continues."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from fmfast.errors import SettingsError
from fmfast.files import FolderLock, atomic_write, check_output, sweep_temporaries


class RunFolderTaken(SettingsError):
    """The run folder holds another run, or this run without resuming it."""


def comparable(settings: dict) -> dict:
    """The settings that make two runs the same run: all but where it is written, how long it
    goes and how steps are launched (not the model they train: the backend runs the same weights)."""
    s = json.loads(json.dumps(settings))
    for key in ("out", "epochs", "cuda_graphs", "backend", "patience"):  # patience: when to stop, like epochs
        s["train"].pop(key, None)
    return s


def settings_diff(a, b, where: str = "") -> list[str]:
    """Dotted names of the settings that differ between ``a`` and ``b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in settings_diff(a.get(k), b.get(k), f"{where}{k}.")]
    return [] if a == b else [where.rstrip(".")]


def prepare_run_folder(out: Path, settings: dict, resume: str | None, write: bool = True) -> FolderLock | None:
    """Refuse a folder that is not a writable folder, is being written by another live run, or
    holds a different run (or this one, unless resuming); then, if ``write``, create it, lock
    it, sweep the temporaries a killed run left and write the resolved ``config.yaml``.
    -> the held lock (release it when the run ends), None unless ``write``."""
    lock = None
    check_output(out, "folder", create=write)  # (without write: a probe only, nothing left behind)
    if write:
        lock = FolderLock(out, "training run").acquire()
    else:  # a live run writing there is what to report, before its config.yaml is
        FolderLock(out, "training run").check()
    try:
        _check_run_folder(out, settings, resume)
        if write:
            sweep_temporaries(out)
            with atomic_write(out / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(settings, sort_keys=False))
    except BaseException:
        if lock:
            lock.release()
        raise
    return lock


def _check_run_folder(out: Path, settings: dict, resume: str | None) -> None:
    cfg_file = out / "config.yaml"
    if cfg_file.is_file():
        try:
            old = yaml.safe_load(cfg_file.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            raise SettingsError(f"{cfg_file}: unreadable run config; choose another run folder") from None
        diff = settings_diff(comparable(old or {}), comparable(settings))
        if diff:
            raise RunFolderTaken(f"{out}: holds a different run (settings differ in {', '.join(diff[:6])}); "
                                 "choose another run folder")
        if not resume and (out / "last.pt").exists():
            raise RunFolderTaken(f"{out}: already holds this run; resume it, or choose another run folder")


def find_resumable(settings: dict, runs: Path = Path("runs")) -> Path | None:
    """The newest run folder under ``runs`` that holds the same run and a ``last.pt``."""
    for last in sorted(runs.glob("*/last.pt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            old = yaml.safe_load((last.parent / "config.yaml").read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        if isinstance(old, dict) and comparable(old) == comparable(settings):
            return last.parent
    return None
