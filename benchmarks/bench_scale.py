"""Every stage at real-dataset size: wall time, peak memory and disk, one table.

Generated once into --workdir (and reused; `--images N` scales everything), streamed to disk in
bounded memory:

- feature shards in the real format (format 2, float16, 36 regions × 2048-d a image, boxes,
  per-image checksums) for MSCOCO's 123,287 images (18 GB);
- `dataset_coco.json`, a Karpathy split file with MSCOCO's split counts (82,783 train, 30,504
  restval, 5,000 val, 5,000 test) and 616,767 captions of 8–20 words drawn from a Zipf
  vocabulary, with their tokens as the real file has them;
- `vg_queries.jsonl`, multi-query sets for DrillDown's Visual Genome split (92,105 / 5,000 /
  9,896 images, 10–15 phrases each) over the first 107,001 of the same images;
- random-weight checkpoints at the papers' sizes: TSHSR (d = 1024, m = 256, word 300, M = 3,
  its first-stage head) on the vocabulary the `vocab` stage builds, and HMRN (d = 256).

Each stage runs in a child process of its own, so the peak resident memory printed (the child's
`ru_maxrss`) is the stage's; "disk" is what the stage wrote. Stages:

- vocab: `build_vocabulary` on the 616K captions (`tshsr-pipe vocab`);
- open-train: `MatchingTask.load_data` (what `train` does before its first step), then the
  loader's batches/s (batch 128, the default 2 workers);
- train-step: the library's training step at the paper's sizes on loader batches: seconds a
  step, the epoch and the 20-epoch run projected;
- checksum: the CRC-32 of a batch of 128 random images against the whole read of that batch
  (page cache warm), beside a training step;
- eval-exact: `score_matrix` on the first --exact-images test images × all 25,000 test
  captions: pairs/s, the 5K test's 125M pairs projected;
- eval-two-stage: `evaluate --shortlist K` on the whole 5K test, end to end;
- eval-multiquery: HMRN's rounds on --mq-sets of the 9,896 test query sets × all 9,896 images ×
  10 rounds: the whole test projected;
- index: `tshsr-pipe index`: the whole gallery encoded (float16 regions), its first-stage index
  built;
- index-recall: the first stage's flat, HNSW and IVF indexes over every image vector: build
  time, query time, and the share of flat's top 200 each finds for 1,000 test captions;
- search: `SearchEngine.open` on the built index and 20 text searches at the default shortlist;
- serve: `tshsr-pipe serve --index`: start-up to the first answer, p50 / p95 of 40 searches over
  HTTP, anonymous and file-backed resident memory; then a second server on the same index,
  both answering;
- serve-5k: the same over an index of the 5,000 test images only (`index --split test`).

A stage whose input is missing says so; `--stages a,b` runs some. The table (and one JSON line
with every figure) goes to stdout and benchmarks/results/bench_scale.jsonl.

    python benchmarks/bench_scale.py --workdir /data/scale               # MSCOCO size: ~45 GB of disk
    python benchmarks/bench_scale.py --workdir /tmp/scale --images 6000  # a small run of every stage
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "bench_scale.jsonl"

COCO = {"images": 123_287, "captions": 616_767, "train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}
VG = {"images": 107_001, "train": 92_105, "val": 5_000, "test": 9_896}
REGIONS, FEATURE_DIM, WORDS = 36, 2048, 10_000
STAGES = ("vocab", "open-train", "train-step", "checksum", "eval-exact", "eval-two-stage", "eval-multiquery",
          "index", "index-recall", "search", "serve", "serve-5k")
RESULT = "RESULT "


# --------------------------------------------------------------------------- generation


def counts(images: int) -> tuple[dict[str, int], dict[str, int]]:
    """MSCOCO's and Visual Genome's split counts scaled to `images` (their real values at 123,287)."""
    scale = images / COCO["images"]
    coco = {"val": max(50, round(COCO["val"] * scale)), "test": max(50, round(COCO["test"] * scale))}
    coco["train"] = round(COCO["train"] * scale)
    coco["restval"] = images - coco["train"] - coco["val"] - coco["test"]
    coco["captions"] = round(COCO["captions"] * scale)
    vg_images = min(images, round(VG["images"] * scale))
    vg = {"val": max(50, round(VG["val"] * scale)), "test": max(50, round(VG["test"] * scale))}
    vg["train"] = vg_images - vg["val"] - vg["test"]
    return coco, vg


def image_id(i: int) -> str:
    return f"COCO_{i:012d}.jpg"


def generate(workdir: Path, images: int, log) -> dict[str, Any]:  # noqa: ANN001 - print
    """Shards, caption file, query file (each skipped when complete), returning what was generated."""
    done = workdir / "generated.json"
    if done.exists() and json.loads(done.read_text()).get("images") == images:
        return json.loads(done.read_text())
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    coco, vg = counts(images)
    started = time.perf_counter()
    write_shards(workdir / "features", images, log)
    shard_seconds = time.perf_counter() - started
    started = time.perf_counter()
    write_karpathy(workdir / "dataset_coco.json", images, coco)
    write_queries(workdir / "vg_queries.jsonl", vg)
    text_seconds = time.perf_counter() - started
    facts = {"images": images, "coco": coco, "vg": vg, "shard_seconds": round(shard_seconds, 1),
             "text_seconds": round(text_seconds, 1), "features_bytes": directory_bytes(workdir / "features"),
             "captions_bytes": (workdir / "dataset_coco.json").stat().st_size}
    done.write_text(json.dumps(facts))
    return facts


def write_shards(out: Path, images: int, log, per_shard: int = 1000) -> None:  # noqa: ANN001 - print
    """Random float16 region features in [0.5, 1) (random mantissas: no float conversion to pay), 36 boxes an
    image, written a shard at a time."""
    from extract.shards import RegionRecord, ShardWriter

    rng = np.random.default_rng(0)
    last = time.perf_counter()
    for start in range(0, images, per_shard):
        writer = ShardWriter(out, max_boxes=REGIONS, feature_dim=FEATURE_DIM, dtype="float16",
                             extractor={"model": "bench_scale random features"})
        stop = min(start + per_shard, images)
        bits = rng.integers(0, 1 << 10, size=(stop - start, REGIONS, FEATURE_DIM), dtype=np.uint16) | 0x3800
        features = bits.view(np.float16)
        corner = rng.uniform(0, 400, size=(stop - start, REGIONS, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(20, 240, size=corner.shape)], axis=2).astype(np.float32)
        for row, i in enumerate(range(start, stop)):
            writer.add(RegionRecord(image_id(i), features[row], boxes[row], (480, 640)))
        writer.commit(settings={"source": "bench_scale"} if start == 0 else None)
        if time.perf_counter() - last > 30:
            log(f"  features: {stop:,} / {images:,} images")
            last = time.perf_counter()


def sentence(rng: np.random.Generator, low: int, high: int) -> list[str]:
    ranks = np.minimum(rng.zipf(1.3, size=int(rng.integers(low, high + 1))), WORDS) - 1
    return [f"w{r:04d}" for r in ranks]


def write_karpathy(path: Path, images: int, coco: dict[str, int]) -> None:
    """A Karpathy split file written entry by entry (the real one is a single JSON object too)."""
    rng = np.random.default_rng(1)
    splits = (["test"] * coco["test"] + ["val"] * coco["val"] + ["train"] * coco["train"]
              + ["restval"] * coco["restval"])
    extra = coco["captions"] - 5 * images  # MSCOCO: a few hundred images have a 6th or 7th caption
    with path.open("w", encoding="utf-8") as handle:
        handle.write('{"dataset": "coco", "images": [')
        for i in range(images):
            n = 5 + (1 if i < extra else 0)
            sentences = []
            for _ in range(n):
                tokens = sentence(rng, 8, 20)
                sentences.append({"tokens": tokens, "raw": " ".join(tokens).capitalize() + ".", "imgid": i})
            entry = {"filepath": "val2014", "sentids": [], "filename": image_id(i), "imgid": i,
                     "split": splits[i], "sentences": sentences, "cocoid": i}
            handle.write(("," if i else "") + json.dumps(entry))
        handle.write("]}")


def write_queries(path: Path, vg: dict[str, int]) -> None:
    """Multi-query JSONL (`matching.data.queries`): test images first, as `counts` orders the splits."""
    rng = np.random.default_rng(2)
    splits = ["test"] * vg["test"] + ["val"] * vg["val"] + ["train"] * vg["train"]
    with path.open("w", encoding="utf-8") as handle:
        for i, split in enumerate(splits):
            queries = [" ".join(sentence(rng, 2, 6)) for _ in range(int(rng.integers(10, 16)))]
            handle.write(json.dumps({"image_id": image_id(i), "split": split, "queries": queries}) + "\n")


def text_queries(count: int, seed: int) -> list[str]:
    """Search texts in the generated captions' words."""
    rng = np.random.default_rng(seed)
    return [" ".join(sentence(rng, 6, 14)) for _ in range(count)]


def checkpoints(workdir: Path) -> tuple[Path, Path]:
    """Random-weight TSHSR (on the vocab stage's vocabulary) and HMRN checkpoints at the papers' sizes."""
    import torch

    from matching import checkpoint
    from matching.config import Config
    from matching.data.queries import build_query_vocab, read_query_sets
    from matching.data.text import Vocabulary

    tshsr, hmrn = workdir / "tshsr.pt", workdir / "hmrn.pt"
    if not tshsr.exists():
        vocab = Vocabulary.load(workdir / "vocab.json")
        config = Config().updated(model={"vocab_size": len(vocab)})
        torch.manual_seed(0)
        checkpoint.save(tshsr, checkpoint.build_network(config).eval(), config, vocab)
    if not hmrn.exists():
        vocab = build_query_vocab(read_query_sets(workdir / "vg_queries.jsonl"))
        config = Config.default("multi-query").updated(model={"vocab_size": len(vocab)})
        torch.manual_seed(0)
        checkpoint.save(hmrn, checkpoint.build_network(config).eval(), config, vocab)
    return tshsr, hmrn


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# --------------------------------------------------------------------------- stages (in child processes)


def stage_vocab(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from matching.data.vocabulary import build_vocabulary

    vocab, texts = build_vocabulary(workdir / "dataset_coco.json", workdir / "vocab.json")
    return {"words": len(vocab), "captions_counted": texts,
            "note": f"{len(vocab):,} words from {texts:,} train and val captions"}


def _training(workdir: Path, workers: int) -> tuple[Any, Any, Any, Any]:
    from extract.runtime import Launch
    from matching.config import Config
    from matching.data.text import Vocabulary
    from matching.tasks import get_task

    task = get_task("matching")
    config = Config().updated(train={"workers": workers})
    config, data = task.load_data(config, workdir / "features", workdir / "dataset_coco.json",
                                  Vocabulary.load(workdir / "vocab.json"), "train", "val", lambda line: None)
    return task, config, data, Launch.from_env()


def _loader(task: Any, config: Any, data: Any, launch: Any) -> Any:
    import torch
    from torch.utils.data import DataLoader

    sampler, collate = task.batches(data, config, launch)
    sampler.set_epoch(0)
    return DataLoader(data.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.train.workers,
                      generator=torch.Generator().manual_seed(0))


def stage_open_train(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    task, config, data, launch = _training(workdir, 2)
    opened = time.perf_counter() - started
    rss_open = _rss()
    batches, started = 0, None
    for _ in _loader(task, config, data, launch):
        if started is None:  # the first batch pays for starting the workers
            started = time.perf_counter()
            continue
        batches += 1
        if batches == args.loader_batches:
            break
    rate = batches / (time.perf_counter() - started)
    return {"open_seconds": opened, "rss_after_open": rss_open, "training_pairs": len(data.dataset),
            "loader_batches_per_s": rate,
            "note": f"opened in {opened:.1f} s ({len(data.dataset):,} training pairs); then {rate:.1f} batches/s "
                    "of 128 (2 workers)"}


def stage_train_step(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from matching.checkpoint import build_network

    task, config, data, launch = _training(workdir, 2)
    torch.manual_seed(0)
    model = build_network(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate)
    times = []
    for number, batch in enumerate(_loader(task, config, data, launch)):
        started = time.perf_counter()
        task.step(model, optimizer, batch, config, torch.device("cpu"), 1, None)
        if number:  # the first step allocates Adam's state
            times.append(time.perf_counter() - started)
        if len(times) == args.train_steps:
            break
    step = float(np.median(times))
    per_epoch = math.ceil(len(data.dataset) / config.train.batch_size)
    return {"seconds_per_step": step, "steps": len(times), "steps_per_epoch": per_epoch,
            "epoch_hours": step * per_epoch / 3600, "run_hours": step * per_epoch * config.train.epochs / 3600,
            "epochs": config.train.epochs,
            "note": f"{step:.1f} s a step; epoch {step * per_epoch / 3600:.1f} h, "
                    f"{config.train.epochs} epochs {step * per_epoch * config.train.epochs / 3600:.0f} h"}


def stage_checksum(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import zlib

    from extract.shards import FeatureStore

    store = FeatureStore(workdir / "features")
    rng = np.random.default_rng(3)
    ids = [store.image_ids[i] for i in rng.choice(len(store), 128, replace=False)]
    store.batch(ids)  # warm the page cache: the cost measured is the check's, not the disk's
    started = time.perf_counter()
    batch = store.batch(ids)
    checked = time.perf_counter() - started
    started = time.perf_counter()
    for row in range(len(ids)):
        zlib.crc32(np.ascontiguousarray(batch.features[row]).data)
    crc = time.perf_counter() - started
    return {"batch_read_seconds": checked, "crc_seconds": crc, "crc_share_of_read": crc / checked,
            "note": f"CRC-32 of a 128-image batch {1000 * crc:.0f} ms of its {1000 * checked:.0f} ms read"}


def _test_set(workdir: Path, vocab: Any) -> tuple[list[str], list[list[int]]]:
    from extract.shards import FeatureStore
    from matching.data.captions import evaluation_set, read_split

    store = FeatureStore(workdir / "features")
    image_ids, ordered = evaluation_set(read_split(workdir / "dataset_coco.json", "test"), store.image_ids, 5)
    return image_ids, [vocab.encode(c.text) for c in ordered]


def stage_eval_exact(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from extract.shards import FeatureStore
    from matching import checkpoint
    from matching.retrieval.scoring import StoreImages, score_matrix

    model, _, vocab = checkpoint.load(workdir / "tshsr.pt")
    image_ids, tokens = _test_set(workdir, vocab)
    subset = image_ids[: args.exact_images]
    started = time.perf_counter()
    score_matrix(model, StoreImages(FeatureStore(workdir / "features"), subset), tokens)
    seconds = time.perf_counter() - started
    rate = len(subset) * len(tokens) / seconds
    total = len(image_ids) * len(tokens)
    return {"pairs_per_s": rate, "pairs_measured": len(subset) * len(tokens), "test_pairs": total,
            "projected_hours": total / rate / 3600,
            "note": f"{rate:,.0f} pairs/s; the {len(image_ids):,} × {len(tokens):,} test projected "
                    f"{total / rate / 3600:.1f} h"}


def stage_eval_two_stage(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from matching.config import EvaluationSettings
    from matching.retrieval.evaluate import evaluate_checkpoint

    outcome = evaluate_checkpoint(workdir / "tshsr.pt", workdir / "features", workdir / "dataset_coco.json",
                                  device="cpu", settings=EvaluationSettings(split="test", protocol="full",
                                                                            shortlist=args.eval_shortlist))
    report = outcome.shortlist["full"]
    return {"shortlist": args.eval_shortlist, "pairs_scored": report.pairs_scored, "pairs_total": report.pairs_total,
            "note": f"K = {args.eval_shortlist}: {report.pairs_scored:,} of {report.pairs_total:,} pairs scored"}


def stage_eval_multiquery(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from extract.shards import FeatureStore
    from matching import checkpoint
    from matching.data.queries import read_query_split, set_images
    from matching.model.hmrn import score_rounds
    from matching.retrieval.scoring import StoreImages

    model, config, vocab = checkpoint.load(workdir / "hmrn.pt")
    sets = read_query_split(workdir / "vg_queries.jsonl", "test")
    turns = config.model.max_turns
    store = FeatureStore(workdir / "features")
    image_ids = set_images(sets, store.image_ids, turns)
    tokens = [[vocab.encode(q) for q in s.queries[:turns]] for s in sets[: args.mq_sets]]
    started = time.perf_counter()
    score_rounds(model, StoreImages(store, image_ids), tokens, rounds=turns, device="cpu")
    seconds = time.perf_counter() - started
    rate = len(tokens) * len(image_ids) * turns / seconds
    total = len(sets) * len(image_ids) * turns
    return {"scores_per_s": rate, "sets_measured": len(tokens), "test_sets": len(sets), "images": len(image_ids),
            "projected_hours": total / rate / 3600,
            "note": f"{rate:,.0f} (set, image, round) scores/s; {len(sets):,} sets × {len(image_ids):,} images × "
                    f"{turns} rounds projected {total / rate / 3600:.1f} h"}


def stage_index(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from matching.retrieval.search import index_gallery

    extra = {"captions": workdir / "dataset_coco.json", "split": "test"} if args.stage == "index-5k" else {}
    out = workdir / ("gallery-5k" if args.stage == "index-5k" else "gallery")
    gallery = index_gallery(workdir / "tshsr.pt", workdir / "features", out, device="cpu", **extra)
    return {"images": len(gallery), "index_kind": gallery.index_kind, "disk": directory_bytes(out),
            "note": f"{len(gallery):,} images, {gallery.index_kind} index, {directory_bytes(out) / 2**30:.1f} GiB"}


def stage_index_recall(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from matching import checkpoint
    from matching.retrieval.gallery import EncodedGallery
    from matching.retrieval.shortlist import GlobalIndex, encode_queries, global_vectors

    model, _, vocab = checkpoint.load(workdir / "tshsr.pt")
    gallery = EncodedGallery.open(workdir / "gallery")
    vectors = np.concatenate([gallery.take("vectors", range(s, min(s + 8192, len(gallery))))
                              for s in range(0, len(gallery), 8192)])
    _, tokens = _test_set(workdir, vocab)
    with torch.inference_mode():
        queries = global_vectors(encode_queries(model, tokens[:1000], "cpu").vectors)
    k = 200
    figures: dict[str, Any] = {}
    truth = None
    for kind in ("flat", "hnsw", "ivf"):
        started = time.perf_counter()
        index = GlobalIndex.build(vectors, kind)
        built = time.perf_counter() - started
        started = time.perf_counter()
        _, found = index.search(queries, k)
        searched = (time.perf_counter() - started) / len(queries)
        if truth is None:
            truth = found
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]))
        figures[kind] = {"build_seconds": built, "query_ms": 1000 * searched, "recall_vs_flat": recall}
    note = "; ".join(f"{kind} built {f['build_seconds']:.0f} s, {f['query_ms']:.2f} ms a query, "
                     f"recall@{k} {100 * f['recall_vs_flat']:.1f}%" for kind, f in figures.items())
    return {**figures, "images": len(vectors), "note": note}


def stage_search(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from matching.config import EvaluationSettings
    from matching.retrieval.search import SearchEngine

    started = time.perf_counter()
    engine = SearchEngine.open(workdir / "tshsr.pt", workdir / "features", index_path=workdir / "gallery",
                               device="cpu", settings=EvaluationSettings(split=None, shortlist=args.shortlist))
    opened = time.perf_counter() - started
    latencies = []
    for query in text_queries(21, seed=5):
        started = time.perf_counter()
        engine.search_text(query, 10)
        latencies.append(time.perf_counter() - started)
    ms = 1000 * np.asarray(latencies[1:])
    anon, file = _rss_parts(os.getpid())
    return {"open_seconds": opened, "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "rss_anon": anon, "rss_file": file, "shortlist": engine.info.shortlist,
            "note": f"open {opened:.1f} s; p50 {np.percentile(ms, 50):.0f} ms, p95 {np.percentile(ms, 95):.0f} ms "
                    f"(shortlist {engine.info.shortlist}); anonymous RSS {anon / 2**30:.2f} GiB"}


def _serve(workdir: Path, index: Path, extra: list[str]) -> tuple[subprocess.Popen, int, float]:
    import httpx
    from bench_serve import free_port

    port = free_port()
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--checkpoint", str(workdir / "tshsr.pt"),
                              "--features", str(workdir / "features"), "--index", str(index), "--port", str(port),
                              "--device", "cpu", *extra], cwd=ROOT, stdout=subprocess.DEVNULL)
    while True:
        if child.poll() is not None:
            raise SystemExit(f"serve exited with {child.returncode} before answering")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return child, port, time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.2)


def _stop(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGINT)
    try:
        child.wait(60)
    except subprocess.TimeoutExpired:
        child.kill()


def stage_serve(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from bench_serve import load

    index = workdir / ("gallery-5k" if args.stage == "serve-5k" else "gallery")
    extra = ["--captions", str(workdir / "dataset_coco.json"), "--split", "test"] if args.stage == "serve-5k" else []
    queries = text_queries(41, seed=6)
    first, port, start_seconds = _serve(workdir, index, extra)
    try:
        outcome = asyncio.run(load(port, queries, 10, 1, 600))
        if not outcome["latencies"]:
            raise SystemExit(f"no search was answered: {outcome['failures']}")
        ms = 1000 * np.asarray(outcome["latencies"])
        anon, file = _rss_parts(first.pid)
        figures = {"start_seconds": start_seconds, "p50_ms": float(np.percentile(ms, 50)),
                   "p95_ms": float(np.percentile(ms, 95)), "rss_anon": anon, "rss_file": file}
        note = (f"ready in {start_seconds:.1f} s; p50 {figures['p50_ms']:.0f} ms, p95 {figures['p95_ms']:.0f} ms; "
                f"anonymous RSS {anon / 2**30:.2f} GiB, file-backed {file / 2**30:.2f} GiB")
        if args.stage == "serve":  # a second server on the same encoded gallery
            second, port2, start2 = _serve(workdir, index, extra)
            try:
                both = [asyncio.run(load(p, queries[:11], 10, 1, 600)) for p in (port, port2)]
                anon2, file2 = _rss_parts(second.pid)
                figures["second"] = {"start_seconds": start2, "answered": [len(b["latencies"]) for b in both],
                                     "p50_ms": float(np.percentile(1000 * np.asarray(both[1]["latencies"]), 50)),
                                     "rss_anon": anon2, "rss_file": file2}
                note += (f"; a second server on the same gallery: ready in {start2:.1f} s, both answered "
                         f"{' and '.join(str(n) for n in figures['second']['answered'])} searches, its anonymous RSS "
                         f"{anon2 / 2**30:.2f} GiB")
            finally:
                _stop(second)
    finally:
        _stop(first)
    return {**figures, "note": note}


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_parts(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a process, bytes."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return tuple(int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssFile"))  # type: ignore[return-value]


STAGE_FUNCTIONS = {"vocab": stage_vocab, "open-train": stage_open_train, "train-step": stage_train_step,
                   "checksum": stage_checksum, "eval-exact": stage_eval_exact, "eval-two-stage": stage_eval_two_stage,
                   "eval-multiquery": stage_eval_multiquery, "index": stage_index, "index-5k": stage_index,
                   "index-recall": stage_index_recall, "search": stage_search, "serve": stage_serve,
                   "serve-5k": stage_serve}


# --------------------------------------------------------------------------- the parent


def run_stage(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    """A stage in a child process: its figures, wall time, peak RSS and the disk it wrote."""
    before = directory_bytes(args.workdir)
    command = [sys.executable, __file__, "--child", stage, "--workdir", str(args.workdir),
               "--exact-images", str(args.exact_images), "--eval-shortlist", str(args.eval_shortlist),
               "--mq-sets", str(args.mq_sets), "--train-steps", str(args.train_steps),
               "--loader-batches", str(args.loader_batches), "--shortlist", str(args.shortlist)]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    lines = [line for line in output.splitlines() if line.startswith(RESULT)]
    if os.waitstatus_to_exitcode(status) != 0 or not lines:
        return {"stage": stage, "failed": os.waitstatus_to_exitcode(status), "seconds": wall}
    figures = json.loads(lines[-1][len(RESULT):])
    return {"stage": stage, "seconds": wall, "peak_rss": usage.ru_maxrss * 1024,
            "disk": max(0, directory_bytes(args.workdir) - before), **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the generated data and outputs live")
    parser.add_argument("--images", type=int, default=COCO["images"], help="images generated (MSCOCO's count)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    parser.add_argument("--exact-images", type=int, default=40, help="test images exact scoring is timed on")
    parser.add_argument("--eval-shortlist", type=int, default=10, help="K of the two-stage evaluation")
    parser.add_argument("--mq-sets", type=int, default=50, help="test query sets the multi-query rate is timed on")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps (after a first one)")
    parser.add_argument("--loader-batches", type=int, default=50, help="batches the loader rate is timed on")
    parser.add_argument("--shortlist", type=int, default=200, help="the search stage's shortlist")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.stage = args.child
        print(RESULT + json.dumps(STAGE_FUNCTIONS[args.child](args.workdir, args)), flush=True)
        return
    log = lambda line: print(line, flush=True)  # noqa: E731
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    log(f"generating {args.images:,} images into {args.workdir} (reused when there) …")
    facts = generate(args.workdir, args.images, log)
    log(f"  {facts['images']:,} images, {facts['features_bytes'] / 2**30:.1f} GiB of shards "
        f"({facts['shard_seconds']:.0f} s), captions and queries ({facts['text_seconds']:.0f} s)")
    rows = []
    for stage in stages:
        if stage not in ("vocab",) and not (args.workdir / "vocab.json").exists():
            rows.append(run_stage("vocab", args))
        if stage not in ("vocab", "open-train", "checksum"):
            checkpoints(args.workdir)
        if stage == "serve-5k" and not (args.workdir / "gallery-5k").exists():
            rows.append(run_stage("index-5k", args))
        if stage in ("index-recall", "search", "serve") and not (args.workdir / "gallery").exists():
            rows.append(run_stage("index", args))
        row = run_stage(stage, args)
        rows.append(row)
        log(line(row))
    log(f"\n{'stage':16} {'wall':>9} {'peak RSS':>9} {'disk':>9}  figures")
    for row in rows:
        log(line(row))
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "benchmark": "scale", "cpu": cpu_name(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
              "generated": facts, "stages": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def line(row: dict[str, Any]) -> str:
    if "failed" in row:
        return f"{row['stage']:16} {row['seconds']:8.1f}s  failed (exit {row['failed']})"
    return (f"{row['stage']:16} {row['seconds']:8.1f}s {row['peak_rss'] / 2**30:8.2f}G {row['disk'] / 2**30:8.2f}G  "
            f"{row.get('note', '')}")


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
