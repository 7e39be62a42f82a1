"""The masked multi-task loss against a hand computation; AUROC per task."""
import math
import warnings

import numpy as np
import pytest
import torch

from trainer.data import segment_max
from trainer.metrics import auroc_per_task, masked_bce_with_logits, nanmean

NAN = float("nan")


def _bce(z, y):
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_masked_bce_matches_hand_computation():
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.3]])
    labels = torch.tensor([[1.0, NAN, 0.0], [NAN, 1.0, NAN]])
    # three labelled entries: (0,0)=1, (0,2)=0, (1,1)=1; the mean is over those three only
    expected = (_bce(0.5, 1) + _bce(2.0, 0) + _bce(0.0, 1)) / 3
    assert masked_bce_with_logits(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_masked_entries_get_no_gradient():
    logits = torch.tensor([[0.5, -1.0], [1.5, 0.0]], requires_grad=True)
    labels = torch.tensor([[1.0, NAN], [NAN, 0.0]])
    masked_bce_with_logits(logits, labels).backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 0] == 0
    # d/dz mean BCE = (sigmoid(z) - y) / n_present
    assert logits.grad[0, 0].item() == pytest.approx((torch.sigmoid(torch.tensor(0.5)).item() - 1) / 2)


def test_all_masked_batch_is_zero_not_nan():
    loss = masked_bce_with_logits(torch.zeros(2, 2), torch.full((2, 2), NAN))
    assert loss.item() == 0.0


def test_single_task_equals_plain_bce():
    logits = torch.tensor([[0.3], [-2.0], [1.0]])
    labels = torch.tensor([[1.0], [0.0], [0.0]])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert masked_bce_with_logits(logits, labels).item() == pytest.approx(plain.item(), rel=1e-6)


def test_segment_max_is_the_study_max_and_routes_gradient():
    logits = torch.tensor([[0.1, 5.0], [0.7, -1.0], [0.2, 0.0], [-3.0, 2.0]], requires_grad=True)
    index = torch.tensor([0, 0, 0, 1])  # study 0 has three images, study 1 one
    out = segment_max(logits, index, 2)
    assert out.tolist() == [[pytest.approx(0.7), 5.0], [-3.0, 2.0]]
    out.sum().backward()
    assert logits.grad.tolist() == [[0, 1], [1, 0], [0, 1 * 0], [1, 1]]


def test_auroc_per_task_and_single_class_nan():
    labels = np.array([[1, 1], [0, 1], [1, NAN], [0, 1]], dtype=np.float32)
    probs = np.array([[0.9, 0.2], [0.1, 0.3], [0.6, 0.9], [0.7, 0.4]], dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="b is undefined"):
        out = auroc_per_task(labels, probs, ["a", "b"])
    # task a: positives 0.9, 0.6; negatives 0.1, 0.7 -> pairs won: (0.9>0.1, 0.9>0.7, 0.6>0.1) = 3/4
    assert out["a"] == 0.75
    assert math.isnan(out["b"])
    assert nanmean(out.values()) == 0.75
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(nanmean([NAN]))
