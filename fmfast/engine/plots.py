"""Pictures people would rather see than read: training curves, the confusion matrix and
predicted/true hot-spot masks overlaid on frames. Written as PNG, atomically."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from fmfast.files import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def curves(path: Path, history: list[dict], losses: list[float], task: str) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        ax1.plot(np.arange(1, len(losses) + 1), losses, lw=0.6, alpha=0.4, label="per step")
        k = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax1.plot(np.arange(k, len(losses) + 1), smooth, lw=1.5, label=f"mean of {k}")
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    if losses and min(losses) > 0:
        ax1.set_yscale("log")  # the first steps' loss would otherwise flatten the rest
    ax1.legend(frameon=False)
    history = [h for h in history if "val" in h]
    epochs = [h["epoch"] for h in history]
    keys = ["accuracy", "f1", "auroc", "fdr", "mdr"] if task == "classification" else ["pixel_accuracy", "miou", "frame_accuracy"]
    for k in keys:
        ax2.plot(epochs, [h["val"].get(k, np.nan) for h in history], marker="o", label=k)
    ax2.set(xlabel="epoch", ylabel="validation metric", title="validation metrics", ylim=(-0.02, 1.02))
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    if history:  # no validation split: no metric curves
        ax2.legend(frameon=False, fontsize=8)
    _save(fig, path)


def confusion_matrix(path: Path, cm, labels=("normal", "abnormal"), title: str = "confusion matrix") -> None:
    cm = np.asarray(cm, dtype=float)
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j]):,}\n{norm[i, j]:.1%}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="true", title=title)
    _save(fig, path)


def display_frame(clip) -> np.ndarray:
    """Last frame of a ``[3,T,W,H]`` clip as an ``[H,W,3]`` image (stored axes are transposed)."""
    return np.asarray(clip[:, -1]).transpose(2, 1, 0)


def mask_overlays(path: Path, clips, true_masks, pred_masks, titles=None) -> None:
    """Rows of (frame, true mask, predicted mask) overlays; masks in the stored ``[W,H]`` order."""
    n = len(clips)
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n), squeeze=False)
    for r in range(n):
        img = display_frame(clips[r])
        for c, (mask, name, color) in enumerate([(None, "frame", None), (true_masks[r], "true", (0, 1, 0)), (pred_masks[r], "predicted", (1, 0, 0))]):
            ax = axes[r, c]
            ax.imshow(img)
            if mask is not None:
                m = np.asarray(mask).T > 0
                overlay = np.zeros((*m.shape, 4))
                overlay[m] = (*color, 0.45)
                ax.imshow(overlay)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
        if titles:
            axes[r, 0].set_ylabel(titles[r], fontsize=7)
    _save(fig, path)


def training_report(out: Path, history, losses, task: str, examples: dict | None) -> None:
    out = Path(out)
    curves(out / "curves.png", history, losses, task)
    # the final row's test metrics once the run is done, else the last epoch's validation ones
    last = (history[-1].get("test") or history[-1].get("val") or {}) if history else {}
    if task == "classification" and "confusion" in last:
        confusion_matrix(out / "confusion.png", last["confusion"])
    elif task == "segmentation":
        if "frame_confusion" in last:
            confusion_matrix(out / "confusion.png", last["frame_confusion"], title="frame-level confusion")
        if examples:
            titles = [f"{k[0]} #{k[1]}" for k in examples["keys"]]
            mask_overlays(out / "masks.png", examples["clips"], examples["labels"], examples["pred"], titles)
