"""Train FmFormer and the two single-modality baselines with the default command on the
built-in synthetic benchmark and put their test metrics into README.md.

    python tools/synthetic_results.py [--out runs/results] [--no-readme] [extra train args...]

Each model is trained by exactly ``python -m fmfast.train --model M --out OUT/M`` (plus any
extra arguments), so the table shows what a user gets from the README's main command.
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
           ("mdr", "MDR ↓"), ("auroc", "AUROC"), ("ap", "AP")]
ROOT = Path(__file__).resolve().parents[1]


def train(model: str, out: Path, extra: list[str]) -> tuple[dict, float]:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "fmfast.train", "--model", model, "--out", str(out), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    elapsed = time.perf_counter() - t0
    last = (out / "metrics.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["test"], elapsed


def table(rows: list[tuple[str, dict, float]]) -> str:
    head = "| model | " + " | ".join(c for _, c in COLUMNS) + " | train + eval time |"
    sep = "|---|" + "---:|" * (len(COLUMNS) + 1)
    lines = [head, sep]
    for name, m, secs in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k, _ in COLUMNS) + f" | {secs / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/results")
    p.add_argument("--no-readme", action="store_true")
    args, extra = p.parse_known_args()
    rows = []
    for model, name in MODELS:
        metrics, secs = train(model, Path(args.out) / model, extra)
        rows.append((name, metrics, secs))
    cmd = "python -m fmfast.train --model {fmformer,video,current}" + (" " + " ".join(extra) if extra else "")
    text = (f"Test split of the built-in synthetic benchmark, each model trained by `{cmd}` "
            f"(defaults otherwise) on {platform.machine()} with {torch.get_num_threads()} CPU threads, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Rerun with `python tools/synthetic_results.py`.\n\n"
            + table(rows) + "\n\nFDR = FP/(FP+TN) (false alarms), MDR = FN/(TP+FN) (missed anomalies).")
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
