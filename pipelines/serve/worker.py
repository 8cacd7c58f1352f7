"""One worker thread for every model call, fed by a bounded queue.

Requests arrive concurrently on the event loop; the model, its encoded gallery and the
HDF5 feature store are used by this one thread only, so concurrent requests neither race
on the model's state nor each allocate their own working memory. A full queue is refused
at once (`WorkerBusy`, a 503) instead of piling up latency and memory.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class WorkerBusy(RuntimeError):
    """The queue is full: the request was not accepted."""


class WorkerStopped(RuntimeError):
    """The worker is shutting down: no new work is accepted."""


class ModelWorker:
    """Runs submitted calls one at a time, in order, on its own thread.

    `queue_size` calls may wait while one runs; `submit` beyond that raises WorkerBusy.
    """

    def __init__(self, queue_size: int, name: str = "tshsr-model") -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        self.queue_size = queue_size
        self._queue: queue.Queue[tuple[Future, Callable[..., Any], tuple] | None] = queue.Queue(queue_size)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> ModelWorker:
        """Start the thread (once; a started worker is returned as it is)."""
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def call(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `call` on the worker thread and wait for it: its result, or its exception raised here."""
        return self.submit(functools.partial(call, *args, **kwargs)).result()

    @property
    def waiting(self) -> int:
        """Calls queued and not yet started."""
        return self._queue.qsize()

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident

    def submit(self, call: Callable[..., T], *args: Any) -> Future[T]:
        """Queue `call(*args)`; its Future resolves on the worker thread."""
        if self._stopping.is_set():
            raise WorkerStopped("the server is shutting down")
        future: Future[T] = Future()
        try:
            self._queue.put_nowait((future, call, args))
        except queue.Full:
            raise WorkerBusy(f"busy: {self.queue_size} requests are already waiting; try again shortly") from None
        return future

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, call, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call(*args))
            except BaseException as error:  # handed to the waiting request, which reports it
                future.set_exception(error)

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the waiting calls, let the running one finish (up to `timeout` s) and end the thread."""
        self._stopping.set()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
