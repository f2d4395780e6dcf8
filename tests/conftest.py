"""Shared fixtures: where ../shared lives, and the parity checkpoint and golden arrays in it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CRYOLENS_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "parity"
PARITY_CKPT = PARITY / "v001_random_lightning.ckpt"
GOLDEN = PARITY / "golden_dev.npz"

needs_parity = pytest.mark.skipif(
    not (PARITY_CKPT.exists() and GOLDEN.exists()),
    reason=f"parity fixtures not found under {PARITY} (set CRYOLENS_SHARED to the shared/ folder)",
)


@pytest.fixture(scope="session")
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden arrays not found at {GOLDEN}")
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def parity_engine():
    if not PARITY_CKPT.exists():
        pytest.skip(f"parity checkpoint not found at {PARITY_CKPT}")
    from cryolens.engine import Engine

    return Engine.from_checkpoint(str(PARITY_CKPT), device="cpu")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """The small random model of ``server_helpers.small_model_file``, written once per run."""
    from server_helpers import small_model_file

    return small_model_file(tmp_path_factory.mktemp("model") / "small.safetensors")


@pytest.fixture(scope="session")
def server(small_model):
    """A real server process on the small model with default settings, started once and shared
    by every test module that asks for it (none changes it); modules that need another model
    or other settings define their own ``server``."""
    from server_helpers import start_cli_server

    proc = start_cli_server(small_model)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def demo_server():
    """A real server process on the demo model, started once and shared (README examples,
    the napari widget, values the small random model cannot produce)."""
    from server_helpers import start_cli_server

    proc = start_cli_server("demo")
    yield proc
    proc.stop()


def spread_model():
    """A small random CryoLens model (50 splats, 8 latent dims) whose latents are O(1), so its
    splats spread over the box as a trained model's do (engine tests)."""
    from cryolens.model import CryoLensConfig, CryoLensVAE

    torch.manual_seed(0)
    model = CryoLensVAE(CryoLensConfig(latent_dims=8, affinity_dims=6, n_affinity=40, n_free=10))
    with torch.no_grad():
        model.mu.weight.mul_(40)
        model.pose.weight.mul_(40)
    return model
