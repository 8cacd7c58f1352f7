"""Each equation on small tensors, against numbers computed by hand in the test."""

from __future__ import annotations

import math

import pytest
import torch

from matching.model.reasoning import HSRLayer, SGRLayer
from matching.model.similarity import VectorSimilarity, attend_regions, attend_words, clipped_cosines
from matching.model.tensors import l2norm
from tests.conftest import tiny_model
from tests.reference import hsr_layer


def test_clipped_cosines_leaky_and_relu():
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, K=2, d=2)
    words = torch.tensor([[[0.6, -0.8]]])  # (1, L=1, 2)
    leaky = clipped_cosines(regions, words, "leaky_relu")[0, 0, :, 0]
    relu = clipped_cosines(regions, words, "relu")[0, 0, :, 0]
    assert leaky.tolist() == pytest.approx([0.6, -0.08])
    assert relu.tolist() == pytest.approx([0.6, 0.0])


def test_attention_weights_eq2_and_eq3_by_hand():
    # K = 2 regions, L = 2 words, d = 2; cosines c = [[0.6, 0.3], [0.0, 0.9]] (regions × words): no row
    # or column has norm 1, so normalising over the words, over the regions or not at all all differ.
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    words = torch.tensor([[[0.6, 0.0], [0.3, 0.9]]])
    cos = torch.einsum("ikd,cld->ickl", regions, words)
    lam = 2.0
    # Eq. 2: c̄ normalised over words per region; α softmax over regions for each word.
    row = [math.hypot(0.6, 0.3), math.hypot(0.0, 0.9)]
    c_bar = [[0.6 / row[0], 0.3 / row[0]], [0.0 / row[1], 0.9 / row[1]]]
    a1 = [math.exp(lam * c_bar[0][0]), math.exp(lam * c_bar[1][0])]  # word 1
    alpha_word1 = [a / sum(a1) for a in a1]
    attended = attend_regions(cos, regions, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool),
                              lam)
    expected = torch.tensor(alpha_word1)  # Σ_i α_i1 v_i with v_1 = e1, v_2 = e2
    assert torch.allclose(attended[0, 0, 0], expected / expected.norm(), atol=1e-6)
    unnormalised = torch.softmax(lam * torch.tensor([0.6, 0.0]), 0)
    assert not torch.allclose(attended[0, 0, 0], unnormalised / unnormalised.norm(), atol=1e-3)
    # Eq. 3: c̄ normalised over regions per word; β softmax over words for each region.
    col = [math.hypot(0.6, 0.0), math.hypot(0.3, 0.9)]
    b2 = [math.exp(lam * 0.0 / col[0]), math.exp(lam * 0.9 / col[1])]  # region 2
    beta_region2 = [b / sum(b2) for b in b2]
    attended_t = attend_words(cos, words, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool),
                              lam)
    vec = beta_region2[0] * words[0, 0] + beta_region2[1] * words[0, 1]
    assert torch.allclose(attended_t[0, 0, 1], vec / vec.norm(), atol=1e-6)


def test_attention_ignores_padded_regions_and_words():
    torch.manual_seed(0)
    regions, words = l2norm(torch.randn(1, 3, 4)), l2norm(torch.randn(1, 4, 4))
    cos = clipped_cosines(regions, words)
    padded_regions = torch.cat([regions, torch.ones(1, 2, 4)], 1)
    padded_words = torch.cat([words, torch.ones(1, 3, 4)], 1)
    pcos = clipped_cosines(padded_regions, padded_words)
    rmask = torch.tensor([[True] * 3 + [False] * 2])
    wmask = torch.tensor([[True] * 4 + [False] * 3])
    full = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    assert torch.allclose(attend_regions(pcos, padded_regions, rmask, wmask, 9.0)[0, 0, :4],
                          attend_regions(cos, regions, *full, 9.0)[0, 0], atol=1e-6)
    assert torch.allclose(attend_words(pcos, padded_words, rmask, wmask, 9.0)[0, 0, :3],
                          attend_words(cos, words, *full, 9.0)[0, 0], atol=1e-6)


def test_vector_similarity_eq1_by_hand():
    sim = VectorSimilarity(2, 2)
    with torch.no_grad():
        sim.proj.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        sim.proj.bias.copy_(torch.tensor([0.0, 1.0]))
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    raw = torch.tensor([1.0, 1.0 + 4.0 + 1.0])  # W (x − y)² + b
    assert torch.allclose(sim(x, y), raw / raw.norm(), atol=1e-6)
    assert torch.allclose(sim(x, y).norm(), torch.tensor(1.0), atol=1e-6)


def _layer_params(layer: torch.nn.Module, name: str) -> dict:
    return {f"{name}.{k}": v.detach().double() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("relation_norm", ["softmax", "none"])
def test_hsr_layer_matches_equations_and_ignores_padding(relation_norm):
    torch.manual_seed(1)
    layer = HSRLayer(5, relation_norm).double()
    nodes = torch.randn(1, 4, 5, dtype=torch.float64)
    expected = hsr_layer(_layer_params(layer, "l"), "l", nodes[0], relation_norm)
    out = layer(nodes, torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(out[0], expected, atol=1e-10)
    # Three padded nodes with large values change nothing at the four valid ones.
    padded = torch.cat([nodes, 50 * torch.randn(1, 3, 5, dtype=torch.float64)], 1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    assert torch.allclose(layer(padded, mask)[0, :4], expected, atol=1e-10)


def test_hsr_residual_and_context_gate():
    """With W_r = 0 the layer is the identity (residual); the gate scales R elementwise into (0, R)."""
    torch.manual_seed(2)
    layer = HSRLayer(3)
    nodes = torch.randn(2, 5, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    gated = layer.relation(nodes, mask)
    raw = torch.softmax(layer.phi(nodes) @ layer.psi(nodes).transpose(1, 2), -1)
    assert ((gated > 0) & (gated < raw)).all()
    with torch.no_grad():
        layer.w_r.weight.zero_()
        layer.w_r.bias.zero_()
    assert torch.equal(layer(nodes, mask), nodes)


def test_sgr_layer_ignores_padding():
    torch.manual_seed(3)
    layer = SGRLayer(4)
    nodes = torch.randn(1, 3, 4)
    padded = torch.cat([nodes, 10 * torch.randn(1, 2, 4)], 1)
    mask = torch.tensor([[True, True, True, False, False]])
    assert torch.allclose(layer(padded, mask)[0, :3], layer(nodes, torch.ones(1, 3, dtype=torch.bool))[0],
                          atol=1e-6)


def test_two_stream_fusion_is_the_sum_of_the_streams():
    """Eq. 8: S* of TSHSR = S*_i2t (reasoned, node 0) + S*_t2i (mean of K+1 nodes), same weights."""
    both = tiny_model(seed=5)
    i2t, t2i = tiny_model(seed=5, streams="i2t"), tiny_model(seed=5, streams="t2i", reasoning_steps=0)
    t2i.load_state_dict(both.state_dict(), strict=False)  # t2i has no reasoning layers
    i2t.load_state_dict(both.state_dict())
    torch.manual_seed(0)
    features, num_boxes = torch.rand(3, 7, 24), torch.tensor([7, 4, 2])
    tokens, lengths = torch.randint(4, 40, (2, 6)), torch.tensor([6, 3])
    with torch.no_grad():
        images, captions = both.encode_images(features, num_boxes), both.encode_captions(tokens, lengths)
        fused = both.head.similarity_vector(images, captions)
        parts = i2t.head.similarity_vector(images, captions) + t2i.head.similarity_vector(images, captions)
        assert torch.allclose(fused, parts, atol=1e-6)
        score = torch.sigmoid(fused @ both.head.score.weight[0] + both.head.score.bias[0])
        assert torch.allclose(both.pair_scores(images, captions), score, atol=1e-6)


def test_no_reasoning_reads_out_the_mean_of_the_i2t_nodes():
    """Table III's M = 0 row: without reasoning the i2t stream is averaged over its L+1 nodes."""
    model = tiny_model(seed=6, streams="i2t", reasoning_steps=0)
    torch.manual_seed(0)
    with torch.no_grad():
        images = model.encode_images(torch.rand(1, 7, 24), torch.tensor([5]))
        captions = model.encode_captions(torch.tensor([[1, 5, 9, 2, 0]]), torch.tensor([4]))
        vector = model.head.similarity_vector(images, captions)[0, 0]
        head = model.head
        cos = clipped_cosines(images.local, captions.local)
        attended = attend_regions(cos, images.local, images.mask, captions.mask, 9.0)[0, 0, :4]
        nodes = torch.cat([head.sim_global(images.glob, captions.glob),
                           head.sim_local(attended, captions.local[0, :4])])
        assert torch.allclose(vector, nodes.mean(0), atol=1e-6)
