"""Train FmFormer and the two single-modality baselines with the default command on the
built-in synthetic benchmark, over several seeds, and put their test metrics (mean ± std) into
README.md.

    python tools/synthetic_results.py [--out runs/results] [--seeds 0 1 2] [--no-readme] [extra train args...]

Each run is exactly ``python -m fmfast.train --model M --seed S --out OUT/M-S`` (plus any extra
arguments), so the table shows what a user gets from the README's main command: best.pt chosen
on the validation split, the test split evaluated once with it (the final row of metrics.jsonl).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = [("fmformer", "FmFormer (video + current)"), ("video", "video only"), ("current", "current only")]
COLUMNS = [("accuracy", "Acc"), ("precision", "Prec"), ("recall", "Rec"), ("f1", "F1"), ("fdr", "FDR ↓"),
           ("mdr", "MDR ↓"), ("auroc", "AUROC"), ("ap", "AP"), ("at_threshold/f1", "F1 @ val threshold")]
ROOT = Path(__file__).resolve().parents[1]


def train(model: str, out: Path, extra: list[str]) -> tuple[dict, float]:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "fmfast.train", "--model", model, "--out", str(out), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    elapsed = time.perf_counter() - t0
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final.get("final"), f"{out}: the run did not end with its test row"
    m = final["test"]
    return {**m, "at_threshold/f1": m["at_threshold"]["f1"]}, elapsed


def by_scenario(run: Path) -> dict[str, tuple[float, float]]:
    """Per synthetic scenario, over its event frames in the test samples the run evaluated on:
    (share truly abnormal, share the run's final model flags abnormal)."""
    import yaml

    from fmfast.engine.checkpoints import load_model
    from fmfast.data import FMFDataset
    from fmfast.engine.evaluation import evenly_spread
    from fmfast.engine.step import EvalRunner

    model, meta = load_model(run / "best.pt")
    d = meta["data"]
    ds = FMFDataset(d["root"], split="test", num_frames=d["num_frames"], stride=d["stride"],
                    current_seconds=d["current_seconds"])
    segments = json.loads((Path(d["root"]) / "synthetic.json").read_text())["recordings"]
    runner = EvalRunner(model.eval(), meta["model_name"], ds, 256, torch.device("cpu"), None, graph=False)
    max_eval = yaml.safe_load((run / "config.yaml").read_text())["train"]["max_eval_samples"]
    order = evenly_spread(len(ds), max_eval or len(ds))
    seen: dict[str, list[tuple[int, int]]] = {}
    with torch.no_grad():
        for start in range(0, len(order), 256):
            idx = order[start:start + 256]
            logits, labels = runner(idx)
            for i, y, p in zip(idx.tolist(), labels.tolist(), logits.argmax(1).tolist()):
                name, f = ds.sample_key(i)
                seg = next(g for g in segments[name]["segments"] if g["start"] <= f < g["end"])
                if seg["event"][0] <= f < seg["event"][1]:
                    seen.setdefault(seg["kind"], []).append((y, p))
    return {k: (sum(y for y, _ in v) / len(v), sum(p for _, p in v) / len(v)) for k, v in seen.items()}


def scenario_table(names: list[str], per_model: list[dict]) -> str:
    from fmfast.data.furnace import SCENARIOS

    lines = ["| scenario (event frames) | truly abnormal | " + " | ".join(f"{n}: flagged" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for kind in SCENARIOS:
        if kind in per_model[0]:
            truth = per_model[0][kind][0]
            lines.append(f"| {kind} | {truth:.0%} | " + " | ".join(f"{m[kind][1]:.0%}" for m in per_model) + " |")
    return "\n".join(lines)


def table(rows: list[tuple[str, list[dict], list[float]]]) -> str:
    """One line per model: mean ± sample std over its seeds' runs."""
    import numpy as np

    head = "| model | " + " | ".join(c for _, c in COLUMNS) + " | train + eval time |"
    sep = "|---|" + "---:|" * (len(COLUMNS) + 1)
    lines = [head, sep]
    for name, runs, secs in rows:
        cell = lambda v: f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"  # noqa: E731
        lines.append(f"| {name} | " + " | ".join(cell([m[k] for m in runs]) for k, _ in COLUMNS)
                     + f" | {np.mean(secs) / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-readme", action="store_true")
    args, extra = p.parse_known_args()
    rows, scenarios = [], []
    for model, name in MODELS:
        runs = [train(model, Path(args.out) / f"{model}-{seed}", ["--seed", str(seed), *extra]) for seed in args.seeds]
        rows.append((name, [m for m, _ in runs], [t for _, t in runs]))
        scenarios.append(by_scenario(Path(args.out) / f"{model}-{args.seeds[0]}"))
    cmd = "python -m fmfast.train --model {fmformer,video,current} --seed S" + (" " + " ".join(extra) if extra else "")
    text = (f"Test split of the built-in synthetic benchmark, mean ± std over seeds {args.seeds}, each model trained by "
            f"`{cmd}` (defaults otherwise: best.pt chosen on val F1, test evaluated once with it) on "
            f"{platform.machine()} with {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}. F1 @ val threshold: at the threshold calibrated on validation. "
            "Rerun with `python tools/synthetic_results.py`.\n\n"
            + table(rows) + "\n\nFDR = FP/(FP+TN) (false alarms), MDR = FN/(TP+FN) (missed anomalies).\n\n"
            "Why, per scenario of the synthetic furnace (the share of each scenario's event frames that "
            f"each model's seed-{args.seeds[0]} best.pt flags as abnormal):\n\n" + scenario_table([n.split(" (")[0] for _, n in MODELS], scenarios))
    print(text)
    (Path(args.out) / "results.md").write_text(text + "\n")
    if not args.no_readme:
        readme = ROOT / "README.md"
        s = readme.read_text()
        s = re.sub(r"(<!-- results:begin -->\n).*?(\n<!-- results:end -->)", lambda m: m.group(1) + text + m.group(2), s, flags=re.S)
        readme.write_text(s)
        print(f"updated {readme}")


if __name__ == "__main__":
    main()
