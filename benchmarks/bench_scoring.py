"""Score-matrix speed against SGRAF's algorithm and this device's matmul peak, in one run.

At the paper's sizes (K = 36 regions, captions of 8-20 words plus <start>/<end>,
d = 1024, m = 256, M = 3), with random weights:

1. SGR: `score_matrix` against SGRAF's algorithm as SGRAF writes it
   (`EncoderSimilarity.forward` + `SCAN_attention` + `GraphReasoning`, written here from
   its equations): captions one at a time, each repeated over every image of the call
   and scored against all of them at once with `torch.bmm`, the image self-attention
   recomputed per call (200 images, 100 captions a call), the text self-attention per
   caption, all three reasoning layers in full, node 0 read out.
2. TSHSR: `score_matrix` against the same per-caption loop with our TSHSR equations
   (both streams, HSR on the i2t stream, the t2i stream averaged).
3. SGR, the whole `evaluate` path (`matching.retrieval.evaluate.evaluate_checkpoint`: checkpoint
   loading, feature shards, captions, encoding, scoring, metrics) on a generated
   200 images × 1000 captions, against SGRAF's algorithm given all 200 images per call
   (timed on the first `--baseline-captions` captions: its cost is linear in them).

Our time includes caption encoding (1, 2) or everything (3); the baselines' time is
their scoring loop only, on captions and images already encoded. Both sides produce
the same matrix (checked to 1e-5). Useful FLOP/s count the plain algorithm's FLOPs
(`plain_flops`; a FLOP we do not compute still counts) over our time, as a fraction of
the best float32 GEMM this device runs (`matmul_peak`, measured in the same run).

With `--coco5k` (needs a GPU): COCO-5K-sized exact scoring, 5,000 images × 25,000
captions, in float32, TF32 and bfloat16, with the bf16/TF32 rankings checked
against float32's.

Ours is also timed with `precision="bf16"` (bfloat16 matmuls; not exact), with its
largest score difference from float32 and how often the best image stays the same.

Each run appends one JSON line to benchmarks/results/bench_scoring.jsonl.

    python benchmarks/bench_scoring.py [--quick] [--device cpu]
    python benchmarks/bench_scoring.py --coco5k --device cuda [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from matching.config import Config, EvaluationSettings, ModelConfig
from matching.model.encoders import Embedded
from matching.model.tensors import l2norm
from matching.model.tshsr import TSHSR, build_model
from matching.retrieval.scoring import ImageArrays, encode_images, pad_tokens, score_matrix

RESULTS = Path(__file__).resolve().parent / "results" / "bench_scoring.jsonl"
REGIONS, VOCAB = 36, 10000


# ----------------------------------------------------------------------------------------------
# The plain algorithm's FLOPs and the device's peak


def plain_flops(config: ModelConfig, lengths: list[int], regions: int = REGIONS) -> float:
    """Multiply-adds × 2 of the plain algorithm for one image against captions of these lengths.

    Counts, per pair with L words (tokens incl. <start>/<end>), K regions, d, m:
    - cosines c_ij: 2·K·L·d;
    - i2t stream: attended vectors α·V 2·L·K·d, Eq. 1's d→m projection of every word 2·L·d·m;
    - t2i stream: attended vectors β·T 2·K·L·d, the projection of every region 2·K·d·m;
    - the global node's projection 2·d·m and the final score 2·m;
    - each of the M reasoning layers, in full on all n nodes (n = L+1 or K+1):
      SGR: query, key and update projections 3·2·n·m², edges and aggregation 2·2·n²·m;
      HSR: φ, ψ, W_g and W_r 4·2·n·m², relation and message 2·2·n²·m, the 3×3 conv 2·9·n².
    Elementwise work (clipping, norms, softmax, squares) and the encoders are not counted.
    """
    d, m, k = config.embed_size, config.sim_dim, regions
    total = 0.0
    for length in lengths:
        flops = 2 * k * length * d + 2 * d * m + 2 * m
        if config.streams in ("i2t", "both"):
            flops += 2 * length * k * d + 2 * length * d * m
        if config.streams in ("t2i", "both"):
            flops += 2 * k * length * d + 2 * k * d * m
        n = length + 1 if config.reasoning_stream == "i2t" else k + 1
        if config.reasoning == "sgr":
            layer = 3 * 2 * n * m * m + 2 * 2 * n * n * m
        else:
            layer = 4 * 2 * n * m * m + 2 * 2 * n * n * m + 2 * 9 * n * n
        flops += config.reasoning_steps * layer
        total += flops
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the fastest of a few large GEMMs on `device` (square, and the d→m projection's shape)."""
    best = 0.0
    shapes = [(2048, 2048, 2048), (16384, 1024, 256), (4096, 4096, 1024)]
    if device.type == "cuda":
        shapes = [(8192, 8192, 8192), (65536, 1024, 256)]
    for rows, inner, cols in shapes:
        a = torch.randn(rows, inner, device=device, dtype=dtype)
        b = torch.randn(inner, cols, device=device, dtype=dtype)
        a @ b
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            for _ in range(5):
                a @ b
            _sync(device)
            best = max(best, 2 * rows * inner * cols * 5 / (time.perf_counter() - start))
    return best


# ----------------------------------------------------------------------------------------------
# Baselines: SGRAF's per-caption loop, and the same loop with our TSHSR equations


def _self_attention(pool: torch.nn.Module, local: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """SGRAF's VisualSA / TextSA: local (B, n, d), query (B, d) → (B, d)."""
    common = pool.local_proj(local) * pool.global_proj(query).unsqueeze(1)
    weights = torch.softmax(pool.score(common).squeeze(2), dim=1)
    return l2norm((weights.unsqueeze(2) * local).sum(dim=1))


def _scan_attention(query: torch.Tensor, context: torch.Tensor, smooth: float) -> torch.Tensor:
    """SGRAF's SCAN_attention: words (n, L, d) attend to regions (n, K, d) → (n, L, d)."""
    attn = F.leaky_relu(torch.bmm(context, query.transpose(1, 2)), 0.1)  # (n, K, L)
    attn = l2norm(attn, 2)
    attn = torch.softmax(attn.transpose(1, 2).contiguous() * smooth, dim=2)  # (n, L, K)
    weighted = torch.bmm(context.transpose(1, 2), attn.transpose(1, 2).contiguous())  # (n, d, L)
    return l2norm(weighted.transpose(1, 2), dim=-1)


def sgraf_forward_sim(model: TSHSR, regions: torch.Tensor, words: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """SGRAF's EncoderSimilarity.forward (SGR): regions (n_image, K, d), words (n_caption, L, d) → (n_image, n_caption).

    Written from its equations; the scores equal `score_matrix`'s.
    """
    head = model.head
    n_image = regions.shape[0]
    image_glob = _self_attention(model.image_encoder.pool, regions, regions.mean(1))  # once per call
    columns = []
    for i, n_word in enumerate(lengths):
        cap_i = words[i, :n_word].unsqueeze(0)  # (1, L, d)
        cap_i_expand = cap_i.repeat(n_image, 1, 1)  # (n_image, L, d)
        cap_glo_i = _self_attention(model.text_encoder.pool, cap_i, cap_i.mean(1))
        context = _scan_attention(cap_i_expand, regions, head.lambda_i2t)
        sim_loc = l2norm(head.sim_local.proj((context - cap_i_expand).pow(2)), dim=-1)  # (n_image, L, m)
        sim_glo = l2norm(head.sim_global.proj((image_glob - cap_glo_i).pow(2)), dim=-1)  # (n_image, m)
        sim_emb = torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)  # (n_image, L+1, m)
        for layer in head.reasoning:  # GraphReasoning: every node, every layer
            edges = torch.softmax(torch.bmm(layer.query(sim_emb), layer.key(sim_emb).permute(0, 2, 1)), dim=-1)
            sim_emb = torch.relu(layer.update(torch.bmm(edges, sim_emb)))
        columns.append(torch.sigmoid(head.score(sim_emb[:, 0, :])))
    return torch.cat(columns, 1)


def _conv3x3(layer: torch.nn.Module, relation: torch.Tensor) -> torch.Tensor:
    return layer.context(relation.unsqueeze(1)).squeeze(1)


def tshsr_per_caption(model: TSHSR, images: Embedded, words: torch.Tensor, caption_glob: torch.Tensor,
                      lengths: list[int]) -> torch.Tensor:
    """TSHSR in SGRAF's loop structure: each caption against every image at once with `torch.bmm`."""
    head = model.head
    regions = images.local
    n_image = regions.shape[0]
    columns = []
    for i, n_word in enumerate(lengths):
        cap_i = words[i, :n_word].unsqueeze(0).repeat(n_image, 1, 1)  # (n_image, L, d)
        sim_glo = l2norm(head.sim_global.proj((images.glob - caption_glob[i]).pow(2)))  # (n_image, m)
        cosines = F.leaky_relu(torch.bmm(regions, cap_i.transpose(1, 2)), 0.1)  # (n_image, K, L)
        alpha = torch.softmax(head.lambda_i2t * l2norm(cosines, 2).transpose(1, 2), dim=2)  # (n_image, L, K)
        attended = l2norm(torch.bmm(alpha, regions))  # (n_image, L, d)
        nodes = torch.cat([sim_glo.unsqueeze(1), l2norm(head.sim_local.proj((attended - cap_i).pow(2)))], 1)
        for layer in head.reasoning:  # HSR, every node, every layer
            relation = torch.softmax(torch.bmm(layer.phi(nodes), layer.psi(nodes).transpose(1, 2)), dim=-1)
            gated = relation * torch.sigmoid(_conv3x3(layer, relation))
            nodes = nodes + layer.w_r(torch.bmm(gated, layer.w_g(nodes)))
        i2t = nodes[:, 0]
        beta = torch.softmax(head.lambda_t2i * l2norm(cosines, 1), dim=2)  # (n_image, K, L)
        attended_t = l2norm(torch.bmm(beta, cap_i))  # (n_image, K, d)
        local_t = l2norm(head.sim_local.proj((regions - attended_t).pow(2)))  # (n_image, K, m)
        t2i = torch.cat([sim_glo.unsqueeze(1), local_t], 1).mean(1)
        columns.append(torch.sigmoid(head.score(i2t + t2i)))
    return torch.cat(columns, 1)


# ----------------------------------------------------------------------------------------------
# Inputs


def random_inputs(n_images: int, n_captions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Detector-like features (n, 36, 2048), 36 boxes each, and captions of 8-20 words."""
    rng = np.random.default_rng(seed)
    features = np.abs(rng.normal(size=(n_images, REGIONS, 2048))).astype(np.float32)
    captions = [[1, *rng.integers(4, VOCAB, size=rng.integers(8, 21)).tolist(), 2] for _ in range(n_captions)]
    return features, np.full(n_images, REGIONS), captions


def encoded_words(model: TSHSR, captions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Captions encoded once: (words (n, L, d), global vectors (n, d), lengths)."""
    with torch.inference_mode():
        tokens, lengths = pad_tokens(captions)
        emb = model.encode_captions(tokens, lengths)
    return emb.local, emb.glob, lengths.tolist()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - start


def in_shards(fn: Callable[[slice], torch.Tensor], captions: slice, shard: int = 100) -> np.ndarray:
    """fn on the captions of `captions`, `shard` at a time (one SGRAF forward_sim call each): (n_image, n)."""
    with torch.inference_mode():
        return torch.cat([fn(slice(s, min(s + shard, captions.stop)))
                          for s in range(captions.start, captions.stop, shard)], 1).numpy()


# ----------------------------------------------------------------------------------------------
# The measurements


def kernel_comparison(variant: str, n_images: int, n_captions: int, device: torch.device, peak: float,
                      bf16: bool = True) -> dict:
    """`score_matrix` on encoded images against the per-caption baseline of `variant`."""
    torch.manual_seed(0)
    config = ModelConfig.variant(variant, vocab_size=VOCAB)
    model = build_model(config).eval().to(device)
    features, num_boxes, captions = random_inputs(n_images, n_captions)
    with torch.inference_mode():
        images = encode_images(model, ImageArrays(features, num_boxes), device)
    words, caption_glob, lengths = encoded_words(model, captions)
    if variant == "sgr":
        name = "SGRAF's algorithm (per caption, all images per call)"

        def base_fn(s: slice) -> torch.Tensor:
            return sgraf_forward_sim(model, images.local, words[s], lengths[s])
    else:
        name = f"{variant} per caption (SGRAF's loop structure)"

        def base_fn(s: slice) -> torch.Tensor:
            return tshsr_per_caption(model, images, words[s], caption_glob[s], lengths[s])

    # Interleaved by shards of 100 captions, alternating which side goes first, so that a
    # change of load on a shared machine falls on both sides alike.
    base_s = ours_s = 0.0
    base_parts, ours_parts = [], []
    for number, start in enumerate(range(0, n_captions, 100)):
        shard = slice(start, start + 100)
        for side in ((0, 1) if number % 2 == 0 else (1, 0)):
            if side == 0:
                part, seconds = timed(lambda sh=shard: in_shards(base_fn, sh), device)
                base_parts.append(part)
                base_s += seconds
            else:
                part, seconds = timed(lambda sh=shard: score_matrix(model, images, captions[sh], device=device), device)
                ours_parts.append(part)
                ours_s += seconds
    baseline, ours = np.concatenate(base_parts, 1), np.concatenate(ours_parts, 1)
    np.testing.assert_allclose(ours, baseline, atol=1e-5, rtol=0)
    pairs = n_images * n_captions
    flops = plain_flops(config, [len(c) for c in captions]) * n_images
    row = {"variant": variant, "images": n_images, "captions": n_captions, "baseline": name,
           "baseline_pairs_per_s": pairs / base_s, "ours_pairs_per_s": pairs / ours_s, "ratio": base_s / ours_s,
           "plain_gflop_per_pair": flops / pairs / 1e9,
           "ours_useful_fraction_of_peak": flops / ours_s / peak,
           "baseline_fraction_of_peak": flops / base_s / peak}
    if bf16:  # not exact: how much faster, and how far from float32
        low, low_s = timed(lambda: score_matrix(model, images, captions, device=device, precision="bf16"), device)
        row.update({"ours_bf16_pairs_per_s": pairs / low_s, "bf16_max_abs_diff": float(np.abs(low - ours).max()),
                    "bf16_t2i_top1_agreement": float((low.argmax(0) == ours.argmax(0)).mean())})
    return row


def write_evaluation_set(root: Path, n_images: int, captions_per_image: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """A checkpoint (SGR, random weights), a feature directory and a captions file for `evaluate`."""
    from extract.shards import RegionRecord, ShardWriter
    from matching import checkpoint
    from matching.data.text import Vocabulary

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *[f"w{i}" for i in range(VOCAB - 4)]])
    config = Config(model=ModelConfig.variant("sgr", vocab_size=VOCAB))
    ckpt = checkpoint.save(root / "model.pt", build_model(config.model), config, vocab)
    writer = ShardWriter(root / "features", max_boxes=REGIONS, feature_dim=2048)  # float16, as extracted
    lines = []
    for i in range(n_images):
        image_id = f"img{i:05d}.jpg"
        writer.add(RegionRecord(image_id, np.abs(rng.normal(size=(REGIONS, 2048))).astype(np.float32),
                                np.tile(np.array([0, 0, 10, 10], np.float32), (REGIONS, 1)), (480, 640)))
        for _ in range(captions_per_image):
            text = " ".join(f"w{w}" for w in rng.integers(0, VOCAB - 4, size=rng.integers(8, 21)))
            lines.append(json.dumps({"image_id": image_id, "caption": text, "split": "test"}))
    writer.commit()
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return ckpt, root / "features", root / "captions.jsonl"


def evaluate_comparison(n_images: int, captions_per_image: int, baseline_captions: int, device: torch.device,
                        peak: float) -> dict:
    """The whole `evaluate` path (SGR) against SGRAF's algorithm given all the images per call."""
    from extract.shards import FeatureStore
    from matching import checkpoint
    from matching.data.captions import evaluation_set, read_captions
    from matching.retrieval.evaluate import evaluate_checkpoint
    from matching.retrieval.scoring import StoreImages

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, features, captions_file = write_evaluation_set(Path(tmp), n_images, captions_per_image)
        model, config, vocab = checkpoint.load(ckpt)
        model.eval().to(device)
        store = FeatureStore(features)
        image_ids, ordered = evaluation_set(read_captions(captions_file, "test"), store.image_ids)
        tokens = [vocab.encode(c.text) for c in ordered]
        with torch.inference_mode():
            images = encode_images(model, StoreImages(store, image_ids), device)
        subset = tokens[:baseline_captions]
        words, _, lengths = encoded_words(model, subset)

        def baseline_part(part: slice) -> tuple[np.ndarray, float]:
            return timed(lambda: in_shards(lambda s: sgraf_forward_sim(model, images.local, words[s], lengths[s]),
                                           part), device)

        # The baseline's halves before and after ours, so a change of load falls on both.
        half = (len(subset) // 200) * 100 or len(subset)
        first, first_s = baseline_part(slice(0, half))
        settings = EvaluationSettings(protocol="full")
        result, ours_s = timed(lambda: evaluate_checkpoint(ckpt, features, captions_file, settings=settings,
                                                           device=str(device)), device)
        second, second_s = baseline_part(slice(half, len(subset))) if half < len(subset) else (first[:, :0], 0.0)
        baseline, base_s = np.concatenate([first, second], 1), first_s + second_s
    np.testing.assert_allclose(result.sims[:, : len(subset)], baseline, atol=1e-5, rtol=0)
    pairs = n_images * len(tokens)
    flops = plain_flops(config.model, [len(t) for t in tokens]) * n_images
    base_pairs = n_images * len(subset)
    return {"variant": "sgr", "images": n_images, "captions": len(tokens), "baseline_captions": len(subset),
            "ours_seconds": ours_s, "ours_pairs_per_s": pairs / ours_s, "baseline_pairs_per_s": base_pairs / base_s,
            "ratio": (pairs / ours_s) / (base_pairs / base_s), "ours_useful_fraction_of_peak": flops / ours_s / peak}


class RandomImages:
    """An ImageSource of detector-like random features, generated per block (no 1.5 GB array)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def load(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        features = torch.randn(stop - start, REGIONS, 2048, generator=generator).abs_()
        return features, torch.full((stop - start,), REGIONS, dtype=torch.long)


def coco5k(variant: str, n_images: int, n_captions: int, device: torch.device, peak: float,
           log: Callable[[str], None]) -> dict:
    """Exact scoring of a COCO-5K-sized matrix in float32, TF32 and bf16; rankings checked against float32."""
    torch.manual_seed(0)
    config = ModelConfig.variant(variant, vocab_size=VOCAB)
    model = build_model(config).eval().to(device)
    rng = np.random.default_rng(0)
    captions = [[1, *rng.integers(4, VOCAB, size=rng.integers(8, 21)).tolist(), 2] for _ in range(n_captions)]
    flops = plain_flops(config, [len(c) for c in captions]) * n_images
    figures: dict[str, Any] = {"variant": variant, "images": n_images, "captions": n_captions}
    reference = None
    for precision in ("float32", "tf32", "bf16"):
        sims, seconds = timed(lambda p=precision: score_matrix(model, RandomImages(n_images), captions, device=device,
                                                               precision=p, log=log), device)
        entry = {"seconds": seconds, "pairs_per_s": n_images * n_captions / seconds,
                 "useful_fraction_of_fp32_peak": flops / seconds / peak}
        if reference is None:
            reference = sims
        else:
            entry["max_abs_diff"] = float(np.abs(sims - reference).max())
            entry["t2i_top1_agreement"] = float((sims.argmax(0) == reference.argmax(0)).mean())
            entry["i2t_top1_agreement"] = float((sims.argmax(1) == reference.argmax(1)).mean())
        figures[precision] = entry
        log(f"{precision}: {json.dumps(entry)}")
    return figures


def record(figures: dict, device: torch.device, dtype: str) -> None:
    """Append one JSON line to benchmarks/results/bench_scoring.jsonl."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                              or platform.machine())
    if device.type == "cpu":
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": f"{device.type}: {name}", "threads": torch.get_num_threads(), "dtype": dtype,
            "load_average": os.getloadavg(), "torch": torch.__version__, **figures}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(line) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that everything runs")
    parser.add_argument("--images", type=int, help="images of the SGR/TSHSR comparisons (default 100)")
    parser.add_argument("--captions", type=int, help="captions of the SGR/TSHSR comparisons (default 200)")
    parser.add_argument("--eval-images", type=int, help="images of the evaluate comparison (default 200)")
    parser.add_argument("--baseline-captions", type=int, help="captions SGRAF's loop is timed on (default 200)")
    parser.add_argument("--coco5k", action="store_true", help="GPU: 5,000 × 25,000 in float32, TF32 and bf16")
    parser.add_argument("--variant", default="tshsr", help="the --coco5k model (default tshsr)")
    args = parser.parse_args()
    device = torch.device(args.device)
    peak = matmul_peak(device)
    print(f"{device}: {torch.get_num_threads()} threads, best float32 GEMM {peak / 1e9:,.0f} GFLOP/s, "
          f"load average {os.getloadavg()[0]:.2f}")
    if args.coco5k:
        if device.type != "cuda":
            raise SystemExit("--coco5k needs a GPU (--device cuda)")
        n_images, n_captions = (1000, 5000) if args.quick else (5000, 25000)
        figures = coco5k(args.variant, n_images, n_captions, device, peak, print)
        record({"benchmark": "coco5k", "peak_gflops": peak / 1e9, **figures}, device, "float32/tf32/bf16")
        return

    images = args.images or (40 if args.quick else 100)
    captions = args.captions or (60 if args.quick else 200)
    figures: dict[str, Any] = {"benchmark": "scoring", "peak_gflops": peak / 1e9}
    for variant in ("sgr", "tshsr"):
        row = kernel_comparison(variant, images, captions, device, peak)
        figures[variant] = row
        print(f"{variant:6s} {images} × {captions}: ours {row['ours_pairs_per_s']:8,.0f} pairs/s, baseline "
              f"{row['baseline_pairs_per_s']:7,.0f} pairs/s ({row['baseline']}) = {row['ratio']:.1f}×; "
              f"useful {row['ours_useful_fraction_of_peak']:.0%} of peak (baseline "
              f"{row['baseline_fraction_of_peak']:.0%}), {row['plain_gflop_per_pair'] * 1e3:.0f} MFLOP a pair")
        if "ours_bf16_pairs_per_s" in row:
            print(f"{'':6s} bf16: {row['ours_bf16_pairs_per_s']:8,.0f} pairs/s, largest |score − float32's| "
                  f"{row['bf16_max_abs_diff']:.1e}, same best image for {row['bf16_t2i_top1_agreement']:.0%} "
                  f"of captions")
    eval_images = args.eval_images or (40 if args.quick else 200)
    row = evaluate_comparison(eval_images, 5, args.baseline_captions or (40 if args.quick else 200), device, peak)
    figures["evaluate_sgr"] = row
    print(f"evaluate (SGR, whole path) {row['images']} images × {row['captions']} captions: "
          f"{row['ours_seconds']:.1f} s, {row['ours_pairs_per_s']:,.0f} pairs/s; SGRAF's algorithm with "
          f"{row['images']} images a call {row['baseline_pairs_per_s']:,.0f} pairs/s = {row['ratio']:.1f}×; "
          f"useful {row['ours_useful_fraction_of_peak']:.0%} of peak")
    figures["load_average_after"] = os.getloadavg()
    record(figures, device, "float32")


if __name__ == "__main__":
    main()
