"""The anomaly-detection metrics against scikit-learn (and scipy's labelling) on random cases
with ties, and the threshold calibration on a hand-made score set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the oracle (pip install -e .[dev])")
ndimage = pytest.importorskip("scipy.ndimage")

from fmfast.engine.ad_metrics import aupro, best_f1_threshold, components  # noqa: E402
from fmfast.engine.metrics import MetricAccumulator, average_precision, binary_auroc  # noqa: E402

SEEDS = range(6)


def tied_scores(rng, n, levels=7):
    """Scores on a coarse grid, so that many tie."""
    return np.round(rng.random(n) * levels) / levels


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_and_ap_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.3
    s = tied_scores(rng, 300) + 0.3 * y * rng.random(300)
    s = np.round(s, 1)
    assert binary_auroc(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    assert average_precision(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(
        sklearn_metrics.average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_best_f1_threshold_is_the_best_over_every_cut(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.4
    s = tied_scores(rng, 200, levels=11) * 0.7 + 0.3 * y
    t, f1 = best_f1_threshold(torch.from_numpy(s), torch.from_numpy(y))
    assert f1 == pytest.approx(sklearn_metrics.f1_score(y, s >= t), abs=1e-12)
    assert f1 == pytest.approx(max(sklearn_metrics.f1_score(y, s >= c) for c in np.unique(s)), abs=1e-12)


def test_threshold_calibration_on_a_hand_made_set():
    # p:     0.9  0.8  0.8  0.7  0.4  0.3  0.2
    # truth:  1    1    0    1    0    0    1
    # F1 of p >= cut: 0.9: 2/5, 0.8 (both tied): 4/7, 0.7: 6/8, 0.4: 6/9, 0.3: 6/10, 0.2: 8/11
    s = torch.tensor([0.9, 0.8, 0.8, 0.7, 0.4, 0.3, 0.2])
    y = torch.tensor([1, 1, 0, 1, 0, 0, 1])
    t, f1 = best_f1_threshold(s, y)
    assert t == pytest.approx(0.7) and f1 == pytest.approx(0.75)
    assert best_f1_threshold(s, torch.zeros(7, dtype=torch.long)) == (0.5, 0.0)  # no positives: no calibration


def random_masks(rng, b=3, w=14, h=11):
    seeds = rng.random((b, w, h)) < 0.08
    return ndimage.binary_dilation(seeds, structure=np.ones((1, 2, 3)))


@pytest.mark.parametrize("seed", SEEDS)
def test_components_are_scipy_8_connected_regions(seed):
    masks = random_masks(np.random.default_rng(seed))
    got = components(torch.from_numpy(masks)).numpy()
    want, n = np.zeros_like(got), 0
    for b in range(len(masks)):
        lab, k = ndimage.label(masks[b], structure=np.ones((3, 3)))
        want[b] = np.where(lab > 0, lab + n, 0)
        n += k
    assert got.max() == n and len(set(zip(got.ravel(), want.ravel()))) == n + 1  # the same partition


def sklearn_aupro(scores, masks, limit=0.3):
    """PRO(FPR) is a weighted ROC: normal pixels weigh 1, a region's pixels 1/(regions * its size)."""
    lab = np.zeros(masks.shape, np.int64)
    n = 0
    for b in range(len(masks)):
        lb, k = ndimage.label(masks[b], structure=np.ones((3, 3)))
        lab[b] = np.where(lb > 0, lb + n, 0)
        n += k
    flat = lab.ravel()
    w = np.where(flat > 0, 1.0 / (n * np.bincount(flat)[flat]), 1.0)
    fpr, tpr, _ = sklearn_metrics.roc_curve(flat > 0, scores.ravel(), sample_weight=w, drop_intermediate=False)
    k = np.searchsorted(fpr, limit, side="right")
    x, y = list(fpr[:k]), list(tpr[:k])
    if x[-1] < limit:
        x.append(limit)
        y.append(np.interp(limit, fpr, tpr))
    return sklearn_metrics.auc(x, y) / limit


@pytest.mark.parametrize("seed", SEEDS)
def test_aupro_matches_a_sklearn_weighted_roc(seed):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng)
    scores = tied_scores(rng, masks.size).reshape(masks.shape) * 0.8 + 0.4 * masks * rng.random(masks.shape)
    assert aupro(torch.from_numpy(scores), torch.from_numpy(masks)) == pytest.approx(sklearn_aupro(scores, masks), abs=1e-9)


def test_aupro_of_a_perfect_and_an_inverted_map():
    masks = random_masks(np.random.default_rng(0))
    m = torch.from_numpy(masks)
    assert aupro(m.double(), m) == pytest.approx(1.0)
    assert aupro(1.0 - m.double(), m) == pytest.approx(0.0)
    assert np.isnan(aupro(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)))


def test_segmentation_accumulator_reports_the_field_metrics():
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(random_masks(rng, b=6)).long()
    p = torch.from_numpy(rng.random(masks.shape)) * 0.6 + 0.4 * masks
    logits = torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], 1).float()  # softmax(.)[:, 1] == p
    acc = MetricAccumulator("segmentation")
    acc.update(logits[:4], masks[:4])
    acc.update(logits[4:], masks[4:])
    m = acc.compute(threshold=0.55)
    pf, yf = acc._cat()[0].numpy(), masks.numpy()
    assert m["pixel_auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(yf.ravel(), pf.ravel()), abs=1e-9)
    assert m["aupro"] == pytest.approx(sklearn_aupro(pf, yf > 0), abs=1e-9)
    img = yf.reshape(6, -1).any(1)
    if 0 < img.sum() < 6:
        assert m["image_auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(img, pf.reshape(6, -1).max(1)), abs=1e-9)
    assert m["at_threshold"]["pixel_f1"] == pytest.approx(sklearn_metrics.f1_score(yf.ravel(), pf.ravel() >= 0.55), abs=1e-9)
    assert m["calibration"]["pixel_f1"] >= m["at_threshold"]["pixel_f1"]
    per = acc.per_sample(0.55)
    assert per["score"].shape == (6,) and per["pixel_hist_normal"].sum() + per["pixel_hist_abnormal"].sum() == masks.numel()


def test_classification_accumulator_at_a_threshold():
    p = torch.tensor([0.9, 0.6, 0.45, 0.3, 0.2, 0.1])
    y = torch.tensor([1, 0, 1, 1, 0, 0])
    logits = torch.stack([torch.zeros(6), torch.log(p / (1 - p))], 1)
    acc = MetricAccumulator("classification")
    acc.update(logits, y)
    m = acc.compute(threshold=0.25)
    assert m["f1"] == pytest.approx(sklearn_metrics.f1_score(y, p > 0.5))
    assert m["at_threshold"]["f1"] == pytest.approx(sklearn_metrics.f1_score(y, p >= 0.25))
    assert m["calibration"]["threshold"] == pytest.approx(0.3)


def test_aupro_labels_masks_in_chunks_without_merging_regions(monkeypatch):
    import fmfast.engine.ad_metrics as ad

    rng = np.random.default_rng(7)
    masks = random_masks(rng, b=7)
    scores = tied_scores(rng, masks.size).reshape(masks.shape) * 0.8 + 0.4 * masks
    monkeypatch.setattr(ad, "CHUNK", 2)  # 4 chunks, the last one short
    assert ad.aupro(torch.from_numpy(scores), torch.from_numpy(masks)) == pytest.approx(sklearn_aupro(scores, masks), abs=1e-9)
