"""Exact scoring against two-stage retrieval on a large generated gallery, in one run.

A small matching model (d = 64, m = 32) is trained with the global loss on generated scenes
(`pipelines.synthetic`), then a gallery of other scenes from the same generator, 5,000
images × 25,000 captions by default, is evaluated twice:

1. exact: every (image, caption) pair scored by the full model (`score_matrix`, the path
   of `tshsr-pipe evaluate`), ranks from the full score matrix;
2. two-stage (`matching.shortlist.two_stage_metrics`, the path of `evaluate --shortlist K`):
   faiss ranks by the global vectors' cosine, and the full model re-scores each caption's K
   best images and each image's 5·K best captions.

Both times include encoding the gallery. It prints the time ratio, R@1/5/10 both ways for
each, the shortlist recall and the share of pairs scored, and appends one JSON line to
benchmarks/results/bench_retrieval.jsonl. The trained model is kept in --workdir, so a second
run skips training.

    python benchmarks/bench_retrieval.py [--images 5000] [--shortlist 50] [--workdir DIR]
    python benchmarks/bench_retrieval.py --quick     # 500 images: a check that everything runs
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_retrieval.jsonl"
MODEL = {"embed_size": 64, "sim_dim": 32, "word_dim": 32}
RECIPE = {"batch_size": 24, "workers": 0, "learning_rate": 3e-3, "warmup_epochs": 3, "checkpoint_every": 0,
          "epochs": 16, "lr_decay_epoch": 8, "global_loss_weight": 1.0}
NOISE = 0.2  # region-feature noise of the generated scenes
SEED = 1  # the generator's colour and shape prototypes: training set and gallery share them


def trained_model(workdir: Path, scenes: int, log) -> Path:
    """model_best.pt of a small model trained with the global loss on `scenes` generated scenes (cached)."""
    from matching.config import Config
    from matching.training import train
    from matching.vocabulary import build_vocabulary
    from pipelines.synthetic import make_scenes, write_feature_dataset

    run = workdir / f"train{scenes}"
    if (run / "run" / "model_best.pt").exists():
        log(f"model: {run / 'run' / 'model_best.pt'} (trained before)")
        return run / "run" / "model_best.pt"
    features = write_feature_dataset(run / "features", make_scenes(scenes, seed=SEED), feature_dim=32, noise=NOISE,
                                     seed=SEED)
    build_vocabulary(features / "captions.jsonl", run / "vocab.json", threshold=1)
    started = time.perf_counter()
    train(Config().updated(model=MODEL, train=RECIPE), features=features, captions=features / "captions.jsonl",
          vocab_path=run / "vocab.json", run_dir=run / "run", overwrite=True, val_split=None, device="cpu",
          progress=False, log=lambda line: None)
    log(f"model: trained on {scenes} scenes in {time.perf_counter() - started:.0f} s")
    return run / "run" / "model_best.pt"


def gallery(workdir: Path, images: int) -> tuple[Path, Path]:
    """Feature shards and captions of `images` new scenes (5 captions each), from the training set's generator."""
    from pipelines.synthetic import make_scenes, write_feature_dataset

    features = workdir / f"gallery{images}"
    if not (features / "manifest.json").exists():
        # seed 2 draws other scenes; the feature seed stays SEED so the prototypes are the trained ones
        write_feature_dataset(features, make_scenes(images, seed=2), feature_dim=32, noise=NOISE, seed=SEED)
    return features, features / "captions.jsonl"


def recalls(metrics: dict) -> dict:
    return {key: round(metrics[key], 2) for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                                                   "rsum")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="gallery images (5 captions each)")
    parser.add_argument("--shortlist", type=int, default=50, help="K: images re-ranked per caption (5·K captions "
                                                                  "per image)")
    parser.add_argument("--train-scenes", type=int, default=600, help="generated scenes the model is trained on")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench_retrieval")
    parser.add_argument("--quick", action="store_true", help="150 training scenes, a 500-image gallery, K = 10")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.images, args.shortlist, args.train_scenes = 500, 10, 150

    from extract.shards import FeatureStore
    from matching import checkpoint
    from matching.captions import evaluation_set, read_captions
    from matching.evaluation import recall_metrics
    from matching.scoring import StoreImages, score_matrix
    from matching.shortlist import two_stage_metrics

    log = functools.partial(print, flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = trained_model(args.workdir, args.train_scenes, log)
    features, captions = gallery(args.workdir, args.images)
    model, _, vocab = checkpoint.load(path)
    store = FeatureStore(features)
    image_ids, ordered = evaluation_set(read_captions(captions), store.image_ids, 5)
    tokens = [vocab.encode(c.text) for c in ordered]
    images = StoreImages(store, image_ids)
    log(f"gallery: {len(image_ids):,} images × {len(tokens):,} captions = {len(image_ids) * len(tokens):,} pairs; "
        f"torch threads {torch.get_num_threads()}")

    started = time.perf_counter()
    two_stage, reports = two_stage_metrics([model], images, [tokens], k=args.shortlist, protocol="full",
                                           device="cpu", log=log)
    two_seconds = time.perf_counter() - started
    report = reports["full"]
    log(f"two-stage: {two_seconds:.1f} s; {report.line()}")

    started = time.perf_counter()
    sims = score_matrix(model, images, tokens, device="cpu", log=log, log_every=60)
    exact = recall_metrics(sims, 5)
    exact_seconds = time.perf_counter() - started
    log(f"exact: {exact_seconds:.1f} s ({sims.size / exact_seconds:,.0f} pairs/s)")

    ratio = exact_seconds / two_seconds
    log(f"\n{'':10} {'seconds':>9} | {'i2t R@1':>7} {'R@5':>6} {'R@10':>6} | {'t2i R@1':>7} {'R@5':>6} {'R@10':>6}")
    for name, seconds, metrics in (("exact", exact_seconds, exact), ("two-stage", two_seconds, two_stage["full"])):
        log(f"{name:10} {seconds:9.1f} | {metrics['i2t_r1']:7.2f} {metrics['i2t_r5']:6.2f} {metrics['i2t_r10']:6.2f} "
            f"| {metrics['t2i_r1']:7.2f} {metrics['t2i_r5']:6.2f} {metrics['t2i_r10']:6.2f}")
    deltas = {d: two_stage["full"][f"{d}_r1"] - exact[f"{d}_r1"] for d in ("i2t", "t2i")}
    log(f"two-stage is {ratio:.1f}× faster; R@1 difference i2t {deltas['i2t']:+.2f}, t2i {deltas['t2i']:+.2f} "
        f"(target: ≥ 20× faster within 0.5 R@1)")
    if args.no_record:
        return
    line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": "cpu: " + cpu_name(), "threads": torch.get_num_threads(), "dtype": "float32",
            "load_average": os.getloadavg(), "torch": torch.__version__, "benchmark": "retrieval",
            "images": len(image_ids), "captions": len(tokens), "shortlist": args.shortlist,
            "model": MODEL, "train_scenes": args.train_scenes,
            "exact": {"seconds": exact_seconds, **recalls(exact)},
            "two_stage": {"seconds": two_seconds, **recalls(two_stage["full"]), "t2i_shortlist_recall":
                          report.t2i_recall, "i2t_shortlist_recall": report.i2t_recall,
                          "pairs_scored": report.pairs_scored, "pairs_total": report.pairs_total},
            "speedup": ratio, "r1_difference": deltas}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(line) + "\n")
    log(f"recorded in {RESULTS}")


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
