"""Tasks are looked up by name and never asked which they are: a third task plugs in with one registration."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from matching.tasks import REGISTRY, get_task, task_names
from matching.tasks.matching import MatchingTask

ROOT = Path(__file__).resolve().parent.parent
TASK_MODULES = ROOT / "matching" / "tasks"
MODEL_CLASSES = {"TSHSR", "HMRN"}  # asking isinstance(model, HMRN) asks which task it is


def task_questions(source: str, names: set[str]) -> list[str]:
    """The places in `source` that compare something with a task's name, or ask which task's model it holds."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            constants = [c for o in operands for c in ([o] if isinstance(o, ast.Constant) else
                                                         getattr(o, "elts", []))]
            if any(isinstance(c, ast.Constant) and c.value in names for c in constants):
                found.append(f"line {node.lineno}: compares with a task name")
        elif isinstance(node, ast.MatchValue) and isinstance(node.value, ast.Constant) and node.value.value in names:
            found.append(f"line {node.lineno}: matches a task name")
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2
              and {getattr(n, "id", getattr(n, "attr", None)) for n in [node.args[1], *getattr(node.args[1], "elts",
                                                                                                []) ]} & MODEL_CLASSES):
            found.append(f"line {node.lineno}: asks which task's model it holds")
    return found


def test_the_checker_sees_each_way_of_asking():
    names = set(task_names())
    assert task_questions('if config.task == "multi-query": pass', names)
    assert task_questions('multi = task in ("matching", "other")', names)
    assert task_questions('if "multi-query" != config.task: pass', names)
    assert task_questions('match task:\n    case "matching": pass', names)
    assert task_questions('if isinstance(model, HMRN): pass', names)
    assert not task_questions('if config.task == other.task: pass', names)
    assert not task_questions('get_task("matching")', names)


def test_no_code_outside_the_task_modules_asks_which_task_it_holds():
    names = set(task_names())
    offenders = {}
    for package in ("extract", "matching", "pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if TASK_MODULES in path.parents:
                continue
            found = task_questions(path.read_text(encoding="utf-8"), names)
            if found:
                offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}, offenders


class CopyOfMatching(MatchingTask):
    """A third task, as a newcomer would add one: its own module (here, this test's) and one registry line."""

    name = "copy-of-matching"
    run_prefix = "copy"


@pytest.fixture
def registered(monkeypatch):
    from matching import tasks

    monkeypatch.setitem(REGISTRY, CopyOfMatching.name, "tests.test_tasks:CopyOfMatching")
    monkeypatch.setattr(tasks, "_LOADED", {})
    return CopyOfMatching.name


def test_a_third_task_trains_evaluates_and_searches_with_one_registration(registered, toy, tmp_path):
    from matching import checkpoint
    from matching.config import Config, EvaluationSettings
    from matching.retrieval.evaluate import evaluate_checkpoint
    from matching.retrieval.search import SearchEngine
    from matching.training.loop import train_from_choices

    features, captions, vocab = toy
    assert registered in task_names() and isinstance(get_task(registered), CopyOfMatching)
    assert Config.default(registered).task == registered
    result = train_from_choices(features=features, captions=captions, vocab_path=vocab, runs_dir=tmp_path,
                                task=registered, flags={"embed_size": 32, "sim_dim": 16, "word_dim": 16,
                                                        "batch_size": 24, "workers": 0, "epochs": 1},
                                max_steps=3, device="cpu", progress=False, log=lambda line: None)
    assert result.run_dir.name.startswith("copy-")
    _, config, _ = checkpoint.load(result.run_dir / "checkpoint_last.pt")
    assert config.task == registered
    outcome = evaluate_checkpoint(result.run_dir / "checkpoint_last.pt", features, captions, device="cpu",
                                  settings=EvaluationSettings(split="test", protocol="full"))
    assert outcome.task == registered and set(outcome.results) == {"full"}
    engine = SearchEngine.open(result.run_dir / "checkpoint_last.pt", features, device="cpu")
    assert engine.info.task == registered and len(engine.search_text("a red circle", 3).hits) == 3
