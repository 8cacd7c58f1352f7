"""Multi-query scoring speed: all rounds at once against HMRN's round-by-round evaluation structure.

Two baselines, measured in the same run on the same model, device and encoded inputs:

- HMRN's evaluation loop: for each round r the query sets are cut to their first r
  queries and every block of images × sets is scored again from the query vectors
  (`evaluation_individual.py` calls `forward_sim` once per round). Both give the same
  (rounds, Q, N) tensor (checked here to 1e-5); `score_rounds` computes the cosines and
  the local level of every round in one pass and only the reasoning round by round.
- the machine's float32 matmul throughput: the useful FLOPs of the tensor (the d→m
  projections of every attended context dominate) over its time, as a fraction of a
  large matmul's.

    python benchmarks/bench_multiquery.py [--images 200] [--turns 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from matching.model.hmrn import MultiQueryConfig, build_hmrn, encode_query_sets, score_rounds


def matmul_flops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large float32 matmul on `device`."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def round_by_round(model, images, query_sets, turns: int, device: torch.device, block: int) -> np.ndarray:
    """HMRN's structure: every round scored from scratch on sets cut to their first r queries."""
    out = np.zeros((turns, len(query_sets), len(images)), np.float32)
    with torch.inference_mode():
        for r in range(1, turns + 1):
            queries, globs = encode_query_sets(model, [s[:r] for s in query_sets], r, device)
            for q0 in range(0, len(query_sets), block):
                sets = queries.select(slice(q0, q0 + block))
                for i0 in range(0, len(images), block):
                    scores = model.round_scores(images.select(slice(i0, i0 + block)), sets, globs[:, q0:q0 + block])
                    out[r - 1, q0:q0 + block, i0:i0 + block] = scores[-1].t().cpu().numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = MultiQueryConfig(vocab_size=1000, max_turns=args.turns)  # HMRN's sizes: K 36, d 256, m 256
    model = build_hmrn(config).eval().to(device)
    rng = np.random.default_rng(0)
    features = torch.from_numpy(np.abs(rng.normal(size=(args.images, 36, 2048))).astype(np.float32)).to(device)
    sets = [[[1, *rng.integers(4, 1000, size=rng.integers(3, 8)).tolist(), 2] for _ in range(args.turns)]
            for _ in range(args.images)]
    with torch.inference_mode():
        images = model.encode_images(features, torch.full((args.images,), 36, device=device))
    score_rounds(model, images, sets[:4], device=device)  # warm-up
    _sync(device)
    start = time.perf_counter()
    fast = score_rounds(model, images, sets, device=device)
    _sync(device)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = round_by_round(model, images, sets, args.turns, device, block=100)
    _sync(device)
    slow_s = time.perf_counter() - start
    np.testing.assert_allclose(fast, slow, atol=1e-5, rtol=0)
    d, m, k, t = config.embed_size, config.sim_dim, 36, args.turns
    rounds_sum = t * (t + 1) / 2  # the reasoning of round r handles r queries
    per_pair = 2 * (k * t * d + rounds_sum * (k * d + d * m + 3 * config.reasoning_steps * m * m))
    useful = per_pair * args.images**2 / fast_s
    peak = matmul_flops(device)
    print(f"{args.images} images × {args.images} query sets × {t} rounds on {device}")
    print(f"score_rounds: {fast_s:.2f} s; round by round (HMRN's structure): {slow_s:.2f} s; "
          f"ratio {slow_s / fast_s:.2f}× (same scores to 1e-5)")
    print(f"useful throughput {useful / 1e9:.1f} GFLOP/s = {useful / peak:.2f} of a large matmul "
          f"({peak / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
