"""The batched, masked score matrix equals a one-pair-at-a-time reference for every variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matching.retrieval.scoring import ImageArrays, pad_tokens, score_matrix
from tests.conftest import random_captions, random_images, tiny_config, tiny_model
from tests.reference import reference_scores

# Every option of the head: the named variants, M = 0..3, both relation norms and clips,
# every stream and both reasoning streams.
VARIANTS = {
    "tshsr": {},
    "hsr": {"streams": "i2t"},
    "hsr-t2i": {"streams": "t2i", "reasoning_stream": "t2i"},
    "sgr": {"reasoning": "sgr", "streams": "i2t"},
    "sgr_both_m1": {"reasoning": "sgr", "reasoning_steps": 1},
    "sgr_on_t2i_m2": {"reasoning": "sgr", "reasoning_stream": "t2i", "reasoning_steps": 2},
    "no_reasoning": {"reasoning_steps": 0},
    "no_reasoning_t2i_only": {"reasoning_steps": 0, "streams": "t2i"},
    "hsr_m2": {"streams": "i2t", "reasoning_steps": 2},
    "reasoning_on_t2i": {"reasoning_stream": "t2i", "reasoning_steps": 2},
    "literal_relation_relu_clip": {"relation_norm": "none", "attention_clip": "relu", "reasoning_steps": 1},
    "literal_relation_on_t2i": {"relation_norm": "none", "streams": "t2i", "reasoning_stream": "t2i"},
    "unidirectional_unnormalised": {"bidirectional": False, "normalize_images": False,
                                    "normalize_text": False, "lambda_i2t": 4.0, "lambda_t2i": 6.0},
}


def edge_case_inputs(seed: int):
    """Images with 1, 2 … 7 boxes (num_regions = 7) and captions of 1 to 10 tokens."""
    features, _ = random_images(5, 7, 24, seed=seed, min_boxes=7)
    num_boxes = np.array([1, 7, 3, 2, 7])
    features[np.arange(7)[None, :] >= num_boxes[:, None]] = 0
    captions = [[1], [1, 2], *random_captions(5, 40, seed=seed + 1)]
    return features, num_boxes, captions


@pytest.mark.parametrize("variant", VARIANTS)
def test_score_matrix_equals_pairwise_reference(variant):
    overrides = VARIANTS[variant]
    model = tiny_model(seed=1, **overrides)
    features, num_boxes, captions = edge_case_inputs(seed=2)
    fast = score_matrix(model, ImageArrays(features, num_boxes), captions)
    slow = reference_scores(model, tiny_config(**overrides), torch.from_numpy(features), num_boxes, captions)
    np.testing.assert_allclose(fast, slow.numpy(), atol=1e-5, rtol=0)
    assert fast.std() > 1e-4  # the scores differ between pairs: the comparison is not vacuous


@pytest.mark.parametrize("variant", ["tshsr", "sgr", "literal_relation_on_t2i"])
def test_pair_scores_equal_reference_in_every_block_shape(variant):
    """The head on a padded batch of mixed lengths and box counts, whole or in tiny chunks."""
    overrides = VARIANTS[variant]
    model = tiny_model(seed=3, **overrides)
    features, num_boxes, captions = edge_case_inputs(seed=4)
    slow = reference_scores(model, tiny_config(**overrides), torch.from_numpy(features), num_boxes, captions)
    tokens, lengths = pad_tokens(captions)
    with torch.no_grad():
        images = model.encode_images(torch.from_numpy(features), torch.from_numpy(num_boxes))
        texts = model.encode_captions(tokens, lengths)
        for chunk_rows in (None, 1, 5):
            fast = model.pair_scores(images, texts, chunk_rows=chunk_rows)
            np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=1e-5, rtol=0)


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
