"""`tshsr-pipe run` and `demo`: stages skipped when up to date, resumed after a crash; every --help."""

from __future__ import annotations

import os
import re
import time

import pytest
from click.testing import CliRunner

from pipelines.cli import cli
from pipelines.errors import PipelineError
from pipelines.run import PipelineSpec, run_pipeline
from pipelines.synthetic import make_scenes, write_feature_dataset
from tests.conftest import SMALL_MODEL

TRAIN = {"epochs": 2, "batch_size": 24, "learning_rate": 3e-3, "warmup_epochs": 2, "workers": 0,
         "checkpoint_every": 0}


def spec_for(tmp_path, features):
    return PipelineSpec(workdir=tmp_path / "work", captions=features / "captions.jsonl", features=features,
                        name="t", vocab={"threshold": 1}, model=dict(SMALL_MODEL), train=dict(TRAIN),
                        evaluate={"split": "test", "protocol": "full"})


def stages(lines):
    return {line.split(":")[0]: line for line in lines if line.split(":")[0] in
            ("extract", "vocab", "train", "evaluate")}


def test_second_run_skips_every_stage_and_changed_inputs_rerun(tmp_path):
    features = write_feature_dataset(tmp_path / "f", make_scenes(80, seed=2), feature_dim=32, seed=2)
    spec = spec_for(tmp_path, features)
    first = []
    results = run_pipeline(spec, log=first.append, progress=False)
    assert set(results) == {"full"} and (spec.run_dir / "model_best.pt").exists()
    assert "training" in stages(first)["train"]
    again = []
    assert run_pipeline(spec, log=again.append, progress=False) == results
    assert all("up to date" in line or "skipped" in line for line in stages(again).values()), again
    time.sleep(0.01)
    os.utime(spec.captions)  # newer captions: the vocabulary and everything after it are stale
    third = []
    run_pipeline(spec, log=third.append, progress=False)
    logged = stages(third)
    assert "words" in logged["vocab"] and "up to date" not in logged["evaluate"]
    forced = []
    run_pipeline(spec, force=("evaluate",), log=forced.append, progress=False)
    assert "up to date" in stages(forced)["train"] and "up to date" not in stages(forced)["evaluate"]


def test_edited_settings_rerun_their_stage_and_typos_are_refused_before_any_work(tmp_path):
    features = write_feature_dataset(tmp_path / "f", make_scenes(60, seed=6), feature_dim=32, seed=6)
    spec = spec_for(tmp_path, features)
    spec.train.update(epochs=1, warmup_epochs=1)
    run_pipeline(spec, log=lambda line: None, progress=False)
    assert (spec.run_dir / "train.log").exists()  # the library logs the run, whoever starts it
    spec.train["epochs"] = 2
    spec.model["embed_size"] = 48
    lines = []
    run_pipeline(spec, log=lines.append, progress=False)
    logged = stages(lines)
    assert "up to date" in logged["vocab"] and "training" in logged["train"], lines
    changed = next(line for line in lines if "starting" in line)
    assert "config.model.embed_size 64 → 48" in changed and "config.train.epochs 1 → 2" in changed, changed
    assert "up to date" not in logged["evaluate"]
    from matching.training.rundir import RunDirectory

    assert [int(r["epoch"]) for r in RunDirectory(spec.run_dir).read_metrics()] == [1, 2]
    for section, typo, message in (("vocab", {"treshold": 1}, "unknown vocab option(s): treshold"),
                                   ("train", {"epocs": 1}, "unknown field(s) train.epocs"),
                                   ("model", {"embed": 3}, "unknown field(s) model.embed"),
                                   ("evaluate", {"protocl": "full"}, "unknown field(s) evaluate.protocl"),
                                   ("evaluate", {"protocol": "coco2k"}, "evaluate.protocol = 'coco2k'")):
        broken = spec_for(tmp_path, features)
        getattr(broken, section).update(typo)
        with pytest.raises(PipelineError, match=re.escape(message)):
            run_pipeline(broken, log=lambda line: None, progress=False)
    spec.vocab["threshold"] = 2  # a fixed typo with a new value rebuilds the vocabulary
    lines = []
    run_pipeline(spec, log=lines.append, progress=False)
    assert "threshold 2" in stages(lines)["vocab"]


def test_a_crash_in_training_is_resumed_by_running_again(tmp_path, monkeypatch):
    import matching.tasks.matching as training

    features = write_feature_dataset(tmp_path / "f", make_scenes(80, seed=3), feature_dim=32, seed=3)
    spec = spec_for(tmp_path, features)
    real_step, calls = training.train_step, {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint of step 3, in the middle of the first epoch
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    spec.train.update(batch_size=32, checkpoint_every=3)
    monkeypatch.setattr(training, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(spec, log=lambda line: None, progress=False)
    assert (spec.run_dir / "checkpoint_last.pt").exists() and not spec.metrics_path.exists()
    monkeypatch.setattr(training, "train_step", real_step)
    lines = []
    run_pipeline(spec, log=lines.append, progress=False)
    assert any(line.startswith("resuming") and "batch 3" in line for line in lines), lines
    assert "up to date" in stages(lines)["vocab"] and spec.metrics_path.exists()


def test_pipeline_file_and_its_errors(tmp_path):
    features = write_feature_dataset(tmp_path / "f", make_scenes(40, seed=4), feature_dim=16, seed=4)
    (tmp_path / "p.yaml").write_text(f"workdir: w\ncaptions: {features}/captions.jsonl\nfeatures: {features}\n"
                                     "bogus: 1\n")
    with pytest.raises(PipelineError, match="unknown pipeline field"):
        PipelineSpec.from_file(tmp_path / "p.yaml")
    (tmp_path / "q.yaml").write_text("workdir: w\ncaptions: c.jsonl\nfeatures: nowhere\n")
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "q.yaml")])
    assert result.exit_code == 2 and "nowhere: no features and no 'images'" in result.output


def test_fast_demo_learns_far_above_chance(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--fast", "--out", str(tmp_path / "demo"), "--images", "120"])
    assert result.exit_code == 0, result.output
    model = next(line for line in result.output.splitlines() if line.startswith("model"))
    chance = next(line for line in result.output.splitlines() if line.startswith("chance"))
    rsum, chance_rsum = float(model.split()[-1]), float(chance.split()[-1])
    assert rsum > chance_rsum + 250, result.output  # chance is about 240 with 12 test images
    assert float(model.split()[1]) > 50  # i2t R@1, chance about 8


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_explains_itself(command):
    """Every command (the list is read from the CLI, so a new one is checked too) answers --help with its
    purpose, and every one of its options and arguments says what it is for."""
    import click

    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0 and result.output.startswith(f"Usage: cli {command}"), result.output
    summary = (cli.commands[command].help or "").strip().splitlines()[0]
    assert len(summary) > 20 and summary in " ".join(result.output.split()), (command, summary)
    for param in cli.commands[command].params:
        if isinstance(param, click.Option):
            assert param.help and len(param.help) > 10 or param.name == "help", (command, param.name)
            assert param.opts[-1] in result.output, (command, param.opts)
        else:  # an argument: the command's docstring names it
            assert param.name.upper() in cli.commands[command].help, (command, param.name)


def test_pipeline_from_raw_images_extracts_once(tmp_path, published_weights):
    from pipelines.synthetic import write_image_dataset

    scenes = make_scenes(40, seed=5)
    images = write_image_dataset(tmp_path / "data", scenes, size=96)
    spec = PipelineSpec(workdir=tmp_path / "work", captions=tmp_path / "data" / "captions.jsonl",
                        features=tmp_path / "work" / "features", images=images, name="px", vocab={"threshold": 1},
                        model=dict(SMALL_MODEL), train={**TRAIN, "epochs": 1, "warmup_epochs": 1},
                        extract={"weights": str(published_weights), "min_size": 96, "max_size": 96,
                                 "rois": 2, "num_boxes": 2, "workers": 0},
                        evaluate={"split": "test", "protocol": "full"})
    first = []
    run_pipeline(spec, log=first.append, progress=False)
    assert "40 images extracted" in stages(first)["extract"]
    from extract.shards import FeatureStore

    store = FeatureStore(spec.features)
    assert len(store) == 40 and store.max_boxes == 2 and store.feature_dim == 2048
    again = []
    run_pipeline(spec, log=again.append, progress=False)
    assert "up to date" in stages(again)["extract"] and "up to date" in stages(again)["train"]
    spec.extract["bogus_option"] = 1
    with pytest.raises(PipelineError, match="unknown extract option"):
        run_pipeline(spec, log=lambda line: None, progress=False)
