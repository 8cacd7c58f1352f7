"""Training-step speed and peak memory: our step against the plain batched step, side by side.

One optimizer step at the paper's sizes (K = 36 regions of 2048-d features, d = 1024,
m = 256, M = 3, a 10,000-word vocabulary) on a batch of B images and their captions,
with lengths as `LengthBucketSampler` makes them (a batch spans one or two lengths):
encoders, the (B, B) score matrix, the hardest-negative loss, backward, gradient
clipping and Adam.

- baseline: the plain batched forward as the code had it before the fast path
  (`plain_similarity_vector` below: every pair's attention, attended vectors and
  (x − y)² at full size in one pass, all reasoning layers on every node), with
  autograd keeping every intermediate for the backward pass;
- ours: `TSHSR.forward` (captions grouped by length, chunked attend-and-project whose
  backward recomputes its chunks, folded reasoning weights, node 0 of the last layer).

Each side runs in its own process, so its peak resident memory (the RSS high-water
mark, `ru_maxrss`) is its own; the process's RSS before the first step (model and
data; Adam's state and the gradients come with the first step) is reported too. Both
sides compute the same gradients (checked on a small batch first, to 1e-5).

The baseline's step memory grows with B² (about 1.5 MB a pair in TSHSR): at B = 128 it
needs over 20 GiB. The sides are compared at batch 32 and at the largest batch whose
predicted baseline peak fits in 70% of the available memory; if that is below B, ours
also runs at B and the baseline at B is extrapolated (memory × (B/b)², time × B/b,
a lower bound since its pairs grow as B²).

`--head-cost` measures instead what the shortlist's first-stage head adds to the library's
training step (`matching.tasks.matching.train_step`: the paper's loss, plus the head's InfoNCE on
detached inputs and its own clipping): the same step with the default head and without it
(`first_stage_dim` 0), alternated in one process, the best of --steps steps each.

Each run appends one JSON line to benchmarks/results/bench_train.jsonl.

    python benchmarks/bench_train.py [--quick] [--batch 128] [--variant tshsr] [--steps 1]
    python benchmarks/bench_train.py --head-cost [--batch 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from matching.config import ModelConfig
from matching.model.encoders import Embedded
from matching.model.reasoning import HSRLayer
from matching.model.similarity import SimilarityHead, attend_regions, attend_words, clipped_cosines
from matching.model.tensors import masked_mean, masked_softmax
from matching.model.tshsr import TSHSR, build_model
from matching.training.loss import hardest_negative_loss

RESULTS = Path(__file__).resolve().parent / "results" / "bench_train.jsonl"
REGIONS, VOCAB = 36, 10000


# ----------------------------------------------------------------------------------------------
# The baseline: the plain batched head as the code had it


def plain_layer(layer: torch.nn.Module, nodes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One reasoning layer on every node, its equations as written (HSR Eq. 4-6, or SGRAF's SGR)."""
    if isinstance(layer, HSRLayer):
        relation = layer.phi(nodes) @ layer.psi(nodes).transpose(1, 2)  # (N, n, n)
        if layer.relation_norm == "softmax":
            relation = masked_softmax(relation, mask.unsqueeze(1))
        relation = relation * (mask.unsqueeze(2) & mask.unsqueeze(1))
        gate = torch.sigmoid(layer.context(relation.unsqueeze(1)).squeeze(1))
        return nodes + layer.w_r((relation * gate) @ layer.w_g(nodes))
    edges = masked_softmax(layer.query(nodes) @ layer.key(nodes).transpose(1, 2), mask.unsqueeze(1))
    return torch.relu(layer.update(edges @ nodes))


def plain_read_out(head: SimilarityHead, stream: str, nodes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """nodes (Bi, Bc, n, m), mask (Bi, Bc, n) → (Bi, Bc, m)."""
    if len(head.reasoning) and stream == head.reasoning_stream:
        bi, bc, n, m = nodes.shape
        flat, flat_mask = nodes.reshape(bi * bc, n, m), mask.reshape(bi * bc, n)
        for layer in head.reasoning:
            flat = plain_layer(layer, flat, flat_mask)
        return flat[:, 0].reshape(bi, bc, m)
    return masked_mean(nodes.flatten(0, 1), mask.flatten(0, 1)).reshape(*nodes.shape[:2], -1)


def plain_similarity_vector(head: SimilarityHead, images: Embedded, captions: Embedded) -> torch.Tensor:
    """S* of every pair in one batched pass over padded (Bi, Bc, K|L, d) tensors: (Bi, Bc, m)."""
    bi, bc = len(images), len(captions)
    global_node = head.sim_global(images.glob[:, None], captions.glob[None])  # (Bi, Bc, m)
    cosines = clipped_cosines(images.local, captions.local, head.attention_clip)  # (Bi, Bc, K, L)
    fused = torch.zeros_like(global_node)
    if head.streams in ("i2t", "both"):
        attended = attend_regions(cosines, images.local, images.mask, captions.mask, head.lambda_i2t)
        local = head.sim_local(attended, captions.local[None])  # (Bi, Bc, L, m)
        nodes = torch.cat([global_node.unsqueeze(2), local], dim=2)  # (Bi, Bc, L+1, m)
        mask = torch.cat([captions.mask.new_ones(bc, 1), captions.mask], dim=1)  # (Bc, L+1)
        fused = fused + plain_read_out(head, "i2t", nodes, mask[None].expand(bi, -1, -1))
    if head.streams in ("t2i", "both"):
        attended = attend_words(cosines, captions.local, images.mask, captions.mask, head.lambda_t2i)
        local = head.sim_local(images.local[:, None], attended)  # (Bi, Bc, K, m)
        nodes = torch.cat([global_node.unsqueeze(2), local], dim=2)  # (Bi, Bc, K+1, m)
        mask = torch.cat([images.mask.new_ones(bi, 1), images.mask], dim=1)  # (Bi, K+1)
        fused = fused + plain_read_out(head, "t2i", nodes, mask[:, None].expand(-1, bc, -1))
    return fused


def baseline_scores(model: TSHSR, features: torch.Tensor, num_boxes: torch.Tensor, tokens: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    images, captions = model.encode_images(features, num_boxes), model.encode_captions(tokens, lengths)
    return torch.sigmoid(model.head.score(plain_similarity_vector(model.head, images, captions))).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# One step, a batch, and the worker that times them in its own process


def make_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """B images (36 boxes) and B captions as a length-bucketed batch: lengths 15 and 16 (tokens)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(batch, REGIONS, 2048, generator=generator)
    lengths = torch.full((batch,), 16, dtype=torch.long)
    lengths[: batch // 2] = 15
    tokens = torch.randint(4, VOCAB, (batch, 16), generator=generator)
    tokens[:, 0], tokens[torch.arange(batch), lengths - 1] = 1, 2
    tokens[torch.arange(16)[None, :] >= lengths[:, None]] = 0
    return features, torch.full((batch,), REGIONS, dtype=torch.long), tokens, lengths


def build(variant: str, dropout: float = 0.4) -> TSHSR:
    torch.manual_seed(0)
    return build_model(ModelConfig.variant(variant, vocab_size=VOCAB, dropout=dropout)).train()


def step(model: TSHSR, optimizer: torch.optim.Optimizer, batch: tuple, impl: str) -> float:
    optimizer.zero_grad(set_to_none=True)
    scores = baseline_scores(model, *batch) if impl == "baseline" else model(*batch)
    loss = hardest_negative_loss(scores, 0.2)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    optimizer.step()
    return float(loss.detach())


def worker(impl: str, variant: str, batch_size: int, steps: int) -> dict[str, Any]:
    """Time `steps` steps after one warm-up step; report seconds a step and the RSS high-water mark."""
    model = build(variant)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    batch = make_batch(batch_size)
    rss_before = _rss_bytes()
    step(model, optimizer, batch, impl)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(model, optimizer, batch, impl)
        times.append(time.perf_counter() - start)
    return {"impl": impl, "seconds_per_step": min(times), "seconds_all": times, "rss_before_bytes": rss_before,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def check_same_gradients(variant: str, batch_size: int = 6) -> float:
    """Largest |difference| between the two sides' gradients on a small batch (dropout off)."""
    batch = make_batch(batch_size, seed=1)
    grads = []
    for impl in ("baseline", "ours"):
        model = build(variant, dropout=0.0)
        scores = baseline_scores(model, *batch) if impl == "baseline" else model(*batch)
        hardest_negative_loss(scores, 0.2, hardest=False).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    worst = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    if worst > 1e-5:
        raise AssertionError(f"the baseline and our step differ: largest gradient difference {worst:.2e}")
    return worst


def head_cost(batch_size: int, steps: int) -> dict[str, Any]:
    """Seconds a training step with and without the first-stage head, alternated, best of `steps` each."""
    from matching.config import Config
    from matching.data.pairs import Batch
    from matching.tasks.matching import train_step

    features, num_boxes, tokens, lengths = make_batch(batch_size)
    index = torch.arange(batch_size)
    batch = Batch(features, num_boxes, tokens, lengths, index, index)
    sides = {}
    for name, dim in (("with_head", None), ("without_head", 0)):
        config = Config().updated(model={"vocab_size": VOCAB, **({} if dim is None else {"first_stage_dim": dim})})
        torch.manual_seed(0)
        model = build_model(config.model).train()
        sides[name] = (config, model, torch.optim.Adam(model.parameters(), lr=2e-4))
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(steps + 1):  # the first round warms up
        for name, (config, model, optimizer) in sides.items():
            start = time.perf_counter()
            train_step(model, optimizer, batch, config, torch.device("cpu"), hardest=True)
            times[name].append(time.perf_counter() - start)
    best = {name: min(values[1:]) for name, values in times.items()}
    head = sides["with_head"][1].first_stage
    figures = {"benchmark": "first_stage_head_cost", "batch": batch_size, "steps": steps,
               "seconds_per_step": best, "head_parameters": sum(p.numel() for p in head.parameters()),
               "relative_cost": best["with_head"] / best["without_head"] - 1}
    print(f"batch {batch_size}: a training step {best['without_head']:.2f} s without the first-stage head, "
          f"{best['with_head']:.2f} s with it ({100 * figures['relative_cost']:+.1f}%; the head has "
          f"{figures['head_parameters']:,} parameters)")
    return figures


def run_worker(impl: str, variant: str, batch_size: int, steps: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", impl, "--variant", variant, "--batch", str(batch_size),
               "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"impl": impl, "failed": done.returncode, "stderr": done.stderr.strip().splitlines()[-3:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["MemAvailable"].split()[0]) * 1024


def compare(variant: str, batch_size: int, steps: int) -> dict[str, Any]:
    """Both sides in their own processes at one batch size: times, peaks and their ratios."""
    rows = {impl: run_worker(impl, variant, batch_size, steps) for impl in ("baseline", "ours")}
    for impl, row in rows.items():
        if "failed" in row:
            print(f"  {impl:8s}: failed (exit {row['failed']}): {' | '.join(row['stderr'])}")
        else:
            print(f"  {impl:8s}: {row['seconds_per_step']:7.2f} s a step, peak RSS "
                  f"{row['peak_rss_bytes'] / 2**30:6.2f} GiB (before the first step "
                  f"{row['rss_before_bytes'] / 2**30:.2f} GiB)")
    figures: dict[str, Any] = {"batch": batch_size, **rows}
    if all("failed" not in row for row in rows.values()):
        base, ours = rows["baseline"], rows["ours"]
        figures["speedup"] = base["seconds_per_step"] / ours["seconds_per_step"]
        figures["peak_memory_ratio"] = ours["peak_rss_bytes"] / base["peak_rss_bytes"]
        figures["step_memory_ratio"] = ((ours["peak_rss_bytes"] - ours["rss_before_bytes"])
                                        / (base["peak_rss_bytes"] - base["rss_before_bytes"]))
        print(f"  batch {batch_size}: ours {figures['speedup']:.2f}× faster, peak RSS "
              f"{figures['peak_memory_ratio']:.2f} of the baseline's (memory the step adds: "
              f"{figures['step_memory_ratio']:.2f})")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, one timed step: a check that it runs")
    parser.add_argument("--batch", type=int, help="batch size (default 128)")
    parser.add_argument("--variant", default="tshsr", choices=["tshsr", "hsr", "hsr-t2i", "sgr"])
    parser.add_argument("--steps", type=int, help="timed steps after a warm-up step (default 1)")
    parser.add_argument("--head-cost", action="store_true",
                        help="time the library's step with and without the first-stage head (default batch 32)")
    parser.add_argument("--worker", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.head_cost:
        record(head_cost(args.batch or (8 if args.quick else 32), args.steps or 3))
        return
    batch_size = args.batch or (16 if args.quick else 128)
    steps = args.steps or 1
    if args.worker:
        print(json.dumps(worker(args.worker, args.variant, batch_size, steps)))
        return
    worst = check_same_gradients(args.variant)
    print(f"{args.variant}: same gradients as the baseline (largest difference {worst:.1e}); "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    figures: dict[str, Any] = {"benchmark": "train_step", "variant": args.variant}
    # The baseline's step memory grows with B²; a batch it cannot hold here is not run, but
    # both sides are compared at the largest batch that fits and ours also runs at B.
    probe = min(batch_size, 32)
    first = compare(args.variant, probe, steps)
    figures["runs"] = [first]
    base = first.get("baseline", {})
    if batch_size > probe and "peak_rss_bytes" in base:
        step_bytes = base["peak_rss_bytes"] - base["rss_before_bytes"]
        fits = probe
        while fits * 2 <= batch_size and base["rss_before_bytes"] + step_bytes * (2 * fits / probe) ** 2 \
                < 0.7 * _available_bytes():
            fits *= 2
        if fits > probe:
            figures["runs"].append(compare(args.variant, fits, steps))
        if fits < batch_size:
            scale = (batch_size / fits) ** 2
            largest = figures["runs"][-1]["baseline"]
            predicted = {"seconds_per_step_at_least": largest["seconds_per_step"] * batch_size / fits,
                         "peak_rss_bytes": largest["rss_before_bytes"]
                         + (largest["peak_rss_bytes"] - largest["rss_before_bytes"]) * scale}
            ours = run_worker("ours", args.variant, batch_size, steps)
            at_batch: dict[str, Any] = {"batch": batch_size, "ours": ours, "baseline_extrapolated": predicted}
            figures["at_batch"] = at_batch
            if "failed" not in ours:
                at_batch["speedup_at_least"] = predicted["seconds_per_step_at_least"] / ours["seconds_per_step"]
                at_batch["peak_memory_ratio"] = ours["peak_rss_bytes"] / predicted["peak_rss_bytes"]
            print(f"  batch {batch_size}: the baseline would need about {predicted['peak_rss_bytes'] / 2**30:.1f} GiB "
                  f"(its step memory grows with B², from batch {fits}); not run. Ours: "
                  + (f"{ours['seconds_per_step']:.2f} s a step, peak RSS {ours['peak_rss_bytes'] / 2**30:.2f} GiB "
                     f"(≥ {figures['at_batch']['speedup_at_least']:.2f}× faster, taking the baseline's time as linear "
                     f"in B; {figures['at_batch']['peak_memory_ratio']:.2f} of its memory)"
                     if "failed" not in ours else f"failed: {ours['stderr']}"))
    figures["load_average_after"] = os.getloadavg()
    record(figures)


def record(figures: dict[str, Any]) -> None:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown"
    line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": f"cpu: {cpu}", "threads": torch.get_num_threads(), "dtype": "float32",
            "load_average": os.getloadavg(), "torch": torch.__version__, **figures}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
