"""cryolens.client against what a healthy server never does: a server that is not there or never
answers, 503 (retried), 415 (JSON instead), 413 (smaller requests); stand-in servers, and
servers in this process with limits of their own."""
from __future__ import annotations

import json
import socket
import time

import httpx
import numpy as np
import pytest
from client_helpers import TOL, assert_same, particles
from http_stand_in import LocalHTTPServer, QuietHandler
from server_helpers import free_port

from cryolens import formats
from cryolens.client import (
    CryoLensClient,
    CryoLensConnectionError,
    CryoLensHTTPError,
    retry_wait,
)


def test_unreachable_server():
    with CryoLensClient(f"http://127.0.0.1:{free_port()}", connect_timeout=2) as c, \
            pytest.raises(CryoLensConnectionError):
        c.health()


def test_a_read_timeout_names_the_setting_to_change():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with CryoLensClient(url, read_timeout=0.3) as c, \
                pytest.raises(CryoLensConnectionError, match=r"no answer within "
                              r"read_timeout=0\.3 s.*raise read_timeout.*batch_size") as caught:
            c.extract_features(particles(1))
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)


# -- stand-in servers for 503 and 415 -----------------------------------------------------------
class StandIn(LocalHTTPServer):
    """A tiny HTTP server: ``answer(handler, n)`` gives (status, headers, body) for the n-th
    request; every request is recorded as (time, method, path, Content-Type)."""

    def __init__(self, answer) -> None:
        self.requests: list[tuple[float, str, str, str]] = []
        stand_in = self

        class Handler(QuietHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                stand_in.requests.append((time.monotonic(), self.command, self.path,
                                          self.headers.get("content-type", "")))
                status, headers, out = answer(self, body, len(stand_in.requests))
                self.send_response(status)
                for name, value in {"Content-Length": str(len(out)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _reply

        super().__init__(Handler)


JSON = {"Content-Type": "application/json"}


BUSY = (503, {**JSON, "Retry-After": "1", "X-Request-ID": "abc123"},
        b'{"detail": "the inference queue is full"}')


def test_503_is_retried_after_retry_after():
    def answer(handler, body, n):
        return BUSY if n == 1 else (200, JSON, b'{"status": "healthy"}')

    with StandIn(answer) as stand_in, CryoLensClient(stand_in.url) as c:
        assert c.health() == {"status": "healthy"}
    (first, *_), (second, *_) = stand_in.requests
    assert len(stand_in.requests) == 2
    assert 0.95 <= second - first < 5  # waited the second the server asked for


def test_503_retries_are_bounded_and_waits_capped():
    def answer(handler, body, n):
        return (503, {**JSON, "Retry-After": "3600", "X-Request-ID": "abc123"},
                b'{"detail": "still loading"}')

    with StandIn(answer) as stand_in, \
            CryoLensClient(stand_in.url, max_retries=2, max_retry_wait_s=0.05) as c:
        started = time.monotonic()
        with pytest.raises(CryoLensHTTPError) as caught:
            c.ready()
    assert time.monotonic() - started < 3
    assert len(stand_in.requests) == 3  # one try and two retries
    err = caught.value
    assert (err.status, err.detail, err.request_id) == (503, "still loading", "abc123")


def test_retry_wait_reads_seconds_and_dates():
    def response(value: str | None) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value} if value else {})

    assert retry_wait(response("2"), 0, 30) == 2
    assert retry_wait(response("120"), 0, 30) == 30
    assert retry_wait(response("Wed, 21 Oct 2015 07:28:00 GMT"), 0, 30) == 0  # in the past
    assert retry_wait(response(None), 0, 30) == 0.5 and retry_wait(response(None), 2, 30) == 2


def test_415_falls_back_to_json_one_volume_per_request():
    """An old server that reads JSON only: the client switches for good, one volume a time."""
    def answer(handler, body, n):
        if handler.headers.get("content-type") != "application/json":
            return (415, JSON, b'{"detail": "send application/json", "field": "content-type"}')
        volume = np.asarray(json.loads(body)["input_volume"], np.float32)
        features = {"embedding": [float(volume.mean())] * 2, "global_weight": 0.5,
                    "input_shape": list(volume.shape)}
        return 200, JSON, json.dumps(features).encode()

    stack = particles(3)
    with StandIn(answer) as stand_in, CryoLensClient(stand_in.url) as c:
        out = c.extract_features(stack)
        assert not c.binary
        c.extract_features(stack[0])
    kinds = [kind for *_, kind in stand_in.requests]
    assert kinds == [formats.NPY_MEDIA_TYPE] + ["application/json"] * 4
    np.testing.assert_allclose(out["embedding"][:, 0], stack.mean(axis=(1, 2, 3)), **TOL)
    assert out["global_weight"].tolist() == [0.5] * 3
    assert out["input_shape"].tolist() == [3, 48, 48, 48]


def test_415_to_json_is_an_error():
    def answer(handler, body, n):
        return 415, JSON, b'{"detail": "no", "field": "content-type"}'

    with StandIn(answer) as stand_in, CryoLensClient(stand_in.url) as c:
        with pytest.raises(CryoLensHTTPError) as caught:
            c.health()
        assert (caught.value.status, caught.value.field) == (415, "content-type")
        with pytest.raises(CryoLensHTTPError):
            c.extract_features(particles(2))  # .npy refused, then JSON refused too
    assert len(stand_in.requests) == 3


@pytest.fixture(scope="module")
def four_volume_server(small_model):
    """A server (in this process) that takes at most 4 volumes a request."""
    from server_helpers import start_in_process

    small = start_in_process(small_model, max_volumes=4)
    yield small
    small.stop()


@pytest.mark.parametrize("binary", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_a_server_that_takes_fewer_volumes_a_request_gets_fewer(four_volume_server, binary):
    """A server started with --max-volumes 4 answers 413 to the client's 16 a request: the
    client halves its batch size until the server takes it, says so once per halving, and the
    answers are those of the same volumes sent 4 at a time."""
    small = four_volume_server
    stack = particles(16, seed=7)
    with CryoLensClient(small.url, batch_size=16, binary=binary) as client:
        with pytest.warns(RuntimeWarning) as said:
            out = client.batch_process(stack, operation="features")
        assert client.batch_size == 4
        assert [str(w.message).split(" (")[0] for w in said] == [
            f"{small.url} refused 16 volumes in one request",
            f"{small.url} refused 8 volumes in one request"]
        assert "at most 4 are accepted per request" in str(said[0].message)
        assert said[0].filename == __file__  # pointed at the caller's line
    with CryoLensClient(small.url, batch_size=4, binary=binary) as client:
        assert_same(out, client.batch_process(stack, operation="features"))


def test_a_413_to_one_volume_is_the_callers_error(small_model):
    """Halving stops at one volume: a server whose body limit is below one volume's .npy
    (442 kB) refuses it, and that 413 is raised with the server's message."""
    from server_helpers import start_in_process

    tiny = start_in_process(small_model, max_body_bytes=300000)
    try:
        with CryoLensClient(tiny.url, batch_size=4) as client:
            with pytest.warns(RuntimeWarning), pytest.raises(CryoLensHTTPError) as refused:
                client.extract_features(particles(3))
            assert refused.value.status == 413 and client.batch_size == 1
    finally:
        tiny.stop()
