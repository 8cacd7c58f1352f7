"""A training run's directory: its files, the one process that may write it, its log and its metrics.

``runs/NAME/`` holds::

    config.yaml          the resolved Config (written at the start, rewritten when a resume changes it)
    checkpoint_last.pt   model, optimizer, epoch, position in the epoch, RNG states: the resume point
    model_best.pt        the best epoch by validation rsum (a plain checkpoint)
    metrics.csv          one row per finished epoch (the matching task's columns: `METRICS_FIELDS`)
    train.log            every log line, with its time
    events.*             TensorBoard scalars
    .lock                held while a process trains here (host:pid)

`matching.training.loop` writes it; `pipelines.run` asks `run_finished`; `tshsr-pipe report`
reads `read_metrics`. Nobody else spells these names.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extract.safeio import DirectoryLock, storage_failure, write_text

CONFIG = "config.yaml"
LAST = "checkpoint_last.pt"
BEST = "model_best.pt"
METRICS = "metrics.csv"
LOG = "train.log"
LOCK = ".lock"
EVENTS = "events.out.tfevents.*"
RECALL_FIELDS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
ROW_START = ("epoch", "step", "lr", "train_loss")  # then the task's validation columns (matching: recalls, rsum)
ROW_END = ("best_rsum", "seconds")
METRICS_FIELDS = (*ROW_START, *RECALL_FIELDS, "rsum", *ROW_END)  # the matching task's columns


class RunError(ValueError):
    """A run directory cannot be used as asked (taken, holds another run, nothing to resume)."""


@dataclass(frozen=True)
class RunDirectory:
    """The paths of one run and the operations on its files."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def log_file(self) -> Path:
        return self.path / LOG

    def run_files(self) -> list[Path]:
        """The files of a run present here (an empty or unrelated directory has none)."""
        if not self.path.is_dir():
            return []
        named = [self.path / name for name in (CONFIG, LAST, BEST, METRICS, LOG)]
        return [p for p in named if p.exists()] + sorted(self.path.glob(EVENTS))

    def lock(self) -> DirectoryLock:
        return DirectoryLock(self.path, LOCK, what="run directory")

    def clear(self) -> None:
        """Remove the run's files (for --overwrite); other files in the directory are left alone."""
        for path in self.run_files():
            path.unlink()

    def log(self, line: str) -> None:
        """Append a time-stamped line to train.log."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.log_file, "a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        except OSError as error:
            raise storage_failure(error, self.log_file) or error from None

    def write_config(self, config: Any) -> None:
        import yaml

        write_text(self.config, yaml.safe_dump(config.to_dict(), sort_keys=False))

    def read_metrics(self) -> list[dict[str, float]]:
        """The metrics rows, by column name (an empty cell is left out of its row)."""
        if not self.metrics.exists():
            return []
        with open(self.metrics, encoding="utf-8") as handle:
            return [{k: float(v) for k, v in row.items() if k and v not in ("", None)}
                    for row in csv.DictReader(handle)]

    def write_metrics(self, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
        """Rewrite metrics.csv atomically with `rows` (so a crash never leaves half a row).

        `fields` are the task's validation columns, between the loss and best_rsum.
        """
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*ROW_START, *fields, *ROW_END], extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        write_text(self.metrics, buffer.getvalue())

    def metric_fields(self) -> tuple[str, ...]:
        """The validation columns of the existing metrics.csv (none when there is no file)."""
        if not self.metrics.exists():
            return ()
        with open(self.metrics, encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        return tuple(name for name in header if name not in (*ROW_START, *ROW_END))

    def append_metrics(self, row: dict[str, Any], fields: tuple[str, ...]) -> None:
        self.write_metrics([*self.read_metrics(), row], fields)

    def keep_metrics_until(self, epoch: int) -> None:
        """Drop rows after `epoch` (a run resumed from a checkpoint older than its last row)."""
        rows = self.read_metrics()
        if any(int(row["epoch"]) > epoch for row in rows):
            self.write_metrics([row for row in rows if int(row["epoch"]) <= epoch], self.metric_fields())


def run_finished(run_dir: str | os.PathLike) -> bool:
    """True when the run in `run_dir` has trained every epoch its config asks for."""
    run = RunDirectory(Path(run_dir))
    if not (run.last.exists() and run.best.exists()):
        return False
    from matching import checkpoint

    payload = checkpoint.load_payload(run.last, mmap=True)
    return int(payload["progress"]["epoch"]) >= int(payload["config"]["train"]["epochs"])


def new_run_name(prefix: str) -> str:
    """A fresh run name: the prefix (the variant) and the local time, e.g. tshsr-20261123-194501."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
