"""Training: it learns, it resumes exactly, it writes its run directory, it reports collapse."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from click.testing import CliRunner

from matching import checkpoint
from matching.config import Config, ConfigError, resolve_config
from matching.data.text import Vocabulary
from matching.training.loop import RunError, learning_rate, train
from pipelines.cli import cli
from tests.conftest import toy_config


def test_a_tiny_run_learns(trained_toy):
    *_, result = trained_toy
    first, best = result.history[0]["rsum"], result.best_rsum
    # 15 validation images: chance rsum is about 2 × (1 + 5 + 10) / 15 × 100 ≈ 215.
    assert best > 420 and best > first + 150, [row["rsum"] for row in result.history]
    run = result.run_dir
    for name in ("config.yaml", "checkpoint_last.pt", "model_best.pt", "metrics.csv"):
        assert (run / name).exists(), name
    assert list(run.glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["embed_size"] == 64 and saved["model"]["img_dim"] == 32  # img_dim from the data
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    model, loaded, vocab_loaded = checkpoint.load(run / "model_best.pt")
    assert loaded.model.num_regions == 6 and len(vocab_loaded) == loaded.model.vocab_size


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(toy, tmp_path):
    features, captions, vocab = toy
    kwargs = dict(features=features, captions=captions, vocab_path=vocab, progress=False, log=lambda line: None)
    cfg = toy_config(epochs=2, warmup_epochs=1)  # one epoch of each loss; dropout on, so RNG state matters
    whole = train(cfg, run_dir=tmp_path / "whole", **kwargs)
    steps = len(whole.losses)
    assert steps > 8
    cut = steps // 2 + 3  # a few steps into the second epoch
    first = train(toy_config(epochs=2, warmup_epochs=1), run_dir=tmp_path / "cut", max_steps=cut, **kwargs)
    assert first.interrupted and first.losses == whole.losses[:cut]
    second = train(Config(), run_dir=tmp_path / "cut", resume=True, **kwargs)  # the saved config wins
    assert second.losses == whole.losses[cut:]
    a = torch.load(tmp_path / "whole" / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint_last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_rules(toy, tmp_path):
    features, captions, vocab = toy
    kwargs = dict(features=features, captions=captions, vocab_path=vocab, progress=False, log=lambda line: None)
    with pytest.raises(RunError, match="nothing to resume"):
        train(toy_config(), run_dir=tmp_path / "none", resume=True, **kwargs)
    train(toy_config(epochs=1), run_dir=tmp_path / "r", max_steps=1, **kwargs)
    with pytest.raises(RunError, match="a run already exists here"):
        train(toy_config(), run_dir=tmp_path / "r", **kwargs)
    Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "zzz"]).save(tmp_path / "other.json")
    with pytest.raises(RunError, match="not the vocabulary"):
        train(toy_config(), run_dir=tmp_path / "r", resume=True, **{**kwargs, "vocab_path": tmp_path / "other.json"})


def test_collapse_is_reported_once_with_the_runs_loss(toy, tmp_path, monkeypatch):
    import matching.tasks.matching as training
    from matching.tasks.base import StepResult

    monkeypatch.setattr(training, "train_step", lambda *args, **kwargs: StepResult(9.6, 0.0))  # batch 24
    lines = []
    train(toy_config(epochs=1, warmup_epochs=0), features=toy[0], captions=toy[1], vocab_path=toy[2],
          run_dir=tmp_path / "c", progress=False, log=lines.append, max_steps=25)
    warnings = [line for line in lines if "collapsed" in line]
    assert len(warnings) == 1, warnings
    assert "sits at its collapsed value 2·B·margin = 9.6" in warnings[0] and "--warmup-epochs 2" in warnings[0]


@pytest.mark.parametrize("situation", ["hardest from the start", "after the warm-up", "in the warm-up",
                                       "with the global loss"])
def test_the_collapse_warning_fits_the_loss_and_the_settings(situation):
    """The reason and the remedy follow the run: hardest negatives or the warm-up's sum over all of them,
    the collapsed value of that loss, the global loss when it is on."""
    from matching.tasks.matching import MatchingTask

    settings = {"hardest from the start": ({"warmup_epochs": 0}, 0, 2 * 32 * 0.2),
                "after the warm-up": ({"warmup_epochs": 1}, 3, 2 * 32 * 0.2),
                "in the warm-up": ({"warmup_epochs": 2}, 0, 2 * 32 * 31 * 0.2),
                "with the global loss": ({"warmup_epochs": 1, "global_loss_weight": 1.0}, 0, 2272.0)}
    train_settings, epoch, loss = settings[situation]
    hint = MatchingTask().collapse_hint(0.0, loss, 32, Config().updated(train=train_settings), epoch)
    if situation == "hardest from the start":
        assert "sits at its collapsed value 2·B·margin = 12.8" in hint and "--warmup-epochs 2 or more" in hint
    elif situation == "after the warm-up":
        assert "2·B·margin = 12.8" in hint and "after 1 warm-up epoch(s)" in hint and "--warmup-epochs 3" in hint
    elif situation == "in the warm-up":
        assert "warm-up epoch 1: the hinge summed over all negatives" in hint
        assert "2·B·(B−1)·margin = 396.8" in hint and "more warm-up will not help" in hint and "--lr" in hint
        assert "--warmup-epochs" not in hint
    else:
        assert "The loss, 2272.0, is the paper's hinge at its collapsed value 2·B·(B−1)·margin = 396.8 plus 1 ×" \
            in hint and "--global-loss-weight 1" in hint and "set it to 0" in hint and "2·B·margin =" not in hint


def test_a_healthy_run_never_warns_of_collapse(trained_toy):
    log = (trained_toy[4].run_dir / "train.log").read_text()
    assert "epoch 4/4" in log and "collapsed" not in log


def test_schedule_presets_and_overrides():
    cfg = resolve_config(preset="f30k", sets=["train.learning_rate=1e-3"])
    assert (cfg.train.epochs, cfg.train.lr_decay_epoch) == (40, 30)
    assert learning_rate(cfg, 29) == pytest.approx(1e-3) and learning_rate(cfg, 30) == pytest.approx(1e-4)
    coco = resolve_config(preset="coco", variant="hsr", overrides={"model.reasoning_steps": 2})
    assert (coco.train.epochs, coco.model.streams, coco.model.reasoning_steps) == (20, "i2t", 2)
    with pytest.raises(ConfigError, match="unknown field"):
        resolve_config(sets=["model.lamda=3"])
    with pytest.raises(ConfigError, match="not a valid int"):
        resolve_config(sets=["train.epochs=many"])
    with pytest.raises(ConfigError, match="batch_size must be at least 2"):
        resolve_config(overrides={"train.batch_size": 1})


def test_train_command_and_its_errors(toy, tmp_path):
    features, captions, vocab = toy
    runner = CliRunner()
    args = ["train", "--features", str(features), "--captions", str(captions), "--vocab", str(vocab),
            "--runs", str(tmp_path), "--name", "cli", "--embed-size", "64", "--sim-dim", "32", "--word-dim", "32",
            "--batch-size", "24", "--workers", "0", "--epochs", "1", "--max-steps", "2"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "stopped at epoch 1, step 2; continue with --resume" in result.output
    assert (tmp_path / "cli" / "train.log").exists()
    again = runner.invoke(cli, args)
    assert again.exit_code == 2 and "a run already exists" in again.output
    resumed = runner.invoke(cli, ["train", "--features", str(features), "--captions", str(captions),
                                  "--vocab", str(vocab), "--runs", str(tmp_path), "--name", "cli", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "done: 1 epochs" in resumed.output
    bad = runner.invoke(cli, args[:7] + ["--runs", str(tmp_path), "--name", "x", "--set", "model.nope=1"])
    assert bad.exit_code == 2 and "unknown field" in bad.output
    assert runner.invoke(cli, ["train", "--help"]).exit_code == 0


def test_report_draws_curves_and_prints_the_table(trained_toy, tmp_path):
    *_, result = trained_toy
    outcome = CliRunner().invoke(cli, ["report", str(result.run_dir), "--out", str(tmp_path / "c.png")])
    assert outcome.exit_code == 0, outcome.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best_line = next(line for line in outcome.output.splitlines() if line.startswith("best"))
    assert f"{result.best_rsum:.1f}" in best_line
    missing = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert missing.exit_code == 2 and "metrics.csv: missing" in missing.output


def test_a_one_epoch_run_draws_its_recall_as_points():
    from pipelines.report import curves_figure

    row = {"epoch": 1.0, "train_loss": 3.2, "i2t_r1": 40.0, "i2t_r5": 70.0, "i2t_r10": 80.0, "t2i_r1": 30.0,
           "t2i_r5": 60.0, "t2i_r10": 75.0, "rsum": 355.0}
    figure = curves_figure([row])
    loss, recall = figure.axes
    assert len(recall.lines) == 6 and all(len(line.get_xdata()) == 1 for line in recall.lines)
    assert all(line.get_marker() not in (None, "None", "") for line in (*recall.lines, *loss.lines))
    assert sorted(float(line.get_ydata()[0]) for line in recall.lines) == [30, 40, 60, 70, 75, 80]
