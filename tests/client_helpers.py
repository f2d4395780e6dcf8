"""Random particle stacks and the comparison of two answers, for the client's tests."""
from __future__ import annotations

import numpy as np

TOL = {"rtol": 1e-5, "atol": 1e-5}


def particles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 48, 48, 48)).astype(np.float32)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert np.shape(value) == np.shape(b[key]), key
        assert np.asarray(value).dtype == np.asarray(b[key]).dtype, key
        np.testing.assert_allclose(value, b[key], err_msg=key, **TOL)
