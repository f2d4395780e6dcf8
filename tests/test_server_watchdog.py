"""The inference worker cannot die of its queue, and when it is gone or stuck anyway the server
says so and exits for its supervisor (issue #25, class 1). Real server processes: what matters
here is the process (its exit status, /health from outside)."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import requests
from server_helpers import small_model_file, start_cli_server

NPY = {"Content-Type": "application/x-npy"}
NPZ = {"Accept": "application/x-npz"}


pytestmark = pytest.mark.slow  # each test starts a server process or waits out a stall deadline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def features(url: str, stack: np.ndarray) -> requests.Response:
    return requests.post(url + "/extract_features", data=npy(stack), headers={**NPY, **NPZ},
                         timeout=60)


def embeddings(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text[:300]
    with np.load(io.BytesIO(response.content)) as arrays:
        return arrays["embedding"]


def test_queued_jobs_of_one_operation_that_do_not_all_fit_one_batch(model):
    """The reported crash: while a 64-volume /reconstruct holds the worker, three .npy
    /extract_features of 20, 20 and 1 volumes queue up; taking the 1 past the 20 that does not
    fit compared two jobs by value (their numpy volumes) and killed the inference thread, after
    which nothing was answered and /ready still said 200."""
    rng = np.random.default_rng(25)
    stacks = [rng.standard_normal((n, 48, 48, 48)).astype(np.float32) for n in (20, 20, 1)]
    server = start_cli_server(model, "--max-batch-size", "32")
    try:
        alone = [embeddings(features(server.url, stack)) for stack in stacks]
        big = rng.standard_normal((64, 48, 48, 48)).astype(np.float32)
        answers: dict[str, requests.Response] = {}

        def post(name: str, call) -> None:
            answers[name] = call()

        threads = [threading.Thread(target=post, args=("reconstruct", lambda: requests.post(
            server.url + "/reconstruct?use_segmented_decoder=false", data=npy(big),
            headers={**NPY, **NPZ}, timeout=60)))]
        threads[0].start()
        time.sleep(0.5)  # the 64 volumes are parsed and running
        for i, stack in enumerate(stacks):
            threads.append(threading.Thread(target=post, args=(
                str(i), lambda stack=stack: features(server.url, stack))))
            threads[-1].start()
            time.sleep(0.05)  # queued in this order
        for thread in threads:
            thread.join(120)
        assert answers["reconstruct"].status_code == 200, answers["reconstruct"].text[:300]
        for i, expected in enumerate(alone):
            np.testing.assert_allclose(embeddings(answers[str(i)]), expected,
                                       rtol=1e-4, atol=1e-5)
        assert requests.get(server.url + "/ready", timeout=5).status_code == 200
        np.testing.assert_allclose(embeddings(features(server.url, stacks[2])), alone[2],
                                   rtol=1e-4, atol=1e-5)
    finally:
        server.stop()


def test_a_stuck_batch_makes_health_say_so_and_the_process_exit_70(model):
    """One batch running past --stall-timeout-s (here a 256-volume reconstruction with its
    segments, seconds, against a 0.3 s limit; the watchdog looks once a second) counts as a
    stuck inference thread: the request is answered 503, /health and /ready answer 503 naming
    the cause, and the process exits 70 for its supervisor."""
    server = start_cli_server(model, "--stall-timeout-s", "0.3")
    try:
        stack = np.random.default_rng(1).standard_normal((256, 48, 48, 48)).astype(np.float32)
        answer: list[requests.Response] = []
        sender = threading.Thread(target=lambda: answer.append(requests.post(
            server.url + "/reconstruct", data=npy(stack), headers=NPY, timeout=60)))
        sender.start()
        unhealthy = ready = None
        deadline = time.monotonic() + 150
        while server.process.poll() is None and time.monotonic() < deadline:
            try:
                health = requests.get(server.url + "/health", timeout=5)
                if health.status_code == 503 and ready is None:
                    unhealthy = health
                    ready = requests.get(server.url + "/ready", timeout=5)
            except requests.RequestException:
                pass  # a busy machine, or the process has just exited
            time.sleep(0.05)
        assert server.process.poll() == 70, server.output()[-3000:]
        assert unhealthy is not None, server.output()[-2000:]
        assert unhealthy.json()["status"] == "unhealthy"
        assert "stall timeout" in unhealthy.json()["detail"]
        assert ready.status_code == 503 and "stall timeout" in ready.json()["detail"]
        sender.join(60)
        assert answer and answer[0].status_code == 503, answer
        assert answer[0].headers["Retry-After"].isdigit()
        assert "restarting" in answer[0].json()["detail"]
        assert "exits with status 70" in server.output()
    finally:
        server.stop()
