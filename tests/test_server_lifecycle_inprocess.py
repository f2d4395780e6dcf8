"""The watchdog in-process: an inference thread that ends (here by SystemExit inside the
engine, which no handler may swallow) is noticed, answered 503 on /health and /ready, and the
process is asked to exit 70 (issue #25, class 1)."""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # starlette's own note about its httpx-based client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from cryolens.engine import Engine
from cryolens.model import CryoLensConfig, CryoLensVAE
from cryolens.server import Settings, create_app
from cryolens.server.app import FAULT_GRACE_S, WATCH_EVERY_S, WATCHDOG_EXIT

pytestmark = pytest.mark.slow  # waits out the watchdog's grace period


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(CryoLensVAE(CryoLensConfig(latent_dims=8, affinity_dims=6, n_affinity=32,
                                             n_free=8)), device="cpu")


class EndsTheThread:
    """A real engine whose features() ends the calling thread."""

    def __init__(self, engine: Engine) -> None:
        self.box_shape, self.device, self.config = engine.box_shape, engine.device, engine.config
        self.checkpoint = None

    def features(self, volumes):
        raise SystemExit("the thread ends here")


def test_an_ended_inference_thread_is_reported_and_the_process_asked_to_exit(engine):
    exits: list[int] = []
    app = create_app(Settings(), engine=EndsTheThread(engine), exit_process=exits.append)
    volume = np.zeros((48, 48, 48), np.float32)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        answer = client.post("/extract_features", json={"input_volume": volume.tolist()})
        assert answer.status_code == 503 and answer.headers["retry-after"].isdigit()
        deadline = time.monotonic() + 10
        while (health := client.get("/health")).status_code == 200 and \
                time.monotonic() < deadline:  # the thread answers its job, then ends
            time.sleep(0.02)
        assert health.status_code == 503
        assert health.json() == {"status": "unhealthy",
                                 "detail": "the inference thread has stopped"}
        ready = client.get("/ready")
        assert ready.status_code == 503 and "inference thread has stopped" in ready.json()[
            "detail"]
        deadline = time.monotonic() + WATCH_EVERY_S + FAULT_GRACE_S + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exits == [WATCHDOG_EXIT]
        assert client.post("/extract_features", json={
            "input_volume": volume.tolist()}).status_code == 503
