"""torchrun on CPU (gloo, loopback): 2 processes train and evaluate exactly like one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from matching.config import Config
from matching.data.text import Vocabulary
from matching.model.tshsr import build_model
from matching.retrieval.scoring import ImageArrays, score_matrix
from matching.training.loop import train
from tests.conftest import random_captions, random_images, toy_config

GRADIENT_FREE = ("image_encoder.pool.global_proj.0.bias",  # followed by a batch norm…
                 "image_encoder.pool.global_proj.1.running_mean",  # …whose running mean tracks that bias
                 "pool.score.bias",  # a softmax over regions / words
                 "psi.bias")  # a per-row constant in the relation matrix's softmax

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipelines.cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_processes_train_like_one_with_the_global_batch(toy, tmp_path):
    features, captions, vocab = toy
    common = {"learning_rate": 1e-3, "warmup_epochs": 0, "seed": 3}
    # dropout off: the two processes draw their masks from two RNG streams, one process from one
    single = train(toy_config(batch_size=24, **common).updated(model={"dropout": 0.0}), features=features,
                   captions=captions, vocab_path=vocab, run_dir=tmp_path / "one", max_steps=4, progress=False,
                   log=lambda line: None)
    result = torchrun("train", "--features", str(features), "--captions", str(captions), "--vocab", str(vocab),
                      "--runs", str(tmp_path), "--name", "two", "--embed-size", "64", "--sim-dim", "32",
                      "--word-dim", "32", "--batch-size", "12", "--lr", "1e-3", "--warmup-epochs", "0", "--seed", "3",
                      "--workers", "0", "--max-steps", "4", "--set", "model.dropout=0")
    assert "2 processes × batch 12 = global batch 24" in result.stdout
    one = torch.load(tmp_path / "one" / "checkpoint_last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint_last.pt", weights_only=True)
    assert two["progress"]["global_step"] == single.global_step == 4
    assert two["progress"]["epoch_loss"] == pytest.approx(one["progress"]["epoch_loss"], rel=1e-5)
    parts = one["progress"]["epoch_parts"]  # the first-stage head's InfoNCE over the global batch, too
    assert two["progress"]["epoch_parts"]["first_stage_loss"] == pytest.approx(parts["first_stage_loss"], rel=1e-5)
    # Biases whose gradient is zero by construction (they add a constant under a softmax or a batch
    # norm) move by Adam's normalised rounding noise: ±lr whatever the run. Every other weight agrees.
    free = [k for k in one["model"] if k.endswith(GRADIENT_FREE)]
    assert len(free) == 7, free  # 2 pooling scores, a pre-BN bias and its running mean, 3 layers × psi
    gaps = sorted((float((one["model"][k].float() - two["model"][k].float()).abs().max()), k)
                  for k in one["model"] if k not in free and not k.startswith("first_stage."))
    assert gaps[-1][0] < 2e-5, gaps[-5:]
    # The head's InfoNCE divides its cosines by a temperature of 0.05, so rounding differences of the two
    # processes' sums reach its weights 20 times larger; a missing share of its gradient would move them by ~lr.
    head_gaps = sorted((float((one["model"][k].float() - two["model"][k].float()).abs().max()), k)
                       for k in one["model"] if k.startswith("first_stage."))
    assert head_gaps and head_gaps[-1][0] < 2e-4, head_gaps[-5:]
    # …and the free biases do not change what the models compute.
    model_one, model_two = build_model(tiny := Config.from_dict(one["config"]).model), build_model(tiny)
    model_one.load_state_dict(one["model"])
    model_two.load_state_dict(two["model"])
    features_, num_boxes = random_images(5, tiny.num_regions, tiny.img_dim, seed=4)
    captions_ = random_captions(7, tiny.vocab_size, seed=5)
    np.testing.assert_allclose(score_matrix(model_one, ImageArrays(features_, num_boxes), captions_),
                               score_matrix(model_two, ImageArrays(features_, num_boxes), captions_), atol=1e-5)
    # Only rank 0 wrote: one event file, each log line once, both RNG streams saved by rank 0.
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert [f for f in files if not f.startswith("events")] == ["checkpoint_last.pt", "config.yaml", "train.log"]
    assert len([f for f in files if f.startswith("events")]) == 1
    lines = [line.split(" ", 2)[2] for line in (tmp_path / "two" / "train.log").read_text().splitlines()]
    assert len(lines) == len(set(lines)) and len(two["rng"]["ranks"]) == 2


def test_two_process_evaluation_equals_one(trained_toy, tmp_path):
    features, captions, _, ckpt, _ = trained_toy
    args = ["evaluate", "--checkpoint", str(ckpt), "--features", str(features), "--captions", str(captions),
            "--split", "test"]
    single = subprocess.run([sys.executable, "-m", "pipelines.cli", *args, "--json", str(tmp_path / "one.json"),
                             "--save-sims", str(tmp_path / "one.npy")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    result = torchrun(*args, "--json", str(tmp_path / "two.json"), "--save-sims", str(tmp_path / "two.npy"))
    assert result.stdout.count("15 images, 75 captions") == 1, result.stdout  # rank 0 alone reports
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"), atol=1e-6)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("one", "two"))
    assert one == two


def test_two_processes_train_hmrn_like_one_with_the_global_batch(tmp_path):
    """The multi-query task under torchrun: each process's InfoNCE share sums to the global batch's loss."""
    from matching.data.queries import read_query_sets
    from matching.data.vocabulary import build_vocabulary
    from matching.model.hmrn import score_rounds
    from pipelines.synthetic import make_multiquery_scenes, write_multiquery_dataset

    features = write_multiquery_dataset(tmp_path / "f", make_multiquery_scenes(120, objects_per_scene=4, seed=3),
                                        seed=3)
    queries = features / "queries.jsonl"
    build_vocabulary(queries, tmp_path / "v.json", threshold=1)
    model = {"embed_size": 16, "sim_dim": 8, "word_dim": 8, "max_turns": 4, "dropout": 0.0}
    recipe = {"learning_rate": 1e-3, "seed": 3, "workers": 0, "checkpoint_every": 0}
    single = train(Config.default("multi-query").updated(model=model, train={**recipe, "batch_size": 24}),
                   features=features, captions=queries, vocab_path=tmp_path / "v.json", run_dir=tmp_path / "one",
                   max_steps=4, device="cpu", progress=False, log=lambda line: None)
    sets = [f"model.{k}={v}" for k, v in model.items()]
    torchrun("train", "--task", "multi-query", "--features", str(features), "--captions", str(queries), "--vocab",
             str(tmp_path / "v.json"), "--runs", str(tmp_path), "--name", "two", "--batch-size", "12", "--lr", "1e-3",
             "--seed", "3", "--workers", "0", "--max-steps", "4", "--device", "cpu",
             *[arg for item in sets for arg in ("--set", item)])
    one = torch.load(tmp_path / "one" / "checkpoint_last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint_last.pt", weights_only=True)
    assert two["progress"]["global_step"] == single.global_step == 4
    assert two["progress"]["epoch_loss"] == pytest.approx(one["progress"]["epoch_loss"], rel=1e-5)
    # As for the matching model, biases whose gradient is zero by construction (under a softmax, before a
    # batch norm, the SGR edges' key bias) move by Adam's normalised rounding noise, as does the reasoning
    # read-out's bias (it shifts every candidate's sigmoid alike, so InfoNCE's softmax nearly cancels its
    # gradient); every other weight agrees…
    free = ("pool.score.bias", "global_proj.0.bias", "global_proj.1.running_mean", "key.bias", "reasoning.score.bias")
    gaps = sorted((float((one["model"][k].float() - two["model"][k].float()).abs().max()), k)
                  for k in one["model"] if not k.endswith(free))
    assert gaps[-1][0] < 2e-5, gaps[-5:]
    # …and with those biases taken from the single process, the two models score alike.
    from matching import checkpoint as ckpt

    models = []
    for payload in (one, two):
        network = ckpt.build_network(Config.from_dict(payload["config"]))
        network.load_state_dict({k: one["model"][k] if k.endswith(free) else v for k, v in payload["model"].items()})
        models.append(network.eval())
    vocab = Vocabulary(one["vocab"])
    wrap = Config.from_dict(one["config"]).model.query_wrap  # the queries as the models read them
    test = [[vocab.encode(q, wrap) for q in s.queries] for s in read_query_sets(queries, "test")]
    from extract.shards import FeatureStore
    from matching.retrieval.scoring import StoreImages

    store = FeatureStore(features)
    images = StoreImages(store, [s.image_id for s in read_query_sets(queries, "test")])
    # The weights agree to 2e-5 (above), so a score, a sum over many of them, to a few times that; a process
    # missing the other's gradient would move the scores by 1e-3 and more.
    np.testing.assert_allclose(score_rounds(models[0], images, test), score_rounds(models[1], images, test),
                               atol=5e-5)


def test_two_processes_encode_a_gallery_like_one(trained_toy, tmp_path):
    """`tshsr-pipe index` under torchrun: each process encodes its share into a part, rank 0 merges; the gallery
    reads back what one process writes."""
    from matching.retrieval.gallery import EncodedGallery

    features, _, _, ckpt, _ = trained_toy
    common = ["--checkpoint", str(ckpt), "--features", str(features), "--dtype", "float32", "--device", "cpu"]
    torchrun("index", *common, "--out", str(tmp_path / "two"))
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "index", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = EncodedGallery.open(tmp_path / "one"), EncodedGallery.open(tmp_path / "two")
    assert [p["num_images"] for p in two.meta["parts"]] == [75, 75] and len(one.meta["parts"]) == 1
    assert one.image_ids == two.image_ids and len(one) == 150
    rows = list(range(0, 150, 7))
    for name in ("local", "glob", "vectors", "num_boxes", "boxes", "sizes"):
        np.testing.assert_allclose(one.take(name, rows), two.take(name, rows), atol=1e-6)
    assert not list(tmp_path.glob(".*parts*"))  # the staging parts were moved in
