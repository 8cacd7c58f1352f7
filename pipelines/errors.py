"""User mistakes become one line on stderr and exit code 2; bugs keep their traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


class PipelineError(ValueError):
    """A pipeline description that cannot run; the message names the field or file."""


class UserError(click.ClickException):
    """Printed as ``Error: message`` with exit code 2."""

    exit_code = 2


def user_error_types() -> tuple[type[BaseException], ...]:
    """The library's error classes that describe bad input rather than a bug."""
    from extract.config import ExtractError
    from extract.runtime import DeviceError
    from extract.safeio import LockedError, StorageError
    from extract.shards import ShardFormatError
    from matching.captions import CaptionFormatError
    from matching.checkpoint import CheckpointError
    from matching.config import ConfigError
    from matching.evaluation import MetricsError
    from matching.index import SearchIndexError
    from matching.inference import QueryError
    from matching.rundir import RunError
    from matching.text import VocabularyError

    return (ExtractError, DeviceError, StorageError, LockedError, ShardFormatError, CaptionFormatError,
            CheckpointError, ConfigError, VocabularyError, RunError, MetricsError, QueryError, SearchIndexError,
            PipelineError, FileNotFoundError, IsADirectoryError, PermissionError)


def user_errors(command: F) -> F:
    """Decorator for click commands: known input errors → UserError (one line, exit 2)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise
        except user_error_types() as error:
            from extract.safeio import StorageError

            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if isinstance(error, OSError) and not isinstance(error, StorageError) and error.filename:
                message = f"{error.filename}: {error.strerror}"
            raise UserError(message) from None

    return wrapper  # type: ignore[return-value]
