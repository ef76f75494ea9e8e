"""Evaluate a checkpoint on an FMF split: ``fmfast evaluate --checkpoint PATH``.

Reads fmfast checkpoints, the reference code's ``state_dict`` files and fmfast's exports (ONNX,
OpenVINO .xml, pt2; the official format with its FILE.json sidecar) alike; prints a table
and writes the metrics as JSON (next to the checkpoint unless --out). The decision metrics are
reported at p = 0.5 and, under ``at_threshold``, at the threshold calibrated on the validation
split during training (stored in best.pt; --threshold sets another). --save-predictions writes
per-sample scores, labels and sample keys (segmentation: a pixel-score summary too) as .npz."""
from __future__ import annotations

import json

from fmfast.cli.common import Parser, add_predictor_flags, metrics_table
from fmfast.errors import SettingsError


def build_parser(prog: str = "fmfast evaluate") -> Parser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("--checkpoint", required=True, help="fmfast checkpoint (best.pt/last.pt), a reference state_dict or an fmfast export (.onnx, .xml, .pt2)")
    p.add_argument("--data", default=None, help="dataset root (V1 or V2 layout) (default: the checkpoint's, else the built-in synthetic benchmark)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="the split to evaluate")
    p.add_argument("--task", choices=["classification", "segmentation"], help="required for reference state_dicts whose task is ambiguous")
    p.add_argument("--model", choices=["fmformer", "video", "current"], help="the model the checkpoint must hold")
    p.add_argument("--num-frames", type=int, help="clip length (default: the checkpoint's)")
    p.add_argument("--stride", type=int, help="frame step within a clip (default: the checkpoint's)")
    p.add_argument("--current-seconds", type=int, help="current window (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=128, help="samples per forward pass")
    p.add_argument("--max-samples", type=int, default=0, help="at most N samples, spread evenly over the split (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_predictor_flags(p)
    p.add_argument("--threshold", type=float, default=None,
                   help="p(abnormal) for the at_threshold metrics (default: the checkpoint's calibrated one, else 0.5)")
    p.add_argument("--save-predictions", metavar="FILE.npz", default=None,
                   help="write per-sample score, label, recording, frame (segmentation: pixel_mean, true_pixels, "
                        "predicted_pixels, pixel-score histograms)")
    p.add_argument("--out", default=None, help="JSON file for the metrics (default: next to the checkpoint)")
    return p


def main(argv=None) -> int:
    from pathlib import Path

    from rich.console import Console

    from fmfast.data import FMFDataset
    from fmfast.data.cache import default_synthetic_root
    from fmfast.engine.checkpoints import load_model
    from fmfast.engine.evaluation import evaluate
    from fmfast.engine.predictor import Predictor
    from fmfast.files import atomic_write, check_output
    from fmfast.progress import progress_bar

    args = build_parser().parse_args(argv)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:  # also refuses nan
        raise SettingsError(f"--threshold {args.threshold}: must lie in [0, 1]")
    if args.save_predictions and not args.save_predictions.endswith(".npz"):
        raise SettingsError(f"--save-predictions {args.save_predictions}: give a file name ending in .npz")
    console = Console(stderr=True)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(f".{args.split}-metrics.json")
    check_output(out, "file")  # before the evaluation, not after it
    model, meta = load_model(args.checkpoint, task=args.task, model_name=args.model)
    cfg, data = model.config, meta.get("data", {})
    root = args.data or data.get("root") or default_synthetic_root(console=console)
    if not Path(root).exists():
        raise SettingsError(f"{root}: data folder not found")
    ds = FMFDataset(
        root, split=args.split, task=cfg.task, train=False,
        num_frames=args.num_frames or data.get("num_frames", cfg.num_frames),
        stride=args.stride or data.get("stride", 1),
        current_seconds=args.current_seconds or data.get("current_seconds", cfg.current_len // 2),
    )
    pred = Predictor(model, args.device, args.precision, batch_size=args.batch_size, compile=args.compile, meta=meta)
    console.print(f"evaluating {len(ds) if not args.max_samples else min(args.max_samples, len(ds)):,} samples: {pred.path}")
    threshold = args.threshold if args.threshold is not None else meta.get("threshold")
    source = "given" if args.threshold is not None else "calibrated on validation" if threshold is not None else "none stored: 0.5"
    collect: dict = {}
    with progress_bar(console) as progress:
        metrics, _ = evaluate(pred, meta["model_name"], ds, args.batch_size, pred.device, max_samples=args.max_samples,
                              progress=progress, threshold=0.5 if threshold is None else threshold, collect=collect)
    metrics.pop("calibration", None)  # this split's own best threshold: chosen on the data it scores
    metrics["at_threshold"]["source"] = source
    metrics.update(checkpoint=str(args.checkpoint), data=str(root), split=args.split, model=meta["model_name"], task=cfg.task,
                   path=pred.path)
    table = dict(metrics)
    table.update({f"at_threshold/{k}": v for k, v in metrics["at_threshold"].items() if not isinstance(v, list)})
    Console().print(metrics_table(table, f"{meta['model_name']} · {cfg.task} · {args.split} split "
                                         f"(at 0.5; at_threshold: {source})"))
    if args.save_predictions:
        save_predictions(args.save_predictions, collect, ds, metrics["at_threshold"]["threshold"])
        console.print(f"wrote {args.save_predictions}")
    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    console.print(f"wrote {out}")
    return 0


def save_predictions(path, collect: dict, ds, threshold: float) -> None:
    """Per-sample outputs of an evaluation as .npz (atomic): the accumulator's arrays plus each
    sample's ``recording`` name and labelled ``frame``."""
    import numpy as np

    from fmfast.files import atomic_write

    arrays = collect["accumulator"].per_sample(threshold)
    keys = [ds.sample_key(int(i)) for i in collect["order"]]
    arrays.update(recording=np.array([k[0] for k in keys]), frame=np.array([k[1] for k in keys], dtype=np.int64),
                  threshold=np.float64(threshold))
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
