"""Checkpoint downloads against a local HTTP server (no internet): the cache, hashes, timeouts,
the offline v001 advice."""
from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import SMALL, sha256, small_state_dict

from cryolens.checkpoints import REGISTRY, CheckpointSpec, fetch, load_model, resolve_checkpoint
from cryolens.errors import CheckpointError


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel completes them) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def closed_port_url(path: str = "/x") -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}{path}"


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture
def served(tmp_path) -> tuple[Path, str]:
    root = tmp_path / "www"
    root.mkdir()
    path = root / "small.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in small_state_dict().items()}}, path)
    return root, sha256(path)


def test_download_once_then_cache_without_network(tmp_path, served, monkeypatch):
    root, digest = served
    cache = tmp_path / "cache"
    with serve(root) as base:
        spec = CheckpointSpec(name="small", description="test", filename="small_v1.pt",
                              url=f"{base}/small.pt", sha256=digest)
        registry = {"small": spec}
        first = resolve_checkpoint("small", cache_dir=cache, registry=registry, timeout=2)
    assert first.origin == "download" and first.path == cache.resolve() / "small_v1.pt"
    assert first.sha256 == digest and first.name == "small"
    _, info = load_model(first)
    assert info.config == SMALL and info.layout == "lightning"

    import pooch

    def no_network(*args, **kwargs):
        raise AssertionError("the cache hit touched the network")

    monkeypatch.setattr(pooch, "retrieve", no_network)
    second = resolve_checkpoint("small", cache_dir=cache, registry=registry, timeout=2)
    assert second.origin == "cache" and second.path == first.path and second.sha256 == digest


def test_cache_dir_from_environment(tmp_path, served, monkeypatch):
    root, digest = served
    cache = tmp_path / "env_cache"
    monkeypatch.setenv("CRYOLENS_CACHE_DIR", str(cache))
    with serve(root) as base:
        spec = CheckpointSpec(name="small", description="test", filename="small.pt",
                              url=f"{base}/small.pt", sha256=digest)
        resolved = fetch(spec, timeout=2)
    assert resolved.path == cache.resolve() / "small.pt"


def test_prefilled_cache_needs_no_server(tmp_path, served):
    root, digest = served
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "small_v1.pt").write_bytes((root / "small.pt").read_bytes())
    spec = CheckpointSpec(name="small", description="test", filename="small_v1.pt",
                          url=closed_port_url("/small.pt"), sha256=digest)
    resolved = fetch(spec, cache_dir=cache, timeout=2)
    assert resolved.origin == "cache" and resolved.sha256 == digest


def test_bad_hash_is_refused_and_not_cached(tmp_path, served):
    root, _ = served
    cache = tmp_path / "cache"
    with serve(root) as base:
        spec = CheckpointSpec(name="small", description="test", filename="small.pt",
                              url=f"{base}/small.pt", sha256="0" * 64)
        with pytest.raises(CheckpointError, match="sha256 does not match"):
            fetch(spec, cache_dir=cache, timeout=2)
    assert not (cache / "small.pt").exists()


def test_corrupt_cached_copy_is_replaced(tmp_path, served):
    root, digest = served
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "small.pt").write_bytes(b"truncated")
    with serve(root) as base:
        spec = CheckpointSpec(name="small", description="test", filename="small.pt",
                              url=f"{base}/small.pt", sha256=digest)
        resolved = fetch(spec, cache_dir=cache, timeout=2)
    assert resolved.origin == "download" and sha256(resolved.path) == digest


def test_404_is_a_checkpoint_error(tmp_path, served):
    root, _ = served
    with serve(root) as base:
        spec = CheckpointSpec(name="gone", description="test", filename="gone.pt",
                              url=f"{base}/gone.pt", sha256="0" * 64)
        with pytest.raises(CheckpointError, match="HTTP 404"):
            fetch(spec, cache_dir=tmp_path / "cache", timeout=2)


def test_silent_server_times_out(tmp_path):
    with silent_server() as base:
        spec = CheckpointSpec(name="slow", description="test", filename="slow.pt",
                              url=f"{base}/slow.pt", sha256="0" * 64)
        started = time.monotonic()
        with pytest.raises(CheckpointError, match="did not answer within 1 s"):
            fetch(spec, cache_dir=tmp_path / "cache", timeout=1.0)
        assert time.monotonic() - started < 5


def test_plain_url_downloads_once(tmp_path, served):
    root, digest = served
    cache = tmp_path / "cache"
    with serve(root) as base:
        url = f"{base}/small.pt"
        first = resolve_checkpoint(url, cache_dir=cache, timeout=2)
        with pytest.raises(CheckpointError, match="sha256 does not match"):
            resolve_checkpoint(f"{base}/small.pt#sha256={'1' * 64}", cache_dir=tmp_path / "c2",
                               timeout=2)
        pinned = resolve_checkpoint(f"{url}#sha256={digest}", cache_dir=cache, timeout=2)
    assert first.origin == "download" and first.name == "small.pt" and first.sha256 == digest
    assert pinned.origin == "cache" and pinned.path == first.path
    again = resolve_checkpoint(url, cache_dir=cache, timeout=2)
    assert again.origin == "cache"
    _, info = load_model(url, cache_dir=cache)
    assert info.config == SMALL and info.display_name == "small.pt"


def test_offline_v001_fails_fast_with_advice(tmp_path, monkeypatch):
    url = closed_port_url("/weights/cryolens_v001.pt")
    monkeypatch.setitem(REGISTRY, "v001", dataclasses.replace(REGISTRY["v001"], url=url))
    cache = tmp_path / "empty cache"
    monkeypatch.setenv("CRYOLENS_CACHE_DIR", str(cache))
    started = time.monotonic()
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint("v001")
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "\n" not in message
    assert f"Could not download {url}: " in message
    assert str(cache.resolve() / "cryolens_v001.pt") in message
    assert REGISTRY["v001"].sha256 in message
    assert "CRYOLENS_CACHE_DIR" in message and "--checkpoint demo" in message
    assert "local path" in message


def test_stalled_name_lookup_is_bounded_by_the_timeout(tmp_path, monkeypatch):
    def stalls(*args, **kwargs):
        time.sleep(3)
        raise OSError("too late")

    monkeypatch.setattr(socket, "getaddrinfo", stalls)
    spec = CheckpointSpec(name="far", description="test", filename="far.pt",
                          url="https://unreachable.example/far.pt", sha256="0" * 64)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="no connection within 0.5 s"):
        fetch(spec, cache_dir=tmp_path / "cache", timeout=0.5)
    assert time.monotonic() - started < 2
