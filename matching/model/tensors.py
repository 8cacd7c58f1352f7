"""Small tensor helpers shared by the encoders, the similarity head and the reasoning layers.

Each works on padded batches with a boolean mask (True at valid positions).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """x / (‖x‖₂ + eps) along `dim` (the reference code's form, so SGRAF weights give SGRAF's numbers).

    `vector_norm` has a zero gradient at x = 0, where sqrt(Σx²) has an infinite one:
    padded (all-zero) positions must not turn the gradients into NaN.
    """
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over `dim` that gives zero weight where `mask` is False (mask broadcasts to logits)."""
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (B, N, C) over the N positions where mask (B, N) is True → (B, C)."""
    weights = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def length_mask(lengths: Tensor, size: int) -> Tensor:
    """(B,) lengths → (B, size) bool, True at valid positions."""
    return torch.arange(size, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def xavier_init_(module: nn.Module) -> None:
    """The reference code's initialisation: Xavier-uniform Linear weights, zero biases, unit BatchNorm."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm1d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
