"""Evaluate a checkpoint on an FMF split: ``python -m fmfast.evaluate --checkpoint PATH``.

Reads fmfast checkpoints and the reference code's ``state_dict`` files alike; prints a table
and writes the metrics as JSON."""
from __future__ import annotations


import json
import time

import torch

from fmfast.cli import Parser
from fmfast.metrics import MetricAccumulator, abnormal


@torch.no_grad()
def evaluate(model, model_name: str, ds, batch_size: int, device, amp_dtype=None, max_samples: int = 0,
             progress=None, keep: int = 0, cuda_graphs: bool = False, cache: dict | None = None) -> tuple[dict, dict]:
    """Run ``model`` over ``ds`` in order -> ``(metrics, examples)``.

    ``examples`` holds ``keep`` inputs' clips, labels and predictions from across the split,
    mostly abnormal ones (for the mask overlay plots); ``metrics`` includes samples/s of the
    whole pass. ``cuda_graphs`` (CUDA): replay a forward captured at ``batch_size``; with ``ds``
    on the GPU the batch is gathered inside the graph. ``cache`` (a dict the caller keeps) reuses the capture across calls."""
    was_training = model.training
    model.eval()
    runner = _runner(model, model_name, ds, batch_size, device, amp_dtype, cuda_graphs and device.type == "cuda", cache)
    acc = MetricAccumulator(ds.task)
    # a subset is spread evenly over the split: its first samples would all come from one
    # recording and one event
    order = evenly_spread(len(ds), max_samples or len(ds))
    n = len(order)
    flags = []  # per batch, which samples are worth showing (abnormal by truth or prediction)
    task_id = progress.add_task("evaluate", total=n, loss=float("nan")) if progress is not None else None
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        logits, labels = runner(idx)
        acc.update(logits.float(), labels)
        if keep:  # kept on the device: reading it each batch would make the host wait for the GPU
            flags.append(abnormal(labels) | abnormal(logits.float().argmax(1)))
        if progress is not None:
            progress.update(task_id, advance=len(idx))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if progress is not None:
        progress.remove_task(task_id)
    examples = _examples(model, model_name, ds, device, amp_dtype, _picks(order, flags, batch_size), keep) if keep else {}
    model.train(was_training)
    metrics = acc.compute()
    metrics["samples"] = n
    metrics["samples_per_s"] = n / elapsed if elapsed > 0 else float("inf")
    return metrics, examples


def _picks(order: torch.Tensor, flags: list, batch_size: int) -> tuple[list, list]:
    """Sample indices worth showing, ``(abnormal, normal)``: each batch's first flagged and first
    unflagged sample (``flags[k]`` for the batch ``order[k*batch_size:...]``)."""
    picks: tuple[list, list] = ([], [])
    if not flags:
        return picks
    for idx, flag in zip(order.split(batch_size), torch.cat(flags).cpu().split(batch_size)):  # one device read
        for want, bucket in ((True, picks[0]), (False, picks[1])):
            hit = (flag == want).nonzero()
            if len(hit):
                bucket.append(int(idx[int(hit[0])]))
    return picks


def evenly_spread(total: int, k: int) -> torch.Tensor:
    """``min(k, total)`` indices into ``range(total)``, evenly spaced over all of it."""
    if k >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, k).round().long()


def _examples(model, model_name, ds, device, amp_dtype, picks, keep: int) -> dict:
    """Inputs, labels and predictions of ``keep`` samples, abnormal ones first (for the mask
    overlays): three quarters abnormal where there are enough, the rest normal."""
    from fmfast.stepping import EvalRunner

    flagged, normal = picks
    n_ab = min(len(flagged), keep - min(len(normal), keep // 4))
    idx = torch.tensor([flagged[i] for i in evenly_spread(len(flagged), n_ab)]
                       + [normal[i] for i in evenly_spread(len(normal), keep - n_ab)], dtype=torch.long)
    if not len(idx):
        return {}
    logits, labels = EvalRunner(model, model_name, ds, len(idx), device, amp_dtype, graph=False)(idx)
    logits = logits.float()
    return {"clips": ds.batch(idx)[0].cpu(), "labels": labels.cpu(), "pred": logits.argmax(1).cpu(),
            "prob": torch.softmax(logits, 1)[:, 1].cpu(), "keys": [ds.sample_key(int(i)) for i in idx]}


def _runner(model, model_name, ds, batch_size, device, amp_dtype, graph: bool, cache: dict | None):
    from fmfast.stepping import EvalRunner

    key = (id(model), id(ds), batch_size, amp_dtype, model_name, graph)
    if cache is not None and key in cache:
        return cache[key]
    runner = EvalRunner(model, model_name, ds, batch_size, device, amp_dtype, graph=graph)
    if cache is not None:
        cache[key] = runner
    return runner


def metrics_table(metrics: dict, title: str = "metrics"):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.4f}")
        elif isinstance(v, int):
            table.add_row(k, str(v))
        elif isinstance(v, list) and v and not isinstance(v[0], list):
            table.add_row(k, " ".join(f"{x:.4f}" for x in v))
    return table


def build_parser() -> Parser:
    p = Parser(prog="python -m fmfast.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="fmfast checkpoint (best.pt/last.pt) or a reference state_dict")
    p.add_argument("--data", default=None, help="dataset root (V1 or V2 layout); default: the built-in synthetic benchmark")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--task", choices=["classification", "segmentation"], help="required for reference state_dicts whose task is ambiguous")
    p.add_argument("--model", choices=["fmformer", "video", "current"], help="the model the checkpoint must hold")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--current-seconds", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-samples", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="off", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="replay a captured forward on CUDA (auto: on for CUDA devices)")
    p.add_argument("--out", default=None, help="JSON file for the metrics (default: next to the checkpoint)")
    return p


def main(argv=None) -> int:
    from pathlib import Path

    from rich.console import Console

    from fmfast.checkpoint import load_model
    from fmfast.cli import UserError, atomic_write
    from fmfast.data import FMFDataset
    from fmfast.data.cache import default_synthetic_root
    from fmfast.runner import resolve_amp, resolve_device
    from fmfast.progress import progress_bar

    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    model, meta = load_model(args.checkpoint, task=args.task, model_name=args.model)
    cfg, data = model.config, meta.get("data", {})
    root = args.data or data.get("root") or default_synthetic_root(console=console)
    if not Path(root).exists():
        raise UserError(f"{root}: data folder not found")
    ds = FMFDataset(
        root, split=args.split, task=cfg.task, train=False,
        num_frames=args.num_frames or data.get("num_frames", cfg.num_frames),
        stride=args.stride or data.get("stride", 1),
        current_seconds=args.current_seconds or data.get("current_seconds", cfg.current_len // 2),
    )
    from fmfast.device_data import fits_on_device
    from fmfast.stepping import use_graphs

    graphs, _ = use_graphs(args.cuda_graphs, device)
    model.to(device)
    if graphs and fits_on_device([ds], device):
        ds.to(device)  # one upload; every batch is then gathered inside the captured forward
    with progress_bar(console) as progress:
        metrics, _ = evaluate(model, meta["model_name"], ds, args.batch_size, device, amp, args.max_samples, progress,
                              cuda_graphs=graphs)
    metrics.update(checkpoint=str(args.checkpoint), data=str(root), split=args.split, model=meta["model_name"], task=cfg.task)
    Console().print(metrics_table(metrics, f"{meta['model_name']} · {cfg.task} · {args.split} split"))
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(f".{args.split}-metrics.json")
    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from fmfast.cli import run_main

    raise SystemExit(run_main(main))
