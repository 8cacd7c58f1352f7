"""SCAN precomp import: values equal the source arrays, both image layouts, ids, errors, no partial shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from extract.shards import FeatureStore, ShardFormatError
from matching.data.captions import CaptionFormatError, read_captions
from matching.importers.precomp import import_precomp
from pipelines.cli import cli


def write_split(directory, split, n_images, cpi=5, k=4, dim=6, repeated=False, ids=None, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, k, dim)).astype(np.float32)
    stored = np.repeat(images, cpi, axis=0) if repeated else images
    np.save(directory / f"{split}_ims.npy", stored)
    captions = [f"{split} image {i} caption {c}" for i in range(n_images) for c in range(cpi)]
    (directory / f"{split}_caps.txt").write_bytes(("\n".join(captions) + "\n").encode())
    if ids is not None:
        (directory / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
    return images, captions


def test_import_equals_the_source_arrays(tmp_path):
    src = tmp_path / "precomp"
    src.mkdir()
    train, _ = write_split(src, "train", 7, seed=1)
    dev, _ = write_split(src, "dev", 3, repeated=True, seed=2)
    test_ids = ["391895", "522418"]
    test, test_caps = write_split(src, "test", 2, ids=[i for i in test_ids for _ in range(5)], seed=3)
    counts = import_precomp(src, tmp_path / "out", shard_size=3, dtype="float32")
    assert counts == {"train": 7, "val": 3, "test": 2}
    store = FeatureStore(tmp_path / "out")
    assert len(store) == 12 and len(store.manifest.shards) == 3 + 1 + 1  # each split in shards of its own
    for i in range(7):
        np.testing.assert_array_equal(store.get(f"train/{i}")[0], train[i])
    for i in range(3):
        np.testing.assert_array_equal(store.get(f"dev/{i}")[0], dev[i])
    np.testing.assert_array_equal(store.get("522418")[0], test[1])
    captions = read_captions(tmp_path / "out" / "captions.jsonl", "test")
    assert [c.text for c in captions] == test_caps and captions[5].image_id == "522418"
    assert {c.split for c in read_captions(tmp_path / "out" / "captions.jsonl")} == {"train", "val", "test"}


def test_float16_default_and_rerun_is_a_no_op(tmp_path):
    src = tmp_path / "p"
    src.mkdir()
    images, _ = write_split(src, "test", 4)
    import_precomp(src, tmp_path / "out")
    store = FeatureStore(tmp_path / "out")
    np.testing.assert_allclose(store.get("test/2")[0], images[2], rtol=1e-3, atol=1e-3)
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    import_precomp(src, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert len(FeatureStore(tmp_path / "out").manifest.shards) == 1


@pytest.mark.parametrize("breakage,error,message", [
    ("count", CaptionFormatError, "13 captions for 3 images"),
    ("empty", CaptionFormatError, "test_caps.txt:4: empty caption"),
    ("latin1", CaptionFormatError, "test_caps.txt:2: not valid UTF-8"),
    ("ids", CaptionFormatError, "test_ids.txt: 2 ids for 3 images"),
    ("shape", ShardFormatError, "expected \\(images, regions, features\\)"),
])
def test_bad_inputs_write_nothing(tmp_path, breakage, error, message):
    src = tmp_path / "p"
    src.mkdir()
    write_split(src, "train", 5)  # a good split first: it must not be written either
    write_split(src, "test", 3)
    caps = src / "test_caps.txt"
    if breakage == "count":
        caps.write_text("\n".join(caps.read_text().splitlines()[:13]) + "\n")
    elif breakage == "empty":
        lines = caps.read_text().splitlines()
        lines[3] = "   "
        caps.write_text("\n".join(lines) + "\n")
    elif breakage == "latin1":
        caps.write_bytes(b"ok\ncaf\xe9\n" + b"x\n" * 13)
    elif breakage == "ids":
        (src / "test_ids.txt").write_text("1\n2\n")
    elif breakage == "shape":
        np.save(src / "test_ims.npy", np.zeros((3, 8), np.float32))
    with pytest.raises(error, match=message):
        import_precomp(src, tmp_path / "out")
    out = tmp_path / "out"
    assert not out.exists() or not list(out.glob("shard*"))


def test_import_precomp_command(tmp_path):
    src = tmp_path / "p"
    src.mkdir()
    write_split(src, "testall", 2)
    result = CliRunner().invoke(cli, ["import-precomp", str(src), "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert "testall: 2 images" in result.output
    first = json.loads((tmp_path / "f" / "captions.jsonl").read_text().splitlines()[0])
    assert first == {"image_id": "testall/0", "caption": "testall image 0 caption 0", "split": "testall"}
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["import-precomp", str(tmp_path / "empty"), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "no {split}_ims.npy files" in result.output
