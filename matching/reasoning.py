"""Reasoning over similarity nodes: HSR (the paper, Eq. 4-6) and SGR (SGRAF, for Table IV).

Both take nodes S (N, n, m) with a node mask (N, n) and return updated nodes
of the same shape. Padded nodes never influence valid ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from matching.tensors import masked_softmax, xavier_init_


class HSRLayer(nn.Module):
    """One hierarchical similarity reasoning layer (DESIGN §5.6).

    R  = softmax_rows(φ(S) ψ(S)ᵀ)          relation matrix (Eq. 4; `relation_norm="none"` keeps it raw)
    R' = R ⊙ sigmoid(conv3×3(R))           context gate over neighbouring node pairs (Eq. 5)
    S* = S + W_r(R' · W_g(S))              message passing with a residual (Eq. 6)
    """

    def __init__(self, sim_dim: int, relation_norm: str = "softmax") -> None:
        super().__init__()
        self.relation_norm = relation_norm
        self.phi = nn.Linear(sim_dim, sim_dim)
        self.psi = nn.Linear(sim_dim, sim_dim)
        self.context = nn.Conv2d(1, 1, kernel_size=3, padding=1, bias=True)
        self.w_g = nn.Linear(sim_dim, sim_dim)
        self.w_r = nn.Linear(sim_dim, sim_dim)
        xavier_init_(self)

    def relation(self, nodes: Tensor, mask: Tensor) -> Tensor:
        """The gated relation matrix R' (N, n, n), zero in every padded row and column."""
        pair_mask = mask.unsqueeze(2) & mask.unsqueeze(1)  # (N, n, n)
        relation = self.phi(nodes) @ self.psi(nodes).transpose(1, 2)  # (N, n, n)
        if self.relation_norm == "softmax":
            relation = masked_softmax(relation, mask.unsqueeze(1))
        # Zeroing padded entries before the conv makes a padded matrix look like the
        # conv's own zero padding around an unpadded one.
        relation = relation * pair_mask
        gate = torch.sigmoid(self.context(relation.unsqueeze(1)).squeeze(1))  # (N, n, n)
        return relation * gate

    def forward(self, nodes: Tensor, mask: Tensor) -> Tensor:
        """nodes (N, n, m), mask (N, n) → nodes (N, n, m)."""
        return nodes + self.w_r(self.relation(nodes, mask) @ self.w_g(nodes))


class SGRLayer(nn.Module):
    """SGRAF's graph reasoning step: S* = relu(W(softmax_rows(q(S) k(S)ᵀ) S)), no residual."""

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(sim_dim, sim_dim)
        self.key = nn.Linear(sim_dim, sim_dim)
        self.update = nn.Linear(sim_dim, sim_dim)
        xavier_init_(self)

    def forward(self, nodes: Tensor, mask: Tensor) -> Tensor:
        """nodes (N, n, m), mask (N, n) → nodes (N, n, m)."""
        edges = masked_softmax(self.query(nodes) @ self.key(nodes).transpose(1, 2), mask.unsqueeze(1))
        return torch.relu(self.update(edges @ nodes))


def build_reasoning(kind: str, sim_dim: int, steps: int, relation_norm: str = "softmax") -> nn.ModuleList:
    """M separate layers of the chosen kind ("hsr" or "sgr")."""
    if kind == "hsr":
        return nn.ModuleList(HSRLayer(sim_dim, relation_norm) for _ in range(steps))
    if kind == "sgr":
        return nn.ModuleList(SGRLayer(sim_dim) for _ in range(steps))
    raise ValueError(f"unknown reasoning {kind!r}; choose hsr or sgr")
