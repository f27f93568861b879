"""Pure-NumPy batch normalization: the oracle of the tests and the speed baseline.

Same signatures as :func:`bncy.forward`, :func:`bncy.backward` and
:func:`bncy.inference`; everything is computed in float64 and rounded once to x's
dtype at the end (float16 and bfloat16 too; dgamma and dbeta are float32 for
those). Written to be read beside ``docs/derivation.md``: each line is one
equation there. ``out`` is honoured; ``n_threads`` is accepted and ignored.
It validates only what it needs to compute; the error contract is bncy's.

The fused options (``residual``, ``activation="relu"``) are the unfused
composition: the normalised value, plus the residual, through ``np.maximum``,
rounded once; the backward masks dy where the rounded y is > 0 (PyTorch's
definition of ReLU's gradient) and runs the plain backward on the masked dy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["forward", "backward", "backward_staged", "inference"]


def _axes(x: np.ndarray, axis: int):
    ax = axis % x.ndim
    reduce = tuple(i for i in range(x.ndim) if i != ax)
    bshape = [1] * x.ndim
    bshape[ax] = x.shape[ax]
    return reduce, tuple(bshape), x.size // x.shape[ax]


def _per_channel(v, bshape, default):
    if v is None:
        return np.full(bshape, default, dtype=np.float64)
    return np.asarray(v, dtype=np.float64).reshape(bshape)


def _activate(y, x, axis, residual, activation):
    """y (float64) plus the residual, through the activation."""
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y


def _round(value, dtype) -> np.ndarray:
    """float64 values rounded once, to nearest even, to dtype. NumPy's float16
    cast does that; ml_dtypes' bfloat16 cast goes through float32 (two roundings),
    so bfloat16 takes the nearest of that result and its two neighbours."""
    dtype = np.dtype(dtype)
    if dtype.name != "bfloat16":
        with np.errstate(over="ignore"):        # overflow to inf is the rounding
            return np.asarray(value).astype(dtype)
    v = np.asarray(value, dtype=np.float64)
    a = np.abs(v)
    with np.errstate(invalid="ignore", over="ignore"):
        m = a.astype(dtype).view(np.uint16).astype(np.int32)       # magnitude bits
        best, err = m, np.abs(a - m.astype(np.uint16).view(dtype).astype(np.float64))
        for n in (m - 1, m + 1):
            n = np.clip(n, 0, 0x7F80)
            e = np.abs(a - n.astype(np.uint16).view(dtype).astype(np.float64))
            take = (e < err) | ((e == err) & (n % 2 == 0) & (best % 2 == 1))
            best, err = np.where(take, n, best), np.where(take, e, err)
        # at or beyond max + half a unit, (2 - 2**-8) * 2**127: inf
        best = np.where(a >= (2 - 2.0**-8) * 2.0**127, 0x7F80, best)
        bits = (best | np.where(np.signbit(v), 0x8000, 0)).astype(np.uint16)
        out = bits.view(dtype)
        return np.where(np.isnan(v), v.astype(dtype), out)


def _grad_dtype(dtype) -> np.dtype:
    """dgamma's and dbeta's dtype: x's, float32 for 16-bit x."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def _emit(value: np.ndarray, dtype, out):
    if out is None:
        return _round(value, dtype)
    out[...] = _round(value, out.dtype)
    return out


def forward(x, gamma=None, beta=None, *, eps=1e-5, axis=1, running_mean=None,
            running_var=None, momentum=0.1, out=None, n_threads=None, residual=None,
            activation=None):
    """Training-mode forward pass; returns (y, mean, invstd) like :func:`bncy.forward`."""
    x = np.asarray(x)
    reduce, bshape, M = _axes(x, axis)
    X = x.astype(np.float64)
    mu = X.mean(axis=reduce)                                   # (1) mean
    xc = X - mu.reshape(bshape)
    var = (xc * xc).mean(axis=reduce)                          # (2) biased variance, two-pass
    invstd = 1.0 / np.sqrt(var + eps)                          # (3)
    xhat = xc * invstd.reshape(bshape)                         # (4) x-hat
    y = _per_channel(gamma, bshape, 1.0) * xhat + _per_channel(beta, bshape, 0.0)  # (5)
    y = _activate(y, x, axis, residual, activation)
    if running_mean is not None:
        running_mean[...] = (1 - momentum) * running_mean + momentum * mu
        running_var[...] = (1 - momentum) * running_var + momentum * var * M / (M - 1)
    return _emit(y, x.dtype, out), mu, invstd


def inference(x, running_mean, running_var, gamma=None, beta=None, *, eps=1e-5, axis=1,
              out=None, n_threads=None, residual=None, activation=None):
    """Inference-mode pass with the running statistics, like :func:`bncy.inference`."""
    x = np.asarray(x)
    _, bshape, _ = _axes(x, axis)
    X = x.astype(np.float64)
    rm = _per_channel(running_mean, bshape, 0.0)
    rv = _per_channel(running_var, bshape, 1.0)
    xhat = (X - rm) / np.sqrt(rv + eps)
    y = _per_channel(gamma, bshape, 1.0) * xhat + _per_channel(beta, bshape, 0.0)
    return _emit(_activate(y, x, axis, residual, activation), x.dtype, out)


def backward(dy, x, mean, invstd, gamma=None, *, axis=1, out=None, n_threads=None,
             beta=None, residual=None, activation=None, residual_out=None):
    """Closed-form backward pass; returns (dx, dgamma, dbeta) like :func:`bncy.backward`,
    and the residual's gradient fourth when a residual is given.

    With g = gamma * dy: dx = invstd / M * (M g - sum(g) - xhat * sum(g xhat)).
    With activation="relu", dy is first replaced by dy where y > 0, else 0, with y
    the forward's rounded output (recomputed here from x, mean, invstd, gamma, beta
    and the residual); the residual's gradient is that masked dy.
    """
    x = np.asarray(x)
    if activation == "relu" or residual is not None:
        reduce, bshape, _ = _axes(x, axis)
        if activation == "relu":
            xhat = ((x.astype(np.float64) - np.asarray(mean, np.float64).reshape(bshape))
                    * np.asarray(invstd, np.float64).reshape(bshape))
            y = _per_channel(gamma, bshape, 1.0) * xhat + _per_channel(beta, bshape, 0.0)
            y = _round(_activate(y, x, axis, residual, activation), x.dtype)
            dy = np.where(y > 0, dy, 0).astype(x.dtype)
        res = backward(dy, x, mean, invstd, gamma, axis=axis, out=out)
        if residual is None:
            return res
        return (*res, _emit(np.asarray(dy, np.float64), x.dtype, residual_out))
    reduce, bshape, M = _axes(x, axis)
    X = x.astype(np.float64)
    DY = np.asarray(dy, dtype=np.float64)
    s = np.asarray(invstd, dtype=np.float64).reshape(bshape)
    xhat = (X - np.asarray(mean, dtype=np.float64).reshape(bshape)) * s
    dbeta = DY.sum(axis=reduce)                                # (6)
    dgamma = (DY * xhat).sum(axis=reduce)                      # (7)
    g = _per_channel(gamma, bshape, 1.0) * DY                  # (8) dl/dxhat
    sum_g = g.sum(axis=reduce).reshape(bshape)
    sum_gx = (g * xhat).sum(axis=reduce).reshape(bshape)
    dx = s / M * (M * g - sum_g - xhat * sum_gx)               # (12) the closed form
    gt = _grad_dtype(x.dtype)
    return _emit(dx, x.dtype, out), dgamma.astype(gt), dbeta.astype(gt)


def backward_staged(dy, x, mean, invstd, gamma=None, *, axis=1, out=None, n_threads=None):
    """The chain rule step by step, as in Ioffe & Szegedy (2015), Algorithm 1's backward.

    Goes through dl/dxhat, dl/dvar and dl/dmu explicitly (equations (8)-(11) of
    docs/derivation.md); same results as :func:`backward` up to rounding.
    """
    x = np.asarray(x)
    reduce, bshape, M = _axes(x, axis)
    X = x.astype(np.float64)
    DY = np.asarray(dy, dtype=np.float64)
    mu = np.asarray(mean, dtype=np.float64).reshape(bshape)
    s = np.asarray(invstd, dtype=np.float64).reshape(bshape)
    var_eps = 1.0 / (s * s)                                    # sigma^2 + eps
    xc = X - mu
    xhat = xc * s
    dxhat = _per_channel(gamma, bshape, 1.0) * DY              # (8)
    dvar = (dxhat * xc).sum(axis=reduce).reshape(bshape) * -0.5 * var_eps ** -1.5  # (9)
    dmu = ((-dxhat * s).sum(axis=reduce).reshape(bshape)
           + dvar * (-2.0 * xc).sum(axis=reduce).reshape(bshape) / M)             # (10)
    dx = dxhat * s + dvar * 2.0 * xc / M + dmu / M             # (11)
    dgamma = (DY * xhat).sum(axis=reduce)
    dbeta = DY.sum(axis=reduce)
    gt = _grad_dtype(x.dtype)
    return _emit(dx, x.dtype, out), dgamma.astype(gt), dbeta.astype(gt)
