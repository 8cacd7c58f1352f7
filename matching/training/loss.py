"""The bidirectional hinge triplet loss of Eq. 9 (VSE++ hardest negatives; docs/decisions.md, TSHSR item 9)."""

from __future__ import annotations

import torch
from torch import Tensor


def hinge_rows(scores: Tensor, positive: Tensor, margin: float, *, hardest: bool = True,
               not_negative: Tensor | None = None) -> Tensor:
    """Σ over rows of the hinge [α − s(row, positive) + s(row, negative)]₊, hardest or summed.

    Args:
        scores: (b, n) each row a query (an image, or a caption) against n candidates.
        positive: (b,) the column of each row's positive.
        not_negative: (b, n) bool, columns that are not negatives of the row (besides the positive).
    """
    rows = torch.arange(len(scores), device=scores.device)
    positive_scores = scores[rows, positive]  # (b,)
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    excluded[rows, positive] = True
    if not_negative is not None:
        excluded = excluded | not_negative
    cost = (margin + scores - positive_scores.unsqueeze(1)).clamp(min=0).masked_fill(excluded, 0)
    return cost.max(dim=1).values.sum() if hardest else cost.sum()


def hardest_negative_loss(scores: Tensor, margin: float = 0.2, *, hardest: bool = True,
                          same_image: Tensor | None = None) -> Tensor:
    """Hinge triplet loss over a batch's score matrix, both directions, summed.

    Args:
        scores: (B, B) scores of image i with caption j; the diagonal holds the positives.
        margin: α of Eq. 9.
        hardest: keep only the hardest negative per query (VSE++); False sums every
            violating negative (the warm-up that keeps training from collapsing).
        same_image: optional (B, B) bool, True where caption j also describes image i
            (two captions of one image in a batch); such pairs are not negatives.

    Returns: the scalar loss, Σ_i [α − s_ii + s_ij⁻]₊ + Σ_j [α − s_jj + s_i⁻j]₊.
    """
    diagonal = torch.arange(len(scores), device=scores.device)
    # Rows: image i's positive caption against its other captions (caption retrieval);
    # columns: caption j's positive image against the other images (image retrieval).
    by_image = hinge_rows(scores, diagonal, margin, hardest=hardest, not_negative=same_image)
    by_caption = hinge_rows(scores.t(), diagonal, margin, hardest=hardest,
                            not_negative=None if same_image is None else same_image.t())
    return by_image + by_caption
