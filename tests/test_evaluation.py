"""Recall metrics on matrices whose ranks are known, the protocols and the fold averages."""

from __future__ import annotations

import numpy as np
import pytest

from matching.retrieval.metrics import (
    METRIC_KEYS,
    evaluate_protocol,
    fold_metrics,
    format_table,
    i2t_ranks,
    recall_metrics,
    t2i_ranks,
)


def sgraf_style_ranks(sims: np.ndarray, cpi: int):
    """The reference scripts' loops (argsort, position of the best ground truth), for tie-free input."""
    n = sims.shape[0]
    i2t = np.array([min(np.where(np.argsort(sims[i])[::-1] == c)[0][0] for c in range(cpi * i, cpi * i + cpi))
                    for i in range(n)])
    t2i = np.array([np.where(np.argsort(sims[:, c])[::-1] == c // cpi)[0][0] for c in range(n * cpi)])
    return i2t, t2i


def matrix_with_ranks(i2t_target, cpi=2, seed=0):
    """An (n, n·cpi) matrix where image i's best true caption has exactly i2t_target[i] captions above it."""
    rng = np.random.default_rng(seed)
    n = len(i2t_target)
    sims = rng.uniform(0.0, 0.5, size=(n, n * cpi))
    for i, rank in enumerate(i2t_target):
        sims[i, cpi * i] = 0.7
        others = [c for c in range(n * cpi) if c // cpi != i]
        for c in rng.choice(others, size=rank, replace=False):
            sims[i, c] = rng.uniform(0.75, 1.0)
    return sims


def test_i2t_ranks_are_the_designed_ones():
    target = [0, 3, 1, 0, 7, 10]
    sims = matrix_with_ranks(target)
    assert i2t_ranks(sims, 2).tolist() == target
    m = recall_metrics(sims, 2)
    assert m["i2t_r1"] == pytest.approx(100 * 2 / 6)
    assert m["i2t_r5"] == pytest.approx(100 * 4 / 6)
    assert m["i2t_r10"] == pytest.approx(100 * 5 / 6)
    assert m["i2t_medr"] == np.floor(np.median(target)) + 1
    assert m["i2t_meanr"] == pytest.approx(np.mean(target) + 1)


def test_known_t2i_ranks_on_a_permutation():
    # 3 images, 1 caption each: caption c's true image is c; scores put it at rank 0, 2, 1.
    sims = np.array([[0.9, 0.8, 0.8],
                     [0.1, 0.7, 0.5],
                     [0.2, 0.9, 0.6]])
    assert t2i_ranks(sims, 1).tolist() == [0, 2, 1]
    m = recall_metrics(sims, 1)
    assert (m["t2i_r1"], m["t2i_medr"], m["t2i_meanr"]) == (pytest.approx(100 / 3), 2.0, 2.0)
    assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))


def test_agrees_with_the_reference_loops_on_random_scores():
    rng = np.random.default_rng(3)
    sims = rng.normal(size=(40, 200))
    i2t, t2i = sgraf_style_ranks(sims, 5)
    assert i2t_ranks(sims, 5).tolist() == i2t.tolist()
    assert t2i_ranks(sims, 5).tolist() == t2i.tolist()


def test_ties_count_against_the_query():
    """A collapsed model (all scores equal) must not look perfect."""
    m = recall_metrics(np.full((20, 100), 0.5), 5)
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
    assert m["i2t_medr"] == 96 and m["t2i_medr"] == 20


def test_one_thousand_fold_protocol_labels_and_means():
    rng = np.random.default_rng(0)
    sims = rng.normal(size=(5000, 25000)).astype(np.float32)
    idx = np.arange(5000)
    sims[idx, 5 * idx] += 3.0  # strong but imperfect ground truth
    results = evaluate_protocol(sims, "all", 5)
    assert list(results) == ["coco1k", "coco5k"]
    folds = results["coco1k"]["folds"]
    assert len(folds) == 5
    first = recall_metrics(sims[:1000, :5000], 5)
    assert folds[0] == pytest.approx(first)
    for key in METRIC_KEYS:
        assert results["coco1k"][key] == pytest.approx(np.mean([f[key] for f in folds]))
    # rsum is the mean rsum — i.e. the sum of the mean recalls — not 6 × the mean i2t recall.
    mean_recalls = sum(results["coco1k"][f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert results["coco1k"]["rsum"] == pytest.approx(mean_recalls)
    assert results["coco1k"]["i2t_r1"] > results["coco5k"]["i2t_r1"]  # 1K is the easier protocol
    table = format_table(results)
    assert "coco1k" in table and "mean of 5 folds" in table and "coco5k" in table


def test_protocol_sizes_are_checked():
    sims = np.random.default_rng(0).normal(size=(10, 50))
    assert list(evaluate_protocol(sims, "all")) == ["full"]
    with pytest.raises(ValueError, match="needs 5000 test images"):
        evaluate_protocol(sims, "coco1k")
    with pytest.raises(ValueError, match="needs 1000"):
        evaluate_protocol(sims, "f30k")
    with pytest.raises(ValueError, match="expected"):
        recall_metrics(np.zeros((10, 49)))
    with pytest.raises(ValueError, match="NaN"):
        recall_metrics(np.full((2, 10), np.nan))
    with pytest.raises(ValueError, match="folds of 4"):
        fold_metrics(sims, 4)
