"""SIGTERM under load, past the drain deadline (issue #25, class 4), on a real process: every
request in flight gets its answer or a JSON 503 with Retry-After (never uvicorn's plain-text
500), the batch still running is finished or abandoned, and the process exits 0."""
from __future__ import annotations

import io
import os
import signal
import threading
import time

import numpy as np
import pytest
import requests
from server_helpers import start_cli_server

NPY = {"Content-Type": "application/x-npy"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Random weights of the v001 architecture (614 + 154 splats): slow enough that a drain of
    2 s cannot serve 36 x 16 particles with their segments (the 40-splat test model could)."""
    import torch
    from safetensors.torch import save_file

    from cryolens.model import CryoLensConfig, CryoLensVAE

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in CryoLensVAE(CryoLensConfig()).state_dict().items()
             if "coords" not in k}
    path = tmp_path_factory.mktemp("model") / "v001_sized.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.slow
def test_sigterm_past_the_drain_deadline_answers_503_and_exits_0(model):
    drain = 2
    # One model thread and 36 x 32 particles (with segments): several seconds of work however
    # fast the engine or the machine's cores, so the drain cannot serve it all.
    server = start_cli_server(model, "--drain-timeout-s", str(drain), "--queue-size", "64",
                              "--max-parse-bytes", str(2**30), env={"OMP_NUM_THREADS": "1"})
    stack = np.random.default_rng(4).standard_normal((32, 48, 48, 48)).astype(np.float32)
    body = io.BytesIO()
    np.save(body, stack)
    answers: list[requests.Response | Exception] = []
    lock = threading.Lock()

    def post() -> None:
        try:
            got: requests.Response | Exception = requests.post(
                server.url + "/batch_process", data=body.getvalue(), headers=NPY, timeout=60)
        except requests.RequestException as exc:
            got = exc
        with lock:
            answers.append(got)

    try:
        threads = [threading.Thread(target=post) for _ in range(36)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)  # all sent; a few answered, most queued
        os.kill(server.process.pid, signal.SIGTERM)
        code = server.process.wait(drain + 30)
        for thread in threads:
            thread.join(30)
        output = server.output()
    finally:
        server.stop()
    assert code == 0, output[-3000:]
    assert "terminate called" not in output and "Exception in ASGI application" not in output
    statuses = [a.status_code if isinstance(a, requests.Response) else type(a).__name__
                for a in answers]
    assert len(answers) == 36
    refused = [a for a in answers if isinstance(a, requests.Response) and a.status_code == 503]
    assert refused, statuses  # the drain cannot have served 36 x 32 particles
    assert set(statuses) <= {200, 503}, statuses
    for answer in refused:
        assert answer.headers["Retry-After"].isdigit()
        assert answer.json()["detail"] == "the server is shutting down; retry shortly"
