"""The public functions of bncy: validation, layouts, allocation, threads.

Everything a caller can get wrong is checked here, before any output or running
statistic is written; ``bncy._kernels`` then runs unchecked loops on C-contiguous
``(N, C, S)`` views (see its Design block).
"""

from __future__ import annotations

import numbers
import operator
import os

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bncy import _kernels as _baseline


def _select_kernels():
    """The AVX2 build of the kernels when the CPU has AVX2, else the baseline one.
    BNCY_ISA=baseline forces the baseline (results are identical either way)."""
    if os.environ.get("BNCY_ISA", "").lower() == "baseline" or not _baseline.cpu_has_avx2():
        return _baseline
    try:
        from bncy import _kernels_avx2
    except ImportError:
        return _baseline
    return _kernels_avx2


_kernels = _select_kernels()

_Floats = NDArray[np.floating]

__all__ = ["forward", "backward", "inference", "openmp_enabled", "isa"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

#: Below this many elements the kernels run on the calling thread: starting an
#: OpenMP team costs more than it saves. Results do not depend on it.
SMALL_WORK = 1 << 15


def openmp_enabled() -> bool:
    """Whether the kernels were compiled with OpenMP (else they run serially)."""
    return _kernels.openmp_enabled()


def isa() -> str:
    """The instruction set of the kernels in use: 'avx2' or 'baseline'."""
    return _kernels.isa()


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------

def _as_float_array(a, name: str) -> np.ndarray:
    arr = a if type(a) is np.ndarray else np.asarray(a)
    if arr.dtype not in _FLOATS:
        raise TypeError(
            f"bncy: {name} has dtype {arr.dtype}; supported dtypes are float32 and float64"
        )
    return arr


def _check_x(x, name: str = "x") -> np.ndarray:
    x = _as_float_array(x, name)
    if x.ndim < 2:
        raise ValueError(
            f"bncy: {name} must have at least 2 dimensions (batch and channel); "
            f"got shape {x.shape}"
        )
    if x.size == 0:
        raise ValueError(f"bncy: {name} is empty (shape {x.shape})")
    return x


def _check_axis(axis, ndim: int) -> int:
    try:
        ax = operator.index(axis)
    except TypeError:
        raise TypeError(f"bncy: axis must be an integer, got {type(axis).__name__}") from None
    if not -ndim <= ax < ndim:
        raise ValueError(f"bncy: axis {axis} is out of range for an array of {ndim} dimensions")
    return ax % ndim


def _check_vector(v, name: str, C: int, *, writeable: bool = False):
    """A per-channel vector of shape (C,): returned as given (for in-place updates)."""
    arr = _as_float_array(v, name)
    if arr.shape != (C,):
        raise ValueError(f"bncy: {name} must have shape ({C},), got {arr.shape}")
    if writeable and not (type(v) is np.ndarray and v.flags.writeable):
        raise ValueError(f"bncy: {name} must be a writeable ndarray (it is updated in place)")
    return arr


def _as_f64(v) -> np.ndarray | None:
    if v is None:
        return None
    return np.ascontiguousarray(v, dtype=np.float64)


def _check_real(value, name: str) -> float:
    if type(value) is float:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"bncy: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_eps(eps) -> float:
    e = _check_real(eps, "eps")
    if not (np.isfinite(e) and e >= 0.0):
        raise ValueError(f"bncy: eps must be finite and >= 0, got {eps!r}")
    return e


def _resolve_threads(n_threads, size: int) -> int:
    if type(n_threads) is int and n_threads >= 1:
        return 1 if size < SMALL_WORK else n_threads
    if n_threads is None:
        nt = _kernels.max_threads()
    else:
        if isinstance(n_threads, (bool, np.bool_)):
            raise TypeError("bncy: n_threads must be an integer or None, got bool")
        try:
            nt = operator.index(n_threads)
        except TypeError:
            raise TypeError(
                f"bncy: n_threads must be an integer or None, got {type(n_threads).__name__}"
            ) from None
        if nt < 1:
            raise ValueError(f"bncy: n_threads must be >= 1, got {nt}")
    return 1 if size < SMALL_WORK else nt


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------

def _layout_perm(a: np.ndarray):
    """Axis order in which ``a`` is C-contiguous: None for plain C order, a tuple for a
    transposed view of a C-contiguous block (an NCHW view of NHWC memory, say), and
    False when no order works."""
    if a.flags.c_contiguous:
        return None
    perm = tuple(sorted(range(a.ndim), key=lambda i: (-abs(a.strides[i]), i)))
    if a.transpose(perm).flags.c_contiguous:
        return perm
    return False


def _in_order(a: np.ndarray, perm) -> np.ndarray:
    """``a`` transposed by perm and made C-contiguous (a copy only when needed)."""
    t = a if perm is None else a.transpose(perm)
    return t if t.flags.c_contiguous else np.ascontiguousarray(t)


def _ncs(a: np.ndarray, axis: int) -> np.ndarray:
    """The (N, C, S) view of a C-contiguous array around its channel axis."""
    shape = a.shape
    n = 1
    for d in shape[:axis]:
        n *= d
    s = 1
    for d in shape[axis + 1:]:
        s *= d
    return a.reshape(n, shape[axis], s)


def _choose_layout(x: np.ndarray, out):
    """The axis order every array of one call is processed in."""
    if out is not None:
        perm = _layout_perm(out)
        if perm is False:
            raise ValueError(
                "bncy: out must be C-contiguous (or laid out exactly like the input)"
            )
        return perm
    perm = _layout_perm(x)
    return None if perm is False else perm


def _check_out(out, like: np.ndarray, name: str = "out") -> None:
    if type(out) is not np.ndarray:
        raise TypeError(f"bncy: {name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"bncy: {name} has shape {out.shape}, expected {like.shape}")
    if out.dtype != like.dtype:
        raise TypeError(f"bncy: {name} has dtype {out.dtype}, expected {like.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"bncy: {name} is read-only")


def _unaliased(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``a`` itself when writing ``out`` element by element cannot clobber a value still
    to be read (no overlap, or the very same elements); else a copy of ``a``."""
    if not np.may_share_memory(a, out):
        return a
    same = (a.__array_interface__["data"][0] == out.__array_interface__["data"][0]
            and a.strides == out.strides)
    return a if same else a.copy()


def _result(t: np.ndarray, perm) -> np.ndarray:
    """Undo the axis order of a processed array."""
    return t if perm is None else t.transpose(np.argsort(perm))


def _alloc_like(t: np.ndarray, out, perm) -> np.ndarray:
    return np.empty_like(t) if out is None else _in_order(out, perm)


def _rescue_extreme_channels(x3, mean, m2, var, invstd, scale, gamma, count, eps):
    """Recompute, scaled by the channel's largest magnitude, the statistics of the
    channels whose float64 squares over- or underflowed (|x - mean| beyond about
    1e154, or below about 1e-154 with eps == 0). Channels holding NaN or inf, and
    constant channels, are left as they are (NaN/inf propagate; see the README)."""
    with np.errstate(all="ignore"):
        for c in range(x3.shape[1]):
            if np.isfinite(mean[c]) and np.isfinite(m2[c]) and not (eps == 0 and m2[c] == 0):
                continue
            v = x3[:, c, :].astype(np.float64)
            if not np.isfinite(v).all():
                continue
            top = np.abs(v).max()
            mu = top * np.mean(v / top) if top > 0 else 0.0
            d = v - mu
            s = np.abs(d).max()
            if s == 0:
                continue                       # constant: 0 with eps > 0, NaN with eps == 0
            q = np.mean((d / s) ** 2)          # in [1/count, 1]
            mean[c] = mu
            var[c] = s * s * q                 # may be inf: the float64 truth
            m2[c] = var[c] * count
            invstd[c] = (1.0 / s) / np.sqrt(q + (eps / s) / s)
            scale[c] = invstd[c] * (1.0 if gamma is None else gamma[c])


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------

def forward(x: ArrayLike, gamma: ArrayLike | None = None, beta: ArrayLike | None = None, *,
            eps: float = 1e-5, axis: int = 1, running_mean: _Floats | None = None,
            running_var: _Floats | None = None, momentum: float = 0.1,
            out: _Floats | None = None, n_threads: int | None = None,
            ) -> tuple[_Floats, NDArray[np.float64], NDArray[np.float64]]:
    """Batch normalization, training mode: normalise with the batch statistics.

    Parameters
    ----------
    x : ndarray of shape (n_0, ..., n_axis = C, ..., n_k), float32 or float64
        The batch. Statistics are taken per channel (along ``axis``) over every
        other axis. Read-only arrays and any memory layout are accepted.
    gamma, beta : ndarray of shape (C,), optional
        Per-channel scale and shift (float32 or float64). None means 1 and 0.
    eps : float, default 1e-5
        Added to the variance before the square root; finite and >= 0.
    axis : int, default 1
        The channel axis; negative values count from the end.
    running_mean, running_var : ndarray of shape (C,), optional
        Running statistics, updated in place (both or neither), PyTorch's way:
        ``r = (1 - momentum) * r + momentum * s`` with the batch mean and the
        unbiased batch variance (``var * n / (n - 1)``).
    momentum : float, default 0.1
        In [0, 1].
    out : ndarray, optional
        Where to write y: x's shape and dtype, C-contiguous or laid out exactly
        like x. May be x itself.
    n_threads : int, optional
        OpenMP threads; None uses OpenMP's default (OMP_NUM_THREADS, threadpoolctl).
        Results are bitwise identical for every value.

    Returns
    -------
    y : ndarray of x's shape and dtype
        ``gamma * (x - mean) * invstd + beta``; ``out`` when given.
    mean : ndarray of shape (C,), float64
        The batch mean.
    invstd : ndarray of shape (C,), float64
        ``1 / sqrt(var + eps)`` with the biased batch variance.

    Raises
    ------
    TypeError
        A dtype other than float32/float64, or an argument of the wrong kind.
    ValueError
        A wrong shape, axis, size or parameter, fewer than 2 values per channel,
        or an unusable ``out``. Nothing is written when an exception is raised.
    """
    x = _check_x(x)
    ax = _check_axis(axis, x.ndim)
    C = x.shape[ax]
    count = x.size // C
    if count < 2:
        raise ValueError(
            f"bncy: expected more than 1 value per channel when training, "
            f"got input of shape {x.shape} (axis={axis})"
        )
    if gamma is not None:
        gamma = _check_vector(gamma, "gamma", C)
    if beta is not None:
        beta = _check_vector(beta, "beta", C)
    e = _check_eps(eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError("bncy: give both running_mean and running_var, or neither")
    if running_mean is not None:
        _check_vector(running_mean, "running_mean", C, writeable=True)
        _check_vector(running_var, "running_var", C, writeable=True)
        m = _check_real(momentum, "momentum")
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"bncy: momentum must be in [0, 1], got {momentum!r}")
    if out is not None:
        _check_out(out, x)
        x = _unaliased(x, out)
    nt = _resolve_threads(n_threads, x.size)

    perm = _choose_layout(x, out)
    xt = _in_order(x, perm)
    yt = _alloc_like(xt, out, perm)
    axt = ax if perm is None else perm.index(ax)
    x3, y3 = _ncs(xt, axt), _ncs(yt, axt)

    mean = np.empty(C)
    m2 = np.empty(C)
    _kernels.moments(x3, mean, m2, nt)
    var = np.empty(C)
    invstd = np.empty(C)
    scale = np.empty(C)
    g64 = _as_f64(gamma)
    if _kernels.train_coefficients(mean, m2, float(count), e, g64, var, invstd, scale):
        _rescue_extreme_channels(x3, mean, m2, var, invstd, scale, g64, count, e)
    shift = np.zeros(C) if beta is None else _as_f64(beta)
    _kernels.affine(x3, mean, scale, shift, y3, nt)

    if running_mean is not None:  # the unbiased batch variance: m2 / (count - 1)
        _kernels.ema_update(running_mean, mean, m, 1.0)
        _kernels.ema_update(running_var, m2, m, 1.0 / (count - 1))
    y = out if out is not None else _result(yt, perm)
    return y, mean, invstd


def inference(x: ArrayLike, running_mean: ArrayLike, running_var: ArrayLike,
              gamma: ArrayLike | None = None, beta: ArrayLike | None = None, *,
              eps: float = 1e-5, axis: int = 1, out: _Floats | None = None,
              n_threads: int | None = None) -> _Floats:
    """Batch normalization, inference mode: normalise with the running statistics.

    Parameters
    ----------
    x : ndarray of shape (n_0, ..., n_axis = C, ..., n_k), float32 or float64
        The input; any layout.
    running_mean, running_var : ndarray of shape (C,)
        The statistics to normalise with (float32 or float64); not modified.
    gamma, beta : ndarray of shape (C,), optional
        Per-channel scale and shift. None means 1 and 0.
    eps : float, default 1e-5
        Finite and >= 0.
    axis : int, default 1
        The channel axis.
    out : ndarray, optional
        As in :func:`forward`; may be x itself.
    n_threads : int, optional
        As in :func:`forward`.

    Returns
    -------
    y : ndarray of x's shape and dtype
        ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta``.

    Raises
    ------
    TypeError, ValueError
        As in :func:`forward`. A single value per channel is fine here.
    """
    x = _check_x(x)
    ax = _check_axis(axis, x.ndim)
    C = x.shape[ax]
    running_mean = _check_vector(running_mean, "running_mean", C)
    running_var = _check_vector(running_var, "running_var", C)
    if gamma is not None:
        gamma = _check_vector(gamma, "gamma", C)
    if beta is not None:
        beta = _check_vector(beta, "beta", C)
    e = _check_eps(eps)
    if out is not None:
        _check_out(out, x)
        x = _unaliased(x, out)
    nt = _resolve_threads(n_threads, x.size)

    perm = _choose_layout(x, out)
    xt = _in_order(x, perm)
    yt = _alloc_like(xt, out, perm)
    axt = ax if perm is None else perm.index(ax)

    scale = np.empty(C)
    _kernels.inference_coefficients(_as_f64(running_var), e, _as_f64(gamma), scale)
    shift = np.zeros(C) if beta is None else _as_f64(beta)
    _kernels.affine(_ncs(xt, axt), _as_f64(running_mean), scale, shift, _ncs(yt, axt), nt)
    return out if out is not None else _result(yt, perm)


def backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
             gamma: ArrayLike | None = None, *, axis: int = 1, out: _Floats | None = None,
             n_threads: int | None = None) -> tuple[_Floats, _Floats, _Floats]:
    """Gradients of training-mode batch normalization (the closed form).

    With ``g = gamma * dy`` and ``xhat = (x - mean) * invstd``, per channel over the
    M = x.size / C values of the channel::

        dx     = invstd / M * (M * g - sum(g) - xhat * sum(g * xhat))
        dgamma = sum(dy * xhat)
        dbeta  = sum(dy)

    Parameters
    ----------
    dy : ndarray of x's shape, x's dtype
        Gradient of the loss with respect to y.
    x : ndarray, float32 or float64
        The input of the forward pass.
    mean, invstd : ndarray of shape (C,), float32 or float64
        As returned by :func:`forward`.
    gamma : ndarray of shape (C,), optional
        The scale used in the forward pass; None means 1.
    axis : int, default 1
        The channel axis.
    out : ndarray, optional
        Where to write dx: x's shape and dtype, C-contiguous or laid out exactly
        like x. May be dy (or x) itself.
    n_threads : int, optional
        As in :func:`forward`; results are bitwise identical for every value.

    Returns
    -------
    dx : ndarray of x's shape and dtype
    dgamma, dbeta : ndarray of shape (C,), x's dtype

    Raises
    ------
    TypeError, ValueError
        As in :func:`forward`; also when dy's shape or dtype differs from x's.
    """
    return _backward(dy, x, mean, invstd, gamma, axis, out, n_threads, batch_stats=True)


def _backward(dy, x, mean, invstd, gamma, axis, out, n_threads, *, batch_stats: bool):
    """backward's body. With batch_stats=False, mean and invstd are constants (the
    running statistics of an eval-mode pass), so dx = gamma * invstd * dy."""
    x = _check_x(x)
    dy = _check_x(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"bncy: dy has shape {dy.shape}, expected x's shape {x.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"bncy: dy has dtype {dy.dtype}, expected x's dtype {x.dtype}")
    ax = _check_axis(axis, x.ndim)
    C = x.shape[ax]
    mean = _check_vector(mean, "mean", C)
    invstd = _check_vector(invstd, "invstd", C)
    if gamma is not None:
        gamma = _check_vector(gamma, "gamma", C)
    if out is not None:
        _check_out(out, x)
        x = _unaliased(x, out)
        dy = _unaliased(dy, out)
    nt = _resolve_threads(n_threads, x.size)

    perm = _choose_layout(x, out)
    xt = _in_order(x, perm)
    dyt = _in_order(dy, perm)
    dxt = _alloc_like(xt, out, perm)
    axt = ax if perm is None else perm.index(ax)
    x3, dy3, dx3 = _ncs(xt, axt), _ncs(dyt, axt), _ncs(dxt, axt)

    mean64 = _as_f64(mean)
    invstd64 = _as_f64(invstd)
    sdy = np.empty(C)
    sdyx = np.empty(C)
    _kernels.grad_sums(dy3, x3, mean64, sdy, sdyx, nt)
    a, b, k, dgamma = np.empty(C), np.empty(C), np.empty(C), np.empty(C)
    _kernels.backward_coefficients(sdy, sdyx, invstd64, _as_f64(gamma),
                                   float(x.size // C), a, b, k, dgamma)
    if not batch_stats:  # statistics independent of x: no terms through mean and var
        b[:] = 0.0
        k[:] = 0.0
    _kernels.grad_input(dy3, x3, mean64, invstd64, a, b, k, dx3, nt)

    dx = out if out is not None else _result(dxt, perm)
    return dx, dgamma.astype(x.dtype, copy=False), sdy.astype(x.dtype, copy=False)
