"""Hypothesis: random shapes, axes, dtypes, layouts and value scales against the reference."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import bncy
from bncy import reference


@st.composite
def problems(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < 2:          # training needs 2 values per channel
        shape = (shape[0] + 1,) + shape[1:] if axis % ndim != 0 else shape + (2,)
        ndim = len(shape)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, -5.0, 1e3]))
    seed = draw(st.integers(0, 2**32 - 1))
    layout = draw(st.sampled_from(["C", "F", "reversed", "strided"]))
    n_threads = draw(st.sampled_from([None, 1, 2, 3]))
    return shape, axis, dtype, scale, offset, seed, layout, n_threads


def _layout(a, layout):
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "reversed":
        return a[::-1]
    if layout == "strided":
        return np.repeat(a, 2, axis=-1)[..., ::2]
    return a


def _truth_forward(x, g, b, axis, eps=1e-5):
    """y, mean, invstd in extended precision (np.longdouble), rounded to float64."""
    xl = np.asarray(x, dtype=np.longdouble)
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    mu = xl.mean(axis=red, keepdims=True)
    var = ((xl - mu) ** 2).mean(axis=red, keepdims=True)
    inv = 1 / np.sqrt(var + np.longdouble(eps))
    y = (xl - mu) * inv * np.asarray(g, np.longdouble).reshape(shape) + np.asarray(
        b, np.longdouble).reshape(shape)
    return y.astype(np.float64), mu.ravel().astype(np.float64), inv.ravel().astype(np.float64)


@given(problems())
def test_all_three_functions_match_the_reference(p):
    shape, axis, dtype, scale, offset, seed, layout, n_threads = p
    rng = np.random.default_rng(seed)
    x = _layout((offset + scale * rng.standard_normal(shape)).astype(dtype), layout)
    dy = _layout(rng.standard_normal(shape).astype(dtype), layout)
    C = shape[axis]
    g = rng.standard_normal(C)
    b = rng.standard_normal(C)
    y, m, s = bncy.forward(x, g, b, axis=axis, n_threads=n_threads)
    yr, mr, sr = reference.forward(x, g, b, axis=axis)
    f32 = np.dtype(dtype) == np.float32
    M = x.size // C
    # kappa = max|x| / std: how much float64 rounding of x's magnitude is amplified in
    # x - mean; the reference's own error grows like M * eps * kappa (plain sums).
    kappa = (abs(offset) + 5 * scale) / scale
    ref_err = 4 * M * np.finfo(np.float64).eps * kappa
    rt, at = (5e-6, 5e-6) if f32 else (1e-10, 1e-10 + ref_err)
    assert_allclose(m, mr, rtol=1e-12, atol=1e-12 * (scale + abs(offset)))
    assert_allclose(s, sr, rtol=1e-8 + ref_err)
    assert_allclose(y, yr, rtol=rt, atol=at * (1 + np.abs(b).max()))
    if not f32 and np.finfo(np.longdouble).eps < np.finfo(np.float64).eps:
        # against an extended-precision truth bncy's error is a few eps * kappa, however
        # large M is (blocked sums, Chan merge)
        yt, mt, st = _truth_forward(x, g, b, axis)
        tight = 1e-12 + 64 * np.finfo(np.float64).eps * kappa * np.abs(g).max()
        assert_allclose(y, yt, rtol=1e-12, atol=tight)
        eps64 = np.finfo(np.float64).eps
        assert_allclose(m, mt, rtol=0, atol=8 * eps64 * (abs(offset) + 5 * scale))
    dx, dg, db = bncy.backward(dy, x, m, s, g, axis=axis, n_threads=n_threads)
    dxr, dgr, dbr = reference.backward(dy, x, m, s, g, axis=axis)
    M = x.size // C
    gs = np.abs(g).max() * s.max()
    assert_allclose(dx, dxr, rtol=rt, atol=at * 10 * gs)
    assert_allclose(dg, dgr, rtol=rt, atol=at * M)
    assert_allclose(db, dbr, rtol=rt, atol=at * M)
    yi = bncy.inference(x, m, 1 / s**2, g, b, axis=axis, eps=0.0, n_threads=n_threads)
    assert_allclose(yi, yr, rtol=rt, atol=at * (1 + np.abs(b).max()))
