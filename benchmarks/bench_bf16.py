"""bfloat16 scoring and float16 galleries against float32: pairs/s at the paper's sizes, and the rankings of a
trained model.

`--precision bf16` (evaluate, search, serve) runs the scorers under bfloat16 autocast. It is worth
having only where it is faster and the rankings stay put, so this benchmark measures both, in one
run:

1. speed at the paper's sizes (K = 36 regions of 2048-d features, d = 1024, m = 256, M = 3,
   random weights): the exact scorer (`score_matrix`, the path of `evaluate` and of an exact
   search) on --images × 5·--images pairs, and the re-ranking scorer (`score_matrix` on a
   query's shortlist of 200 encoded images, the path of `search --shortlist` and `serve`), each
   in float32 and in bf16, best of --repeats; with this device's float32 and bfloat16 2048² matmul
   rates for scale;
2. agreement on a trained model: the binding-world model of `benchmarks/bench_retrieval.py`
   (trained there, or here when absent, into the same --workdir) scores a gallery of
   --gallery binding scenes × 5 captions in both precisions; printed: R@1 both ways in each and
   their difference, the share of captions whose top-10 image lists are identical, and the
   share of images whose top-10 caption lists are identical;
3. the same agreement for an encoded gallery stored in float16 (`tshsr-pipe index`'s default)
   against one stored in float32, both scored in float32: what storing the regions in half
   precision changes in a search's ranking.

The verdict line applies the rule the library follows for its default: bf16 only where it is at
least 2× float32's pairs/s and R@1 moves by at most 0.2 points both ways. Appends one JSON line to
benchmarks/results/bench_bf16.jsonl.

    python benchmarks/bench_bf16.py [--images 100] [--gallery 1000] [--workdir DIR]
    python benchmarks/bench_bf16.py --quick      # small sizes: a check that it runs
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "bench_bf16.jsonl"
VOCAB, REGIONS = 10000, 36


def best_time(function, repeats: int) -> tuple[object, float]:  # noqa: ANN001 - a callable
    result, best = None, float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return result, best


def matmul_rates(repeats: int) -> dict[str, float]:
    """GFLOP/s of a 2048² matrix product in float32 and in bfloat16 on this CPU."""
    rates = {}
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        _, seconds = best_time(lambda a=a, b=b: a @ b, repeats + 2)
        rates[name] = 2 * 2048**3 / seconds / 1e9
    return rates


def speed(images: int, repeats: int) -> dict[str, dict[str, float]]:
    """Pairs/s of the exact and the re-ranking scorer at the paper's sizes, float32 and bf16."""
    from matching.config import ModelConfig
    from matching.model.tshsr import build_model
    from matching.retrieval.scoring import ImageArrays, encode_images, score_matrix
    from matching.retrieval.shortlist import encode_queries

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=VOCAB)).eval()
    generator = np.random.default_rng(0)
    features = ImageArrays(generator.random((images, REGIONS, 2048), np.float32), np.full(images, REGIONS))
    captions = [[1, *generator.integers(4, VOCAB, int(n)).tolist(), 2] for n in generator.integers(8, 21, 5 * images)]
    shortlisted = 200
    gallery = ImageArrays(generator.random((shortlisted, REGIONS, 2048), np.float32), np.full(shortlisted, REGIONS))
    with torch.inference_mode():
        encoded_gallery = encode_images(model, gallery, torch.device("cpu"))
    query = encode_queries(model, [captions[0]], "cpu")
    rows: dict[str, dict[str, float]] = {}
    for precision in ("float32", "bf16"):
        _, exact = best_time(lambda p=precision: score_matrix(model, features, captions, precision=p), repeats)
        _, rerank = best_time(lambda p=precision: score_matrix(model, encoded_gallery, query, precision=p),
                              repeats + 2)
        rows[precision] = {"exact_pairs_per_s": images * 5 * images / exact, "rerank_seconds": rerank,
                           "rerank_pairs_per_s": shortlisted / rerank}
    return rows


def agreement(workdir: Path, gallery_images: int, train_scenes: int, log) -> dict[str, float]:  # noqa: ANN001 - print
    """R@1 in float32 and bf16, and how often the top-10 lists are the same, on a trained binding-world model."""
    from bench_retrieval import gallery, trained_model

    from extract.shards import FeatureStore
    from matching import checkpoint
    from matching.config import GALLERY_DTYPES
    from matching.data.captions import evaluation_set, read_captions
    from matching.retrieval.gallery import EncodedGallery, build_gallery
    from matching.retrieval.scoring import StoreImages, score_matrix

    path = trained_model(workdir, train_scenes, log)
    model, _, vocab = checkpoint.load(path)
    features, captions, _ = gallery(workdir, gallery_images)
    store = FeatureStore(features)
    image_ids, ordered = evaluation_set(read_captions(captions), store.image_ids, 5)
    tokens = [vocab.encode(c.text) for c in ordered]
    images = StoreImages(store, image_ids)
    sims = {p: score_matrix(model, images, tokens, precision=p) for p in ("float32", "bf16")}
    # The gallery encoded and stored both ways, as `tshsr-pipe index --dtype` writes it, scored in float32.
    for dtype in GALLERY_DTYPES:
        gallery_dir = workdir / f"encoded-{gallery_images}-{dtype}"
        build_gallery(model, path, store, image_ids, gallery_dir, device=torch.device("cpu"), dtype=dtype)
        encoded = EncodedGallery.open(gallery_dir).select(slice(None))
        sims[f"stored-{dtype}"] = score_matrix(model, encoded, tokens)
    return {"images": len(image_ids), "captions": len(tokens), **compare(sims, "float32", "bf16"),
            "gallery_float16": compare(sims, "stored-float32", "stored-float16")}


def compare(sims: dict[str, np.ndarray], reference: str, other: str) -> dict[str, float]:
    """R@1 of two score matrices and how often their top-10 lists are the same."""
    from matching.retrieval.metrics import recall_metrics

    def top10(matrix: np.ndarray, axis: int) -> np.ndarray:
        return np.sort(np.argsort(-matrix, axis=axis, kind="stable").take(range(10), axis=axis), axis=axis)

    a, b = sims[reference], sims[other]
    ma, mb = recall_metrics(a, 5), recall_metrics(b, 5)
    return {**{f"float32_{key}": round(ma[key], 2) for key in ("i2t_r1", "t2i_r1", "rsum")},
            **{f"{'bf16' if other == 'bf16' else 'float16'}_{key}": round(mb[key], 2)
               for key in ("i2t_r1", "t2i_r1", "rsum")},
            "i2t_r1_difference": round(mb["i2t_r1"] - ma["i2t_r1"], 2),
            "t2i_r1_difference": round(mb["t2i_r1"] - ma["t2i_r1"], 2),
            "t2i_top10_identical": float((top10(a, 0) == top10(b, 0)).all(0).mean()),
            "i2t_top10_identical": float((top10(a, 1) == top10(b, 1)).all(1).mean()),
            "largest_score_difference": float(np.abs(a - b).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="images of the speed measurement (5 captions each)")
    parser.add_argument("--gallery", type=int, default=1000, help="binding-world images of the agreement check")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each scorer (the best counts)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench_retrieval",
                        help="where bench_retrieval.py keeps its trained model and galleries (shared with it)")
    parser.add_argument("--train-scenes", type=int, default=3000, help="as bench_retrieval.py's (the same model)")
    parser.add_argument("--quick", action="store_true", help="20 images, a 200-image gallery, 300 training scenes")
    args = parser.parse_args()
    if args.quick:
        args.images, args.gallery, args.repeats, args.train_scenes = 20, 200, 1, 300
    log = functools.partial(print, flush=True)
    rates = matmul_rates(args.repeats)
    log(f"2048² matmul: float32 {rates['float32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s "
        f"({rates['bf16'] / rates['float32']:.2f}×); {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}")
    rows = speed(args.images, args.repeats)
    exact_ratio = rows["bf16"]["exact_pairs_per_s"] / rows["float32"]["exact_pairs_per_s"]
    rerank_ratio = rows["bf16"]["rerank_pairs_per_s"] / rows["float32"]["rerank_pairs_per_s"]
    for precision, row in rows.items():
        log(f"{precision:8s} exact {row['exact_pairs_per_s']:8,.0f} pairs/s; re-ranking 200 images "
            f"{1000 * row['rerank_seconds']:6.1f} ms ({row['rerank_pairs_per_s']:,.0f} pairs/s)")
    log(f"bf16 / float32: exact {exact_ratio:.2f}×, re-ranking {rerank_ratio:.2f}×")
    agree = agreement(args.workdir, args.gallery, args.train_scenes, log)
    log(f"trained model, {agree['images']:,} images × {agree['captions']:,} captions: R@1 i2t "
        f"{agree['float32_i2t_r1']:.2f} → {agree['bf16_i2t_r1']:.2f} ({agree['i2t_r1_difference']:+.2f}), t2i "
        f"{agree['float32_t2i_r1']:.2f} → {agree['bf16_t2i_r1']:.2f} ({agree['t2i_r1_difference']:+.2f}); "
        f"identical top-10 lists: {100 * agree['t2i_top10_identical']:.1f}% of captions, "
        f"{100 * agree['i2t_top10_identical']:.1f}% of images; largest score difference "
        f"{agree['largest_score_difference']:.4f}")
    stored = agree["gallery_float16"]
    log(f"the gallery stored in float16 against float32: R@1 i2t {stored['i2t_r1_difference']:+.2f}, t2i "
        f"{stored['t2i_r1_difference']:+.2f}; identical top-10 lists: {100 * stored['t2i_top10_identical']:.1f}% "
        f"of captions, {100 * stored['i2t_top10_identical']:.1f}% of images; largest score difference "
        f"{stored['largest_score_difference']:.5f}")
    fast = min(exact_ratio, rerank_ratio) >= 2.0
    close = max(abs(agree["i2t_r1_difference"]), abs(agree["t2i_r1_difference"])) <= 0.2
    log(f"verdict: bf16 {'qualifies' if fast and close else 'does not qualify'} as a default here "
        f"(≥ 2× pairs/s: {'yes' if fast else 'no'}; R@1 within 0.2: {'yes' if close else 'no'})")
    line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "benchmark": "precision", "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "torch": torch.__version__, "matmul_gflops": rates, "speed": rows, "exact_ratio": exact_ratio,
            "rerank_ratio": rerank_ratio, "agreement": agree, "qualifies": fast and close, "quick": args.quick}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
