"""Multi-query data: the JSONL format, the Visual Genome/DrillDown importers, the datasets and the sampler."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from extract.drilldown import DrillDownError, import_drilldown_features, read_region_file
from extract.shards import FeatureStore
from matching.data.queries import (
    MultiQueryDataset,
    QueryFormatError,
    QuerySet,
    QuerySetBatchSampler,
    build_query_data,
    build_query_vocab,
    collate_query_sets,
    import_vg_queries,
    read_query_sets,
    write_query_sets,
)
from matching.data.text import Vocabulary

# --------------------------------------------------------------------------- the JSONL format


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_query_sets_round_trip_and_split_filter(tmp_path):
    sets = [QuerySet("1", ("a red car", "wet pavement"), "train", "x"), QuerySet("2", ("café sign",), "test", "x"),
            QuerySet("3", ("a dog",), None, "x")]
    path = write_query_sets(tmp_path / "q.jsonl", sets)
    back = read_query_sets(path)
    assert [(s.image_id, s.queries, s.split) for s in back] == [(s.image_id, s.queries, s.split) for s in sets]
    assert back[1].where == f"{path}:2"
    assert [s.image_id for s in read_query_sets(path, "test")] == ["2", "3"]  # a set without a split counts
    assert not list(tmp_path.glob(".q.jsonl*"))  # written atomically: no temporary file left


@pytest.mark.parametrize("line, message", [
    ('{"image_id": "1", "queries": ["a"]', "not a JSON object"),
    ('{"queries": ["a"]}', "needs 'image_id' and 'queries'"),
    ('["1", ["a"]]', "needs 'image_id' and 'queries'"),
    ('{"image_id": "1", "queries": []}', "non-empty list"),
    ('{"image_id": "1", "queries": "a red car"}', "non-empty list"),
    ('{"image_id": "1", "queries": ["a", 3]}', "query 1 is not a text"),
    ('{"image_id": "", "queries": ["a"]}', "empty image_id"),
    ('{"image_id": "0", "queries": ["b"]}', "already has a line"),
])
def test_malformed_query_files_are_named_with_their_line(tmp_path, line, message):
    path = write_lines(tmp_path / "q.jsonl", ['{"image_id": "0", "split": "train", "queries": ["a cat"]}', "", line])
    with pytest.raises(QueryFormatError, match=f"q.jsonl:3: .*{message}"):
        read_query_sets(path)


def test_queries_are_read_as_written_blank_ones_included(tmp_path):
    """HMRN's phrase cleaning keeps Visual Genome's blank and space-padded phrases; the file keeps them as they are."""
    path = write_lines(tmp_path / "q.jsonl", ['{"image_id": "0", "queries": ["a cat ", "   ", ""]}'])
    assert read_query_sets(path)[0].queries == ("a cat ", "   ", "")
    vocab = Vocabulary.build(["a cat"], threshold=1)
    assert [vocab.encode(q, "end") for q in read_query_sets(path)[0].queries] == [[4, 5, 2], [2], [2]]


def test_non_utf8_and_empty_files(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"image_id": "0", "queries": ["a"]}\n{"image_id": "1", "queries": ["caf\xe9"]}\n')
    with pytest.raises(QueryFormatError, match="q.jsonl:2: not valid UTF-8"):
        read_query_sets(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(QueryFormatError, match="no query sets"):
        read_query_sets(path)
    with pytest.raises(QueryFormatError, match="no such file"):
        read_query_sets(tmp_path / "missing.jsonl")


def test_vocabulary_comes_from_the_training_queries():
    sets = [QuerySet("1", ("a red car", "a red bus"), "train", "x"), QuerySet("2", ("a zebra",), "test", "x")]
    vocab = build_query_vocab(sets, threshold=1)
    assert "red" in vocab.word2idx and "car" in vocab.word2idx and "zebra" not in vocab.word2idx
    assert vocab.words[4] == "a"  # the most frequent word first
    assert build_query_vocab(sets, threshold=2).words[4:] == ["a", "red"]


# --------------------------------------------------------------------------- Visual Genome / DrillDown layout


def region(region_id, phrase):
    return {"region_id": region_id, "phrase": phrase, "x": 0, "y": 0, "width": 5, "height": 5, "image_id": 0,
            "objects": [], "relationships": []}


def phrases(n, prefix):
    return [f"{prefix} thing {i}" for i in range(n)]


@pytest.fixture
def vg_layout(tmp_path):
    """rg_jsons/<id>.json and vg_{train,val,test}.txt in DrillDown's layout, with every case to drop."""
    rg = tmp_path / "rg_jsons"
    rg.mkdir()
    images = {
        # 12 phrases in file order, region ids not in order; "A Man " duplicates "a man" (kept: the first),
        # one phrase is blank: 10 distinct phrases remain.
        1: [region(50, "a man"), region(10, "Tall tree"), region(30, "A Man "), region(20, "   "),
            *[region(40 + i, p) for i, p in enumerate(phrases(8, "one"))]],
        2: [region(i, p) for i, p in enumerate(phrases(9, "two"))],  # too few
        3: [region(i, p) for i, p in enumerate(phrases(10, "three"))],
        5: [region(i, p) for i, p in enumerate([*phrases(9, "five"), "five thing 0", "FIVE THING 1"])],  # 9 left
    }
    for image_id, regions in images.items():
        (rg / f"{image_id}.json").write_text(json.dumps({"image_id": image_id, "regions": regions}), encoding="utf-8")
    splits = tmp_path / "caches"
    splits.mkdir()
    (splits / "vg_train.txt").write_text("1\n2\n", encoding="utf-8")
    (splits / "vg_val.txt").write_text("3\n", encoding="utf-8")
    (splits / "vg_test.txt").write_text("4\n5\n\n", encoding="utf-8")  # 4 has no annotations
    return rg, splits, images


def test_vg_import_keeps_distinct_lowercased_phrases_in_region_order_and_counts_the_rest(tmp_path, vg_layout):
    rg, splits, _ = vg_layout
    counts = import_vg_queries(rg, splits, tmp_path / "queries.jsonl", max_turns=10)
    sets = read_query_sets(tmp_path / "queries.jsonl")
    assert [(s.image_id, s.split) for s in sets] == [("1", "train"), ("3", "val")]
    # The duplicate kept is the first in file order (region 50, not 30); then by region id: 10, 40…47, 50.
    assert sets[0].queries == ("tall tree", *phrases(8, "one"), "a man")
    assert sets[1].queries == tuple(phrases(10, "three"))
    assert counts.images == {"train": 1, "val": 1, "test": 0}
    assert counts.too_few_queries == {"train": 1, "val": 0, "test": 1}
    assert counts.missing == {"train": 0, "val": 0, "test": 1} and counts.missing_examples == ["4"]
    assert (counts.duplicate_phrases, counts.empty_phrases) == (3, 1)
    assert "test: 0 images kept, 1 with fewer than 10 distinct phrases" in counts.summary()
    assert "3 exact duplicates and 1 blank phrases dropped" in counts.summary()
    # HMRN's cleaning would keep "A Man " beside "a man" and the blank phrase: image 1's first ten differ.
    assert (counts.other_keeps, counts.other_drops, counts.other_changes) == (0, 0, 1)
    assert "HMRN's cleaning (--cleaning hmrn" in counts.summary() and "of 1 images both keep" in counts.summary()
    # With fewer rounds, image 2 (9 phrases) and 5 (9 distinct) are kept.
    counts = import_vg_queries(rg, splits, tmp_path / "q9.jsonl", max_turns=9)
    assert counts.images == {"train": 2, "val": 1, "test": 1}


def test_vg_import_reads_visual_genomes_single_region_file_the_same(tmp_path, vg_layout):
    rg, splits, images = vg_layout
    single = tmp_path / "region_descriptions.json"
    single.write_text(json.dumps([{"id": i, "regions": r} for i, r in images.items()]), encoding="utf-8")
    import_vg_queries(rg, splits, tmp_path / "a.jsonl")
    import_vg_queries(single, splits, tmp_path / "b.jsonl")
    a, b = read_query_sets(tmp_path / "a.jsonl"), read_query_sets(tmp_path / "b.jsonl")
    assert [(s.image_id, s.queries, s.split) for s in a] == [(s.image_id, s.queries, s.split) for s in b]


def test_vg_import_names_malformed_files(tmp_path, vg_layout):
    rg, splits, _ = vg_layout
    (rg / "3.json").write_text('{"regions": [\n  {"region_id": 1, "phrase": "x"},\n  oops]}', encoding="utf-8")
    with pytest.raises(QueryFormatError, match=r"3\.json:3: invalid JSON"):
        import_vg_queries(rg, splits, tmp_path / "q.jsonl")
    (rg / "3.json").write_text(json.dumps({"regions": [{"region_id": 1}]}), encoding="utf-8")
    with pytest.raises(QueryFormatError, match=r"3\.json: regions\[0\] has no text 'phrase'"):
        import_vg_queries(rg, splits, tmp_path / "q.jsonl")
    (rg / "3.json").write_text(json.dumps({"regions": [{"phrase": "a cat"}]}), encoding="utf-8")
    with pytest.raises(QueryFormatError, match="region_id"):
        import_vg_queries(rg, splits, tmp_path / "q.jsonl")
    (splits / "vg_val.txt").write_text("3\nthree\n", encoding="utf-8")
    with pytest.raises(QueryFormatError, match=r"vg_val\.txt:2: 'three' is not an integer"):
        import_vg_queries(rg, splits, tmp_path / "q.jsonl")
    (splits / "vg_val.txt").write_text("1\n", encoding="utf-8")
    with pytest.raises(QueryFormatError, match=r"vg_val\.txt: image 1 is also listed in .*vg_train\.txt"):
        import_vg_queries(rg, splits, tmp_path / "q.jsonl")
    assert not (tmp_path / "q.jsonl").exists()  # nothing written on an error


# --------------------------------------------------------------------------- DrillDown's region_36_final pickles


def drilldown_file(directory, image_id, k, dim=12, seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    entry = {"region_boxes": rng.uniform(0, 100, (k, 4)).astype(np.float32),
             "region_feats": np.abs(rng.normal(size=(k, dim))).astype(np.float32),
             "region_clses": rng.integers(0, 1600, k).astype(np.int32)}
    path = directory / f"{str(image_id).zfill(12)}.npy"
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=protocol)
    return entry


def test_drilldown_features_import_into_shards_and_resume(tmp_path):
    source = tmp_path / "region_36_final"
    source.mkdir()
    entries = {i: drilldown_file(source, i, k=3 + i % 5, seed=i, protocol=2 if i % 2 else 4) for i in (7, 2345, 10)}
    out = tmp_path / "features"
    done = import_drilldown_features(source, out, max_boxes=36, shard_size=2, dtype="float32")
    assert (done.written, done.skipped, done.feature_dim) == (3, 0, 12)
    store = FeatureStore(out)
    assert sorted(store.image_ids) == ["10", "2345", "7"]
    for image_id, entry in entries.items():
        features, boxes, k, size = store.get(str(image_id))
        assert k == len(entry["region_feats"]) and size == (0, 0) and store.max_boxes == 36
        np.testing.assert_array_equal(features, entry["region_feats"])
        np.testing.assert_array_equal(boxes, entry["region_boxes"])
    assert len(store.manifest.shards) == 2
    store.close()
    drilldown_file(source, 99, k=5, seed=9)
    again = import_drilldown_features(source, out, dtype="float32")
    assert (again.written, again.skipped) == (1, 3)
    assert sorted(FeatureStore(out).image_ids) == ["10", "2345", "7", "99"]
    only = import_drilldown_features(source, tmp_path / "subset", image_ids=["7"], dtype="float32")
    assert only.written == 1 and FeatureStore(tmp_path / "subset").image_ids == ["7"]


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    source = tmp_path / "region_36_final"
    source.mkdir()
    drilldown_file(source, 1, k=4)
    with open(source / "000000000002.npy", "wb") as handle:
        pickle.dump({"region_feats": Exploit(), "region_boxes": np.zeros((1, 4), np.float32)}, handle, protocol=2)
    with pytest.raises(DrillDownError, match=r"000000000002\.npy: refused"):
        import_drilldown_features(source, tmp_path / "features")
    assert not marker.exists()


def test_drilldown_files_not_in_the_layout_are_named(tmp_path):
    path = tmp_path / "000000000001.npy"
    np.save(path, np.zeros((36, 2048), np.float32))
    with pytest.raises(DrillDownError, match="000000000001.npy: a plain .npy array"):
        read_region_file(path)
    with open(path, "wb") as handle:
        pickle.dump({"region_feats": np.zeros((3, 8), np.float32), "region_boxes": np.zeros((2, 4))}, handle)
    with pytest.raises(DrillDownError, match=r"000000000001.npy: region_boxes has shape \(2, 4\), expected \(3, 4\)"):
        read_region_file(path)
    with open(path, "wb") as handle:
        pickle.dump({"features": np.zeros((3, 8), np.float32)}, handle)
    with pytest.raises(DrillDownError, match="expected a dict with 'region_feats'"):
        read_region_file(path)
    path.write_bytes(b"\x80\x02}q\x00(X")  # truncated
    with pytest.raises(DrillDownError, match="not a readable DrillDown feature pickle"):
        read_region_file(path)
    source = tmp_path / "many"
    source.mkdir()
    drilldown_file(source, 1, k=40)
    with pytest.raises(DrillDownError, match="40 regions, more than max_boxes = 36"):
        import_drilldown_features(source, tmp_path / "out")


# --------------------------------------------------------------------------- datasets and the sampler


@pytest.fixture
def query_store(tmp_features):
    directory, ids, features, num_boxes = tmp_features
    sets = [QuerySet(image_id, tuple(f"query {i} number {j}" for j in range(3 + i)), "train", f"q.jsonl:{i + 1}")
            for i, image_id in enumerate(ids)]
    vocab = build_query_vocab(sets, threshold=1)
    return FeatureStore(directory), sets, vocab, features, num_boxes


def test_training_draws_max_turns_queries_in_a_fresh_order_each_epoch(query_store):
    store, sets, vocab, features, num_boxes = query_store
    data = build_query_data(sets, store.image_ids, vocab, max_turns=3)
    dataset = MultiQueryDataset(store, data, max_turns=3, seed=5)
    draws = {epoch: [tuple(dataset.drawn(i, epoch)) for i in range(len(dataset))] for epoch in range(4)}
    for drawn in draws.values():
        for i, positions in enumerate(drawn):
            assert len(positions) == 3 and len(set(positions)) == 3 and max(positions) < 3 + i
    assert draws[0] != draws[1]
    assert draws[2] == [tuple(MultiQueryDataset(store, data, 3, seed=5).drawn(i, 2)) for i in range(6)]
    assert len({draws[e][5] for e in range(4)}) > 1  # image 5 has 8 queries: the choice changes too
    # Evaluation keeps the first max_turns queries in file order.
    item = dataset[4]
    assert [t.tolist() for t in item[2]] == [vocab.encode(q) for q in sets[4].queries[:3]]
    np.testing.assert_array_equal(item[0].numpy()[: item[1]], features[4, : num_boxes[4]])


def test_the_sampler_resumes_and_workers_draw_what_the_main_process_draws(query_store):
    store, sets, vocab, _, _ = query_store
    data = build_query_data(sets, store.image_ids, vocab, max_turns=3)
    sampler = QuerySetBatchSampler(len(data), 2, seed=1)
    sampler.set_epoch(3)
    whole = list(sampler)
    assert sorted(key for batch in whole for key in batch) == [(i, 3) for i in range(6)]
    sampler.set_epoch(3, start_batch=1)
    assert list(sampler) == whole[1:]
    dataset = MultiQueryDataset(store, data, max_turns=3, seed=2)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_query_sets, num_workers=1,
                        persistent_workers=True)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for batch in loader:
            for row, index in enumerate(batch.set_index.tolist()):
                expected = [data.queries[index][q] for q in dataset.drawn(index, epoch)]
                got = [batch.tokens[row, t, : batch.lengths[row, t]].tolist() for t in range(3)]
                assert got == expected


def test_collate_pads_boxes_queries_and_tokens(query_store):
    store, sets, vocab, _, num_boxes = query_store
    data = build_query_data(sets, store.image_ids, vocab, max_turns=3)
    dataset = MultiQueryDataset(store, data, max_turns=5, in_memory=True)
    batch = collate_query_sets([dataset[0], dataset[3]])  # 3 and 5 queries
    assert batch.tokens.shape[:2] == (2, 5) and batch.lengths[0, 3:].tolist() == [0, 0]
    assert batch.features.shape[1] == max(num_boxes[0], num_boxes[3])
    assert batch.tokens[0, 3:].abs().sum() == 0 and (batch.lengths[1] > 0).all()
    assert batch.tokens.dtype == torch.long and batch.set_index.tolist() == [0, 3]


def test_query_data_names_the_line_of_a_set_that_cannot_be_used(query_store):
    store, sets, vocab, _, _ = query_store
    with pytest.raises(QueryFormatError, match="q.jsonl:1: image 'img0.jpg' has 3 queries; 4 rounds need 4"):
        build_query_data(sets, store.image_ids, vocab, max_turns=4)
    lost = [*sets, QuerySet("nowhere.jpg", ("a",) * 3, "train", "q.jsonl:7")]
    with pytest.raises(QueryFormatError, match="q.jsonl:7: image 'nowhere.jpg' has no features"):
        build_query_data(lost, store.image_ids, Vocabulary.build([], 1), max_turns=3)
    by_stem = [QuerySet("img2", ("a", "b", "c"), "test", "q.jsonl:1")]  # ids resolve like captions'
    assert build_query_data(by_stem, store.image_ids, vocab, 3).image_ids == ["img2.jpg"]


def test_vg_single_file_without_image_ids_is_named(tmp_path, vg_layout):
    _, splits, _ = vg_layout
    single = tmp_path / "region_descriptions.json"
    single.write_text(json.dumps([{"regions": [{"phrase": "a", "region_id": 1}]}]), encoding="utf-8")
    with pytest.raises(QueryFormatError, match="entry 0 names no integer image id"):
        import_vg_queries(single, splits, tmp_path / "q.jsonl")
