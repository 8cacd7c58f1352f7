"""Training: it learns, it resumes exactly, it writes its run directory, it reports collapse."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from click.testing import CliRunner

from matching import checkpoint
from matching.config import Config, ConfigError, resolve_config
from matching.text import Vocabulary
from matching.training import RunError, learning_rate, train
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


def test_collapse_is_reported_with_the_remedy(toy, tmp_path, monkeypatch):
    import matching.training as training

    monkeypatch.setattr(training, "train_step", lambda *args, **kwargs: (12.8, 0.0))
    lines = []
    train(toy_config(epochs=1, warmup_epochs=0), features=toy[0], captions=toy[1], vocab_path=toy[2],
          run_dir=tmp_path / "c", progress=False, log=lines.append, max_steps=25)
    warnings = [line for line in lines if "collapsed" in line]
    assert len(warnings) == 1 and "--warmup-epochs" in warnings[0] and "2·B·margin" in warnings[0]


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
