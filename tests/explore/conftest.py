"""The explorer's tests: the simulated copick dataset embedded with the demo model (made once a
run, explore_helpers.cached_dataset), its table, the demo engine, the app in-process."""
from __future__ import annotations

import pytest
from explore_helpers import cached_dataset

from cryolens.engine import Engine
from cryolens.explore.app import Explorer, create_app
from cryolens.explore.particles import engine_reconstructor
from cryolens.explore.table import EmbeddingTable


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return cached_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def table(data):
    return EmbeddingTable.open(data[1])


@pytest.fixture(scope="module")
def engine():
    return Engine.from_checkpoint("demo", device="cpu")


@pytest.fixture(scope="module")
def client(table, engine):
    # in-process: Starlette's TestClient is httpx driving the ASGI app through a portal
    from fastapi.testclient import TestClient

    explorer = Explorer.open(table, engine_reconstructor(engine), "demo, in-process")
    with TestClient(create_app(explorer)) as test_client:
        yield test_client
