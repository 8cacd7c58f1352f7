"""The shard contract (docs/formats.md): layout, atomic commits, manifest, lookup by id, recovery after kills."""

from __future__ import annotations

import json
import os
import socket

import h5py
import numpy as np
import pytest

from extract.safeio import sha256_file
from extract.shards import (
    FeatureStore,
    RegionRecord,
    ShardFormatError,
    ShardWriter,
    adopt_orphan_shards,
    read_manifest,
    remove_stale_partials,
    verify_features,
)


def record(image_id: str, k: int, dim: int = 8, seed: int = 0) -> RegionRecord:
    rng = np.random.default_rng(seed)
    return RegionRecord(image_id, rng.normal(size=(k, dim)).astype(np.float32),
                        rng.uniform(0, 50, size=(k, 4)).astype(np.float32), (60, 80),
                        object_ids=np.arange(k), object_scores=np.full(k, 0.5),
                        attr_ids=np.arange(k), attr_scores=np.full(k, 0.25))


def test_layout_matches_the_contract(tmp_path):
    writer = ShardWriter(tmp_path, max_boxes=5, feature_dim=8, extractor={"model": "test"})
    writer.add(record("a/x.jpg", 5))
    writer.add(record("b.png", 3, seed=1))
    name = writer.commit(failed=[{"path": "bad.jpg", "reason": "truncated"}], settings={"top_k": 5})
    assert name == "shard-00000.h5"
    with h5py.File(tmp_path / name) as handle:
        assert handle["image_ids"].asstr()[:].tolist() == ["a/x.jpg", "b.png"]
        assert handle["features"].dtype == np.float16 and handle["features"].shape == (2, 5, 8)
        assert handle["boxes"].dtype == np.float32 and handle["num_boxes"].dtype == np.int16
        assert handle["num_boxes"][:].tolist() == [5, 3]
        assert handle["image_size"][:].tolist() == [[60, 80], [60, 80]]
        assert not handle["features"][1, 3:].any() and not handle["boxes"][1, 3:].any()
        assert handle["object_ids"].shape == (2, 5) and handle.attrs["format_version"] == 2
        assert json.loads(handle.attrs["extractor"]) == {"model": "test"}
    manifest = read_manifest(tmp_path)
    assert manifest.num_images == 2 and manifest.settings == {"top_k": 5}
    assert manifest.shards[0].sha256 == sha256_file(tmp_path / name)
    assert manifest.failed == [{"path": "bad.jpg", "reason": "truncated"}]
    assert not list(tmp_path.glob("*.partial"))


def test_store_looks_up_ids_across_shards_and_caches_the_index(tmp_path):
    for part in (["i0", "i1"], ["i2"]):
        writer = ShardWriter(tmp_path, max_boxes=4, feature_dim=8, dtype="float32")
        for n, image_id in enumerate(part):
            writer.add(record(image_id, 2 + n, seed=int(image_id[1])))
        writer.commit()
    store = FeatureStore(tmp_path)
    assert store.image_ids == ["i0", "i1", "i2"] and len(store) == 3 and "i2" in store
    features, boxes, k, size = store.get("i2")
    np.testing.assert_array_equal(features, record("i2", 2, seed=2).features)
    assert (k, size) == (2, (60, 80)) and store.locate("i2") == ("shard-00001.h5", 0)
    batch = store.batch(["i2", "i0"])
    assert batch.features.shape == (2, 4, 8) and batch.num_boxes.tolist() == [2, 2]
    assert (tmp_path / "index.json").exists()
    assert FeatureStore(tmp_path).image_ids == store.image_ids  # from the cache
    assert store.verify() == []
    with pytest.raises(KeyError, match="'nope' is not in"):
        store.get("nope")


def test_duplicate_ids_and_corruption_are_reported(tmp_path):
    for _ in range(2):
        writer = ShardWriter(tmp_path, max_boxes=2, feature_dim=8)
        writer.add(record("same", 2))
        writer.commit()
    with pytest.raises(ShardFormatError, match="'same' also in shard-00000.h5"):
        FeatureStore(tmp_path)
    (tmp_path / "shard-00001.h5").unlink()
    with pytest.raises(ShardFormatError, match="shard-00001.h5: shard listed in the manifest is missing"):
        FeatureStore(tmp_path)


def test_checksum_mismatch_is_found_by_verify(tmp_path):
    writer = ShardWriter(tmp_path, max_boxes=2, feature_dim=8)
    writer.add(record("a", 2))
    writer.commit()
    with h5py.File(tmp_path / "shard-00000.h5", "r+") as handle:
        handle["features"][0, 0, 0] = 42
    problems = FeatureStore(tmp_path).verify()
    assert len(problems) == 2 and "does not match the manifest" in problems[0]
    assert problems[1].endswith("shard-00000.h5: 1 images do not match their checksums (first 'a', row 0)")


def test_missing_and_foreign_manifests(tmp_path):
    with pytest.raises(ShardFormatError, match="no such feature directory"):
        read_manifest(tmp_path / "nothing")
    with pytest.raises(ShardFormatError, match="manifest.json: missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ShardFormatError, match="newer than this tshsr-pipe reads"):
        read_manifest(tmp_path)


def test_recovery_after_a_kill_between_rename_and_manifest_update(tmp_path):
    writer = ShardWriter(tmp_path, max_boxes=2, feature_dim=8)
    writer.add(record("a", 2))
    writer.commit()
    # A killed run: a complete shard renamed but not yet in the manifest, a torn one, and partial files.
    writer = ShardWriter(tmp_path, max_boxes=2, feature_dim=8)
    writer.add(record("b", 1))
    writer._write(tmp_path / "shard-00001.h5")
    (tmp_path / "shard-00002.h5").write_bytes(b"\x89HDF torn")
    host = socket.gethostname()
    (tmp_path / f"shard~{host}~999999999~1.h5.partial").write_bytes(b"dead writer")
    (tmp_path / f"shard~{host}~{os.getpid()}~1.h5.partial").write_bytes(b"live writer")
    (tmp_path / "shard~elsewhere~1~1.h5.partial").write_bytes(b"another machine")
    (tmp_path / f".shard~{host}~999999999~2.h5.partial.x1y2.tmp").write_bytes(b"dead writer's temporary file")
    (tmp_path / f".shard~{host}~{os.getpid()}~2.h5.partial.x1y2.tmp").write_bytes(b"live writer's")
    removed = {p.name for p in remove_stale_partials(tmp_path)}
    assert removed == {f"shard~{host}~999999999~1.h5.partial", f".shard~{host}~999999999~2.h5.partial.x1y2.tmp"}
    assert adopt_orphan_shards(tmp_path) == ["shard-00001.h5"]
    assert not (tmp_path / "shard-00002.h5").exists()
    assert FeatureStore(tmp_path).image_ids == ["a", "b"]


def _two_shards(directory, dim: int = 8):
    for part in (["a", "b"], ["c"]):
        writer = ShardWriter(directory, max_boxes=3, feature_dim=dim)
        for n, image_id in enumerate(part):
            writer.add(record(image_id, 2 + n, dim, seed=n))
        writer.commit(failed=[{"path": "bad.jpg", "reason": "truncated"}] if part == ["c"] else ())


def test_the_manifest_records_shard_sizes_and_old_manifests_still_read(tmp_path):
    _two_shards(tmp_path)
    manifest = read_manifest(tmp_path)
    assert [e.num_bytes for e in manifest.shards] == [(tmp_path / e.name).stat().st_size for e in manifest.shards]
    payload = json.loads((tmp_path / "manifest.json").read_text())
    for entry in payload["shards"]:
        del entry["num_bytes"]  # as written before sizes were recorded
    (tmp_path / "manifest.json").write_text(json.dumps(payload))
    assert [e.num_bytes for e in read_manifest(tmp_path).shards] == [None, None]
    assert read_manifest(tmp_path).to_dict()["shards"] == payload["shards"]
    assert FeatureStore(tmp_path).image_ids == ["a", "b", "c"] and verify_features(tmp_path) == []


@pytest.mark.parametrize("sizes_recorded", [True, False])
def test_a_truncated_shard_is_named_when_the_store_opens(tmp_path, sizes_recorded):
    _two_shards(tmp_path)
    FeatureStore(tmp_path).close()  # the index is cached: opening no longer reads the ids
    if not sizes_recorded:
        payload = json.loads((tmp_path / "manifest.json").read_text())
        for entry in payload["shards"]:
            del entry["num_bytes"]
        (tmp_path / "manifest.json").write_text(json.dumps(payload))
    shard = tmp_path / "shard-00001.h5"
    os.truncate(shard, shard.stat().st_size // 2)
    reason = "bytes, the manifest recorded" if sizes_recorded else "not a readable HDF5 shard"
    with pytest.raises(ShardFormatError, match=rf"^{shard}: .*{reason}.*run `tshsr-pipe verify {tmp_path}`"):
        FeatureStore(tmp_path)


def test_a_shard_damaged_during_a_run_is_named_when_read(tmp_path):
    _two_shards(tmp_path)
    store = FeatureStore(tmp_path)  # checked and opened; the shards' files are opened at the first read
    shard = tmp_path / "shard-00001.h5"
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(ShardFormatError, match=rf"^{shard}: reading failed .*tshsr-pipe verify"):
        store.get("c")
    assert store.get("a")[2] == 2  # the other shard still reads


def test_a_layout_against_the_contract_is_refused_at_open(tmp_path):
    _two_shards(tmp_path)
    with h5py.File(tmp_path / "shard-00000.h5", "r+") as handle:
        values = handle["num_boxes"][:]
        del handle["num_boxes"]
        handle.create_dataset("num_boxes", data=values.astype(np.float64))
    payload = json.loads((tmp_path / "manifest.json").read_text())
    payload["shards"][0]["num_bytes"] = (tmp_path / "shard-00000.h5").stat().st_size  # only the layout is wrong
    (tmp_path / "manifest.json").write_text(json.dumps(payload))
    with pytest.raises(ShardFormatError, match="shard-00000.h5: num_boxes is float64 \\(2,\\), expected int16"):
        FeatureStore(tmp_path)


def test_verify_names_every_problem_on_its_own_line(tmp_path):
    _two_shards(tmp_path)
    assert verify_features(tmp_path) == []
    with h5py.File(tmp_path / "shard-00000.h5", "r+") as handle:
        handle["num_boxes"][1] = 7  # more than K = 3
        handle["image_ids"][0] = "c"  # also in shard-00001
    payload = json.loads((tmp_path / "manifest.json").read_text())
    payload["failed"] += [{"path": "c", "reason": "x"}, {"path": "bad.jpg", "reason": "again"}, "junk"]
    payload["shards"][1]["num_images"] = 5
    (tmp_path / "manifest.json").write_text(json.dumps(payload))
    (tmp_path / "shard-00007.h5").write_bytes(b"stray")
    problems = verify_features(tmp_path)
    first, second = tmp_path / "shard-00000.h5", tmp_path / "shard-00001.h5"
    expected = [f"{first}: sha256 ", f"{first}: 1 images have num_boxes outside 0..3 (first 'b': 7)",
                f"{first}: 1 images do not match their checksums (first 'b', row 1)",
                f"{second}: image 'c' also in shard-00000.h5", f"{second}: holds 1 images, the manifest says 5",
                f"{tmp_path / 'shard-00007.h5'}: not in the manifest",
                "failed entry 3 is not {path, reason}", "'c' is listed as failed but stored in shard-00000.h5",
                "'bad.jpg' is listed as failed twice"]
    for text in expected:
        assert sum(text in problem for problem in problems) == 1, (text, problems)
    assert len(problems) == len(expected) and all("\n" not in problem for problem in problems)
    (tmp_path / "shard-00001.h5").unlink()
    assert any(f"{second}: shard listed in the manifest is missing" == p for p in verify_features(tmp_path))
    assert verify_features(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'}: no such feature directory"]


@pytest.mark.parametrize("importer", ["precomp", "drilldown"])
def test_both_importers_continue_what_a_killed_run_left(tmp_path, importer):
    """The importers' one loop (`import_shards`): a killed run's partial file is removed, a shard it renamed but
    did not record is adopted (its images are not written again), and the rest is imported."""
    import json
    import os
    import socket

    from extract.drilldown import import_drilldown_features
    from matching.importers.precomp import import_precomp
    from tests.test_multiquery_data import drilldown_file
    from tests.test_precomp import write_split

    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    if importer == "precomp":
        write_split(source, "train", 7, seed=1)

        def run() -> None:
            import_precomp(source, out, shard_size=3, dtype="float32")
    else:
        for number in range(7):
            drilldown_file(source, f"{number + 1:012d}", k=3 + number % 3, seed=number)

        def run() -> None:
            import_drilldown_features(source, out, max_boxes=36, shard_size=3, dtype="float32")
    run()
    complete = FeatureStore(out)
    images = {image_id: complete.get(image_id)[0].copy() for image_id in complete.image_ids}
    complete.close()
    manifest = json.loads((out / "manifest.json").read_text())
    orphan = manifest["shards"].pop()  # renamed into place, never recorded: the kill came in between
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "index.json").unlink(missing_ok=True)
    dead = max(os.getpid() + 100000, 4000000)  # a pid no process has
    stale = out / f"shard~{socket.gethostname()}~{dead}~7.h5.partial"
    stale.write_bytes(b"half a shard")
    run()
    assert not stale.exists()
    store = FeatureStore(out)
    assert sorted(store.image_ids) == sorted(images) and len(store.image_ids) == 7
    assert orphan["name"] in [entry.name for entry in store.manifest.shards]
    for image_id, features in images.items():
        np.testing.assert_array_equal(store.get(image_id)[0], features)
    assert verify_features(out) == []


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_shard_damaged_under_a_running_reader_is_an_error_naming_the_shard_and_the_image(tmp_path, damage):
    """HDF5 reads zeros past the end of a truncated file without a complaint; the per-image checksum turns that
    (and bytes overwritten in place) into an error naming the shard and the image, never zeros fed onwards."""
    writer = ShardWriter(tmp_path, max_boxes=4, feature_dim=256, dtype="float32")
    for n in range(40):
        writer.add(record(f"img{n}", 3, 256, seed=n))
    writer.commit()
    store = FeatureStore(tmp_path)
    first, *_ = store.get("img0")  # the file is open and read, as in a running training
    np.testing.assert_array_equal(first, record("img0", 3, 256, seed=0).features)
    path = tmp_path / "shard-00000.h5"
    with h5py.File(path, "r") as handle:
        chunk = handle["features"].id.get_chunk_info(30)  # image 30's row (one chunk an image)
    if damage == "truncated":
        os.truncate(path, chunk.byte_offset + 100)
    else:
        with open(path, "r+b") as handle:
            handle.seek(chunk.byte_offset + 64)
            handle.write(b"\x7f" * 16)
    with pytest.raises(ShardFormatError, match=r"shard-00000.h5: image 'img30' \(row 30\) does not match its checksum"):
        store.get("img30")
    with pytest.raises(ShardFormatError, match="img30"):
        store.batch(["img1", "img30"])
    np.testing.assert_array_equal(store.get("img1")[0], record("img1", 3, 256, seed=1).features)  # intact


def test_format_1_shards_without_checksums_still_read(tmp_path):
    writer = ShardWriter(tmp_path, max_boxes=3, feature_dim=8)
    writer.add(record("a", 2))
    writer.commit()
    with h5py.File(tmp_path / "shard-00000.h5", "r+") as handle:  # as tshsr-pipe 0.1 wrote it
        del handle["checksums"]
        handle.attrs["format_version"] = 1
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["shards"][0]
    entry["sha256"] = sha256_file(tmp_path / "shard-00000.h5")
    entry["num_bytes"] = (tmp_path / "shard-00000.h5").stat().st_size
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    store = FeatureStore(tmp_path)
    np.testing.assert_allclose(store.get("a")[0], record("a", 2).features, rtol=1e-3)
    assert verify_features(tmp_path) == []
