"""A slow, one-pair-at-a-time TSHSR written straight from the paper's equations.

It shares no code with `matching`: it reads the model's parameters by name
and recomputes everything with explicit loops on unpadded tensors (eval mode,
so dropout is off and BatchNorm uses its running statistics). The fast,
batched, masked implementation is pinned against it.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8


def l2n(x: torch.Tensor) -> torch.Tensor:
    return x / (torch.sqrt((x * x).sum(-1, keepdim=True)) + EPS)


def linear(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def batchnorm(p: dict, name: str, x: torch.Tensor, channel_axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[channel_axis] = -1
    mean, var = p[f"{name}.running_mean"].view(shape), p[f"{name}.running_var"].view(shape)
    weight, bias = p[f"{name}.weight"].view(shape), p[f"{name}.bias"].view(shape)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def pooled_global(p: dict, prefix: str, local: torch.Tensor, region_bn: bool) -> torch.Tensor:
    """The self-attention global vector of n local vectors (n, d)."""
    query = local.mean(0)
    loc = linear(p, f"{prefix}.local_proj.0", local)
    glo = linear(p, f"{prefix}.global_proj.0", query)
    if region_bn:  # one BN channel per region index: pad the region axis to the BN size
        channels = p[f"{prefix}.local_proj.1.running_mean"].shape[0]
        padded = torch.zeros(channels, loc.shape[1], dtype=loc.dtype)
        padded[: len(loc)] = loc
        loc = batchnorm(p, f"{prefix}.local_proj.1", padded.unsqueeze(0), 1)[0, : len(local)]
        glo = batchnorm(p, f"{prefix}.global_proj.1", glo.unsqueeze(0), 1)[0]
    weights = torch.stack([linear(p, f"{prefix}.score", torch.tanh(loc[i]) * torch.tanh(glo))[0]
                           for i in range(len(local))])
    weights = torch.softmax(weights, 0)
    return l2n(sum(weights[i] * local[i] for i in range(len(local))))


def encode_image(p: dict, features: torch.Tensor, normalize: bool = True):
    """features (k, D) of one image → (V (k, d), v̄ (d,))."""
    local = linear(p, "image_encoder.fc", features)
    if normalize:
        local = l2n(local)
    return local, pooled_global(p, "image_encoder.pool", local, region_bn=True)


def gru_direction(p: dict, suffix: str, inputs: torch.Tensor) -> torch.Tensor:
    """PyTorch's GRU equations, one step at a time: inputs (L, in) → hidden states (L, h)."""
    w_ih, w_hh = p[f"text_encoder.gru.weight_ih_l0{suffix}"], p[f"text_encoder.gru.weight_hh_l0{suffix}"]
    b_ih, b_hh = p[f"text_encoder.gru.bias_ih_l0{suffix}"], p[f"text_encoder.gru.bias_hh_l0{suffix}"]
    hidden = torch.zeros(w_hh.shape[1], dtype=w_hh.dtype)
    outputs = []
    for x in inputs:
        gi, gh = w_ih @ x + b_ih, w_hh @ hidden + b_hh
        i_r, i_z, i_n = gi.chunk(3)
        h_r, h_z, h_n = gh.chunk(3)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        hidden = (1 - z) * n + z * hidden
        outputs.append(hidden)
    return torch.stack(outputs)


def encode_text(p: dict, tokens: list[int], bidirectional: bool = True, normalize: bool = True):
    """One caption's token ids → (T (L, d), t̄ (d,))."""
    words = p["text_encoder.embed.weight"][torch.tensor(tokens)]
    local = gru_direction(p, "", words)
    if bidirectional:
        local = (local + gru_direction(p, "_reverse", words.flip(0)).flip(0)) / 2
    if normalize:
        local = l2n(local)
    return local, pooled_global(p, "text_encoder.pool", local, region_bn=False)


def clip(value: float, kind: str) -> float:
    return max(0.0, value) if kind == "relu" else (value if value > 0 else 0.1 * value)


def vector_similarity(p: dict, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return l2n(linear(p, name, (x - y) ** 2))


def conv3x3(p: dict, name: str, matrix: torch.Tensor) -> torch.Tensor:
    """A 3×3 convolution with zero padding, by explicit loops."""
    kernel, bias = p[f"{name}.weight"][0, 0], p[f"{name}.bias"][0]
    n = matrix.shape[0]
    out = torch.zeros_like(matrix)
    for r in range(n):
        for c in range(n):
            total = bias.clone()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= r + dr < n and 0 <= c + dc < n:
                        total = total + kernel[dr + 1, dc + 1] * matrix[r + dr, c + dc]
            out[r, c] = total
    return out


def hsr_layer(p: dict, name: str, nodes: torch.Tensor, relation_norm: str = "softmax") -> torch.Tensor:
    """Eq. 4-6 on unpadded nodes (n, m)."""
    phi, psi = linear(p, f"{name}.phi", nodes), linear(p, f"{name}.psi", nodes)
    relation = torch.stack([torch.stack([phi[a] @ psi[b] for b in range(len(nodes))])
                            for a in range(len(nodes))])
    if relation_norm == "softmax":
        relation = torch.softmax(relation, dim=1)
    gated = relation * torch.sigmoid(conv3x3(p, f"{name}.context", relation))
    return nodes + linear(p, f"{name}.w_r", gated @ linear(p, f"{name}.w_g", nodes))


def sgr_layer(p: dict, name: str, nodes: torch.Tensor) -> torch.Tensor:
    edges = torch.softmax(linear(p, f"{name}.query", nodes) @ linear(p, f"{name}.key", nodes).T, dim=1)
    return torch.relu(linear(p, f"{name}.update", edges @ nodes))


def pair_score(p: dict, cfg, image: tuple, caption: tuple) -> float:
    """The score of one (image, caption) pair from their unpadded encodings."""
    (V, v_bar), (T, t_bar) = image, caption
    K, L = len(V), len(T)
    c = [[clip(float(V[i] @ T[j]), cfg.attention_clip) for j in range(L)] for i in range(K)]
    g = vector_similarity(p, "head.sim_global.proj", v_bar, t_bar)

    def reason(nodes: torch.Tensor) -> torch.Tensor:
        for step in range(cfg.reasoning_steps):
            name = f"head.reasoning.{step}"
            nodes = (hsr_layer(p, name, nodes, cfg.relation_norm) if cfg.reasoning == "hsr"
                     else sgr_layer(p, name, nodes))
        return nodes[0]

    fused = torch.zeros_like(g)
    if cfg.streams in ("i2t", "both"):  # Eq. 2: words attend to regions
        nodes = [g]
        for j in range(L):
            weights = []
            for i in range(K):
                norm = math.sqrt(sum(c[i][jj] ** 2 for jj in range(L)))
                weights.append(math.exp(cfg.lambda_i2t * c[i][j] / (norm + EPS)))
            total = sum(weights)
            attended = l2n(sum((w / total) * V[i] for i, w in enumerate(weights)))
            nodes.append(vector_similarity(p, "head.sim_local.proj", attended, T[j]))
        stacked = torch.stack(nodes)
        use_reasoning = cfg.reasoning_steps > 0 and cfg.reasoning_stream == "i2t"
        fused = fused + (reason(stacked) if use_reasoning else stacked.mean(0))
    if cfg.streams in ("t2i", "both"):  # Eq. 3: regions attend to words
        nodes = [g]
        for i in range(K):
            weights = []
            for j in range(L):
                norm = math.sqrt(sum(c[ii][j] ** 2 for ii in range(K)))
                weights.append(math.exp(cfg.lambda_t2i * c[i][j] / (norm + EPS)))
            total = sum(weights)
            attended = l2n(sum((w / total) * T[j] for j, w in enumerate(weights)))
            nodes.append(vector_similarity(p, "head.sim_local.proj", V[i], attended))
        stacked = torch.stack(nodes)
        use_reasoning = cfg.reasoning_steps > 0 and cfg.reasoning_stream == "t2i"
        fused = fused + (reason(stacked) if use_reasoning else stacked.mean(0))
    return float(torch.sigmoid(linear(p, "head.score", fused))[0])


def reference_scores(model, cfg, features, num_boxes, captions) -> torch.Tensor:
    """(n_images, n_captions) by encoding each item alone and scoring pair by pair."""
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    with torch.no_grad():
        images = [encode_image(p, features[i, : int(num_boxes[i])].double(), cfg.normalize_images)
                  for i in range(len(features))]
        texts = [encode_text(p, list(c), cfg.bidirectional, cfg.normalize_text) for c in captions]
        return torch.tensor([[pair_score(p, cfg, im, tx) for tx in texts] for im in images])


# ----------------------------------------------------------------------------------------------
# The same pair score with tensor operations (still one pair at a time, unpadded), so that
# gradients can be taken through it. `p` maps state-dict names to the live parameters.


def conv3x3_shifted(p: dict, name: str, matrix: torch.Tensor) -> torch.Tensor:
    """A 3×3 convolution with zero padding as the sum of nine shifted copies (differentiable)."""
    kernel, bias = p[f"{name}.weight"][0, 0], p[f"{name}.bias"][0]
    n = matrix.shape[0]
    padded = torch.nn.functional.pad(matrix, (1, 1, 1, 1))
    return bias + sum(kernel[r, c] * padded[r:r + n, c:c + n] for r in range(3) for c in range(3))


def hsr_layer_tensor(p: dict, name: str, nodes: torch.Tensor, relation_norm: str = "softmax") -> torch.Tensor:
    """Eq. 4-6 on unpadded nodes (n, m), in matrix form."""
    relation = linear(p, f"{name}.phi", nodes) @ linear(p, f"{name}.psi", nodes).T
    if relation_norm == "softmax":
        relation = torch.softmax(relation, dim=1)
    gated = relation * torch.sigmoid(conv3x3_shifted(p, f"{name}.context", relation))
    return nodes + linear(p, f"{name}.w_r", gated @ linear(p, f"{name}.w_g", nodes))


def pair_vector(p: dict, cfg, V: torch.Tensor, v_bar: torch.Tensor, T: torch.Tensor,
                t_bar: torch.Tensor) -> torch.Tensor:
    """S* (m,) of one pair from its unpadded encodings V (K, d), v̄ (d,), T (L, d), t̄ (d,)."""
    cos = V @ T.T  # (K, L)
    c = torch.relu(cos) if cfg.attention_clip == "relu" else torch.where(cos > 0, cos, 0.1 * cos)
    g = vector_similarity(p, "head.sim_global.proj", v_bar, t_bar)

    def read_out(nodes: torch.Tensor, stream: str) -> torch.Tensor:
        if cfg.reasoning_steps == 0 or cfg.reasoning_stream != stream:
            return nodes.mean(0)
        for step in range(cfg.reasoning_steps):
            name = f"head.reasoning.{step}"
            nodes = (hsr_layer_tensor(p, name, nodes, cfg.relation_norm) if cfg.reasoning == "hsr"
                     else sgr_layer(p, name, nodes))
        return nodes[0]

    fused = torch.zeros_like(g)
    if cfg.streams in ("i2t", "both"):  # Eq. 2: c̄ over the words of each region, softmax over regions
        alpha = torch.softmax(cfg.lambda_i2t * c / (torch.sqrt((c * c).sum(1, keepdim=True)) + EPS), dim=0)
        attended = l2n(alpha.T @ V)  # (L, d)
        local = vector_similarity(p, "head.sim_local.proj", attended, T)
        fused = fused + read_out(torch.cat([g[None], local]), "i2t")
    if cfg.streams in ("t2i", "both"):  # Eq. 3: c̄ over the regions of each word, softmax over words
        beta = torch.softmax(cfg.lambda_t2i * c / (torch.sqrt((c * c).sum(0, keepdim=True)) + EPS), dim=1)
        attended = l2n(beta @ T)  # (K, d)
        local = vector_similarity(p, "head.sim_local.proj", V, attended)
        fused = fused + read_out(torch.cat([g[None], local]), "t2i")
    return fused


def head_scores(model, cfg, images, captions) -> torch.Tensor:
    """(Bi, Bc) scores of encoded, padded batches (`Embedded`), pair by pair; differentiable."""
    p = dict(model.named_parameters())
    boxes, lengths = images.mask.sum(1).tolist(), captions.mask.sum(1).tolist()
    rows = []
    for i, k in enumerate(boxes):
        row = [pair_vector(p, cfg, images.local[i, :k], images.glob[i], captions.local[c, :n], captions.glob[c])
               for c, n in enumerate(lengths)]
        rows.append(torch.sigmoid(linear(p, "head.score", torch.stack(row)))[:, 0])
    return torch.stack(rows)
