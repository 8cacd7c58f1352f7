"""The hinge triplet loss (Eq. 9) with hardest negatives, on a matrix computed by hand."""

from __future__ import annotations

import pytest
import torch

from matching.training.loss import hardest_negative_loss

SCORES = torch.tensor([[0.9, 0.5, 0.8],
                       [0.3, 0.6, 0.1],
                       [0.7, 0.65, 0.4]])


def test_hardest_negatives_by_hand():
    # Rows (caption retrieval): image 0: max(0.2-0.9+0.5, 0.2-0.9+0.8)=0.1; image 1: 0.2-0.6+0.3=-0.1→0;
    # image 2: 0.2-0.4+0.7=0.5.  Columns (image retrieval): caption 0: 0.2-0.9+0.7=0.0;
    # caption 1: max(0.2-0.6+0.5, 0.2-0.6+0.65)=0.25; caption 2: 0.2-0.4+0.8=0.6.
    loss = hardest_negative_loss(SCORES, 0.2)
    assert loss.item() == pytest.approx(0.1 + 0.0 + 0.5 + 0.0 + 0.25 + 0.6)


def test_sum_over_all_negatives_by_hand():
    rows = [max(0, 0.2 - 0.9 + 0.5) + max(0, 0.2 - 0.9 + 0.8), max(0, 0.2 - 0.6 + 0.3) + 0,
            max(0, 0.2 - 0.4 + 0.7) + max(0, 0.2 - 0.4 + 0.65)]
    cols = [max(0, 0.2 - 0.9 + 0.3) + max(0, 0.2 - 0.9 + 0.7), max(0, 0.2 - 0.6 + 0.5) + max(0, 0.2 - 0.6 + 0.65),
            max(0, 0.2 - 0.4 + 0.8) + max(0, 0.2 - 0.4 + 0.1)]
    assert hardest_negative_loss(SCORES, 0.2, hardest=False).item() == pytest.approx(sum(rows) + sum(cols))


def test_pairs_of_the_same_image_are_not_negatives():
    same = torch.zeros(3, 3, dtype=torch.bool)
    same[2, 0] = same[0, 2] = True  # caption 0 and caption 2 describe the same image
    # image 2 row: only caption 1 is a negative: 0.2-0.4+0.65 = 0.45; image 0 row: caption 1: 0.2-0.9+0.5<0.
    # column 0: image 1: 0.2-0.9+0.3 < 0; column 2: image 1: 0.2-0.4+0.1 < 0 → 0; column 1 unchanged 0.25.
    loss = hardest_negative_loss(SCORES, 0.2, same_image=same)
    assert loss.item() == pytest.approx(0.0 + 0.0 + 0.45 + 0.0 + 0.25 + 0.0)


def test_collapsed_scores_give_two_b_margin():
    """Every score equal: each of the 2B hinge terms is exactly the margin (the collapse signature)."""
    assert hardest_negative_loss(torch.full((4, 4), 0.5), 0.2).item() == pytest.approx(2 * 4 * 0.2)


def test_gradient_flows_to_positive_and_hardest_negative_only():
    scores = SCORES.clone().requires_grad_(True)
    hardest_negative_loss(scores, 0.2).backward()
    grad = scores.grad
    assert grad[0, 2] > 0 and grad[0, 1] == 0  # image 0's hardest negative caption is caption 2
    assert grad[0, 0] < 0
