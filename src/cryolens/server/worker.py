"""The single inference worker: one thread owns the engine and runs queued jobs, batched.

Requests never run the model on the event loop: they put a :class:`Job` (an operation and its
volumes: data, not a closure) on a bounded queue and await its future, so ``/health`` stays
responsive whatever the load. The worker takes the oldest job, gathers every waiting job with
the same operation (up to ``max_batch`` particles, waiting at most ``batch_wait_s`` for
requests whose bodies are still being read),
runs them as one engine call and splits the results. A full queue raises
:class:`~cryolens.errors.Busy` (503); a job whose deadline passed while it waited is answered
:class:`~cryolens.errors.InferenceTimeout` (504) and never run; a job whose client went away
(its future cancelled) is dropped.

Nothing a job holds can stop the thread: jobs are compared by identity, and an exception in the
loop itself (a bug of ours) is answered to the jobs in hand as a 500 while the loop goes on.
:meth:`InferenceWorker.fault` says when the thread is gone anyway, or when one batch has run
past ``stall_timeout_s``; the server's watchdog then answers 503 and ends the process.

The thread also loads the model (``load()``) and warms it up before it takes the first job, so
the server answers ``/health`` at once and ``/ready`` when the model is ready; requests sent
while it loads simply wait in the queue. It runs ``nice`` steps below the event loop, and so do
the threads PyTorch starts from it (see :func:`lower_priority`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cryolens import heap
from cryolens.errors import Busy, InferenceTimeout
from cryolens.operations import Operation, Result, run_batched
from cryolens.server.settings import DEFAULT_STALL_TIMEOUT_S

if TYPE_CHECKING:
    from cryolens.engine import Engine

logger = logging.getLogger("cryolens.server")

#: Seconds :meth:`InferenceWorker.stop` waits for the running batch before giving up on it.
STOP_TIMEOUT_S = 30.0


class WorkerEvents(Protocol):
    """What the worker reports (the server's metrics implement it)."""

    def batch(self, operation: Operation, jobs: int, particles: int, seconds: float) -> None: ...

    def dropped(self, reason: str) -> None: ...

    def running(self, particles: int) -> None: ...


class _NoEvents:
    def batch(self, operation: Operation, jobs: int, particles: int, seconds: float) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass

    def running(self, particles: int) -> None:
        pass


@dataclass(eq=False)
class Job:
    """``operation`` on ``volumes`` ((N, D, H, W) float32); its :class:`Result` or exception
    resolves ``future`` on ``loop``. Jobs are equal only to themselves: the queue removes them
    by identity (a generated ``__eq__`` would compare their arrays, and raise)."""

    operation: Operation
    volumes: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float
    request_id: str = ""
    enqueued_at: float = field(default_factory=time.monotonic)


class InferenceWorker:
    """Owns the engine; at most ``queue_size`` jobs wait, one batch runs."""

    def __init__(self, load: Callable[[], Engine], *, queue_size: int, max_batch: int,
                 batch_wait_s: float, timeout_s: float, retry_after_s: int = 5,
                 warm_up: bool = True, events: WorkerEvents | None = None, nice: int = 0,
                 stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> None:
        self._load = load
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.warm_up = warm_up
        self.nice = nice
        self.stall_timeout_s = stall_timeout_s
        self.events = events or _NoEvents()
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._arriving = 0
        self._trim, self._trimmed_at = heap.trim, 0.0
        self._idle_trim_due = False  # a batch ran since the worker last fell idle
        self._thread: threading.Thread | None = None
        self._in_hand: list[Job] = []  # taken from the queue, not yet answered
        self._running_since: float | None = None  # monotonic start of the running batch
        self._fault: str | None = None  # once found, for good

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def start(self, on_failure: Callable[[BaseException], None]) -> None:
        """Start the thread: load, warm up, then serve. ``on_failure(exc)`` runs on the
        thread if loading fails (the server ends the process)."""
        self._thread = threading.Thread(target=self._main, args=(on_failure,),
                                        name="cryolens-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S,
             reason: str = "the server is shutting down") -> bool:
        """Stop after the running batch; jobs still queued are answered 503 (``reason``).
        True when the thread has ended, False when its batch still runs after ``timeout``."""
        with self._cond:
            self._stopping = True
            left = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in left:
            _answer(job, None, Busy(reason))
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            return True
        self._answer_in_hand(Busy(reason))  # the batch is abandoned: its requests are not
        return False

    def fault(self) -> str | None:
        """Why the worker can no longer answer (its thread ended while serving, or one batch
        has run past ``stall_timeout_s``), or None while it is sound. Once found, it stays."""
        if self._fault is None:
            self._fault = self._find_fault()
        return self._fault

    def _find_fault(self) -> str | None:
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stopping \
                and self.failure is None:
            return "the inference thread has stopped"
        since = self._running_since
        if since is not None:
            running = time.monotonic() - since
            if running > self.stall_timeout_s:
                return (f"one batch has run for {running:.0f} s, past the "
                        f"{self.stall_timeout_s:g} s stall timeout: the inference thread is "
                        "stuck")
        return None

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Marks a request on its way to the queue (its body being read and parsed). While any
        is, a batch being formed waits for it (at most ``batch_wait_s``); when none is, the
        batch runs at once, so a lone client never waits for company."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    async def submit(self, operation: Operation, volumes: np.ndarray, request_id: str = "",
                     ) -> Result:
        """Queue ``operation`` on ``volumes`` and wait for its result."""
        return await self.enqueue(operation, volumes, request_id)

    def enqueue(self, operation: Operation, volumes: np.ndarray, request_id: str = "",
                ) -> asyncio.Future:
        """Queue ``operation`` on ``volumes``; the future (of the running event loop) resolves
        to its :class:`Result`. Cancelling the future drops the job if it has not run."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = Job(operation, volumes, loop.create_future(), loop, now + self.timeout_s,
                  request_id, now)
        with self._cond:
            if self._stopping:
                raise Busy("the server is shutting down")
            if len(self._jobs) >= self.queue_size:
                raise Busy(f"the inference queue is full ({self.queue_size} jobs waiting); "
                           f"retry in {self.retry_after_s} s")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    # -- worker thread ----------------------------------------------------------------------
    def _main(self, on_failure: Callable[[BaseException], None]) -> None:
        # First, so that the threads PyTorch starts from this one (OpenMP's team, created at
        # its first parallel operation) inherit the lower priority.
        lower_priority(self.nice)
        try:
            self.engine = self._load()
            if self.warm_up:
                self._warm_up()
        except BaseException as exc:  # noqa: BLE001 - reported, and the server stops
            self.failure = exc
            on_failure(exc)
            return
        self.ready.set()
        try:
            while self._serve_one():
                pass
        finally:  # the thread ends (stopping, or a BaseException): nobody is left waiting
            self._answer_in_hand(Busy("the inference thread has stopped; retry shortly"))

    def _serve_one(self) -> bool:
        """Take and run one batch (or trim when idle); False once stopping. An exception
        here is a bug of ours: logged, the jobs it concerns answered 500, the loop goes on."""
        try:
            jobs = self._take()
            if jobs is None:
                return False
            if jobs:
                self._execute(jobs)
            else:  # idle a second since the last batch: what its requests freed goes back
                self._trim_heap(at_once=True)
                self._idle_trim_due = False
        except Exception as exc:
            logger.exception("inference worker error; the %d request(s) in hand get 500",
                             len(self._in_hand))
            self._answer_in_hand(RuntimeError(f"inference worker error: {exc}"))
        finally:
            self._running_since = None
        self._in_hand = []
        return True

    def _answer_in_hand(self, exc: BaseException) -> None:
        """Answer ``exc`` to every taken job not answered yet (answered ones keep theirs)."""
        for job in list(self._in_hand):
            _answer(job, None, exc)
        self._in_hand = []

    def _warm_up(self) -> None:
        """One pass of each operation, so the first request does not pay for lazy set-up."""
        zeros = np.zeros((1, *self.engine.box_shape), np.float32)
        operations = [Operation("features"), Operation("splats"),
                      Operation("reconstruct", segments=True)]
        if self.engine.device.type == "cuda":  # the fused render compiles once for each region
            operations.append(Operation("reconstruct", final_convolution=False, segments=True))
        for operation in operations:  # not timed as a batch: a first call's lazy set-up
            run_batched(self.engine, operation, [zeros])  # may take long on a busy machine

    def _take(self) -> list[Job] | None:
        """The oldest live job and every waiting job of the same operation, up to
        ``max_batch`` particles, waiting up to ``batch_wait_s`` for requests still arriving;
        an empty list once idle for :data:`TRIM_EVERY_S` after a batch (time for a trim); None
        once stopping."""
        with self._cond:
            while True:
                while not self._jobs and not self._stopping:
                    if not self._cond.wait(TRIM_EVERY_S) and self._idle_trim_due:
                        return []
                if self._stopping:
                    return None
                first = self._jobs.popleft()
                self._in_hand = [first]
                if self._live(first):
                    break
            group, size = self._in_hand, len(first.volumes)
            until = time.monotonic() + self.batch_wait_s
            while size < self.max_batch:
                for job in list(self._jobs):
                    if job.operation == first.operation and \
                            size + len(job.volumes) <= self.max_batch:
                        self._jobs.remove(job)  # by identity (Job has no __eq__)
                        group.append(job)
                        if self._live(job):
                            size += len(job.volumes)
                        else:
                            group.pop()
                left = until - time.monotonic()
                if size >= self.max_batch or left <= 0 or self._stopping or not self._arriving:
                    break
                self._cond.wait(left)
            return group

    def _live(self, job: Job) -> bool:
        """False (and the job answered or dropped) when nobody waits for it any more."""
        if job.future.cancelled():
            self.events.dropped("disconnected")
            return False
        if time.monotonic() > job.deadline:
            self.events.dropped("deadline")
            _answer(job, None, InferenceTimeout(
                f"the request waited {time.monotonic() - job.enqueued_at:.1f} s for the model, "
                f"longer than the {self.timeout_s:g} s request timeout; retry later"))
            return False
        return True

    def _trim_heap(self, at_once: bool = False) -> None:
        """Give freed memory back to the system: at most once a second while batches run, and
        ``at_once`` when the worker has been idle a second since the last batch. Bodies,
        volumes and answers of many MB are freed from many threads; glibc keeps such memory in
        per-thread arenas, so without this the process's RSS climbs under load and stays up."""
        now = time.monotonic()
        if at_once or now - self._trimmed_at >= TRIM_EVERY_S:
            self._trim()
            self._trimmed_at = now

    def _execute(self, jobs: list[Job]) -> None:
        started = self._running_since = time.monotonic()
        particles = sum(len(j.volumes) for j in jobs)
        self.events.running(particles)
        try:
            results = run_batched(self.engine, jobs[0].operation, [j.volumes for j in jobs])
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting requests
            self.events.running(0)
            if len(jobs) == 1:
                _answer(jobs[0], None, exc)
            else:  # find the job at fault: run each alone, so the others still get answers
                for job in jobs:
                    self._execute([job])
            return
        elapsed = time.monotonic() - started
        self.events.running(0)
        self.events.batch(jobs[0].operation, len(jobs), particles, elapsed)
        _answer_all(jobs, results)
        self._idle_trim_due = True
        self._trim_heap()
        logger.debug("batch of %d jobs ran %.3f s (oldest waited %.3f s)", len(jobs), elapsed,
                     started - min(j.enqueued_at for j in jobs))


#: Seconds between two returns of freed heap memory to the system (see ``_trim_heap``).
TRIM_EVERY_S = 1.0


def lower_priority(steps: int) -> None:
    """Run the calling thread ``steps`` nice levels lower (at most 19), on Linux, where the
    nice value is per thread and threads started from it inherit it. Anywhere else it stays
    as it was; if the system refuses, too, with a warning."""
    if steps <= 0:
        return
    if not sys.platform.startswith("linux"):  # elsewhere PRIO_PROCESS takes a process id
        logger.debug("model_nice: thread priorities are only set on Linux")
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except OSError as exc:
        logger.warning("could not lower the inference thread's priority: %s", exc)


def _answer(job: Job, result: Any, exc: BaseException | None) -> None:
    _call_soon(job.loop, _resolve, job.future, result, exc)


def _answer_all(jobs: list[Job], results: list[Any]) -> None:
    """Every job's result, with one call into each event loop: a call per job wakes the loop
    and takes the GIL from it once per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
    for job, result in zip(jobs, results, strict=True):
        by_loop.setdefault(job.loop, []).append((job.future, result))
    for loop, answers in by_loop.items():
        _call_soon(loop, _resolve_all, answers)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the event loop closed while the jobs ran (shutdown)
        pass


def _resolve_all(answers: list[tuple[asyncio.Future, Any]]) -> None:
    for future, result in answers:
        _resolve(future, result, None)


def _resolve(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
