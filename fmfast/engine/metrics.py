"""Metrics of the FMF benchmark. Classification: the published accuracy, precision, recall,
F1, FDR = FP/(FP+TN) and MDR = FN/(TP+FN), plus AUROC and average precision. Segmentation:
pixel accuracy, per-class pixel accuracy, mIoU and the frame accuracy derived from masks
(a frame is abnormal when any pixel is), and the anomaly-detection field's pixel AUROC, AUPRO,
image AUROC and pixel F1 (ad_metrics.py). Each split also reports its F1-maximising threshold
(``calibration``); given a threshold, the decision metrics at it (``at_threshold``)."""
from __future__ import annotations

import torch


def _ratio(num, den) -> float:
    # an empty denominator means the quantity is undefined; report 0 rather than NaN so
    # tables and JSON stay readable (the confusion matrix is reported alongside)
    return float(num) / float(den) if den else 0.0


def abnormal(x: torch.Tensor) -> torch.Tensor:
    """Per sample, whether a class ``[B]`` or a mask ``[B, W, H]`` says abnormal (any pixel > 0)."""
    return (x.flatten(1) > 0).any(1) if x.dim() > 1 else x > 0


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """``[num_classes, num_classes]`` int64 counts on ``pred``'s device; rows are the truth,
    columns the prediction. One comparison per cell, summed: ``bincount`` on a GPU reads the
    largest index back to the host, and ``index_add`` would pile every pixel's atomic add onto
    the same few counters."""
    idx = target.reshape(-1).long().to(pred.device) * num_classes + pred.reshape(-1).long()
    cells = torch.arange(num_classes * num_classes, device=pred.device)
    return (idx[:, None] == cells).sum(0).reshape(num_classes, num_classes)


def binary_auroc(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction)."""
    scores, target = scores.double().cpu().reshape(-1), target.cpu().reshape(-1).bool()
    n_pos, n_neg = int(target.sum()), int((~target).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    s = scores[order]
    ranks = torch.empty_like(s)
    ranks[order] = _average_ranks(s)
    return float((ranks[target].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(sorted_scores: torch.Tensor) -> torch.Tensor:
    # ranks 1..n of an ascending array, ties sharing the mean of their ranks
    n = sorted_scores.numel()
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    return mean_rank[inverse] if n else sorted_scores


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """AP as the step-wise area under precision-recall (scikit-learn's definition)."""
    scores, target = scores.double().cpu().reshape(-1), target.cpu().reshape(-1).double()
    n_pos = target.sum()
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], target[order]
    tp, fp = torch.cumsum(t, 0), torch.cumsum(1 - t, 0)
    # only the last position of each run of tied scores is a threshold
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - prev) * precision).sum())


def classification_metrics(cm: torch.Tensor, scores=None, target=None) -> dict:
    tn, fp, fn, tp = (int(x) for x in cm.reshape(-1))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    out = {
        "accuracy": _ratio(tp + tn, tn + fp + fn + tp),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "fdr": _ratio(fp, fp + tn),
        "mdr": _ratio(fn, tp + fn),
        "confusion": [[tn, fp], [fn, tp]],
    }
    if scores is not None:
        out["auroc"] = binary_auroc(scores, target)
        out["ap"] = average_precision(scores, target)
    return out


def segmentation_metrics(cm: torch.Tensor, frame_cm: torch.Tensor) -> dict:
    cm = cm.double()
    diag = torch.diagonal(cm)
    per_class = [_ratio(diag[i], cm[i].sum()) for i in range(cm.shape[0])]
    iou = [_ratio(diag[i], cm[i].sum() + cm[:, i].sum() - diag[i]) for i in range(cm.shape[0])]
    return {
        "pixel_accuracy": _ratio(diag.sum(), cm.sum()),
        "class_pixel_accuracy": per_class,
        "miou": sum(iou) / len(iou),
        "iou": iou,
        "frame_accuracy": _ratio(torch.diagonal(frame_cm).sum(), frame_cm.sum()),
        "confusion": cm.long().tolist(),
        "frame_confusion": frame_cm.long().tolist(),
    }


class MetricAccumulator:
    """Collects predictions batch by batch and reports the task's metrics. Counts and scores
    stay on the logits' device until ``compute``, so on a GPU ``update`` never waits for it.

    Segmentation keeps every pixel's p(abnormal) (float32) and mask (uint8) for the exact
    threshold-free metrics: 5 bytes a pixel of the split."""

    def __init__(self, task: str, num_classes: int = 2):
        self.task, self.num_classes = task, num_classes
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.frame_cm = torch.zeros(2, 2, dtype=torch.long)
        self.scores, self.targets = [], []
        self.count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred = logits.argmax(1)
        self.cm = self.cm.to(pred.device) + confusion(pred, target, self.num_classes)
        self.count += logits.shape[0]
        self.scores.append(torch.softmax(logits.float(), 1)[:, 1])
        if self.task == "classification":
            self.targets.append(target)
        else:
            self.targets.append(target.to(torch.uint8))
            self.frame_cm = self.frame_cm.to(pred.device) + confusion(abnormal(pred), abnormal(target), 2)

    def _cat(self):
        if not self.scores:
            shape = (0,) if self.task == "classification" else (0, 1, 1)
            return torch.zeros(shape), torch.zeros(shape, dtype=torch.long)
        return torch.cat([s.cpu() for s in self.scores]), torch.cat([t.cpu() for t in self.targets])

    def compute(self, threshold: float | None = None) -> dict:
        """The metrics at p = 0.5 (argmax), ``calibration`` (this split's F1-maximising threshold)
        and, with ``threshold``, ``at_threshold`` (the decision metrics at ``p >= threshold``)."""
        from fmfast.engine.ad_metrics import aupro, best_f1_threshold

        cm, frame_cm = self.cm.cpu(), self.frame_cm.cpu()
        scores, targets = self._cat()
        if self.task == "classification":
            out = classification_metrics(cm, scores, targets)
            t, f1 = best_f1_threshold(scores, targets)
            out["calibration"] = {"threshold": t, "f1": f1}
            if threshold is not None:
                at = classification_metrics(confusion((scores >= threshold).long(), targets))
                out["at_threshold"] = {"threshold": float(threshold), **at}
            return out
        out = segmentation_metrics(cm, frame_cm)
        flat_s, flat_t = scores.reshape(-1), targets.reshape(-1)
        out["pixel_f1"] = classification_metrics(cm)["f1"]
        out["pixel_auroc"] = binary_auroc(flat_s, flat_t)
        out["aupro"] = aupro(scores, targets > 0)
        out["image_auroc"] = binary_auroc(scores.flatten(1).amax(1), abnormal(targets))
        t, f1 = best_f1_threshold(flat_s, flat_t)
        out["calibration"] = {"threshold": t, "pixel_f1": f1}
        if threshold is not None:
            seg = segmentation_metrics(confusion((scores >= threshold).long(), targets), frame_cm)
            pix = classification_metrics(confusion((flat_s >= threshold).long(), flat_t))
            out["at_threshold"] = {"threshold": float(threshold), "pixel_f1": pix["f1"], "miou": seg["miou"],
                                   "pixel_accuracy": seg["pixel_accuracy"]}
        return out

    def per_sample(self, threshold: float = 0.5) -> dict:
        """numpy arrays per sample: ``score`` (p(abnormal); segmentation: the largest pixel's) and
        ``label``; segmentation adds ``pixel_mean``, ``true_pixels``, ``predicted_pixels`` (p >=
        threshold) and 100-bin histograms of pixel scores over normal / abnormal pixels."""
        scores, targets = self._cat()
        if self.task == "classification":
            return {"score": scores.numpy(), "label": targets.numpy()}
        flat = scores.flatten(1)
        t = targets.flatten(1) > 0
        bins = dict(bins=100, min=0.0, max=1.0)
        return {"score": flat.amax(1).numpy(), "label": t.any(1).long().numpy(), "pixel_mean": flat.mean(1).numpy(),
                "true_pixels": t.sum(1).numpy(), "predicted_pixels": (flat >= threshold).sum(1).numpy(),
                "pixel_hist_normal": torch.histc(flat[~t], **bins).long().numpy(),
                "pixel_hist_abnormal": torch.histc(flat[t], **bins).long().numpy()}
