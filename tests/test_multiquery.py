"""HMRN's equations: the batched, masked model against a loop-by-loop reference, and small cases by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from matching.config import ConfigError
from matching.data.queries import pad_query_sets
from matching.model.hmrn import (
    MultiQueryConfig,
    MultiQuerySimilarities,
    build_hmrn,
    ensemble_scores,
    info_nce,
    local_i2t,
    local_t2i,
    multiquery_loss,
    round_weights,
    score_rounds,
)
from matching.retrieval.scoring import ImageArrays
from tests.conftest import random_images, randomize_batchnorm
from tests.reference_multiquery import (
    reference_info_nce,
    reference_loss,
    reference_round_scores,
    reference_training_levels,
)

TINY = {"vocab_size": 40, "img_dim": 24, "num_regions": 7, "word_dim": 10, "embed_size": 16, "sim_dim": 8,
        "max_turns": 4}


def tiny_config(**overrides) -> MultiQueryConfig:
    return MultiQueryConfig(**{**TINY, **overrides})


def tiny_hmrn(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_hmrn(tiny_config(**overrides))
    randomize_batchnorm(model, seed)
    return model.eval()


def random_query_sets(n: int, seed: int, max_turns: int = 4, sizes: list[int] | None = None):
    """n sets of 1..max_turns queries (or the given sizes), each query 1-7 words between <start>/<end>."""
    rng = np.random.default_rng(seed)
    sizes = sizes or rng.integers(1, max_turns + 1, size=n).tolist()
    return [[[1, *rng.integers(4, 40, size=rng.integers(1, 8)).tolist(), 2] for _ in range(size)] for size in sizes]


VARIANTS = {
    "i2t": {},
    "t2i": {"direction": "t2i"},
    "ends_readout_rounded_weights": {"query_readout": "ends", "round_weight": "rounded"},
    "constant_weight_one_step": {"round_weight": "constant", "reasoning_steps": 1, "direction": "t2i"},
    "no_reasoning_steps": {"reasoning_steps": 0},
    "unidirectional_unnormalised": {"bidirectional": False, "normalize_images": False, "normalize_text": False,
                                    "lambda_i2t": 3.0, "lambda_reasoning": 7.0},
    "other_weights": {"local_weight": 0.3, "reasoning_weight": 0.5, "lambda_t2i": 4.0, "direction": "t2i"},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_scores_equal_the_pairwise_reference_in_padded_batches(variant):
    overrides = VARIANTS[variant]
    model = tiny_hmrn(seed=1, **overrides)
    features, num_boxes = random_images(5, 7, 24, seed=2)
    sets = random_query_sets(6, seed=3, sizes=[1, 4, 2, 3, 4, 1])
    fast = score_rounds(model, ImageArrays(features, num_boxes), sets, rounds=5)  # one round past the longest
    slow = reference_round_scores(model, tiny_config(**overrides), features, num_boxes, sets, rounds=5)
    assert fast.shape == (5, 6, 5)
    np.testing.assert_allclose(fast, slow.numpy(), atol=1e-5, rtol=0)
    assert fast.std() > 1e-3  # the scores differ between pairs: the comparison is not vacuous


def test_a_pair_alone_scores_as_inside_a_padded_batch():
    model = tiny_hmrn(seed=4)
    features, num_boxes = random_images(4, 7, 24, seed=5, min_boxes=1)
    sets = random_query_sets(4, seed=6, sizes=[3, 1, 4, 2])
    batch = score_rounds(model, ImageArrays(features, num_boxes), sets, rounds=4)
    for q in range(4):
        for n in range(4):
            alone = score_rounds(model, ImageArrays(features[n:n + 1, : num_boxes[n]], num_boxes[n:n + 1]),
                                 [sets[q]], rounds=4)
            np.testing.assert_allclose(alone[:, 0, 0], batch[:, q, n], atol=1e-5, rtol=0)


def test_a_round_uses_only_its_first_queries():
    """Changing query t of a set leaves rounds 1…t-1 unchanged and changes round t."""
    model = tiny_hmrn(seed=7)
    features, num_boxes = random_images(3, 7, 24, seed=8)
    sets = random_query_sets(2, seed=9, sizes=[4, 4])
    changed = [sets[0][:2] + [[1, 5, 6, 7, 2]] + sets[0][3:], sets[1]]
    before = score_rounds(model, ImageArrays(features, num_boxes), sets)
    after = score_rounds(model, ImageArrays(features, num_boxes), changed)
    np.testing.assert_allclose(before[:2], after[:2], atol=1e-6, rtol=0)
    assert np.abs(before[2:, 0] - after[2:, 0]).min() > 1e-6
    np.testing.assert_allclose(before[:, 1], after[:, 1], atol=1e-6, rtol=0)


def test_block_sizes_do_not_change_scores():
    model = tiny_hmrn(seed=10, direction="t2i")
    features, num_boxes = random_images(7, 7, 24, seed=11)
    sets = random_query_sets(9, seed=12)
    whole = score_rounds(model, ImageArrays(features, num_boxes), sets, batch_size=64)
    tiny_blocks = score_rounds(model, ImageArrays(features, num_boxes), sets, batch_size=2, memory_budget=1)
    np.testing.assert_allclose(whole, tiny_blocks, atol=1e-6, rtol=0)
    encoded = model.encode_images(torch.from_numpy(features), torch.from_numpy(num_boxes))
    np.testing.assert_allclose(score_rounds(model, encoded, sets), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["i2t", "t2i", "constant_weight_one_step"])
def test_training_forward_equals_the_reference(variant):
    overrides = VARIANTS[variant]
    model = tiny_hmrn(seed=13, **overrides)
    features, num_boxes = random_images(5, 7, 24, seed=14)
    sets = random_query_sets(5, seed=15, sizes=[4, 4, 2, 4, 3])  # two sets shorter than the batch's T
    tokens, lengths = pad_query_sets(sets)
    with torch.no_grad():
        sims = model(torch.from_numpy(features), torch.from_numpy(num_boxes), tokens, lengths)
    local, glob, reasoning = reference_training_levels(model, tiny_config(**overrides), features, num_boxes, sets)
    assert sims.local.shape == (5, 5, 4)
    np.testing.assert_allclose(sims.local.numpy(), local.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(sims.glob.numpy(), glob.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(sims.reasoning.numpy(), reasoning.numpy(), atol=1e-5, rtol=0)
    assert min(float(sims.local.std()), float(sims.glob.std()), float(sims.reasoning.std())) > 1e-3


def test_local_levels_by_hand():
    # One image with K = 2 regions, one set of T = 2 queries; clipped cosines c (regions × queries).
    c = torch.tensor([[0.8, -0.5], [0.2, 0.6]])
    cosines = torch.nn.functional.leaky_relu(c, 0.1)[None, None]  # (1, 1, 2, 2)
    regions, queries = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    clipped = [[0.8, -0.05], [0.2, 0.6]]
    # i2t, λ = 5: round 1 uses query 1 only, so each region's attended scalar is its own cosine.
    i2t = local_i2t(cosines, regions, queries, 5.0, 2)[0, 0]
    assert i2t[0].item() == pytest.approx((0.8 + 0.2) / 2, abs=1e-6)
    round2 = []
    for row in clipped:
        e = [math.exp(5 * v) for v in row]
        round2.append(sum(w / sum(e) * v for w, v in zip(e, row, strict=True)))
    assert i2t[1].item() == pytest.approx(sum(round2) / 2, abs=1e-6)
    # t2i, λ = 15: each query attends over the regions; round 2 is the mean of the two queries.
    per_query = []
    for t in range(2):
        column = [clipped[0][t], clipped[1][t]]
        e = [math.exp(15 * v) for v in column]
        per_query.append(sum(w / sum(e) * v for w, v in zip(e, column, strict=True)))
    t2i = local_t2i(cosines, regions, queries, 15.0, 2)[0, 0]
    assert t2i.tolist() == pytest.approx([per_query[0], (per_query[0] + per_query[1]) / 2], abs=1e-6)
    # A padded region and a padded query change nothing.
    padded = torch.zeros(1, 1, 3, 3)
    padded[..., :2, :2] = cosines
    pad_regions, pad_queries = torch.tensor([[True, True, False]]), torch.tensor([[True, True, False]])
    assert local_i2t(padded, pad_regions, pad_queries, 5.0, 2)[0, 0].tolist() == pytest.approx(i2t.tolist(), abs=1e-6)
    assert local_t2i(padded, pad_regions, pad_queries, 15.0, 2)[0, 0].tolist() == pytest.approx(t2i.tolist(), abs=1e-6)


def test_round_weights():
    assert round_weights(10, 10).tolist() == pytest.approx([sum(range(1, r + 1)) / 55 for r in range(1, 11)])
    assert round_weights(3, 10, "rounded").tolist() == pytest.approx([0.02, 0.05, 0.11])  # HMRN's code
    assert round_weights(12, 10)[-3:].tolist() == pytest.approx([1.0, 1.0, 1.0])  # beyond T: 1
    assert round_weights(4, 10, "constant").tolist() == [1.0] * 4
    assert round_weights(2, 2).tolist() == pytest.approx([1 / 3, 1.0])


def test_info_nce_and_the_loss_equal_loops():
    generator = torch.Generator().manual_seed(0)
    local = torch.rand(5, 5, 3, generator=generator) * 0.2
    glob, reasoning = torch.rand(5, 5, generator=generator) * 0.2, torch.rand(5, 5, generator=generator) * 0.2
    cfg = tiny_config()
    assert float(info_nce(glob, 40.0)) == pytest.approx(reference_info_nce(glob, 40.0), abs=1e-5)
    loss = multiquery_loss(MultiQuerySimilarities(local, glob, reasoning), tau=cfg.tau, local_weight=cfg.local_weight,
                           reasoning_weight=cfg.reasoning_weight)
    assert float(loss) == pytest.approx(reference_loss(local, glob, reasoning, cfg), abs=1e-5)
    # A perfect diagonal drives InfoNCE towards 0; a constant matrix gives 2 log B.
    assert float(info_nce(torch.eye(4), 40.0)) < 1e-6
    assert float(info_nce(torch.full((4, 4), 0.3), 40.0)) == pytest.approx(2 * math.log(4), abs=1e-5)


def test_training_on_padded_sets_gives_finite_gradients_everywhere():
    model = tiny_hmrn(seed=16).train()
    features, num_boxes = random_images(4, 7, 24, seed=17, min_boxes=1)
    tokens, lengths = pad_query_sets(random_query_sets(4, seed=18, sizes=[4, 1, 3, 4]))
    sims = model(torch.from_numpy(features), torch.from_numpy(num_boxes), tokens, lengths)
    loss = multiquery_loss(sims, tau=40.0, local_weight=0.6, reasoning_weight=0.3)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert grads["reasoning.score.weight"].abs().sum() > 0 and grads["text_encoder.gru.weight_ih_l0"].abs().sum() > 0


def test_ensemble_is_the_mean_of_the_two_directions():
    i2t, t2i = tiny_hmrn(seed=19), tiny_hmrn(seed=20, direction="t2i")
    features, num_boxes = random_images(3, 7, 24, seed=21)
    sets = random_query_sets(3, seed=22)
    images = ImageArrays(features, num_boxes)
    both = ensemble_scores([i2t, t2i], images, sets)
    np.testing.assert_allclose(both, (score_rounds(i2t, images, sets) + score_rounds(t2i, images, sets)) / 2,
                               atol=1e-7, rtol=0)


def test_config_round_trip_and_validation():
    cfg = tiny_config(direction="t2i", round_weight="rounded")
    assert MultiQueryConfig.from_dict(cfg.to_dict()) == cfg
    assert MultiQueryConfig.from_dict({"lambda_i2t": "4"}).lambda_i2t == 4.0  # YAML strings are coerced
    assert MultiQueryConfig().global_weight == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="direction"):
        MultiQueryConfig(direction="both").validate()
    with pytest.raises(ConfigError, match="sum to at most 1"):
        MultiQueryConfig(local_weight=0.8, reasoning_weight=0.3).validate()
    with pytest.raises(ConfigError, match="unknown field"):
        MultiQueryConfig.from_dict({"streams": "both"})
    with pytest.raises(ConfigError, match="vocab_size"):
        build_hmrn(MultiQueryConfig())
