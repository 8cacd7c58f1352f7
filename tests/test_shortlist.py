"""Two-stage retrieval: faiss shortlists equal numpy's ranking; re-scored candidates equal the score matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matching.retrieval.scoring import ImageArrays, encode_images, pad_tokens, score_matrix
from matching.retrieval.shortlist import GlobalIndex, Shortlist, global_vectors, score_candidates, shortlist
from tests.conftest import random_captions, random_images, tiny_model
from tests.test_scoring import VARIANTS


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def numpy_top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def test_flat_index_top_k_equals_numpy_argsort_both_ways():
    images, captions = unit_vectors(120, 24, seed=0), unit_vectors(300, 24, seed=1)
    sims = captions.astype(np.float64) @ images.astype(np.float64).T
    for matrix, k in ((sims, 7), (sims.T, 11)):  # no near-ties at the top: float32 and float64 rank alike
        assert np.diff(np.sort(matrix, axis=1)[:, -k - 1:], axis=1).min() > 1e-6
    result = shortlist(images, captions, k_images=7, k_captions=11)
    _, t2i = numpy_top_k(captions, images, 7)
    _, i2t = numpy_top_k(images, captions, 11)
    np.testing.assert_array_equal(result.images_of_caption, t2i)
    np.testing.assert_array_equal(result.captions_of_image, i2t)
    scores, _ = GlobalIndex.build(images).search(captions, 7)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, t2i, 1), atol=1e-5)


def test_ivf_searching_every_cell_is_exact_and_hnsw_finds_the_neighbours():
    gallery, queries = unit_vectors(400, 16, seed=2), unit_vectors(50, 16, seed=3)
    _, exact = numpy_top_k(queries, gallery, 10)
    ivf = GlobalIndex.build(gallery, "ivf", nlist=8, nprobe=8)
    np.testing.assert_array_equal(ivf.search(queries, 10)[1], exact)
    hnsw = GlobalIndex.build(gallery, "hnsw", ef_search=200)
    found = hnsw.search(queries, 10)[1]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.95


def test_k_larger_than_the_gallery_and_bad_inputs():
    gallery = unit_vectors(5, 8, seed=4)
    scores, ids = GlobalIndex.build(gallery).search(gallery, 50)
    assert ids.shape == (5, 5) and (ids[:, 0] == np.arange(5)).all()  # each vector is its own best match
    with pytest.raises(ValueError, match="index kind"):
        GlobalIndex.build(gallery, "lsh")
    with pytest.raises(ValueError, match="queries must be"):
        GlobalIndex.build(gallery).search(unit_vectors(2, 9, seed=5), 1)


def test_global_vectors_are_unit_float32():
    vectors = global_vectors(torch.randn(6, 10, dtype=torch.float64) * 3)
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)


def test_candidates_are_the_union_of_both_directions():
    shortlisted = Shortlist(images_of_caption=np.array([[0, 1], [1, -1], [2, 0]]),
                            captions_of_image=np.array([[0], [2], [2]]))
    expected = {(0, 0), (1, 0), (1, 1), (2, 2), (0, 2), (1, 2)}
    assert {tuple(p) for p in shortlisted.candidates().tolist()} == expected
    assert len(shortlisted.candidates()) == len(expected)


@pytest.mark.parametrize("variant", ["tshsr", "sgr", "hsr-t2i", "literal_relation_on_t2i", "no_reasoning"])
def test_rescored_candidates_equal_the_score_matrix(variant):
    model = tiny_model(seed=5, **VARIANTS[variant])
    features, num_boxes = random_images(9, 7, 24, seed=6, min_boxes=1)
    captions = [[1], *random_captions(14, 40, seed=7)]
    full = score_matrix(model, ImageArrays(features, num_boxes), captions)
    rng = np.random.default_rng(8)
    candidates = np.stack([rng.integers(0, 9, 60), rng.integers(0, 15, 60)], 1)
    for block_pairs in (None, 4):
        scores = score_candidates(model, ImageArrays(features, num_boxes), captions, candidates,
                                  block_pairs=block_pairs)
        np.testing.assert_allclose(scores, full[candidates[:, 0], candidates[:, 1]], atol=1e-6, rtol=0)


def test_rescoring_takes_encoded_images_and_captions():
    model = tiny_model(seed=9)
    features, num_boxes = random_images(5, 7, 24, seed=10)
    captions = random_captions(8, 40, seed=11)
    full = score_matrix(model, ImageArrays(features, num_boxes), captions)
    with torch.inference_mode():
        images = encode_images(model, ImageArrays(features, num_boxes), torch.device("cpu"))
        texts = model.encode_captions(*pad_tokens(captions))
        image_vectors, text_vectors = model.image_vectors(images), model.caption_vectors(texts)
    short = shortlist(global_vectors(image_vectors), global_vectors(text_vectors), k_images=2, k_captions=3)
    candidates = short.candidates()
    scores = score_candidates(model, images, texts, candidates)
    np.testing.assert_allclose(scores, full[candidates[:, 0], candidates[:, 1]], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="candidate pairs must index"):
        score_candidates(model, images, texts, np.array([[5, 0]]))
