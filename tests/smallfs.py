"""A small file system made by the test itself, to see what a full disk does (skipped where mounting is not allowed)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(path: Path, megabytes: int = 1) -> Iterator[Path]:
    """A tmpfs of `megabytes` mounted at `path` for the duration of the block.

    Mounting needs root (CI and the development machines run as root); elsewhere the
    test is skipped, and the run's summary (pytest -ra) says so and why.
    """
    import os

    path.mkdir(parents=True, exist_ok=True)
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        pytest.skip(f"full-disk test: mounting a {megabytes} MB tmpfs needs root (running as uid {os.geteuid()})")
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"full-disk test: cannot mount a {megabytes} MB tmpfs here ({error})")
    if mounted.returncode != 0:
        pytest.skip(f"full-disk test: cannot mount a {megabytes} MB tmpfs here "
                    f"({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
