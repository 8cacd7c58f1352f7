"""Similarity representation (§III-B, §III-C): cross attention, vector similarities, the two streams.

`clipped_cosines`, `region_attention`, `attend_regions` and `attend_words` are the
equations in their plain batched form (the attention maps of search results use them).
`SimilarityHead` computes the same numbers for a block of Bi images × Bc captions
with every FLOP the maths does not need removed and the rest as large dense products:

- captions are grouped by exact length, so no word is padded and no word mask is needed;
  regions are cut to the most boxes in the block;
- all cosines of a group are one GEMM (Bi·K × d) · (d × Bc·L);
- an attended vector's l2 norm comes from the K×K (L×L) Gram matrix of its values, so the
  attention weights are scaled before the weighted sum and the d-sized vector is never re-read;
- Eq. 1 over the attended vectors (`attend_project`) runs in chunks of rows that stay in
  cache, one GEMM per chunk, and its backward recomputes the chunk instead of keeping
  (Bi, Bc, L, d)-sized tensors alive: training memory does not grow with batch² × d;
- reasoning reads out node 0 of its last layer only (`read_out` of matching.model.reasoning).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from matching.model.encoders import Embedded
from matching.model.tensors import l2norm, masked_softmax, xavier_init_

EPS = 1e-8  # l2norm's epsilon (SGRAF's)
CPU_CHUNK_ROWS = 2048  # d-sized rows per chunk on a CPU: 8 MB at d = 1024 stays in the last-level cache
GPU_CHUNK_ROWS = 1 << 17  # on a GPU, large chunks keep the GEMMs large


def default_chunk_rows(device: torch.device) -> int:
    """Rows of the d-sized working buffer of `attend_project` on `device`."""
    return GPU_CHUNK_ROWS if device.type == "cuda" else CPU_CHUNK_ROWS


def clipped_cosines(regions: Tensor, words: Tensor, clip: str = "leaky_relu") -> Tensor:
    """[c_ij]₊ for every pair: regions (Bi, K, d), words (Bc, L, d) → (Bi, Bc, K, L).

    The embeddings are l2-normalised, so the dot product is the cosine. The
    reference code clips with LeakyReLU(0.1) where the paper writes max(0, ·).
    """
    cosines = torch.einsum("ikd,cld->ickl", regions, words)  # (Bi, Bc, K, L)
    if clip == "relu":
        return torch.relu(cosines)
    return nn.functional.leaky_relu(cosines, 0.1)


def region_attention(cosines: Tensor, region_mask: Tensor, word_mask: Tensor, lam: float) -> Tensor:
    """Eq. 2's weights α_ij: cosines (Bi, Bc, K, L) clipped → (Bi, Bc, L, K), a softmax over regions.

    c̄ is normalised over the words of the caption before the softmax.
    """
    cosines = cosines * word_mask[None, :, None, :]  # padded words out of the norm
    normed = l2norm(cosines, dim=3)  # (Bi, Bc, K, L)
    return masked_softmax(lam * normed.transpose(2, 3), region_mask[:, None, None, :])


def attend_regions(cosines: Tensor, regions: Tensor, region_mask: Tensor, word_mask: Tensor,
                   lam: float) -> Tensor:
    """Eq. 2: for each word j the attended image vector α_j^v = Σ_i α_ij v_i, l2-normalised.

    cosines (Bi, Bc, K, L) clipped; regions (Bi, K, d); masks (Bi, K), (Bc, L) → (Bi, Bc, L, d).
    """
    alpha = region_attention(cosines, region_mask, word_mask, lam)  # (Bi, Bc, L, K)
    return l2norm(torch.einsum("iclk,ikd->icld", alpha, regions))


def attend_words(cosines: Tensor, words: Tensor, region_mask: Tensor, word_mask: Tensor,
                 lam: float) -> Tensor:
    """Eq. 3: for each region i the attended text vector β_i^t = Σ_j β_ij t_j, l2-normalised.

    cosines (Bi, Bc, K, L) clipped; words (Bc, L, d); masks (Bi, K), (Bc, L) → (Bi, Bc, K, d).
    c̄ is normalised over the regions of the image; β is a softmax over the words.
    """
    cosines = cosines * region_mask[:, None, :, None]  # padded regions out of the norm
    normed = l2norm(cosines, dim=2)  # (Bi, Bc, K, L)
    beta = masked_softmax(lam * normed, word_mask[None, :, None, :])  # (Bi, Bc, K, L)
    return l2norm(torch.einsum("ickl,cld->ickd", beta, words))


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype matrix products run in: autocast's when it is on for the tensor's device."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tensor.dtype


class _AttendProject(torch.autograd.Function):
    """y = ((w @ U) − O)² Wᵀ + b, chunk by chunk; backward recomputes each chunk (see `attend_project`)."""

    @staticmethod
    def forward(ctx, weights: Tensor, values: Tensor, others: Tensor, weight: Tensor, bias: Tensor,  # noqa: ANN001
                chunk_rows: int) -> Tensor:
        groups, rows, _ = weights.shape
        heads, positions, d = others.shape[-3:]
        dtype = _compute_dtype(weights)
        ctx.dtype, ctx.chunk_rows = dtype, chunk_rows
        ctx.save_for_backward(weights, values, others, weight)
        weights, values, others = weights.to(dtype), values.to(dtype), others.to(dtype)
        weight_t, bias = weight.to(dtype).t(), bias.to(dtype)
        out = weights.new_empty((groups, rows, weight.shape[0]))
        step = max(1, chunk_rows // rows)
        for g0 in range(0, groups, step):
            g1 = min(groups, g0 + step)
            diff = torch.bmm(weights[g0:g1], values[g0:g1])  # (g, H·Q, d): attended vectors
            subtracted = others[g0:g1] if others.dim() == 4 else others  # (g, H, Q, d) or (H, Q, d)
            diff.view(g1 - g0, heads, positions, d).sub_(subtracted).square_()
            torch.addmm(bias, diff.view(-1, d), weight_t, out=out[g0:g1].view(-1, out.shape[2]))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        weights_in, values_in, others_in, weight_in = ctx.saved_tensors
        dtype = ctx.dtype
        groups, rows, _ = weights_in.shape
        heads, positions, d = others_in.shape[-3:]
        per_group = others_in.dim() == 4
        need_w, need_v, need_o, need_weight, need_bias = ctx.needs_input_grad[:5]
        weights, values, others = weights_in.to(dtype), values_in.to(dtype), others_in.to(dtype)
        weight = weight_in.to(dtype)
        grad_out = grad_out.to(dtype).contiguous()
        m = grad_out.shape[2]
        grad_w = torch.empty_like(weights_in) if need_w else None
        grad_v = torch.empty_like(values_in) if need_v else None
        accumulate = torch.promote_types(dtype, torch.float32)  # sums over chunks never in bf16
        grad_o = None
        if need_o:
            grad_o = torch.empty_like(others_in) if per_group else torch.zeros(
                rows, d, dtype=accumulate, device=others.device)
        grad_weight = torch.zeros(m, d, dtype=accumulate, device=weight.device) if need_weight else None
        step = max(1, ctx.chunk_rows // rows)
        for g0 in range(0, groups, step):
            g1 = min(groups, g0 + step)
            w_chunk, v_chunk, g_chunk = weights[g0:g1], values[g0:g1], grad_out[g0:g1].view(-1, m)
            diff = torch.bmm(w_chunk, v_chunk)  # (g, H·Q, d): recomputed, never stored
            diff.view(g1 - g0, heads, positions, d).sub_(others[g0:g1] if per_group else others)
            scratch = diff.square()
            if need_weight:
                grad_weight += (g_chunk.t() @ scratch.view(-1, d)).to(accumulate)  # (m, d)
            grad_attended = torch.mm(g_chunk, weight, out=scratch.view(-1, d)).view_as(diff)
            grad_attended.mul_(diff).mul_(2)  # ∂y/∂(w @ U): (g, H·Q, d)
            if need_o and per_group:
                grad_o[g0:g1] = grad_attended.view(g1 - g0, heads, positions, d).neg()
            elif need_o:
                grad_o -= grad_attended.sum(0).to(accumulate)
            if need_w:
                grad_w[g0:g1] = torch.bmm(grad_attended, v_chunk.transpose(1, 2))
            if need_v:
                grad_v[g0:g1] = torch.bmm(w_chunk.transpose(1, 2), grad_attended)
        grad_bias = grad_out.sum((0, 1)).to(weight_in.dtype) if need_bias else None
        if need_o and not per_group:
            grad_o = grad_o.view(heads, positions, d).to(others_in.dtype)
        return grad_w, grad_v, grad_o, grad_weight.to(weight_in.dtype) if need_weight else None, grad_bias, None


def attend_project(weights: Tensor, values: Tensor, others: Tensor, weight: Tensor, bias: Tensor,
                   chunk_rows: int | None = None) -> Tensor:
    """Eq. 1 over attended vectors: y[g, h, q] = W (Σ_p w[g, h·Q+q, p] U[g, p] − O[h, q])² + b.

    weights (G, H·Q, P), values U (G, P, d), others O (H, Q, d), or (G, H, Q, d) with
    O[g, h, q] in place of O[h, q]; weight W (m, d), bias b (m,) → y (G, H·Q, m), before
    the l2 norm. Words attending to regions: G images, P = K regions, H captions, Q = L
    words; regions attending to words: G captions, P = L, H images, Q = K. The d-sized
    attended vectors exist only `chunk_rows` rows at a time, in the forward pass and
    again in the backward pass, which recomputes them.
    """
    rows = chunk_rows or default_chunk_rows(weights.device)
    return _AttendProject.apply(weights.contiguous(), values.contiguous(), others.contiguous(), weight, bias, rows)


def unit_attention(weights: Tensor, values: Tensor) -> Tensor:
    """Weights scaled so that weights @ values is l2-normalised: (G, R, P), values (G, P, d).

    ‖w U‖² = w (U Uᵀ) wᵀ: the norm costs P² per row from the Gram matrix instead of a
    pass over the d-sized attended vector.
    """
    gram = torch.bmm(values, values.transpose(1, 2))  # (G, P, P)
    squared = (torch.bmm(weights, gram) * weights).sum(2, keepdim=True)  # (G, R, 1)
    return weights / (squared.clamp_min(1e-30).sqrt() + EPS)


class VectorSimilarity(nn.Module):
    """Eq. 1 as SGRAF defines it: S(x, y) = l2norm(W (x − y)² + b), W: d → m."""

    def __init__(self, embed_size: int, sim_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_size, sim_dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y (..., d) broadcastable → (..., m)."""
        return l2norm(self.proj((x - y).pow(2)))


class SimilarityHead(nn.Module):
    """Pair scores from encoded images and captions: the two streams, reasoning and fusion.

    i2t stream: nodes [s^g, S(α_1^v, t_1), …, S(α_L^v, t_L)]  (L+1 nodes)
    t2i stream: nodes [s^g, S(v_1, β_1^t), …, S(v_K, β_K^t)]  (K+1 nodes)
    The stream named by `reasoning_stream` passes through the M reasoning
    layers and reads out node 0; the other (or both, when M = 0) is averaged
    over its valid nodes (Eq. 7). The read-outs are summed (Eq. 8) and scored
    by sigmoid(w·S* + b).

    Masks of `Embedded` inputs are prefixes (valid positions first), as the encoders make them.
    """

    def __init__(self, *, embed_size: int, sim_dim: int, streams: str, reasoning: nn.ModuleList,
                 reasoning_stream: str, lambda_i2t: float, lambda_t2i: float,
                 attention_clip: str) -> None:
        super().__init__()
        self.streams = streams
        self.reasoning_stream = reasoning_stream
        self.lambda_i2t = lambda_i2t
        self.lambda_t2i = lambda_t2i
        self.attention_clip = attention_clip
        self.sim_local = VectorSimilarity(embed_size, sim_dim)  # shared by both streams
        self.sim_global = VectorSimilarity(embed_size, sim_dim)
        self.reasoning = reasoning
        self.score = nn.Linear(sim_dim, 1)
        xavier_init_(self.sim_local)
        xavier_init_(self.sim_global)
        xavier_init_(self.score)

    def _reasons(self, stream: str) -> bool:
        return len(self.reasoning) > 0 and stream == self.reasoning_stream

    def _folds(self) -> list[tuple[Tensor, ...]]:
        """Every reasoning layer's folded weights (`fold()`), formed once per call.

        Without autograd they are kept until a parameter changes (in place, as optimizers
        update, or by a move): scoring many blocks folds once.
        """
        if torch.is_grad_enabled():
            return [layer.fold() for layer in self.reasoning]
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.reasoning.parameters())
        cached = getattr(self, "_fold_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, [layer.fold() for layer in self.reasoning])
            self._fold_cache = cached
        return cached[1]

    def _reason(self, nodes: Tensor, mask: Tensor | None, folds: list[tuple[Tensor, ...]]) -> Tensor:
        """Node 0 after the M layers: nodes (N, n, m), mask (N, n) or None → (N, m)."""
        for layer, folded in zip(self.reasoning[:-1], folds, strict=False):
            nodes = layer(nodes, mask, folded)
        return self.reasoning[-1].read_out(nodes, mask, folds[-1])

    def _group_vector(self, regions: Tensor, region_mask: Tensor | None, boxes: Tensor, image_glob: Tensor,
                      words: Tensor, caption_glob: Tensor, chunk_rows: int, folds: list[tuple[Tensor, ...]],
                      paired: bool = False) -> Tensor:
        """S* of Bi images × Bc captions of one length: regions (Bi, K, d), words (Bc, L, d) → (Bi, Bc, m).

        region_mask (Bi, K) or None when every image has K boxes; boxes (Bi,) their counts.
        `paired`: image p with caption p only (Bi = Bc = P) → (P, 1, m); below, Bc is then 1
        and each image's caption is its own.
        """
        bi, k, d = regions.shape
        length = words.shape[1]
        if paired:
            bc = 1
            cosines = torch.bmm(regions, words.transpose(1, 2)).view(bi, k, 1, length)  # (P, K, 1, L)
            own_words, own_glob = words.unsqueeze(1), caption_glob.view(bi, 1, 1, d)  # O per group
        else:
            bc = words.shape[0]
            cosines = (regions.view(bi * k, d) @ words.view(bc * length, d).t()).view(bi, k, bc, length)
            own_words, own_glob = words, caption_glob.unsqueeze(1)
        cosines = torch.relu(cosines) if self.attention_clip == "relu" else nn.functional.leaky_relu(cosines, 0.1)
        if region_mask is not None:
            cosines = cosines * region_mask[:, :, None, None]  # padded regions out of every norm
        ones = image_glob.new_ones(bi, bc, 1)
        global_node = l2norm(attend_project(ones, image_glob.unsqueeze(1), own_glob, self.sim_global.proj.weight,
                                            self.sim_global.proj.bias, chunk_rows))  # (Bi, Bc, m)
        fused = None
        if self.streams in ("i2t", "both"):
            fused = self._i2t_stream(cosines, regions, region_mask, own_words, global_node, chunk_rows, folds)
        if self.streams in ("t2i", "both"):
            stream = self._t2i_stream(cosines, regions, region_mask, boxes, words, global_node, chunk_rows, folds,
                                      paired)
            fused = stream if fused is None else fused + stream
        return fused

    def _i2t_stream(self, cosines: Tensor, regions: Tensor, region_mask: Tensor | None, words: Tensor,
                    global_node: Tensor, chunk_rows: int, folds: list[tuple[Tensor, ...]]) -> Tensor:
        """Eq. 2, each word attending to the regions, then its read-out: (Bi, Bc, m).

        cosines (Bi, K, Bc, L) clipped; words (Bc, L, d), or (Bi, 1, L, d) when paired.
        """
        bi, k, bc, length = cosines.shape
        m = global_node.shape[2]
        scale = self.lambda_i2t / (torch.linalg.vector_norm(cosines, dim=3, keepdim=True) + EPS)
        logits = cosines * scale  # (Bi, K, Bc, L): c̄ normalised over the words, times λ
        if region_mask is not None:
            logits = logits.masked_fill(~region_mask[:, :, None, None], float("-inf"))
        alpha = torch.softmax(logits, dim=1).permute(0, 2, 3, 1).reshape(bi, bc * length, k)  # (Bi, Bc·L, K)
        del logits
        local = attend_project(unit_attention(alpha, regions), regions, words, self.sim_local.proj.weight,
                               self.sim_local.proj.bias, chunk_rows)  # (Bi, Bc·L, m)
        del alpha
        nodes = torch.cat([global_node.view(bi * bc, 1, m), l2norm(local).view(bi * bc, length, m)], 1)
        del local
        if self._reasons("i2t"):
            return self._reason(nodes, None, folds).view(bi, bc, m)
        return nodes.mean(1).view(bi, bc, m)

    def _t2i_stream(self, cosines: Tensor, regions: Tensor, region_mask: Tensor | None, boxes: Tensor,
                    words: Tensor, global_node: Tensor, chunk_rows: int, folds: list[tuple[Tensor, ...]],
                    paired: bool) -> Tensor:
        """Eq. 3, each region attending to the words, then its read-out: (Bi, Bc, m)."""
        bi, k, bc, length = cosines.shape
        m = global_node.shape[2]
        scale = self.lambda_t2i / (torch.linalg.vector_norm(cosines, dim=1, keepdim=True) + EPS)
        beta = torch.softmax(cosines * scale, dim=3)  # (Bi, K, Bc, L): over the words
        if paired:  # caption p's words, attended by image p's regions
            beta = beta.view(bi, k, length)  # (P, K, L)
            others = regions.unsqueeze(1)  # (P, 1, K, d)
        else:
            beta = beta.permute(2, 0, 1, 3).reshape(bc, bi * k, length)  # (Bc, Bi·K, L)
            others = regions
        local = attend_project(unit_attention(beta, words), words, others, self.sim_local.proj.weight,
                               self.sim_local.proj.bias, chunk_rows)  # (Bc, Bi·K, m), paired (P, K, m)
        del beta
        local = l2norm(local).view(bc, bi, k, m)
        global_t = global_node.transpose(0, 1)  # (Bc, Bi, m)
        if self._reasons("t2i"):
            nodes = torch.cat([global_t.reshape(bc * bi, 1, m), local.view(bc * bi, k, m)], 1)
            del local
            mask = None
            if region_mask is not None:
                mask = torch.cat([region_mask.new_ones(bc * bi, 1),
                                  region_mask.expand(bc, bi, k).reshape(bc * bi, k)], 1)  # (Bc·Bi, K+1)
            stream = self._reason(nodes, mask, folds).view(bc, bi, m)
        else:
            if region_mask is None:
                total = global_t + local.sum(2)
            else:
                total = global_t + torch.einsum("cikm,ik->cim", local, region_mask.to(local.dtype))
            stream = total / (1 + boxes).to(total.dtype)[None, :, None]  # mean of the K+1 nodes
        return stream.transpose(0, 1)  # (Bi, Bc, m)

    def similarity_vector(self, images: Embedded, captions: Embedded, *, chunk_rows: int | None = None) -> Tensor:
        """S* for every pair: (Bi, Bc, m). `chunk_rows` bounds the d-sized working buffer."""
        device = images.local.device
        chunk_rows = chunk_rows or default_chunk_rows(device)
        folds = self._folds()
        boxes = images.mask.sum(1)
        box_counts = boxes.cpu()
        k = int(box_counts.max())
        regions = images.local[:, :k].contiguous()
        region_mask = None if bool((box_counts == k).all()) else images.mask[:, :k]
        lengths = captions.mask.sum(1).cpu()
        distinct = lengths.unique().tolist()
        if len(distinct) == 1:
            words = captions.local[:, : distinct[0]].contiguous()
            return self._group_vector(regions, region_mask, boxes, images.glob, words, captions.glob, chunk_rows,
                                      folds)
        parts, order = [], []
        for length in distinct:
            index = (lengths == length).nonzero().squeeze(1)
            on_device = index.to(device)
            words = captions.local[on_device, :length]  # (Bc_L, L, d)
            parts.append(self._group_vector(regions, region_mask, boxes, images.glob, words,
                                            captions.glob[on_device], chunk_rows, folds))
            order.append(index)
        inverse = torch.argsort(torch.cat(order)).to(device)
        return torch.cat(parts, 1)[:, inverse]

    def paired_vector(self, images: Embedded, captions: Embedded, *, chunk_rows: int | None = None) -> Tensor:
        """S* of image p with caption p only: images and captions of P rows each → (P, m)."""
        if len(images) != len(captions):
            raise ValueError(f"paired scoring needs as many images as captions, not {len(images)} and {len(captions)}")
        device = images.local.device
        chunk_rows = chunk_rows or default_chunk_rows(device)
        folds = self._folds()
        lengths = captions.mask.sum(1).cpu()
        parts, order = [], []
        for length in lengths.unique().tolist():
            index = (lengths == length).nonzero().squeeze(1)
            on_device = index.to(device)
            boxes = images.mask[on_device].sum(1)
            box_counts = boxes.cpu()
            k = int(box_counts.max())
            region_mask = None if bool((box_counts == k).all()) else images.mask[on_device, :k]
            parts.append(self._group_vector(images.local[on_device, :k], region_mask, boxes, images.glob[on_device],
                                            captions.local[on_device, :length], captions.glob[on_device],
                                            chunk_rows, folds, paired=True)[:, 0])
            order.append(index)
        inverse = torch.argsort(torch.cat(order)).to(device)
        return torch.cat(parts)[inverse]

    def paired_scores(self, images: Embedded, captions: Embedded, *, chunk_rows: int | None = None) -> Tensor:
        """Scores in (0, 1) of image p with caption p: (P,)."""
        return torch.sigmoid(self.score(self.paired_vector(images, captions, chunk_rows=chunk_rows))).squeeze(-1)

    def forward(self, images: Embedded, captions: Embedded, *, chunk_rows: int | None = None) -> Tensor:
        """Scores in (0, 1) for every pair: (Bi, Bc)."""
        vector = self.similarity_vector(images, captions, chunk_rows=chunk_rows)
        return torch.sigmoid(self.score(vector)).squeeze(-1)
