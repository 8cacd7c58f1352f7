"""Writing files safely, for every package: atomic replacement, one clear error for a full disk, locks.

Every file the tool writes (shard manifests, checkpoints, vocabularies, search indexes,
metrics JSON, score matrices) goes through `atomic_write`: the bytes go to a temporary
file in the target's directory, are flushed to the disk (fsync), and only then replace the
target with `os.replace`. A reader sees the old file or the new one, never half of one; a
kill or a full disk leaves the previous good file in place and no temporary file behind.

A write that fails because the device is full, read-only or broken raises `StorageError`,
whose message is one line naming the path: the CLI prints it and exits with code 2.

`DirectoryLock` gives a directory (a training run) to one process at a time.

This module needs nothing but the standard library, so `extract`, `matching` and
`pipelines` all use it (docs/architecture.md: it is a leaf below every package).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# errno values that mean "the storage failed", not "the program is wrong".
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.ENOMEM}


class StorageError(OSError):
    """Writing a file failed for a reason of the storage (full, read-only, I/O error); names the path."""

    def __init__(self, message: str, errno_value: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def storage_failure(error: BaseException, path: str | os.PathLike) -> StorageError | None:
    """The StorageError that `error` amounts to when it was raised while writing `path`, else None.

    Besides OSError with a storage errno, this recognises the RuntimeErrors that torch's and
    HDF5's writers raise when the disk fills under them ("file write failed", "No space left").
    """
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, StorageError):
            return cause
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
            return StorageError(f"{path}: {os.strerror(cause.errno).lower()}; nothing was written "
                                "(the previous file, if any, is intact)", cause.errno)
        cause = cause.__cause__ or cause.__context__
    if not isinstance(error, (RuntimeError, OSError)):
        return None
    text = str(error)
    free = _free_bytes(Path(path).parent)
    # numpy ("N requested and M written"), torch ("file write failed") and HDF5 report a short
    # write without an errno; an exhausted device is the cause when the device has no room left.
    if any(marker in text for marker in ("write failed", "No space left", "Disk quota", "errno = 28",
                                         "Can't write data", "requested and")) or (free is not None and free < 1 << 16):
        room = f" ({free} bytes free on that device)" if free is not None else ""
        return StorageError(f"{path}: writing failed, the device is probably full{room}; nothing was written "
                            "(the previous file, if any, is intact)", errno.ENOSPC)
    return None


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` that replaces it (after fsync) when the block succeeds.

    On any failure the temporary file is removed and `path` keeps its previous content;
    storage failures become `StorageError`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, target)
    except BaseException as error:
        failure = storage_failure(error, target)  # before the unlink frees the space again
        tmp.unlink(missing_ok=True)
        if failure is not None and failure is not error:
            raise failure from None
        raise
    _fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; on success it replaces `path` (after fsync).

    On any failure the temporary file is removed and `path` keeps its previous content;
    storage failures become `StorageError`.
    """
    with _replacing(path) as tmp, open(tmp, mode, encoding=encoding if "b" not in mode else None) as handle:
        yield handle


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Atomic replacement for writers that want a file name rather than a handle (h5py, savefig).

    `write(tmp_path)` creates the temporary file; it is fsynced and renamed onto `path`.
    """
    with _replacing(path) as tmp:
        write(tmp)
    return Path(path)


@contextlib.contextmanager
def replacing_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A new directory built beside `path` that replaces it (file or directory) when the block succeeds.

    The block writes its files into the yielded temporary directory; on success every file in it is
    flushed to the disk, `path` (if any) is moved aside, the new directory renamed into place and the
    old one removed, so a reader sees the old tree or the new one. On any failure the temporary
    directory is removed and `path` is left as it was; storage failures become `StorageError` naming
    the file that could not be written (the caller's, or the directory).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        for item in tmp.rglob("*"):
            if item.is_file():
                with open(item, "rb+") as handle:
                    os.fsync(handle.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.{os.getpid()}.old"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException as error:
        failure = storage_failure(error, target)
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None and failure is not error:
            raise failure from None
        raise
    _fsync_directory(target.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) atomically."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, payload: Any, indent: int | None = 2) -> Path:
    """Replace `path` with `payload` as JSON atomically."""
    return write_text(path, json.dumps(payload, indent=indent) + "\n")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (best effort: some file systems refuse a directory fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM
    return True


class LockedError(RuntimeError):
    """Another live process holds the lock; the message names the directory, host and pid."""


class DirectoryLock:
    """Exclusive use of a directory by one process, through a lock file holding the holder's host and pid.

    The lock is an `flock` on the file, which the kernel drops when the holder dies, so a
    lock file left by a killed process is stale and taken over without asking. Used as a
    context manager; `acquire` raises LockedError naming the live holder.
    """

    def __init__(self, directory: str | os.PathLike, name: str = ".lock", what: str = "directory") -> None:
        self.directory = Path(directory)
        self.path = self.directory / name
        self.what = what
        self._handle: IO[str] | None = None

    def holder(self) -> str:
        """"host:pid" of the process named in the lock file ('' when unknown)."""
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except OSError:
            return ""

    def acquire(self) -> DirectoryLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                holder = self.holder() or "another process"
                raise LockedError(f"{self.directory}: this {self.what} is in use by {holder} (lock file "
                                  f"{self.path.name}); wait for it to finish or use another directory") from None
            try:  # the holder may have released and unlinked the file between our open and flock
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()}:{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
