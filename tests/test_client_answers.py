"""The client against small misbehaving servers (real sockets on 127.0.0.1): answers that do
not fit their request are an error naming the request id, never a result, and a malformed
``Retry-After`` falls back to a bounded backoff."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from client_helpers import particles
from http_stand_in import LocalHTTPServer, QuietHandler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryolens import formats
from cryolens.client import (
    FALLBACK_RETRY_WAIT_S,
    CryoLensAnswerError,
    CryoLensClient,
    retry_wait,
)
from cryolens.errors import CryoLensError

LATENT = 8


class Misbehaving(LocalHTTPServer):
    """A tiny HTTP server: ``answer(handler, body, n)`` gives (status, headers, body) for the
    n-th request. Every answer carries ``X-Request-ID: rid-<n>``."""

    def __init__(self, answer) -> None:
        self.count = 0
        outer = self

        class Handler(QuietHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.count += 1
                status, headers, out = answer(self, body, outer.count)
                self.send_response(status)
                headers = {"Content-Length": str(len(out)), "X-Request-ID": f"rid-{outer.count}",
                           **headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _reply

        super().__init__(Handler)


NPZ = {"Content-Type": formats.NPZ_MEDIA_TYPE}
JSON = {"Content-Type": "application/json"}


def sent_volumes(handler, body: bytes) -> np.ndarray:
    if handler.headers.get("content-type") == formats.NPY_MEDIA_TYPE:
        return formats.read_npy(body).data
    payload = json.loads(body)
    return np.asarray(payload.get("input_volumes", payload.get("input_volume")), np.float32)


def features_of(volumes: np.ndarray) -> np.ndarray:
    """What the stand-in computes per volume: its mean, repeated ``LATENT`` times."""
    return np.repeat(volumes.reshape(len(volumes), -1).mean(axis=1)[:, None], LATENT, axis=1)


def rows_server(rows_for):
    """Answers ``/extract_features`` in .npz with ``rows_for(sent, n)`` rows (sent: how many
    volumes the request held, n: the request's number); a correct server: rows_for = sent."""
    def answer(handler, body, n):
        volumes = sent_volumes(handler, body)
        stacked = volumes.ndim == 4
        volumes = volumes if stacked else volumes[None]
        rows = rows_for(len(volumes), n)
        embedding = np.resize(features_of(volumes), (rows, LATENT)).astype(np.float32)
        if not stacked and rows == 1:
            embedding = embedding[0]
        return 200, NPZ, formats.write_npz({"embedding": embedding, "global_weight":
                                            np.zeros(rows if stacked else (), np.float32)})
    return Misbehaving(answer)


def test_two_volumes_answered_with_one_row_is_an_error_naming_the_request():
    """The issue's case: batch_size=2, the server answers each 2-volume request with one row;
    numpy broadcasting used to return it twice."""
    with (rows_server(lambda sent, n: 1) as server,
          CryoLensClient(server.url, batch_size=2) as client,
          pytest.raises(CryoLensAnswerError) as caught):
        client.extract_features(particles(4))
    error = caught.value
    assert isinstance(error, CryoLensError)
    assert error.request_id == "rid-1"
    assert "rid-1" in str(error) and "1 row(s) for 2 volume(s)" in str(error)
    assert str(error).count("\n") == 0


def test_one_volume_answered_with_two_rows_is_an_error():
    with (rows_server(lambda sent, n: 2) as server, CryoLensClient(server.url) as client,
          pytest.raises(CryoLensAnswerError,
                        match=r"embedding has shape \(2, 8\) for one volume") as caught):
        client.extract_features(particles(1)[0])
    assert caught.value.request_id == "rid-1"


@pytest.mark.slow  # a stand-in server for each example
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(total=st.integers(1, 7), batch_size=st.integers(1, 4), wrong=st.data())
def test_every_answer_is_checked_against_its_request(total, batch_size, wrong):
    """Over stack and batch sizes: one request (chosen at random) answered with too few or too
    many rows fails with that request's id; when every answer fits, the rows are each
    volume's own."""
    requests = -(-total // batch_size)
    bad = wrong.draw(st.one_of(st.none(), st.integers(1, requests)), label="bad request")
    delta = wrong.draw(st.sampled_from([-1, 1]), label="rows off by")
    stack = particles(total, seed=total)

    def rows_for(sent: int, n: int) -> int:
        return max(0, sent + delta) if n == bad else sent

    with rows_server(rows_for) as server, \
            CryoLensClient(server.url, batch_size=batch_size) as client:
        if bad is None:
            out = client.extract_features(stack)
            np.testing.assert_allclose(out["embedding"], features_of(stack), rtol=1e-6)
            assert out["global_weight"].shape == (total,)
        else:
            with pytest.raises(CryoLensAnswerError) as caught:
                client.extract_features(stack)
            assert caught.value.request_id == f"rid-{bad}"


def test_a_later_answer_of_another_width_is_an_error():
    """Rows right, but the second answer's embeddings are narrower than the first's: numpy
    would have broadcast one column across the row."""
    def answer(handler, body, n):
        volumes = sent_volumes(handler, body)
        width = LATENT if n == 1 else 1
        return 200, NPZ, formats.write_npz(
            {"embedding": np.zeros((len(volumes), width), np.float32)})

    with (Misbehaving(answer) as server, CryoLensClient(server.url, batch_size=2) as client,
          pytest.raises(CryoLensAnswerError,
                        match=r"embedding has shape \(2, 1\), expected \(2, 8\)") as caught):
        client.extract_features(particles(4))
    assert caught.value.request_id == "rid-2"


def test_batch_process_count_that_disagrees_is_an_error():
    def answer(handler, body, n):
        volumes = sent_volumes(handler, body)
        return 200, JSON, json.dumps({"embeddings": features_of(volumes).tolist(),
                                      "n_volumes": len(volumes) + 1,
                                      "num_processed": len(volumes) + 1}).encode()

    with (Misbehaving(answer) as server, CryoLensClient(server.url, binary=False) as client,
          pytest.raises(CryoLensAnswerError, match="n_volumes is 3 for 2 volume")):
        client.batch_process(particles(2))


# -- Retry-After -------------------------------------------------------------------------------
MALFORMED = ["nan", "NaN", "-1", "-0.5", "inf", "-inf", "Infinity", "1e999", "soon", "1,5",
             "0x10", "", "  ", "Wed, 99 Foo 2015", "\u00e9"]


@pytest.mark.parametrize("value", MALFORMED)
def test_a_malformed_retry_after_falls_back_to_the_backoff(value):
    response = httpx.Response(503, headers={"Retry-After": value.encode("utf-8")})
    for attempt in range(4):
        assert retry_wait(response, attempt, 30) == FALLBACK_RETRY_WAIT_S * 2 ** attempt


@given(value=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
       attempt=st.integers(0, 10_000), cap=st.floats(0, 1e6, allow_subnormal=False))
def test_retry_wait_is_always_a_bounded_number(value, attempt, cap):
    wait = retry_wait(httpx.Response(503, headers={"Retry-After": value}), attempt, cap)
    assert 0.0 <= wait <= cap


def test_huge_retry_after_is_capped():
    for value in ("99999999999999999999999", "9" * 400):
        assert retry_wait(httpx.Response(503, headers={"Retry-After": value}), 0, 7.5) == 7.5


@pytest.mark.parametrize("value", ["nan", "-3", "garbage", "1e999"])
def test_a_real_503_with_a_malformed_retry_after_is_retried(value):
    def answer(handler, body, n):
        if n == 1:
            return 503, {**JSON, "Retry-After": value}, b'{"detail": "busy"}'
        return 200, JSON, b'{"status": "healthy"}'

    with Misbehaving(answer) as server, \
            CryoLensClient(server.url, max_retry_wait_s=0.2) as client:
        assert client.health() == {"status": "healthy"}
    assert server.count == 2
