"""Training-loader throughput (pairs/s) from disk and from RAM, against the model's own training speed.

Writes a temporary feature directory in the real shard format (K regions ×
2048-d float16, as the extractor writes), then times:

- the loader reading from the shards, with 0 and N workers;
- the loader reading from RAM (``--in-memory``);
- one training step of the paper's model at the same batch size (the baseline:
  a loader faster than this never keeps training waiting).

Ratios loader/training are printed; absolute numbers drift on a shared machine.

    python benchmarks/bench_loader.py [--images 2000] [--batch-size 128] [--workers 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from extract.shards import FeatureStore, RegionRecord, ShardWriter
from matching.config import Config
from matching.data.captions import Caption
from matching.data.pairs import EpochBatchSampler, PairDataset, build_pairs, collate_pairs
from matching.data.text import Vocabulary
from matching.model.tshsr import build_model
from matching.tasks.matching import train_step


def write_features(directory: Path, images: int, regions: int, dim: int) -> list[str]:
    rng = np.random.default_rng(0)
    ids = [f"img{i:06d}.jpg" for i in range(images)]
    writer = ShardWriter(directory, max_boxes=regions, feature_dim=dim)
    for image_id in ids:
        writer.add(RegionRecord(image_id, rng.random((regions, dim), np.float32),
                                np.zeros((regions, 4), np.float32), (600, 800)))
        if len(writer) == 500:
            writer.commit()
    writer.commit()
    return ids


def loader_rate(dataset: PairDataset, batch_size: int, workers: int, batches: int) -> float:
    sampler = EpochBatchSampler([len(c) for c in dataset.pairs.captions], batch_size, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=workers,
                        persistent_workers=False)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start, pairs = time.perf_counter(), 0
    for _ in range(batches):
        try:
            pairs += len(next(iterator).lengths)
        except StopIteration:
            break
    return pairs / (time.perf_counter() - start)


def training_rate(dataset: PairDataset, config: Config, device: torch.device, steps: int) -> float:
    model = build_model(config.model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate)
    batch = collate_pairs([dataset[i] for i in range(config.train.batch_size)])
    train_step(model, optimizer, batch, config, device, True)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, batch, config, device, True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * config.train.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ids = write_features(Path(tmp), args.images, args.regions, 2048)
        rng = np.random.default_rng(1)
        words = [f"w{i}" for i in range(500)]
        captions = [Caption(i, " ".join(rng.choice(words, size=rng.integers(8, 20))), "train", "bench")
                    for i in ids for _ in range(5)]
        vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *words])
        store = FeatureStore(tmp)
        pairs = build_pairs(captions, store.image_ids, vocab)
        disk = PairDataset(store, pairs)
        loaded = time.perf_counter()
        ram = PairDataset(store, pairs, in_memory=True)
        load_s = time.perf_counter() - loaded
        config = Config().updated(model={"vocab_size": len(vocab), "num_regions": args.regions},
                                  train={"batch_size": args.batch_size})
        device = torch.device(args.device)
        baseline = training_rate(disk, config, device, args.train_steps)
        print(f"{len(pairs)} pairs, {args.images} images × {args.regions} × 2048 float16, batch {args.batch_size}")
        print(f"training step of the paper's model on {device}: {baseline:,.0f} pairs/s  (baseline)")
        for name, dataset, workers in (("disk", disk, 0), ("disk", disk, args.workers), ("RAM", ram, 0),
                                       ("RAM", ram, args.workers)):
            rate = loader_rate(dataset, args.batch_size, workers, args.batches)
            print(f"loader from {name:<4} with {workers} workers: {rate:>9,.0f} pairs/s  "
                  f"= {rate / baseline:6.1f} × training")
        print(f"(loading every image into RAM took {load_s:.1f} s)")


if __name__ == "__main__":
    main()
