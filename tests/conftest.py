"""Shared fixtures: the parity checkpoint and golden arrays of ../shared (parity_helpers.py), the
small random model, and the servers every test module may share."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_helpers import GOLDEN, PARITY_CKPT

torch.set_num_threads(2)


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
