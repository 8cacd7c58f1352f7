"""A slow, one-pair-at-a-time HMRN written straight from the equations (matching/model/hmrn.py docstring).

It shares no code with `matching`: it reads the model's parameters by name and
recomputes everything with explicit loops on unpadded tensors, in float64 and
eval mode. The encoders, the self-attention pooling and SGR's step are those of
`tests/reference.py` (the same parameter names); everything multi-query is here.
"""

from __future__ import annotations

import math

import torch

from tests.reference import EPS, encode_image, gru_direction, l2n, linear, pooled_global, sgr_layer, vector_similarity


def leaky(value: float) -> float:
    return value if value > 0 else 0.1 * value


def encode_query(p: dict, tokens: list[int], cfg) -> torch.Tensor:
    """One query's token ids → its vector u (d,): the (Bi)GRU at the last token, directions averaged."""
    words = p["text_encoder.embed.weight"][torch.tensor(tokens)]
    forward = gru_direction(p, "", words)  # (L, h), position j has read tokens 0..j
    vector = forward[-1]
    if cfg.bidirectional:
        backward = gru_direction(p, "_reverse", words.flip(0)).flip(0)  # position j has read tokens j..L-1
        vector = (vector + (backward[0] if cfg.query_readout == "ends" else backward[-1])) / 2
    return l2n(vector) if cfg.normalize_text else vector


def softmax(values: list[float], lam: float) -> list[float]:
    top = max(values)
    exps = [math.exp(lam * (v - top)) for v in values]
    return [e / sum(exps) for e in exps]


def round_weight(n: int, cfg) -> float:
    if cfg.round_weight == "constant":
        return 1.0
    value = min(1.0, (n * (n + 1) / 2) / (cfg.max_turns * (cfg.max_turns + 1) / 2))
    return round(value, 2) if cfg.round_weight == "rounded" else value


def pair_levels(p: dict, cfg, image: tuple, queries: list[torch.Tensor], r: int) -> tuple[float, float, float]:
    """(local, global, reasoning) similarities of one image and the first r queries of one set."""
    V, v_bar = image
    U = queries[: min(r, len(queries))]
    K, n = len(V), len(U)
    c = [[leaky(float(V[k] @ U[t])) for t in range(n)] for k in range(K)]
    if cfg.direction == "i2t":  # each region attends over the queries
        per_region = []
        for k in range(K):
            weights = softmax(c[k], cfg.lambda_i2t)
            per_region.append(sum(w * c[k][t] for t, w in enumerate(weights)))
        local = sum(per_region) / K
    else:  # each query attends over the regions
        per_query = []
        for t in range(n):
            column = [c[k][t] for k in range(K)]
            weights = softmax(column, cfg.lambda_t2i)
            per_query.append(sum(w * column[k] for k, w in enumerate(weights)))
        local = sum(per_query) / n
    u_bar = pooled_global(p, "text_encoder.pool", torch.stack(U), region_bn=False)
    glob = float(v_bar @ u_bar)
    nodes = [vector_similarity(p, "reasoning.sim_global.proj", v_bar, u_bar)]
    for t in range(n):
        normed = [c[k][t] / (math.sqrt(sum(c[k][tt] ** 2 for tt in range(n))) + EPS) for k in range(K)]
        alpha = softmax(normed, cfg.lambda_reasoning)
        context = l2n(sum(alpha[k] * V[k] for k in range(K)))
        nodes.append(vector_similarity(p, "reasoning.sim_local.proj", context, U[t]))
    stacked = torch.stack(nodes)
    for step in range(cfg.reasoning_steps):
        stacked = sgr_layer(p, f"reasoning.layers.{step}", stacked)
    reasoning = float(torch.sigmoid(linear(p, "reasoning.score", stacked[0]))[0])
    return local, glob, reasoning


def pair_score(p: dict, cfg, image: tuple, queries: list[torch.Tensor], r: int) -> float:
    """score_r = α local_r + β w_r reasoning_r + (1 − α − β) global_r, with w of the queries used."""
    local, glob, reasoning = pair_levels(p, cfg, image, queries, r)
    weight = round_weight(min(r, len(queries)), cfg)
    return (cfg.local_weight * local + cfg.reasoning_weight * weight * reasoning
            + (1 - cfg.local_weight - cfg.reasoning_weight) * glob)


def _encode(model, cfg, features, num_boxes, query_sets):
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    images = [encode_image(p, torch.as_tensor(features[i, : int(num_boxes[i])]).double(), cfg.normalize_images)
              for i in range(len(features))]
    sets = [[encode_query(p, list(q), cfg) for q in s] for s in query_sets]
    return p, images, sets


def reference_round_scores(model, cfg, features, num_boxes, query_sets, rounds: int) -> torch.Tensor:
    """(rounds, Q, N) by encoding each item alone and scoring pair by pair, round by round."""
    with torch.no_grad():
        p, images, sets = _encode(model, cfg, features, num_boxes, query_sets)
        return torch.tensor([[[pair_score(p, cfg, im, s, r) for im in images] for s in sets]
                             for r in range(1, rounds + 1)])


def reference_training_levels(model, cfg, features, num_boxes, query_sets):
    """The training forward's matrices, images × sets: local (B, B, T) per round, global and reasoning (B, B)."""
    with torch.no_grad():
        p, images, sets = _encode(model, cfg, features, num_boxes, query_sets)
        turns = max(len(s) for s in query_sets)
        local = torch.tensor([[[pair_levels(p, cfg, im, s, r)[0] for r in range(1, turns + 1)] for s in sets]
                              for im in images])
        full = [[pair_levels(p, cfg, im, s, turns) for s in sets] for im in images]
        glob = torch.tensor([[levels[1] for levels in row] for row in full])
        reasoning = torch.tensor([[levels[2] for levels in row] for row in full])
        return local, glob, reasoning


def reference_info_nce(scores: torch.Tensor, tau: float) -> float:
    """−(1/B) Σ_i [log(e^{τ S_ii} / Σ_j e^{τ S_ij}) + log(e^{τ S_ii} / Σ_j e^{τ S_ji})], by loops."""
    b = len(scores)
    total = 0.0
    for i in range(b):
        row = sum(math.exp(tau * float(scores[i, j])) for j in range(b))
        col = sum(math.exp(tau * float(scores[j, i])) for j in range(b))
        total += math.log(math.exp(tau * float(scores[i, i])) / row)
        total += math.log(math.exp(tau * float(scores[i, i])) / col)
    return -total / b


def reference_loss(local, glob, reasoning, cfg) -> float:
    """α · mean over rounds of InfoNCE(local_r) + β · InfoNCE(reasoning) + (1 − α − β) · InfoNCE(global)."""
    rounds = local.shape[2]
    local_loss = sum(reference_info_nce(local[:, :, r], cfg.tau) for r in range(rounds)) / rounds
    return (cfg.local_weight * local_loss + cfg.reasoning_weight * reference_info_nce(reasoning, cfg.tau)
            + (1 - cfg.local_weight - cfg.reasoning_weight) * reference_info_nce(glob, cfg.tau))
