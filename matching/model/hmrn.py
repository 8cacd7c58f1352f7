"""HMRN: hierarchical matching and reasoning for multi-query image retrieval (Ji et al., 2024).

A user describes one image with region queries given one per round; round r
scores every image against the first r queries. Notation: an image has K
regions v_k (FC + l2norm, the matching `ImageEncoder`), a query set has T
queries u_t, each the BiGRU output (directions averaged) at the query's last
token, l2-normalised; v̄ and ū_r are the self-attention global vectors of the
regions and of the first r queries (SGRAF's pooling, `SelfAttentionPooling`).
All cosines are clipped, c_kt = LeakyReLU_0.1(v_k · u_t).

Scalar-based matching, local level (one of the two directions per model):

    i2t  s^l_r = mean_k Σ_{t≤r} softmax_{t≤r}(λ_i2t c_kt) c_kt                 λ_i2t = 5
    t2i  s^l_r = mean_{t≤r} Σ_k softmax_k(λ_t2i c_kt) c_kt                      λ_t2i = 15

Scalar-based matching, global level:  s^g_r = v̄ · ū_r.

Vector-based reasoning (round r): the attended image context of query t is
a_t = l2norm(Σ_k softmax_k(λ_vr c_kt / ‖c_k,≤r‖) v_k) (SCAN's attention, λ_vr = 15),
the nodes are [S_g(v̄, ū_r), S_l(a_1, u_1), …, S_l(a_r, u_r)] with
S(x, y) = l2norm(W (x − y)² + b) (Eq. 1, `VectorSimilarity`), three SGR steps
(`SGRLayer`: N ← relu(W softmax(q(N) k(N)ᵀ) N)), and s^vr_r = sigmoid(w · N_0 + b).

Training loss (the batch's B images × B query sets, all T queries):

    L = 0.6 · mean_r InfoNCE_τ(s^l_r) + 0.3 · InfoNCE_τ(s^vr_T) + 0.1 · InfoNCE_τ(s^g_T),     τ = 40
    InfoNCE_τ(S) = −(1/B) Σ_i [log softmax_j(τ S_ij)_i + log softmax_j(τ S_ji)_i]

Inference, round r:  score_r = 0.6 · s^l_r + 0.3 · w_r · s^vr_r + 0.1 · s^g_r,  w_r = (1+…+r)/(1+…+T).
The two directions are two models; their score tensors are averaged (`ensemble_scores`).

Masks: padded regions and tokens never matter; a round r uses only the first
r queries (a set with n < r queries scores at round r as at round n).

Where the paper and HMRN's code are silent or disagree (each other option is a config field):

- The i2t local similarity of HMRN's code comes out as (query sets × images) while the
  global and reasoning ones are (images × query sets); its evaluation adds them
  without a transpose, tile by tile (700 × 700). The loss is symmetric, so training is
  unaffected; we keep one orientation everywhere, so evaluation scores what the paper
  describes. `score_rounds(..., script_tiles=700)` adds it as the script does, for
  ``evaluate --protocol hmrn`` (docs/multi-query.md, "Reproducing HMRN's table").
- w_r: HMRN's code rounds (1+…+r)/55 to two decimals; `round_weight: triangular` is the
  exact fraction (default), `rounded` the code's, `constant` w_r = 1 (its validation);
  ``--protocol hmrn`` scores with `rounded` whatever the config says.
- The reasoning's attention uses the t2i temperature (15) in both directions' models, as
  HMRN's code does (`lambda_reasoning`).
- The query vector is read at the last token in both directions as HMRN does, so its
  backward half has seen only the <end> token; `query_readout: ends` reads the forward
  direction at the last token and the backward one at the first instead.
- Round weights beyond T (a search with more queries than the model's `max_turns`) stay 1.
- A query's tokens are its words and <end>, as HMRN's data loader makes them
  (`query_wrap: end`); `start-end` wraps them in <start> … <end> as captions are
  (what checkpoints saved before the field existed were trained with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from matching.config import ROUND_WEIGHTS, MultiQueryConfig
from matching.data.queries import pad_query_sets
from matching.model.encoders import Embedded, ImageEncoder, TextEncoder
from matching.model.reasoning import SGRLayer
from matching.model.similarity import VectorSimilarity, attend_regions, clipped_cosines
from matching.model.tensors import l2norm, masked_softmax, xavier_init_
from matching.model.tshsr import build_encoders
from matching.retrieval.scoring import ImageSource, default_budget, encode_images

# --------------------------------------------------------------------------- the pieces


def round_weights(rounds: int, max_turns: int, kind: str = "triangular") -> Tensor:
    """w_1 … w_rounds of the reasoning similarity: (rounds,) float32.

    triangular: (1+…+r)/(1+…+T), 1 beyond T; rounded: the same rounded to 2 decimals
    (HMRN's code); constant: 1.
    """
    r = torch.arange(1, rounds + 1, dtype=torch.float64)
    if kind == "constant":
        return torch.ones(rounds)
    weights = (r * (r + 1) / (max_turns * (max_turns + 1))).clamp(max=1.0)
    if kind == "rounded":
        weights = torch.tensor([round(float(w), 2) for w in weights], dtype=torch.float64)
    elif kind != "triangular":
        raise ValueError(f"unknown round weight {kind!r}; choose one of {', '.join(ROUND_WEIGHTS)}")
    return weights.float()


def prefix_mask(mask: Tensor, rounds: int) -> Tensor:
    """The valid queries of rounds 1…R: mask (B, T) → (R, B, T), round r keeping the first r positions."""
    turns = mask.shape[1]
    prefix = torch.arange(turns, device=mask.device)[None, :] < torch.arange(1, rounds + 1, device=mask.device)[:, None]
    return prefix[:, None, :] & mask[None]  # (R, B, T)


def local_i2t(cosines: Tensor, region_mask: Tensor, query_mask: Tensor, lam: float, rounds: int) -> Tensor:
    """Local level, image to text: s_r = mean_k Σ_{t≤r} softmax_{t≤r}(λ c_kt) c_kt.

    cosines (Bi, Bq, K, T) clipped; region_mask (Bi, K); query_mask (Bq, T) → (Bi, Bq, R).
    """
    valid = region_mask.to(cosines.dtype)  # (Bi, K)
    out = []
    for mask in prefix_mask(query_mask, rounds):  # (Bq, T), one round at a time
        weights = masked_softmax(lam * cosines, mask[None, :, None, :])  # (Bi, Bq, K, T)
        per_region = (weights * cosines).sum(dim=3)  # (Bi, Bq, K)
        out.append((per_region * valid[:, None]).sum(dim=2) / valid.sum(dim=1).clamp(min=1)[:, None])
    return torch.stack(out, dim=2)  # (Bi, Bq, R)


def local_t2i(cosines: Tensor, region_mask: Tensor, query_mask: Tensor, lam: float, rounds: int) -> Tensor:
    """Local level, text to image: s_r = mean_{t≤r} Σ_k softmax_k(λ c_kt) c_kt.

    cosines (Bi, Bq, K, T) clipped; region_mask (Bi, K); query_mask (Bq, T) → (Bi, Bq, R).
    """
    weights = masked_softmax(lam * cosines, region_mask[:, None, :, None], dim=2)  # (Bi, Bq, K, T)
    per_query = (weights * cosines).sum(dim=2) * query_mask[None]  # (Bi, Bq, T), zero at padded queries
    running = per_query.cumsum(dim=2)[..., :rounds]  # (Bi, Bq, R')
    counts = query_mask.cumsum(dim=1)[:, :rounds].clamp(min=1)  # (Bq, R')
    means = running / counts[None]
    if means.shape[2] < rounds:  # more rounds than queries: the last round repeats
        means = torch.cat([means, means[..., -1:].expand(-1, -1, rounds - means.shape[2])], dim=2)
    return means


def query_vectors(text_encoder: TextEncoder, tokens: Tensor, lengths: Tensor, readout: str = "last") -> Tensor:
    """One vector per query: tokens (N, L), lengths (N,) ≥ 1 → (N, d).

    The encoder's embedding and (Bi)GRU read every query; the output is taken at
    its last valid token (`readout` "last"; "ends" takes the backward direction at
    the first token), the directions are averaged and the result l2-normalised.
    """
    words = text_encoder.dropout(text_encoder.embed(tokens))  # (N, L, word_dim)
    packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = text_encoder.gru(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])  # (N, L, d·dirs)
    rows = torch.arange(len(tokens), device=out.device)
    last = out[rows, lengths.to(out.device) - 1]  # (N, d·dirs)
    if text_encoder.gru.bidirectional:
        forward, backward = last.chunk(2, dim=-1)
        if readout == "ends":
            backward = out[:, 0].chunk(2, dim=-1)[1]  # the backward direction has read the whole query here
        last = (forward + backward) / 2  # (N, d)
    return l2norm(last) if text_encoder.normalize else last


class VectorReasoning(nn.Module):
    """The VR module: nodes [S_g(v̄, ū), S_l(a_t, u_t) …] → SGR steps → sigmoid(w · N_0 + b).

    a_t is query t's attended image context (SCAN's attention: the clipped cosines
    normalised over the set's valid queries, softmax with temperature λ over regions).
    """

    def __init__(self, *, embed_size: int, sim_dim: int, steps: int, lam: float) -> None:
        super().__init__()
        self.lam = lam
        self.sim_local = VectorSimilarity(embed_size, sim_dim)
        self.sim_global = VectorSimilarity(embed_size, sim_dim)
        self.layers = nn.ModuleList(SGRLayer(sim_dim) for _ in range(steps))
        self.score = nn.Linear(sim_dim, 1)
        xavier_init_(self.sim_local)
        xavier_init_(self.sim_global)
        xavier_init_(self.score)

    def forward(self, cosines: Tensor, images: Embedded, queries: Tensor, query_mask: Tensor,
                query_glob: Tensor) -> Tensor:
        """cosines (Bi, Bq, K, T) clipped, images (Bi, K, d), queries (Bq, T, d), query_mask (Bq, T),
        query_glob (Bq, d) → reasoning similarities (Bi, Bq) in (0, 1)."""
        bi, bq = cosines.shape[:2]
        context = attend_regions(cosines, images.local, images.mask, query_mask, self.lam)  # (Bi, Bq, T, d)
        local = self.sim_local(context, queries[None])  # (Bi, Bq, T, m)
        glob = self.sim_global(images.glob[:, None], query_glob[None])  # (Bi, Bq, m)
        nodes = torch.cat([glob.unsqueeze(2), local], dim=2)  # (Bi, Bq, T+1, m)
        mask = torch.cat([query_mask.new_ones(bq, 1), query_mask], dim=1)  # (Bq, T+1)
        flat = nodes.flatten(0, 1)  # (Bi·Bq, T+1, m)
        flat_mask = mask[None].expand(bi, -1, -1).flatten(0, 1)  # (Bi·Bq, T+1)
        for layer in self.layers:
            flat = layer(flat, flat_mask)
        return torch.sigmoid(self.score(flat[:, 0])).reshape(bi, bq)


@dataclass
class MultiQuerySimilarities:
    """A training batch's similarity matrices, images × query sets (the diagonal holds the positives)."""

    local: Tensor  # (B, B, R) the local level of rounds 1…R
    glob: Tensor  # (B, B) the global level with all queries
    reasoning: Tensor  # (B, B) the reasoning with all queries


class HMRN(nn.Module):
    """Hierarchical matching and reasoning over a set of region queries (equations in the module docstring).

    Images are encoded once (`encode_images`), query sets once (`encode_queries`,
    `query_globals`); `round_scores` scores every image of a block against every
    query set of a block for each round; `forward` gives a training batch's
    similarity matrices for `multiquery_loss`.
    """

    def __init__(self, *, image_encoder: ImageEncoder, text_encoder: TextEncoder, reasoning: VectorReasoning,
                 direction: str, lambda_local: float, query_readout: str, local_weight: float,
                 reasoning_weight: float, max_turns: int, round_weight: str) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder  # its self-attention pooling pools the query vectors
        self.reasoning = reasoning
        self.direction = direction
        self.lambda_local = lambda_local
        self.query_readout = query_readout
        self.local_weight = local_weight
        self.reasoning_weight = reasoning_weight
        self.max_turns = max_turns
        self.round_weight = round_weight

    def encode_images(self, features: Tensor, num_boxes: Tensor) -> Embedded:
        """features (B, K, img_dim), num_boxes (B,) → Embedded (B, num_regions, d) with v̄."""
        return self.image_encoder(features, num_boxes)

    def image_vectors(self, images: Embedded) -> Tensor:
        """One vector per encoded image for a first stage: v̄, which the global level (s^g = v̄ · ū) is trained on."""
        return images.glob

    def encode_queries(self, tokens: Tensor, lengths: Tensor) -> Embedded:
        """tokens (B, T, L), lengths (B, T) (0 = no query) → Embedded: query vectors (B, T, d), mask (B, T),
        and ū over all the set's queries (B, d)."""
        batch, turns, words = tokens.shape
        mask = lengths > 0  # (B, T)
        if not bool(mask[:, 0].all()):
            raise ValueError("every query set needs at least one query, in its first position")
        flat = mask.flatten()  # (B·T,)
        vectors = query_vectors(self.text_encoder, tokens.reshape(batch * turns, words)[flat],
                                lengths.flatten()[flat], self.query_readout)  # (n_valid, d)
        local = vectors.new_zeros(batch * turns, vectors.shape[1])
        local[flat] = vectors
        local = local.reshape(batch, turns, -1)  # (B, T, d)
        return Embedded(local, mask, self.text_encoder.pool(local, mask))

    def query_globals(self, queries: Embedded, rounds: int) -> Tensor:
        """ū_r for r = 1…R, the pooled vector of each set's first r queries: (R, B, d)."""
        return torch.stack([self.text_encoder.pool(queries.local, mask) for mask in prefix_mask(queries.mask, rounds)])

    def local_similarity(self, cosines: Tensor, images: Embedded, query_mask: Tensor, rounds: int) -> Tensor:
        """The local level of this model's direction for rounds 1…R: (Bi, Bq, R)."""
        if self.direction == "i2t":
            return local_i2t(cosines, images.mask, query_mask, self.lambda_local, rounds)
        return local_t2i(cosines, images.mask, query_mask, self.lambda_local, rounds)

    def forward(self, features: Tensor, num_boxes: Tensor, tokens: Tensor, lengths: Tensor) -> MultiQuerySimilarities:
        """A training batch (B images, their B query sets (B, T, L)) → similarity matrices (B, B[, T])."""
        return self.similarities(self.encode_images(features, num_boxes), self.encode_queries(tokens, lengths))

    def similarities(self, images: Embedded, queries: Embedded) -> MultiQuerySimilarities:
        """Every encoded image against every encoded query set, all its T queries: (Bi, Bq[, T]).

        Training scores the batch with it; under torchrun each process scores its images
        against every process's query sets and every image against its own sets.
        """
        cosines = clipped_cosines(images.local, queries.local)  # (Bi, Bq, K, T)
        local = self.local_similarity(cosines, images, queries.mask, queries.local.shape[1])  # (Bi, Bq, T)
        glob = images.glob @ queries.glob.t()  # (Bi, Bq)
        reasoning = self.reasoning(cosines, images, queries.local, queries.mask, queries.glob)  # (Bi, Bq)
        return MultiQuerySimilarities(local, glob, reasoning)

    def round_scores(self, images: Embedded, queries: Embedded, query_globs: Tensor,
                     round_weight: str | None = None) -> Tensor:
        """Fused scores of every image against every query set for rounds 1…R: (R, Bi, Bq).

        query_globs (R, Bq, d) from `query_globals`; a set with n < r queries scores at
        round r as at round n (its round weight included). `round_weight` replaces the
        model's kind of w_r (HMRN's evaluation protocol: ``rounded``).
        """
        local, rest = self.round_parts(images, queries, query_globs, round_weight)
        return local + rest

    def round_parts(self, images: Embedded, queries: Embedded, query_globs: Tensor,
                    round_weight: str | None = None) -> tuple[Tensor, Tensor]:
        """`round_scores` in two parts, (α · local_r, β · w_r · reasoning_r + (1 − α − β) · global_r), each
        (R, Bi, Bq): HMRN's evaluation script adds an i2t model's local part transposed (`score_rounds`)."""
        rounds = query_globs.shape[0]
        cosines = clipped_cosines(images.local, queries.local)  # (Bi, Bq, K, T)
        local = self.local_similarity(cosines, images, queries.mask, rounds)  # (Bi, Bq, R)
        table = round_weights(rounds, self.max_turns, round_weight or self.round_weight).to(local.device)  # (R,)
        counts = queries.mask.sum(dim=1)  # (Bq,)
        rest = []
        for r in range(1, rounds + 1):
            width = min(r, queries.local.shape[1])
            mask = queries.mask[:, :width]  # (Bq, r) the first r queries
            reasoning = self.reasoning(cosines[..., :width], images, queries.local[:, :width], mask,
                                       query_globs[r - 1])  # (Bi, Bq)
            glob = images.glob @ query_globs[r - 1].t()  # (Bi, Bq)
            weight = table[counts.clamp(max=r) - 1]  # (Bq,) w_min(r, n) for a set of n queries
            rest.append(self.reasoning_weight * weight * reasoning
                        + (1.0 - self.local_weight - self.reasoning_weight) * glob)
        return self.local_weight * local.permute(2, 0, 1), torch.stack(rest)  # (R, Bi, Bq) each

    @property
    def script_transposes_local(self) -> bool:
        """Whether HMRN's evaluation script adds this model's local matrix transposed: its i2t local similarity
        comes out as (query sets × images), the other levels as (images × query sets)."""
        return self.direction == "i2t"


def build_hmrn(config: MultiQueryConfig) -> HMRN:
    """A freshly initialised HMRN for `config` (validated first)."""
    image_encoder, text_encoder = build_encoders(config)
    reasoning = VectorReasoning(embed_size=config.embed_size, sim_dim=config.sim_dim,
                                steps=config.reasoning_steps, lam=config.lambda_reasoning)
    lambda_local = config.lambda_i2t if config.direction == "i2t" else config.lambda_t2i
    return HMRN(image_encoder=image_encoder, text_encoder=text_encoder, reasoning=reasoning,
                direction=config.direction, lambda_local=lambda_local, query_readout=config.query_readout,
                local_weight=config.local_weight, reasoning_weight=config.reasoning_weight,
                max_turns=config.max_turns, round_weight=config.round_weight)


# --------------------------------------------------------------------------- loss and training step


def info_nce(scores: Tensor, tau: float) -> Tensor:
    """InfoNCE in both directions over a (B, B) matrix whose diagonal holds the positives.

    −(1/B) Σ_i [log softmax_j(τ S)_ii over row i + log softmax over column i], HMRN's form.
    """
    return info_nce_part(scores, scores, 0, len(scores), tau)


def info_nce_part(rows: Tensor, cols: Tensor, offset: int, total: int, tau: float) -> Tensor:
    """One process's share of InfoNCE over a global (G, G) matrix (torchrun; `info_nce` when alone).

    rows (b, G): this process's b images against all G query sets; cols (G, b): all images
    against its b sets; `offset` is the global index of its first pair. Summed over the
    processes, the shares give `info_nce` of the whole matrix.
    """
    own = torch.arange(rows.shape[0], device=rows.device)
    image_terms = torch.log_softmax(tau * rows, dim=1)[own, offset + own].sum()
    set_terms = torch.log_softmax(tau * cols, dim=0)[offset + own, own].sum()
    return -(image_terms + set_terms) / total


def multiquery_loss(sims: MultiQuerySimilarities, *, tau: float, local_weight: float,
                    reasoning_weight: float) -> Tensor:
    """α · mean over rounds of InfoNCE(local_r) + β · InfoNCE(reasoning) + (1 − α − β) · InfoNCE(global)."""
    return multiquery_loss_part(sims, sims, 0, len(sims.glob), tau=tau, local_weight=local_weight,
                                reasoning_weight=reasoning_weight)


def multiquery_loss_part(rows: MultiQuerySimilarities, cols: MultiQuerySimilarities, offset: int, total: int, *,
                         tau: float, local_weight: float, reasoning_weight: float) -> Tensor:
    """`multiquery_loss`'s share of one process holding the rows and columns of its pairs (`info_nce_part`)."""
    rounds = rows.local.shape[2]
    local = torch.stack([info_nce_part(rows.local[:, :, r], cols.local[:, :, r], offset, total, tau)
                         for r in range(rounds)]).mean()
    return (local_weight * local + reasoning_weight * info_nce_part(rows.reasoning, cols.reasoning, offset, total, tau)
            + (1.0 - local_weight - reasoning_weight) * info_nce_part(rows.glob, cols.glob, offset, total, tau))


# --------------------------------------------------------------------------- scoring many sets


def bytes_per_pair(num_regions: int, turns: int, embed_size: int, sim_dim: int) -> int:
    """Peak working memory of one (image, query set) pair in `HMRN.round_scores` (float32, no autograd).

    Counts the cosines and attention maps (K·T), the attended contexts and their
    differences (T·d), the reasoning nodes and their SGR relation matrices.
    """
    k, t, d, m = num_regions, turns, embed_size, sim_dim
    return 4 * (6 * k * t + 3 * t * d + 8 * (t + 1) * m + 3 * (t + 1) ** 2 + 4 * t)


def encode_query_sets(model: HMRN, query_sets: Sequence[Sequence[Sequence[int]]], rounds: int,
                      device: torch.device, batch_size: int = 128) -> tuple[Embedded, Tensor]:
    """Encode every query set once: (Embedded (Q, R, d), per-round globals (R, Q, d)).

    Each set keeps its first `rounds` queries; sets are padded to `rounds` columns.
    """
    locals_, masks, globs = [], [], []
    for start in range(0, len(query_sets), batch_size):
        block = [list(s)[:rounds] for s in query_sets[start:start + batch_size]]
        tokens, lengths = pad_query_sets(block)
        encoded = model.encode_queries(tokens.to(device), lengths.to(device))
        pad = rounds - encoded.local.shape[1]
        local = nn.functional.pad(encoded.local, (0, 0, 0, pad))  # (b, R, d)
        mask = nn.functional.pad(encoded.mask, (0, pad))  # (b, R)
        locals_.append(local)
        masks.append(mask)
        globs.append(model.query_globals(Embedded(local, mask, encoded.glob), rounds))  # (R, b, d)
    local, mask = torch.cat(locals_), torch.cat(masks)
    globs_all = torch.cat(globs, dim=1)  # (R, Q, d)
    return Embedded(local, mask, globs_all[-1]), globs_all


def score_rounds(
    model: HMRN,
    images: ImageSource | Embedded,
    query_sets: Sequence[Sequence[Sequence[int]]],
    *,
    rounds: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    memory_budget: int | None = None,
    out: np.ndarray | None = None,
    round_weight: str | None = None,
    script_tiles: int = 0,
) -> np.ndarray:
    """Scores of every query set against every image for each round: (R, Q, N) float32.

    Args:
        model: the network; put in eval mode for the call and restored after.
        images: region features (`matching.retrieval.scoring.ImageArrays`, `StoreImages`, any
            `ImageSource`), or images already encoded by this model (an `Embedded`).
        query_sets: per set, its queries' token ids (wrapped as the model reads them) in round order.
        rounds: R (default: the most queries of a set); a set keeps its first R queries.
        device: where to compute; the model is moved there.
        batch_size: images / query sets per encoder batch.
        memory_budget: bytes of working memory for a block of pairs (default: half the
            free GPU memory, or 2 GiB on the CPU).
        out: an (R, Q, N) float32 array to fill (e.g. a memory map for a large test set).
        round_weight: replaces the model's kind of w_r (HMRN's protocol: ``rounded``).
        script_tiles: T > 0 scores as HMRN's evaluation script does for an i2t model
            (`HMRN.script_transposes_local`): in each aligned tile of T sets × T images its
            local part is added transposed, so set q against image n gets the local similarity
            of set B(q) + n mod T and image B(n) + q mod T (B: the tile's first index); Q and N
            must be multiples of T (docs/multi-query.md, "Reproducing HMRN's table").

    Each image and each query set is encoded once; blocks of images × sets are scored
    in one batched pass per round, under `torch.inference_mode`.
    """
    if not query_sets or any(len(s) == 0 for s in query_sets):
        raise ValueError("every query set needs at least one query")
    rounds = rounds or max(len(s) for s in query_sets)
    shape = (rounds, len(query_sets), len(images))
    if out is None:
        out = np.zeros(shape, np.float32)
    elif out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    if len(images) == 0:
        return out
    device = torch.device(device)
    budget = memory_budget or default_budget(device)
    was_training = model.training
    model.eval().to(device)
    try:
        with torch.inference_mode():
            image_emb = images.to(device) if isinstance(images, Embedded) else encode_images(
                model, images, device, batch_size)  # type: ignore[arg-type]
            queries, globs = encode_query_sets(model, query_sets, rounds, device, batch_size)
            n_images, num_regions, embed_size = image_emb.local.shape
            per_pair = bytes_per_pair(num_regions, rounds, embed_size, model.reasoning.score.in_features)
            pairs = max(1, budget // per_pair)
            if script_tiles and model.script_transposes_local:
                _score_script_tiles(model, image_emb, queries, globs, out, script_tiles, pairs, round_weight)
                return out
            set_step = max(1, min(len(query_sets), pairs))
            img_step = max(1, min(n_images, pairs // set_step))
            for q0 in range(0, len(query_sets), set_step):
                block = queries.select(slice(q0, q0 + set_step))
                block_globs = globs[:, q0:q0 + set_step]
                for i0 in range(0, n_images, img_step):
                    scores = model.round_scores(image_emb.select(slice(i0, i0 + img_step)), block, block_globs,
                                                round_weight)
                    out[:, q0:q0 + set_step, i0:i0 + img_step] = scores.transpose(1, 2).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def _score_script_tiles(model: HMRN, images: Embedded, queries: Embedded, globs: Tensor, out: np.ndarray,
                        tile: int, pairs: int, round_weight: str | None) -> None:
    """`score_rounds` with HMRN's script's tiles (see there): each tile's two parts in blocks of at most `pairs`
    pairs, then its local part transposed and added to the rest."""
    n_sets, n_images = out.shape[1:]
    if n_sets % tile or n_images % tile:
        raise ValueError(f"HMRN's script scores whole {tile} × {tile} tiles: {n_sets} query sets and {n_images} "
                         "images are not multiples of it")
    set_step = max(1, min(tile, pairs))
    img_step = max(1, min(tile, pairs // set_step))
    for t0 in range(0, n_sets, tile):
        for u0 in range(0, n_images, tile):
            local = np.empty((out.shape[0], tile, tile), np.float32)  # (R, sets, images) of the tile
            rest = np.empty_like(local)
            for q0 in range(t0, t0 + tile, set_step):
                q1 = min(q0 + set_step, t0 + tile)
                block, block_globs = queries.select(slice(q0, q1)), globs[:, q0:q1]
                for i0 in range(u0, u0 + tile, img_step):
                    i1 = min(i0 + img_step, u0 + tile)
                    parts = model.round_parts(images.select(slice(i0, i1)), block, block_globs, round_weight)
                    local[:, q0 - t0:q1 - t0, i0 - u0:i1 - u0] = parts[0].transpose(1, 2).float().cpu().numpy()
                    rest[:, q0 - t0:q1 - t0, i0 - u0:i1 - u0] = parts[1].transpose(1, 2).float().cpu().numpy()
            out[:, t0:t0 + tile, u0:u0 + tile] = local.transpose(0, 2, 1) + rest


def ensemble_scores(models: Sequence[HMRN], images: ImageSource, query_sets: Sequence[Sequence[Sequence[int]]],
                    **kwargs: Any) -> np.ndarray:
    """HMRN's ensemble: the mean of several models' (R, Q, N) score tensors (its I-T and T-I models)."""
    if not models:
        raise ValueError("an ensemble needs at least one model")
    total = score_rounds(models[0], images, query_sets, **kwargs)
    for model in models[1:]:
        total += score_rounds(model, images, query_sets, **{**kwargs, "out": None})
    total /= len(models)
    return total
