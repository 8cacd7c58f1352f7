"""Process-level facts every long-running workflow needs: the torchrun layout, stop signals, progress.

- `Launch.from_env()` reads the layout torchrun puts in the environment (RANK,
  WORLD_SIZE, LOCAL_RANK); extraction splits its images by it and training and
  evaluation join a process group with it.
- `StopSignals` turns SIGINT (Ctrl-C) and SIGTERM (a batch scheduler) into a request to
  stop: either a flag the loop polls between steps, or an exception raised at once.
  It remembers the signal, so a command can exit 130 (SIGINT) or 143 (SIGTERM) after
  saving, and `train && evaluate` does not go on with a half-trained model.
- `resolve_device` turns ``--device auto|cpu|cuda|cuda:N`` into a torch device, with a
  one-line `DeviceError` for a device this machine does not have.
- `progress_bar` is the one progress bar: shown on a terminal, silent otherwise (batch jobs
  log lines instead).

Standard library only (torch and tqdm are imported where used): a leaf below every package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes torchrun started (a single process when none)."""

    rank: int = 0  # global rank, 0 … world_size − 1
    world_size: int = 1  # processes in all
    local_rank: int = 0  # rank on this machine: the GPU it takes

    @classmethod
    def from_env(cls) -> Launch:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A --device this machine cannot provide; the message says what there is."""


def resolve_device(name: str, launch: Launch | None = None) -> Any:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` → torch.device; DeviceError otherwise.

    Under torchrun a plain ``cuda`` (or ``auto`` on a GPU machine) is ``cuda:LOCAL_RANK``.
    """
    import torch

    launch = launch or Launch.from_env()
    text = str(name).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise DeviceError(f"--device {name!r}: not a device; use {DEVICE_CHOICES}")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    count = torch.cuda.device_count()
    if text == "cuda":
        return torch.device("cuda", launch.local_rank % count)
    index = int(text[5:])
    if index >= count:
        raise DeviceError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 … cuda:{count - 1}")
    return torch.device("cuda", index)


class Stopped(KeyboardInterrupt):
    """Raised by `StopSignals(raise_now=True)` on the first signal; a KeyboardInterrupt, so cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int | None) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 0 if signum is None else 128 + int(signum)


class StopSignals:
    """SIGINT and SIGTERM as a stop request, for the duration of a `with` block on the main thread.

    With ``raise_now=False`` the first signal sets `requested` (the loop stops at its next
    safe point and saves) and a second one raises KeyboardInterrupt at once. With
    ``raise_now=True`` the first signal raises `Stopped` where the code is. `signum` is
    the first signal received (None if none), for `exit_code`. Off the main thread it does
    nothing (Python delivers signals to the main thread only).
    """

    def __init__(self, raise_now: bool = False) -> None:
        self.raise_now = raise_now
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self.raise_now or not first:
            raise Stopped(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@contextlib.contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM back during a step that must not be cut (committing a shard, a checkpoint).

    The signals received meanwhile are listed in the yielded list; the caller decides what
    they mean once the step is done.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interactive() -> bool:
    """True when stderr is a terminal (progress bars); False in batch jobs and pipes (log lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True, leave: bool = False) -> Any:
    """A tqdm bar on a terminal; a silent stand-in when `enabled` is False or stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave, smoothing=0.1,
                disable=not (enabled and interactive()))
