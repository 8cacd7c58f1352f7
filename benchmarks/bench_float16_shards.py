"""What float16 feature shards change in a multi-query evaluation: per-round ranks and metrics against float32.

`import-drilldown` and `import-precomp` store features as float16 unless `--float32` is given; HMRN
computes from DrillDown's float32 pickles. A float16 shard rounds every feature to 11 significant
bits (relative error up to 2^-11 ≈ 4.9e-4); the model reads it back as float32. This scores the same
checkpoint on the same images stored both ways and counts, for every round, the query sets whose
target's rank changed, the largest change, and the metrics under both precisions (protocol full).

Default case: the multi-query demo's HMRN (trained here on its 400 generated scenes, about a minute
on 2 CPU cores), evaluated on a gallery of 1,800 scenes of the same world (the same colour and
shape prototypes, fresh noise), whose shards are written once as float32 and once as float16.
Real data: give a checkpoint, the query file and two feature directories made by
``import-drilldown`` with and without ``--float32``.

    python benchmarks/bench_float16_shards.py [--images 1800] [--device cpu]
    python benchmarks/bench_float16_shards.py --checkpoint runs/hmrn-i2t/model_best.pt --captions vg_queries.jsonl \\
        --features32 features/vg32 --features16 features/vg16 --split test [--protocol hmrn]

Prints one table and appends a JSON line to benchmarks/results/bench_float16_shards.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from extract.shards import FeatureStore, RegionRecord, ShardWriter
from matching.config import EvaluationSettings
from matching.retrieval.evaluate import evaluate_checkpoint
from matching.retrieval.metrics import round_ranks

RESULTS = Path(__file__).resolve().parent / "results" / "bench_float16_shards.jsonl"


def copy_as(source: Path, out: Path, dtype: str) -> Path:
    """The shards of `source` rewritten with `dtype` features (what an import with or without --float32 writes)."""
    store = FeatureStore(source)
    writer = ShardWriter(out, max_boxes=store.max_boxes, feature_dim=store.feature_dim, dtype=dtype)
    for start in range(0, len(store.image_ids), 500):
        ids = store.image_ids[start:start + 500]
        batch = store.batch(ids)
        for row, image_id in enumerate(ids):
            k = int(batch.num_boxes[row])
            writer.add(RegionRecord(image_id, batch.features[row, :k], batch.boxes[row, :k], (64, 64)))
        writer.commit()
    return out


def demo_case(work: Path, images: int, device: str) -> tuple[Path, Path, Path, Path]:
    """(checkpoint, queries, float32 features, float16 features) of the demo's world."""
    from pipelines.demo import run_demo
    from pipelines.synthetic import make_multiquery_scenes, write_multiquery_dataset

    outcome = run_demo(work / "demo", task="multi-query", device=device, log=lambda line: None, progress=False)
    gallery = write_multiquery_dataset(work / "gallery", make_multiquery_scenes(images, seed=0), seed=0)
    return outcome.checkpoint, gallery / "queries.jsonl", gallery, copy_as(gallery, work / "gallery16", "float16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1800, help="scenes of the generated gallery (at most 1820)")
    parser.add_argument("--checkpoint", type=Path, help="a multi-query checkpoint (real data; else the demo's)")
    parser.add_argument("--captions", type=Path, help="its multi-query JSONL file")
    parser.add_argument("--features32", type=Path, help="the images stored as float32")
    parser.add_argument("--features16", type=Path, help="the same images stored as float16")
    parser.add_argument("--split", default=None, help="the split scored (default: every query set of the file)")
    parser.add_argument("--protocol", default="full", choices=["full", "hmrn"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            case = "given"
            checkpoint, captions, f32, f16 = args.checkpoint, args.captions, args.features32, args.features16
        else:
            case = f"demo world, {args.images} scenes"
            checkpoint, captions, f32, f16 = demo_case(Path(tmp), args.images, args.device)
        settings = EvaluationSettings(split=args.split, protocol=args.protocol)
        runs = {dtype: evaluate_checkpoint(checkpoint, features, captions, settings=settings, device=args.device)
                for dtype, features in (("float32", f32), ("float16", f16))}
    ties = "argsort" if args.protocol == "hmrn" else "against"
    ranks = {dtype: round_ranks(run.sims, ties=ties) for dtype, run in runs.items()}
    moved = ranks["float16"] - ranks["float32"]
    n_sets = moved.shape[1]
    rows = []
    print(f"{case}: {n_sets} query sets × {len(runs['float32'].image_ids)} images, protocol {args.protocol}, "
          f"max |Δscore| {float(np.abs(runs['float16'].sims - runs['float32'].sims).max()):.2e}")
    print(f"{'round':>5} | {'sets moved':>10} {'max |Δrank|':>11} | {'R@1 32':>7} {'R@1 16':>7} {'R@10 32':>8} "
          f"{'R@10 16':>8} {'meanr 32':>9} {'meanr 16':>9}")
    for r, (a, b) in enumerate(zip(runs["float32"].results["rounds"], runs["float16"].results["rounds"],
                                   strict=True)):
        changed = int(np.count_nonzero(moved[r]))
        row = {"round": r + 1, "sets_moved": changed, "max_abs_rank_change": int(np.abs(moved[r]).max()),
               "float32": a, "float16": b}
        rows.append(row)
        print(f"{r + 1:>5} | {changed:>10} {row['max_abs_rank_change']:>11} | {a['r1']:7.2f} {b['r1']:7.2f} "
              f"{a['r10']:8.2f} {b['r10']:8.2f} {a['meanr']:9.3f} {b['meanr']:9.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"case": case, "protocol": args.protocol, "sets": n_sets, "rounds": rows,
                                 "seconds": round(time.perf_counter() - start, 1), "machine": platform.node(),
                                 "python": platform.python_version()}) + "\n")


if __name__ == "__main__":
    main()
