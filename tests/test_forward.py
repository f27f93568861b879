"""bncy.forward (training mode) against the float64 reference."""

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
    x = make(shape, dtype, rng, scale=3.0, offset=-2.0)
    g, b = per_channel(rng, C) if affine else (None, None)
    y, mean, invstd = bncy.forward(x, g, b, axis=axis, n_threads=n_threads)
    yr, mr, sr = reference.forward(x, g, b, axis=axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.dtype == np.float64 and mean.shape == (C,)
    assert invstd.dtype == np.float64 and invstd.shape == (C,)
    assert_allclose(mean, mr, rtol=1e-12, atol=1e-12)
    assert_allclose(invstd, sr, rtol=1e-12)
    rtol, atol = tol(dtype)
    assert_allclose(y, yr, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_is_normalised(dtype, rng):
    x = make((500, 6), dtype, rng, scale=7.0, offset=3.0)
    y, _, _ = bncy.forward(x, eps=0.0)
    y64 = y.astype(np.float64)
    assert_allclose(y64.mean(axis=0), 0.0, atol=1e-6)
    assert_allclose(y64.var(axis=0), 1.0, rtol=1e-5)


def test_eps_is_added_to_the_variance(rng):
    x = make((50, 3), np.float64, rng)
    _, _, s0 = bncy.forward(x, eps=0.0)
    _, _, s1 = bncy.forward(x, eps=0.5)
    assert_allclose(1 / s1**2, 1 / s0**2 + 0.5, rtol=1e-13)


@pytest.mark.parametrize("rdtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_running_stats_update(momentum, rdtype, rng):
    x = make((2, 3, 4, 5), np.float32, rng, scale=2.0, offset=1.0)
    rm = rng.standard_normal(3).astype(rdtype)
    rv = rng.random(3).astype(rdtype) + 0.5
    rm_ref, rv_ref = rm.copy(), rv.copy()
    bncy.forward(x, running_mean=rm, running_var=rv, momentum=momentum)
    reference.forward(x, running_mean=rm_ref, running_var=rv_ref, momentum=momentum)
    x64 = x.astype(np.float64)
    unbiased = x64.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=1)
    assert rm.dtype == rdtype and rv.dtype == rdtype
    assert_allclose(rm, rm_ref, rtol=1e-6)
    assert_allclose(rv, rv_ref, rtol=1e-6)
    if momentum == 1.0:
        assert_allclose(rv, unbiased, rtol=1e-6)
        assert_allclose(rm, x64.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_inputs(dtype, rng):
    x = make((40, 5), dtype, rng)
    g, b = per_channel(rng, 5)
    for a in (x, g, b):
        a.setflags(write=False)
    y, _, _ = bncy.forward(x, g, b)
    assert_allclose(y, reference.forward(x, g, b)[0], *tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_and_in_place(dtype, rng):
    x = make((3, 4, 6, 6), dtype, rng, scale=2.0)
    expected = reference.forward(x)[0]
    out = np.full_like(x, np.nan)
    y, _, _ = bncy.forward(x, out=out)
    assert y is out
    assert_allclose(out, expected, *tol(dtype))
    x2 = x.copy()
    y2, _, _ = bncy.forward(x2, out=x2)
    assert y2 is x2
    assert_array_equal(x2, out)


def test_out_overlapping_the_input_is_safe(rng):
    buf = make((41, 8), np.float64, rng)
    x = buf[:40]
    expected = reference.forward(x.copy())[0]
    out = buf[1:]  # shifted by one row: writing it clobbers rows of x still to be read
    bncy.forward(x, out=out)
    assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_layouts(dtype, rng):
    base = make((6, 10, 8, 9), dtype, rng, scale=2.0, offset=1.0)
    views = [
        (base[:, :, ::2, :], 1),                   # strided
        (np.asfortranarray(base), 1),              # Fortran order
        (base.transpose(0, 3, 1, 2), 1),           # NCHW view of NHWC-ordered memory
        (base.transpose(2, 0, 1, 3), 2),
        (base[::-1, :, :, ::-1], 1),               # negative strides
    ]
    for v, axis in views:
        y, m, s = bncy.forward(v, axis=axis)
        yr, mr, sr = reference.forward(v, axis=axis)
        assert y.shape == v.shape
        assert_allclose(y, yr, *tol(dtype))
        assert_allclose(m, mr, rtol=1e-12, atol=1e-12)


def test_channels_last_view_keeps_its_layout(rng):
    nhwc = make((4, 5, 6, 8), np.float32, rng)
    nchw = nhwc.transpose(0, 3, 1, 2)           # torch's channels_last NCHW tensor
    y, _, _ = bncy.forward(nchw, axis=1)
    assert y.strides == np.empty_like(nchw).strides   # no transposing copy of the result
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    out = np.empty_like(nchw)
    bncy.forward(nchw, axis=1, out=out)
    assert_array_equal(out, y)
    y_direct, _, _ = bncy.forward(nhwc, axis=-1)
    assert_array_equal(y_direct.transpose(0, 3, 1, 2), y)


def test_array_likes(rng):
    x = make((10, 3), np.float64, rng)
    y, _, _ = bncy.forward(x.tolist(), list(np.ones(3)), [0.0, 0.0, 0.0])
    assert_allclose(y, bncy.forward(x)[0], rtol=1e-15)
