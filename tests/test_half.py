"""16-bit storage: float16 and bfloat16 x, dy, y and dx, with float64 statistics.

The oracles: the reference (float64 from the same 16-bit values, rounded once),
whose bfloat16 rounding is itself checked against exact rational rounding; the
float32 path on the exactly widened input, whose statistics the 16-bit path must
equal bit for bit (same schedule, same sums); float64 truth for dgamma and dbeta.
"""

from fractions import Fraction

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import bncy
from bncy import reference
from conftest import CASES, case_id, make

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = [F16, BF16]
hid = lambda d: np.dtype(d).name


def f64(a):
    return np.asarray(a).astype(np.float64)


def ulps(a, b):
    """Per element, how many representable 16-bit values apart a and b are
    (0 for two NaNs)."""
    def order(v):
        u = np.asarray(v).view(np.uint16).astype(np.int64)
        return np.where(u & 0x8000, -(u & 0x7FFF), u)
    d = np.abs(order(a) - order(b))
    both_nan = np.isnan(f64(a)) & np.isnan(f64(b))
    return np.where(both_nan, 0, d)


def assert_within_1ulp(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert ulps(got, want).max(initial=0) <= 1


def _inputs(shape, axis, dtype, rng, offset=0.0, scale=1.0):
    x = make(shape, np.float64, rng, scale=scale, offset=offset).astype(dtype)
    dy = make(shape, np.float64, rng).astype(dtype)
    C = shape[axis]
    return x, dy, rng.standard_normal(C), rng.standard_normal(C)


# ---------------------------------------------------------------------------
# the reference's rounding, checked against exact rational arithmetic
# ---------------------------------------------------------------------------

def _exact_bf16(v: float) -> float:
    """v rounded to nearest even bfloat16, with Fractions."""
    if v != v:
        return v
    top = Fraction(2 - Fraction(1, 256)) * Fraction(2) ** 127   # max + half a unit
    a = Fraction(abs(v))
    if a >= top:
        r = float("inf")
    else:
        e = max(a.numerator.bit_length() - a.denominator.bit_length(), -126)
        unit = Fraction(2) ** (e - 7)                             # 8 significant bits
        while unit * 256 <= a:
            unit *= 2
        q, rem = divmod(a, unit)
        q = int(q)
        if rem * 2 > unit or (rem * 2 == unit and q % 2 == 1):
            q += 1
        r = float(q * unit)
    return -r if v < 0 or (v == 0 and np.signbit(v)) else r


def test_reference_rounds_bfloat16_once_as_exact_arithmetic_does():
    rng = np.random.default_rng(0)
    grid = np.arange(0x0001, 0x7F7F, dtype=np.uint16).view(BF16).astype(np.float64)
    mids = (grid[:-1] + grid[1:]) / 2                                 # the ties
    v = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-44, 38, 4000),
                        rng.choice(mids, 2000), rng.choice(mids, 1000) * (1 + 2.0**-30),
                        rng.choice(mids, 1000) * (1 - 2.0**-30),
                        [3.3961e38, 3.4e38, 1e39, -1e39, 0.0, -0.0, 1e-50, np.nan]])
    v = np.concatenate([v, -v])
    got = reference._round(v, BF16)
    want = np.array([_exact_bf16(t) for t in v]).astype(BF16)   # exact: no 2nd rounding
    assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    # ml_dtypes' own cast rounds twice: 1 + 2**-8 + 2**-30 goes to 1, not 1 + 2**-7
    assert f64(reference._round(np.array([1 + 2.0**-8 + 2.0**-30]), BF16))[0] == 1 + 2.0**-7


@pytest.mark.parametrize("dtype", HALF, ids=hid)
def test_every_store_is_rounded_once_to_nearest_even(dtype):
    """inference with var 1 and eps 0 stores x * gamma + beta, the float64 value
    the reference rounds: the same bits, ties, subnormals and overflow included."""
    rng = np.random.default_rng(1)
    C = 64
    x = (rng.standard_normal((4096, C)) * rng.choice([1e-6, 1e-3, 1, 100, 3e4], C))
    with np.errstate(over="ignore"):
        x = x.astype(dtype)
    g = rng.standard_normal(C) * 10.0 ** rng.uniform(-8, 3, C)
    b = rng.standard_normal(C) * 10.0 ** rng.uniform(-8, 2, C)
    for nt in (1, 2):
        y = bncy.inference(x, np.zeros(C), np.ones(C), g, b, eps=0.0, n_threads=nt)
        with np.errstate(over="ignore"):
            want = reference._round(f64(x) * g + b, dtype)
        assert_array_equal(y.view(np.uint16), want.view(np.uint16))


# ---------------------------------------------------------------------------
# accuracy against the reference, on every schedule
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=hid)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_inference_within_one_unit(case, dtype):
    shape, axis = case
    rng = np.random.default_rng(2)
    x, dy, g, b = _inputs(shape, axis, dtype, rng, offset=2.0, scale=3.0)
    C = shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    rm_r, rv_r = rm.copy(), rv.copy()
    y, m, s = bncy.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv)
    y_r, m_r, s_r = reference.forward(x, g, b, axis=axis, running_mean=rm_r, running_var=rv_r)
    assert y.dtype == dtype and m.dtype == s.dtype == np.float64
    assert_within_1ulp(y, y_r)
    assert_allclose(m, m_r, rtol=1e-12, atol=1e-12)
    assert_allclose(s, s_r, rtol=1e-9)
    assert_allclose(rm, rm_r, rtol=1e-6, atol=1e-7)
    assert_allclose(rv, rv_r, rtol=1e-6)
    dx, dg, db = bncy.backward(dy, x, m, s, g, axis=axis)
    dx_r = reference.backward(dy, x, m, s, g, axis=axis)[0]
    assert dx.dtype == dtype and dg.dtype == db.dtype == np.float32
    assert_within_1ulp(dx, dx_r)
    # dgamma, dbeta: float64 truth from the widened values, within 1e-5
    _, dg64, db64 = reference.backward(f64(dy), f64(x), m, s, g, axis=axis)
    assert_allclose(dg, dg64, rtol=1e-5, atol=1e-5 * np.abs(dg64).max())
    assert_allclose(db, db64, rtol=1e-5, atol=1e-5 * np.abs(db64).max())
    yi = bncy.inference(x, rm, rv, g, b, axis=axis)
    assert_within_1ulp(yi, reference.inference(x, rm, rv, g, b, axis=axis))


@pytest.mark.parametrize("dtype,offset", [(F16, 1e3), (BF16, 1e4)], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape,axis", [((4000, 16), 1), ((8, 16, 30, 30), 1),
                                        ((2, 30, 30, 16), -1)])
def test_offset_data_within_one_unit(shape, axis, dtype, offset):
    rng = np.random.default_rng(3)
    x, dy, g, b = _inputs(shape, axis, dtype, rng, offset=offset)
    y, m, s = bncy.forward(x, g, b, axis=axis)
    y_r, m_r, s_r = reference.forward(x, g, b, axis=axis)
    assert_within_1ulp(y, y_r)
    assert_allclose(s, s_r, rtol=1e-9)
    dx, dg, db = bncy.backward(dy, x, m, s, g, axis=axis)
    assert_within_1ulp(dx, reference.backward(dy, x, m, s, g, axis=axis)[0])
    _, dg64, db64 = reference.backward(f64(dy), f64(x), m, s, g, axis=axis)
    assert_allclose(dg, dg64, rtol=1e-5, atol=1e-5 * np.abs(dg64).max())


@pytest.mark.parametrize("dtype", HALF, ids=hid)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_statistics_equal_the_float32_paths_bit_for_bit(case, dtype):
    """16-bit values widen exactly to float32, and both take the same schedule:
    mean, invstd, the running statistics, dgamma and dbeta are the same bits."""
    shape, axis = case
    rng = np.random.default_rng(4)
    x, dy, g, b = _inputs(shape, axis, dtype, rng, offset=5.0, scale=2.0)
    C = shape[axis]
    outs = []
    for a, d in ((x, dy), (x.astype(np.float32), dy.astype(np.float32))):
        rm, rv = np.zeros(C), np.ones(C)
        _, m, s = bncy.forward(a, g, b, axis=axis, running_mean=rm, running_var=rv)
        _, dg, db = bncy.backward(d, a, m, s, g, axis=axis)
        outs.append((m, s, rm, rv, dg, db))
    for u, v in zip(*outs):
        assert_array_equal(u, v)


# ---------------------------------------------------------------------------
# determinism: threads (builds: test_numerics.py; knobs: test_knobs.py)
# ---------------------------------------------------------------------------

DET = [((1000, 37), 1), ((70, 1301), 1), ((300, 7, 5), 1), ((6, 5, 33, 33), 1),
       ((2, 3, 9000), 1), ((10, 20, 20, 3), -1), ((8, 64, 7, 7), 1), ((12801, 500), 1)]


@pytest.mark.parametrize("dtype", HALF, ids=hid)
@pytest.mark.parametrize("shape,axis", DET)
def test_bitwise_identical_for_every_thread_count(shape, axis, dtype, force_threads):
    rng = np.random.default_rng(5)
    x, dy, g, b = _inputs(shape, axis, dtype, rng, offset=100.0, scale=5.0)
    C = shape[axis]
    results = []
    for nt in (1, 2, 3, 4):
        rm, rv = np.zeros(C), np.ones(C)
        y, m, s = bncy.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv,
                               n_threads=nt, activation="relu")
        dx, dg, db = bncy.backward(dy, x, m, s, g, axis=axis, n_threads=nt, beta=b,
                                   activation="relu")
        yi = bncy.inference(x, rm, rv, g, b, axis=axis, n_threads=nt)
        results.append([a.tobytes() for a in (y, m, s, rm, rv, dx, dg, db, yi)])
    assert all(r == results[0] for r in results[1:])


# (every ISA build agrees bitwise on 16-bit data too: tests/test_numerics.py)


# ---------------------------------------------------------------------------
# overflow, layouts, inputs
# ---------------------------------------------------------------------------

def test_float16_overflow_gives_inf_in_that_channel_only():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((500, 4)).astype(F16)
    g = np.array([1.0, 1e5, 1.0, 1.0])                 # |y| up to ~3e5 in channel 1
    y, m, s = bncy.forward(x, g)
    y_r = reference.forward(x, g)[0]
    assert np.isinf(f64(y[:, 1])).any()
    assert np.isfinite(f64(y[:, [0, 2, 3]])).all()
    finite = np.isfinite(f64(y_r))
    assert_array_equal(np.isfinite(f64(y)), finite)
    assert_within_1ulp(y, y_r)


@pytest.mark.parametrize("dtype", HALF, ids=hid)
def test_channels_last_and_fortran_order_as_c_order(dtype):
    rng = np.random.default_rng(8)
    x, dy, g, b = _inputs((4, 6, 5, 7), 1, dtype, rng, offset=1.0)
    want = bncy.forward(x, g, b)
    want_b = bncy.backward(dy, x, want[1], want[2], g)
    for xl, dyl in ((np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
                     np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)),
                    (np.asfortranarray(x), np.asfortranarray(dy))):
        got = bncy.forward(xl, g, b)     # (NHWC memory takes the rows schedule)
        assert_within_1ulp(got[0], want[0])
        assert_allclose(got[1], want[1], rtol=1e-13, atol=1e-15)
        assert_allclose(got[2], want[2], rtol=1e-13)
        got_b = bncy.backward(dyl, xl, got[1], got[2], g)
        assert_within_1ulp(got_b[0], want_b[0])
        assert_allclose(got_b[1], want_b[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF, ids=hid)
def test_bad_half_inputs_raise_before_writing(dtype):
    rng = np.random.default_rng(9)
    x, dy, g, b = _inputs((20, 3), 1, dtype, rng)
    other = BF16 if dtype == F16 else F16
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.full(x.shape, 7, dtype)
    before = (rm.copy(), rv.copy(), out.copy())
    with pytest.raises(TypeError, match="running statistics"):
        bncy.forward(x, running_mean=rm.astype(dtype), running_var=rv.astype(dtype), out=out)
    with pytest.raises(TypeError, match="residual"):
        bncy.forward(x, residual=x.astype(other), running_mean=rm, running_var=rv, out=out)
    with pytest.raises(TypeError, match="out"):
        bncy.forward(x, out=np.empty(x.shape, other), running_mean=rm, running_var=rv)
    with pytest.raises(TypeError, match="dy"):
        bncy.backward(dy.astype(other), x, np.zeros(3), np.ones(3), out=out)
    with pytest.raises(ValueError, match="shape"):
        bncy.forward(x, g[:2], running_mean=rm, running_var=rv, out=out)
    with pytest.raises(TypeError, match="supported dtypes are float32, float64, float16"):
        bncy.forward(x.view(np.int16))
    swapped = x.byteswap().view(x.dtype.newbyteorder())   # same values, other byte order
    with pytest.raises(TypeError, match="supported dtypes"):
        bncy.forward(swapped, running_mean=rm, running_var=rv)
    for a, b_ in zip(before, (rm, rv, out)):
        assert_array_equal(a, b_)


@pytest.mark.parametrize("dtype", HALF, ids=hid)
def test_parameters_in_any_float_dtype(dtype):
    rng = np.random.default_rng(10)
    x, dy, g, b = _inputs((50, 6), 1, dtype, rng)
    want = bncy.forward(x, g.astype(dtype).astype(np.float64), b.astype(dtype).astype(np.float64))
    for pd in (dtype, np.float32, np.float64):
        got = bncy.forward(x, g.astype(dtype).astype(pd), b.astype(dtype).astype(pd))
        assert_array_equal(got[0].view(np.uint16), want[0].view(np.uint16))


# ---------------------------------------------------------------------------
# the rest of the API: fused options, split phases, the layer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=hid)
@pytest.mark.parametrize("shape,axis", [((300, 40), 1), ((4, 6, 9, 9), 1), ((8, 5, 5, 6), -1)])
def test_fused_relu_and_residual(shape, axis, dtype):
    rng = np.random.default_rng(11)
    x, dy, g, b = _inputs(shape, axis, dtype, rng)
    r = make(shape, np.float64, rng).astype(dtype)
    y, m, s = bncy.forward(x, g, b, axis=axis, residual=r, activation="relu")
    assert_within_1ulp(y, reference.forward(x, g, b, axis=axis, residual=r,
                                            activation="relu")[0])
    assert (f64(y) >= 0).all()
    dx, dg, db, dr = bncy.backward(dy, x, m, s, g, axis=axis, beta=b, residual=r,
                                   activation="relu")
    # the mask is where the stored y > 0, bit for bit
    assert_array_equal(f64(dr), np.where(f64(y) > 0, f64(dy), 0.0))
    want = reference.backward(dy, x, m, s, g, axis=axis, beta=b, residual=r,
                              activation="relu")
    assert_within_1ulp(dx, want[0])
    assert_allclose(dg, want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF, ids=hid)
def test_split_phases_equal_the_whole_batch_call(dtype):
    rng = np.random.default_rng(12)
    x, dy, g, b = _inputs((600, 24), 1, dtype, rng, offset=3.0)
    parts = [bncy.batch_stats(x[:250]), bncy.batch_stats(x[250:])]
    st = bncy.merge_stats(parts)
    y0 = bncy.apply_stats(x[:250], st, g, b)[0]
    y, m, s = bncy.forward(x, g, b)
    assert_within_1ulp(y0, y[:250])
    gparts = [bncy.grad_stats(dy[:250], x[:250], m), bncy.grad_stats(dy[250:], x[250:], m)]
    gs = bncy.merge_grad_stats(gparts)
    dx0, dg, db = bncy.apply_grad(dy[:250], x[:250], m, s, gs, 600, g)
    dx, dg_w, db_w = bncy.backward(dy, x, m, s, g)
    assert_within_1ulp(dx0, dx[:250])
    assert dg.dtype == np.float32
    assert_allclose(dg, dg_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF, ids=hid)
def test_layer_trains_on_half_inputs(dtype):
    rng = np.random.default_rng(13)
    x, dy, _, _ = _inputs((64, 8, 4, 4), 1, dtype, rng, offset=1.0)
    layer = bncy.BatchNorm(8)
    y = layer.forward(x)
    assert y.dtype == dtype
    assert_within_1ulp(y, reference.forward(x, layer.gamma, layer.beta)[0])
    dx = layer.backward(dy)
    assert dx.dtype == dtype and layer.dgamma.dtype == np.float32
    layer.eval()
    yi = layer.forward(x)
    assert_within_1ulp(yi, reference.inference(x, layer.running_mean, layer.running_var,
                                               layer.gamma, layer.beta))


def test_describe_names_the_float32_schedules_for_half():
    for shape in [(300, 40), (8, 64, 7, 7), (40, 2, 200), (4, 3, 70, 70)]:
        d16, d32 = (bncy.describe(shape, dt) for dt in (F16, np.float32))
        for job in ("statistics", "grad_sums"):
            assert d16["jobs"][job]["schedule"] == d32["jobs"][job]["schedule"]


# ---------------------------------------------------------------------------
# PyTorch interchange (bfloat16 tensors have no .numpy())
# ---------------------------------------------------------------------------

def test_torch_bfloat16_round_trip_without_copies():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    t = torch.from_numpy(rng.standard_normal((32, 8, 5, 5))).to(torch.bfloat16)
    with pytest.raises(TypeError):
        t.numpy()
    x = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)      # zero-copy
    assert x.ctypes.data == t.data_ptr()
    y, m, s = bncy.forward(x)
    ty = torch.from_numpy(y.view(np.int16)).view(torch.bfloat16)   # and back
    assert ty.data_ptr() == y.ctypes.data
    want = torch.nn.functional.batch_norm(t.double(), None, None, training=True, eps=1e-5)
    assert_within_1ulp(y, reference._round(want.numpy(), BF16))
