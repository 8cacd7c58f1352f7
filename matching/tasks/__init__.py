"""The tasks: everything task-specific, from the config class to the service's answer, behind one interface.

A task is one module under `matching/tasks/` with a class implementing `matching.tasks.base.Task`
(its config class, data files, network, training step, scoring, metrics and their table, search
ranking, the regions a hit shows), and one line in `REGISTRY` below. Code outside the task modules
looks tasks up by name (`get_task`) and never asks which task it holds; `tests/test_tasks.py`
walks the syntax tree of every other module and fails if one compares a task's name.

- ``matching``: one caption ↔ one image (TSHSR, HSR, SGR), `matching.tasks.matching`;
- ``multi-query``: several region queries given in rounds → one image (HMRN), `matching.tasks.multiquery`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# name → "module:class". Adding a task: its module, and one line here.
REGISTRY: dict[str, str] = {
    "matching": "matching.tasks.matching:MatchingTask",
    "multi-query": "matching.tasks.multiquery:MultiQueryTask",
}
DEFAULT_TASK = "matching"  # the task of a config or checkpoint that names none (those before tasks existed)
_LOADED: dict[str, Any] = {}


class UnknownTaskError(ValueError):
    """A task name that is not registered."""


def task_names() -> tuple[str, ...]:
    """The registered task names, in registration order (the `--task` choices)."""
    return tuple(REGISTRY)


def get_task(name: str) -> Any:
    """The task registered as `name` (a `matching.tasks.base.Task`), imported on first use."""
    if name not in REGISTRY:
        raise UnknownTaskError(f"unknown task {name!r}; choose one of {', '.join(REGISTRY)}")
    if name not in _LOADED:
        module, _, attribute = REGISTRY[name].partition(":")
        _LOADED[name] = getattr(importlib.import_module(module), attribute)()
    return _LOADED[name]


def task_of_data(path: str | os.PathLike) -> Any:
    """The task whose data file `path` is (a caption file, a multi-query JSONL file, …)."""
    for name in REGISTRY:
        if get_task(name).reads(path):
            return get_task(name)
    return get_task(DEFAULT_TASK)
