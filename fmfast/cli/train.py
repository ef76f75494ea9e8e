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

from fmfast.cli.common import Parser, metrics_table
from fmfast.engine import api
from fmfast.engine.settings import AMP, DEFAULTS, FLAGS, MODEL_NAMES, OPTIMIZERS, QUICK, SCHEDULES


def _default(flag: str) -> str:
    """``(default: X)``, or ``(default: X; with no --data: Y)`` where the CPU profile differs."""
    sec, key = FLAGS[flag]
    base = DEFAULTS[sec][key]
    quick = QUICK.get(sec, {}).get(key, base)
    if base is None and flag == "data":
        return "(default: the built-in synthetic benchmark)"
    if base is None:
        return {"out": "(default: runs/<model>-<task>-<time>)", "val_split": "(default: none)"}.get(flag, "")
    if flag == "monitor":
        return ""
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
    p.add_argument("--amp", choices=AMP, help="mixed precision (auto: bf16 on CUDA and on CPUs with native bf16, else off)")
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
    p.add_argument("--max-eval-samples", type=int, help="evenly spread validation/test samples evaluated")
    p.add_argument("--val-fraction", type=float, help="validation samples carved from the end of each recording's "
                   "train samples, behind a guard gap of one clip span plus one current window")
    p.add_argument("--val-split", help="JSON {\"<name>.mat\": [train frames]}: the validation samples instead")
    p.add_argument("--monitor", help="validation metric best.pt is chosen on, e.g. val/auroc "
                   "(default: val/f1; segmentation: val/miou)")
    p.add_argument("--patience", type=int, help="stop after N epochs without improvement (0: never)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    for action in p._actions:  # each flag's default, from the settings it overrides
        flag = action.dest
        if flag in FLAGS and "(default" not in (action.help or ""):
            action.help = f"{action.help or ''} {_default(flag)}".strip()
    return p


def resolve(args) -> dict:
    """Settings from defaults, the config file, flags and overrides (``fmfast.engine.api.resolve``)."""
    flags = {flag: getattr(args, flag) for flag in FLAGS}
    return api.resolve(config=args.config, flags=flags, overrides=args.overrides)


def main(argv=None) -> int:
    from rich.console import Console

    from fmfast.engine import distributed as dist

    args = build_parser().parse_intermixed_args(argv)  # overrides may sit between flags
    s = resolve(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(s, sort_keys=False), end="")
        return 0
    console = Console(stderr=True, quiet=int(__import__("os").environ.get("RANK", "0")) != 0)
    trainer = api.start(s, resume=args.resume, console=console)
    result = trainer.fit()
    if trainer.main and result["test"]:
        m = {k: v for k, v in result["test"].items() if not isinstance(v, (list, dict))}
        for sub in ("at_threshold", "calibration"):
            m.update({f"{sub}/{k}": v for k, v in result["test"].get(sub, {}).items() if not isinstance(v, list)})
        Console().print(metrics_table(m, f"{trainer.model_name} · {trainer.cfg.task} · test split, once, "
                                         f"best.pt (epoch {result['selected_by']['epoch']})"))
        console.print(f"run folder: {trainer.out}  (best.pt, last.pt, metrics.jsonl, metrics.csv, curves.png, confusion.png)")
    dist.cleanup(trainer.world)
    return 0
