"""Checkpoints that are not what they claim, against local HTTP servers (real sockets on
127.0.0.1): a file that is no checkpoint is called that in one line, a download that trickles
is cut at its deadline, and nothing is cached that did not load."""
from __future__ import annotations

import os
import pickle
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from http_stand_in import LocalHTTPServer, QuietHandler
from server_helpers import small_model_file

from cryolens.checkpoints import read_state_dict, resolve_checkpoint
from cryolens.cli import main
from cryolens.errors import CheckpointError, UnsafeCheckpointError

HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Hello</body></html>\n"


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


NOT_CHECKPOINTS = {
    "an HTML page": (HTML, "looks like an HTML or XML page"),
    "random bytes": (bytes(range(7, 200)) * 5, "starts with the bytes 07 08 09"),
    "an empty file": (b"", "the file is empty"),
    "a pickle of odd opcodes": (b"\x80\x02" + bytes(range(200, 256)) * 3,
                                "a damaged or foreign PyTorch pickle"),
}


@pytest.mark.parametrize("name", list(NOT_CHECKPOINTS))
def test_a_file_that_is_no_checkpoint_is_called_that(tmp_path, name):
    data, says = NOT_CHECKPOINTS[name]
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    assert not isinstance(caught.value, UnsafeCheckpointError)
    message = one_line(caught.value)
    assert message.startswith("model.pt is not a checkpoint") and says in message
    assert "run code" not in message


def test_a_pickle_that_would_run_code_is_still_called_unsafe(tmp_path):
    class Runs:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"weights": Runs()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="would run code"):
        read_state_dict(path)


def test_info_on_random_bytes_says_it_is_not_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "noise.bin"
    path.write_bytes(bytes(range(256)) * 8)
    assert main(["info", str(path)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "noise.bin is not a checkpoint" in err and "run code" not in err


# -- downloads ---------------------------------------------------------------------------------
class Pages(LocalHTTPServer):
    """A tiny HTTP server answering every GET with 200 and ``body``; counts the requests."""

    def __init__(self, body: bytes, content_type: str = "text/html") -> None:
        self.gets = 0
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                outer.gets += 1
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)


def cached_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_an_html_page_answered_200_is_called_that_and_never_cached(tmp_path):
    cache = tmp_path / "cache"
    with Pages(HTML) as server:
        for _ in range(2):  # the second start asks again: nothing was kept
            with pytest.raises(CheckpointError) as caught:
                resolve_checkpoint(f"{server.url}/weights/model.pt", cache_dir=cache, timeout=5)
            message = one_line(caught.value)
            assert message.startswith(f"Downloaded {server.url}/weights/model.pt, but ")
            assert "model.pt is not a checkpoint: it looks like an HTML or XML page" in message
            assert "it was not cached" in message and "run code" not in message
            assert "known_hash" not in message and "SHA256" not in message  # pooch's notice
            assert cached_files(cache) == [] and not any(cache.rglob(".part-*"))
        assert server.gets == 2


def test_a_cached_page_from_before_is_replaced_by_the_real_file(tmp_path):
    weights = tmp_path / "www.pt"
    small = small_model_file(tmp_path / "small.safetensors")
    weights.write_bytes(small.read_bytes())
    cache = tmp_path / "cache"
    with Pages(weights.read_bytes(), "application/octet-stream") as server:
        url = f"{server.url}/model.safetensors"
        first = resolve_checkpoint(url, cache_dir=cache, timeout=5)
        first.path.write_bytes(HTML)  # what an older version cached from a login page
        again = resolve_checkpoint(url, cache_dir=cache, timeout=5)
        assert server.gets == 2
    assert again.origin == "download" and again.path.read_bytes() == small.read_bytes()
    assert resolve_checkpoint(url, cache_dir=cache, timeout=5).origin == "cache"


@contextmanager
def dripping(total: int, every_s: float) -> Iterator[tuple[str, list[int]]]:
    """A server that promises ``total`` bytes and sends one every ``every_s`` seconds; yields
    its URL and a list holding how many bytes it sent."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()
    sent = [0]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: " + str(total).encode() + b"\r\n\r\n")
            try:
                conn.sendall(b"\x80")  # starts like a pickle: only the deadline stops it
                while not stop.wait(every_s) and sent[0] < total:
                    conn.sendall(b"\x00")
                    sent[0] += 1
            except OSError:  # the client hung up: what the deadline should make it do
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/slow.pt", sent
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_a_download_that_drips_fails_at_its_deadline_not_per_read(tmp_path):
    """A byte every 0.2 s never trips the 5 s timeout of each read; the whole download's
    deadline of 1 s ends it long before the 100,000 bytes promised."""
    cache = tmp_path / "cache"
    with dripping(total=100_000, every_s=0.2) as (url, sent):
        with pytest.raises(CheckpointError) as caught:
            resolve_checkpoint(url, cache_dir=cache, timeout=5, deadline=1.0)
        message = one_line(caught.value)
    assert "the download was not finished by its deadline" in message
    assert sent[0] < 1000
    assert cached_files(cache) == []


def test_a_good_download_still_lands_in_the_cache(tmp_path):
    small = small_model_file(tmp_path / "small.safetensors")
    cache = tmp_path / "cache"
    with Pages(small.read_bytes(), "application/octet-stream") as server:
        resolved = resolve_checkpoint(f"{server.url}/small.safetensors", cache_dir=cache,
                                      timeout=5)
    assert resolved.origin == "download" and cached_files(cache) == [resolved.path]
    assert set(read_state_dict(resolved.path)[0]) == set(read_state_dict(small)[0])
