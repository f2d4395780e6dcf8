"""Checkpoints: every container layout, strict key checks, safe loading, and downloads against a
local HTTP server (no internet)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
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
from safetensors.torch import save_file

from cryolens import checkpoints
from cryolens.checkpoints import (
    REGISTRY,
    CheckpointSpec,
    ResolvedCheckpoint,
    fetch,
    infer_config,
    list_checkpoints,
    load_model,
    read_state_dict,
    resolve_checkpoint,
)
from cryolens.errors import CheckpointError, DeviceError, UnsafeCheckpointError
from cryolens.model.config import CryoLensConfig
from cryolens.model.vae import CryoLensVAE

SHARED = Path(os.environ.get("CRYOLENS_SHARED")
              or Path(__file__).resolve().parents[1].parent / "shared")
FIXTURE = SHARED / "parity" / "v001_random_lightning.ckpt"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(),
                                   reason=f"parity fixture not found at {FIXTURE}")

SMALL = CryoLensConfig(latent_dims=16, affinity_dims=12, n_affinity=64, n_free=16)


def small_state_dict(config: CryoLensConfig = SMALL, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in CryoLensVAE(config).state_dict().items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


# -- container layouts -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v001_weights() -> dict[str, torch.Tensor]:
    """The fixture's weights read directly with torch, prefixes and coords removed by hand."""
    if not FIXTURE.is_file():
        pytest.skip(f"parity fixture not found at {FIXTURE}")
    raw = torch.load(FIXTURE, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in raw.items() if "coords" not in k}
    assert len(weights) == 48
    return weights


def _coords(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape)


LAYOUTS = {
    # name: (writer(weights, path), expected layout)
    "raw_state_dict": (
        lambda w, p: torch.save({**w, "decoder._splatter.coords": _coords((1, 405224, 3))}, p),
        "state_dict"),
    "model_state_dict": (
        lambda w, p: torch.save({"model_state_dict": w, "checkpoint_version": "2.0",
                                 "epoch": 3}, p),
        "model_state_dict"),
    "safetensors": (
        lambda w, p: save_file({**w, "decoder._splatter.coords": _coords((5, 3))}, str(p)),
        "safetensors"),
    "module_prefixed": (
        lambda w, p: torch.save({f"module.{k}": v for k, v in w.items()}, p), "state_dict"),
    "orig_mod_prefixed": (
        lambda w, p: torch.save({f"_orig_mod.{k}": v for k, v in w.items()}, p), "state_dict"),
    "lightning_compiled_ddp": (
        lambda w, p: torch.save(
            {"state_dict": {f"model._orig_mod.module.{k}": v for k, v in w.items()}
             | {"model.decoder._splatter.coords": _coords((1, 7))},
             "hyper_parameters": {"latent_dims": 16}}, p),
        "lightning"),
}


@needs_fixture
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("file_name", ["weird_name.bin", "checkpoint"])
def test_every_layout_loads_the_same_weights(tmp_path, v001_weights, layout_name, file_name):
    write, layout = LAYOUTS[layout_name]
    path = tmp_path / file_name
    write(v001_weights, path)

    state_dict, got_layout = read_state_dict(path)
    assert got_layout == layout
    assert_same_tensors(state_dict, v001_weights)

    model, info = load_model(path)
    assert info.config == CryoLensConfig()
    assert info.layout == layout
    assert info.display_name == file_name and info.sha256 == sha256(path)
    assert str(tmp_path) not in str(info.to_dict())
    assert not model.training
    assert_same_tensors(model.state_dict(), v001_weights)


@needs_fixture
def test_lightning_fixture_loads_as_is(v001_weights):
    model, info = load_model(FIXTURE)
    assert info.layout == "lightning" and info.origin == "path"
    assert info.config == CryoLensConfig()
    assert_same_tensors(model.state_dict(), v001_weights)


# -- strict key checks -----------------------------------------------------------------------------
def _save(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state_dict, path)
    return path


@pytest.mark.parametrize("key", ["decoder._decoder.2.weight", "global_weight.bias",
                                 "decoder.free_sigmas.0.bias", "mu.bias"])
def test_missing_key_is_named(tmp_path, key):
    weights = small_state_dict()
    del weights[key]
    with pytest.raises(CheckpointError, match=f"missing.*{key}"):
        load_model(_save(weights, tmp_path / "m.pt"))


def test_unexpected_key_is_named(tmp_path):
    weights = small_state_dict() | {"decoder.extra_head.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unexpected decoder\.extra_head\.weight"):
        load_model(_save(weights, tmp_path / "m.pt"))


def test_wrong_shape_is_named(tmp_path):
    weights = small_state_dict()
    weights["decoder._decoder.2.weight"] = torch.zeros(1, 1, 7, 7, 7)
    with pytest.raises(CheckpointError, match=r"wrong shape decoder\._decoder\.2\.weight"):
        load_model(_save(weights, tmp_path / "m.pt"))


def test_many_missing_keys_are_counted(tmp_path):
    weights = {k: v for k, v in small_state_dict().items() if not k.startswith("encoder.")}
    with pytest.raises(CheckpointError,
                       match=r"encoder\.model\.0\.weight.*and 3 more \(8 in all\)"):
        load_model(_save(weights, tmp_path / "m.pt"))


def test_inconsistent_free_segment_is_refused():
    weights = small_state_dict()
    weights["decoder.free_centroids.0.weight"] = torch.zeros(64, 5)
    with pytest.raises(CheckpointError, match="free segment reads 5"):
        infer_config(weights)


def test_non_mapping_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(_save([torch.zeros(2)], tmp_path / "list.pt"))


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    assert not isinstance(caught.value, UnsafeCheckpointError)


# -- other configurations --------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    SMALL,
    CryoLensConfig(box_size=32, latent_dims=8, affinity_dims=8, n_affinity=32, n_free=0,
                   pose_dims=1),
    CryoLensConfig(box_size=64, latent_dims=10, affinity_dims=6, n_affinity=20, n_free=5),
])
def test_other_configurations_are_inferred_exactly(tmp_path, config):
    weights = small_state_dict(config)
    assert infer_config(weights) == config
    path = tmp_path / "other.safetensors"
    save_file(weights, str(path))
    model, info = load_model(path)
    assert info.config == config and model.config == config
    assert_same_tensors(model.state_dict(), weights)


# -- safe loading ----------------------------------------------------------------------------------
class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _TouchesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("payload", [_RunsShell, _TouchesFile])
@pytest.mark.parametrize("zipfile", [True, False])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, payload, zipfile):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    weights = small_state_dict()
    torch.save({"state_dict": weights, "extra": payload(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeCheckpointError, match="would run code"):
        read_state_dict(path)
    with pytest.raises(UnsafeCheckpointError):
        load_model(path)
    assert not marker.exists()


# -- resolution: names and local paths -------------------------------------------------------------
def test_missing_local_path_lists_known_names(tmp_path):
    with pytest.raises(CheckpointError, match="v001, demo"):
        resolve_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="directory"):
        resolve_checkpoint(tmp_path)


def test_missing_demo_says_it_is_not_installed(monkeypatch):
    spec = dataclasses.replace(REGISTRY["demo"], package_file="no_such_demo.safetensors")
    monkeypatch.setitem(REGISTRY, "demo", spec)
    with pytest.raises(CheckpointError, match="demo checkpoint is not in this install"):
        resolve_checkpoint("demo")


def test_package_checkpoint_checks_its_sidecar(tmp_path, monkeypatch):
    demo = tmp_path / "demo.safetensors"
    save_file(small_state_dict(), str(demo))
    monkeypatch.setattr(checkpoints, "_package_path", lambda spec: demo)
    sidecar = tmp_path / "demo.safetensors.sha256"

    sidecar.write_text(f"{sha256(demo)}  demo.safetensors\n")
    resolved = resolve_checkpoint("demo")
    assert (resolved.origin, resolved.name, resolved.sha256) == ("package", "demo", sha256(demo))
    _, info = load_model("demo")
    assert info.config == SMALL and info.layout == "safetensors"

    sidecar.write_text("0" * 64)
    with pytest.raises(CheckpointError, match="damaged"):
        resolve_checkpoint("demo")


def test_list_checkpoints_describes_the_registry(tmp_path):
    rows = {row["name"]: row for row in list_checkpoints(cache_dir=tmp_path)}
    assert set(rows) == {"v001", "demo"}
    assert rows["v001"]["sha256"] == REGISTRY["v001"].sha256
    assert rows["v001"]["available"] is False
    (tmp_path / "cryolens_v001.pt").write_bytes(b"x")
    assert {r["name"]: r for r in list_checkpoints(cache_dir=tmp_path)}["v001"]["available"]


def test_registry_v001_entry():
    spec = REGISTRY["v001"]
    assert spec.url == "https://czi-cryolens.s3-us-west-2.amazonaws.com/weights/cryolens_v001.pt"
    assert spec.sha256 == "f0de0ce03580091c53a1265efb4b2b0f38c952ad1a68a4cfb0a548d9c76f790e"
    assert spec.filename == "cryolens_v001.pt"
    assert REGISTRY["demo"].package_file == "demo.safetensors"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_device_error(tmp_path):
    with pytest.raises(DeviceError):
        load_model(_save(small_state_dict(), tmp_path / "m.pt"), device="cuda")


# -- downloads against a local server --------------------------------------------------------------
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


def test_resolved_checkpoint_is_accepted_by_load_model(tmp_path):
    path = _save(small_state_dict(), tmp_path / "m.pt")
    resolved = resolve_checkpoint(path)
    assert isinstance(resolved, ResolvedCheckpoint) and resolved.origin == "path"
    _, info = load_model(resolved)
    assert info.sha256 == sha256(path) and info.name == "m.pt"


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
