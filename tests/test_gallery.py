"""Encoded galleries on disk: built once, read row by row, refused when stale, safe on a full disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.shards import FeatureStore
from matching import checkpoint
from matching.retrieval.gallery import EncodedGallery, SearchIndexError, build_gallery, index_kind_for, open_gallery
from matching.retrieval.scoring import StoreImages, encode_images

ROOT = Path(__file__).resolve().parent.parent


def test_a_built_gallery_reads_back_what_the_model_computes(trained_toy, tmp_path):
    features, _, _, ckpt, _ = trained_toy
    model, _, _ = checkpoint.load(ckpt)
    store = FeatureStore(features)
    ids = store.image_ids[:40]
    with torch.inference_mode():
        direct = encode_images(model, StoreImages(store, ids), torch.device("cpu"))
    exact = build_gallery(model, ckpt, store, ids, tmp_path / "g32", device=torch.device("cpu"), dtype="float32",
                          batch_size=16)
    half = build_gallery(model, ckpt, store, ids, tmp_path / "g16", device=torch.device("cpu"), batch_size=16)
    assert exact.built and len(exact) == 40 and exact.image_ids == ids
    rows = [3, 39, 0, 17]
    got = exact.select(rows)
    assert torch.equal(got.local, direct.local[rows]) and torch.equal(got.mask, direct.mask[rows])
    assert torch.equal(got.glob, direct.glob[rows])
    np.testing.assert_allclose(half.select(rows).local.numpy(), direct.local[rows].numpy(), atol=2e-3)
    for position in (0, 17):
        boxes, size = exact.display(position)
        _, expected_boxes, count, expected_size = store.get(ids[position])
        np.testing.assert_array_equal(boxes, expected_boxes)
        assert len(boxes) == count and size == expected_size
    with torch.inference_mode():
        vectors = torch.nn.functional.normalize(model.image_vectors(direct), dim=1).numpy()
    cosines, nearest = exact.nearest(vectors[:2], 5)
    assert list(nearest[:, 0]) == [0, 1] and np.allclose(cosines[:, 0], 1, atol=1e-5)  # each finds itself first
    reopened = open_gallery(tmp_path / "g32", model, ckpt, store, ids)
    assert not reopened.built and torch.equal(reopened.select(rows).local, got.local)


def test_stale_foreign_and_old_galleries_are_refused_with_what_to_do(trained_toy, tmp_path):
    features, _, _, ckpt, _ = trained_toy
    model, _, _ = checkpoint.load(ckpt)
    store = FeatureStore(features)
    ids = store.image_ids[:20]
    build_gallery(model, ckpt, store, ids, tmp_path / "g", device=torch.device("cpu"))
    with pytest.raises(SearchIndexError, match="built for another gallery; rebuild it with --rebuild-index"):
        open_gallery(tmp_path / "g", model, ckpt, store, ids[:10])
    other = tmp_path / "other.pt"
    other.write_bytes(Path(ckpt).read_bytes() + b"\0")
    with pytest.raises(SearchIndexError, match="built for another checkpoint"):
        open_gallery(tmp_path / "g", model, other, store, ids)
    old = tmp_path / "old.idx"
    old.write_bytes(b"a search index file of tshsr-pipe 0.1")
    with pytest.raises(SearchIndexError, match="older tshsr-pipe; rebuild it with --rebuild-index"):
        open_gallery(old, model, ckpt, store, ids)
    meta = json.loads((tmp_path / "g" / "gallery.json").read_text())
    (tmp_path / "g" / "gallery.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(SearchIndexError, match="newer than this tshsr-pipe reads"):
        open_gallery(tmp_path / "g", model, ckpt, store, ids)
    rebuilt = open_gallery(old, model, ckpt, store, ids, rebuild=True)  # the old file is replaced by a gallery
    assert rebuilt.built and old.is_dir() and open_gallery(old, model, ckpt, store, ids).image_ids == ids


def test_the_first_stage_index_follows_the_gallery_size():
    assert index_kind_for(123_287) == "flat"  # MSCOCO: exact; approximate indexes lost most of its top 200
    assert index_kind_for(1_000_000) == "flat" and index_kind_for(1_000_001) == "hnsw"
    assert index_kind_for(123_287, "ivf") == "ivf" and index_kind_for(10, "hnsw") == "hnsw"
    with pytest.raises(SearchIndexError, match="unknown index kind"):
        index_kind_for(10, "lsh")


def test_a_full_disk_is_one_line_naming_the_gallery_and_leaves_nothing(trained_toy, tmp_path):
    from click.testing import CliRunner

    from pipelines.cli import cli
    from tests.smallfs import small_filesystem

    features, _, _, ckpt, _ = trained_toy
    with small_filesystem(tmp_path / "small", megabytes=1) as mount:
        result = CliRunner().invoke(cli, ["index", "--checkpoint", str(ckpt), "--features", str(features),
                                          "--out", str(mount / "gallery"), "--dtype", "float32", "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert f"Error: {mount / 'gallery'}: the encoded gallery needs" in result.output
        assert "Traceback" not in result.output and list(mount.iterdir()) == []


def test_the_engine_keeps_answering_when_the_shards_change_under_it(trained_toy, tmp_path):
    """Everything a search needs is in the encoded gallery: shards replaced under a running server do not matter."""
    import shutil

    from matching.config import EvaluationSettings
    from matching.retrieval.search import SearchEngine

    features, captions, _, ckpt, _ = trained_toy
    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    engine = SearchEngine.open(ckpt, copy, index_path=tmp_path / "g", device="cpu",
                               settings=EvaluationSettings(split=None, shortlist=0))
    before = engine.search_text("a red circle", 5)
    for shard in copy.glob("shard-*.h5"):
        shard.write_bytes(b"replaced")  # a re-extraction, or damage
    after = engine.search_text("a red circle", 5)
    assert [(h.item, h.score, h.regions) for h in after.hits] == [(h.item, h.score, h.regions) for h in before.hits]


RESIDENT = textwrap.dedent("""
    import sys, torch
    from matching import checkpoint
    from matching.config import EvaluationSettings
    from matching.retrieval.search import SearchEngine

    def anonymous():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

    def search():
        engine = SearchEngine.open(sys.argv[1], sys.argv[2], index_path=sys.argv[3], device="cpu",
                                   settings=EvaluationSettings(split=None, shortlist=50))
        for query in ("a red circle", "a blue square and a green star", "a yellow cross"):
            engine.search_text(query, 10)
        return engine

    first = search()  # the first engine pays for what any process pays once: imports, torch's kernels, caches
    before = anonymous()
    engine = search()
    print(anonymous() - before)
""")


def test_resident_memory_does_not_grow_with_the_gallery(tmp_path):
    """Galleries of 600 and 2,400 images (36 regions, d = 256): a search engine's anonymous memory grows by
    about the first stage's vectors only (1,800 × 256 floats, 1.8 MB), far less than the regions it leaves on
    the disk (1,800 × 36 × 256 half floats, 33 MB).

    The engine is measured in a process that has already opened one (imports, kernels and caches paid for), with
    glibc's mmap threshold fixed: left dynamic, it moved the process's total by ±5 MB from run to run."""
    from matching.config import Config
    from matching.data.text import Vocabulary
    from matching.model.tshsr import build_model
    from pipelines.synthetic import make_scenes, write_feature_dataset

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc/self/status to read a process's anonymous memory")
    vocab = Vocabulary.build(["a red circle", "a blue square and a green star", "a yellow cross"], threshold=1)
    config = Config().updated(model={"embed_size": 256, "sim_dim": 32, "word_dim": 32, "img_dim": 32,
                                     "num_regions": 36, "vocab_size": len(vocab)})
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "m.pt", build_model(config.model), config, vocab)
    memory = {}
    for images in (600, 2400):
        features = write_feature_dataset(tmp_path / f"f{images}", make_scenes(images, seed=3), feature_dim=32,
                                         max_boxes=36, seed=3)
        model, _, _ = checkpoint.load(tmp_path / "m.pt")
        store = FeatureStore(features)
        build_gallery(model, tmp_path / "m.pt", store, store.image_ids, tmp_path / f"g{images}",
                      device=torch.device("cpu"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
        result = subprocess.run([sys.executable, "-c", RESIDENT, str(tmp_path / "m.pt"), str(features),
                                 str(tmp_path / f"g{images}")], capture_output=True, text=True, timeout=600, env=env,
                                cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        memory[images] = int(result.stdout.split()[-1])
    regions_left_on_disk = 1800 * 36 * 256 * 2
    assert memory[2400] - memory[600] < regions_left_on_disk / 3, memory
    assert EncodedGallery.open(tmp_path / "g2400").meta["dtype"] == "float16"
