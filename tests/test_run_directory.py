"""A run directory belongs to one run and one process: reuse, locks, resume changes, signals, full disks, logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from matching import checkpoint
from matching.training.loop import train
from matching.training.rundir import RunDirectory, RunError, run_finished
from pipelines.cli import cli
from tests.conftest import toy_config
from tests.smallfs import small_filesystem


def kwargs_for(toy):
    features, captions, vocab = toy
    return dict(features=features, captions=captions, vocab_path=vocab, progress=False, log=lambda line: None)


def cli_args(toy, runs, name, *extra):
    features, captions, vocab = toy
    return ["train", "--features", str(features), "--captions", str(captions), "--vocab", str(vocab),
            "--runs", str(runs), "--name", name, "--embed-size", "64", "--sim-dim", "32", "--word-dim", "32",
            "--batch-size", "24", "--workers", "0", "--lr", "3e-3", "--warmup-epochs", "3", *extra]


def test_the_library_and_the_command_make_the_same_run_directory(toy, tmp_path):
    lines = []
    train(toy_config(epochs=1), run_dir=tmp_path / "lib", **{**kwargs_for(toy), "log": lines.append})
    result = CliRunner().invoke(cli, cli_args(toy, tmp_path, "cli", "--epochs", "1"))
    assert result.exit_code == 0, result.output

    def names(path):
        return sorted("events" if p.name.startswith("events.") else p.name for p in path.iterdir())

    assert names(tmp_path / "lib") == names(tmp_path / "cli") == [
        "checkpoint_last.pt", "config.yaml", "events", "metrics.csv", "model_best.pt", "train.log"]
    logged = (tmp_path / "lib" / "train.log").read_text()
    assert lines and all(line in logged for line in lines)
    assert lines[0].startswith("config model:") and lines[1].startswith("config train:")  # the resolved config
    assert run_finished(tmp_path / "lib") and run_finished(tmp_path / "cli")


def test_a_directory_holding_any_run_file_is_not_overwritten(toy, tmp_path):
    run = RunDirectory(tmp_path / "r")
    train(toy_config(epochs=1), run_dir=run.path, **kwargs_for(toy))
    run.last.unlink()  # model_best.pt, metrics.csv, config.yaml remain
    before = {p.name: p.read_bytes() for p in run.run_files()}
    with pytest.raises(RunError, match=r"a run already exists here \(config.yaml, model_best.pt, metrics.csv"):
        train(toy_config(epochs=1), run_dir=run.path, **kwargs_for(toy))
    assert {p.name: p.read_bytes() for p in run.run_files()} == before
    with pytest.raises(RunError, match="nothing to resume.*stopped before its first checkpoint"):
        train(toy_config(epochs=1), run_dir=run.path, resume=True, **kwargs_for(toy))
    result = train(toy_config(epochs=1), run_dir=run.path, overwrite=True, **kwargs_for(toy))
    assert [int(row["epoch"]) for row in run.read_metrics()] == [1] and result.epochs_done == 1


def test_a_second_process_on_the_same_run_is_refused(toy, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pipelines.cli", *cli_args(toy, tmp_path, "same", "--epochs", "30")]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    # Started moments apart, the second sees the first's lock whatever the first is doing.
    try:
        lock = tmp_path / "same" / ".lock"
        deadline = time.monotonic() + 120
        while not lock.exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert lock.exists(), first.stderr.read() if first.poll() is not None else "no lock file"
        second = CliRunner().invoke(cli, cli_args(toy, tmp_path, "same", "--epochs", "1"))
        assert second.exit_code == 2, second.output
        assert f"in use by {os.uname().nodename}:{first.pid}" in second.output
        assert second.output.count("\n") == 1 and "Traceback" not in second.output
    finally:
        first.kill()
        first.wait(timeout=120)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_run_saves_and_exits_with_the_signal_code(toy, tmp_path, sig, code):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli",
                                *cli_args(toy, tmp_path, "s", "--epochs", "30", "--log-every", "1")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    log = tmp_path / "s" / "train.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and "step 3/" in log.read_text():
            break
        time.sleep(0.05)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == code, output
    assert f"stopped by {signal.Signals(sig).name}" in output
    progress = checkpoint.load_payload(tmp_path / "s" / "checkpoint_last.pt")["progress"]
    assert progress["global_step"] >= 3


def test_batch_jobs_log_steps_with_speed_and_time_left(toy, tmp_path):
    result = CliRunner().invoke(cli, cli_args(toy, tmp_path, "b", "--epochs", "1", "--log-every", "2"))
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if line.startswith("epoch 1/1 step")]
    assert len(steps) >= 2 and all("pairs/s" in line and "epoch ends in" in line for line in steps), result.output
    assert steps[0].startswith("epoch 1/1 step 2/")
    assert "config train: margin=0.2" in result.output


def test_resume_applies_more_epochs_and_refuses_other_changes(toy, tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, cli_args(toy, tmp_path, "r", "--epochs", "1")).exit_code == 0
    features, captions, vocab = toy
    base = ["train", "--features", str(features), "--captions", str(captions), "--vocab", str(vocab),
            "--runs", str(tmp_path), "--name", "r", "--resume"]
    refused = runner.invoke(cli, [*base, "--variant", "sgr", "--embed-size", "48"])
    assert refused.exit_code == 2, refused.output
    assert "--resume cannot change model.embed_size: run has 64, asked 48; model.reasoning: run has 'hsr', " \
           "asked 'sgr'" in refused.output
    nothing = runner.invoke(cli, base)
    assert nothing.exit_code == 0 and "nothing to do: the run has trained all 1 epochs" in nothing.output
    more = runner.invoke(cli, [*base, "--epochs", "2"])
    assert more.exit_code == 0, more.output
    assert "resume: train.epochs 1 → 2" in more.output and "done: 2 epochs" in more.output
    assert [int(row["epoch"]) for row in RunDirectory(tmp_path / "r").read_metrics()] == [1, 2]


def test_init_from_starts_a_new_run_from_another_checkpoint(toy, tmp_path):
    source = train(toy_config(epochs=1), run_dir=tmp_path / "a", **kwargs_for(toy))
    lines = []
    train(toy_config(epochs=1, learning_rate=1e-12, checkpoint_every=1), run_dir=tmp_path / "b", max_steps=1,
          init_from=source.run_dir / "model_best.pt", requested={}, **{**kwargs_for(toy), "log": lines.append})
    assert any("starting from the weights of" in line for line in lines)
    a = checkpoint.load_payload(tmp_path / "a" / "model_best.pt")["model"]
    b = checkpoint.load_payload(tmp_path / "b" / "checkpoint_last.pt")["model"]
    moved = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point()
                and "running" not in k)  # batch-norm statistics follow the data, not the optimizer
    assert moved < 1e-6  # one step at lr 1e-12 from the source's weights


def test_a_full_disk_ends_in_one_line_and_leaves_no_temporary_file(toy, tmp_path):
    with small_filesystem(tmp_path / "small", megabytes=1) as mount:
        # A model of several MB cannot be saved on 1 MB: the first checkpoint fails.
        result = CliRunner().invoke(cli, [*cli_args(toy, mount, "full", "--epochs", "1"), "--embed-size", "256"])
        assert result.exit_code == 2, result.output
        error = result.output.strip().splitlines()[-1]
        assert error.startswith(f"Error: {mount / 'full'}/") and "device" in error and "Traceback" not in result.output
        assert not [p for p in (mount / "full").iterdir() if p.name.endswith(".tmp")]
        resumed = CliRunner().invoke(cli, [*cli_args(toy, mount, "full"), "--resume"])
        assert resumed.exit_code == 2 and "nothing to resume" in resumed.output


def test_devices_this_machine_lacks_are_one_line(toy, tmp_path):
    for device, message in (("gpu", "not a device; use auto, cpu, cuda or cuda:N"),
                            *([("cuda", "CUDA is not available")] if not torch.cuda.is_available() else [])):
        result = CliRunner().invoke(cli, [*cli_args(toy, tmp_path, "d", "--epochs", "1"), "--device", device])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
