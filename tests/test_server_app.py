"""In-process checks of what a real process cannot easily provoke: a bug (500 with a request id,
no traceback), a full queue (503 + Retry-After), and settings from the environment."""
from __future__ import annotations

import logging
import threading
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

with warnings.catch_warnings():  # starlette's own note about its httpx-based client
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from cryolens.server import Settings, create_app
from cryolens.server.middleware import RepeatFilter

BOX = (48, 48, 48)


class FakeEngine:
    """Just enough of an Engine: features() fails or blocks on demand."""

    device = SimpleNamespace(type="cpu")
    box_shape = BOX
    checkpoint = None

    def __init__(self, fail: bool = False, block: threading.Event | None = None) -> None:
        self.fail, self.block = fail, block
        self.entered = threading.Event()

    def features(self, volumes):
        self.entered.set()
        if self.block is not None:
            self.block.wait(10)
        if self.fail:
            raise RuntimeError("secret internal detail /home/someone/model.ckpt")
        raise AssertionError("not reached in these tests")


def body() -> dict:
    return {"input_volume": np.zeros(BOX).tolist()}


def test_unexpected_error_is_a_bare_500_with_request_id():
    with TestClient(create_app(Settings(), engine=FakeEngine(fail=True))) as client:
        response = client.post("/extract_features", json=body())
    assert response.status_code == 500
    payload = response.json()
    assert payload["detail"] == "internal error" and len(payload["request_id"]) == 32
    assert "secret" not in response.text and response.headers["x-request-id"]


def test_full_queue_answers_503_with_retry_after():
    gate = threading.Event()
    engine = FakeEngine(block=gate)
    app = create_app(Settings(queue_size=1, retry_after_s=7), engine=engine)
    with TestClient(app) as client:
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            client.post("/extract_features", json=body()))) for _ in range(2)]
        # one runs (blocked), one waits in the queue: each awaited, not a fixed sleep, as a
        # busy machine can take longer than that to parse a JSON volume
        threads[0].start()
        assert engine.entered.wait(30)
        threads[1].start()
        deadline = time.monotonic() + 30
        while app.state.worker.pending < 1:
            assert time.monotonic() < deadline, "the second request never reached the queue"
            time.sleep(0.02)
        busy = client.post("/extract_features", json=body())
        gate.set()
        for thread in threads:
            thread.join()
    assert busy.status_code == 503 and busy.headers["retry-after"] == "7"
    assert "queue is full" in busy.json()["detail"]


def test_model_endpoints_behind_a_root_path_answer_as_routes_do():
    """Served under a prefix (a proxy's root path): a POST to a model path runs its endpoint
    (here: its input check), other methods get 405, a trailing slash the router's redirect and
    an unknown path 404, as for every other route."""
    with TestClient(create_app(Settings(), engine=FakeEngine()), root_path="/api") as client:
        small = {"input_volume": [[[1.0]]]}
        refused = client.post("/api/extract_features", json=small)
        assert refused.status_code == 422
        assert refused.json() == {"detail": "input_volume must have shape (48, 48, 48), got "
                                            "(1, 1, 1)", "field": "input_volume"}
        assert client.get("/api/extract_features").status_code == 405
        moved = client.post("/api/reconstruct/", json=small, follow_redirects=False)
        assert moved.status_code == 307
        assert moved.headers["location"].endswith("/api/reconstruct")
        assert client.post("/api/elsewhere", json=small).status_code == 404


def test_settings_from_environment_round_trip():
    settings = Settings(checkpoint="v001", port=9000, cors="", device="CPU", log_level="debug",
                        max_volumes=8)
    env: dict[str, str] = {}
    settings.export_env(env)
    assert Settings.from_env(env) == settings
    assert settings.device == "cpu" and settings.log_level == "DEBUG"
    assert settings.cors_origins == []
    assert Settings().cors_origins == ["*"]
    assert Settings(cors="https://a.example, https://b.example").cors_origins == [
        "https://a.example", "https://b.example"]


@pytest.mark.parametrize("env", [{"CRYOLENS_PORT": "x"}, {"CRYOLENS_DEVICE": "tpu"},
                                 {"CRYOLENS_MAX_VOLUMES": "0"}, {"CRYOLENS_MODEL_NICE": "20"},
                                 {"CRYOLENS_MODEL_NICE": "-1"}])
def test_bad_environment_settings_are_refused(env):
    with pytest.raises(ValueError):
        Settings.from_env(env)


# -- logging (the accept-error flood filter) -------------------------------------------------
def test_repeated_accept_errors_are_logged_once_per_window():
    logger = logging.getLogger("test.flood")
    logger.propagate = False
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    flood = RepeatFilter(window_s=0.5)
    logger.addFilter(flood)
    for _ in range(100):
        logger.error("socket.accept() out of system resource")
    logger.error("something else")
    time.sleep(0.6)
    logger.error("socket.accept() out of system resource")
    messages = [r.getMessage() for r in records]
    assert messages == ["socket.accept() out of system resource", "something else",
                        ("socket.accept() out of system resource (99 identical messages held "
                         "back)")]


# -- CORS (the middleware answers these; no model is loaded) --------------------------------------
def test_cors_list_of_origins():
    client = TestClient(create_app(Settings(cors="https://example.com,https://app.example.com")))
    ok = client.get("/health", headers={"Origin": "https://app.example.com"})
    assert ok.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "access-control-allow-credentials" not in ok.headers
    other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = client.options("/reconstruct", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 400


def test_cors_off():
    client = TestClient(create_app(Settings(cors="")))
    response = client.get("/health", headers={"Origin": "https://a.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options("/reconstruct", headers={
        "Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 405
