"""Training data: (region features, caption tokens) pairs from feature shards.

- `build_pairs` ties captions to feature ids and token ids, with an error
  naming the caption whose image has no features.
- `PairDataset` reads one pair by caption index: features by random access
  across shards (HDF5 opened per worker process), or from RAM.
- `EpochBatchSampler` yields an epoch's batches: uniformly shuffled (the
  paper's training) or, as an option, of captions of similar length (little
  padding is computed); the order depends only on (seed, epoch) and an epoch
  covers every caption exactly once.
- `collate_pairs` pads a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from extract.shards import FeatureStore
from matching.data.captions import Caption, CaptionFormatError, group_by_image, resolve_image_ids
from matching.data.text import Vocabulary


@dataclass
class PairSet:
    """Captions with their images: caption c belongs to image_ids[caption_image[c]]."""

    image_ids: list[str]  # distinct feature ids, in first-appearance order
    captions: list[list[int]]  # token ids with <start>/<end>
    caption_image: np.ndarray  # (n_captions,) int64 index into image_ids
    texts: list[str]  # the raw captions, for logs and search pages

    def __len__(self) -> int:
        return len(self.captions)


def build_pairs(captions: Sequence[Caption], available: Sequence[str], vocab: Vocabulary) -> PairSet:
    """Every caption (all of them, not only 5 per image) paired with its image's feature id."""
    groups = group_by_image(captions)
    if not groups:
        raise CaptionFormatError("no captions in the requested split")
    resolved = resolve_image_ids(groups, available)
    image_ids: list[str] = []
    tokens, owner, texts = [], [], []
    for image_id, group in groups.items():
        if image_id not in resolved:
            raise CaptionFormatError(f"{group[0].where}: image {image_id!r} has no features")
        image_ids.append(resolved[image_id])
        for caption in group:
            tokens.append(vocab.encode(caption.text))
            owner.append(len(image_ids) - 1)
            texts.append(caption.text)
    return PairSet(image_ids, tokens, np.asarray(owner, np.int64), texts)


class PairDataset(Dataset):
    """Item c: (features (K, D) float32, num_boxes, tokens (L,) int64, caption index c, image index).

    With `in_memory`, every image's features are read once into one array of
    the shards' dtype (float16 by default; shared copy-on-write with forked
    workers); otherwise each item is read from its shard.
    """

    def __init__(self, store: FeatureStore, pairs: PairSet, in_memory: bool = False) -> None:
        self.store = store
        self.pairs = pairs
        self.max_boxes = store.max_boxes
        self.memory: np.ndarray | None = None
        self.memory_boxes: np.ndarray | None = None
        if in_memory:
            self.memory = np.zeros((len(pairs.image_ids), store.max_boxes, store.feature_dim), store.dtype)
            self.memory_boxes = np.zeros(len(pairs.image_ids), np.int64)
            for row, image_id in enumerate(pairs.image_ids):
                features, _, k, _ = store.get(image_id)
                self.memory[row, :k] = features
                self.memory_boxes[row] = k

    def __len__(self) -> int:
        return len(self.pairs)

    def image(self, index: int) -> tuple[np.ndarray, int]:
        """(features (K, D) float32 padded to the store's K, num_boxes) of image `index`."""
        if self.memory is not None and self.memory_boxes is not None:
            return self.memory[index].astype(np.float32), int(self.memory_boxes[index])
        features, _, k, _ = self.store.get(self.pairs.image_ids[index])
        padded = np.zeros((self.max_boxes, features.shape[1]), np.float32)
        padded[:k] = features
        return padded, k

    def __getitem__(self, caption: int) -> tuple[torch.Tensor, int, torch.Tensor, int, int]:
        image = int(self.pairs.caption_image[caption])
        features, k = self.image(image)
        return (torch.from_numpy(features), k, torch.tensor(self.pairs.captions[caption], dtype=torch.long),
                caption, image)


@dataclass
class Batch:
    features: torch.Tensor  # (B, K, D) float32, K = the batch's most boxes
    num_boxes: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B, L) int64, 0-padded
    lengths: torch.Tensor  # (B,)
    caption_index: torch.Tensor  # (B,)
    image_index: torch.Tensor  # (B,)

    def pin_memory(self) -> Batch:
        return Batch(*(t.pin_memory() for t in vars(self).values()))


def collate_pairs(items: Sequence[tuple[torch.Tensor, int, torch.Tensor, int, int]]) -> Batch:
    """Stack a list of PairDataset items, padding captions to the longest and boxes to the most."""
    k = max(item[1] for item in items)
    lengths = torch.tensor([len(item[2]) for item in items])
    tokens = torch.zeros(len(items), int(lengths.max()), dtype=torch.long)
    for row, item in enumerate(items):
        tokens[row, : len(item[2])] = item[2]
    return Batch(features=torch.stack([item[0][:k] for item in items]),
                 num_boxes=torch.tensor([item[1] for item in items]), tokens=tokens, lengths=lengths,
                 caption_index=torch.tensor([item[3] for item in items]),
                 image_index=torch.tensor([item[4] for item in items]))


class EpochBatchSampler(Sampler[list[int]]):
    """An epoch's batches, every caption once, the order fixed by (seed, epoch).

    By default the captions are shuffled uniformly and cut into batches, as the
    paper trains: the hardest negative of a caption may be any caption. With
    `length_buckets` the shuffled captions are cut into pools of `pool_batches`
    batches, each pool is sorted by length and cut into batches, and the batches
    are shuffled: less padding is computed, but a caption's negatives are then
    captions of similar length. A last batch of a single caption joins the batch
    before it. `start_batch` skips the first batches of the epoch (resume).
    With `num_replicas` > 1, `batch_size` is the global batch and each rank
    yields its contiguous slice of every global batch (DistributedDataParallel),
    so N processes see exactly the batches one process would.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, length_buckets: bool = False,
                 pool_batches: int = 50, drop_last: bool = False, num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.length_buckets = length_buckets
        self.pool_batches = pool_batches
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_batches(self) -> list[list[int]]:
        """All batches of the current epoch, for every rank, before `start_batch` is applied."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        pool = self.batch_size * self.pool_batches if self.length_buckets else max(1, len(order))
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = order[start:start + pool]
            if self.length_buckets:
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            cut = [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
            if len(cut) > 1 and len(cut[-1]) < 2:  # a lone caption has no negatives: join its neighbour
                cut[-2].extend(cut.pop())
            batches.extend(cut)
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches[-2].extend(batches.pop())
        if self.drop_last:
            batches = [b for b in batches if len(b) >= self.batch_size]
        batches = [b for b in batches if len(b) >= max(2, self.num_replicas) or len(batches) == 1]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.epoch_batches()[self.start_batch:]:
            if self.num_replicas > 1:  # this rank's contiguous slice of the global batch
                yield np.array_split(np.asarray(batch), self.num_replicas)[self.rank].tolist()
            else:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.epoch_batches()) - self.start_batch)
