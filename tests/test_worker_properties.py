"""The inference worker over random interleavings (hypothesis): jobs of 1-64 volumes, mixed
operations, cancelled while queued or at any moment later, batched up to various sizes. Every
job that is not cancelled is answered exactly once, with the numbers it gets alone; a job
cancelled while queued never runs; the worker ends sound (issue #25, class 1)."""
from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryolens.engine import Engine
from cryolens.model import CryoLensConfig, CryoLensVAE
from cryolens.operations import Operation, run
from cryolens.server.worker import InferenceWorker

SMALL = CryoLensConfig(latent_dims=8, affinity_dims=6, n_affinity=32, n_free=8)
OPERATIONS = (Operation("features"), Operation("splats"),
              Operation("reconstruct", final_convolution=False))
POOL = 64
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(CryoLensVAE(SMALL), device="cpu")


@pytest.fixture(scope="module")
def pool(engine):
    """POOL volumes, each volume's answer to each operation when it runs alone, and the
    digest of each volume (to tell which ones the engine ran)."""
    volumes = np.random.default_rng(25).standard_normal((POOL, 48, 48, 48)).astype(np.float32)
    alone = [run(engine, operation, volumes) for operation in OPERATIONS]
    digests = {_digest(v): i for i, v in enumerate(volumes)}
    return volumes, alone, digests


def _digest(volume: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(volume).tobytes(), digest_size=16).digest()


class RecordingEngine:
    """The real engine; records the digest of every volume it runs, and holds its first call
    until ``gate`` opens (so the other jobs queue up behind it)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.box_shape, self.device, self.config = engine.box_shape, engine.device, engine.config
        self.gate, self.entered = threading.Event(), threading.Event()
        self.ran: list[bytes] = []

    def _record(self, volumes) -> None:
        self.ran.extend(_digest(v) for v in np.asarray(volumes))
        self.entered.set()
        self.gate.wait(60)

    def features(self, volumes):
        self._record(volumes)
        return self.engine.features(volumes)

    def splats(self, volumes, **kwargs):
        self._record(volumes)
        return self.engine.splats(volumes, **kwargs)

    def reconstruct(self, volumes, **kwargs):
        self._record(volumes)
        return self.engine.reconstruct(volumes, **kwargs)


jobs_strategy = st.lists(
    st.tuples(st.integers(1, 64), st.integers(0, len(OPERATIONS) - 1),
              st.sampled_from(["keep", "keep", "cancel queued", "cancel later"]),
              st.integers(0, 2**32 - 1)),
    min_size=2, max_size=6)


@pytest.mark.slow
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(jobs=jobs_strategy, max_batch=st.sampled_from([1, 16, 32, 64]),
       later_delay=st.sampled_from([0.0, 0.002, 0.02, 0.1]))
def test_every_accepted_job_is_answered_once_with_its_own_numbers(engine, pool, jobs, max_batch,
                                                                  later_delay):
    volumes, alone, digests = pool
    recording = RecordingEngine(engine)
    picks = [np.random.default_rng(seed).integers(0, POOL, size) for size, _, _, seed in jobs]
    fates = ["keep" if i == 0 and fate == "cancel queued" else fate  # job 0 runs at once
             for i, (_, _, fate, _) in enumerate(jobs)]

    async def scenario() -> list:
        worker = InferenceWorker(lambda: recording, queue_size=len(jobs), max_batch=max_batch,
                                 batch_wait_s=0.0, timeout_s=300, warm_up=False)
        failures: list[BaseException] = []
        worker.start(on_failure=failures.append)
        while not worker.ready.is_set():
            assert not failures
            await asyncio.sleep(0.01)
        futures = [worker.enqueue(OPERATIONS[jobs[0][1]], volumes[picks[0]])]
        while not recording.entered.is_set():  # job 0 holds the worker: the rest queue
            await asyncio.sleep(0.005)
        for (_, op, _, _), pick, fate in zip(jobs[1:], picks[1:], fates[1:], strict=True):
            futures.append(worker.enqueue(OPERATIONS[op], volumes[pick]))
            if fate == "cancel queued":
                futures[-1].cancel()
        recording.gate.set()
        await asyncio.sleep(later_delay)
        for i, fate in enumerate(fates):
            if fate == "cancel later" and not futures[i].cancel():
                fates[i] = "answered first"  # its answer came before the cancellation
        kept = [f for f, fate in zip(futures, fates, strict=True) if "cancel" not in fate]
        results = await asyncio.wait_for(asyncio.gather(*kept), 120)
        for _ in range(3000):  # cancelled jobs left in the queue are dropped as it reaches them
            if worker.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert worker.fault() is None and worker.pending == 0
        assert worker.stop(timeout=30)
        for future, fate in zip(futures, fates, strict=True):
            assert future.cancelled() == ("cancel" in fate)
        return results

    results = asyncio.run(scenario())
    kept = [i for i, fate in enumerate(fates) if "cancel" not in fate]
    for i, result in zip(kept, results, strict=True):
        expected = alone[jobs[i][1]]
        assert set(result.arrays) == set(expected.arrays)
        for name, array in result.arrays.items():
            np.testing.assert_allclose(array, expected.arrays[name][picks[i]], **TOL,
                                       err_msg=f"job {i} ({name})")
    ran = Counter(digests[d] for d in recording.ran)
    must = Counter(int(v) for i in kept for v in picks[i])
    may = Counter(int(v) for i, fate in enumerate(fates) if fate == "cancel later"
                  for v in picks[i])
    assert not must - ran, "a kept job did not run"
    assert not ran - must - may, "a job ran twice, or one cancelled while queued ran"


class FailsOnce:
    """Worker events whose first ``batch`` report raises: a bug in the loop itself, after
    the engine ran."""

    def __init__(self) -> None:
        self.failed = False

    def batch(self, operation, jobs, particles, seconds) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug in the batching loop")

    def dropped(self, reason: str) -> None:
        pass

    def running(self, particles: int) -> None:
        pass


def test_an_error_in_the_loop_costs_only_the_jobs_in_hand(engine, pool):
    volumes, alone, _ = pool

    async def scenario():
        worker = InferenceWorker(lambda: engine, queue_size=4, max_batch=32, batch_wait_s=0.0,
                                 timeout_s=60, warm_up=False, events=FailsOnce())
        worker.start(on_failure=lambda exc: None)
        while not worker.ready.is_set():
            await asyncio.sleep(0.01)
        first = worker.enqueue(OPERATIONS[0], volumes[:2])
        with pytest.raises(RuntimeError, match="inference worker error: a bug in the batching"):
            await asyncio.wait_for(first, 60)
        second = await asyncio.wait_for(worker.enqueue(OPERATIONS[0], volumes[2:3]), 60)
        assert worker.fault() is None
        assert worker.stop(timeout=30)
        return second

    second = asyncio.run(scenario())
    np.testing.assert_allclose(second.arrays["embedding"], alone[0].arrays["embedding"][2:3],
                               **TOL)
