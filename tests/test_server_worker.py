"""The inference worker inside a real app (in-process): requests batched across clients give the
numbers they give alone, deadlines answer 504 without running, a failure inside a batch costs
only the request at fault, /ready follows the model's loading, /metrics counts what was sent."""
from __future__ import annotations

import os
import re
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # starlette's own note about its httpx-based client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from cryolens import operations
from cryolens.engine import Engine
from cryolens.model import CryoLensConfig, CryoLensVAE
from cryolens.server import Settings, create_app
from cryolens.server import app as app_module

SMALL = CryoLensConfig(latent_dims=8, affinity_dims=6, n_affinity=32, n_free=8)
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(CryoLensVAE(SMALL), device="cpu")


@pytest.fixture(scope="module")
def volumes():
    return np.random.default_rng(5).standard_normal((6, 48, 48, 48)).astype(np.float32)


class CountingEngine:
    """A real engine that records every batch it runs and can be held or made to fail."""

    def __init__(self, engine: Engine, gate: threading.Event | None = None) -> None:
        self.engine, self.gate = engine, gate
        self.calls: list[int] = []
        self.entered = threading.Event()  # a batch has reached the engine
        self.box_shape, self.device = engine.box_shape, engine.device
        self.config, self.checkpoint = engine.config, None

    def features(self, volumes):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        volumes = np.asarray(volumes)
        self.calls.append(len(volumes))
        if (volumes[:, 0, 0, 0] == 7).any():
            raise RuntimeError("boom inside the model")
        return self.engine.features(volumes)


def post_features(client, volume):
    return client.post("/extract_features", json={"input_volume": volume.tolist()})


def in_threads(calls):
    results: list = [None] * len(calls)

    def run(i, call):
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@contextmanager
def worker_held(client, volume, gate: threading.Event, queued: int, hold_s: float = 0.0):
    """One request holds the worker (its engine waits on ``gate``) while the block queues
    more; the gate opens once ``queued`` jobs wait (and ``hold_s`` more seconds have passed),
    so the test does not depend on how fast this machine parses requests."""
    first = threading.Thread(target=post_features, args=(client, volume))
    first.start()
    client.app.state.worker.engine.entered.wait(30)  # the first job holds the worker

    def release() -> None:
        worker, deadline = client.app.state.worker, time.monotonic() + 30
        while worker.pending < queued and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(hold_s)
        gate.set()

    opener = threading.Thread(target=release)
    opener.start()
    yield
    first.join()
    opener.join()


def test_batched_requests_get_their_own_numbers(engine, volumes):
    gate = threading.Event()
    counting = CountingEngine(engine, gate)
    app = create_app(Settings(batch_wait_ms=50, max_batch_size=32), engine=counting)
    with TestClient(app) as client:
        with worker_held(client, volumes[0], gate, queued=5):  # the five queue: one batch
            answers = in_threads([lambda v=v: post_features(client, v) for v in volumes[1:]])
        metrics = client.get("/metrics").text
    assert counting.calls[0] == 1 and 5 in counting.calls[1:], counting.calls
    for volume, answer in zip(volumes[1:], answers, strict=True):
        alone = operations.run(engine, operations.Operation("features"), volume)
        np.testing.assert_allclose(answer.json()["embedding"], alone.arrays["embedding"][0],
                                   **TOL)
    assert re.search(r'cryolens_batch_requests_bucket\{le="8.0",operation="features"\} 2.0',
                     metrics), metrics


def test_exact_numbers_when_not_batched(engine, volumes):
    app = create_app(Settings(batch_wait_ms=0), engine=engine)
    with TestClient(app) as client:
        answer = post_features(client, volumes[0]).json()
    alone = operations.run(engine, operations.Operation("features"), volumes[0])
    assert np.array_equal(np.float32(answer["embedding"]), alone.arrays["embedding"][0])


def test_a_job_past_its_deadline_is_answered_504_and_never_run(engine, volumes):
    gate = threading.Event()
    counting = CountingEngine(engine, gate)
    app = create_app(Settings(request_timeout_s=1, batch_wait_ms=0), engine=counting)
    with TestClient(app) as client:
        with worker_held(client, volumes[0], gate, queued=1, hold_s=1.2):
            late = post_features(client, volumes[1])
        metrics = client.get("/metrics").text
    assert late.status_code == 504 and "request timeout" in late.json()["detail"]
    assert counting.calls == [1]  # only the first job ran
    assert 'cryolens_dropped_jobs_total{reason="deadline"} 1.0' in metrics


def test_a_failure_inside_a_batch_costs_only_the_request_at_fault(engine, volumes):
    gate = threading.Event()
    counting = CountingEngine(engine, gate)
    app = create_app(Settings(batch_wait_ms=50), engine=counting)
    bad = volumes[2].copy()
    bad[0, 0, 0] = 7
    with TestClient(app, raise_server_exceptions=False) as client:
        with worker_held(client, volumes[0], gate, queued=2):
            good, failed = in_threads([lambda: post_features(client, volumes[1]),
                                       lambda: post_features(client, bad)])
        after = post_features(client, volumes[3])
    assert failed.status_code == 500 and failed.json()["detail"] == "internal error"
    assert failed.json()["request_id"] == failed.headers["x-request-id"]
    assert "boom" not in failed.text
    assert good.status_code == 200 and after.status_code == 200
    assert 2 in counting.calls  # they did run as one batch first


def test_ready_follows_loading_and_warm_up(engine, volumes, monkeypatch):
    release = threading.Event()

    def slow_load(settings):
        release.wait(10)
        return engine

    monkeypatch.setattr(app_module, "load_engine", slow_load)
    with TestClient(create_app(Settings(checkpoint="whatever"))) as client:
        assert client.get("/health").status_code == 200
        loading = client.get("/ready")
        assert loading.status_code == 503 and loading.headers["retry-after"] == "5"
        assert "loading" in loading.json()["detail"]
        assert "cryolens_ready 0.0" in client.get("/metrics").text
        waiting = threading.Thread(target=lambda: post_features(client, volumes[0]))
        waiting.start()  # sent while loading: waits for the model instead of failing
        release.set()
        waiting.join()
        deadline = time.monotonic() + 10
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/ready").json() == {"status": "ready"}
        assert post_features(client, volumes[0]).status_code == 200


def test_metrics_count_what_was_sent(engine, volumes):
    with TestClient(create_app(Settings(), engine=engine)) as client:
        for _ in range(3):
            post_features(client, volumes[0])
        client.post("/extract_features", json={"input_volume": [[1]]})
        text = client.get("/metrics").text
    assert ('cryolens_requests_total{endpoint="/extract_features",method="POST",status="200"} '
            '3.0') in text
    assert ('cryolens_requests_total{endpoint="/extract_features",method="POST",status="422"} '
            '1.0') in text
    assert 'cryolens_particles_total{operation="features"} 3.0' in text
    assert "process_resident_memory_bytes" in text and "cryolens_queue_depth 0.0" in text
    assert 'cryolens_request_seconds_count{endpoint="/extract_features"} 4.0' in text


def test_a_lone_request_never_waits_for_company(engine, volumes):
    """With nothing else on the way, a batch runs at once, however long --batch-wait-ms is."""
    app = create_app(Settings(batch_wait_ms=20_000), engine=engine)
    with TestClient(app) as client:
        started = time.monotonic()
        answers = [post_features(client, volumes[0]) for _ in range(3)]
        took = time.monotonic() - started
    assert [a.status_code for a in answers] == [200] * 3
    assert took < 15  # three waits of 20 s would be 60 s


@pytest.mark.slow  # waits 3.5 s for the idle trim, on purpose
def test_freed_memory_is_returned_once_the_worker_falls_idle(engine, volumes, monkeypatch):
    """The worker gives freed memory back (``cryolens.heap.trim``) at most once a second
    while batches run, and once a second after the last batch (what its requests freed after
    it ran goes back too); not again while idle after that."""
    from cryolens import heap

    trims: list[float] = []
    monkeypatch.setattr(heap, "trim", lambda: trims.append(time.monotonic()))
    app = create_app(Settings(), engine=engine)
    with TestClient(app) as client:
        assert post_features(client, volumes[0]).status_code == 200
        assert post_features(client, volumes[1]).status_code == 200
        answered = time.monotonic()
        time.sleep(3.5)  # one idle trim, then none
    assert 2 <= len(trims) <= 3, trims  # the first batch's, maybe the second's, the idle one
    assert trims[-1] - answered >= 0.5  # the idle trim, a second after the last batch
    assert sum(t > answered for t in trims) == 1


def _nice(tid: int) -> int:
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[16])  # field 19: nice


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
@pytest.mark.parametrize("steps", [3, 0])
def test_the_model_threads_run_below_the_event_loop(engine, volumes, steps):
    """The worker thread, and the OpenMP threads PyTorch starts from it for its first parallel
    operation, run ``model_nice`` steps below the thread that started the server."""
    base = _nice(threading.get_native_id())
    before = set(os.listdir("/proc/self/task"))
    with TestClient(create_app(Settings(model_nice=steps), engine=engine)) as client:
        assert post_features(client, volumes[0]).status_code == 200  # runs PyTorch there
        new = {int(t) for t in set(os.listdir("/proc/self/task")) - before}
        (worker,) = [t.native_id for t in threading.enumerate()
                     if t.name == "cryolens-inference" and t.native_id in new]
        lowered = {t for t in new if _nice(t) == min(19, base + steps)}
        assert worker in lowered
        if steps and torch.get_num_threads() > 1:
            assert len(lowered) >= 2, (worker, {t: _nice(t) for t in new})  # and its team
        assert _nice(threading.get_native_id()) == base
