"""The bidirectional hinge triplet loss of Eq. 9 (VSE++ hardest negatives; DESIGN §5.9)."""

from __future__ import annotations

import torch
from torch import Tensor


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
    positives = scores.diagonal()
    not_negative = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    if same_image is not None:
        not_negative = not_negative | same_image
    # Row i compares image i's positive caption with its other captions (caption retrieval);
    # column j compares caption j's positive image with the other images (image retrieval).
    cost_caption = (margin + scores - positives.unsqueeze(1)).clamp(min=0).masked_fill(not_negative, 0)
    cost_image = (margin + scores - positives.unsqueeze(0)).clamp(min=0).masked_fill(not_negative, 0)
    if hardest:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()
