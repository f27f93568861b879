"""Fused forward(..., residual=, activation="relu"), inference and backward: equal
to the unfused composition (bncy.reference, and torch autograd where installed),
bitwise identical across thread counts, in every layout and both dtypes."""

import numpy as np
import pytest

import bncy
from bncy import reference as ref

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 2e-4, np.float64: 1e-10}


def _layouts(rng, dtype):
    # (x, axis): C order NCHW, rows (M, D), NHWC with axis=-1, NCHW view of NHWC
    # memory, and a planes case whose runs are longer than a segment
    nhwc = rng.standard_normal((4, 6, 5, 7)).astype(dtype)
    return [
        (rng.standard_normal((4, 7, 6, 5)).astype(dtype), 1),
        (rng.standard_normal((300, 9)).astype(dtype), 1),
        (nhwc, -1),
        (nhwc.transpose(0, 3, 1, 2), 1),
        (rng.standard_normal((2, 3, 70, 70)).astype(dtype), 1),
    ]


def _case(rng, x, axis):
    C = x.shape[axis]
    r = rng.standard_normal(x.shape).astype(x.dtype)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    return r, dy, rng.standard_normal(C), rng.standard_normal(C)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_res", [False, True])
@pytest.mark.parametrize("act", [None, "relu"])
def test_fused_equals_reference_every_layout(dtype, with_res, act):
    rng = np.random.default_rng(1)
    for x, axis in _layouts(rng, dtype):
        r, dy, g, b = _case(rng, x, axis)
        res = r if with_res else None
        kw = dict(axis=axis, residual=res, activation=act)
        y, m, s = bncy.forward(x, g, b, **kw)
        yr, mr, sr = ref.forward(x, g, b, **kw)
        np.testing.assert_allclose(y, yr, rtol=TOL[dtype], atol=TOL[dtype])
        rm, rv = np.full(x.shape[axis], 0.5), np.full(x.shape[axis], 2.0)
        np.testing.assert_allclose(bncy.inference(x, rm, rv, g, b, **kw),
                                   ref.inference(x, rm, rv, g, b, **kw),
                                   rtol=TOL[dtype], atol=TOL[dtype])
        got = bncy.backward(dy, x, m, s, g, beta=b, **kw)
        want = ref.backward(dy, x, m, s, g, beta=b, **kw)
        assert len(got) == len(want) == (4 if with_res else 3)
        for a, w in zip(got, want):
            np.testing.assert_allclose(a, w, rtol=TOL[dtype], atol=TOL[dtype])
        if act == "relu":   # the mask is y > 0 of the y the forward returned
            masked = np.where(y > 0, dy, 0).astype(dtype)
            plain = bncy.backward(masked, x, m, s, g, axis=axis)
            for a, w in zip(got[:3], plain):
                np.testing.assert_allclose(a, w, rtol=TOL[dtype], atol=TOL[dtype])
            if with_res:
                np.testing.assert_array_equal(got[3], masked)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_identical_across_threads(dtype, residual_route):
    rng = np.random.default_rng(2)
    for x, axis in _layouts(rng, dtype) + [(rng.standard_normal((2048, 40)).astype(dtype), 1)]:
        r, dy, g, b = _case(rng, x, axis)
        for res in (None, r):
            kw = dict(axis=axis, residual=res, activation="relu")
            runs = []
            for nt in (1, 2, 3, 4):
                y, m, s = bncy.forward(x, g, b, n_threads=nt, **kw)
                yi = bncy.inference(x, m, 1 / s**2, g, b, eps=0.0, n_threads=nt, **kw)
                runs.append((y, m, s, yi, *bncy.backward(dy, x, m, s, g, beta=b,
                                                         n_threads=nt, **kw)))
            for other in runs[1:]:
                for a, w in zip(runs[0], other):
                    assert a.tobytes() == w.tobytes()


def test_plain_variant_bits_unchanged_by_keywords():
    # activation=None, residual=None through the general path: the same bits
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 33, 5)).astype(np.float32)
    plain = bncy.forward(x)
    y = bncy.forward(x, activation=None, residual=None)
    assert plain[0].tobytes() == y[0].tobytes()
    relu = bncy.forward(x, activation="relu")[0]
    np.testing.assert_array_equal(relu, np.maximum(plain[0], 0))
    res = rng.standard_normal(x.shape).astype(np.float32)
    # one rounding: the residual is added in float64 before it
    yr = bncy.forward(x, residual=res)[0]
    np.testing.assert_allclose(yr, plain[0] + res, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_kink_values_exactly_zero(dtype):
    # Channel 0: x == mean at half the values, so the pre-activation is exactly
    # beta there; beta = 0 puts them on the kink (y == 0, gradient 0). Channel 1:
    # a float64 beta of 1e-300 that rounds to 0 in float32 (y == 0 after
    # rounding: no gradient) but not in float64 (y > 0: gradient passes).
    x = np.zeros((8, 2), dtype)
    x[::2] = [1.0, 1.0]
    x[1::2] = [-1.0, -1.0]
    x[:4] = 0.0   # zeros at the mean (0), +-1 elsewhere, sums stay exact
    x[4:] = [[1, 1], [-1, -1], [1, 1], [-1, -1]]
    beta = np.array([0.0, 1e-300])
    y, m, s = bncy.forward(x, None, beta, activation="relu")
    assert m[0] == 0.0 and (y[:4, 0] == 0).all()
    dy = np.ones_like(x)
    dx, dgamma, dbeta = bncy.backward(dy, x, m, s, None, beta=beta, activation="relu")
    mask = y > 0
    assert dbeta[0] == mask[:, 0].sum() == 2
    assert dbeta[1] == mask[:, 1].sum() == (2 if dtype == np.float32 else 6)
    want = ref.backward(dy, x, m, s, None, beta=beta, activation="relu")
    for a, w in zip((dx, dgamma, dbeta), want):
        np.testing.assert_allclose(a, w, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_channel_and_constant_channel(dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 4, 3)).astype(dtype)
    x[7, 1, 2] = np.nan
    x[:, 2, :] = 3.0   # constant: xhat 0, y = relu(beta + r)
    r = rng.standard_normal(x.shape).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    b = np.array([0.1, 0.2, -0.3, 0.4])
    y, m, s = bncy.forward(x, None, b, residual=r, activation="relu")
    assert np.isnan(y[:, 1]).all() and not np.isnan(y[:, [0, 2, 3]]).any()
    np.testing.assert_allclose(y[:, 2], np.maximum(-0.3 + r[:, 2].astype(np.float64), 0),
                               rtol=TOL[dtype], atol=TOL[dtype])
    dx, dg, db, dr = bncy.backward(dy, x, m, s, None, beta=b, residual=r, activation="relu")
    # NaN in y closes the ReLU (NaN > 0 is false): dr is 0 in that channel
    assert (dr[:, 1] == 0).all() and db[1] == 0
    ok = [0, 2, 3]
    want = ref.backward(dy[:, ok], x[:, ok], m[ok], s[ok], None, beta=b[ok],
                        residual=r[:, ok], activation="relu")
    for a, w in zip((dx[:, ok], dg[ok], db[ok], dr[:, ok]), want):
        np.testing.assert_allclose(a, w, rtol=TOL[dtype], atol=TOL[dtype])


def test_out_aliases_and_residual_out():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 5, 9))
    r = rng.standard_normal(x.shape)
    want = bncy.forward(x, residual=r, activation="relu")[0]
    r2 = r.copy()
    y = bncy.forward(x, residual=r2, activation="relu", out=r2)[0]
    assert y is r2 and np.array_equal(y, want)
    _, m, s = bncy.forward(x)
    dy = rng.standard_normal(x.shape)
    dx, dg, db, dr = bncy.backward(dy, x, m, s, residual=r, activation="relu")
    dy2, ro = dy.copy(), np.empty_like(x)
    got = bncy.backward(dy2, x, m, s, residual=r, activation="relu", out=dy2,
                        residual_out=ro)
    assert got[0] is dy2 and got[3] is ro
    assert np.array_equal(dy2, dx) and np.array_equal(ro, dr)
    # residual_out in another layout than x: written back
    ro_t = np.empty((9, 5, 16)).transpose(2, 1, 0)
    got = bncy.backward(dy, x, m, s, residual=r, activation="relu", residual_out=ro_t)
    assert got[3] is ro_t and np.array_equal(ro_t, dr)
    # without an activation the residual's gradient is dy
    assert np.array_equal(bncy.backward(dy, x, m, s, residual=r)[3], dy)


def test_residual_out_without_activation():
    """Without an activation the residual's gradient is dy, written to
    residual_out after every check and after x is read: residual_out may be x
    itself, may not overlap out, and is untouched when apply_grad raises."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 5, 9))
    r, dy = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    _, m, s = bncy.forward(x)
    want = bncy.backward(dy, x, m, s, residual=r)
    x2 = x.copy()
    got = bncy.backward(dy, x2, m, s, residual=r, residual_out=x2)
    assert got[3] is x2 and np.array_equal(x2, dy)
    for a, w in zip(got[:3], want[:3]):
        assert np.array_equal(a, w)
    stats = bncy.grad_stats(dy, x, m)
    x2 = x.copy()
    got = bncy.apply_grad(dy, x2, m, s, stats, 16 * 9, residual=r, residual_out=x2)
    assert np.array_equal(got[0], want[0]) and np.array_equal(x2, dy)
    o = np.empty_like(x)
    with pytest.raises(ValueError, match="overlap"):
        bncy.backward(dy, x, m, s, residual=r, out=o, residual_out=o)
    ro = np.full_like(x, 7.0)
    for bad in (0, 8.0):
        with pytest.raises((ValueError, TypeError)):
            bncy.apply_grad(dy, x, m, s, stats, bad, residual=r, residual_out=ro)
        assert np.all(ro == 7.0)


def _storage_dtypes():
    out = DTYPES + [np.float16]
    try:
        import ml_dtypes
        out.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    return out


@pytest.fixture(params=["in cache", "beyond L2"])
def residual_route(request):
    """bncy.backward's route for the residual's gradient: beyond L2 (beyond_l2 = 0
    here) it is written in the sums pass and dx read from it; in cache, and in
    the split phases, the dx pass masks again and writes both."""
    previous = bncy.set_knobs(beyond_l2=0) if request.param == "beyond L2" else None
    yield request.param
    if previous is not None:
        bncy.set_knobs(beyond_l2=previous["beyond_l2"])


@pytest.mark.parametrize("dtype", _storage_dtypes())
def test_residual_gradient_routes_agree_bitwise(dtype, residual_route):
    # Same values, bit for bit, in every layout (rows, narrow rows, planes), and
    # with residual_out aliasing dy or the residual, or x (which the sums-pass
    # route still needs after it: it gets a copy).
    assert bncy.describe((300, 9), dtype, activation="relu", residual=True)["jobs"][
        "grad_sums"]["fused"] == ("relu mask" if residual_route == "in cache"
                                  else "relu mask, residual gradient")
    rng = np.random.default_rng(9)
    for x, axis in _layouts(rng, np.float64) + [(rng.standard_normal((37, 5)), 1)]:
        x = (1.5 * x).astype(dtype)
        r, dy, g, b = _case(rng, x, axis)
        r, dy = r.astype(dtype), dy.astype(dtype)
        _, m, s = bncy.forward(x, g, b, axis=axis, residual=r, activation="relu")
        kw = dict(axis=axis, beta=b, residual=r, activation="relu")
        dx, dg, db, dr = bncy.backward(dy, x, m, s, g, **kw)
        assert 0 < np.count_nonzero(dr) < dr.size
        gs = bncy.grad_stats(dy, x, m, invstd=s, gamma=g, **kw)
        split = bncy.apply_grad(dy, x, m, s, gs, x.size // x.shape[axis], g, **kw)
        for a, w in zip(split, (dx, dg, db, dr)):
            np.testing.assert_array_equal(a, w)
        for name in ("dy", "r", "x"):
            d2, r2, x2 = (a.copy(order="K") for a in (dy, r, x))   # same layout
            into = {"dy": d2, "r": r2, "x": x2}[name]
            got = bncy.backward(d2, x2, m, s, g, axis=axis, beta=b, residual=r2,
                                activation="relu", residual_out=into)
            assert got[3] is into
            for a, w in zip(got, (dx, dg, db, dr)):
                np.testing.assert_array_equal(a, w)


def test_split_phase_equals_fused():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 6, 4)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g, b = rng.standard_normal(6), rng.standard_normal(6)
    kw = dict(residual=r, activation="relu")
    y, m, s = bncy.forward(x, g, b, **kw)
    parts = [bncy.batch_stats(x[:15]), bncy.batch_stats(x[15:])]
    total = bncy.merge_stats(parts)
    y1, m1, s1 = bncy.apply_stats(x[:15], total, g, b, residual=r[:15], activation="relu")
    np.testing.assert_allclose(y1, y[:15], rtol=1e-5, atol=1e-5)
    full = bncy.backward(dy, x, m, s, g, beta=b, **kw)
    gs = bncy.merge_grad_stats([
        bncy.grad_stats(dy[:15], x[:15], m, invstd=s, gamma=g, beta=b, residual=r[:15],
                        activation="relu"),
        bncy.grad_stats(dy[15:], x[15:], m, invstd=s, gamma=g, beta=b, residual=r[15:],
                        activation="relu")])
    part = bncy.apply_grad(dy[15:], x[15:], m, s, gs, 160, g, beta=b, residual=r[15:],
                           activation="relu")
    np.testing.assert_allclose(part[0], full[0][15:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(part[1], full[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(part[3], full[3][15:])



def test_torch_autograd_fused():
    torch = pytest.importorskip("torch")
    if not torch.__version__.startswith("2.13.0"):
        pytest.skip(f"pinned to torch 2.13.0, found {torch.__version__}")
    rng = np.random.default_rng(8)
    for dtype in DTYPES:
        x = rng.standard_normal((8, 5, 6, 6)).astype(dtype)
        r = rng.standard_normal(x.shape).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        g, b = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
        tx, tr = torch.tensor(x, requires_grad=True), torch.tensor(r, requires_grad=True)
        tg, tb = torch.tensor(g, requires_grad=True), torch.tensor(b, requires_grad=True)
        ty = torch.relu(torch.nn.functional.batch_norm(tx, None, None, tg, tb, True) + tr)
        ty.backward(torch.tensor(dy))
        y, m, s = bncy.forward(x, g, b, residual=r, activation="relu")
        dx, dg, db, dr = bncy.backward(dy, x, m, s, g, beta=b, residual=r, activation="relu")
        for a, w in ((y, ty), (dx, tx.grad), (dg, tg.grad), (db, tb.grad), (dr, tr.grad)):
            np.testing.assert_allclose(a, w.detach().numpy(), rtol=TOL[dtype] * 10,
                                       atol=TOL[dtype] * 10)


def test_layer_fused_matches_functions_and_eval():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = bncy.BatchNorm(6, activation="relu")
    bn.beta[:] = rng.standard_normal(6)
    y = bn.forward(x, r)
    yf, m, s = bncy.forward(x, bn.gamma, bn.beta, residual=r, activation="relu")
    assert np.array_equal(y, yf)
    dx, dr = bn.backward(dy)
    want = bncy.backward(dy, x, m, s, bn.gamma, beta=bn.beta, residual=r, activation="relu")
    assert np.array_equal(dx, want[0]) and np.array_equal(dr, want[3])
    assert np.array_equal(bn.dbeta, want[2])
    bn.eval()
    ye = bn.forward(x)
    np.testing.assert_array_equal(ye, bncy.inference(x, bn.running_mean, bn.running_var,
                                                     bn.gamma, bn.beta, activation="relu"))
    dxe = bn.backward(dy)
    scale = bn.gamma / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    np.testing.assert_allclose(dxe, np.where(ye > 0, dy, 0) * scale, rtol=1e-5, atol=1e-6)


def test_residual_block_trains():
    """h = relu(bn2(relu(bn1(x W1)) W2) + x): a small residual block learns a
    regression target; the residual's gradient flows back into x's branch."""
    rng = np.random.default_rng(10)
    D, n = 16, 256
    X = rng.standard_normal((n, D))
    T = np.maximum(np.tanh(X @ rng.standard_normal((D, D)) / 4) + X, 0)
    W1 = rng.standard_normal((D, D)) * 0.3
    W2 = rng.standard_normal((D, D)) * 0.3
    bn1 = bncy.BatchNorm(D, activation="relu", dtype=np.float64)
    bn2 = bncy.BatchNorm(D, activation="relu", dtype=np.float64)
    losses = []
    for _ in range(150):
        a1 = X @ W1
        h1 = bn1.forward(a1)
        a2 = h1 @ W2
        h2 = bn2.forward(a2, X)
        diff = h2 - T
        losses.append(float(np.mean(diff**2)))
        d_a2, d_x_skip = bn2.backward(2 * diff / diff.size)
        assert d_x_skip.shape == X.shape
        gW2 = h1.T @ d_a2
        d_a1 = bn1.backward(d_a2 @ W2.T)
        gW1 = X.T @ d_a1
        for p, gp in ((W1, gW1), (W2, gW2)):
            p -= 0.5 * gp
        for bn in (bn1, bn2):
            bn.gamma -= 0.5 * bn.dgamma
            bn.beta -= 0.5 * bn.dbeta
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_equals_layer_then_inference(dtype, with_bias):
    rng = np.random.default_rng(11)
    C = 5
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    bias = rng.standard_normal(C).astype(dtype) if with_bias else None
    # linear (out, in): y = x W^T + bias
    W = rng.standard_normal((C, 7)).astype(dtype)
    x = rng.standard_normal((9, 7)).astype(dtype)
    Wf, bf = bncy.fold(W, bias, rm, rv, g, b, eps=1e-5, axis=0)
    assert Wf.dtype == bf.dtype == dtype and Wf is not W
    a = (x.astype(np.float64) @ W.T.astype(np.float64)
         + (0 if bias is None else bias.astype(np.float64))).astype(dtype)
    want = bncy.inference(a, rm, rv, g, b, eps=1e-5)
    got = x.astype(np.float64) @ Wf.T.astype(np.float64) + bf
    np.testing.assert_allclose(got, want, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    # 1x1 convolution (out, in, 1, 1) on NCHW: the same map per pixel
    Wc = W.reshape(C, 7, 1, 1)
    xc = rng.standard_normal((2, 7, 3, 3)).astype(dtype)
    ac = np.einsum("oi,nihw->nohw", W.astype(np.float64), xc.astype(np.float64))
    if bias is not None:
        ac += bias.astype(np.float64)[:, None, None]
    want = bncy.inference(ac.astype(dtype), rm, rv, g, b, eps=1e-5)
    Wcf, bcf = bncy.fold(Wc, bias, rm, rv, g, b, eps=1e-5, axis=0)
    got = np.einsum("oi,nihw->nohw", Wcf[:, :, 0, 0].astype(np.float64),
                    xc.astype(np.float64)) + bcf[:, None, None]
    np.testing.assert_allclose(got, want, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


def test_fold_rounds_bfloat16_once():
    """bfloat16 weights are rounded once from float64 (ml_dtypes' cast goes
    through float32): 1 + 2**-8 + 2**-30 rounds up, not to 1."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = np.dtype(ml_dtypes.bfloat16)
    v = 1 + 2.0**-8 + 2.0**-30
    W = np.ones((2, 3), bf)
    wf, bf_ = bncy.fold(W, np.zeros(2, bf), np.zeros(2), np.ones(2), np.full(2, v), None,
                        eps=0.0)
    assert wf.dtype == bf and np.all(wf.astype(np.float64) == 1 + 2.0**-7)
    assert np.all(bf_.astype(np.float64) == 0.0)


def test_fold_warns_on_overflow():
    W = np.full((2, 3), 3e38, np.float32)
    with pytest.warns(RuntimeWarning, match="overflow"):
        bncy.fold(W, None, np.zeros(2), np.full(2, 1e-6), np.full(2, 10.0), None, eps=0.0)
