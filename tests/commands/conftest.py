"""The particle commands' shared inputs: the small random model, its engine, a stack, a folder of
MRC files and a copick project, made once for this folder's tests (none changes them)."""
from __future__ import annotations

import pytest
from io_helpers import make_copick_project, particle_stack, write_mrc

from cryolens.engine import Engine


@pytest.fixture(scope="session")
def model(small_model):
    """The small random model of ``tests/conftest.py``, which its shared ``server`` serves."""
    return small_model


@pytest.fixture(scope="session")
def engine(model):
    return Engine.from_checkpoint(str(model), device="cpu")


@pytest.fixture(scope="session")
def stack():
    return particle_stack(5)


@pytest.fixture(scope="session")
def folder(tmp_path_factory, stack):
    root = tmp_path_factory.mktemp("mrc")
    for i, volume in enumerate(stack):
        write_mrc(root / f"p{i}.mrc", volume)
    return root


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    return make_copick_project(tmp_path_factory.mktemp("copick"))
