"""The anomaly-detection field's threshold-free metrics and the calibrated threshold, exact
(every distinct score is a threshold; no binning).

- ``best_f1_threshold(scores [N], target [N])``: the threshold t maximising F1 of ``score >= t``
  (t is one of the scores; ties share a decision);
- ``aupro(scores [B,W,H], masks [B,W,H])``: area under the per-region-overlap curve up to a
  false-positive rate of 0.3, divided by 0.3 (anomalib's AUPRO): each 8-connected anomalous
  region of each mask counts equally, its overlap being the fraction of its pixels at or above
  the threshold; the FPR is over all normal pixels; the curve is interpolated at the limit;
- ``components(masks [B,W,H] bool)``: those regions' labels (0 = background).

AUROC and AP are in ``metrics`` (``binary_auroc``, ``average_precision``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

FPR_LIMIT = 0.3
CHUNK = 256  # masks labelled at a time


def _tie_ends(sorted_desc: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the last position of each run of equal scores (a threshold's cut)."""
    last = torch.ones_like(sorted_desc, dtype=torch.bool)
    last[:-1] = sorted_desc[1:] != sorted_desc[:-1]
    return last


def best_f1_threshold(scores: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """``(threshold, f1)``: the score t for which ``score >= t`` has the highest F1 (the highest
    such t where several tie); ``(0.5, 0.0)`` without positives."""
    s, t = scores.double().cpu().reshape(-1), target.cpu().reshape(-1).bool()
    n_pos = int(t.sum())
    if n_pos == 0 or len(s) == 0:
        return 0.5, 0.0
    order = torch.argsort(s, descending=True, stable=True)
    s, t = s[order], t[order].double()
    tp = torch.cumsum(t, 0)
    cut = tp.new_tensor(range(1, len(s) + 1))  # predicted positives at each cut
    f1 = 2 * tp / (cut + n_pos)
    ends = _tie_ends(s)
    f1 = torch.where(ends, f1, torch.full_like(f1, -1.0))
    i = int(torch.argmax(f1))  # argmax returns the first maximum: the highest threshold
    return float(s[i]), float(f1[i])


def components(masks: torch.Tensor) -> torch.Tensor:
    """``[B, W, H]`` int64 labels of the 8-connected regions of ``masks`` (bool), 0 elsewhere;
    labels are unique across the batch. Min-label propagation by 3x3 max-pooling of negated
    labels until nothing changes (as many rounds as the widest region is long)."""
    m = masks.bool()
    B, W, H = m.shape
    idx = torch.arange(1, B * W * H + 1, device=m.device, dtype=torch.float64).view(B, 1, W, H)
    big = float(B * W * H + 1)
    lab = torch.where(m.view(B, 1, W, H), idx, torch.full_like(idx, big))
    while True:
        nxt = -F.max_pool2d(-lab, 3, stride=1, padding=1)
        nxt = torch.where(m.view(B, 1, W, H), nxt, torch.full_like(nxt, big))
        if torch.equal(nxt, lab):
            break
        lab = nxt
    lab = torch.where(m.view(B, 1, W, H), lab, torch.zeros_like(lab)).view(B, W, H).long()
    _, dense = torch.unique(lab, return_inverse=True)  # 0 stays 0: it is the smallest label
    return dense.view(B, W, H) if bool((lab == 0).any()) else dense.view(B, W, H) + 1


def aupro(scores: torch.Tensor, masks: torch.Tensor, fpr_limit: float = FPR_LIMIT) -> float:
    """Normalised area under PRO(FPR) for FPR in [0, fpr_limit] (see the module doc); NaN when
    the masks hold no anomalous or no normal pixel."""
    lab, n = [], 0
    for chunk in masks.split(CHUNK):  # the propagation holds a float64 copy of what it labels
        part = components(chunk).cpu()
        lab.append(torch.where(part > 0, part + n, part))
        n += int(part.max()) if part.numel() else 0
    lab = torch.cat(lab).reshape(-1)
    s = scores.double().reshape(-1).cpu()
    normal = lab == 0
    n_regions, n_normal = int(lab.max()), int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return float("nan")
    size = torch.bincount(lab, minlength=n_regions + 1).double()
    # each anomalous pixel moves the PRO by 1 / (regions * its region's size) when included
    w = torch.where(normal, torch.zeros_like(s), 1.0 / (n_regions * size[lab]))
    order = torch.argsort(s, descending=True, stable=True)
    ends = _tie_ends(s[order])
    pro = torch.cumsum(w[order], 0)[ends]
    fpr = torch.cumsum(normal[order].double(), 0)[ends] / n_normal
    pro, fpr = torch.cat([pro.new_zeros(1), pro]), torch.cat([fpr.new_zeros(1), fpr])
    # the curve up to the limit, interpolated at it
    k = int(torch.searchsorted(fpr, torch.tensor(fpr_limit, dtype=fpr.dtype), right=True))
    x, y = fpr[:k], pro[:k]
    if k < len(fpr) and x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        x = torch.cat([x, x.new_tensor([fpr_limit])])
        y = torch.cat([y, (y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)).reshape(1)])
    return float(torch.trapezoid(y, x) / fpr_limit)
