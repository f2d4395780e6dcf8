"""The single inference worker: one thread owns the engine and runs queued jobs in order.

Requests never run the model on the event loop: they put a job on a bounded queue and await
its future, so ``/health`` and the docs stay responsive whatever the load. A full queue raises
:class:`cryolens.errors.Busy` (503 with ``Retry-After``).

Micro-batching across requests slots in at :meth:`InferenceWorker._take`: it may drain every
waiting job with the same ``batch_key`` and hand them to :meth:`_execute` as one group, which
would concatenate their volumes into one engine call and split the results.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryolens.errors import Busy

if TYPE_CHECKING:
    from cryolens.engine import Engine

logger = logging.getLogger("cryolens.server")

#: Seconds :meth:`InferenceWorker.stop` waits for the running job before giving up on it.
STOP_TIMEOUT_S = 30.0
_STOP = object()


@dataclass
class Job:
    """``run(engine)`` on the worker thread; its result or exception resolves ``future``."""

    run: Callable[[Engine], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    batch_key: Hashable | None = None
    enqueued_at: float = field(default_factory=time.monotonic)


class InferenceWorker:
    """Owns the engine; at most ``queue_size`` jobs wait, one runs."""

    def __init__(self, engine: Engine, queue_size: int, retry_after_s: int = 5) -> None:
        self.engine = engine
        self.retry_after_s = retry_after_s
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._loop, name="cryolens-inference", daemon=True)
        self.busy = False

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            logger.warning("inference queue still full at shutdown; not waiting for it")
            return
        self._thread.join(timeout)

    async def submit(self, run: Callable[[Engine], Any], batch_key: Hashable | None = None
                     ) -> Any:
        """Queue ``run(engine)`` and wait for its result; raise :class:`Busy` when full."""
        loop = asyncio.get_running_loop()
        job = Job(run=run, future=loop.create_future(), loop=loop, batch_key=batch_key)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"the inference queue is full ({self._queue.maxsize} jobs waiting); "
                       f"retry in {self.retry_after_s} s") from None
        return await job.future

    # -- worker thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            self.busy = True
            try:
                self._execute(jobs)
            finally:
                self.busy = False

    def _take(self) -> list[Job] | None:
        item = self._queue.get()
        if item is _STOP:
            return None
        return [item]

    def _execute(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.future.cancelled():  # the client went away while the job waited
                continue
            started = time.monotonic()
            result, error = None, None
            try:
                result = job.run(self.engine)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
                error = exc
            try:
                job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
            except RuntimeError:  # the event loop closed while the job ran (shutdown)
                pass
            logger.debug("job waited %.3f s, ran %.3f s", started - job.enqueued_at,
                         time.monotonic() - started)


def _resolve(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
