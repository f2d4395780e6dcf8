"""A server left running on a shared node (issue #9), each check on a real process: memory in
proportion to the body, decided before per-volume work; slow, silent and idle connections
closed in time while /health answers; SIGTERM drains within its timeout and exits 0; work for
clients that left is neither run nor logged as an error; the parse budget answers 503.
Each waits out a timeout or a batch on purpose: all are marked slow."""
from __future__ import annotations

import io
import os
import re
import signal
import socket
import threading
import time

import numpy as np
import orjson
import pytest
import requests
from server_helpers import start_cli_server

pytestmark = pytest.mark.slow

J = {"Content-Type": "application/json"}
BODY_TIMEOUT_S = 1.5
HEADER_TIMEOUT_S = 1.5
KEEP_ALIVE_S = 1
PARSE_BUDGET = 4 * 1024**2
MAX_HEADER_BYTES = 4096
#: The header limits are given as flags, the rest in the environment: both ways are read.
HYGIENE_FLAGS = ("--header-timeout-s", str(HEADER_TIMEOUT_S),
                 "--max-header-bytes", str(MAX_HEADER_BYTES))
HYGIENE_ENV = {"CRYOLENS_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
               "CRYOLENS_KEEP_ALIVE_S": str(KEEP_ALIVE_S),
               "CRYOLENS_MAX_PARSE_BYTES": str(PARSE_BUDGET),
               "CRYOLENS_PARSE_WAIT_S": "0.5"}


@pytest.fixture(scope="module")
def model(small_model):
    return small_model


@pytest.fixture(scope="module")
def server(model):
    proc = start_cli_server(model, *HYGIENE_FLAGS, env=HYGIENE_ENV)
    yield proc
    proc.stop()


def connect(server, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def partial_upload(server, path: str = "/extract_features", length: int = 1_000_000,
                   sent: bytes = b'{"input_volume": [') -> socket.socket:
    """A connection that sent its headers and the start of a body, then nothing."""
    sock = connect(server)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + sent)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def health_ok(server) -> bool:
    return requests.get(server.url + "/health", timeout=5).status_code == 200


def metric(server, name: str, **labels: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + ("{" + want + "}" if want else "")) + r" (\S+)"
    found = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def vm_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# -- connections ------------------------------------------------------------------------------
def test_stalled_body_is_answered_408_and_closed_while_health_answers(server):
    sock = partial_upload(server)
    started = time.monotonic()
    assert health_ok(server)
    answer = read_until_closed(sock)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request body too slow: " in answer and b"below the minimum of 65536 bytes/s" in \
        answer, answer  # its first bytes came, then nothing
    assert BODY_TIMEOUT_S - 0.2 < elapsed < BODY_TIMEOUT_S + 4
    assert health_ok(server)


@pytest.mark.parametrize("dribble", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"],
                         ids=["silent", "slow headers"])
def test_silent_and_slow_header_connections_are_closed(server, dribble):
    sock = connect(server)
    started = time.monotonic()
    closed = False
    for byte in dribble:  # one byte every 0.1 s: never finishes in time
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.1)
    assert health_ok(server)
    if not closed:
        assert read_until_closed(sock) == b""
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 4


def test_header_limits_given_as_flags_hold(server):
    """--header-timeout-s and --max-header-bytes on the command line (not the environment) of
    the default one-process server: the timeout was read from the environment alone, and
    the header size was not bounded at all (uvicorn's limit is h11's; the protocol is
    httptools)."""
    sock = connect(server)
    started = time.monotonic()
    assert read_until_closed(sock) == b""
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 2
    assert requests.get(server.url + "/health", headers={"X-A": "a" * 3000},
                        timeout=5).status_code == 200
    for chunks in ([b"a" * 5000], [b"a" * 1000] * 5):  # at once, or dribbled
        sock = connect(server)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: ")
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(0.05)
        head, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 "), head
        assert orjson.loads(body) == {
            "detail": "the request line and headers are larger than the limit of 4096 "
                      "bytes", "field": "headers"}
    assert health_ok(server)


def test_idle_keep_alive_connection_is_closed(server):
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    answer = read_until_closed(sock)  # the answer, then the close after KEEP_ALIVE_S
    assert answer.startswith(b"HTTP/1.1 200")
    assert time.monotonic() - started < KEEP_ALIVE_S + 3


# -- cancelled work -----------------------------------------------------------------------------
def test_client_leaving_mid_upload_is_counted_not_logged_as_an_error(server):
    before = metric(server, "cryolens_client_disconnects_total", stage="upload")
    sock = partial_upload(server, sent=b'{"input_volume": [[[1.0, 2.0')
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 5
    while metric(server, "cryolens_client_disconnects_total", stage="upload") == before:
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.1)
    log = server.output()
    assert "internal error" not in log and "Traceback" not in log


def test_queued_request_whose_client_left_is_never_run(server):
    """Hold the worker with a big batch, queue a request on a raw socket, close it: the job is
    dropped (counted as disconnected) and the model never sees a 'features' particle."""
    batch = np.random.default_rng(1).standard_normal((256, 48, 48, 48)).astype(np.float32)
    npy = _npy(batch)
    done: list[int] = []
    holder = threading.Thread(target=lambda: done.append(requests.post(
        server.url + "/batch_process?return_embeddings=false", data=npy, timeout=120,
        headers={"Content-Type": "application/x-npy", "Accept": "application/x-npz"}
    ).status_code))
    dropped = metric(server, "cryolens_dropped_jobs_total", reason="disconnected")
    holder.start()
    deadline = time.monotonic() + 30
    while metric(server, "cryolens_requests_in_flight") < 1:  # the batch is in
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    body = orjson.dumps({"input_volume": np.zeros((48, 48, 48), np.float32)},
                        option=orjson.OPT_SERIALIZE_NUMPY)
    sock = connect(server)
    sock.sendall(b"POST /extract_features HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    while metric(server, "cryolens_queue_depth") < 1:  # parsed and queued behind the batch
        assert holder.is_alive(), "the batch finished too soon to hold the worker"
        time.sleep(0.02)
    sock.close()
    holder.join(120)
    assert done == [200]
    deadline = time.monotonic() + 10
    while metric(server, "cryolens_dropped_jobs_total", reason="disconnected") < dropped + 1:
        assert time.monotonic() < deadline, "the abandoned job was not dropped"
        time.sleep(0.1)
    assert metric(server, "cryolens_particles_total", operation="features") == 0


def test_client_that_left_while_its_batch_ran_is_counted_and_gets_nothing(server):
    """The job has started when the client goes: it runs to the end (the model cannot be
    stopped mid-batch), nothing is written, and the disconnect is counted as one while the
    request waited for the model."""
    npy = _npy(np.random.default_rng(2).standard_normal((256, 48, 48, 48)).astype(np.float32))
    before = metric(server, "cryolens_client_disconnects_total", stage="waiting")
    batches = metric(server, "cryolens_batch_particles_count", operation="reconstruct")
    sock = connect(server)
    sock.sendall(b"POST /batch_process HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy"
                 b"\r\nContent-Length: " + str(len(npy)).encode() + b"\r\n\r\n" + npy)
    deadline = time.monotonic() + 30
    while metric(server, "cryolens_running_particles") < 256:  # read, parsed and running
        assert time.monotonic() < deadline, "the batch did not start"
        time.sleep(0.005)
    sock.close()
    deadline = time.monotonic() + 60
    while metric(server, "cryolens_batch_particles_count", operation="reconstruct") == batches:
        assert time.monotonic() < deadline, "the batch did not run"
        time.sleep(0.1)
    assert metric(server, "cryolens_client_disconnects_total", stage="waiting") == before + 1
    log = server.output()
    assert "internal error" not in log and "Traceback" not in log


def _npy(array: np.ndarray) -> bytes:
    from cryolens.formats import write_npy

    return write_npy(array)


# -- budgets ------------------------------------------------------------------------------------
def test_parse_budget_full_answers_503_with_retry_after(server):
    # a body that sent the whole budget's worth of bytes, then stalls: it holds them
    holder = partial_upload(server, length=2 * PARSE_BUDGET,
                            sent=b'{"volume": [' + b"0," * (PARSE_BUDGET // 2))
    try:
        time.sleep(0.3)
        response = requests.post(server.url + "/statistics", json={"volume": [1, 2]}, timeout=10)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"].isdigit()
        assert "parsing" in response.json()["detail"]
        assert metric(server, "cryolens_parse_budget_refusals_total") >= 1
    finally:
        holder.close()
    time.sleep(0.3)
    assert requests.post(server.url + "/statistics", json={"volume": [1, 2]},
                         timeout=10).status_code == 200


def test_a_trickled_upload_cannot_hold_the_parse_budget(server):
    """A chunked upload that brings a byte every 0.2 s, never silent for the body timeout:
    it reserved the body limit (here the whole budget) and every other POST got 503 for as
    long as it went on. Now it holds only the bytes it sent, and it is cut after one body
    timeout for being below the minimum rate."""
    sock = connect(server)
    sock.sendall(b"POST /statistics HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    started = time.monotonic()
    refused = None
    answer = b""
    try:
        while time.monotonic() - started < BODY_TIMEOUT_S + 6:
            try:
                sock.sendall(b"1\r\n \r\n")
            except OSError:
                break
            if refused is None and time.monotonic() - started > 0.3:
                refused = requests.post(server.url + "/statistics", json={"volume": [1, 2]},
                                        timeout=10).status_code
            sock.settimeout(0.2)
            try:
                answer += sock.recv(65536)
                if answer.endswith(b"}"):
                    break
            except TimeoutError:
                pass
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    assert refused == 200  # it holds only the bytes it sent
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"request body too slow" in answer, answer
    assert elapsed < BODY_TIMEOUT_S + 3
    assert requests.post(server.url + "/statistics", json={"volume": [1, 2]},
                         timeout=10).status_code == 200


def test_an_upload_above_the_minimum_rate_is_never_cut(server):
    """A body that takes longer than the body timeout, arriving at 160 kB/s (above the 64 KiB/s
    minimum) in 16 kB chunks: answered, not 408."""
    stack = np.random.default_rng(5).standard_normal((2, 48, 48, 48)).astype(np.float32)
    body = io.BytesIO()
    np.save(body, stack)
    data = body.getvalue()
    sock = connect(server)
    sock.sendall(f"POST /extract_features HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 f"application/x-npy\r\nContent-Length: {len(data)}\r\n"
                 f"Connection: close\r\n\r\n".encode())
    started = time.monotonic()
    for at in range(0, len(data), 16_000):
        sock.sendall(data[at:at + 16_000])
        time.sleep(0.1)
    assert time.monotonic() - started > BODY_TIMEOUT_S + 1
    answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


@pytest.mark.slow
def test_large_batch_bodies_cost_memory_in_proportion(model):
    """A hostile 48 MiB body (millions of tiny 'volumes') is refused by count before any
    per-volume object; a 48 MiB body of real volumes (the last one wrong, so nothing runs)
    raises peak RSS by at most 4x its size."""
    proc = start_cli_server(model, "--max-body-bytes", str(300 * 1024**2),
                            "--max-volumes", "1024")
    try:
        size = 48 * 1024**2
        hostile = b'{"input_volumes": [' + b",".join([b"[[]]"] * (size // 5)) + b"]}"
        before = vm_kib(proc.process.pid, "VmHWM")
        response = requests.post(proc.url + "/batch_process", data=hostile, headers=J,
                                 timeout=120)
        assert response.status_code == 413, response.text
        assert "at most 1024" in response.json()["detail"]
        grown = (vm_kib(proc.process.pid, "VmHWM") - before) * 1024
        assert grown <= 4 * len(hostile), f"hostile body: peak grew {grown / len(hostile):.1f}x"
        del hostile

        one = orjson.dumps(np.random.default_rng(0).standard_normal((48, 48, 48)).astype(
            np.float32), option=orjson.OPT_SERIALIZE_NUMPY)
        body = b'{"input_volumes": [' + b",".join([one] * (size // len(one))) + b",[[[1]]]]}"
        before = vm_kib(proc.process.pid, "VmHWM")
        response = requests.post(proc.url + "/batch_process", data=body, headers=J, timeout=120)
        assert response.status_code == 422 and "got (1, 1, 1)" in response.text
        grown = (vm_kib(proc.process.pid, "VmHWM") - before) * 1024
        assert grown <= 4 * len(body), f"peak grew {grown / len(body):.1f}x the body"
        assert health_ok(proc)
    finally:
        proc.stop()


def test_a_large_json_statistics_body_is_read_in_pieces(model):
    """A 24 MB JSON volume to POST /statistics is read a piece at a time, as the model
    endpoints read theirs: numpy's statistics, and peak RSS grows by at most 3x the body (one
    orjson.loads of it grew it 5x); as large and not an array of numbers, a 422 naming the
    field, with no growth beyond the body."""
    proc = start_cli_server(model)
    try:
        volume = np.random.default_rng(0).standard_normal((48, 160, 160))
        body = orjson.dumps({"volume": volume}, option=orjson.OPT_SERIALIZE_NUMPY)
        before = vm_kib(proc.process.pid, "VmHWM")
        response = requests.post(proc.url + "/statistics", data=body, headers=J, timeout=60)
        grown = (vm_kib(proc.process.pid, "VmHWM") - before) * 1024
        assert response.status_code == 200, response.text
        stats = response.json()
        assert stats["shape"] == [48, 160, 160]
        np.testing.assert_allclose([stats[k] for k in ("mean", "std", "min", "max")],
                                   [volume.mean(), volume.std(), volume.min(), volume.max()],
                                   rtol=1e-12)
        assert grown <= 3 * len(body), f"peak grew {grown / len(body):.1f}x the body"

        bad = body[:-2] + b",null]}"  # a null after the last plane
        response = requests.post(proc.url + "/statistics", data=bad, headers=J, timeout=60)
        assert response.status_code == 422 and response.json()["field"] == "volume"
        assert "not parsed whole" in response.json()["detail"]
        assert health_ok(proc)
    finally:
        proc.stop()


# -- shutdown -----------------------------------------------------------------------------------
@pytest.mark.parametrize("stalled", [False, True], ids=["idle", "stalled client"])
def test_sigterm_exits_0_within_the_drain_timeout(model, stalled):
    drain = 2
    proc = start_cli_server(model, env={"CRYOLENS_DRAIN_TIMEOUT_S": str(drain),
                                        "CRYOLENS_BODY_TIMEOUT_S": "120"})
    sock = partial_upload(proc) if stalled else None
    try:
        time.sleep(0.3)
        started = time.monotonic()
        os.kill(proc.process.pid, signal.SIGTERM)
        code = proc.process.wait(drain + 15)
        assert code == 0, proc.output()[-2000:]
        assert time.monotonic() - started < drain + 8
    finally:
        if sock is not None:
            sock.close()
        proc.stop()
