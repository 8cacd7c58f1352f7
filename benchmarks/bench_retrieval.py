"""Exact scoring against two-stage retrieval on a generated gallery that needs binding, in one run.

A small TSHSR (d = 256, m = 64, the library's defaults otherwise, its first-stage head trained
beside it) is trained on generated scenes that only the binding of colours to shapes tells
apart (`pipelines.synthetic.make_binding_scenes`: groups of look-alike scenes sharing their
colour and shape words, with unnamed distractor objects); then a gallery of other scenes from
the same generator, 2,000 images × 10,000 captions by default, is evaluated:

1. exact: every (image, caption) pair scored by the full model (`score_matrix`, the path
   of `tshsr-pipe evaluate`), ranks from the full score matrix;
2. two-stage at each K of --shortlist (`matching.retrieval.shortlist.two_stage_metrics`, the path of
   `evaluate --shortlist K`): faiss ranks by the first-stage head's cosines, and the full
   model re-scores each caption's K best images and each image's 5·K best captions.

Times include encoding the gallery. It prints, for each K, the shortlist recall (how often the
ground truth is among the K images / 5·K captions), R@1 both ways beside exact scoring's and
the speed-up, with a perfect bag-of-words ranker's R@1 on the same gallery for scale, and
appends one JSON line to benchmarks/results/bench_retrieval.jsonl. The trained model is kept
in --workdir, so a second run skips training.

    python benchmarks/bench_retrieval.py [--images 2000] [--shortlist 50,100,200] [--workdir DIR]
    python benchmarks/bench_retrieval.py --quick     # 300 training scenes, 300 images, K = 10, 20
    python benchmarks/bench_retrieval.py --poolings attention+max,attention   # today's head against the first

With several --poolings a model is trained for each; the paper's model in them is the same bit for
bit (the head learns from detached inputs; the run checks it), so exact scoring runs once.
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
MODEL = {"embed_size": 256, "sim_dim": 64, "word_dim": 64}
RECIPE = {"batch_size": 32, "workers": 0, "learning_rate": 3e-3, "warmup_epochs": 2, "checkpoint_every": 0,
          "epochs": 3, "lr_decay_epoch": 0, "features_in_memory": True}
REGIONS = 16  # most regions an image has
SEED = 1  # the generator's colour and shape prototypes: training set and gallery share them


def write_world(features: Path, scenes: list) -> Path:
    from pipelines.synthetic import write_feature_dataset

    return write_feature_dataset(features, scenes, feature_dim=64, max_boxes=REGIONS, seed=SEED, place_rate=0.0)


def trained_model(workdir: Path, scenes: int, log, pooling: str = "attention+max") -> Path:
    """model_best.pt of a small model trained with the defaults (the first stage pooling by `pooling`) on
    `scenes` binding scenes (cached)."""
    from matching.config import Config
    from matching.data.vocabulary import build_vocabulary
    from matching.training.loop import train
    from pipelines.synthetic import make_binding_scenes

    run = workdir / (f"train{scenes}" if pooling == "attention+max" else f"train{scenes}-{pooling}")
    if (run / "run" / "model_best.pt").exists():
        log(f"model: {run / 'run' / 'model_best.pt'} (trained before)")
        return run / "run" / "model_best.pt"
    features = write_world(run / "features", make_binding_scenes(scenes, seed=SEED))
    model = {**MODEL, "first_stage_pooling": pooling}
    build_vocabulary(features / "captions.jsonl", run / "vocab.json", threshold=1)
    started = time.perf_counter()
    train(Config().updated(model=model, train=RECIPE), features=features, captions=features / "captions.jsonl",
          vocab_path=run / "vocab.json", run_dir=run / "run", overwrite=True, device="cpu", progress=False,
          log=lambda line: None)
    log(f"model: trained on {scenes} scenes in {time.perf_counter() - started:.0f} s")
    return run / "run" / "model_best.pt"


def gallery(workdir: Path, images: int) -> tuple[Path, Path, dict]:
    """Shards and captions of `images` new binding scenes (5 captions each), and their bag-of-words ceiling."""
    from pipelines.synthetic import bag_of_words_ceiling, make_binding_scenes

    scenes = make_binding_scenes(images, seed=2)  # other scenes; the prototypes stay those of SEED
    for scene in scenes:
        scene.split = "gallery"
    features = workdir / f"gallery{images}"
    if not (features / "manifest.json").exists():
        write_world(features, scenes)
    return features, features / "captions.jsonl", bag_of_words_ceiling(scenes, "gallery")


def recalls(metrics: dict) -> dict:
    return {key: round(metrics[key], 2) for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                                                   "rsum")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="gallery images (5 captions each)")
    parser.add_argument("--shortlist", default="50,100,200",
                        help="K values: images re-ranked per caption (5·K captions per image)")
    parser.add_argument("--train-scenes", type=int, default=3000, help="generated scenes the model is trained on")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench_retrieval")
    parser.add_argument("--quick", action="store_true", help="300 training scenes, a 300-image gallery, K = 10, 20")
    parser.add_argument("--poolings", default="attention+max",
                        help="first-stage poolings to compare (comma-separated: attention+max, attention); the "
                             "paper's model is the same in each, its head only differs, so exact scoring runs once")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.images, args.shortlist, args.train_scenes = 300, "10,20", 300
    ks = [int(k) for k in args.shortlist.split(",") if k.strip()]
    poolings = [p.strip() for p in args.poolings.split(",") if p.strip()]

    from extract.shards import FeatureStore
    from matching import checkpoint
    from matching.data.captions import evaluation_set, read_captions
    from matching.retrieval.metrics import recall_metrics
    from matching.retrieval.scoring import StoreImages, score_matrix
    from matching.retrieval.shortlist import two_stage_metrics

    log = functools.partial(print, flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = {pooling: trained_model(args.workdir, args.train_scenes, log, pooling) for pooling in poolings}
    features, captions, ceiling = gallery(args.workdir, args.images)
    loaded = {pooling: checkpoint.load(path) for pooling, path in paths.items()}
    models = {pooling: model for pooling, (model, _, _) in loaded.items()}
    model, _, vocab = loaded[poolings[0]]
    paper = {name: t for name, t in model.state_dict().items() if not name.startswith("first_stage.")}
    for pooling, other in models.items():  # the head learns from detached inputs: the paper model is the same
        state = other.state_dict()
        if not all(name in state and torch.equal(t, state[name]) for name, t in paper.items()):
            raise SystemExit(f"the paper model trained beside the {pooling} head differs from the others'")
    store = FeatureStore(features)
    image_ids, ordered = evaluation_set(read_captions(captions), store.image_ids, 5)
    tokens = [vocab.encode(c.text) for c in ordered]
    images = StoreImages(store, image_ids)
    log(f"gallery: {len(image_ids):,} images × {len(tokens):,} captions = {len(image_ids) * len(tokens):,} pairs; "
        f"a perfect bag-of-words ranker: R@1 i2t {ceiling['i2t_r1']:.1f}, t2i {ceiling['t2i_r1']:.1f}; "
        f"torch threads {torch.get_num_threads()}")

    stages = []
    for pooling in poolings:
        for k in ks:
            started = time.perf_counter()
            two_stage, reports = two_stage_metrics([models[pooling]], images, [tokens], k=k, protocol="full",
                                                   device="cpu", log=log)
            seconds = time.perf_counter() - started
            stages.append((pooling, k, seconds, two_stage["full"], reports["full"]))
            log(f"two-stage K={k} ({pooling} head): {seconds:.1f} s; {reports['full'].line()}")

    started = time.perf_counter()
    sims = score_matrix(model, images, tokens, device="cpu", log=log, log_every=60)
    exact = recall_metrics(sims, 5)
    exact_seconds = time.perf_counter() - started
    log(f"exact: {exact_seconds:.1f} s ({sims.size / exact_seconds:,.0f} pairs/s)")

    log(f"\n{'':28} {'seconds':>8} {'speed-up':>8} | {'shortlist recall t2i':>20} {'i2t':>6} | "
        f"{'i2t R@1':>7} {'t2i R@1':>7} {'rsum':>6}")
    log(f"{'exact':28} {exact_seconds:8.1f} {1.0:7.1f}× | {'':>20} {'':>6} | {exact['i2t_r1']:7.2f} "
        f"{exact['t2i_r1']:7.2f} {exact['rsum']:6.1f}")
    rows = []
    for pooling, k, seconds, metrics, report in stages:
        log(f"{f'two-stage {k}, {pooling}':28} {seconds:8.1f} {exact_seconds / seconds:7.1f}× | "
            f"{report.t2i_recall:19.1f}% {report.i2t_recall:5.1f}% | {metrics['i2t_r1']:7.2f} "
            f"{metrics['t2i_r1']:7.2f} {metrics['rsum']:6.1f}")
        rows.append({"k": k, "first_stage_pooling": pooling, "seconds": seconds,
                     "speedup": exact_seconds / seconds, **recalls(metrics),
                     "t2i_shortlist_recall": report.t2i_recall, "i2t_shortlist_recall": report.i2t_recall,
                     "pairs_scored": report.pairs_scored, "pairs_total": report.pairs_total})
    log(f"bag-of-words ceiling {'':>61} | {ceiling['i2t_r1']:7.2f} {ceiling['t2i_r1']:7.2f}")
    if args.no_record:
        return
    line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": "cpu: " + cpu_name(), "threads": torch.get_num_threads(), "dtype": "float32",
            "load_average": os.getloadavg(), "torch": torch.__version__, "benchmark": "retrieval",
            "world": "binding", "images": len(image_ids), "captions": len(tokens), "regions": REGIONS,
            "model": MODEL, "recipe": RECIPE, "train_scenes": args.train_scenes, "bag_of_words_ceiling": ceiling,
            "exact": {"seconds": exact_seconds, **recalls(exact)}, "two_stage": rows}
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
