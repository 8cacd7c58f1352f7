"""Reasoning over similarity nodes: HSR (the paper, Eq. 4-6) and SGR (SGRAF, for Table IV).

Both take nodes S (N, n, m) with a node mask (N, n) (None: every node valid) and
return updated nodes of the same shape. Padded nodes never influence valid ones.

Only node 0 of the last layer is ever read out, so each layer also has
`read_out`, which computes that one row. Both layers compute exactly their
equations with fewer FLOPs, by associativity:

- the query/key (φ/ψ) pair enters only through φ(s_a)·ψ(s_b) = (s_a A + c)·s_b + s_a·u + β
  with A = W_φᵀ W_ψ: one m×m product instead of two projections. Under a row softmax the
  row term s_a·u + β cancels; it is kept (a matrix-vector product) so that every parameter
  gets its gradient, as in the unfolded layer (DistributedDataParallel needs every
  parameter used);
- a projection after a product with the relation matrix is moved before it
  (W(R S) = R (S Wᵀ) + (R 1) bᵀ), so consecutive projections fold into one matrix.

`fold()` forms the folded weights (in float64, rounded once to the weights' dtype);
`SimilarityHead` forms them once per call and passes them to every group of pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from matching.model.tensors import xavier_init_


def _fold(first: nn.Linear, second: nn.Linear) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """first(x)·second(y) = (x A + c)·y + x·u + β: (A (m, m), c (m,), u (m,), β ())."""
    w1, b1 = first.weight.double(), first.bias.double()
    w2, b2 = second.weight.double(), second.bias.double()
    dtype = first.weight.dtype
    return (w1.t() @ w2).to(dtype), (w2.t() @ b1).to(dtype), (w1.t() @ b2).to(dtype), (b1 @ b2).to(dtype)


def _masked_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last axis; `mask` (N, n) marks the valid columns (None: all valid)."""
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def _bilinear_logits(rows: Tensor, nodes: Tensor, a: Tensor, c: Tensor, u: Tensor, beta: Tensor) -> Tensor:
    """first(s_r)·second(s_b) for some rows (N, r, m) against all nodes (N, n, m) → (N, r, n)."""
    n_rows, m = rows.shape[1:]
    flat = rows.reshape(-1, m)
    queries = torch.addmm(c, flat, a).view(-1, n_rows, m)  # (N, r, m): s_r A + c
    row_term = (flat @ u).view(-1, n_rows, 1) + beta  # (N, r, 1): s_r·u + β
    return torch.baddbmm(row_term, queries, nodes.transpose(1, 2))


class HSRLayer(nn.Module):
    """One hierarchical similarity reasoning layer (docs/decisions.md, "The matching model (TSHSR)", item 6).

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

    def fold(self) -> tuple[Tensor, ...]:
        """(A, c, u, β) of φ·ψ, and (B, c_r) with W_r(R' W_g(S)) = R' S B + (R' 1) c_rᵀ + b_r."""
        a, c, u, beta = _fold(self.phi, self.psi)
        message = (self.w_g.weight.double().t() @ self.w_r.weight.double().t()).to(a.dtype)  # B = W_gᵀ W_rᵀ
        message_c = (self.w_r.weight.double() @ self.w_g.bias.double()).to(a.dtype)  # c_r = W_r b_g
        return a, c, u, beta, message, message_c

    def _relation(self, rows: Tensor, nodes: Tensor, mask: Tensor | None, folded: tuple[Tensor, ...]) -> Tensor:
        """R for some rows (N, r, m) → (N, r, n), zero in padded rows and columns."""
        a, c, u, beta = folded[:4]
        relation = _bilinear_logits(rows, nodes, a, c, u, beta)
        if self.relation_norm == "softmax":
            relation = _masked_softmax(relation, mask)
        if mask is not None:
            # Zeroing padded entries before the conv makes a padded matrix look like the
            # conv's own zero padding around an unpadded one.
            relation = relation * (mask[:, : relation.shape[1], None] & mask[:, None, :])
        return relation

    def relation(self, nodes: Tensor, mask: Tensor | None) -> Tensor:
        """The gated relation matrix R' (N, n, n), zero in every padded row and column."""
        relation = self._relation(nodes, nodes, mask, self.fold())
        return relation * torch.sigmoid(self.context(relation.unsqueeze(1)).squeeze(1))

    def forward(self, nodes: Tensor, mask: Tensor | None, folded: tuple[Tensor, ...] | None = None) -> Tensor:
        """nodes (N, n, m), mask (N, n) or None → nodes (N, n, m). `folded`: `fold()`'s result, if at hand."""
        folded = folded or self.fold()
        message, message_c = folded[4:]
        n, m = nodes.shape[1:]
        relation = self._relation(nodes, nodes, mask, folded)
        gated = relation * torch.sigmoid(self.context(relation.unsqueeze(1)).squeeze(1))  # (N, n, n)
        projected = (nodes.reshape(-1, m) @ message).view(-1, n, m)  # (N, n, m): S B
        messages = torch.baddbmm(gated.sum(2, keepdim=True) * message_c, gated, projected)  # (N, n, m)
        return messages.add_(nodes).add_(self.w_r.bias)  # S + W_r(R' W_g(S)), without temporaries

    def read_out(self, nodes: Tensor, mask: Tensor | None, folded: tuple[Tensor, ...] | None = None) -> Tensor:
        """Node 0 of `forward(nodes, mask)`: (N, m). Needs R's rows 0 and 1 only (the conv's reach)."""
        folded = folded or self.fold()
        message, message_c = folded[4:]
        relation = self._relation(nodes[:, :2], nodes, mask, folded)  # (N, r ≤ 2, n)
        # Output row 0 of a 3×3 conv with zero padding sees input rows -1 (zero), 0 and 1.
        gate = torch.sigmoid(self.context(relation.unsqueeze(1))[:, 0, 0])  # (N, n)
        gated = relation[:, 0] * gate  # (N, n)
        pooled = torch.bmm(gated.unsqueeze(1), nodes).squeeze(1)  # (N, m): R'_0 S
        return torch.addmm(nodes[:, 0] + gated.sum(1, keepdim=True) * message_c + self.w_r.bias, pooled, message)


class SGRLayer(nn.Module):
    """SGRAF's graph reasoning step: S* = relu(W(softmax_rows(q(S) k(S)ᵀ) S)), no residual."""

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(sim_dim, sim_dim)
        self.key = nn.Linear(sim_dim, sim_dim)
        self.update = nn.Linear(sim_dim, sim_dim)
        xavier_init_(self)

    def fold(self) -> tuple[Tensor, ...]:
        """(A, c, u, β): q(S) k(S)ᵀ = (S A + c) Sᵀ + (S u + β) 1ᵀ."""
        return _fold(self.query, self.key)

    def forward(self, nodes: Tensor, mask: Tensor | None, folded: tuple[Tensor, ...] | None = None) -> Tensor:
        """nodes (N, n, m), mask (N, n) or None → nodes (N, n, m). `folded`: `fold()`'s result, if at hand."""
        edges = _masked_softmax(_bilinear_logits(nodes, nodes, *(folded or self.fold())), mask)  # (N, n, n)
        updated = self.update(nodes)  # (N, n, m): S W_uᵀ + b, as rows of `edges` sum to one
        return torch.relu(torch.bmm(edges, updated))  # W_u(E S) + b = E (S W_uᵀ + 1 bᵀ)

    def read_out(self, nodes: Tensor, mask: Tensor | None, folded: tuple[Tensor, ...] | None = None) -> Tensor:
        """Node 0 of `forward(nodes, mask)`: (N, m)."""
        edges = _masked_softmax(_bilinear_logits(nodes[:, :1], nodes, *(folded or self.fold())), mask)  # (N, 1, n)
        return torch.relu(self.update(torch.bmm(edges, nodes).squeeze(1)))


def build_reasoning(kind: str, sim_dim: int, steps: int, relation_norm: str = "softmax") -> nn.ModuleList:
    """M separate layers of the chosen kind ("hsr" or "sgr")."""
    if kind == "hsr":
        return nn.ModuleList(HSRLayer(sim_dim, relation_norm) for _ in range(steps))
    if kind == "sgr":
        return nn.ModuleList(SGRLayer(sim_dim) for _ in range(steps))
    raise ValueError(f"unknown reasoning {kind!r}; choose hsr or sgr")
