"""The (n_images × n_captions) score matrix in bounded memory.

Each image and each caption is encoded exactly once. Captions are encoded in
length-sorted blocks (little padding); then every caption block is scored
against image blocks whose size is derived from a memory budget, all pairs
of a block in one batched pass. Runs under `torch.inference_mode` on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from matching.encoders import Embedded
from matching.model import TSHSR

CPU_BUDGET_BYTES = 2 << 30


class ImageSource(Protocol):
    """Anything that yields region features by position: arrays in memory or a FeatureStore."""

    def __len__(self) -> int: ...

    def load(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """(features (B, K, D) float32, num_boxes (B,) int64) of images start..stop-1."""
        ...


@dataclass
class ImageArrays:
    """Region features already in memory."""

    features: np.ndarray | Tensor  # (n, K, D)
    num_boxes: np.ndarray | Tensor  # (n,)

    def __len__(self) -> int:
        return len(self.features)

    def load(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        features = torch.as_tensor(self.features[start:stop]).float()
        return features, torch.as_tensor(self.num_boxes[start:stop]).long()


@dataclass
class StoreImages:
    """Images of a FeatureStore, in the order of `image_ids`."""

    store: object  # extract.shards.FeatureStore (kept untyped: matching imports only extract.shards)
    image_ids: Sequence[str]

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        batch = self.store.batch(self.image_ids[start:stop])  # type: ignore[attr-defined]
        return torch.from_numpy(batch.features), torch.from_numpy(batch.num_boxes)


@dataclass
class SlicedImages:
    """Images start..stop-1 of another source (one rank's share)."""

    source: ImageSource
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def load(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        return self.source.load(self.start + start, self.start + stop)


def pad_tokens(captions: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Token-id lists → (tokens (B, L) padded with 0, lengths (B,))."""
    lengths = torch.tensor([len(c) for c in captions], dtype=torch.long)
    tokens = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for row, caption in enumerate(captions):
        tokens[row, : len(caption)] = torch.as_tensor(caption, dtype=torch.long)
    return tokens, lengths


def bytes_per_pair(num_regions: int, num_words: int, embed_size: int, sim_dim: int) -> int:
    """Peak working memory of one image-caption pair in `SimilarityHead` (float32, no autograd).

    Counts the attention maps (K·L), the attended vectors and their differences
    (K+L)·d, the similarity nodes and the reasoning relation matrices.
    """
    k, length, d, m = num_regions, num_words + 1, embed_size, sim_dim
    return 4 * (6 * k * length + 4 * (k + length) * d + 8 * (k + length + 2) * m + 3 * max(k, length) ** 2)


def default_budget(device: torch.device) -> int:
    """Half the free GPU memory, or 2 GiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return CPU_BUDGET_BYTES


def encode_images(model: TSHSR, images: ImageSource, device: torch.device, batch_size: int = 128) -> Embedded:
    """Encode every image once; the result lives on `device`."""
    parts = []
    for start in range(0, len(images), batch_size):
        features, num_boxes = images.load(start, min(start + batch_size, len(images)))
        parts.append(model.encode_images(features.to(device), num_boxes.to(device)))
    return Embedded(torch.cat([p.local for p in parts]), torch.cat([p.mask for p in parts]),
                    torch.cat([p.glob for p in parts]))


def encode_captions(model: TSHSR, captions: Sequence[Sequence[int]], device: torch.device,
                    batch_size: int = 128) -> list[tuple[Tensor, Embedded]]:
    """Encode every caption once, in blocks of similar length: [(caption indices, Embedded)]."""
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    blocks = []
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        tokens, lengths = pad_tokens([captions[i] for i in index])
        blocks.append((torch.tensor(index), model.encode_captions(tokens.to(device), lengths.to(device))))
    return blocks


def score_matrix(
    model: TSHSR,
    images: ImageSource | Embedded,
    captions: Sequence[Sequence[int]],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    memory_budget: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Scores of every image against every caption: (n_images, n_captions) float32.

    Args:
        model: the network; put in eval mode for the call and restored after.
        images: region features (`ImageArrays`, `StoreImages` or any `ImageSource`), or images
            already encoded by this model (an `Embedded`, e.g. from a search index).
        captions: token-id lists (with <start>/<end>), in column order.
        device: where to compute; the model is moved there.
        batch_size: images/captions per encoder batch.
        memory_budget: bytes of working memory for a block of pairs (default: half
            the free GPU memory, or 2 GiB on the CPU).
        progress: show a progress bar over caption blocks.
    """
    if len(images) == 0 or len(captions) == 0:
        return np.zeros((len(images), len(captions)), np.float32)
    device = torch.device(device)
    budget = memory_budget or default_budget(device)
    was_training = model.training
    model.eval().to(device)
    scores = np.zeros((len(images), len(captions)), np.float32)
    try:
        with torch.inference_mode():
            if isinstance(images, Embedded):
                image_emb = images.to(device)
            else:
                image_emb = encode_images(model, images, device, batch_size)
            blocks = encode_captions(model, captions, device, batch_size)
            n_images, num_regions, embed_size = image_emb.local.shape
            sim_dim = model.head.score.in_features
            bar = _progress(len(blocks), progress)
            for index, caption_emb in blocks:
                per_pair = bytes_per_pair(num_regions, caption_emb.local.shape[1], embed_size, sim_dim)
                pairs = max(1, budget // per_pair)
                cap_step = max(1, min(len(index), pairs))
                img_step = max(1, min(n_images, pairs // cap_step))
                for c0 in range(0, len(index), cap_step):
                    cap_block = caption_emb.select(slice(c0, c0 + cap_step))
                    columns = index[c0:c0 + cap_step].numpy()
                    for i0 in range(0, n_images, img_step):
                        block = model.pair_scores(image_emb.select(slice(i0, i0 + img_step)), cap_block)
                        scores[i0:i0 + img_step, columns] = block.float().cpu().numpy()
                bar.update(1)
            bar.close()
    finally:
        model.train(was_training)
    return scores


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):  # noqa: ANN202 - tqdm or a stand-in
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="scoring", unit="block", dynamic_ncols=True)
