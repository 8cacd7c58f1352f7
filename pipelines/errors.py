"""User mistakes become one line on stderr and exit code 2; bugs keep their traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class PipelineError(ValueError):
    """A pipeline description that cannot run; the message names the field or file."""


class StageStopped(Exception):
    """A pipeline stage stopped by SIGINT/SIGTERM after saving; the command exits 130 or 143."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class UserError(click.ClickException):
    """Printed as ``Error: message`` with exit code 2."""

    exit_code = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    """The library's error classes that describe bad input rather than a bug."""
    from extract.config import ExtractError
    from extract.runtime import DeviceError
    from extract.safeio import LockedError, StorageError
    from extract.shards import ShardFormatError
    from matching.checkpoint import CheckpointError
    from matching.config import ConfigError
    from matching.data.captions import CaptionFormatError
    from matching.data.text import VocabularyError
    from matching.retrieval.gallery import SearchIndexError
    from matching.retrieval.metrics import MetricsError
    from matching.retrieval.search import QueryError
    from matching.retrieval.shortlist import NoFirstStageError
    from matching.training.rundir import RunError

    return (ExtractError, DeviceError, StorageError, LockedError, ShardFormatError, CaptionFormatError,
            CheckpointError, ConfigError, VocabularyError, RunError, MetricsError, QueryError, SearchIndexError,
            NoFirstStageError, PipelineError, FileNotFoundError, IsADirectoryError, PermissionError)


def user_errors(command: F) -> F:
    """Decorator for click commands: known input errors → UserError (one line, exit 2)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise
        except StageStopped as stopped:  # saved; the shell learns which signal stopped it
            from extract.runtime import exit_code

            click.echo(str(stopped))
            raise SystemExit(exit_code(stopped.signum)) from None
        except user_error_types() as error:
            from extract.safeio import StorageError

            lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            # An error raised in a DataLoader worker arrives as "Caught X in DataLoader worker process N."
            # followed by the worker's traceback, whose last line is the original message.
            message = (lines[-1].split(": ", 1)[-1] if lines[0].startswith("Caught ") else lines[0]) if lines \
                else type(error).__name__
            if isinstance(error, OSError) and not isinstance(error, StorageError) and error.filename:
                message = f"{error.filename}: {error.strerror}"
            raise UserError(message) from None

    return wrapper  # type: ignore[return-value]
