"""Score-matrix speed: batched images × captions blocks against the reference code's caption loop.

Two baselines, measured in the same run:

- SGRAF's evaluation structure: captions taken one at a time, each scored against every
  image (`shard_attn_scores` → `forward_sim`), on the same model, device and encoded inputs.
  Both produce the same matrix (checked here to 1e-5); the ratio is what batching the
  captions with padding masks buys (little on a CPU, where both are compute-bound).
- the machine's own float32 matmul throughput: the score matrix's useful FLOPs (the d→m
  projections of every attended vector dominate: 2·d·m·(L + K) per pair) divided by its
  time, as a fraction of what a large matmul reaches.

    python benchmarks/bench_scoring.py [--images 100] [--captions 500] [--variant tshsr] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from matching.config import ModelConfig
from matching.model import build_model
from matching.scoring import ImageArrays, encode_captions, encode_images, score_matrix


def caption_loop(model, image_emb, blocks, n_captions: int) -> np.ndarray:
    """One caption at a time against all images, as the reference evaluation does."""
    scores = np.zeros((len(image_emb), n_captions), np.float32)
    with torch.inference_mode():
        for index, captions in blocks:
            for row, column in enumerate(index.tolist()):
                length = int(captions.mask[row].sum())
                one = captions.select(slice(row, row + 1))
                one.local, one.mask = one.local[:, :length], one.mask[:, :length]
                scores[:, column] = model.pair_scores(image_emb, one)[:, 0].float().cpu().numpy()
    return scores


def matmul_flops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large float32 matmul on `device` (the machine's practical peak)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def flops_per_pair(config: ModelConfig, words: float, regions: int) -> float:
    """Multiply-adds ×2 of one pair: cosines, attention sums, the d→m projections, the reasoning."""
    d, m = config.embed_size, config.sim_dim
    total = 2 * regions * words * d  # cosines
    if config.streams in ("i2t", "both"):
        total += 2 * words * regions * d + 2 * words * d * m  # α·V and W((a − t)²)
    if config.streams in ("t2i", "both"):
        total += 2 * regions * words * d + 2 * regions * d * m  # β·T and W((v − b)²)
    nodes = words + 1 if config.reasoning_stream == "i2t" else regions + 1
    total += config.reasoning_steps * (2 * nodes * m * m * 4 + 2 * nodes * nodes * m * 2)
    return float(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--captions", type=int, default=500)
    parser.add_argument("--variant", default="tshsr", choices=["tshsr", "hsr", "hsr-t2i", "sgr"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = ModelConfig.variant(args.variant, vocab_size=10000)  # the paper's sizes: d 1024, m 256, K 36
    model = build_model(config).eval().to(args.device)
    features = np.abs(rng.normal(size=(args.images, 36, 2048))).astype(np.float32)
    num_boxes = np.full(args.images, 36)
    captions = [[1, *rng.integers(4, 10000, size=rng.integers(8, 20)).tolist(), 2] for _ in range(args.captions)]
    device = torch.device(args.device)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return value, time.perf_counter() - start

    with torch.inference_mode():
        image_emb = encode_images(model, ImageArrays(features, num_boxes), device)
        blocks = encode_captions(model, captions, device)
    baseline, base_s = timed(lambda: caption_loop(model, image_emb, blocks, len(captions)))
    ours, ours_s = timed(lambda: score_matrix(model, ImageArrays(features, num_boxes), captions, device=device))
    np.testing.assert_allclose(ours, baseline, atol=1e-5)
    pairs = args.images * args.captions
    words = float(np.mean([len(c) for c in captions]))
    peak = matmul_flops(device)
    achieved = pairs * flops_per_pair(config, words, 36) / ours_s
    print(f"{args.variant} (d={config.embed_size}, m={config.sim_dim}, M={config.reasoning_steps}) on {device}: "
          f"{args.images} images × {args.captions} captions")
    print(f"caption loop (reference structure): {base_s:7.2f} s  {pairs / base_s:9,.0f} pairs/s  (baseline)")
    print(f"score_matrix (batched, incl. encoding): {ours_s:7.2f} s  {pairs / ours_s:9,.0f} pairs/s  "
          f"= {base_s / ours_s:.1f} × the baseline")
    print(f"useful FLOP/s of score_matrix: {achieved / 1e9:.1f} G = {achieved / peak:.0%} of this device's "
          f"{peak / 1e9:.0f} GFLOP/s float32 matmul")


if __name__ == "__main__":
    main()
