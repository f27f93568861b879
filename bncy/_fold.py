"""bncy.fold: fold an eval-mode batch norm into the preceding layer's weight and bias."""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bncy import _api
from bncy.reference import _round

__all__ = ["fold"]


def fold(weight: ArrayLike, bias: ArrayLike | None, running_mean: ArrayLike,
         running_var: ArrayLike, gamma: ArrayLike | None = None,
         beta: ArrayLike | None = None, *, eps: float = 1e-5,
         axis: int = 0) -> tuple[NDArray, NDArray]:
    """Weight and bias of a linear or convolution layer followed by an eval-mode
    batch norm, as one layer: ``inference(layer(x)) == folded_layer(x)``.

    Parameters
    ----------
    weight : ndarray, float32, float64, float16 or bfloat16
        A linear layer's (out, in) or a convolution's (out, in, kh, kw) weight.
    bias : ndarray of shape (out,), optional
        None: the layer had none; the folded layer gets a new one.
    running_mean, running_var, gamma, beta : ndarray of shape (out,)
        The batch norm's statistics and parameters (gamma, beta None: 1, 0).
    eps : float
    axis : int, default 0
        weight's output-channel axis.

    Returns
    -------
    weight, bias : new arrays of weight's dtype
        ``weight * s`` along axis and ``(bias - running_mean) * s + beta`` with
        ``s = gamma / sqrt(running_var + eps)``, computed in float64 and rounded
        once. A RuntimeWarning names the values that overflow weight's dtype.
    """
    w = _api._as_float_array(weight, "weight")
    ax = _api._check_axis(axis, w.ndim)
    C = w.shape[ax]
    rm = _api._as_f64(_api._check_vector(running_mean, "running_mean", C))
    rv = _api._as_f64(_api._check_vector(running_var, "running_var", C))
    g = np.ones(C) if gamma is None else _api._as_f64(_api._check_vector(gamma, "gamma", C))
    b = np.zeros(C) if beta is None else _api._as_f64(_api._check_vector(beta, "beta", C))
    b0 = np.zeros(C) if bias is None else _api._as_f64(_api._check_vector(bias, "bias", C))
    e = _api._check_eps(eps)
    shape = [1] * w.ndim
    shape[ax] = C
    s = g / np.sqrt(rv + e)
    w64 = w.astype(np.float64) * s.reshape(shape)
    b64 = (b0 - rm) * s + b
    wf, bf = _round(w64, w.dtype), _round(b64, w.dtype)   # once (bfloat16 too)
    for name, v64, v in (("weight", w64, wf), ("bias", b64, bf)):
        over = np.isfinite(v64) & ~np.isfinite(v)
        if over.any():
            warnings.warn(f"bncy.fold: {int(over.sum())} folded {name} value(s) overflow "
                          f"{w.dtype}", RuntimeWarning, stacklevel=2)
    return wf, bf
