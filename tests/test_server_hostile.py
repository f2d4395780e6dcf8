"""Limits that hold on bytes, not on how they arrive (issue #25, class 3), on a real process:
request headers over the limit get 431 whether sent at once or dribbled; slow uploads reserve
the parse budget only as their bytes arrive, so they cannot starve other requests; an answer
the client does not read is dropped (connection aborted, memory freed) after the send timeout,
while /health answers throughout."""
from __future__ import annotations

import io
import re
import socket
import time

import numpy as np
import orjson
import pytest
import requests
from server_helpers import small_model_file, start_cli_server

SEND_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
PARSE_BUDGET = 4 * 1024**2
ENV = {"CRYOLENS_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
       "CRYOLENS_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
       "CRYOLENS_MAX_PARSE_BYTES": str(PARSE_BUDGET),
       "CRYOLENS_PARSE_WAIT_S": "0.5"}
HEADER_LIMIT = 64 * 1024  # the default


pytestmark = pytest.mark.slow  # a server process of its own, and uploads paced over seconds


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")


@pytest.fixture(scope="module")
def server(model):
    proc = start_cli_server(model, env=ENV)
    yield proc
    proc.stop()


def connect(server, timeout: float = 30.0, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:  # before connecting: it sets the TCP window
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", server.port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def health_ok(server) -> bool:
    return requests.get(server.url + "/health", timeout=5).status_code == 200


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        found = re.search(r"^VmRSS:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(found.group(1)) / 1024


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


# -- request headers --------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 4096], ids=["one write", "4 KiB writes"])
def test_headers_over_the_limit_get_431_however_they_arrive(server, chunk):
    request = (b"GET /health HTTP/1.1\r\nHost: x\r\n"
               + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000) for i in range(104))
               + b"\r\n")
    assert len(request) > 104_000
    sock = connect(server)
    pieces = [request] if chunk is None else [request[i:i + chunk]
                                              for i in range(0, len(request), chunk)]
    try:
        for piece in pieces:
            sock.sendall(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before the last piece
    head, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), head[:200]
    assert orjson.loads(body)["field"] == "headers"
    assert health_ok(server)


def test_a_body_still_arriving_after_an_early_answer_is_not_counted_as_headers(server):
    """A request refused before its body is read (422 on a query option) may go on sending
    that body: its bytes are the old request's, not the next one's headers (they were counted
    as such, and a body over 64 KiB drew an unrequested 431 and a reset)."""
    body = npy(np.zeros((1, 48, 48, 48), np.float32))  # 442 KB
    sock = connect(server)
    sock.sendall(b"POST /batch_process?batch_size=0 HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/x-npy\r\nContent-Length: %d\r\n\r\n" % len(body))
    sock.sendall(body[:1000])
    first = b""
    while b"\r\n\r\n" not in first:
        first += sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 422 "), first[:200]
    for at in range(1000, len(body), 100_000):
        sock.sendall(body[at:at + 100_000])
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    rest = first.partition(b"\r\n\r\n")[2] + read_until_closed(sock)
    assert b"HTTP/1.1 431" not in rest, rest[:300]
    assert b"HTTP/1.1 200 " in rest, rest[:300]


def test_headers_just_under_the_limit_are_served(server):
    filler = b"a" * (HEADER_LIMIT - 200)
    answer = requests.get(server.url + "/health", headers={"X-Filler": filler.decode()},
                          timeout=10)
    assert answer.status_code == 200


# -- answers nobody reads ---------------------------------------------------------------------
@pytest.mark.slow
def test_answers_not_read_are_dropped_after_the_send_timeout(server):
    """Three clients send a 32-volume stack for reconstruction (a ~150 MB JSON answer each)
    and never read: they held ~440 MiB for as long as they kept their sockets open. Now each
    connection is aborted one send timeout after the client stops reading, and the memory
    goes back."""
    stack = np.random.default_rng(3).standard_normal((32, 48, 48, 48)).astype(np.float32)
    body = npy(stack)
    before = rss_mib(server.process.pid)
    socks = []
    for _ in range(3):
        sock = connect(server, receive_buffer=4096)
        sock.sendall(b"POST /reconstruct?use_segmented_decoder=false HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/x-npy\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        socks.append(sock)
    deadline = time.monotonic() + 120
    while server.output().count("answer not read") < 3 and time.monotonic() < deadline:
        assert health_ok(server)
        time.sleep(0.5)
    assert server.output().count("answer not read") == 3, server.output()[-2000:]
    for sock in socks:
        got = read_until_closed(sock)  # whatever the kernel held, then the reset
        assert len(got) < 100 * 1024**2
        sock.close()
    time.sleep(3)  # the worker trims the heap once idle
    assert rss_mib(server.process.pid) < before + 150
    assert requests.post(server.url + "/statistics", json={"volume": [1, 2]},
                         timeout=10).status_code == 200


# -- the parse budget -------------------------------------------------------------------------
def test_slow_chunked_uploads_cannot_starve_other_requests(server):
    """Two chunked uploads of unknown size, each above the minimum rate (96 KiB/s): they
    reserved the body limit each (the whole budget between them), and every other request
    carrying a body got 503 for as long as they lasted. Now they hold what they sent."""
    socks = []
    for _ in range(2):
        sock = connect(server)
        sock.sendall(b"POST /statistics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b'5\r\n{"vol\r\n')
        socks.append(sock)
    piece = b"0," * 4915  # 9830 bytes every 0.1 s: 96 KiB/s
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    statuses = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < BODY_TIMEOUT_S + 1:
            for sock in socks:
                sock.sendall(chunk)
            statuses.append(requests.post(server.url + "/statistics", json={"volume": [1, 2]},
                                          timeout=10).status_code)
            time.sleep(0.1)
    finally:
        for sock in socks:
            sock.close()
    assert statuses and set(statuses) == {200}, statuses


def test_a_budget_filled_by_received_bytes_answers_503_with_retry_after(server):
    sock = connect(server)
    sock.sendall(b"POST /statistics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (2 * PARSE_BUDGET)
                 + b'{"volume": [' + b"0," * (PARSE_BUDGET // 2))
    try:
        time.sleep(0.3)
        refused = requests.post(server.url + "/statistics", json={"volume": [1, 2]},
                                timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
        assert "parsing" in refused.json()["detail"]
    finally:
        sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the closed upload's bytes are returned
        answer = requests.post(server.url + "/statistics", json={"volume": [1, 2]}, timeout=10)
        if answer.status_code == 200:
            break
        time.sleep(0.2)
    assert answer.status_code == 200
