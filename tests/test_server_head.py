"""HEAD against a real server process: every GET route answers it with GET's status and headers
and no body, on a keep-alive connection that then goes on working; a path with no GET answers
405 naming its methods. (``server``: the small-model server of conftest.py.)"""
from __future__ import annotations

import asyncio
import socket

import pytest
import requests

from cryolens.server.middleware import HeadAsGet

#: GET routes of every kind: probes, model info, the root listing, docs, static files, and a
#: GET with a query.
GET_PATHS = ["/health", "/ready", "/model_info", "/", "/openapi.json", "/docs", "/redoc",
             "/static/favicon-32x32.png", "/statistics?volume=[[1,2],[3,4]]"]


class RawConnection:
    """One keep-alive HTTP/1.1 connection read byte-exactly: a body the server sent after a
    HEAD answer would show up as the start of the next answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def request(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin1").split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), f"not a status line: {status_line[:80]!r}"
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if method == "HEAD" else int(headers["content-length"])
        while len(self.buffer) < length:
            self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buffer += data


@pytest.fixture
def connection(server):
    conn = RawConnection(server.port)
    yield conn
    conn.close()


def test_head_on_get_routes_gives_get_headers_and_no_body(connection):
    for path in GET_PATHS:
        status, headers, body = connection.request("GET", path)
        assert status == 200, path
        head_status, head_headers, _ = connection.request("HEAD", path)
        assert head_status == 200, path
        assert head_headers["content-type"] == headers["content-type"], path
        assert int(head_headers["content-length"]) == len(body), path
        assert "transfer-encoding" not in head_headers, path
    # the same connection still answers: nothing was left behind by the HEAD answers
    connection.request("HEAD", "/metrics")
    status, _, body = connection.request("GET", "/health")
    assert (status, body) == (200, b'{"status":"healthy"}')
    assert connection.buffer == b""


def test_head_on_metrics_is_counted_as_head(connection):
    status, headers, _ = connection.request("HEAD", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert int(headers["content-length"]) > 0
    _, _, text = connection.request("GET", "/metrics")
    assert b'cryolens_requests_total{endpoint="/metrics",method="HEAD",status="200"}' in text


def test_head_on_a_post_only_route_is_405_with_allow(connection):
    status, headers, _ = connection.request("HEAD", "/reconstruct")
    assert status == 405 and headers["allow"] == "POST"
    status, _, body = connection.request("GET", "/health")
    assert (status, body) == (200, b'{"status":"healthy"}')


def test_allow_names_head_beside_get(server):
    response = requests.request("PUT", server.url + "/ready", timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"
    assert requests.head(server.url + "/batch_process", timeout=10).status_code == 405


def test_head_as_get_sends_the_start_and_one_empty_body():
    """In process, with a streamed answer: the app sees GET, the client gets GET's start and an
    empty last body; the caller's scope keeps HEAD and learns the route matched."""
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-length", b"6")]}

    async def app(scope, receive, send):
        assert scope["method"] == "GET"
        scope["route"] = "matched"
        await send(start)
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await send({"type": "http.response.body", "body": b"def"})

    sent, scope = [], {"type": "http", "method": "HEAD", "path": "/"}

    async def send(message):
        sent.append(message)

    asyncio.run(HeadAsGet(app)(scope, None, send))
    assert sent == [start, {"type": "http.response.body", "body": b""}]
    assert scope == {"type": "http", "method": "HEAD", "path": "/", "route": "matched"}
