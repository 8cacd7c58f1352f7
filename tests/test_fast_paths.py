"""The fast head in training: gradients equal the plain pair-by-pair computation's, memory stays small.

Also the pieces of the fast path on their own: the chunked attend-and-project
against autograd, the Gram-matrix norm, the node-0 read-out of the reasoning
layers, and the matmul precision options against float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matching.model.reasoning import HSRLayer, SGRLayer
from matching.model.similarity import attend_project, unit_attention
from matching.retrieval.scoring import ImageArrays, ScoringProgress, pad_tokens, score_matrix
from tests.conftest import random_captions, random_images, tiny_config, tiny_model
from tests.reference import head_scores, reference_scores
from tests.test_scoring import VARIANTS, edge_case_inputs


def _batch(seed: int):
    features, num_boxes, captions = edge_case_inputs(seed)
    tokens, lengths = pad_tokens(captions)
    return torch.from_numpy(features), torch.from_numpy(num_boxes), tokens, lengths


def _gradients(model: torch.nn.Module, scores: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    (scores * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_gradients_equal_the_plain_computation(variant):
    """Training mode (BatchNorm on batch statistics, dropout off): same scores, same gradients."""
    overrides = {**VARIANTS[variant], "dropout": 0.0}
    model = tiny_model(seed=11, **overrides).train()
    features, num_boxes, tokens, lengths = _batch(seed=12)
    fast = model(features, num_boxes, tokens, lengths)  # (5, 7)
    weights = torch.randn(fast.shape, generator=torch.Generator().manual_seed(13))
    fast_grads = _gradients(model, fast, weights)
    images, captions = model.encode_images(features, num_boxes), model.encode_captions(tokens, lengths)
    plain = head_scores(model, tiny_config(**overrides), images, captions)
    plain_grads = _gradients(model, plain, weights)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    assert fast_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert max(g.abs().max() for g in plain_grads.values()) > 1e-3  # not a comparison of zeros


def test_differentiable_reference_equals_the_literal_one():
    """`head_scores` (tensor form, for gradients) computes what `reference_scores` (explicit loops) does."""
    overrides = VARIANTS["literal_relation_relu_clip"]
    model = tiny_model(seed=14, **overrides)
    features, num_boxes, tokens, lengths = _batch(seed=15)
    captions = [t[:n].tolist() for t, n in zip(tokens, lengths, strict=True)]
    with torch.no_grad():
        images, texts = model.encode_images(features, num_boxes), model.encode_captions(tokens, lengths)
        tensor_form = head_scores(model, tiny_config(**overrides), images, texts)
    loops = reference_scores(model, tiny_config(**overrides), features, num_boxes.numpy(), captions)
    np.testing.assert_allclose(tensor_form.double().numpy(), loops.numpy(), atol=1e-5)


def test_gradients_do_not_depend_on_the_chunk_size():
    model = tiny_model(seed=16, dropout=0.0).train()
    features, num_boxes, tokens, lengths = _batch(seed=17)
    images, captions = model.encode_images(features, num_boxes), model.encode_captions(tokens, lengths)
    weights = torch.randn(len(features), len(tokens), generator=torch.Generator().manual_seed(18))
    whole = _gradients(model, model.pair_scores(images, captions, chunk_rows=10_000), weights)
    images, captions = model.encode_images(features, num_boxes), model.encode_captions(tokens, lengths)
    rowwise = _gradients(model, model.pair_scores(images, captions, chunk_rows=1), weights)
    for name, grad in whole.items():
        torch.testing.assert_close(rowwise[name], grad, atol=1e-6, rtol=1e-5)


def test_attend_project_forward_and_backward_against_autograd():
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    weights, values, others = rand(3, 4 * 2, 5), rand(3, 5, 6), rand(4, 2, 6)  # G=3, H=4, Q=2, P=5, d=6
    weight, bias = rand(7, 6), rand(7)
    plain = ((weights @ values).view(3, 4, 2, 6) - others).pow(2) @ weight.T + bias  # (G, H, Q, m)
    fast = attend_project(weights, values, others, weight, bias, chunk_rows=8)  # one group a chunk
    torch.testing.assert_close(fast.view(3, 4, 2, 7), plain)
    assert torch.autograd.gradcheck(lambda *xs: attend_project(*xs, chunk_rows=8),
                                    (weights, values, others, weight, bias))


def test_unit_attention_normalises_the_attended_vector():
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(2, 6, 4, generator=generator)
    values = torch.randn(2, 4, 9, generator=generator)
    attended = unit_attention(weights, values) @ values
    torch.testing.assert_close(attended, (weights @ values) / (weights @ values).norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("layer", [HSRLayer(6), HSRLayer(6, "none"), SGRLayer(6)], ids=["hsr", "hsr-none", "sgr"])
def test_read_out_is_node_zero_of_the_full_layer(layer):
    torch.manual_seed(2)
    with torch.no_grad():  # non-zero biases everywhere: folding them is where a mistake would hide
        for parameter in layer.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    nodes = torch.randn(4, 5, 6)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True, True] + [False] * 3, [True] * 4 + [False]])
    for node_mask in (None, mask):
        torch.testing.assert_close(layer.read_out(nodes, node_mask), layer(nodes, node_mask)[:, 0])


def test_training_keeps_no_tensor_of_batch_squared_times_d():
    """The autograd graph of a training forward holds nothing (Bi, Bc, L, d)-sized (nor K-sized)."""
    model = tiny_model(seed=19, dropout=0.0, embed_size=64).train()
    features, num_boxes = random_images(6, 7, 24, seed=20)
    tokens, lengths = pad_tokens(random_captions(6, 40, seed=21))
    largest = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        largest[0] = max(largest[0], tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.from_numpy(features), torch.from_numpy(num_boxes), tokens, lengths).sum().backward()
    pairs_times_d = 6 * 6 * 64
    words = int(lengths.max())
    assert largest[0] < pairs_times_d * 7  # the plain head saves (6, 6, L, 64) and (6, 6, 7, 64)
    assert largest[0] < pairs_times_d * words


def test_bf16_recall_matches_float32(trained_toy):
    """bfloat16 matmuls (CPU autocast) rank like float32, on all 150 toy images × 750 captions (one image that
    changes its first caption moves i2t R@1 by 0.7 points, one caption 0.13): R@1 within 2 points, and the
    first hit the same image for 95% of the queries."""
    from extract.shards import FeatureStore
    from matching import checkpoint
    from matching.data.captions import evaluation_set, read_captions
    from matching.retrieval.metrics import recall_metrics
    from matching.retrieval.scoring import StoreImages

    features, captions_file, _, best, _ = trained_toy
    model, _, vocab = checkpoint.load(best)
    store = FeatureStore(features)
    image_ids, ordered = evaluation_set(read_captions(captions_file), store.image_ids)
    tokens = [vocab.encode(c.text) for c in ordered]
    images = StoreImages(store, image_ids)
    exact = score_matrix(model, images, tokens)
    bf16 = score_matrix(model, images, tokens, precision="bf16")
    tf32 = score_matrix(model, images, tokens, precision="tf32")
    np.testing.assert_allclose(tf32, exact, atol=1e-5)  # TF32 is float32 on a CPU
    assert 1e-6 < np.abs(bf16 - exact).max() < 0.05  # bf16 really ran, and stayed close
    exact_metrics, bf16_metrics = recall_metrics(exact), recall_metrics(bf16)
    assert exact_metrics["i2t_r1"] > 30 and exact_metrics["t2i_r1"] > 30  # a model that retrieves (chance 0.7)
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert abs(bf16_metrics[key] - exact_metrics[key]) <= 2.0, (key, bf16_metrics[key], exact_metrics[key])
    same_image = np.mean(exact.argmax(0) == bf16.argmax(0))  # each caption's first image
    # each image's first caption comes from the same image (an image's five captions score nearly alike, so
    # which of them is first is a near-tie either way)
    same_owner = np.mean(exact.argmax(1) // 5 == bf16.argmax(1) // 5)
    assert same_image >= 0.95 and same_owner >= 0.95, (same_image, same_owner)


def test_unknown_precision_is_an_error():
    model = tiny_model(seed=0)
    features, num_boxes = random_images(2, 7, 24)
    with pytest.raises(ValueError, match="precision"):
        score_matrix(model, ImageArrays(features, num_boxes), [[1, 5, 2]], precision="fp8")


def test_progress_logs_rate_and_eta_when_not_on_a_terminal():
    lines: list[str] = []
    now = [0.0]
    tracker = ScoringProgress(1000, bar=False, log=lines.append, interval=30.0, clock=lambda: now[0])
    for _ in range(5):
        now[0] += 10.0
        tracker.update(100)  # 100 pairs every 10 s
    tracker.close()
    assert lines == ["scoring: 300/1,000 pairs (30%), 10 pairs/s, ETA 1:10"]


def test_score_matrix_logs_progress_lines():
    model = tiny_model(seed=0)
    features, num_boxes = random_images(3, 7, 24)
    lines: list[str] = []
    score_matrix(model, ImageArrays(features, num_boxes), random_captions(4, 40), log=lines.append, log_every=0.0,
                 block_pairs=2)
    assert lines and all("pairs/s, ETA" in line for line in lines)
    assert lines[0].startswith("scoring: 2/12 pairs")


PEAK_PROBE = """
import gc, sys
import torch
from matching.model.encoders import Embedded
from matching.model.tensors import l2norm
from tests.conftest import tiny_model
from tests.test_scoring import VARIANTS

variant, n, d, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = tiny_model(seed=22, embed_size=d, sim_dim=m, **VARIANTS[variant])
generator = torch.Generator().manual_seed(0)
images = Embedded(l2norm(torch.randn(n, 7, d, generator=generator)), torch.ones(n, 7, dtype=torch.bool),
                  l2norm(torch.randn(n, d, generator=generator)))
captions = Embedded(l2norm(torch.randn(n, 10, d, generator=generator)), torch.ones(n, 10, dtype=torch.bool),
                    l2norm(torch.randn(n, d, generator=generator)))


def resident(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


with torch.inference_mode():
    model.head(images, captions, chunk_rows=64)  # folds cached and every lazy initialisation done
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the resident high-water mark (VmHWM) to the current size
    before = resident("VmRSS:")
    model.head(images, captions, chunk_rows=64)
    print(resident("VmHWM:") - before)
"""


def _peak_bytes(variant: str, n: int, d: int, m: int) -> int:
    """The resident memory a head call of n × n pairs adds at its peak, measured by the kernel in a process of
    its own, whose allocations above 64 KiB are mapped on their own (so that freeing returns them at once and
    the high-water mark follows the live tensors)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the resident high-water mark")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PEAK_PROBE, variant, str(n), str(d), str(m)], capture_output=True,
                            text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.parametrize("variant", ["tshsr", "sgr", "hsr-t2i", "no_reasoning"])
def test_block_memory_estimate_bounds_the_real_peak(variant):
    """`bytes_per_pair` (which sizes the blocks of `score_matrix`) is an upper bound of the real memory a pair
    costs, and close: the kernel's count of the memory a head call makes resident (`_peak_bytes`), compared
    between blocks of 32 × 32 and 48 × 48 pairs so that what does not grow with the pairs (the BLAS library's
    workspace, the interpreter) cancels out."""
    from matching.retrieval.scoring import bytes_per_pair, chunk_bytes

    d, m = 128, 64
    config = tiny_config(embed_size=d, sim_dim=m, **VARIANTS[variant])

    def estimate(n: int) -> int:
        per_pair = bytes_per_pair(7, 10, d, m, streams=config.streams, reasoning_stream=config.reasoning_stream,
                                  reasoning_steps=config.reasoning_steps)
        return n * n * per_pair + chunk_bytes(max(64, n * 10, n * 7), d)  # a chunk holds one group's rows at least

    real = _peak_bytes(variant, 48, d, m) - _peak_bytes(variant, 32, d, m)
    estimated = estimate(48) - estimate(32)
    assert real <= estimated <= 2 * real, (real, estimated)


def test_folded_weights_follow_parameter_updates():
    """Scores without autograd reuse folded reasoning weights until a parameter changes in place."""
    model = tiny_model(seed=23)
    features, num_boxes = random_images(3, 7, 24, seed=24)
    captions = random_captions(4, 40, seed=25)
    before = score_matrix(model, ImageArrays(features, num_boxes), captions)
    with torch.no_grad():
        model.head.reasoning[-1].phi.weight.mul_(3.0)  # an optimizer-like in-place update
    after = score_matrix(model, ImageArrays(features, num_boxes), captions)
    fresh = tiny_model(seed=23)
    fresh.load_state_dict(model.state_dict())
    np.testing.assert_allclose(after, score_matrix(fresh, ImageArrays(features, num_boxes), captions), atol=1e-6)
    assert np.abs(after - before).max() > 1e-4
