"""The training loader: every caption once per epoch with its own image, with workers, deterministic."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from extract.shards import FeatureStore
from matching.data.captions import Caption, CaptionFormatError
from matching.data.pairs import EpochBatchSampler, PairDataset, build_pairs, collate_pairs
from matching.data.text import Vocabulary

VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "w"])


def captions_for(ids, per_image=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Caption(image_id, " ".join(["w"] * int(rng.integers(1, 12))), "train", f"f:{n}")
            for n, image_id in enumerate(i for i in ids for _ in range(per_image))]


def loader(dataset, batch_size, seed, workers=0, epoch=0, **kwargs):
    sampler = EpochBatchSampler([len(c) for c in dataset.pairs.captions], batch_size, seed=seed,
                                pool_batches=2, **kwargs)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("in_memory", [False, True])
def test_every_caption_once_with_its_image(tmp_features, workers, in_memory):
    directory, ids, features, num_boxes = tmp_features
    store = FeatureStore(directory)
    pairs = build_pairs(captions_for(ids), store.image_ids, VOCAB)
    dataset = PairDataset(store, pairs, in_memory=in_memory)
    seen = Counter()
    for batch in loader(dataset, batch_size=4, seed=1, workers=workers):
        for row, caption in enumerate(batch.caption_index.tolist()):
            seen[caption] += 1
            image = ids.index(pairs.image_ids[batch.image_index[row]])
            assert image == caption // 3  # captions_for gives each image three consecutive captions
            k = int(batch.num_boxes[row])
            assert k == num_boxes[image]
            np.testing.assert_allclose(batch.features[row, :k].numpy(), features[image, :k], atol=1e-6)
            assert not batch.features[row, k:].any()
            assert batch.lengths[row] == len(pairs.captions[caption])
            assert batch.tokens[row, : batch.lengths[row]].tolist() == pairs.captions[caption]
    assert seen == Counter(range(len(pairs)))


def padding(batches, lengths):
    return sum(len(batch) * lengths[batch].max() - lengths[batch].sum() for batch in batches)


def test_order_depends_only_on_seed_and_epoch_and_is_uniform_by_default():
    lengths = np.random.default_rng(0).integers(3, 40, size=1000)
    a = EpochBatchSampler(lengths, 32, seed=7)
    b = EpochBatchSampler(lengths, 32, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert sorted(i for batch in b for i in batch) == list(range(1000))
    # Uniform shuffling, as the paper trains: batches mix lengths like random batches do, so a
    # caption's hardest negative is not restricted to captions of its own length.
    rng = np.random.default_rng(1)
    random_padding = padding(np.array_split(rng.permutation(1000), len(b)), lengths)
    assert 0.8 * random_padding < padding(list(b), lengths) < 1.2 * random_padding
    spread = [lengths[batch].max() - lengths[batch].min() for batch in b]
    assert np.mean(spread) > 30  # lengths 3..39 in nearly every batch


def test_length_buckets_cut_padding_when_asked():
    lengths = np.random.default_rng(0).integers(3, 40, size=1000)
    bucketed = EpochBatchSampler(lengths, 32, seed=7, length_buckets=True)
    uniform = EpochBatchSampler(lengths, 32, seed=7)
    assert padding(list(bucketed), lengths) < 0.3 * padding(list(uniform), lengths)
    assert sorted(i for batch in bucketed for i in batch) == list(range(1000))


@pytest.mark.parametrize("buckets", [False, True])
def test_resume_skips_batches_and_ranks_split_global_batches(buckets):
    lengths = np.arange(103) % 17
    whole = EpochBatchSampler(lengths, 10, seed=3, length_buckets=buckets)
    whole.set_epoch(2)
    batches = list(whole)
    assert all(len(batch) >= 2 for batch in batches)
    whole.set_epoch(2, start_batch=4)
    assert list(whole) == batches[4:] and len(whole) == len(batches) - 4
    ranks = [EpochBatchSampler(lengths, 10, seed=3, length_buckets=buckets, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    for merged, part0, part1 in zip(batches, *ranks, strict=True):
        assert part0 + part1 == merged


def test_captions_without_features_are_an_error(tmp_features):
    directory, ids, *_ = tmp_features
    caps = captions_for(ids[:2]) + [Caption("lost.jpg", "w", "train", "caps.tsv:99")]
    with pytest.raises(CaptionFormatError, match="caps.tsv:99: image 'lost.jpg' has no features"):
        build_pairs(caps, FeatureStore(directory).image_ids, VOCAB)


def test_collate_pads_to_the_batch_maximum():
    items = [(torch.ones(5, 3), 2, torch.tensor([1, 4, 2]), 0, 0), (torch.ones(5, 3), 4, torch.tensor([1, 2]), 1, 1)]
    batch = collate_pairs(items)
    assert batch.features.shape == (2, 4, 3) and batch.tokens.tolist() == [[1, 4, 2], [1, 2, 0]]
