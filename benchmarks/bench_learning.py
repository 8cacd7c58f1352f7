"""Does training still learn what the paper's model learns? Each default checked on a world a bag of words cannot solve.

The world (`pipelines.synthetic.make_binding_scenes`): scenes come in groups that share their
colour words and shape words but bind them differently ("a red circle and a blue square"
against "a blue circle and a red square"), with 36 regions an image, most of them clutter. A
perfect bag-of-words ranker reaches only about 40% R@1 on its test split (computed and printed
from the data); a model that binds words to regions reaches 100.

Each variant trains the same small TSHSR (d = 256, m = 64, word 64) with the same short recipe
(2 epochs, the first summing the hinge over all negatives, lr 3e-3, batch 64) and changes one
thing; every variant runs for every seed on the same generated data. It prints test R@1 both
ways and rsum (mean ± std over the seeds) beside the bag-of-words ceiling, and appends one JSON
line to benchmarks/results/bench_learning.jsonl.

Variants:
- default: the library's defaults as they are;
- global-loss: the auxiliary hinge on cos(v̄, t̄) at weight 1 (`--global-loss-weight 1`);
- paper-loss: the paper's loss alone (`--global-loss-weight 0`);
- no-first-stage: without the shortlist's projection head (`--set model.first_stage_dim=0`);
- length-buckets: batches of similar-length captions (`--length-buckets`);
- plain-batchnorm: the image pooling's batch norm taking statistics over padded region slots too
  (`nn.BatchNorm1d`'s behaviour, instead of `MaskedBatchNorm1d`);
- plain-head: the plain batched similarity head (`benchmarks/bench_train.py`'s baseline)
  instead of the fast chunked one, in training and evaluation.

Multi-query (`--task multi-query`): the same kind of world with groups of three scenes, each
scene's three named objects its three queries ("a red circle", "a blue square", "a green star",
in a random order), so that every round's queries fit the target's whole group as a bag of words
(a perfect bag-of-words ranker: R@1 1/3 at every round) and only binding tells the group apart.
A small HMRN (d = 128, m = 64, word 64, InfoNCE as in the task's defaults, lr 2e-3, batch 64)
trains for 20 epochs on 3,000 scenes; it prints test R@1 per round. Variants:
- default: the task's defaults (a query is its words and `<end>`, HMRN's);
- start-end: queries wrapped `<start> … <end>` as captions are (the default before HMRN's).

    python benchmarks/bench_learning.py [--seeds 3] [--images 3750] [--variants default,global-loss]
    python benchmarks/bench_learning.py --task multi-query [--seeds 3] [--variants default,start-end]
    python benchmarks/bench_learning.py --quick       # 600 scenes, 8 regions: a check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "bench_learning.jsonl"
MODEL = {"embed_size": 256, "sim_dim": 64, "word_dim": 64}
RECIPE = {"epochs": 2, "warmup_epochs": 1, "learning_rate": 3e-3, "batch_size": 64, "workers": 0,
          "features_in_memory": True, "checkpoint_every": 0, "val_images": 0, "lr_decay_epoch": 0}
VARIANTS: dict[str, dict] = {
    "default": {},
    "global-loss": {"train": {"global_loss_weight": 1.0}},
    "paper-loss": {"train": {"global_loss_weight": 0.0}},
    "no-first-stage": {"model": {"first_stage_dim": 0}},
    "length-buckets": {"train": {"length_buckets": True}},
    "plain-batchnorm": {"patch": "batchnorm"},
    "plain-head": {"patch": "head"},
}


@contextlib.contextmanager
def patched(kind: str | None) -> Iterator[None]:
    """The plain alternatives of two defaults, swapped in for one training and evaluation."""
    from matching.model.batchnorm import MaskedBatchNorm1d
    from matching.model.similarity import SimilarityHead

    if kind is None:
        yield
        return
    if kind == "batchnorm":
        owner, name = MaskedBatchNorm1d, "forward"
        original = MaskedBatchNorm1d.forward

        def replacement(self, input, mask=None):  # noqa: A002, ANN001, ANN202 - statistics over every row
            return torch.nn.BatchNorm1d.forward(self, input)
    elif kind == "head":
        from bench_train import plain_similarity_vector

        owner, name = SimilarityHead, "forward"
        original = SimilarityHead.forward

        def replacement(self, images, captions, *, chunk_rows=None):  # noqa: ANN001, ANN202
            return torch.sigmoid(self.score(plain_similarity_vector(self, images, captions))).squeeze(-1)
    else:
        raise ValueError(kind)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def world(root: Path, seed: int, images: int, regions: int) -> tuple[Path, Path, dict]:
    """Feature shards, captions and vocabulary of one seed's binding world (made once), and its ceiling."""
    from matching.data.vocabulary import build_vocabulary
    from pipelines.synthetic import bag_of_words_ceiling, make_binding_scenes, write_feature_dataset

    scenes = make_binding_scenes(images, seed=seed)
    features = root / f"world-{seed}-{images}x{regions}"
    if not (features / "manifest.json").exists():
        write_feature_dataset(features, scenes, feature_dim=64, max_boxes=regions, seed=seed, place_rate=0.0)
        build_vocabulary(features / "captions.jsonl", features / "vocab.json", threshold=1)
    return features, features / "vocab.json", bag_of_words_ceiling(scenes, "test")


# The multi-query check: a small HMRN and a short recipe that learn the multi-query binding world on a CPU.
MQ_MODEL = {"embed_size": 128, "sim_dim": 64, "word_dim": 64, "max_turns": 3}
MQ_RECIPE = {"epochs": 20, "learning_rate": 2e-3, "batch_size": 64, "workers": 0, "features_in_memory": True,
             "checkpoint_every": 0, "val_images": 0, "lr_decay_epoch": 0}
MQ_VARIANTS: dict[str, dict] = {
    "default": {},
    "start-end": {"model": {"query_wrap": "start-end"}},
}


def multiquery_world(root: Path, seed: int, images: int, regions: int) -> tuple[Path, Path, float]:
    """Shards, query sets and vocabulary of one seed's multi-query binding world, and its bag-of-words R@1."""
    from matching.data.queries import QuerySet, write_query_sets
    from matching.data.vocabulary import build_vocabulary
    from pipelines.synthetic import bag_of_words_ceiling, make_binding_scenes, write_feature_dataset

    scenes = make_binding_scenes(images, seed=seed, objects=(3,))
    features = root / f"mq-world-{seed}-{images}x{regions}"
    queries = features / "queries.jsonl"
    if not (features / "manifest.json").exists():
        write_feature_dataset(features, scenes, feature_dim=64, max_boxes=regions, seed=seed, place_rate=0.0)
        rng = np.random.default_rng(seed + 3)
        write_query_sets(queries, [QuerySet(scene.image_id, tuple(scene.described[i].named
                                                                   for i in rng.permutation(len(scene.described))),
                                            scene.split, scene.image_id) for scene in scenes])
        build_vocabulary(queries, features / "vocab.json", threshold=1)
    # every round's queries are a bag of the target group's words: ranking by bags ties the whole group
    return features, features / "vocab.json", bag_of_words_ceiling(scenes, "test")["t2i_r1"]


def run_multiquery(root: Path, name: str, seed: int, features: Path, vocab: Path, model: dict, recipe: dict) -> dict:
    from matching.config import Config
    from matching.retrieval.evaluate import evaluate_checkpoint
    from matching.training.loop import train

    variant = MQ_VARIANTS[name]
    config = Config.default("multi-query").updated(model={**model, **variant.get("model", {})},
                                                   train={**recipe, "seed": seed, **variant.get("train", {})})
    run_dir = root / f"mq-run-{name}-{seed}"
    queries = features / "queries.jsonl"
    started = time.time()
    train(config, features=features, captions=queries, vocab_path=vocab, run_dir=run_dir, overwrite=True,
          device="cpu", progress=False, log=lambda line: None)
    seconds = time.time() - started
    rounds = evaluate_checkpoint(run_dir / "model_best.pt", features, queries, device="cpu").results["rounds"]
    return {"test_r1": [row["r1"] for row in rounds], "test_meanr": [row["meanr"] for row in rounds],
            "train_seconds": round(seconds, 1)}


def variant_names(spec: str, known: dict[str, dict]) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def sweep(args: argparse.Namespace, names: list[str], make_world: Callable, run_one: Callable,
          describe: Callable[[str, dict, object], str]) -> tuple[dict[str, list[dict]], list]:
    """Every variant for every seed on that seed's world (made once); each run's line printed as it ends."""
    rows: dict[str, list[dict]] = {name: [] for name in names}
    ceilings = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            features, vocab, ceiling = make_world(root, seed, args.images, args.regions)
            ceilings.append(ceiling)
            for name in names:
                row = run_one(root, name, seed, features, vocab)
                rows[name].append(row)
                print(f"seed {seed} {describe(name, row, ceiling)} ({row['train_seconds']:.0f} s)", flush=True)
    return rows, ceilings


def main_multiquery(args: argparse.Namespace) -> None:
    names = variant_names(args.variants, MQ_VARIANTS)
    model = dict(MQ_MODEL)
    recipe = {**MQ_RECIPE, **({"epochs": args.epochs} if args.epochs_given else {})}
    started = time.time()
    rows, ceilings = sweep(
        args, names, multiquery_world,
        lambda root, name, seed, features, vocab: run_multiquery(root, name, seed, features, vocab, model, recipe),
        lambda name, row, ceiling: (f"{name:<10} test R@1 by round " + " ".join(f"{v:5.1f}" for v in row["test_r1"])
                                    + f"; bag of words {ceiling:.1f}"))
    ceiling = statistics.mean(ceilings)
    print(f"\n{args.seeds} seeds, {args.images} scenes, up to {args.regions} regions; a perfect bag-of-words "
          f"ranker: R@1 {ceiling:.1f} at every round")
    summary = {}
    for name in names:
        by_round = list(zip(*(row["test_r1"] for row in rows[name]), strict=True))
        summary[name] = [(statistics.mean(v), statistics.pstdev(v)) for v in by_round]
        print(f"{name:<10} R@1 " + "  ".join(f"r{i + 1} {m:5.1f} ± {sd:4.1f}"
                                             for i, (m, sd) in enumerate(summary[name])))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"benchmark": "bench_learning", "task": "multi-query",
                                 "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "device": platform.processor() or platform.machine(),
                                 "threads": torch.get_num_threads(), "seeds": args.seeds,
                                 "first_seed": args.first_seed, "images": args.images, "regions": args.regions,
                                 "model": model, "recipe": recipe, "bag_of_words_r1": ceiling, "rows": rows,
                                 "summary": summary, "seconds": round(time.time() - started, 1)}) + "\n")


def run(root: Path, name: str, seed: int, features: Path, vocab: Path, shortlists: tuple[int, ...],
        model: dict, recipe: dict) -> dict:
    from matching.config import Config, EvaluationSettings
    from matching.retrieval.evaluate import evaluate_checkpoint
    from matching.training.loop import train

    variant = VARIANTS[name]
    config = Config().updated(model={**model, **variant.get("model", {})},
                              train={**recipe, "seed": seed, **variant.get("train", {})})
    run_dir = root / f"run-{name}-{seed}"
    captions = features / "captions.jsonl"
    started = time.time()
    with patched(variant.get("patch")):
        result = train(config, features=features, captions=captions, vocab_path=vocab, run_dir=run_dir,
                       overwrite=True, device="cpu", progress=False, log=lambda line: None)
        seconds = time.time() - started
        test = evaluate_checkpoint(run_dir / "model_best.pt", features, captions, device="cpu",
                                   settings=EvaluationSettings(split="test", protocol="full")).results["full"]
    row = {"val_rsum_epoch1": result.history[0].get("rsum"), "test_i2t_r1": test["i2t_r1"],
           "test_t2i_r1": test["t2i_r1"], "test_rsum": test["rsum"], "train_seconds": round(seconds, 1)}
    for k in shortlists:
        try:
            two = evaluate_checkpoint(run_dir / "model_best.pt", features, captions, device="cpu",
                                      settings=EvaluationSettings(split="test", protocol="full", shortlist=k))
        except ValueError as error:  # no trained first stage
            row["shortlist_note"] = str(error)
            break
        report = two.shortlist["full"]
        row[f"shortlist{k}"] = {"t2i_recall": report.t2i_recall, "i2t_recall": report.i2t_recall,
                                "t2i_r1": two.results["full"]["t2i_r1"], "i2t_r1": two.results["full"]["i2t_r1"]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="Seeds run are first-seed, first-seed+1, ...: split a long measurement over runs.")
    parser.add_argument("--images", type=int, default=3750, help="Scenes generated (80%% train, 10%% val, 10%% test).")
    parser.add_argument("--regions", type=int, default=36, help="Most regions an image has.")
    parser.add_argument("--variants", default="default,global-loss,length-buckets,plain-batchnorm,plain-head")
    parser.add_argument("--shortlist", default="", help="Comma-separated K: also evaluate two-stage at these K.")
    parser.add_argument("--workdir", type=Path, help="Keep the worlds and runs here (default: a temporary directory).")
    parser.add_argument("--embed-size", type=int, default=MODEL["embed_size"])
    parser.add_argument("--sim-dim", type=int, default=MODEL["sim_dim"])
    parser.add_argument("--word-dim", type=int, default=MODEL["word_dim"])
    parser.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--warmup-epochs", type=int, default=RECIPE["warmup_epochs"])
    parser.add_argument("--lr", type=float, default=RECIPE["learning_rate"])
    parser.add_argument("--quick", action="store_true", help="600 scenes of 8 regions, one seed.")
    parser.add_argument("--task", choices=("matching", "multi-query"), default="matching",
                        help="multi-query: HMRN on the multi-query binding world, with its own small model and "
                             "recipe (of the sizes and recipe options only --epochs applies; 3,000 scenes).")
    args = parser.parse_args()
    if args.quick:
        args.images, args.regions, args.seeds = 600, 8, 1
    if args.task == "multi-query":
        args.epochs_given = "--epochs" in sys.argv
        if "--images" not in sys.argv and not args.quick:
            args.images = 3000  # groups of three make at most 3,360 different scenes
        if "--variants" not in sys.argv:
            args.variants = ",".join(MQ_VARIANTS)
        main_multiquery(args)
        return
    model = {"embed_size": args.embed_size, "sim_dim": args.sim_dim, "word_dim": args.word_dim}
    recipe = {**RECIPE, "batch_size": args.batch_size, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
              "learning_rate": args.lr}
    names = variant_names(args.variants, VARIANTS)
    shortlists = tuple(int(k) for k in args.shortlist.split(",") if k.strip())
    started = time.time()
    rows, ceilings = sweep(
        args, names, world,
        lambda root, name, seed, features, vocab: run(root, name, seed, features, vocab, shortlists, model, recipe),
        lambda name, row, ceiling: (f"{name:<16} test R@1 i2t {row['test_i2t_r1']:5.1f} t2i {row['test_t2i_r1']:5.1f} "
                                    f"rsum {row['test_rsum']:5.1f}; val rsum after epoch 1: "
                                    f"{row['val_rsum_epoch1']:.1f}"))
    bow = {key: statistics.mean(c[key] for c in ceilings) for key in ("i2t_r1", "t2i_r1")}
    print(f"\n{args.seeds} seeds, {args.images} scenes, up to {args.regions} regions; a perfect bag-of-words "
          f"ranker: R@1 i2t {bow['i2t_r1']:.1f}, t2i {bow['t2i_r1']:.1f}")
    print(f"{'variant':<16} {'i2t R@1':>14} {'t2i R@1':>14} {'rsum':>15}")
    summary = {}
    for name in names:
        stats = {}
        for key in ("test_i2t_r1", "test_t2i_r1", "test_rsum"):
            values = [row[key] for row in rows[name]]
            stats[key] = (statistics.mean(values), statistics.pstdev(values))
        summary[name] = stats
        print(f"{name:<16} " + " ".join(f"{stats[k][0]:7.1f} ± {stats[k][1]:4.1f}"
                                         for k in ("test_i2t_r1", "test_t2i_r1", "test_rsum")))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"benchmark": "bench_learning", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "device": platform.processor() or platform.machine(),
                                 "threads": torch.get_num_threads(), "seeds": args.seeds,
                                 "first_seed": args.first_seed, "images": args.images,
                                 "regions": args.regions, "model": model, "recipe": recipe,
                                 "bag_of_words_ceiling": bow, "rows": rows, "summary": summary,
                                 "seconds": round(time.time() - started, 1)}) + "\n")


if __name__ == "__main__":
    main()
