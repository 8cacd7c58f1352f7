"""`--precision`: the scorers' arithmetic, chosen once in EvaluationSettings and honoured by evaluate, search and serve;
and a search engine that does not tokenise its caption gallery before it is asked for captions."""

import numpy as np
import pytest

from matching.config import ConfigError, EvaluationSettings


def test_bf16_scoring_moves_the_scores_a_little_and_keeps_the_ranking(trained_toy):
    """evaluate under bf16 computes in bfloat16 (the scores move) and ranks as float32 does on a trained model."""
    from matching.retrieval.evaluate import evaluate_checkpoint

    features, captions, _, ckpt, _ = trained_toy
    outcomes = {p: evaluate_checkpoint(ckpt, features, captions, device="cpu",
                                       settings=EvaluationSettings(split="test", protocol="full", precision=p))
                for p in ("float32", "bf16")}
    exact, low = outcomes["float32"].sims, outcomes["bf16"].sims
    difference = float(np.abs(exact - low).max())
    assert 0 < difference < 0.05  # bfloat16 keeps 8 bits of mantissa: scores in [0, 1] move by ~1e-3
    for key in ("i2t_r1", "t2i_r1"):
        assert abs(outcomes["bf16"].results["full"][key] - outcomes["float32"].results["full"][key]) <= 2 * 100 / 30


def test_search_and_the_engine_take_the_precision(trained_toy):
    from matching.retrieval.search import SearchEngine, search

    features, _, _, ckpt, _ = trained_toy
    engine = SearchEngine.open(ckpt, features, device="cpu",
                               settings=EvaluationSettings(split=None, shortlist=0, precision="bf16"))
    assert engine.info.precision == "bf16"
    exact = search(ckpt, features, query="a red circle", k=5, device="cpu", shortlist=0)
    low = engine.search(["a red circle"], 5, regions=False)
    assert [h.item for h in low.hits][:1] == [h.item for h in exact.hits][:1]
    assert max(abs(a.score - b.score) for a, b in zip(low.hits, exact.hits, strict=True)) > 0


def test_an_unknown_precision_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="evaluate.precision = 'fp8'; choose one of float32, tf32, bf16"):
        EvaluationSettings.from_dict({"precision": "fp8"})


def test_the_commands_offer_the_precision(trained_toy):
    from click.testing import CliRunner

    from pipelines.cli import cli

    for command in ("evaluate", "search", "serve"):
        result = CliRunner().invoke(cli, [command, "--help"])
        assert "--precision [float32|tf32|bf16]" in result.output, command
    features, captions, _, ckpt, _ = trained_toy
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(ckpt), "--features", str(features),
                                      "--captions", str(captions), "--split", "test", "--precision", "fp8"])
    assert result.exit_code == 2 and "'fp8' is not one of" in result.output


def test_the_caption_gallery_is_tokenised_on_the_first_captions_request_only(trained_toy, monkeypatch):
    """A server's start and its text searches do not wait for the whole caption file to be tokenised."""
    from matching.data.text import Vocabulary
    from matching.retrieval.search import SearchEngine

    features, captions, _, ckpt, _ = trained_toy
    calls = []
    original = Vocabulary.encode
    monkeypatch.setattr(Vocabulary, "encode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    engine = SearchEngine.open(ckpt, features, captions=captions, device="cpu",
                               settings=EvaluationSettings(split=None, shortlist=0))
    engine.search(["a red circle"], 3)
    assert len(calls) == 1 and len(engine.captions) > 100  # the query only
    engine.image_captions(engine.gallery[0], 3)
    assert len(calls) == 1 + len(engine.captions)
    engine.image_captions(engine.gallery[1], 3)
    assert len(calls) == 1 + len(engine.captions)  # once
