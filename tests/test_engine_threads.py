"""The CPU engine's chunks: side by side on several threads with the same numbers as on one
thread, the caller's thread setting kept, an error in a chunk handled as on one thread, and
chunks of unequal sizes on every way of running a batch."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from model_helpers import spread_model

from cryolens.engine import Engine


@pytest.fixture(scope="module")
def engine():
    return Engine(spread_model(), device="cpu", max_chunk=2)


@pytest.fixture
def threads():
    """Restores the test process's PyTorch thread count afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(engine, volumes, n_threads):
    torch.set_num_threads(n_threads)
    return (engine.features(volumes), engine.reconstruct(volumes, segments=True),
            engine.splats(volumes))


def test_numbers_do_not_depend_on_the_thread_count(engine, threads):
    """Twelve particles make six chunks of two on one, two or three threads."""
    volumes = np.random.default_rng(1).standard_normal((12, 48, 48, 48)).astype(np.float32)
    results = {n: _run(engine, volumes, n) for n in (1, 2, 3)}
    for n in (2, 3):
        for ours, one in zip(results[n], results[1], strict=True):
            for name, value in vars(one).items():
                if isinstance(value, np.ndarray):
                    assert np.array_equal(getattr(ours, name), value), (n, name)


def test_the_callers_thread_count_is_kept(engine, threads):
    volumes = np.zeros((4, 48, 48, 48), np.float32)
    volumes[:, 20:28, 20:28, 20:28] = 1
    for n in (3, 2):
        torch.set_num_threads(n)
        engine.reconstruct(volumes)
        assert torch.get_num_threads() == n


def test_chunks_run_on_as_many_threads_as_the_caller_has(engine, threads):
    seen: set[str] = set()
    step = engine.model.encode
    pair = threading.Barrier(2, timeout=30)  # two chunks at a time, or this times out

    def spy(x):
        seen.add(threading.current_thread().name)
        pair.wait()
        return step(x)

    torch.set_num_threads(2)
    engine.model.encode = spy
    try:  # six chunks of two
        engine.features(np.random.default_rng(2).standard_normal((12, 48, 48, 48)))
    finally:
        del engine.model.encode
    assert len(seen) == 2 and all(name.startswith("cryolens-cpu") for name in seen)


def test_an_error_in_one_chunk_is_raised_and_the_engine_goes_on(engine, threads):
    torch.set_num_threads(2)
    volumes = np.random.default_rng(3).standard_normal((8, 48, 48, 48)).astype(np.float32)
    step = engine.model.encode

    calls = []

    def failing(x):
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("chunk failed")
        return step(x)

    engine.model.encode = failing
    try:
        with pytest.raises(RuntimeError, match="chunk failed"):
            engine.features(volumes)
    finally:
        del engine.model.encode
    assert engine.features(volumes).embedding.shape == (8, 8)


@pytest.mark.parametrize("exact_zscore", [True, False])
def test_chunks_of_unequal_sizes_on_either_z_score(exact_zscore, threads):
    """Seven particles in chunks of at most 3 make chunks of 2, 2 and 3 (the largest last),
    through the numpy z-score and through the pipelined one with its reused buffers."""
    torch.set_num_threads(1)
    volumes = np.random.default_rng(5).standard_normal((7, 48, 48, 48)).astype(np.float32)
    model = spread_model()
    chunked = Engine(model, device="cpu", max_chunk=3, exact_zscore=exact_zscore)
    whole = Engine(model, device="cpu", max_chunk=7, exact_zscore=exact_zscore)
    np.testing.assert_allclose(chunked.reconstruct(volumes).reconstruction,
                               whole.reconstruct(volumes).reconstruction, rtol=0, atol=1e-4)
