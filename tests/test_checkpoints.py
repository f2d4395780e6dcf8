"""Checkpoints: every container layout, strict key checks, safe loading, the registry
(downloads: test_checkpoint_downloads.py)."""
from __future__ import annotations

import dataclasses
import os
import pathlib
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import SMALL, sha256, small_state_dict
from safetensors.torch import save_file

from cryolens import checkpoints
from cryolens.checkpoints import (
    REGISTRY,
    ResolvedCheckpoint,
    infer_config,
    list_checkpoints,
    load_model,
    read_state_dict,
    resolve_checkpoint,
)
from cryolens.errors import CheckpointError, DeviceError, UnsafeCheckpointError
from cryolens.model.config import CryoLensConfig

SHARED = Path(os.environ.get("CRYOLENS_SHARED")
              or Path(__file__).resolve().parents[1].parent / "shared")
FIXTURE = SHARED / "parity" / "v001_random_lightning.ckpt"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(),
                                   reason=f"parity fixture not found at {FIXTURE}")


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


def test_resolved_checkpoint_is_accepted_by_load_model(tmp_path):
    path = _save(small_state_dict(), tmp_path / "m.pt")
    resolved = resolve_checkpoint(path)
    assert isinstance(resolved, ResolvedCheckpoint) and resolved.origin == "path"
    _, info = load_model(resolved)
    assert info.sha256 == sha256(path) and info.name == "m.pt"
