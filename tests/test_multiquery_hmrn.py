"""What it takes to stand next to HMRN's table: its phrase cleaning, its query tokens, its evaluation protocol and
its published defaults, each pinned to the value HMRN's code uses (docs/multi-query.md, "Reproducing HMRN's table")."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from matching.config import PRESETS, Config, MultiQueryConfig
from matching.data.queries import import_vg_queries, read_query_sets
from matching.model.hmrn import build_hmrn, score_rounds
from matching.retrieval.scoring import ImageArrays
from pipelines.cli import cli
from tests.test_multiquery_data import phrases, region

# --------------------------------------------------------------------------- phrase cleaning


@pytest.fixture
def cleaning_layout(tmp_path):
    """Images whose queries depend on the cleaning: blank and space-padded phrases around the 10-query threshold."""
    rg = tmp_path / "rg_jsons"
    rg.mkdir()
    images = {
        # 9 distinct phrases, a blank one and a space-padded copy: HMRN keeps 11, the strict cleaning 9 (dropped).
        7: [*[region(i, p) for i, p in enumerate(phrases(9, "seven"))], region(20, "  "), region(21, "Seven thing 0 ")],
        # 10 distinct phrases and a blank one with a low region id: both keep the image, HMRN's first ten differ.
        8: [region(5, " "), *[region(10 + i, p) for i, p in enumerate(phrases(10, "eight"))]],
        # Nothing to clean: the same under both.
        9: [region(i, p) for i, p in enumerate(phrases(10, "nine"))],
    }
    for image_id, regions in images.items():
        (rg / f"{image_id}.json").write_text(json.dumps({"regions": regions}), encoding="utf-8")
    splits = tmp_path / "caches"
    splits.mkdir()
    (splits / "vg_train.txt").write_text("7\n", encoding="utf-8")
    (splits / "vg_val.txt").write_text("8\n", encoding="utf-8")
    (splits / "vg_test.txt").write_text("9\n", encoding="utf-8")
    return rg, splits


def test_hmrns_cleaning_lower_cases_only_and_keeps_blank_phrases(tmp_path, cleaning_layout):
    rg, splits = cleaning_layout
    counts = import_vg_queries(rg, splits, tmp_path / "hmrn.jsonl", cleaning="hmrn")
    sets = {s.image_id: s.queries for s in read_query_sets(tmp_path / "hmrn.jsonl")}
    assert sets["7"] == (*phrases(9, "seven"), "  ", "seven thing 0 ")  # in region-id order, as HMRN orders them
    assert sets["8"] == (" ", *phrases(10, "eight"))
    assert sets["9"] == tuple(phrases(10, "nine"))
    assert (counts.blank_queries, counts.empty_phrases, counts.duplicate_phrases) == (2, 0, 0)
    # The strict cleaning would drop image 7 and change image 8's first ten queries.
    assert (counts.other_keeps, counts.other_drops, counts.other_changes) == (0, 1, 1)
    assert "2 blank phrases kept as queries" in counts.summary()
    assert "strict cleaning (--cleaning strict" in counts.summary() and "drop 1 kept here" in counts.summary()


def test_the_strict_cleaning_strips_drops_blanks_and_counts_what_hmrns_would_change(tmp_path, cleaning_layout):
    rg, splits = cleaning_layout
    counts = import_vg_queries(rg, splits, tmp_path / "strict.jsonl")
    sets = {s.image_id: s.queries for s in read_query_sets(tmp_path / "strict.jsonl")}
    assert set(sets) == {"8", "9"} and sets["8"] == tuple(phrases(10, "eight"))
    assert (counts.empty_phrases, counts.duplicate_phrases, counts.blank_queries) == (2, 1, 0)
    assert (counts.other_keeps, counts.other_drops, counts.other_changes) == (1, 0, 1)
    assert counts.too_few_queries == {"train": 1, "val": 0, "test": 0}


def test_import_vg_prints_the_difference_and_takes_hmrns_cleaning(tmp_path, cleaning_layout):
    rg, splits = cleaning_layout
    for cleaning, line in (("strict", "would keep 1 images dropped here, drop 0 kept here, and change the first 10 "
                                      "queries of 1 images both keep"),
                           ("hmrn", "would keep 0 images dropped here, drop 1 kept here, and change the first 10 "
                                    "queries of 1 images both keep")):
        result = CliRunner().invoke(cli, ["import-vg", str(rg), "--splits-dir", str(splits), "--out",
                                          str(tmp_path / f"{cleaning}.jsonl"), "--cleaning", cleaning])
        assert result.exit_code == 0, result.output
        assert line in " ".join(result.output.split())
    assert len(read_query_sets(tmp_path / "hmrn.jsonl")) == 3 and len(read_query_sets(tmp_path / "strict.jsonl")) == 2


# --------------------------------------------------------------------------- HMRN's query tokens


def test_a_query_is_its_words_and_end_by_default_and_old_checkpoints_keep_start_end():
    assert Config.default("multi-query").model.query_wrap == "end"  # HMRN's data loader appends only <end>
    saved = Config.default("multi-query").to_dict()
    del saved["model"]["query_wrap"]  # a checkpoint written before the field existed
    assert Config.from_checkpoint(saved).model.query_wrap == "start-end"
    assert Config.from_dict(saved).model.query_wrap == "end"  # a config file without it gets today's default


# --------------------------------------------------------------------------- HMRN's published defaults

# HMRN's opts.py and model.py (LZH-053/HMRN) and the paper, written out as numbers: what `MultiQueryConfig()`,
# `--preset hmrn` (the multi-query task's recipe) and `import-hmrn` must give. Not read from any config.
HMRN_MODEL = {"lambda_i2t": 5.0, "lambda_t2i": 15.0, "lambda_reasoning": 15.0, "tau": 40.0, "local_weight": 0.6,
              "reasoning_weight": 0.3, "embed_size": 256, "sim_dim": 256, "word_dim": 300, "img_dim": 2048,
              "num_regions": 36, "dropout": 0.4, "max_turns": 10, "reasoning_steps": 3, "gru_layers": 1,
              "bidirectional": True, "normalize_images": True, "normalize_text": True}
HMRN_RECIPE = {"learning_rate": 4e-4, "epochs": 150, "lr_decay_epoch": 75, "lr_decay": 0.1, "batch_size": 128,
               "grad_clip": 2.0}


@pytest.mark.parametrize("field, value", sorted(HMRN_MODEL.items()))
def test_each_published_model_default_is_hmrns_number(field, value):
    assert getattr(MultiQueryConfig(), field) == value
    assert getattr(Config.default("multi-query").model, field) == value


@pytest.mark.parametrize("field, value", sorted(HMRN_RECIPE.items()))
def test_each_published_training_default_is_hmrns_number(field, value):
    assert getattr(Config.default("multi-query").train, field) == value
    assert PRESETS["hmrn"][field] == value


def test_the_default_model_scores_with_hmrns_numbers_not_with_the_configs():
    """The reference gets HMRN's literals, not the config the model was built from: a swapped λ, α or β in the
    defaults changes the model's scores and not the reference's."""
    from tests.conftest import random_images, randomize_batchnorm
    from tests.reference_multiquery import reference_round_scores

    for direction in ("i2t", "t2i"):
        torch.manual_seed(0)
        model = build_hmrn(MultiQueryConfig(vocab_size=30, img_dim=24, direction=direction))  # every other default
        randomize_batchnorm(model, 0)
        model.eval()
        published = SimpleNamespace(**{**MultiQueryConfig().to_dict(), **HMRN_MODEL, "direction": direction,
                                       "round_weight": "triangular", "query_readout": "last"})
        features, num_boxes = random_images(2, 36, 24, seed=1)
        rng = np.random.default_rng(2)
        sets = [[[*rng.integers(4, 30, size=3).tolist(), 2] for _ in range(4)] for _ in range(2)]
        ours = score_rounds(model, ImageArrays(features, num_boxes), sets)
        expected = reference_round_scores(model, published, features, num_boxes, sets, rounds=4).numpy()
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0, err_msg=direction)
