"""The numerical guarantees: bitwise reproducibility across thread counts, float64
statistics on float32 data, float64 statistics of data far from zero, channel
isolation of NaN and inf."""

import contextlib
import math
from fractions import Fraction

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import bncy
from bncy import _api, reference
from conftest import DTYPES, HALF, make

# Shapes chosen to cross block boundaries in each schedule with several threads.
DET_CASES = [
    ((1000, 37), 1),         # rows, many row blocks
    ((70, 600), 1),          # rows, several column tiles (elementwise too, from 2 threads)
    ((70, 1301), 1),         # wide rows: chunked normalize pass on 1 thread, plain
                             # column tiles from 2
    ((300, 7, 5), 1),        # rows with S=5
    ((6, 5, 33, 33), 1),     # planes
    ((2, 3, 9000), 1),       # planes, several segments per run
    ((5, 9, 9, 16), -1),     # channels-last
    ((10, 20, 20, 3), -1),   # narrow rows (K=3): statistics and elementwise passes take
                             # rows 85 at a time, 5 rows left over
    ((2000, 3, 4), 1),       # narrow rows with S=4 (K=12)
    ((8, 64, 7, 7), 1),      # runs of 49: rows statistics, planes elementwise passes
    ((2305, 129), 1),        # float32 beyond L2: prefetching backward sums, odd last block
    ((12801, 500), 1),       # beyond 24 MiB: prefetching moments and grad_input, likewise
    ((4097, 1030), 1),       # beyond 16 MiB, past grad_input's prefetching window
    ((3, 5, 20011), 1),      # planes beyond L2: float32 grad_input prefetches on 1 thread
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", DET_CASES)
def test_bitwise_identical_for_every_thread_count(shape, axis, dtype, rng, force_threads):
    x = make(shape, dtype, rng, scale=5.0, offset=100.0)
    dy = make(shape, dtype, rng)
    C = shape[axis]
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    results = []
    for nt in (1, 2, 3, 4):
        rm, rv = np.zeros(C), np.ones(C)
        y, m, s = bncy.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv,
                               n_threads=nt)
        dx, dg, db = bncy.backward(dy, x, m, s, g, axis=axis, n_threads=nt)
        yi = bncy.inference(x, rm, rv, g, b, axis=axis, n_threads=nt)
        results.append((y, m, s, rm, rv, dx, dg, db, yi))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert_array_equal(a, b_)


def test_float32_offset_data_within_1e5_of_float64_truth(rng):
    # x = 1e4 + N(0, 1) in float32: catastrophic for E[x^2] - E[x]^2 and float32 sums
    x = (1e4 + rng.standard_normal((65536, 16))).astype(np.float32)
    y, mean, invstd = bncy.forward(x)
    truth_y, truth_m, truth_s = reference.forward(x.astype(np.float64))
    assert np.max(np.abs(y - truth_y)) < 1e-5
    assert_allclose(mean, truth_m, rtol=1e-14)
    assert_allclose(invstd, truth_s, rtol=1e-10)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, _, _ = bncy.backward(dy, x, mean, invstd)
    truth_dx = reference.backward(dy.astype(np.float64), x.astype(np.float64),
                                  truth_m, truth_s)[0]
    assert np.max(np.abs(dx - truth_dx)) < 1e-5


@pytest.mark.parametrize("layout", ["rows", "planes", "narrow", "7x7"])
def test_float32_offset_data_nchw_and_rows(layout, rng):
    shape, axis = {"planes": ((64, 4, 32, 32), 1), "rows": ((4096, 4, 3), 1),
                   "narrow": ((64, 32, 32, 3), -1), "7x7": ((512, 4, 7, 7), 1)}[layout]
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    y, mean, invstd = bncy.forward(x, axis=axis)
    truth, truth_m, truth_s = reference.forward(x.astype(np.float64), axis=axis)
    assert np.max(np.abs(y - truth)) < 1e-5
    assert_allclose(invstd, truth_s, rtol=1e-10)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dg, db = bncy.backward(dy, x, mean, invstd, axis=axis)
    tdx, tdg, tdb = reference.backward(dy.astype(np.float64), x.astype(np.float64),
                                       truth_m, truth_s, axis=axis)
    assert np.max(np.abs(dx - tdx)) < 1e-5
    assert_allclose(dg, tdg, rtol=1e-6, atol=1e-6)   # float32 outputs, rounded once
    assert_allclose(db, tdb, rtol=1e-6, atol=1e-6)


# (shape, axis, layout, schedule of the statistics, variant): every statistics path
# of float64 data (the layout "nhwc-view" is an NCHW view of NHWC memory).
OFFSET_CASES = [
    ((4096, 64), 1, "c", "rows", "plain"),          # 16 row blocks merged
    ((12801, 64), 1, "c", "rows", "prefetch"),      # _rows_moments_ahead (knob lowered)
    ((1024, 8, 5), 1, "c", "rows", "plain"),        # S = 5 columns merged per channel
    ((64, 8, 7, 7), 1, "c", "rows", "plain"),       # runs of 49 on rows
    ((4100, 4), 1, "c", "rows narrow", None),       # R rows at a time, 4 left over
    ((16, 32, 32, 8), -1, "c", "rows narrow", None),  # channels-last
    ((16, 8, 32, 32), 1, "c", "planes", None),      # one segment a plane
    ((4, 3, 90, 100), 1, "c", "planes", None),      # 3 segments a plane
    ((16, 8, 32, 32), 1, "nhwc-view", "rows narrow", None),
    ((8, 32, 8, 8), 1, "nhwc-view", "rows", "plain"),
    ((300, 4), 1, "c", "rows narrow", None),        # small calls (the fast path)
    ((16, 4), 1, "c", "rows", "plain"),
]
OFFSETS = [(1e8, 1.0), (1e12, 1.0), (1e15, 0.5)]    # (offset, sigma): at 1e15 the
                                                    # values are multiples of 1/8


def _offset_data(shape, layout, offset, sigma, rng):
    x = offset + sigma * rng.standard_normal(shape)
    if layout == "nhwc-view":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return x


def _exact_moments(v):
    """(mean, variance) of the float64 values v to within a few ulps: two passes
    with exactly rounded sums (math.fsum), the deviations from the first pass's
    mean exact for data far from zero, the second pass's mean correcting it."""
    n = v.size
    m0 = math.fsum(v) / n
    d = v - m0
    s1 = math.fsum(d)
    return m0 + s1 / n, (math.fsum(d * d) - s1 * (s1 / n)) / n


@contextlib.contextmanager
def _moments_variant(variant):
    """variant "prefetch": the rows moments through their prefetching twin for any
    array size."""
    previous = bncy.set_knobs(mom_min_bytes=0) if variant == "prefetch" else {}
    try:
        yield
    finally:
        bncy.set_knobs(**previous)


def test_exact_moments_helper_agrees_with_fractions(rng):
    v = 1e15 + 0.5 * rng.standard_normal(500)
    q = [Fraction(a) for a in v]
    mean = sum(q) / len(q)
    var = sum((a - mean) ** 2 for a in q) / len(q)
    m, s = _exact_moments(v)
    assert m == float(mean)
    assert abs(s - float(var)) <= 1e-15 * float(var)


@pytest.mark.parametrize("offset,sigma", OFFSETS)
@pytest.mark.parametrize("shape,axis,layout,schedule,variant", OFFSET_CASES)
def test_float64_statistics_of_offset_data(shape, axis, layout, schedule, variant, offset,
                                           sigma, rng):
    """Every partial mean is relative to the channel's first value, so the statistics
    of 1e15 + 0.5 * N(0, 1) are as accurate as those of N(0, 1) (rounding the
    partial means themselves gave errors relative to the offset: 1e-9 at 1e8, 1%
    at 1e15)."""
    x = _offset_data(shape, layout, offset, sigma, rng)
    ax = axis % len(shape)
    C = shape[ax]
    truth = [_exact_moments(np.take(x, c, axis=ax).ravel()) for c in range(C)]
    tm = np.array([t[0] for t in truth])
    tv = np.array([t[1] for t in truth])
    with _moments_variant(variant):
        jobs = bncy.describe(shape if layout == "c" else x.transpose(0, 2, 3, 1).shape,
                             np.float64, axis=ax if layout == "c" else -1)["jobs"]
        assert jobs["statistics"]["schedule"] == schedule
        if variant is not None:
            assert jobs["statistics"]["variant"] == variant
        _, mean, invstd = bncy.forward(x, axis=axis, eps=0.0)
        st = bncy.batch_stats(x, axis=axis)
    for m, v in ((mean, 1.0 / invstd**2), (st.mean, st.m2 / st.count)):
        assert np.all(np.abs(m - tm) <= np.spacing(tm))
        assert_allclose(v, tv, rtol=1e-13, atol=0)


@pytest.mark.parametrize("offset,sigma", OFFSETS)
def test_merged_statistics_of_offset_data(offset, sigma, rng):
    """merge_stats takes each part's mean relative to the first part's, with the
    part's mean_lo: as accurate as one batch_stats of the whole."""
    x = offset + sigma * rng.standard_normal((3000, 16))
    truth = [_exact_moments(x[:, c]) for c in range(16)]
    tm = np.array([t[0] for t in truth])
    tv = np.array([t[1] for t in truth])
    cuts = [0, 700, 701, 701, 2000, 3000]     # unequal parts, one empty
    st = bncy.merge_stats([bncy.batch_stats(x[a:b]) for a, b in zip(cuts, cuts[1:])])
    assert st.count == 3000
    assert np.all(np.abs(st.mean - tm) <= np.spacing(tm))
    assert_allclose(st.m2 / st.count, tv, rtol=1e-13, atol=0)
    for c in range(16):     # mean + mean_lo: the exact mean to within the data's spread
        exact = sum(map(Fraction, x[:, c])) / 3000
        assert abs(Fraction(st.mean[c]) + Fraction(st.mean_lo[c]) - exact) < 1e-13 * sigma
    # parts without mean_lo (3 fields) still merge, as before
    old = bncy.merge_stats([bncy.BatchStats(*bncy.batch_stats(x[a:b])[:3])
                            for a, b in zip(cuts, cuts[1:])])
    assert np.all(np.abs(old.mean - tm) <= 4 * np.spacing(tm))


@pytest.mark.parametrize("shape,axis,layout,schedule,variant", OFFSET_CASES)
def test_offset_statistics_bitwise_identical_for_every_thread_count(
        shape, axis, layout, schedule, variant, rng, force_threads):
    x = _offset_data(shape, layout, 1e12, 1.0, rng)
    with _moments_variant(variant):
        results = [bncy.forward(x, axis=axis, n_threads=nt) for nt in (1, 2, 3, 4)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_channels_give_zero(dtype):
    x = np.full((50, 3), 1e7, dtype=dtype)      # PyTorch #5410 gave +-1 here
    x[:, 1] = -3.0
    y, m, s = bncy.forward(x)
    assert_array_equal(y, 0.0)
    assert_allclose(m, [1e7, -3.0, 1e7])


@pytest.mark.parametrize("shape,axis", [((40, 4), 1), ((3, 4, 50), 1), ((3, 4, 5), 1)])
def test_nan_and_inf_stay_in_their_channel(shape, axis, rng):
    x = make(shape, np.float64, rng)
    x[(0,) * len(shape[:axis]) + (1,)] = np.nan
    x[(1,) * len(shape[:axis]) + (2,)] = np.inf
    dy = make(shape, np.float64, rng)
    y, m, s = bncy.forward(x, axis=axis)
    dx, dg, db = bncy.backward(dy, x, m, s, axis=axis)
    clean = [0, 3]
    take = lambda a: np.take(a, clean, axis=axis)  # noqa: E731
    xr = take(x)
    yr, mr, sr = reference.forward(xr, axis=axis)
    assert_allclose(take(y), yr, rtol=1e-12, atol=1e-12)
    assert_allclose(m[clean], mr, rtol=1e-12)
    assert_allclose(take(dx), reference.backward(take(dy), xr, mr, sr, axis=axis)[0],
                    rtol=1e-10, atol=1e-12)
    assert np.isnan(m[1]) and np.all(np.isnan(np.take(y, 1, axis=axis)))
    assert not np.isfinite(m[2])


def _builds():
    """Every build of the kernels this CPU runs: baseline, AVX2, AVX-512."""
    from bncy import _kernels as base

    mods = [base]
    if base.cpu_has_avx2():
        mods.append(pytest.importorskip("bncy._kernels_avx2"))
    if base.cpu_has_avx512():
        mods.append(pytest.importorskip("bncy._kernels_avx512"))
    if len(mods) == 1:
        pytest.skip("this CPU runs only the baseline build")
    return mods



@pytest.mark.parametrize("n", [8, 21, 64, 133])
@pytest.mark.parametrize("planes", [False, True])
def test_every_build_stores_the_same_nan_bits(n, planes):
    """A 16-bit NaN keeps its sign, quiet bit and the top of its payload on every
    build, as F16C and NumPy's casts keep them. The NaNs sit both in the groups of
    8 and in the one-by-one remainders of the 16-bit stores."""
    mods = _builds()
    for dtype in HALF:
        f16 = dtype == np.float16
        pay = ([0x7C01, 0x7D55, 0xFE33, 0x7FFF, 0xFC00, 0x7C00] if f16 else
               [0x7F81, 0x7FD5, 0xFFB3, 0x7FFF, 0xFF80, 0x7F80])
        bits = np.full((2, 3, n) if planes else (n, 3, 1), 0x3C00 if f16 else 0x3F80, np.uint16)
        col = bits[:, 1, :].reshape(-1)
        col[::3] = np.resize(pay, col[::3].size)
        bits[:, 1, :] = col.reshape(bits[:, 1, :].shape)
        xb = bits if f16 else bits.view(np.int16)
        zero, one = np.zeros(3), np.ones(3)
        out = {}
        for mod in mods:
            y, dx = np.empty_like(xb), np.empty_like(xb)
            mod.affine(xb, zero, one, zero, y, 2)
            mod.grad_input(xb, xb, zero, one, one, zero, zero, dx, 2)
            out[mod.isa()] = (y, dx)
        for isa, res in out.items():
            for a, b_ in zip(out["baseline"], res):
                assert_array_equal(a.view(np.uint16), b_.view(np.uint16), err_msg=isa)
        # y = x: the stores give back every NaN and inf as it was, quietened
        quiet = 0x0200 if f16 else 0x0040
        want = np.where((bits & 0x7FFF) > (0x7C00 if f16 else 0x7F80), bits | quiet, bits)
        assert_array_equal(out["baseline"][0].view(np.uint16), want)


@pytest.mark.parametrize("shape", [(300, 37, 1), (20, 7, 5), (3, 4, 5000), (70, 1301, 1),
                                   (64, 256, 1), (5, 3, 37), (2000, 3, 1), (700, 3, 4),
                                   (2305, 129, 1), (12801, 500, 1),
                                   (4097, 1030, 1)])
def test_every_build_agrees_bitwise(shape, rng):
    """The builds of the kernels run the same operations in the same order, with
    different vector widths (and different loop remainders)."""
    mods = _builds()
    for dtype in DTYPES + HALF:     # 16-bit: as their bits (bncy._api._bits)
        x = make(shape, np.float64, rng, scale=3.0, offset=50.0).astype(dtype)
        dy = make(shape, np.float64, rng).astype(dtype)
        xb, dyb = _api._bits(x), _api._bits(dy)
        C = shape[1]
        g, b = rng.standard_normal(C), rng.standard_normal(C)
        out = {}
        for mod in mods:
            m, m2 = np.empty(C), np.empty(C)
            mod.moments(xb, m, m2, 2)
            y = np.empty_like(xb)
            mod.affine(xb, m, 1 / np.sqrt(m2 + 1.0), np.ones(C), y, 2)
            s1, s2 = np.empty(C), np.empty(C)
            mod.grad_sums(dyb, xb, m, s1, s2, 2)
            dx = np.empty_like(xb)
            mod.grad_input(dyb, xb, m, 1 / np.sqrt(m2 + 1.0), s1, s2, np.ones(C), dx, 2)
            out[mod.isa()] = (m, m2, y, s1, s2, dx)
            if dtype in DTYPES:      # the fast paths take float32 and float64 only
                rm, rv = np.zeros(C), np.ones(C)
                fast = mod.forward_fast(x, g, b, 1e-5, 1, rm, rv, 0.1, None, 1, 0, 1 << 62)
                back = mod.backward_fast(dy, x, fast[1], fast[2], g, 1, None, 1, 0, 1 << 62)
                out[mod.isa()] += (*fast, rm, rv, *back)
        first = out["baseline"]
        for isa, res in out.items():
            for a, b_ in zip(first, res):
                assert_array_equal(a, b_, err_msg=isa)
