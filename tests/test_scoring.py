"""The batched, masked score matrix equals a one-pair-at-a-time reference for every variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matching.scoring import ImageArrays, score_matrix
from tests.conftest import random_captions, random_images, tiny_config, tiny_model
from tests.reference import reference_scores

VARIANTS = {
    "tshsr": {},
    "hsr_i2t_only": {"streams": "i2t"},
    "sgraf_sgr": {"reasoning": "sgr", "streams": "i2t"},
    "sgr_both": {"reasoning": "sgr", "reasoning_steps": 1},
    "no_reasoning": {"reasoning_steps": 0},
    "reasoning_on_t2i": {"reasoning_stream": "t2i", "reasoning_steps": 2},
    "t2i_only": {"streams": "t2i", "reasoning_stream": "t2i"},
    "literal_relation_relu_clip": {"relation_norm": "none", "attention_clip": "relu", "reasoning_steps": 1},
    "unidirectional_unnormalised": {"bidirectional": False, "normalize_images": False,
                                    "normalize_text": False, "lambda_i2t": 4.0, "lambda_t2i": 6.0},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_score_matrix_equals_pairwise_reference(variant):
    overrides = VARIANTS[variant]
    model = tiny_model(seed=1, **overrides)
    features, num_boxes = random_images(4, 7, 24, seed=2)
    captions = random_captions(6, 40, seed=3)
    fast = score_matrix(model, ImageArrays(features, num_boxes), captions)
    slow = reference_scores(model, tiny_config(**overrides), torch.from_numpy(features), num_boxes, captions)
    np.testing.assert_allclose(fast, slow.numpy(), atol=1e-5, rtol=0)
    assert fast.std() > 1e-4  # the scores differ between pairs: the comparison is not vacuous


def test_block_sizes_do_not_change_scores():
    model = tiny_model(seed=4)
    features, num_boxes = random_images(9, 7, 24, seed=5)
    captions = random_captions(13, 40, seed=6)
    whole = score_matrix(model, ImageArrays(features, num_boxes), captions, batch_size=64)
    tiny_blocks = score_matrix(model, ImageArrays(features, num_boxes), captions, batch_size=2,
                               memory_budget=1)  # one pair per block
    np.testing.assert_allclose(whole, tiny_blocks, atol=1e-6, rtol=0)


def test_padding_regions_and_words_do_not_change_scores():
    """An image padded with extra zero rows, or a caption scored beside longer ones, scores the same."""
    model = tiny_model(seed=7)
    features, num_boxes = random_images(3, 5, 24, seed=8)
    wider = np.zeros((3, 7, 24), np.float32)
    wider[:, :5] = features
    captions = random_captions(5, 40, seed=9)
    narrow = score_matrix(model, ImageArrays(features, num_boxes), captions)
    padded = score_matrix(model, ImageArrays(wider, num_boxes), captions)
    alone = np.stack([score_matrix(model, ImageArrays(features, num_boxes), [c])[:, 0] for c in captions], 1)
    np.testing.assert_allclose(narrow, padded, atol=1e-6, rtol=0)
    np.testing.assert_allclose(narrow, alone, atol=1e-6, rtol=0)


def test_score_matrix_restores_training_mode_and_needs_no_grad():
    model = tiny_model(seed=0).train()
    features, num_boxes = random_images(2, 7, 24)
    scores = score_matrix(model, ImageArrays(features, num_boxes), random_captions(3, 40))
    assert model.training and scores.dtype == np.float32 and scores.shape == (2, 3)


def test_too_many_boxes_for_the_model_is_an_error():
    model = tiny_model(seed=0)
    features = np.ones((1, 9, 24), np.float32)
    with pytest.raises(ValueError, match="num_regions = 7"):
        score_matrix(model, ImageArrays(features, np.array([9])), [[1, 5, 2]])
