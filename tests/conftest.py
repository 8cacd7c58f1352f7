"""Shared fixtures: tiny models with random weights, generated features, captions and shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matching.config import ModelConfig
from matching.model.tshsr import build_model

pytest_plugins = ["tests.extract_fixtures"]  # the extractor's fixtures (random weights) for every test

TINY = {"vocab_size": 40, "img_dim": 24, "num_regions": 7, "word_dim": 10, "embed_size": 16, "sim_dim": 8}


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine weights."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(tiny_config(**overrides))
    randomize_batchnorm(model, seed)
    return model.eval()


def random_images(n: int, k: int, dim: int, seed: int = 0, min_boxes: int = 2):
    rng = np.random.default_rng(seed)
    num_boxes = rng.integers(min_boxes, k + 1, size=n)
    features = np.zeros((n, k, dim), np.float32)
    for i, count in enumerate(num_boxes):
        features[i, :count] = np.abs(rng.normal(size=(count, dim)))  # ReLU features, like a detector's
    return features, num_boxes


def random_captions(n: int, vocab_size: int, seed: int = 0, max_words: int = 9):
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(4, vocab_size, size=rng.integers(1, max_words)).tolist(), 2] for _ in range(n)]


@pytest.fixture
def tmp_features(tmp_path):
    """A small feature directory written with ShardWriter: (directory, ids, features, num_boxes)."""
    from extract.shards import RegionRecord, ShardWriter

    features, num_boxes = random_images(6, TINY["num_regions"], TINY["img_dim"], seed=3)
    ids = [f"img{i}.jpg" for i in range(6)]
    directory = tmp_path / "features"
    for part in (range(0, 4), range(4, 6)):
        writer = ShardWriter(directory, max_boxes=TINY["num_regions"], feature_dim=TINY["img_dim"],
                             dtype="float32")
        for i in part:
            k = int(num_boxes[i])
            boxes = np.tile(np.array([0, 0, 10, 10], np.float32), (k, 1))
            writer.add(RegionRecord(ids[i], features[i, :k], boxes, (20, 30)))
        writer.commit()
    return directory, ids, features, num_boxes


SMALL_MODEL = {"embed_size": 64, "sim_dim": 32, "word_dim": 32}


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The synthetic shapes set as features: (feature dir, captions.jsonl, vocab.json)."""
    from matching.data.captions import read_captions
    from matching.data.text import Vocabulary
    from pipelines.synthetic import make_scenes, write_feature_dataset

    root = tmp_path_factory.mktemp("toy")
    features = write_feature_dataset(root / "features", make_scenes(150, seed=1), feature_dim=32, seed=1)
    captions = features / "captions.jsonl"
    Vocabulary.build((c.text for c in read_captions(captions, ["train", "val"])), threshold=1).save(root / "v.json")
    return features, captions, root / "v.json"


def toy_config(**train):
    from matching.config import Config

    return Config().updated(model=SMALL_MODEL, train={"batch_size": 24, "workers": 0, "learning_rate": 3e-3,
                                                      "warmup_epochs": 3, "checkpoint_every": 0, **train})


@pytest.fixture(scope="session")
def trained_toy(toy, tmp_path_factory):
    """A model trained on the toy set (4 epochs, ~10 s): (features, captions, vocab, model_best.pt, result)."""
    from matching.training.loop import train

    features, captions, vocab = toy
    run = tmp_path_factory.mktemp("trained") / "run"
    result = train(toy_config(epochs=4, warmup_epochs=4), features=features, captions=captions, vocab_path=vocab,
                   run_dir=run, progress=False, log=lambda line: None)
    return features, captions, vocab, run / "model_best.pt", result


@pytest.fixture(scope="session")
def trained_multiquery(tmp_path_factory):
    """The multi-query demo's trained HMRN (400 generated scenes, 8 epochs, ~40 s): run_demo's outcome."""
    from pipelines.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("mq") / "demo", task="multi-query", device="cpu", log=lambda line: None,
                    progress=False)
