"""bncy.backward against the reference, the staged chain rule and finite differences."""

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
    x = make(shape, dtype, rng, scale=2.0, offset=1.0)
    dy = make(shape, dtype, rng)
    g = per_channel(rng, C)[0] if affine else None
    _, mean, invstd = bncy.forward(x, g, axis=axis)
    dx, dg, db = bncy.backward(dy, x, mean, invstd, g, axis=axis, n_threads=n_threads)
    dxr, dgr, dbr = reference.backward(dy, x, mean, invstd, g, axis=axis)
    assert dx.dtype == dg.dtype == db.dtype == x.dtype
    assert dx.shape == x.shape and dg.shape == db.shape == (C,)
    rtol, atol = tol(dtype)
    M = x.size // C
    assert_allclose(dx, dxr, rtol=rtol, atol=atol)
    assert_allclose(dg, dgr, rtol=rtol, atol=atol * M)
    assert_allclose(db, dbr, rtol=rtol, atol=atol * M)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_closed_form_equals_staged_chain_rule(case, rng):
    shape, axis = case
    x = make(shape, np.float64, rng)
    dy = make(shape, np.float64, rng)
    g = per_channel(rng, shape[axis])[0]
    _, m, s = reference.forward(x, g, axis=axis)
    a = reference.backward(dy, x, m, s, g, axis=axis)
    b = reference.backward_staged(dy, x, m, s, g, axis=axis)
    for u, v in zip(a, b):
        assert_allclose(u, v, rtol=1e-9, atol=1e-10)


def _loss(x, g, b, w, axis):
    y, _, _ = reference.forward(x, g, b, axis=axis, eps=1e-3)
    return float(np.sum(w * y))


@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 2), -1)])
def test_finite_differences(shape, axis, rng):
    """dx, dgamma, dbeta of L = sum(w * y) by central differences, in float64."""
    C = shape[axis]
    x = make(shape, np.float64, rng)
    g, b = per_channel(rng, C)
    w = make(shape, np.float64, rng)
    _, m, s = bncy.forward(x, g, b, axis=axis, eps=1e-3)
    dx, dg, db = bncy.backward(w, x, m, s, g, axis=axis)
    h = 1e-6

    def numgrad(arr, f):
        grad = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = f()
            arr[i] = old - h
            down = f()
            arr[i] = old
            grad[i] = (up - down) / (2 * h)
        return grad

    def f():
        return _loss(x, g, b, w, axis)

    assert_allclose(dx, numgrad(x, f), rtol=1e-5, atol=1e-7)
    assert_allclose(dg, numgrad(g, f), rtol=1e-5, atol=1e-7)
    assert_allclose(db, numgrad(b, f), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_statistics_accepted(dtype, rng):
    x = make((30, 4), dtype, rng)
    dy = make((30, 4), dtype, rng)
    _, m, s = bncy.forward(x)
    a = bncy.backward(dy, x, m, s)
    b = bncy.backward(dy, x, m.astype(np.float32), s.astype(np.float32))
    rtol = 1e-5
    for u, v in zip(a, b):
        assert_allclose(u, v, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_and_in_place(dtype, rng):
    x = make((4, 3, 5, 7), dtype, rng)
    dy = make((4, 3, 5, 7), dtype, rng)
    _, m, s = bncy.forward(x)
    expected = bncy.backward(dy, x, m, s)[0]
    out = np.full_like(x, np.nan)
    dx, _, _ = bncy.backward(dy, x, m, s, out=out)
    assert dx is out
    assert_array_equal(out, expected)
    dy2 = dy.copy()
    assert bncy.backward(dy2, x, m, s, out=dy2)[0] is dy2     # dx over dy
    assert_array_equal(dy2, expected)
    x2 = x.copy()
    assert bncy.backward(dy, x2, m, s, out=x2)[0] is x2       # dx over x
    assert_array_equal(x2, expected)


def test_read_only_and_mixed_layouts(rng):
    x = make((6, 4, 5, 5), np.float64, rng)
    dy = make((6, 5, 5, 4), np.float64, rng).transpose(0, 3, 1, 2)  # channels-last view
    x.setflags(write=False)
    _, m, s = bncy.forward(x)
    dx, dg, db = bncy.backward(dy, x, m, s)
    dxr, dgr, dbr = reference.backward(dy, x, m, s)
    assert_allclose(dx, dxr, rtol=1e-11, atol=1e-12)
    assert_allclose(dg, dgr, rtol=1e-11, atol=1e-11)
    assert_allclose(db, dbr, rtol=1e-11, atol=1e-11)
