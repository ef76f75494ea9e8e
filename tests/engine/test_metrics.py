import math

import pytest
import torch

from fmfast.engine.metrics import (MetricAccumulator, average_precision, binary_auroc, classification_metrics, confusion,
                            segmentation_metrics)


def test_confusion_rows_are_truth_columns_prediction():
    pred = torch.tensor([0, 1, 1, 0, 1, 1])
    true = torch.tensor([0, 0, 1, 1, 1, 1])
    assert confusion(pred, true).tolist() == [[1, 1], [1, 3]]


def test_classification_metrics_match_hand_computation():
    # TN=50 FP=10 FN=5 TP=35
    m = classification_metrics(torch.tensor([[50, 10], [5, 35]]))
    assert m["accuracy"] == pytest.approx(85 / 100)
    assert m["precision"] == pytest.approx(35 / 45)
    assert m["recall"] == pytest.approx(35 / 40)
    p, r = 35 / 45, 35 / 40
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))
    assert m["fdr"] == pytest.approx(10 / 60)  # FP / (FP + TN), the paper's false detection rate
    assert m["mdr"] == pytest.approx(5 / 40)  # FN / (TP + FN), missed detection rate


def test_degenerate_confusion_gives_zeros_not_nan():
    m = classification_metrics(torch.tensor([[10, 0], [0, 0]]))
    assert m["precision"] == 0 and m["recall"] == 0 and m["f1"] == 0 and m["mdr"] == 0


def test_auroc_hand_examples():
    assert binary_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert binary_auroc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)  # a tie counts half
    assert binary_auroc(torch.tensor([0.9, 0.1]), torch.tensor([1, 0])) == 1.0
    assert math.isnan(binary_auroc(torch.tensor([0.3, 0.2]), torch.tensor([1, 1])))


def test_average_precision_hand_example():
    # ranked: 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 0.5*1 + 0.5*(2/3)
    ap = average_precision(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_segmentation_metrics_hand_example():
    cm = torch.tensor([[6, 2], [1, 3]])  # truth rows
    m = segmentation_metrics(cm, torch.tensor([[1, 0], [1, 2]]))
    assert m["pixel_accuracy"] == pytest.approx(9 / 12)
    assert m["class_pixel_accuracy"] == pytest.approx([6 / 8, 3 / 4])
    assert m["miou"] == pytest.approx((6 / 9 + 3 / 6) / 2)
    assert m["frame_accuracy"] == pytest.approx(3 / 4)


def test_accumulator_segmentation_frame_labels_from_masks():
    acc = MetricAccumulator("segmentation")
    target = torch.zeros(3, 4, 4, dtype=torch.long)
    target[1, 0, 0] = 1  # frame 1 abnormal
    logits = torch.zeros(3, 2, 4, 4)
    logits[:, 0] = 1.0
    logits[2, 1, 3, 3] = 5.0  # predicts a hot pixel in frame 2 only
    acc.update(logits, target)
    m = acc.compute()
    assert m["frame_confusion"] == [[1, 1], [1, 0]]
    assert m["frame_accuracy"] == pytest.approx(1 / 3)
    assert sum(map(sum, m["confusion"])) == 48


def test_confusion_matches_bincount_on_three_classes():
    g = torch.Generator().manual_seed(0)
    pred, true = torch.randint(0, 3, (500,), generator=g), torch.randint(0, 3, (500,), generator=g)
    assert torch.equal(confusion(pred, true, 3), torch.bincount(true * 3 + pred, minlength=9).view(3, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: metrics accumulated on the device")
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_cuda_accumulator_equals_cpu(task):
    g = torch.Generator().manual_seed(1)
    shape = (16,) if task == "classification" else (16, 8, 8)
    batches = [(torch.randn(16, 2, *shape[1:], generator=g), torch.randint(0, 2, shape, generator=g)) for _ in range(3)]
    cpu, gpu = MetricAccumulator(task), MetricAccumulator(task)
    for logits, target in batches:
        cpu.update(logits, target)
        gpu.update(logits.cuda(), target.cuda())
    assert gpu.compute() == pytest.approx(cpu.compute())
