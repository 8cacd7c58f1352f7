"""Feature encoders (§III-A): regions and words into the joint space, plus their global vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from matching.model.batchnorm import MaskedBatchNorm1d
from matching.model.tensors import l2norm, length_mask, masked_mean, masked_softmax, xavier_init_


@dataclass
class Embedded:
    """A batch of encoded images (N = regions) or captions (N = words)."""

    local: Tensor  # (B, N, d), zero at padded positions
    mask: Tensor  # (B, N) bool, True at valid positions
    glob: Tensor  # (B, d) the self-attention global vector, l2-normalised

    def __len__(self) -> int:
        return self.local.shape[0]

    def select(self, index: slice | Tensor) -> Embedded:
        """Rows of the batch (a slice or an index tensor)."""
        return Embedded(self.local[index], self.mask[index], self.glob[index])

    def to(self, device: torch.device | str) -> Embedded:
        return Embedded(self.local.to(device), self.mask.to(device), self.glob.to(device))


class SelfAttentionPooling(nn.Module):
    """Global vector by self-attention (SGRAF's VisualSA/TextSA; the paper's "V ⊙ q̄").

    The mean of the valid local vectors is the query; each local vector gets a
    softmax weight from tanh(W_l v_i) ⊙ tanh(W_g q̄); the weighted sum is
    l2-normalised. For images the local branch batch-normalises per region
    index (`num_regions` channels), as the reference code does, with training
    statistics taken over the valid regions only (`MaskedBatchNorm1d`).
    """

    def __init__(self, embed_size: int, dropout: float, num_regions: int | None = None) -> None:
        super().__init__()
        local_norm = [MaskedBatchNorm1d(num_regions)] if num_regions else []
        global_norm = [MaskedBatchNorm1d(embed_size)] if num_regions else []
        self.local_proj = nn.Sequential(nn.Linear(embed_size, embed_size), *local_norm, nn.Tanh(),
                                        nn.Dropout(dropout))
        self.global_proj = nn.Sequential(nn.Linear(embed_size, embed_size), *global_norm, nn.Tanh(),
                                         nn.Dropout(dropout))
        self.score = nn.Linear(embed_size, 1)

    def forward(self, local: Tensor, mask: Tensor) -> Tensor:
        """local (B, N, d), mask (B, N) → global (B, d)."""
        query = masked_mean(local, mask)  # (B, d)
        common = _run(self.local_proj, local, mask) * _run(self.global_proj, query).unsqueeze(1)  # (B, N, d)
        weights = masked_softmax(self.score(common).squeeze(-1), mask)  # (B, N)
        return l2norm((weights.unsqueeze(-1) * local).sum(dim=1))


def _run(layers: nn.Sequential, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Apply Linear → (MaskedBatchNorm1d) → Tanh → Dropout, handing the padding mask to the norm."""
    for layer in layers:
        x = layer(x, mask) if isinstance(layer, MaskedBatchNorm1d) else layer(x)
    return x


class ImageEncoder(nn.Module):
    """Region features (B, K, img_dim) → region embeddings V (B, K', d) and v̄ (B, d).

    Images are padded to `num_regions` boxes (K' = num_regions) because the
    pooling's BatchNorm has one channel per region index.
    """

    def __init__(self, *, img_dim: int, embed_size: int, num_regions: int, dropout: float,
                 normalize: bool = True) -> None:
        super().__init__()
        self.num_regions = num_regions
        self.normalize = normalize
        self.fc = nn.Linear(img_dim, embed_size)
        self.pool = SelfAttentionPooling(embed_size, dropout, num_regions=num_regions)
        xavier_init_(self)

    def forward(self, features: Tensor, num_boxes: Tensor) -> Embedded:
        """features (B, K, img_dim), num_boxes (B,) → Embedded with N = num_regions."""
        batch, k, _ = features.shape
        if k > self.num_regions:
            if int(num_boxes.max()) > self.num_regions:
                raise ValueError(f"images have up to {int(num_boxes.max())} boxes but the model was built "
                                 f"for num_regions = {self.num_regions}")
            features = features[:, : self.num_regions]
        elif k < self.num_regions:
            features = nn.functional.pad(features, (0, 0, 0, self.num_regions - k))
        if int(num_boxes.min()) < 1:
            raise ValueError("an image has no boxes; every image needs at least one region")
        mask = length_mask(num_boxes.to(features.device), self.num_regions)  # (B, K')
        local = self.fc(features)  # (B, K', d)
        if self.normalize:
            local = l2norm(local)
        local = local * mask.unsqueeze(-1)
        return Embedded(local, mask, self.pool(local, mask))


class TextEncoder(nn.Module):
    """Word ids (B, L) → word embeddings T (B, L, d) by a (Bi)GRU, and t̄ (B, d)."""

    def __init__(self, *, vocab_size: int, word_dim: int, embed_size: int, num_layers: int,
                 bidirectional: bool, dropout: float, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bidirectional)
        self.pool = SelfAttentionPooling(embed_size, dropout)
        xavier_init_(self.pool)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Embedded:
        """tokens (B, L) int64 padded with 0, lengths (B,) → Embedded with N = L."""
        batch, max_len = tokens.shape
        if int(lengths.min()) < 1:
            raise ValueError("a caption has no tokens")
        words = self.dropout(self.embed(tokens))  # (B, L, word_dim)
        packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)  # (B, L, d·dirs)
        if self.gru.bidirectional:
            forward, backward = out.chunk(2, dim=-1)
            out = (forward + backward) / 2  # (B, L, d): directions averaged, not concatenated
        if self.normalize:
            out = l2norm(out)
        mask = length_mask(lengths.to(out.device), max_len)
        out = out * mask.unsqueeze(-1)
        return Embedded(out, mask, self.pool(out, mask))
