"""bncy.inference against the reference."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import bncy
from bncy import reference
from conftest import CASES, DTYPES, case_id, make, per_channel, tol


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype, affine, n_threads, rng, force_threads):
    shape, axis = case
    C = shape[axis]
    x = make(shape, dtype, rng, scale=3.0)
    rm = rng.standard_normal(C).astype(dtype)
    rv = (rng.random(C) + 0.1).astype(dtype)
    g, b = per_channel(rng, C) if affine else (None, None)
    y = bncy.inference(x, rm, rv, g, b, axis=axis, n_threads=n_threads)
    yr = reference.inference(x, rm, rv, g, b, axis=axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_allclose(y, yr, *tol(dtype))


def test_single_value_per_channel_is_fine(rng):
    x = make((1, 4), np.float64, rng)
    y = bncy.inference(x, np.zeros(4), np.ones(4), eps=0.0)
    assert_allclose(y, x, rtol=1e-15)


def test_inference_equals_training_on_the_same_statistics(rng):
    x = make((200, 5), np.float64, rng, scale=2.0, offset=1.0)
    y, m, s = bncy.forward(x, eps=1e-3)
    var = 1 / s**2 - 1e-3
    assert_allclose(bncy.inference(x, m, var, eps=1e-3), y, rtol=1e-10, atol=1e-12)


def test_in_place_and_read_only_statistics(rng):
    x = make((8, 3, 4, 4), np.float32, rng)
    rm, rv = np.zeros(3, np.float32), np.full(3, 4.0, np.float32)
    rm.setflags(write=False)
    expected = bncy.inference(x, rm, rv)
    bncy.inference(x, rm, rv, out=x)
    assert_array_equal(x, expected)
