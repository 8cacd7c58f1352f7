"""Two-stage retrieval end to end: the first stage, `evaluate --shortlist`, its rank keys and its report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from matching import checkpoint
from matching.config import Config, EvaluationSettings
from matching.data.pairs import Batch
from matching.retrieval.evaluate import evaluate_checkpoint
from matching.retrieval.scoring import ImageArrays, score_matrix
from matching.retrieval.search import search
from matching.retrieval.shortlist import joint_vectors, two_stage_metrics
from matching.tasks.matching import train_step
from matching.training.loss import hardest_negative_loss
from pipelines.cli import cli
from tests.conftest import SMALL_MODEL, TINY, random_captions, random_images, tiny_config, tiny_model

ALL = EvaluationSettings(split=None)  # every caption of the file


def shortlisted(k: int) -> EvaluationSettings:
    return EvaluationSettings(split=None, shortlist=k)


@pytest.fixture(scope="session")
def trained_two_stage(tmp_path_factory):
    """A small model trained with the defaults (its first-stage head beside it) on 150 generated scenes
    (16 epochs, ~40 s)."""
    from matching.data.vocabulary import build_vocabulary
    from matching.training.loop import train
    from pipelines.synthetic import make_scenes, write_feature_dataset

    root = tmp_path_factory.mktemp("two_stage")
    features = write_feature_dataset(root / "features", make_scenes(150, seed=1), feature_dim=32, noise=0.2, seed=1)
    captions = features / "captions.jsonl"
    build_vocabulary(captions, root / "vocab.json", threshold=1)
    config = Config().updated(model=SMALL_MODEL, train={
        "batch_size": 24, "workers": 0, "learning_rate": 3e-3, "warmup_epochs": 3, "checkpoint_every": 0,
        "epochs": 16, "lr_decay_epoch": 8})
    train(config, features=features, captions=captions, vocab_path=root / "vocab.json", run_dir=root / "run",
          val_split=None, device="cpu", progress=False, log=lambda line: None)
    return features, captions, root / "run" / "model_best.pt"


def test_shortlist_r1_equals_exact_within_a_point_scoring_a_tenth_of_the_pairs(trained_two_stage):
    features, captions, model = trained_two_stage
    exact = evaluate_checkpoint(model, features, captions, settings=ALL, device="cpu").results["full"]
    outcome = evaluate_checkpoint(model, features, captions, settings=shortlisted(10), device="cpu")
    two_stage, report = outcome.results["full"], outcome.shortlist["full"]
    assert report.pairs_total == 150 * 750 and report.pairs_scored <= report.pairs_total / 10
    for direction in ("i2t", "t2i"):
        assert abs(two_stage[f"{direction}_r1"] - exact[f"{direction}_r1"]) <= 1.0, (direction, two_stage, exact)
    # The trained first stage holds the match: what the shortlist misses, the second stage cannot rank.
    assert report.t2i_recall >= 97 and report.i2t_recall >= 97
    assert two_stage["t2i_r10"] <= report.t2i_recall and outcome.sims is None


def test_evaluate_command_prints_shortlist_recall_and_writes_it(trained_two_stage, tmp_path):
    features, captions, model = trained_two_stage
    args = ["evaluate", "--checkpoint", model, "--features", features, "--captions", captions, "--split", "",
            "--device", "cpu", "--shortlist", "5"]
    result = CliRunner().invoke(cli, [*map(str, args), "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "full: shortlist recall (ground truth among the 5 images / 25 captions re-ranked): text → image" \
        in result.output
    saved = json.loads((tmp_path / "m.json").read_text())["results"]["full"]
    assert set(saved["shortlist"]) >= {"t2i_recall", "i2t_recall", "pairs_scored", "pairs_total", "k_images"}
    assert saved["shortlist"]["k_captions"] == 25 and 0 < saved["shortlist"]["t2i_recall"] <= 100
    refused = CliRunner().invoke(cli, [*map(str, args), "--save-sims", str(tmp_path / "s.npy")])
    assert refused.exit_code == 2 and "--save-sims needs every pair scored" in refused.output
    assert not (tmp_path / "s.npy").exists()


def pairs_dataset(n_images: int = 12, cpi: int = 2, seed: int = 0):
    features, num_boxes = random_images(n_images, 7, 24, seed=seed, min_boxes=1)
    return ImageArrays(features, num_boxes), random_captions(n_images * cpi, 40, seed=seed + 1)


def test_a_shortlist_of_the_whole_gallery_is_exact_scoring():
    model = tiny_model(seed=1)
    images, captions = pairs_dataset()
    results, report = two_stage_metrics([model], images, [captions], k=12, protocol="full", captions_per_image=2)
    from matching.retrieval.metrics import recall_metrics

    exact = recall_metrics(score_matrix(model, images, captions), 2)
    assert {key: results["full"][key] for key in exact} == pytest.approx(exact)
    assert report["full"].pairs_scored == report["full"].pairs_total == 12 * 24
    assert report["full"].t2i_recall == report["full"].i2t_recall == 100


def test_a_shortlist_of_one_image_ranks_it_first_and_the_rest_after_it():
    """K = 1: each caption's one candidate is its nearest image by cosine, so text→image R@1 is the shortlist's
    recall; the other images follow in cosine order, so R@5 is the cosine ranking's R@5."""
    model = tiny_model(seed=2)
    images, captions = pairs_dataset(seed=3)
    results, report = two_stage_metrics([model], images, [captions], k=1, protocol="full", captions_per_image=2)
    with torch.inference_mode():
        from matching.retrieval.scoring import encode_images, pad_tokens

        image_vectors = model.image_vectors(encode_images(model, images, torch.device("cpu")))
        caption_vectors = model.caption_vectors(model.encode_captions(*pad_tokens(captions)))
    cosines = (image_vectors @ caption_vectors.t()).numpy()
    owner = np.arange(24) // 2
    cosine_rank = (cosines >= cosines[owner, np.arange(24)]).sum(0) - 1
    assert results["full"]["t2i_r1"] == pytest.approx(report["full"].t2i_recall)
    assert results["full"]["t2i_r1"] == pytest.approx(100 * np.mean(cosine_rank < 1))
    assert results["full"]["t2i_r5"] == pytest.approx(100 * np.mean(cosine_rank < 5))


def test_folds_are_shortlisted_in_their_own_gallery():
    from matching.retrieval.metrics import protocol_galleries

    galleries = protocol_galleries(5000, "all", 5)
    assert [len(parts) for parts in galleries.values()] == [5, 1]
    assert galleries["coco1k"][2] == (slice(2000, 3000), slice(10000, 15000))
    assert galleries["coco5k"] == [(slice(0, 5000), slice(0, 25000))]


def test_an_ensemble_shortlists_by_the_mean_of_its_cosines():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(6, 4)), rng.normal(size=(6, 4))]
    parts = [p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts]
    joint = joint_vectors(parts)
    np.testing.assert_allclose(joint @ joint.T, np.mean([p @ p.T for p in parts], axis=0), atol=1e-6)


def test_the_global_loss_adds_the_same_hinge_on_the_global_cosines():
    images, captions = pairs_dataset(n_images=6, cpi=1, seed=6)
    from matching.retrieval.scoring import pad_tokens

    tokens, lengths = pad_tokens(captions)
    batch = Batch(torch.from_numpy(images.features), torch.from_numpy(images.num_boxes), tokens, lengths,
                  torch.arange(6), torch.tensor([0, 1, 2, 3, 4, 4]))  # two captions of image 4
    losses = {}
    for weight in (0.0, 0.5):
        model = tiny_model(seed=7, dropout=0.0).train()
        config = Config(model=tiny_config(dropout=0.0)).updated(train={"global_loss_weight": weight, "grad_clip": 0})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        losses[weight] = train_step(model, optimizer, batch, config, torch.device("cpu"), hardest=True).loss
    model = tiny_model(seed=7, dropout=0.0).train()
    with torch.no_grad():
        cosines = model.global_scores(model.encode_images(batch.features, batch.num_boxes),
                                      model.encode_captions(tokens, lengths))
    same = batch.image_index[:, None] == batch.image_index[None, :]
    expected = float(hardest_negative_loss(cosines, 0.2, hardest=True, same_image=same))
    assert expected > 0 and losses[0.5] - losses[0.0] == pytest.approx(0.5 * expected, rel=1e-4)


def test_checkpoints_keep_the_meaning_of_fields_added_after_them():
    saved = Config().to_dict()
    del saved["train"]["global_loss_weight"], saved["model"]["first_stage_dim"]
    old = Config.from_checkpoint(saved)
    assert old.train.global_loss_weight == 0.0 and old.model.first_stage_dim == 0  # no global loss, no head
    newer = Config().updated(train={"global_loss_weight": 0.5}, model={"first_stage_dim": 32}).to_dict()
    assert Config.from_checkpoint(newer).train.global_loss_weight == 0.5
    assert Config.from_checkpoint(newer).model.first_stage_dim == 32
    assert Config().train.global_loss_weight == 0.0  # the paper's loss alone, by default
    assert Config.default("multi-query").train.global_loss_weight == 0.0  # HMRN's loss has its own


def test_a_checkpoint_with_the_first_heads_loads_them_and_scores_as_they_did(tmp_path):
    """A checkpoint saved before `model.first_stage_pooling` has the attention-only head: it loads as one,
    with its weights, and its shortlist vectors are those weights' vectors; a new model pools with the max too."""
    from matching import checkpoint
    from matching.data.text import Vocabulary
    from matching.model.first_stage import FirstStageHead
    from matching.model.tshsr import build_model

    vocab = Vocabulary.build(["a red circle"], threshold=1)
    config = Config(model=tiny_config(first_stage_dim=16, first_stage_pooling="attention", vocab_size=len(vocab)))
    model = build_model(config.model)
    with torch.no_grad():
        for parameter in model.first_stage.parameters():
            parameter.normal_()  # weights a fresh head would not have
    checkpoint.save(tmp_path / "old.pt", model, config, vocab)
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    del payload["config"]["model"]["first_stage_pooling"]  # as the first heads' checkpoints were written
    torch.save(payload, tmp_path / "old.pt")
    loaded, loaded_config, _ = checkpoint.load(tmp_path / "old.pt")
    assert loaded_config.model.first_stage_pooling == "attention"
    features, boxes = random_images(4, TINY["num_regions"], TINY["img_dim"], seed=5)
    with torch.no_grad():
        images = model.eval().encode_images(torch.from_numpy(features), torch.from_numpy(boxes))
        assert torch.equal(loaded.eval().image_vectors(images), model.image_vectors(images))
    assert Config().model.first_stage_pooling == "attention+max"
    assert FirstStageHead(8, 4).images.project.in_features == 16  # [attended average ; element-wise max]


def test_shortlist_refuses_what_it_cannot_do(trained_multiquery, trained_two_stage, tmp_path):
    from matching.retrieval.metrics import MetricsError

    mq = trained_multiquery
    queries = mq.features / "queries.jsonl"
    with pytest.raises(MetricsError, match="multi-query model scores every image"):
        evaluate_checkpoint(mq.checkpoint, mq.features, queries, device="cpu",
                            settings=EvaluationSettings(split="test", shortlist=5))
    features, captions, model = trained_two_stage
    sims = tmp_path / "sims.npy"
    np.save(sims, np.zeros((150, 750), np.float32))
    with pytest.raises(MetricsError, match="cannot be averaged with full score matrices"):
        evaluate_checkpoint(model, features, captions, settings=shortlisted(5), sims_files=[sims], device="cpu")


def test_two_stage_search_re_ranks_the_nearest_images_with_their_exact_scores(trained_two_stage):
    from extract.shards import FeatureStore
    from matching.data.captions import read_captions
    from matching.retrieval.gallery import EncodedGallery
    from matching.retrieval.search import encode_query
    from matching.retrieval.shortlist import global_vectors
    from matching.tasks.matching import ShortlistRanker

    features, captions, path = trained_two_stage
    model, _, vocab = checkpoint.load(path)
    store = FeatureStore(features)
    encoded = EncodedGallery.encode(model, store, store.image_ids, device=torch.device("cpu"))
    gallery = encoded.select(slice(None))
    with torch.inference_mode():
        gallery_vectors = global_vectors(model.image_vectors(gallery))
    texts = [c.text for c in read_captions(captions)[:40:5]]
    tokens = [encode_query(vocab, text)[0] for text in texts]
    exact = score_matrix(model, gallery, tokens)  # (150, 8)
    ranking = ShortlistRanker(model, encoded, torch.device("cpu"), shortlist=20).rank(tokens[:2], 5)
    positions = ranking.positions
    np.testing.assert_allclose(ranking.scores[:, 0], exact[positions, 0], atol=1e-5)  # round 1: query 1's score
    np.testing.assert_allclose(ranking.scores[:, 1], exact[positions, :2].mean(1), atol=1e-5)  # round 2: the mean
    with torch.inference_mode():
        cosines = gallery_vectors @ global_vectors(model.caption_vectors(model.encode_captions(*pad(tokens[:2])))).T
    expected = set()
    for column in (cosines[:, 0], cosines[:, 1], cosines.mean(1)):
        expected |= set(np.argsort(-column)[:20].tolist())
    assert set(positions.tolist()) == expected
    with torch.inference_mode():
        all_cosines = gallery_vectors @ global_vectors(model.caption_vectors(model.encode_captions(*pad(tokens)))).T
    for text, column, near in zip(texts, exact.T, all_cosines.T, strict=True):
        found = search(path, features, query=text, k=5, shortlist=20, device="cpu")
        assert found.shortlist == 20 and found.gallery_size == 150
        # the five best of the text's 20 nearest images by cosine, with their exact scores
        shortlisted = np.argsort(-near)[:20]
        best = shortlisted[np.argsort(-column[shortlisted], kind="stable")[:5]]
        assert [hit.image_id for hit in found.hits] == [store.image_ids[i] for i in best]
        np.testing.assert_allclose([hit.score for hit in found.hits], column[best], atol=1e-5)
    assert search(path, features, query=texts[0], k=5, device="cpu").shortlist == 0  # 150 images: all scored


def pad(tokens):
    from matching.retrieval.scoring import pad_tokens

    return pad_tokens(tokens)


def test_search_and_serve_commands_take_a_shortlist(trained_two_stage):
    from fastapi.testclient import TestClient

    from matching.retrieval.search import SearchEngine
    from pipelines.serve.app import create_app

    features, captions, path = trained_two_stage
    result = CliRunner().invoke(cli, ["search", "--checkpoint", str(path), "--features", str(features),
                                      "--device", "cpu", "--shortlist", "30", "a red circle"])
    assert result.exit_code == 0, result.output
    assert "two-stage: the model re-ranked the 30 of 150 images nearest by first-stage cosine" in result.output
    engine = SearchEngine.open(path, features, device="cpu", settings=EvaluationSettings(split=None, shortlist=30))
    exact = SearchEngine.open(path, features, device="cpu", settings=EvaluationSettings(split=None, shortlist=0))
    assert SearchEngine.open(path, features, device="cpu").info.ranker == "exact"  # auto: 150 images ≤ 200
    with TestClient(create_app(engine)) as client:
        info = client.get("/api/info").json()
    assert (info["ranker"], info["shortlist"]) == ("shortlist", 30)
    for text in ("a red circle", "a blue square and a green star"):
        two_stage, full = engine.search_text(text, 5).hits, exact.search_text(text, 5).hits
        scores = {hit.image_id: hit.score for hit in exact.search([text], 150).hits}
        for hit in two_stage:
            assert hit.score == pytest.approx(scores[hit.image_id], abs=1e-5)
        assert two_stage[0].score <= full[0].score + 1e-6
        # the attended regions come from the query the ranker encoded: the same as encoding it again
        shown = {hit.image_id: hit.regions for hit in full}
        for hit in two_stage:
            if hit.image_id in shown:
                for (box, weight), (box_again, weight_again) in zip(hit.regions, shown[hit.image_id],
                                                                    strict=True):
                    assert box == box_again and weight == pytest.approx(weight_again, abs=1e-5)


def test_a_model_without_a_trained_first_stage_is_never_shortlisted(trained_two_stage, tmp_path):
    """No head and no global loss (an SGRAF import, or model.first_stage_dim 0): --shortlist is refused in one
    line, search and serve score every image by default. A model of an older run trained with the global
    loss (no head) still shortlists by its v̄, t̄."""
    from matching.retrieval.search import SearchEngine
    from matching.retrieval.shortlist import SEARCH_SHORTLIST, NoFirstStageError, default_search_shortlist

    features, captions, path = trained_two_stage
    model, config, vocab = checkpoint.load(path)
    bare = config.updated(model={"first_stage_dim": 0})
    network = checkpoint.build_network(bare)
    network.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("first_stage.")})
    checkpoint.save(tmp_path / "bare.pt", network, bare, vocab)
    with pytest.raises(NoFirstStageError, match="bare.pt: this model has no trained first stage"):
        evaluate_checkpoint(tmp_path / "bare.pt", features, captions, settings=shortlisted(5), device="cpu")
    with pytest.raises(NoFirstStageError):
        search(tmp_path / "bare.pt", features, query="a red circle", shortlist=20, device="cpu")
    with pytest.raises(NoFirstStageError):
        SearchEngine.open(tmp_path / "bare.pt", features, device="cpu", settings=shortlisted(30))
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(tmp_path / "bare.pt"), "--features",
                                      str(features), "--captions", str(captions), "--split", "", "--device", "cpu",
                                      "--shortlist", "5"])
    assert result.exit_code == 2 and "no trained first stage" in result.output and "Traceback" not in result.output
    assert default_search_shortlist(bare) == 0 and default_search_shortlist(config) == SEARCH_SHORTLIST
    # an older run's model: no head, v̄ and t̄ trained by the global loss
    older = bare.updated(train={"global_loss_weight": 1.0})
    checkpoint.save(tmp_path / "older.pt", network, older, vocab)
    assert default_search_shortlist(older) == SEARCH_SHORTLIST
    outcome = evaluate_checkpoint(tmp_path / "older.pt", features, captions, settings=shortlisted(5), device="cpu")
    assert outcome.shortlist["full"].pairs_scored > 0
