"""`tshsr-pipe evaluate` and `import-sgraf` end to end on generated shards, captions and checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from matching import checkpoint
from matching.config import Config
from matching.data.text import Vocabulary
from matching.retrieval.scoring import ImageArrays, score_matrix
from pipelines.cli import cli
from tests.conftest import tiny_config, tiny_model

WORDS = ["a", "red", "blue", "green", "cube", "ball", "on", "the", "table", "big", "small"]


def make_vocab() -> Vocabulary:
    return Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *WORDS, *[f"x{i}" for i in range(40 - 15)]])


@pytest.fixture
def setup(tmp_path, tmp_features):
    directory, ids, features, num_boxes = tmp_features
    rng = np.random.default_rng(0)
    lines = []
    for image_id in ids:
        for _ in range(5):
            words = " ".join(rng.choice(WORDS, size=rng.integers(2, 7)))
            lines.append(f"{image_id}\t{words.capitalize()}.\ttest")
    lines.append("img0.jpg\tan extra sixth caption kept for training only\ttest")
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    vocab = make_vocab()
    model = tiny_model(seed=3)
    checkpoint.save(tmp_path / "model.pt", model, Config(model=tiny_config()), vocab)
    vocab.save(tmp_path / "vocab.json")
    return tmp_path, directory, ids, features, num_boxes, model, vocab


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def test_evaluate_prints_the_table_and_writes_metrics(setup):
    tmp, features_dir, ids, features, num_boxes, model, vocab = setup
    result = run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                 "--captions", tmp / "captions.tsv", "--vocab", tmp / "vocab.json",
                 "--save-sims", tmp / "sims.npy", "--json", tmp / "metrics.json")
    assert result.exit_code == 0, result.output
    assert "6 images, 30 captions" in result.output
    assert "R@1" in result.output and "full" in result.output
    sims = np.load(tmp / "sims.npy")
    assert sims.shape == (6, 30)
    # The saved matrix is the model's scores for exactly these images and the first 5 captions of each.
    lines = (tmp / "captions.tsv").read_text().splitlines()[:30]
    expected = score_matrix(model, ImageArrays(features, num_boxes),
                            [vocab.encode(line.split("\t")[1]) for line in lines])
    np.testing.assert_allclose(sims, expected, atol=1e-6)
    payload = json.loads((tmp / "metrics.json").read_text())
    assert payload["num_images"] == 6 and set(payload["results"]) == {"full"}
    assert payload["results"]["full"]["rsum"] == pytest.approx(
        sum(payload["results"]["full"][f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_missing_shard(setup):
    tmp, features_dir, *_ = setup
    (features_dir / "shard-00001.h5").unlink()
    result = run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                 "--captions", tmp / "captions.tsv")
    one_line_error(result, "shard-00001.h5", "missing")


def test_caption_for_an_unknown_image(setup):
    tmp, features_dir, *_ = setup
    with open(tmp / "captions.tsv", "a", encoding="utf-8") as handle:
        for _ in range(5):
            handle.write("ghost.jpg\ta ghost\ttest\n")
    result = run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                 "--captions", tmp / "captions.tsv")
    one_line_error(result, "captions.tsv:32", "ghost.jpg", "no features")


def test_vocab_that_does_not_match_the_checkpoint(setup):
    tmp, features_dir, *_ = setup
    Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "zebra"]).save(tmp / "other.json")
    result = run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                 "--captions", tmp / "captions.tsv", "--vocab", tmp / "other.json")
    one_line_error(result, "other.json", "does not match the checkpoint")


def test_wrong_feature_width(setup):
    tmp, features_dir, *_ = setup
    wide = tiny_config(img_dim=32)
    from matching.model.tshsr import build_model

    checkpoint.save(tmp / "wide.pt", build_model(wide), Config(model=wide), make_vocab())
    result = run("evaluate", "--checkpoint", tmp / "wide.pt", "--features", features_dir,
                 "--captions", tmp / "captions.tsv")
    one_line_error(result, "24-d", "32-d")


def test_protocol_that_does_not_fit_and_too_few_captions(setup):
    tmp, features_dir, *_ = setup
    result = run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                 "--captions", tmp / "captions.tsv", "--protocol", "coco1k")
    one_line_error(result, "coco1k needs 5000")
    result = run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                 "--captions", tmp / "captions.tsv", "--captions-per-image", "7")
    one_line_error(result, "has 6 captions", "needs 7")


def test_not_a_checkpoint_and_malformed_captions(setup):
    tmp, features_dir, *_ = setup
    (tmp / "junk.pt").write_text("hello")
    one_line_error(run("evaluate", "--checkpoint", tmp / "junk.pt", "--features", features_dir,
                       "--captions", tmp / "captions.tsv"), "junk.pt")
    (tmp / "bad.tsv").write_text("img0.jpg\tfine\nimg1.jpg no tab here\n")
    one_line_error(run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                       "--captions", tmp / "bad.tsv"), "bad.tsv:2", "tab-separated")
    (tmp / "latin1.tsv").write_bytes("img0.jpg\tcaf\xe9\n".encode("latin-1"))
    one_line_error(run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                       "--captions", tmp / "latin1.tsv"), "latin1.tsv:1", "UTF-8")


def test_import_sgraf_command_and_hostile_file(tmp_path):
    import torch

    from tests.test_sgraf import RunsACommand, write_sgraf, write_vocab

    write_sgraf(tmp_path / "model_best.pth.tar")
    write_vocab(tmp_path / "vocab.json")
    result = run("import-sgraf", tmp_path / "model_best.pth.tar", "--vocab", tmp_path / "vocab.json",
                 "--out", tmp_path / "ours.pt")
    assert result.exit_code == 0, result.output
    assert "SGR, M=3" in result.output and (tmp_path / "ours.pt").exists()
    marker = tmp_path / "pwned"
    torch.save({"model": [], "opt": RunsACommand(marker)}, tmp_path / "evil.pth.tar")
    result = run("import-sgraf", tmp_path / "evil.pth.tar", "--vocab", tmp_path / "vocab.json",
                 "--out", tmp_path / "x.pt")
    one_line_error(result, "evil.pth.tar", "refused")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["evaluate", "import-sgraf", "vocab"])
def test_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_a_split_the_file_lacks_is_named_with_the_splits_it_has(setup):
    tmp, features_dir, *_ = setup
    result = run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                 "--captions", tmp / "captions.tsv", "--split", "tset")
    one_line_error(result, "captions.tsv", "no captions of split 'tset'", "test (31 captions)")


def test_ensembles_average_checkpoints_and_saved_score_matrices(setup):
    tmp, features_dir, ids, features, num_boxes, model, vocab = setup
    other = tiny_model(seed=5)
    checkpoint.save(tmp / "other.pt", other, Config(model=tiny_config()), vocab)
    common = ("--features", features_dir, "--captions", tmp / "captions.tsv")
    for name in ("model", "other"):
        assert run("evaluate", "--checkpoint", tmp / f"{name}.pt", *common, "--save-sims",
                   tmp / f"{name}.npy").exit_code == 0
    expected = (np.load(tmp / "model.npy") + np.load(tmp / "other.npy")) / 2
    both = run("evaluate", "--checkpoint", tmp / "model.pt", "--checkpoint", tmp / "other.pt", *common,
               "--save-sims", tmp / "both.npy", "--json", tmp / "both.json")
    assert both.exit_code == 0 and "the mean of 2 score matrices" in both.output, both.output
    np.testing.assert_allclose(np.load(tmp / "both.npy"), expected, atol=1e-6)
    mixed = run("evaluate", "--sims", tmp / "model.npy", "--checkpoint", tmp / "other.pt", *common,
                "--json", tmp / "mixed.json")
    assert mixed.exit_code == 0, mixed.output
    from matching.retrieval.metrics import recall_metrics

    reported = json.loads((tmp / "mixed.json").read_text())
    assert reported["results"]["full"]["rsum"] == pytest.approx(recall_metrics(expected)["rsum"])
    assert reported["sources"] == [str(tmp / "model.npy"), str(tmp / "other.pt")]
    np.save(tmp / "wrong.npy", np.zeros((3, 15), np.float32))
    one_line_error(run("evaluate", "--sims", tmp / "wrong.npy", *common), "wrong.npy", "(3, 15)", "(6, 30)")
    one_line_error(run("evaluate", *common), "give --checkpoint")


def test_save_sims_on_a_full_disk_leaves_no_empty_file(setup):
    from tests.smallfs import small_filesystem

    tmp, features_dir, *_ = setup
    with small_filesystem(tmp / "small", megabytes=1) as mount:
        with open(mount / "filler", "wb") as handle:  # leave less room than the matrix needs
            try:
                handle.write(b"\0" * (1 << 20))
            except OSError:
                pass
        result = run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                     "--captions", tmp / "captions.tsv", "--save-sims", mount / "sims.npy")
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        error = result.output.strip().splitlines()[-1]  # after the metrics table
        assert error.startswith(f"Error: {mount / 'sims.npy'}: no space left on device"), error
        assert not (mount / "sims.npy").exists() and not list(mount.glob(".*.tmp"))


def test_bugs_keep_their_traceback(setup, monkeypatch):
    import matching.retrieval.evaluate

    tmp, features_dir, *_ = setup

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(matching.retrieval.evaluate, "evaluate_checkpoint", broken)
    result = run("evaluate", "--checkpoint", tmp / "model.pt", "--features", features_dir,
                 "--captions", tmp / "captions.tsv")
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_a_file_that_is_no_checkpoint_gets_no_unsafe_advice(setup):
    tmp, features_dir, *_ = setup
    (tmp / "random.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    result = run("evaluate", "--checkpoint", tmp / "random.pt", "--features", features_dir,
                 "--captions", tmp / "captions.tsv")
    one_line_error(result, "random.pt", "not a checkpoint")
    assert "weights_only" not in result.output


def test_vocab_of_a_split_the_file_lacks(setup):
    tmp, *_ = setup
    result = run("vocab", tmp / "captions.tsv", "--out", tmp / "v.json", "--split", "trian")
    one_line_error(result, "no captions of split 'trian'", "test (31 captions)")
    assert not (tmp / "v.json").exists()
