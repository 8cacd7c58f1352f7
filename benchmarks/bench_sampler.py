"""Does batching captions by length change the recall a model reaches? Uniform shuffling against buckets.

The paper shuffles the training captions uniformly; `--length-buckets` batches captions of similar
length to compute less padding, which also means a caption's hardest negatives come from captions
of similar length. On the generated shapes world (`pipelines.synthetic`) caption length follows the
number of objects in the scene, so bucketing groups scenes by object count: the question is real.

For each seed, the same small model is trained twice (uniform, buckets) with the same recipe, and
the best validation rsum and the test rsum of the best model are printed side by side, with the
mean over seeds. A JSON line goes to benchmarks/results/bench_sampler.jsonl.

    python benchmarks/bench_sampler.py [--seeds 3] [--images 600] [--epochs 6] [--noise 1.0]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from matching.captions import read_captions
from matching.config import Config
from matching.inference import evaluate_checkpoint
from matching.text import Vocabulary
from matching.training import train
from pipelines.synthetic import make_scenes, write_feature_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "bench_sampler.jsonl"
MODEL = {"embed_size": 64, "sim_dim": 32, "word_dim": 32, "reasoning_steps": 2}


def run(root: Path, seed: int, images: int, epochs: int, noise: float, buckets: bool) -> dict[str, float]:
    features = root / f"features-{seed}"
    if not features.exists():
        write_feature_dataset(features, make_scenes(images, seed=seed), feature_dim=32, noise=noise, seed=seed)
        captions = features / "captions.jsonl"
        Vocabulary.build((c.text for c in read_captions(captions, ["train", "val"])), 1).save(root / f"v{seed}.json")
    captions = features / "captions.jsonl"
    config = Config().updated(model=MODEL, train={
        "batch_size": 32, "workers": 0, "learning_rate": 3e-3, "warmup_epochs": 2, "epochs": epochs,
        "lr_decay_epoch": epochs - 2, "checkpoint_every": 0, "val_images": 0, "seed": seed,
        "length_buckets": buckets})
    run_dir = root / f"run-{seed}-{'buckets' if buckets else 'uniform'}"
    result = train(config, features=features, captions=captions, vocab_path=root / f"v{seed}.json", run_dir=run_dir,
                   device="cpu", progress=False, log=lambda line: None)
    test = evaluate_checkpoint(run_dir / "model_best.pt", features, captions, split="test", protocol="full",
                               device="cpu").results["full"]
    return {"val_rsum": result.best_rsum, "test_rsum": test["rsum"], "test_t2i_r1": test["t2i_r1"],
            "test_i2t_r1": test["i2t_r1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--noise", type=float, default=1.0,
                        help="Feature noise of the generated world (0.35 is the demo's, where both reach 100%%).")
    args = parser.parse_args()
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            uniform = run(Path(tmp), seed, args.images, args.epochs, args.noise, buckets=False)
            buckets = run(Path(tmp), seed, args.images, args.epochs, args.noise, buckets=True)
            rows.append({"seed": seed, "uniform": uniform, "buckets": buckets})
            print(f"seed {seed}: val rsum uniform {uniform['val_rsum']:6.1f} buckets {buckets['val_rsum']:6.1f} | "
                  f"test rsum uniform {uniform['test_rsum']:6.1f} buckets {buckets['test_rsum']:6.1f}", flush=True)
    summary = {}
    for key in ("val_rsum", "test_rsum", "test_i2t_r1", "test_t2i_r1"):
        for mode in ("uniform", "buckets"):
            values = [row[mode][key] for row in rows]
            summary[f"{mode}_{key}"] = (statistics.mean(values), statistics.pstdev(values))
    print(f"\n{args.seeds} seeds, {args.images} scenes, noise {args.noise}, {args.epochs} epochs (mean ± std):")
    for key in ("val_rsum", "test_rsum", "test_i2t_r1", "test_t2i_r1"):
        u, b = summary[f"uniform_{key}"], summary[f"buckets_{key}"]
        print(f"  {key:<12} uniform {u[0]:6.1f} ± {u[1]:4.1f}   buckets {b[0]:6.1f} ± {b[1]:4.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"benchmark": "bench_sampler", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "device": platform.processor() or platform.machine(),
                                 "threads": torch.get_num_threads(), "dtype": "float32", "seeds": args.seeds,
                                 "images": args.images, "epochs": args.epochs, "noise": args.noise, "rows": rows,
                                 "seconds": round(time.time() - started, 1)}) + "\n")


if __name__ == "__main__":
    main()
