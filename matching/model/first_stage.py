"""The first stage of two-stage retrieval: global vectors trained beside the paper's model, never into it.

Two-stage retrieval (`matching.retrieval.shortlist`) ranks a gallery by the cosine of one vector per
image and one per caption, then re-scores the best few with the full model. The vectors come
from `FirstStageHead`, a small projection head on the encoders' outputs:

    a = softmax_n(w_2 · tanh(W_1 x_n))      over the valid regions (or words) x_n
    m = max_n x_n                           element-wise, over the same
    z = l2norm(W_p [Σ_n a_n x_n ; m])       one head for images, one for captions

(`model.first_stage_pooling` "attention" drops m, as the first heads did.) One attended average of
36 regions blurs which colour went with which object; the element-wise max keeps each feature's
strongest region. On the binding world of `benchmarks/bench_learning.py` (the encoders of a run
after one epoch, held fixed) a head with the max found 99% of the captions' images among its 10
nearest where the attention alone found 19% (docs/decisions.md, "The first stage").

It is trained by its own loss, a symmetric InfoNCE over the batch (`first_stage_loss`), on
inputs detached from the encoders: the paper model's parameters receive no gradient from it,
its weights are created outside the global random stream and it draws no random numbers
(no dropout), and its gradient norm is clipped on its own. A run with the head therefore
trains the paper's model exactly as a run without it (`tests/test_first_stage.py` checks
parameters and gradients). See docs/decisions.md, "The first stage".

Why not the model's own global vectors v̄, t̄: they feed the similarity head (s^g), so a loss
on them shares the encoders with the paper's loss and pulls them towards what pooled vectors
can separate; on data that needs the binding of words to regions that stops the paper's model
from learning (measured in `benchmarks/bench_learning.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from matching.model.encoders import Embedded
from matching.model.tensors import l2norm, masked_softmax

FIRST_STAGE_SEED = 20240517  # the head's initial weights come from their own generator (see the module docstring)


class AttentionProjection(nn.Module):
    """Attention pooling (and, with `pooling` "attention+max", the element-wise max) of local vectors, then a
    projection to the first stage's space; no random ops."""

    def __init__(self, embed_size: int, dim: int, pooling: str = "attention+max") -> None:
        super().__init__()
        self.with_max = pooling == "attention+max"
        self.attend = nn.Linear(embed_size, embed_size)
        self.weight = nn.Linear(embed_size, 1, bias=False)  # a bias would shift every logit of the softmax alike
        self.project = nn.Linear(embed_size * (2 if self.with_max else 1), dim)

    def forward(self, local: Tensor, mask: Tensor) -> Tensor:
        """local (B, N, d), mask (B, N) → (B, dim), unit length."""
        weights = masked_softmax(self.weight(torch.tanh(self.attend(local))).squeeze(-1), mask)  # (B, N)
        pooled = torch.einsum("bn,bnd->bd", weights, local)  # (B, d)
        if self.with_max:
            strongest = local.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)  # (B, d) over valid rows
            pooled = torch.cat([pooled, strongest], 1)
        return l2norm(self.project(pooled))


class FirstStageHead(nn.Module):
    """One vector per image and per caption for the shortlist, from the encoders' detached outputs."""

    def __init__(self, embed_size: int, dim: int, pooling: str = "attention+max") -> None:
        super().__init__()
        # Built from a generator of its own, so adding the head leaves the global random stream (and with
        # it the paper model's dropout masks) exactly as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(FIRST_STAGE_SEED)
            self.images = AttentionProjection(embed_size, dim, pooling)
            self.captions = AttentionProjection(embed_size, dim, pooling)

    def image_vectors(self, images: Embedded) -> Tensor:
        """Embedded images (B, K, d) → (B, dim) unit vectors; no gradient reaches the encoders."""
        return self.images(images.local.detach(), images.mask)

    def caption_vectors(self, captions: Embedded) -> Tensor:
        """Embedded captions (B, L, d) → (B, dim) unit vectors; no gradient reaches the encoders."""
        return self.captions(captions.local.detach(), captions.mask)


def info_nce_rows(logits: Tensor, positive: Tensor, not_negative: Tensor | None = None) -> Tensor:
    """Σ over rows of −log softmax(row)[positive]: logits (b, n), positive (b,) columns; `not_negative`
    (b, n) bool marks columns left out of a row's softmax (other captions of the same image)."""
    if not_negative is not None:
        rows = torch.arange(len(logits), device=logits.device)
        keep = torch.zeros_like(not_negative)
        keep[rows, positive] = True
        logits = logits.masked_fill(not_negative & ~keep, float("-inf"))
    return nn.functional.cross_entropy(logits, positive, reduction="sum")


def first_stage_loss(image_vectors: Tensor, caption_vectors: Tensor, temperature: float,
                     same_image: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of a batch whose image i goes with caption i: vectors (B, e) each → scalar.

    Summed over the batch (as the paper's hinge is), both directions; `same_image` (B, B) bool marks
    pairs that are positives too (two captions of one image), left out of the negatives.
    """
    logits = image_vectors.float() @ caption_vectors.float().t() / temperature  # (B, B)
    diagonal = torch.arange(len(logits), device=logits.device)
    return (info_nce_rows(logits, diagonal, same_image)
            + info_nce_rows(logits.t(), diagonal, None if same_image is None else same_image.t()))
