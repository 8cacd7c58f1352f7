"""Per-round multi-query metrics on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from matching.retrieval.metrics import format_round_table, round_chance, round_metrics, round_ranks


def test_round_metrics_by_hand_with_ties_against_the_query():
    # 2 rounds, 3 query sets, 3 images; set q describes image q.
    scores = np.array([
        [[0.9, 0.1, 0.2],    # round 1, set 0: its image first → rank 0
         [0.5, 0.5, 0.1],    # set 1: tied with image 0 → the tie counts against it: rank 1
         [0.3, 0.8, 0.2]],   # set 2: images 0 and 1 above → rank 2
        [[0.9, 0.1, 0.2],
         [0.4, 0.6, 0.1],    # round 2: set 1 first
         [0.3, 0.2, 0.25]],  # set 2: image 0 above → rank 1
    ], np.float32)
    assert round_ranks(scores).tolist() == [[0, 1, 2], [0, 0, 1]]
    metrics = round_metrics(scores)
    assert metrics == {"rounds": [
        {"round": 1, "r1": pytest.approx(100 / 3), "r5": 100.0, "r10": 100.0, "meanr": pytest.approx(2.0)},
        {"round": 2, "r1": pytest.approx(200 / 3), "r5": 100.0, "r10": 100.0, "meanr": pytest.approx(4 / 3)},
    ]}
    assert json.loads(json.dumps(metrics))["rounds"][1]["round"] == 2  # the JSON layout as it is written
    table = format_round_table(metrics, round_chance(3))
    assert table.splitlines()[2].split() == ["1", "|", "33.3", "100.0", "100.0", "2.0"]
    assert table.splitlines()[-1].split() == ["chance", "|", "33.3", "100.0", "100.0", "2.0"]


def test_a_collapsed_model_gets_the_worst_rank_and_all_images_count():
    scores = np.zeros((3, 200, 200), np.float32)  # every pair scores the same
    metrics = round_metrics(scores)  # more than one chunk of rows
    assert all(row["r1"] == 0.0 and row["meanr"] == 200.0 for row in metrics["rounds"])
    assert len(metrics["rounds"]) == 3


def test_explicit_targets_and_bad_input():
    scores = np.array([[[0.1, 0.9, 0.3, 0.0], [0.5, 0.1, 0.2, 0.7]]])  # 1 round, 2 sets, 4 images
    assert round_ranks(scores, targets=np.array([1, 2])).tolist() == [[0, 2]]
    with pytest.raises(ValueError, match="give each set's target"):
        round_ranks(scores)
    with pytest.raises(ValueError, match="3-d"):
        round_ranks(scores[0])
    with pytest.raises(ValueError, match="NaN"):
        round_ranks(np.full((1, 2, 2), np.nan))
    assert round_chance(100) == {"r1": 1.0, "r5": 5.0, "r10": 10.0, "meanr": 50.5}


def script_rank(row: np.ndarray, index: int) -> int:
    """HMRN's evaluation script (eval_test), one query set: its image's position in argsort, reversed."""
    return int(np.where(np.argsort(row)[::-1] == index)[0][0])


def test_hmrns_tie_rule_is_its_scripts_argsort_position():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(2, 300, 300)).astype(np.float32)  # many ties, more than one chunk of rows
    scores[0, 5] = 0.0  # a collapsed row
    expected = [[script_rank(scores[r, q].astype(np.float64), q) for q in range(300)] for r in range(2)]
    assert round_ranks(scores, ties="argsort").tolist() == expected
    assert (round_ranks(scores, ties="argsort") <= round_ranks(scores)).all()  # ours counts every tie against
    untied = rng.normal(size=(1, 50, 50)).astype(np.float32)
    assert (round_ranks(untied, ties="argsort") == round_ranks(untied)).all()
    metrics = round_metrics(scores, ties="argsort")["rounds"][1]
    ranks = np.array(expected[1])
    assert metrics["meanr"] == pytest.approx(ranks.mean() + 1) and metrics["r5"] == pytest.approx(
        100.0 * len(np.where(ranks < 5)[0]) / len(ranks))
    with pytest.raises(ValueError, match="unknown tie rule"):
        round_ranks(untied, ties="random")
