"""The multi-query task through the commands: train, vocab, evaluate per round, search in rounds, importers."""

from __future__ import annotations

import json
import pickle

import numpy as np
from click.testing import CliRunner

from matching import checkpoint
from pipelines.cli import cli
from tests.test_multiquery_data import drilldown_file, vg_layout  # noqa: F401 - the fixture

runner = CliRunner()


def files(outcome):
    return outcome.checkpoint, outcome.features, outcome.features / "queries.jsonl"


def test_evaluate_prints_each_round_and_writes_the_rounds_layout(trained_multiquery, tmp_path):
    ckpt, features, queries = files(trained_multiquery)
    result = runner.invoke(cli, ["evaluate", "--checkpoint", str(ckpt), "--features", str(features), "--captions",
                                 str(queries), "--json", str(tmp_path / "m.json"), "--save-sims",
                                 str(tmp_path / "s.npy"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "40 images, 40 query sets (test split)" in result.output and "chance |" in result.output
    payload = json.loads((tmp_path / "m.json").read_text())
    assert payload["task"] == "multi-query"
    assert payload["num_query_sets"] == 40 and [row["round"] for row in payload["results"]["rounds"]] == [1, 2, 3, 4]
    assert payload["results"] == trained_multiquery.results
    assert np.load(tmp_path / "s.npy").shape == (4, 40, 40)
    # HMRN's ensemble of its two directions: the same model twice gives the same ranking.
    both = runner.invoke(cli, ["evaluate", "--checkpoint", str(ckpt), "--ensemble", str(ckpt), "--features",
                               str(features), "--captions", str(queries), "--json", str(tmp_path / "e.json"),
                               "--device", "cpu"])
    assert both.exit_code == 0 and "the mean of 2 score matrices" in both.output
    assert json.loads((tmp_path / "e.json").read_text())["results"] == payload["results"]
    saved = runner.invoke(cli, ["evaluate", "--sims", str(tmp_path / "s.npy"), "--features", str(features),
                                "--captions", str(queries), "--json", str(tmp_path / "f.json")])
    assert saved.exit_code == 0 and json.loads((tmp_path / "f.json").read_text())["results"] == payload["results"]


def test_tasks_and_files_that_do_not_fit_are_refused(trained_multiquery, trained_toy):
    ckpt, features, queries = files(trained_multiquery)
    toy_features, captions, _, toy_ckpt, _ = trained_toy
    for args, message in (
            (["evaluate", "--checkpoint", str(ckpt), "--features", str(features), "--captions", str(captions)],
             "a multi-query checkpoint is evaluated on a multi-query JSONL file"),
            (["evaluate", "--checkpoint", str(toy_ckpt), "--features", str(toy_features), "--captions", str(queries)],
             "a matching checkpoint is evaluated on a caption file"),
            (["evaluate", "--checkpoint", str(ckpt), "--checkpoint", str(toy_ckpt), "--features", str(features),
              "--captions", str(queries)], "an ensemble mixes tasks"),
            (["search", "--checkpoint", str(ckpt), "--features", str(features), "--image", "scene_00001.png",
              "--captions", str(queries)], "not captions for an image"),
            (["evaluate", "--checkpoint", str(ckpt), "--features", str(features), "--captions", str(queries),
              "--split", "tset"], "no query sets of split 'tset'")):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_search_ranks_images_for_queries_given_in_rounds(trained_multiquery, tmp_path):
    from matching.data.queries import read_query_sets

    ckpt, features, queries = files(trained_multiquery)
    target = next(s for s in read_query_sets(queries, "test"))
    result = runner.invoke(cli, ["search", "--checkpoint", str(ckpt), "--features", str(features), *target.queries,
                                 "--captions", str(queries), "--split", "test", "-k", "3", "--html",
                                 str(tmp_path / "p.html"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    hits = [line for line in result.output.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
    assert len(hits) == 3 and target.image_id in hits[0] and "rank by round:" in hits[0]
    ranks = [int(r) for r in hits[0].split("rank by round:")[1].strip(" )").split("→")]
    assert len(ranks) == 4 and ranks[-1] == 1
    assert (tmp_path / "p.html").read_text().count("<figure>") == 3


def test_serve_answers_a_multi_query_model_with_its_own_rounds(trained_multiquery):
    from fastapi.testclient import TestClient

    from matching.config import EvaluationSettings
    from matching.data.queries import read_query_sets
    from matching.retrieval.search import SearchEngine, search
    from pipelines.serve.app import create_app

    ROUNDS = "rounds"
    ckpt, features, queries = files(trained_multiquery)
    target = next(s for s in read_query_sets(queries, "test"))
    engine = SearchEngine.open(ckpt, features, captions=queries, settings=EvaluationSettings(split="test"),
                               device="cpu")
    assert engine.info.multi_query == ROUNDS and engine.info.captions == 0 and engine.info.gallery_size == 40
    with TestClient(create_app(engine)) as client:
        answer = client.post("/api/search", json={"queries": target.queries, "k": 5}).json()
        expected = search(ckpt, features, query=target.queries, captions=queries, split="test", k=5, device="cpu")
        assert answer["combination"] == ROUNDS
        assert [hit["image_id"] for hit in answer["hits"]] == [hit.image_id for hit in expected.hits]
        assert [hit["rank_by_round"] for hit in answer["hits"]] == [hit.round_ranks for hit in expected.hits]
        assert answer["hits"][0]["image_id"] == target.image_id and len(answer["hits"][0]["regions"]) == 3
        one = client.get("/api/search", params={"q": target.queries[0], "k": 3}).json()["hits"]
        first = search(ckpt, features, query=[target.queries[0]], captions=queries, split="test", k=3, device="cpu")
        assert [hit["image_id"] for hit in one] == [hit.image_id for hit in first.hits]
        refused = client.get(f"/api/images/{target.image_id}/captions")
        assert refused.status_code == 422 and "ranks images for queries, not captions" in refused.json()["detail"]


def test_vocab_comes_from_the_training_queries(trained_multiquery, tmp_path):
    _, _, queries = files(trained_multiquery)
    result = runner.invoke(cli, ["vocab", str(queries), "--out", str(tmp_path / "v.json"), "--threshold", "1"])
    assert result.exit_code == 0 and "1280 texts" in result.output, result.output  # 320 training scenes × 4 queries
    bad = runner.invoke(cli, ["vocab", str(queries), "--out", str(tmp_path / "w.json"), "--split", "trian"])
    assert bad.exit_code == 2 and "no query sets of split 'trian'" in bad.output


def test_train_task_is_saved_and_a_resume_keeps_it(trained_multiquery, tmp_path):
    _, features, queries = files(trained_multiquery)
    vocab = trained_multiquery.checkpoint.parents[2] / "vocab.json"
    base = ["train", "--features", str(features), "--captions", str(queries), "--vocab", str(vocab), "--runs",
            str(tmp_path), "--name", "mq", "--device", "cpu"]
    first = runner.invoke(cli, [*base, "--task", "multi-query", "--set", "model.embed_size=16", "--set",
                                "model.max_turns=4", "--batch-size", "16", "--workers", "0", "--max-steps", "2"])
    assert first.exit_code == 0, first.output
    # HMRN's recipe is the task's default
    assert "config task: multi-query" in first.output and "config train: margin=0.2, hardest_negatives=True, " \
        "warmup_epochs=0, global_loss_weight=0.0, first_stage_temperature=0.05, learning_rate=0.0004" in first.output
    assert checkpoint.load_payload(tmp_path / "mq" / "checkpoint_last.pt")["config"]["task"] == "multi-query"
    refused = runner.invoke(cli, [*base, "--resume", "--task", "matching"])
    assert refused.exit_code == 2 and "task: run has 'multi-query', asked 'matching'" in refused.output
    resumed = runner.invoke(cli, [*base, "--resume", "--max-steps", "1"])
    assert resumed.exit_code == 0 and "resuming" in resumed.output, resumed.output


def test_import_commands(tmp_path, vg_layout):  # noqa: F811 - the fixture
    regions, splits, _ = vg_layout
    result = runner.invoke(cli, ["import-vg", str(regions), "--splits-dir", str(splits), "--out",
                                 str(tmp_path / "q.jsonl"), "--max-turns", "3"])
    assert result.exit_code == 0, result.output
    assert "images kept" in result.output and "exact duplicates" in result.output and (tmp_path / "q.jsonl").exists()
    region_dir = tmp_path / "region_36_final"
    region_dir.mkdir()
    for image_id in ("1", "2"):
        drilldown_file(region_dir, image_id, k=5)
    result = runner.invoke(cli, ["import-drilldown", str(region_dir), "--out", str(tmp_path / "f"), "--max-boxes", "8"])
    assert result.exit_code == 0 and "2 images written" in result.output, result.output
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (region_dir / "000000000003.npy").write_bytes(pickle.dumps({"region_feats": Evil()}))
    result = runner.invoke(cli, ["import-drilldown", str(region_dir), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "000000000003.npy" in result.output and not marker.exists()


def test_the_commands_help_explains_the_multi_query_task():
    """--task lists every task; evaluate, search and demo say what a multi-query model takes and gives."""
    from matching.tasks import task_names

    train = " ".join(runner.invoke(cli, ["train", "--help"]).output.split())
    assert all(name in train for name in task_names()) and "several region queries given in rounds" in train
    evaluate = " ".join(runner.invoke(cli, ["evaluate", "--help"]).output.split())
    assert "for a multi-query checkpoint the multi-query JSONL" in evaluate and "after each round" in evaluate
    search = " ".join(runner.invoke(cli, ["search", "--help"]).output.split())
    assert "several QUERIES, given in rounds" in search and "rank after every round" in search
    demo = " ".join(runner.invoke(cli, ["demo", "--help"]).output.split())
    assert "--task [matching|multi-query]" in demo and "rank of the right scene rises with the rounds" in demo
    for command in ("import-vg", "import-drilldown"):
        text = " ".join(runner.invoke(cli, [command, "--help"]).output.split())
        assert "DrillDown" in text and "--out" in text
