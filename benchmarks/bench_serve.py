"""`tshsr-pipe serve` under load: text → image latency over HTTP against exact scoring in-process.

A gallery of generated images in the real shard format (random region features at the
paper's sizes: 2048-d features, 10–36 boxes an image, float16) and a checkpoint of a random
model at the paper's sizes (d = 1024, m = 256, word_dim = 300, M = 3 reasoning layers, a
10,000-word vocabulary) are written once into --workdir and reused. Then, in one run:

1. the baseline: the engine in this process (`SearchEngine.search_text`), one query after
   another: exact scoring of the whole gallery per query, no HTTP, no queue;
2. for each ranker in --rankers (`exact`: every image scored; `shortlist`: the --shortlist
   images nearest by first-stage cosine re-scored, two-stage search): a real uvicorn
   server in a child process on 127.0.0.1, loaded by a bounded generator (--requests
   requests at each --concurrency level, nothing new after --time-cap seconds) with httpx.
   The model runs one request at a time, so above concurrency 1 a request's latency adds
   the time it waits in the queue; requests/s is what the server sustains. The server reads
   the gallery from an encoded gallery on disk (`--index`, built once in --workdir), as
   `serve --index` does.

Printed: p50/p95 latency, requests/s and the ratio of each served p50 to the baseline's.
The machine's load average is recorded beside the figures (they drift on a shared machine).
A JSON line (date, device, threads, sizes, figures) is appended to
benchmarks/results/bench_serve.jsonl. Only loopback traffic; the child server is stopped.

    python benchmarks/bench_serve.py [--images 5000] [--requests 12] [--concurrency 1,4] [--time-cap 240]
                                     [--rankers exact,shortlist] [--shortlist 200]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "bench_serve.jsonl"
SIZES = {"img_dim": 2048, "num_regions": 36, "min_boxes": 10, "embed_size": 1024, "sim_dim": 256, "word_dim": 300,
         "vocab_words": 10_000, "query_words": (6, 14)}


def write_gallery(workdir: Path, images: int, seed: int = 0) -> tuple[Path, Path]:
    """(checkpoint, feature directory) for `images` random images at SIZES; reused when already there."""
    import torch

    from extract.shards import FeatureStore, RegionRecord, ShardWriter
    from matching import checkpoint
    from matching.config import Config, ModelConfig
    from matching.data.text import Vocabulary
    from matching.model.tshsr import build_model

    ckpt, features = workdir / "model.pt", workdir / f"features-{images}"
    if ckpt.exists() and FeatureStore.has_images(features) and len(FeatureStore(features)) == images:
        return ckpt, features
    workdir.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary.build([f"w{i:05d}" for i in range(SIZES["vocab_words"])], threshold=1)
    config = ModelConfig(vocab_size=len(vocab), img_dim=SIZES["img_dim"], num_regions=SIZES["num_regions"],
                         word_dim=SIZES["word_dim"], embed_size=SIZES["embed_size"], sim_dim=SIZES["sim_dim"])
    torch.manual_seed(seed)
    checkpoint.save(ckpt, build_model(config).eval(), Config(model=config), vocab)
    rng = np.random.default_rng(seed)
    k_max, dim = SIZES["num_regions"], SIZES["img_dim"]
    for start in range(0, images, 1000):
        writer = ShardWriter(features, max_boxes=k_max, feature_dim=dim, dtype="float16")
        for i in range(start, min(start + 1000, images)):
            k = int(rng.integers(SIZES["min_boxes"], k_max + 1))
            corner = rng.uniform(0, 400, size=(k, 2))
            boxes = np.concatenate([corner, corner + rng.uniform(20, 240, size=(k, 2))], axis=1).astype(np.float32)
            region = np.maximum(rng.normal(size=(k, dim)), 0).astype(np.float16)  # ReLU features, like a detector's
            writer.add(RegionRecord(f"val/{i:06d}.jpg", region, boxes, (480, 640)))
        writer.commit()
    return ckpt, features


def make_queries(count: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    low, high = SIZES["query_words"]
    return [" ".join(f"w{w:05d}" for w in rng.integers(0, SIZES["vocab_words"], rng.integers(low, high + 1)))
            for _ in range(count)]


def figures(latencies: list[float], wall: float, **extra) -> dict:
    ms = np.asarray(latencies) * 1000
    return {**extra, "requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "per_s": round(len(ms) / wall, 2)}


def in_process(ckpt: Path, features: Path, queries: list[str], k: int, time_cap: float) -> tuple[dict, float]:
    """Exact scoring of the whole gallery per query, no HTTP: (figures, engine start-up seconds).

    The calls run on the server's kind of worker thread, as served requests do: on this shared
    machine torch's CPU kernels run measurably slower from the main thread than from another.
    """
    from matching.config import EvaluationSettings
    from matching.retrieval.search import SearchEngine
    from pipelines.serve.worker import ModelWorker

    engine = SearchEngine.open(ckpt, features, device="cpu", settings=EvaluationSettings(split=None, shortlist=0))
    worker = ModelWorker(1).start()

    def timed(query: str) -> float:
        t0 = time.perf_counter()
        engine.search_text(query, k)
        return time.perf_counter() - t0

    try:
        worker.submit(timed, queries[0]).result()  # warm-up
        latencies, started = [], time.perf_counter()
        for query in queries:
            if time.perf_counter() - started > time_cap:
                break
            latencies.append(worker.submit(timed, query).result())
    finally:
        worker.stop()
    return figures(latencies, time.perf_counter() - started, path="in-process exact", concurrency=1), \
        engine.info.start_seconds


async def load(port: int, queries: list[str], k: int, concurrency: int, time_cap: float) -> dict:
    """A bounded load: every query once, `concurrency` in flight, nothing new after `time_cap` s."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    failures: dict[str, int] = {}
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=time_cap) as client:
        await client.get("/api/search", params={"q": queries[0], "k": k})  # warm-up

        async def one(query: str) -> None:
            async with gate:
                if time.perf_counter() - started > time_cap:
                    return
                t0 = time.perf_counter()
                try:
                    response = await client.get("/api/search", params={"q": query, "k": k})
                    outcome = str(response.status_code)
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                if outcome == "200":
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures[outcome] = failures.get(outcome, 0) + 1

        await asyncio.gather(*(one(q) for q in queries))
    return {"latencies": latencies, "wall": time.perf_counter() - started, "failures": failures}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def served(ckpt: Path, features: Path, index: Path, ranker: str, queries: list[str], k: int, levels: list[int],
           time_cap: float, shortlist: int) -> list[dict]:
    """The figures of a real uvicorn server in a child process with `ranker`, at each concurrency level."""
    import httpx

    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve-child", "--ranker", ranker, "--port", str(port),
                              "--checkpoint", str(ckpt), "--features", str(features), "--index", str(index),
                              "--shortlist", str(shortlist if ranker == "shortlist" else 0),
                              "--queue-size", str(max(32, 2 * max(levels)))])
    try:
        deadline = time.monotonic() + 600
        while True:
            if child.poll() is not None:
                raise SystemExit(f"the server exited with {child.returncode} before answering")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start in 600 s") from None
                time.sleep(0.5)
        outcomes = [(level, asyncio.run(load(port, queries, k, level, time_cap))) for level in levels]
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
    return [{**figures(outcome["latencies"], outcome["wall"], path=f"served {ranker}", concurrency=level),
             "failures": outcome["failures"]} for level, outcome in outcomes]


def serve_child(args: argparse.Namespace) -> None:
    import uvicorn

    from matching.config import EvaluationSettings
    from pipelines.serve.app import Limits, create_app, open_engine
    from pipelines.serve.worker import ModelWorker

    worker = ModelWorker(args.queue_size)
    engine = open_engine(worker, args.checkpoint, args.features, device="cpu", index_path=args.index,
                         settings=EvaluationSettings(split=None, shortlist=args.shortlist))
    app = create_app(engine, limits=Limits(queue_size=args.queue_size), worker=worker)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="gallery size")
    parser.add_argument("--requests", type=int, default=12, help="requests per ranker and concurrency level")
    parser.add_argument("--baseline-queries", type=int, default=4, help="queries of the in-process baseline")
    parser.add_argument("--concurrency", default="1,4", help="requests in flight; comma-separated levels")
    parser.add_argument("--time-cap", type=float, default=240, help="seconds per measurement, at most")
    parser.add_argument("-k", type=int, default=10, help="results per query")
    parser.add_argument("--rankers", default="exact,shortlist", help="comma-separated: exact, shortlist")
    parser.add_argument("--shortlist", type=int, default=200, help="images the shortlist ranker re-scores")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tshsr-bench-serve")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS}")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ranker", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    parser.add_argument("--queue-size", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        return serve_child(args)

    import torch

    rankers = [name.strip() for name in args.rankers.split(",") if name.strip()]
    levels = [int(level) for level in args.concurrency.split(",")]
    unknown = [name for name in rankers if name not in ("exact", "shortlist")]
    if unknown:
        raise SystemExit(f"unknown ranker(s) {', '.join(unknown)}; choose exact, shortlist")
    started = time.perf_counter()
    ckpt, features = write_gallery(args.workdir, args.images)
    index = args.workdir / f"gallery-{args.images}"
    if not (index / "gallery.json").exists():
        from extract.shards import FeatureStore
        from matching import checkpoint
        from matching.retrieval.gallery import build_gallery

        store = FeatureStore(features)
        build_gallery(checkpoint.load(ckpt)[0], ckpt, store, store.image_ids, index, device=torch.device("cpu"))
    print(f"gallery of {args.images} images in {features} ({time.perf_counter() - started:.0f} s); "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    queries = make_queries(max(args.requests, args.baseline_queries))
    baseline, startup = in_process(ckpt, features, queries[:args.baseline_queries], args.k, args.time_cap)
    rows = [baseline]
    for ranker in rankers:
        rows += served(ckpt, features, index, ranker, queries[:args.requests], args.k, levels, args.time_cap,
                       args.shortlist)
    print(f"\ntext → image, k = {args.k}, {args.images} images (engine start-up {startup:.1f} s: "
          "model loaded, gallery encoded)")
    print(f"{'path':<20} {'conc.':>5} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7} {'p50 / baseline':>15}")
    for row in rows:
        print(f"{row['path']:<20} {row['concurrency']:>5} {row['requests']:>8} {row['p50_ms']:>8.1f} "
              f"{row['p95_ms']:>8.1f} {row['per_s']:>7.2f} {row['p50_ms'] / baseline['p50_ms']:>15.2f}"
              + (f"  failures {row['failures']}" if row.get("failures") else ""))
    print("target with the shortlist: p50 ≤ 80 ms on 5,000 images")
    if not args.no_record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": "cpu",
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "threads": torch.get_num_threads(), "load_average": [round(v, 1) for v in os.getloadavg()],
                  "images": args.images, "k": args.k, "shortlist": args.shortlist,
                  "sizes": SIZES, "engine_start_s": round(startup, 1), "rows": rows}
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
