"""Hostile use: threads, long runs, extreme values, huge counts and arrays, random bad input."""

import os
import sys
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

import bncy
from bncy import reference
from conftest import make

# ---------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------


def test_many_python_threads_match_serial_calls(rng):
    jobs = []
    for i in range(8):
        shape = [(300, 17), (4, 6, 40, 40), (50, 9, 3)][i % 3]
        x = make(shape, [np.float32, np.float64][i % 2], rng, scale=i + 1.0, offset=i)
        jobs.append((x, make(shape, x.dtype, rng)))

    def run(x, dy):
        y, m, s = bncy.forward(x)
        dx, dg, db = bncy.backward(dy, x, m, s)
        return y, m, s, dx, dg, db, bncy.inference(x, m, 1 / s**2)

    serial = [run(*job) for job in jobs]
    results = [None] * len(jobs)
    errors = []
    barrier = threading.Barrier(len(jobs))

    def worker(k):
        try:
            barrier.wait()
            for _ in range(5):
                results[k] = run(*jobs[k])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, serial):
        for a, b in zip(got, want):
            assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Leaks
# ---------------------------------------------------------------------------


def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_repeated_calls_including_failing_ones_keep_memory_flat(rng):
    x = make((64, 32, 5), np.float32, rng)
    dy = make(x.shape, np.float32, rng)
    rm, rv = np.zeros(32), np.ones(32)
    bn = bncy.BatchNorm(32)

    def burst(n):
        for _ in range(n):
            y, m, s = bncy.forward(x, running_mean=rm, running_var=rv)
            bncy.backward(dy, x, m, s, out=y)
            bncy.inference(x, rm, rv)
            bn.backward(dy) if bn(x) is not None else None
            for bad in (lambda: bncy.forward(x[:, :, :0]),
                        lambda: bncy.forward(x, np.ones(3)),
                        lambda: bncy.backward(dy[:1], x, m, s),
                        lambda: bncy.inference(x.astype(np.int32), rm, rv)):
                try:
                    bad()
                except (TypeError, ValueError):
                    pass

    burst(2000)                       # warm up allocator pools and caches
    before = _rss_bytes()
    burst(20000)
    grown = _rss_bytes() - before
    assert grown < 8 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 20000 rounds"


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,log2_scale", [
    (np.float32, 123),      # ~1e37: squares overflow float32, not float64
    (np.float32, -126),     # ~1e-38, the smallest normal
    (np.float32, -140),     # subnormal
    (np.float64, 500),      # ~1e150
    (np.float64, 664),      # ~1e200: squares overflow float64 (the rescue path)
    (np.float64, 1020),     # ~1e307: x - mean nearly overflows too
    (np.float64, -530),     # ~1e-160: squares subnormal, M2 > 0 (eps = 0: rescued)
    (np.float64, -538),     # ~1e-162: M2 a few subnormals, M2 / n underflows to 0
    (np.float64, -997),     # ~1e-300: squares underflow
    (np.float64, -1000),    # ~1e-301, the variance is far below the smallest double
])
@pytest.mark.parametrize("shape,axis", [((40, 3), 1), ((4, 3, 50), 1)])
def test_extreme_magnitudes_give_finite_correct_results(dtype, log2_scale, shape, axis, rng):
    """With eps = 0 batch norm is scale-invariant, and scaling by a power of two is
    exact: y(x) must equal the reference's y(x * 2**-k) computed at magnitude 1."""
    base = rng.standard_normal(shape).astype(dtype)
    if log2_scale < -120 and dtype == np.float32 or log2_scale < -1000:
        base = np.round(base * 8) / 8      # few significant bits: exact as subnormals
    x = np.ldexp(base, log2_scale).astype(dtype)
    assert np.all(np.ldexp(x, -log2_scale) == base)
    y, m, s = bncy.forward(x, axis=axis, eps=0.0)
    yr, mr, sr = reference.forward(base, axis=axis, eps=0.0)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(m)) and np.all(s > 0)
    tol = 5e-6 if dtype == np.float32 else 1e-10
    assert_allclose(y, yr, rtol=tol, atol=tol)
    assert_allclose(np.ldexp(m, -log2_scale), mr, rtol=1e-12, atol=1e-12)
    if dtype == np.float32 and log2_scale < -126:
        return   # dx ~ dy / std ~ 1e42 is beyond float32 (test_documented_limits)
    dy = make(shape, dtype, rng)
    dx, dg, db = bncy.backward(dy, x, m, s, axis=axis)
    dxr, dgr, dbr = reference.backward(dy, base, mr, sr, axis=axis)
    assert np.all(np.isfinite(dx))
    assert_allclose(np.ldexp(dx.astype(np.float64), log2_scale), dxr, rtol=tol * 10,
                    atol=tol * 10)
    assert_allclose(dg, dgr, rtol=tol * 10, atol=tol * 10 * x.size)


@pytest.mark.parametrize("log2_sigma,eps", [(-1013, 1e-300), (-1027, 1e-295), (-1062, 5e-324)])
def test_tiny_variance_with_a_larger_eps(log2_sigma, eps):
    """A variance below the smallest normal double takes the scaled recomputation;
    where eps outweighs it, invstd is 1 / sqrt(eps) (the scaled form's eps / s**2
    overflowed there: invstd 0 or y NaN)."""
    x = np.ldexp(np.array([[-3.0], [-1.0], [1.0], [3.0]]), log2_sigma)
    y, m, s = bncy.forward(x, eps=eps)
    var = np.var(x)
    assert np.all(np.isfinite(y)) and s[0] == 1.0 / np.sqrt(var + eps)


def test_documented_limits():
    # float64 channel with a subnormal standard deviation: invstd (~1e310) is no double
    x = np.ldexp(np.array([[1.0], [-1.0], [3.0], [-3.0]]), -1030)
    _, _, s = bncy.forward(x, eps=0.0)
    assert np.isinf(s[0])
    # float32 subnormal input: the gradient (~dy / std ~ 1e42) overflows float32
    x32 = np.ldexp(np.array([[1.0], [-1.0], [3.0], [-3.0]], np.float32), -140)
    y, m, s = bncy.forward(x32, eps=0.0)
    assert np.all(np.isfinite(y)) and np.isfinite(s[0])
    dx, _, _ = bncy.backward(np.ones_like(x32), x32, m, s)
    assert dx.dtype == np.float32


def test_tiny_deviations_with_eps_give_the_eps_dominated_result():
    x = np.ldexp(np.array([[1.0], [-1.0], [3.0], [-3.0]]), -997)
    y, m, s = bncy.forward(x, eps=1e-5)
    assert_allclose(s, 1 / np.sqrt(1e-5), rtol=1e-12)
    assert_allclose(y, (x - x.mean()) / np.sqrt(1e-5), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_channels(dtype):
    x = np.full((6, 2, 3), 7.5, dtype=dtype)
    y, m, s = bncy.forward(x, eps=1e-5)
    assert_array_equal(y, 0.0)
    y0, _, s0 = bncy.forward(x, eps=0.0)     # documented: 0 / 0 is NaN
    assert np.all(np.isinf(s0)) and np.all(np.isnan(y0))


def test_counts_above_2_to_24_keep_float64_precision():
    n = 2**25 + 3
    x = np.ones((n, 2), dtype=np.float32)
    x[::2] = 3.0
    x[:, 1] *= -1
    y, m, s = bncy.forward(x, eps=0.0)
    n3 = (n + 1) // 2                        # rows holding 3
    mean = (3 * n3 + (n - n3)) / n
    var = (n3 * (3 - mean) ** 2 + (n - n3) * (1 - mean) ** 2) / n
    assert_allclose(m, [mean, -mean], rtol=1e-14)
    assert_allclose(1 / s**2, [var, var], rtol=1e-12)


@pytest.mark.slow
def test_more_than_2_to_31_elements_in_place():
    """A float32 array of 2**31 + 2**7 elements normalised in place (8.6 GB)."""
    rows, C = 2**31 // 64 + 2, 64
    try:
        x = np.empty((rows, C), dtype=np.float32)
    except MemoryError:
        pytest.skip("not enough memory")
    rng = np.random.default_rng(0)
    step = 1 << 20
    for r in range(0, rows, step):
        blk = x[r:r + step]
        rng.standard_normal(out=blk, dtype=np.float32)
        blk *= 2.0
        blk += np.arange(C, dtype=np.float32)
    mean64 = np.zeros(C)
    for r in range(0, rows, step):
        mean64 += x[r:r + step].sum(axis=0, dtype=np.float64)
    mean64 /= rows
    y, m, s = bncy.forward(x, out=x)
    assert y is x
    assert_allclose(m, mean64, rtol=1e-9, atol=1e-6)
    assert_allclose(np.sqrt(s**-2 - 1e-5), 2.0, rtol=1e-3)      # the std of the data
    tail = x[-1000:].astype(np.float64)
    assert np.all(np.isfinite(tail)) and abs(tail.mean()) < 0.2
    assert_allclose(x[:step].mean(axis=0, dtype=np.float64), 0.0, atol=0.01)


# ---------------------------------------------------------------------------
# Property tests: special values and the error contract
# ---------------------------------------------------------------------------

SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30]


@given(st.integers(0, 2**32 - 1), st.sampled_from([np.float32, np.float64]),
       st.sampled_from([((30, 4), 1), ((3, 4, 40), 1), ((5, 4, 3), 1), ((6, 7, 4), -1)]),
       st.lists(st.tuples(st.integers(0, 3), st.sampled_from(SPECIAL)), max_size=3))
def test_special_values_stay_in_their_channel(seed, dtype, case, specials):
    shape, axis = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    for c, value in specials:
        idx = [rng.integers(0, n) for n in shape]
        idx[axis] = c
        x[tuple(idx)] = value
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    dirty = set(np.flatnonzero(~np.isfinite(x).all(axis=red)).tolist())
    y, m, s = bncy.forward(x, axis=axis)
    clean = [c for c in range(4) if c not in dirty]
    if clean:
        xr = np.take(x, clean, axis=axis)
        yr, mr, _ = reference.forward(xr, axis=axis)
        tol = 5e-5 if dtype == np.float32 else 1e-9
        assert_allclose(np.take(y, clean, axis=axis), yr, rtol=tol, atol=tol)
        # a channel holding +-1e30 defines its mean only to ~n * eps * 1e30 (any
        # float64 summation absorbs the small values while 1e30 is in the sum)
        size = np.abs(xr.astype(np.float64)).max(axis=red)
        bound = 1e-9 * np.abs(mr) + 1e-9 + 4 * x.size * np.finfo(np.float64).eps * size
        assert np.all(np.abs(m[clean] - mr) <= bound)
    for c in dirty:
        assert not np.isfinite(m[c]) or not np.isfinite(s[c]) or np.isnan(
            np.take(y, c, axis=axis)).any()


BAD_ARGS = {
    "x": [np.ones((3, 4), np.int16), np.ones(5), np.ones((0, 4)), "x"],
    "gamma": [np.ones(5), np.ones((4, 1)), np.ones(4, np.int8)],
    "eps": [-1.0, float("nan"), "a"],
    "axis": [2, -3, 0.5],
    "momentum": [-0.5, 1.01],
    "n_threads": [0, -1, 1.5],
    "out": [np.empty((3, 5)), np.empty((3, 4), np.float16), np.empty((3, 8))[:, ::2],
            np.empty((3, 4), np.float32)],
}


@given(st.sampled_from(sorted(BAD_ARGS)), st.data())
def test_error_contract_exception_type_and_nothing_written(name, data):
    bad = data.draw(st.sampled_from(BAD_ARGS[name]))
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    out = np.full((3, 4), -1.0)
    rm, rv = np.full(4, 0.5), np.full(4, 2.0)
    kw = dict(running_mean=rm, running_var=rv, out=out)
    args = [x]
    if name == "x":
        args = [bad]
        kw.pop("out")
    elif name == "gamma":
        args.append(bad)
    else:
        kw[name] = bad
    with pytest.raises((TypeError, ValueError), match="bncy"):
        bncy.forward(*args, **kw)
    assert_array_equal(out, -1.0)
    assert_array_equal(rm, 0.5)
    assert_array_equal(rv, 2.0)
