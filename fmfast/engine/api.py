"""Training from Python: ``fmfast.fit(...)`` takes what ``fmfast train`` takes and returns the
run's outcome::

    import fmfast
    result = fmfast.fit(epochs=2, out="runs/demo", overrides=["model.depth=2"])
    result["test"]["f1"], result["val"]["f1"], result["threshold"], result["best"]

Keywords are the command's flags with underscores (``data``, ``task``, ``model``, ``epochs``,
``lr``, ``val_fraction``, ``monitor``, ``patience`` ...; ``fmfast.engine.settings.FLAGS``),
``overrides`` its dotted ``section.key=value`` settings, ``config`` its YAML file and
``resume`` its ``--resume`` (``"auto"`` or a checkpoint). The settings resolve and are checked
exactly as on the command line (``resolve``), and ``start`` is the set-up both share."""
from __future__ import annotations

import os
import time
from pathlib import Path

from fmfast.engine.settings import DEFAULTS, FLAGS, QUICK, load_yaml, merge, model_config, parse_override, validate
from fmfast.errors import SettingsError


def resolve(config: str | None = None, flags: dict | None = None, overrides=(), quick: bool | None = None) -> dict:
    """Settings from defaults, the config file, flags and dotted overrides (in that order), checked
    (``settings.validate``). With no dataset named anywhere, the CPU profile QUICK sits right
    above the defaults."""
    flags = flags or {}
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise SettingsError(f"unknown option(s) {', '.join(unknown)} (known: {', '.join(FLAGS)})")
    s = merge(DEFAULTS, QUICK) if quick else DEFAULTS
    if config:
        s = merge(s, load_yaml(config))
    for flag, v in flags.items():
        if v is not None:
            sec, key = FLAGS[flag]
            s = merge(s, {sec: {key: v}})
    for o in overrides:
        s = merge(s, parse_override(o))
    if quick is None and s["data"]["root"] is None:
        return resolve(config, flags, overrides, quick=True)
    return validate(s)


def start(s: dict, resume: str | None = None, console=None):
    """The data (the synthetic benchmark generated when none is named), the run folder and
    ``resume`` resolved, then the Trainer: every check happens before the run folder is written."""
    from fmfast.engine.device import resolve_amp, resolve_device
    from fmfast.engine.runs import RunFolderTaken, find_resumable
    from fmfast.engine.trainer import Trainer

    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    resolve_amp(s["train"]["amp"], resolve_device(s["train"]["device"]))  # fail before any slow work
    d = s["data"]
    if d["root"] is None:
        from fmfast.data.cache import default_synthetic_root

        syn = d["synthetic"]
        model_config(s, (syn["size"], syn["size"]))  # a model that cannot fit fails before generating data
        console.print(f"data: the built-in synthetic furnace benchmark, {syn['recordings']} recordings x {syn['frames']} frames at "
                      f"{syn['size']}x{syn['size']} px, {d['num_frames']}-frame clips, {d['current_seconds']} s current windows "
                      f"(sized for a CPU; --data PATH for real recordings; data.synthetic.size=64 --num-frames 10 "
                      f"--current-seconds 120 for the paper's shapes)")
        d["root"] = str(default_synthetic_root(syn["recordings"], syn["frames"], syn["seed"], syn["size"], console=console))
    elif not Path(d["root"]).exists():
        raise SettingsError(f"{d['root']}: data folder not found")
    d["root"] = str(Path(d["root"]).resolve())
    if d["val_split"] is not None and not Path(d["val_split"]).is_file():
        raise SettingsError(f"{d['val_split']}: validation split file not found (data.val_split)")

    t = s["train"]
    if resume == "auto":
        resume = None
        if t["out"] is None:
            found = find_resumable(s)
            if found is not None:
                t["out"] = str(found)
        if t["out"] is not None and (Path(t["out"]) / "last.pt").exists():
            resume = str(Path(t["out"]) / "last.pt")
    elif resume and t["out"] is None:
        t["out"] = str(Path(resume).parent)
    if t["out"] is None:
        stamp = os.environ.get("FMFAST_RUN_STAMP") or time.strftime("%Y%m%d-%H%M%S")
        t["out"] = str(Path("runs") / f"{s['model']['name']}-{s['model']['task']}-{stamp}")
    try:
        return Trainer(s, resume=resume, console=console)
    except RunFolderTaken as e:
        raise SettingsError(f"{e} (--resume auto continues it; --out chooses another)") from None


def fit(*, config: str | None = None, overrides=(), resume: str | None = None, quiet: bool = False, **flags) -> dict:
    """Train as ``fmfast train`` would -> the run's outcome: ``val`` (the selected epoch's
    validation metrics), ``test`` (the test split, evaluated once with best.pt), ``selected_by``,
    ``threshold`` (calibrated on validation), ``epochs``, ``stopped_early`` and the paths ``run``,
    ``best``, ``last``, ``metrics``. Bad settings raise ``fmfast.errors.SettingsError`` before
    anything is written."""
    from rich.console import Console

    s = resolve(config, flags, list(overrides))
    trainer = start(s, resume=resume, console=Console(stderr=True, quiet=quiet))
    return trainer.fit()
