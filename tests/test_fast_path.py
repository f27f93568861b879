"""The fast paths of bncy.forward, inference and backward (plain calls checked in C): they
must take every plain call, decline everything else before writing anything, and
return the bits of the general path."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import bncy
from bncy import _api
from conftest import CASES, DTYPES, HALF, case_id, make

FAST = _api._kernels_wide
NO_LIMIT = 1 << 62


class _NoFastPath:
    """The kernels with every fast path declining: bncy._api's general path."""

    def __getattr__(self, name):
        if name.endswith("_fast"):
            return lambda *a: None
        return getattr(FAST, name)


@pytest.fixture
def general(monkeypatch):
    monkeypatch.setattr(_api, "_kernels_wide", _NoFastPath())


def _fwd_args(x, axis, rng, gdtype=np.float64):
    C = x.shape[axis]
    g = rng.standard_normal(C).astype(gdtype)
    b = rng.standard_normal(C).astype(gdtype)
    return C, g, b


@pytest.mark.parametrize("gdtype", DTYPES + HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dtype", DTYPES + HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fast_path_matches_the_general_path_bitwise(case, dtype, gdtype, rng, general):
    """Every storage type, and every type of gamma, beta, mean and invstd; running
    statistics are float32 or float64 (float32 beside 16-bit parameters)."""
    shape, axis = case
    x = make(shape, dtype, rng, scale=3.0, offset=20.0)
    dy = make(shape, dtype, rng)
    C, g, b = _fwd_args(x, axis, rng, gdtype)
    sdt = gdtype if np.dtype(gdtype).itemsize > 2 else np.float32
    rm_f, rv_f = np.linspace(0, 1, C).astype(sdt), np.linspace(1, 2, C).astype(sdt)
    rm_g, rv_g = rm_f.copy(), rv_f.copy()
    fast = FAST.forward_fast(x, g, b, 1e-3, axis, rm_f, rv_f, 0.25, None, 1, 0, NO_LIMIT)
    assert fast is not None
    y = bncy.forward(x, g, b, eps=1e-3, axis=axis, running_mean=rm_g, running_var=rv_g,
                     momentum=0.25, n_threads=1)
    for a, b_ in zip(fast, y):
        assert a.dtype == b_.dtype and a.shape == b_.shape
        assert_array_equal(a, b_)
    assert_array_equal(rm_f, rm_g)
    assert_array_equal(rv_f, rv_g)
    yi = FAST.inference_fast(x, rm_f, rv_f, g, b, 1e-3, axis, None, 1, 0, NO_LIMIT)
    assert yi is not None and yi.dtype == x.dtype
    assert_array_equal(yi, bncy.inference(x, rm_g, rv_g, g, b, eps=1e-3, axis=axis,
                                          n_threads=1))
    m, s = y[1].astype(gdtype), y[2].astype(gdtype)
    back = FAST.backward_fast(dy, x, m, s, g, axis, None, 1, 0, NO_LIMIT)
    assert back is not None
    ref = bncy.backward(dy, x, m, s, g, axis=axis, n_threads=1)
    for a, b_ in zip(back, ref):
        assert a.dtype == b_.dtype and a.shape == b_.shape
        assert_array_equal(a, b_)


@pytest.mark.parametrize("dtype", DTYPES + HALF, ids=lambda d: np.dtype(d).name)
def test_public_calls_take_the_fast_path_and_agree(dtype, rng, monkeypatch):
    x = make((64, 256), dtype, rng)
    dy = make((64, 256), dtype, rng)
    C, g, b = _fwd_args(x, 1, rng, dtype if np.dtype(dtype).itemsize > 2 else np.float32)
    taken = []
    real_f, real_b, real_i = FAST.forward_fast, FAST.backward_fast, FAST.inference_fast

    class Spy:
        def __getattr__(self, name):
            return getattr(FAST, name)

        def forward_fast(self, *a):
            r = real_f(*a)
            taken.append(r is not None)
            return r

        def backward_fast(self, *a):
            r = real_b(*a)
            taken.append(r is not None)
            return r

        def inference_fast(self, *a):
            r = real_i(*a)
            taken.append(r is not None)
            return r

    monkeypatch.setattr(_api, "_kernels_wide", Spy())
    y, m, s = bncy.forward(x, g, b)
    dx, dg, db = bncy.backward(dy, x, m, s, g)
    yi = bncy.inference(x, m, 1 / s**2, g, b, eps=0.0)
    # out= arrays, x itself, dy itself
    yo = np.empty_like(x)
    assert bncy.forward(x, g, b, out=yo)[0] is yo
    dxo = np.empty_like(x)
    assert bncy.backward(dy, x, m, s, g, out=dxo)[0] is dxo
    yio = np.empty_like(x)
    assert bncy.inference(x, m, 1 / s**2, g, b, eps=0.0, out=yio) is yio
    x_in, dy_in = x.copy(), dy.copy()
    assert bncy.forward(x_in, g, b, out=x_in)[0] is x_in
    assert bncy.backward(dy_in, x, m, s, g, out=dy_in)[0] is dy_in
    assert taken == [True] * 8
    monkeypatch.setattr(_api, "_kernels_wide", _NoFastPath())
    y2, m2, s2 = bncy.forward(x, g, b)
    assert_array_equal(y, y2)
    assert_array_equal(m, m2)
    assert_array_equal(s, s2)
    for got, want in zip((dx, dg, db), bncy.backward(dy, x, m, s, g)):
        assert_array_equal(got, want)
    assert_array_equal(yi, bncy.inference(x, m, 1 / s**2, g, b, eps=0.0))
    for got in (yo, x_in):
        assert_array_equal(got, y)
    for got in (dxo, dy_in):
        assert_array_equal(got, dx)
    assert_array_equal(yio, yi)


def _declines(rng):
    """(name, forward_fast args, backward_fast args) of calls the fast path must not
    take, each next to a plain one."""
    x = make((8, 4), np.float32, rng)
    dy = make((8, 4), np.float32, rng)
    g, b = np.ones(4), np.zeros(4)
    rm, rv = np.zeros(4), np.ones(4)
    m, s = np.zeros(4), np.ones(4)
    F = dict(x=x, gamma=g, beta=b, eps=1e-5, axis=1, running_mean=rm, running_var=rv,
             momentum=0.1, out=None, n_threads=1)
    B = dict(dy=dy, x=x, mean=m, invstd=s, gamma=g, axis=1, out=None, n_threads=1)
    Inf = dict(x=x, running_mean=rm, running_var=rv, gamma=g, beta=b, eps=1e-5, axis=1,
               out=None, n_threads=1)
    big = np.zeros(40, np.float32)
    shifted = big[1:33].reshape(8, 4)     # overlaps x = big[:32] by all but one value
    ro_out = np.zeros((8, 4), np.float32)
    ro_out.flags.writeable = False
    ro = np.zeros(4)
    ro.flags.writeable = False
    cases = [
        ("x transposed", dict(x=np.ascontiguousarray(x.T).T), dict(x=np.asfortranarray(x))),
        ("x a list", dict(x=x.tolist()), dict(x=x.tolist())),
        ("x a subclass", dict(x=x.view(np.matrix)), dict(dy=dy.view(np.matrix))),
        ("running stats float16", dict(x=x.astype(np.float16), running_mean=rm.astype(np.float16),
                                       running_var=rv.astype(np.float16)),
         dict(x=x.astype(np.float16))),   # backward: dy float32 beside x float16
        ("x int", dict(x=x.astype(np.int32)), dict(dy=dy.astype(np.int32))),
        ("x big-endian", dict(x=x.astype(">f4")), dict(x=x.astype(">f4"))),
        ("x 1-D", dict(x=x.ravel()), dict(x=x.ravel(), dy=dy.ravel())),
        ("x empty", dict(x=x[:0]), dict(x=x[:0], dy=dy[:0])),
        ("one value per channel", dict(x=x[:1]), None),
        ("dy dtype", None, dict(dy=dy.astype(np.float64))),
        ("dy shape", None, dict(dy=make((4, 8), np.float32, rng))),
        ("axis out of range", dict(axis=2), dict(axis=-3)),
        ("axis float", dict(axis=1.0), dict(axis=1.0)),
        ("axis bool", dict(axis=True), dict(axis=True)),
        ("gamma shape", dict(gamma=np.ones(5)), dict(gamma=np.ones((4, 1)))),
        ("gamma a list", dict(gamma=[1.0] * 4), dict(gamma=[1.0] * 4)),
        ("beta int", dict(beta=np.zeros(4, int)), dict(mean=np.zeros(4, int))),
        ("invstd strided", None, dict(invstd=np.ones(8)[::2])),
        ("eps int", dict(eps=0), None),
        ("eps numpy", dict(eps=np.float64(1e-5)), None),
        ("eps negative", dict(eps=-1.0), None),
        ("eps nan", dict(eps=float("nan")), None),
        ("running_var missing", dict(running_var=None), None),
        ("running_mean read-only", dict(running_mean=ro), None),
        ("running_var strided", dict(running_var=np.ones(8)[::2]), None),
        ("momentum int", dict(momentum=1), None),
        ("momentum > 1", dict(momentum=1.5), None),
        ("n_threads 0", dict(n_threads=0), dict(n_threads=0)),
        ("n_threads bool", dict(n_threads=True), dict(n_threads=True)),
        ("n_threads float", dict(n_threads=2.0), dict(n_threads=2.0)),
        ("n_threads huge", dict(n_threads=1 << 40), dict(n_threads=1 << 40)),
        ("out float64", dict(out=np.zeros((8, 4))), dict(out=np.zeros((8, 4)))),
        ("out shape", dict(out=np.zeros((4, 8), np.float32)),
         dict(out=np.zeros((8, 4, 1), np.float32))),
        ("out read-only", dict(out=ro_out), dict(out=ro_out)),
        ("out strided", dict(out=np.zeros((8, 8), np.float32)[:, ::2]),
         dict(out=np.zeros((8, 8), np.float32)[:, ::2])),
        ("out a list", dict(out=[0.0] * 32), dict(out=[0.0] * 32)),
        ("out overlapping x", dict(x=big[:32].reshape(8, 4), out=shifted),
         dict(x=big[:32].reshape(8, 4), out=shifted)),
        ("out overlapping dy", None, dict(dy=big[:32].reshape(8, 4), out=shifted)),
    ]
    return F, B, Inf, cases


# what inference takes from a forward case: the keys it shares, running stats may be
# read-only and one value per channel is fine
_INF_SKIP = {"running_var missing", "running_mean read-only", "one value per channel",
             "momentum int", "momentum > 1", "running stats float16"}


def test_fast_paths_decline_anything_but_plain_calls_and_write_nothing(rng):
    F, B, Inf, cases = _declines(rng)
    assert FAST.forward_fast(*F.values(), 0, NO_LIMIT) is not None
    assert FAST.backward_fast(*B.values(), 0, NO_LIMIT) is not None
    assert FAST.inference_fast(*Inf.values(), 0, NO_LIMIT) is not None
    for name, f, b in cases:
        i = None
        if f is not None and name not in _INF_SKIP:
            i = {k: v for k, v in f.items() if k in Inf}
        for base, change, fn in ((F, f, FAST.forward_fast), (B, b, FAST.backward_fast),
                                 (Inf, i, FAST.inference_fast)):
            if change is None:
                continue
            args = {**base, **change}
            rm0 = None if args.get("running_mean") is None else args["running_mean"].copy()
            assert fn(*args.values(), 0, NO_LIMIT) is None, (name, fn.__name__)
            if rm0 is not None:
                assert_array_equal(args["running_mean"], rm0)


def test_fast_path_leaves_extreme_channels_to_the_general_path(rng):
    x = make((16, 3), np.float64, rng)
    x[:, 1] *= 1e200                       # squares overflow: the scaled recomputation
    x[3, 2] = np.inf
    rm, rv = np.zeros(3), np.ones(3)
    assert FAST.forward_fast(x, None, None, 1e-5, 1, rm, rv, 0.1, None, 1, 0, NO_LIMIT) is None
    assert_array_equal(rm, 0.0)
    assert_array_equal(rv, 1.0)
    y, m, s = bncy.forward(x, running_mean=rm, running_var=rv)
    assert np.isfinite(y[:, :2]).all() and np.isfinite(m[:2]).all()
    assert np.isnan(y[:, 2]).all() or not np.isfinite(m[2])


def test_large_float64_stays_off_the_wide_build(rng):
    x = make((8, 4), np.float64, rng)
    f = (None, None, 1e-5, 1, None, None, 0.1, None, 1, 0)
    assert FAST.forward_fast(x, *f, 8 * 32) is not None
    assert FAST.forward_fast(x, *f, 8 * 31) is None
    assert FAST.backward_fast(x, x, np.zeros(4), np.ones(4), None, 1, None, 1, 0,
                              8 * 31) is None
    assert FAST.inference_fast(x, np.zeros(4), np.ones(4), None, None, 1e-5, 1, None, 1, 0,
                               8 * 31) is None
    assert FAST.forward_fast(x.astype(np.float32), *f, 0) is not None


@pytest.mark.parametrize("with_res", [False, True], ids=["relu", "residual+relu"])
@pytest.mark.parametrize("dtype", DTYPES + HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_fast_path_matches_the_general_path_bitwise(case, dtype, with_res, rng,
                                                          monkeypatch):
    """The fused calls (activation="relu", a residual) take the fast path too, with
    the general path's bits, y over the residual included."""
    shape, axis = case
    x = make(shape, dtype, rng, scale=3.0, offset=2.0)
    dy = make(shape, dtype, rng)
    r = make(shape, dtype, rng) if with_res else None
    C, g, b = _fwd_args(x, axis, rng)
    rm, rv = np.zeros(C), np.ones(C)
    kw = dict(residual=r, activation="relu")
    fast_y = FAST.forward_fast(x, g, b, 1e-3, axis, None, None, 0.1, None, 1, 0, NO_LIMIT,
                               r, "relu")
    fast_i = FAST.inference_fast(x, rm, rv, g, b, 1e-3, axis, None, 1, 0, NO_LIMIT, r,
                                 "relu")
    assert fast_y is not None and fast_i is not None
    m, s = fast_y[1], fast_y[2]
    fast_b = FAST.backward_fast(dy, x, m, s, g, axis, None, 1, 0, NO_LIMIT, b, r, "relu",
                                None)
    assert fast_b is not None and len(fast_b) == (4 if with_res else 3)
    monkeypatch.setattr(_api, "_kernels_wide", _NoFastPath())
    y = bncy.forward(x, g, b, eps=1e-3, axis=axis, n_threads=1, **kw)
    yi = bncy.inference(x, rm, rv, g, b, eps=1e-3, axis=axis, n_threads=1, **kw)
    back = bncy.backward(dy, x, m, s, g, axis=axis, n_threads=1, beta=b, **kw)
    for a, b_ in zip((*fast_y, fast_i, *fast_b), (*y, yi, *back)):
        assert a.dtype == b_.dtype and a.shape == b_.shape
        assert_array_equal(a, b_)
    if with_res:   # out may be the residual itself
        over = r.copy()
        assert FAST.forward_fast(x, g, b, 1e-3, axis, None, None, 0.1, over, 1, 0, NO_LIMIT,
                                 over, "relu")[0] is over
        assert_array_equal(over, y[0])


def test_fused_fast_paths_decline_what_they_do_not_run(rng):
    x = make((8, 4, 3), np.float32, rng)
    r = make((8, 4, 3), np.float32, rng)
    m, s = np.zeros(4), np.ones(4)
    f = lambda res, act, out=None: FAST.forward_fast(x, None, None, 1e-5, 1, None, None, 0.1,
                                                     out, 1, 0, NO_LIMIT, res, act)
    bk = lambda res, act, rout=None: FAST.backward_fast(x, x, m, s, None, 1, None, 1, 0,
                                                        NO_LIMIT, None, res, act, rout)
    assert f(r, "relu") is not None and bk(r, "relu") is not None
    for act in ("gelu", "RELU", 1, True):
        assert f(None, act) is None and bk(None, act) is None
    for res in (r.astype(np.float64), r.astype(np.float16), r[:, :, :2],
                r.transpose(0, 2, 1).copy().transpose(0, 2, 1), list(r)):
        assert f(res, "relu") is None and bk(res, "relu") is None
    buf = np.empty(x.size + 1, np.float32)
    assert f(r, None, out=buf[:-1].reshape(x.shape)) is not None
    # out partly over the residual: the general path copies the residual first
    assert f(buf[1:].reshape(x.shape), "relu", out=buf[:-1].reshape(x.shape)) is None
    assert bk(r, None) is None                      # the residual's gradient is dy
    assert bk(r, "relu", np.empty_like(x)) is None  # residual_out: the general path


def test_fast_paths_know_bfloat16_by_name_not_other_user_types(rng):
    """User types other than bfloat16 (ml_dtypes' float8 and int4 types, say) are
    left to the general path, which rejects them, also after bfloat16 has been
    seen."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = make((8, 4), np.float32, rng)
    args = (None, None, 1e-5, 1, None, None, 0.1, None, 1, 0, NO_LIMIT)
    for first in (False, True):
        if first:
            assert FAST.forward_fast(x.astype(ml_dtypes.bfloat16), *args) is not None
        for other in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.int4):
            xo = x.astype(other)
            assert FAST.forward_fast(xo, *args) is None
            assert FAST.inference_fast(xo, np.zeros(4), np.ones(4), None, None, 1e-5, 1,
                                       None, 1, 0, NO_LIMIT) is None
            with pytest.raises(TypeError):
                bncy.forward(xo)
