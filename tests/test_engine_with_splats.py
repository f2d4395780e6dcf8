"""reconstruct(with_splats=True): the reconstruction and the splats from one encoder pass."""
from __future__ import annotations

import numpy as np
import pytest
from model_helpers import spread_model

from cryolens.engine import Engine
from cryolens.operations import Operation, run


@pytest.fixture(scope="module")
def engine():
    return Engine(spread_model(), device="cpu")


@pytest.fixture(scope="module")
def volumes():
    return np.random.default_rng(3).standard_normal((5, 48, 48, 48), dtype=np.float32)


def _count_encoder_passes(engine):
    calls = []
    handle = engine.model.encoder.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    return calls, handle


@pytest.mark.parametrize("include_free", [True, False])
def test_reconstruct_with_splats_equals_the_two_calls_and_encodes_once(engine, volumes,
                                                                        include_free):
    plain = engine.reconstruct(volumes)
    alone = engine.splats(volumes, include_free=include_free)
    calls, handle = _count_encoder_passes(engine)
    try:
        both = engine.reconstruct(volumes, with_splats=True, include_free=include_free)
    finally:
        handle.remove()
    assert sum(calls) == len(volumes)  # each particle through the encoder once
    np.testing.assert_array_equal(both.reconstruction, plain.reconstruction)
    for name in ("centers", "scales", "weights", "segment"):
        np.testing.assert_array_equal(getattr(both.splats, name), getattr(alone, name))
    assert (both.splats.n_affinity, both.splats.n_free) == (alone.n_affinity, alone.n_free)
    np.testing.assert_array_equal(both.splats.features.embedding, plain.features.embedding)
    assert plain.splats is None


def test_operation_with_splats_encodes_once(engine, volumes):
    calls, handle = _count_encoder_passes(engine)
    try:
        result = run(engine, Operation(kind="reconstruct", with_splats=True), volumes)
    finally:
        handle.remove()
    assert sum(calls) == len(volumes)
    assert result.arrays["centers"].shape == (5, 50, 3)
    assert int(result.shared["n_total"]) == 50


def test_with_splats_must_be_a_bool(engine, volumes):
    from cryolens.errors import InputError

    with pytest.raises(InputError, match="with_splats"):
        engine.reconstruct(volumes[:1], with_splats="false")
