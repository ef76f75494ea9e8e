"""Train FmFormer (or a single-modality baseline) on the FMF benchmark, your own recordings,
or — with no arguments — the built-in synthetic furnace benchmark.

    fmfast train                                   # synthetic data, FmFormer, classification
    fmfast train --data /data/FMFBenchmarkV2/pixel-level --task segmentation
    fmfast train --config configs/CfgForViCu_Cls.yaml train.batch_size=128 model.depth=4
    torchrun --nproc_per_node 2 -m fmfast.train ...          # DistributedDataParallel

Settings resolve as defaults -> --config FILE -> flags -> dotted overrides. With no dataset
named, a profile sized for two CPU cores sits right above the defaults ("no --data" below).
"""
from __future__ import annotations

import time
from pathlib import Path

from fmfast.cli.common import Parser, metrics_table
from fmfast.engine.settings import (AMP, DEFAULTS, MODEL_NAMES, OPTIMIZERS, QUICK, SCHEDULES, load_yaml, merge,
                                    model_config, parse_override, validate)
from fmfast.errors import SettingsError

# flag -> (section, key); flags left unset do not override the config file
FLAGS = {
    "data": ("data", "root"), "num_frames": ("data", "num_frames"), "stride": ("data", "stride"),
    "current_seconds": ("data", "current_seconds"), "task": ("model", "task"), "model": ("model", "name"),
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("optim", "lr"),
    "optimizer": ("optim", "name"), "weight_decay": ("optim", "weight_decay"), "momentum": ("optim", "momentum"),
    "schedule": ("schedule", "name"), "amp": ("train", "amp"), "device": ("train", "device"),
    "seed": ("train", "seed"), "out": ("train", "out"), "checkpoint_every": ("train", "checkpoint_every"),
    "max_train_samples": ("train", "max_train_samples"), "max_eval_samples": ("train", "max_eval_samples"),
    "cuda_graphs": ("train", "cuda_graphs"), "backend": ("train", "backend"),
}


def _default(flag: str) -> str:
    """``(default: X)``, or ``(default: X; with no --data: Y)`` where the CPU profile differs."""
    sec, key = FLAGS[flag]
    base = DEFAULTS[sec][key]
    quick = QUICK.get(sec, {}).get(key, base)
    if base is None and flag == "data":
        return "(default: the built-in synthetic benchmark)"
    if base is None:
        return {"out": "(default: runs/<model>-<task>-<time>)"}.get(flag, "")
    shown = "the whole split" if key.startswith("max_") and base == 0 else base
    if quick != base:
        return f"(default: {shown}; with no --data: {quick})"
    return f"(default: {shown})"


def build_parser(prog: str = "fmfast train") -> Parser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. model.depth=4")
    p.add_argument("--config", help="YAML settings: fmfast's own or the reference code's CfgFor*.yaml")
    p.add_argument("--data", help="dataset root (FMF V2 folder or V1 .mat)")
    p.add_argument("--task", choices=["classification", "segmentation"])
    p.add_argument("--model", choices=MODEL_NAMES, help="fmformer (video + current), video or current only")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--num-frames", type=int)
    p.add_argument("--stride", type=int, help="frame step within a clip")
    p.add_argument("--current-seconds", type=int)
    p.add_argument("--amp", choices=AMP, help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"])
    p.add_argument("--backend", choices=["auto", "reference", "fast"],
                   help="auto: Triton kernels on CUDA, PyTorch's fused SDPA on a CPU; reference: the published "
                        "operation order; fast: Triton wherever it runs")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", nargs="?", const="auto", help="auto (the run folder's last.pt) or a checkpoint path")
    p.add_argument("--out", help="run folder")
    p.add_argument("--checkpoint-every", type=int, help="steps between last.pt writes (0: once per epoch)")
    p.add_argument("--max-train-samples", type=int, help="a seeded subset of the train split each epoch")
    p.add_argument("--max-eval-samples", type=int)
    for action in p._actions:  # each flag's default, from the settings it overrides
        flag = action.dest
        if flag in FLAGS and "(default" not in (action.help or ""):
            action.help = f"{action.help or ''} {_default(flag)}".strip()
    return p


def resolve(args, quick: bool | None = None) -> dict:
    """Settings from defaults, the config file, flags and overrides (in that order). With no
    dataset named anywhere, the QUICK profile sits right above the defaults."""
    s = DEFAULTS
    if quick:
        s = merge(s, QUICK)
    if args.config:
        s = merge(s, load_yaml(args.config))
    for flag, (sec, key) in FLAGS.items():
        v = getattr(args, flag)
        if v is not None:
            s = merge(s, {sec: {key: v}})
    for o in args.overrides:
        s = merge(s, parse_override(o))
    if quick is None and s["data"]["root"] is None:
        return resolve(args, quick=True)
    return validate(s)


def main(argv=None) -> int:
    from rich.console import Console

    from fmfast.engine import distributed as dist
    from fmfast.engine.device import resolve_amp, resolve_device
    from fmfast.engine.runs import RunFolderTaken, find_resumable

    args = build_parser().parse_intermixed_args(argv)  # overrides may sit between flags
    s = resolve(args)
    console = Console(stderr=True, quiet=int(__import__("os").environ.get("RANK", "0")) != 0)
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

    resume = None
    if args.resume:
        if args.resume == "auto":
            if s["train"]["out"] is None:
                found = find_resumable(s)
                if found is not None:
                    s["train"]["out"] = str(found)
            if s["train"]["out"] is not None and (Path(s["train"]["out"]) / "last.pt").exists():
                resume = str(Path(s["train"]["out"]) / "last.pt")
        else:
            resume = args.resume
            if s["train"]["out"] is None:
                s["train"]["out"] = str(Path(resume).parent)
    if s["train"]["out"] is None:
        import os

        stamp = os.environ.get("FMFAST_RUN_STAMP") or time.strftime("%Y%m%d-%H%M%S")
        s["train"]["out"] = str(Path("runs") / f"{s['model']['name']}-{s['model']['task']}-{stamp}")

    from fmfast.engine.trainer import Trainer

    try:
        trainer = Trainer(s, resume=resume, console=console)
    except RunFolderTaken as e:
        raise SettingsError(f"{e} (--resume auto continues it; --out chooses another)") from None
    final = trainer.fit()
    if trainer.main and final:
        m = {k: v for k, v in final["test"].items() if not isinstance(v, list)}
        Console().print(metrics_table(m, f"{trainer.model_name} · {trainer.cfg.task} · test split, final"))
        console.print(f"run folder: {trainer.out}  (best.pt, last.pt, metrics.jsonl, curves.png, confusion.png)")
    dist.cleanup(trainer.world)
    return 0
