"""Train FmFormer (or a single-modality baseline) on the FMF benchmark, your own recordings,
or — with no arguments — the built-in synthetic furnace benchmark.

    python -m fmfast.train                                   # synthetic data, FmFormer, classification
    python -m fmfast.train --data /data/FMFBenchmarkV2/pixel-level --task segmentation
    python -m fmfast.train --config configs/CfgForViCu_Cls.yaml train.batch_size=128 model.depth=4
    torchrun --nproc_per_node 2 -m fmfast.train ...          # DistributedDataParallel
"""
from __future__ import annotations

import argparse

import time
from pathlib import Path

from fmfast.cli import Parser, UserError
from fmfast.settings import (AMP, DEFAULTS, MODEL_NAMES, OPTIMIZERS, QUICK, SCHEDULES, load_yaml, merge, model_config,
                             parse_override, validate)

# flag -> (section, key); flags left unset do not override the config file
FLAGS = {
    "data": ("data", "root"), "num_frames": ("data", "num_frames"), "stride": ("data", "stride"),
    "current_seconds": ("data", "current_seconds"), "task": ("model", "task"), "model": ("model", "name"),
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("optim", "lr"),
    "optimizer": ("optim", "name"), "weight_decay": ("optim", "weight_decay"), "momentum": ("optim", "momentum"),
    "schedule": ("schedule", "name"), "amp": ("train", "amp"), "device": ("train", "device"),
    "seed": ("train", "seed"), "out": ("train", "out"), "checkpoint_every": ("train", "checkpoint_every"),
    "max_train_samples": ("train", "max_train_samples"), "max_eval_samples": ("train", "max_eval_samples"),
    "cuda_graphs": ("train", "cuda_graphs"),
}


def build_parser() -> Parser:
    p = Parser(prog="python -m fmfast.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. model.depth=4")
    p.add_argument("--config", help="YAML settings: fmfast's own or the reference code's CfgFor*.yaml")
    p.add_argument("--data", help="dataset root (FMF V2 folder or V1 .mat); default: built-in synthetic benchmark")
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
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", nargs="?", const="auto", help="auto (the run folder's last.pt) or a checkpoint path")
    p.add_argument("--out", help="run folder (default: runs/<model>-<task>-<time>)")
    p.add_argument("--checkpoint-every", type=int, help="steps between last.pt writes (default: each epoch)")
    p.add_argument("--max-train-samples", type=int, help="a seeded subset of the train split each epoch")
    p.add_argument("--max-eval-samples", type=int)
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


def _find_resumable(s: dict) -> Path | None:
    """For ``--resume auto`` without ``--out``: the newest run folder of the same run."""
    from fmfast.trainer import _comparable
    import yaml

    runs = sorted(Path("runs").glob("*/last.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for last in runs:
        try:
            old = yaml.safe_load((last.parent / "config.yaml").read_text())
        except Exception:
            continue
        if _comparable(old) == _comparable(s):
            return last.parent
    return None


def main(argv=None) -> int:
    from rich.console import Console

    from fmfast import distributed as dist

    args = build_parser().parse_intermixed_args(argv)  # overrides may sit between flags
    s = resolve(args)
    console = Console(stderr=True, quiet=int(__import__("os").environ.get("RANK", "0")) != 0)
    from fmfast.runner import resolve_amp, resolve_device

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
        raise UserError(f"{d['root']}: data folder not found")
    d["root"] = str(Path(d["root"]).resolve())

    resume = None
    if args.resume:
        if args.resume == "auto":
            if s["train"]["out"] is None:
                found = _find_resumable(s)
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

    from fmfast.trainer import Trainer

    trainer = Trainer(s, resume=resume, console=console)
    final = trainer.fit()
    if trainer.main and final:
        from fmfast.evaluate import metrics_table

        m = {k: v for k, v in final["test"].items() if not isinstance(v, list)}
        Console().print(metrics_table(m, f"{trainer.model_name} · {trainer.cfg.task} · test split, final"))
        console.print(f"run folder: {trainer.out}  (best.pt, last.pt, metrics.jsonl, curves.png, confusion.png)")
    dist.cleanup(trainer.world)
    return 0


if __name__ == "__main__":
    from fmfast.cli import run_main

    raise SystemExit(run_main(main))
