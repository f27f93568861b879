"""The public functions of bncy: validation, layouts, allocation, threads.

Everything a caller can get wrong is checked here, before any output or running
statistic is written; ``bncy._kernels`` then runs unchecked loops on C-contiguous
``(N, C, S)`` views (see its Design block).
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bncy import _buffers, _knobs
from bncy import _kernels as _baseline


def _select_kernels():
    """(kernels, wide): the build of the kernels for float64 arrays beyond L2, and
    the one for float32 data and arrays that fit in L2 (see _build_for).

    kernels is the AVX2 build when the CPU has AVX2, else the baseline; wide is the
    AVX-512 build when the CPU has AVX-512 (F, CD, BW, DQ, VL), else kernels.
    BNCY_ISA=baseline or BNCY_ISA=avx2 caps both (results are identical whatever
    runs)."""
    cap = os.environ.get("BNCY_ISA", "").lower()
    if cap == "baseline" or not _baseline.cpu_has_avx2():
        return _baseline, _baseline
    try:
        from bncy import _kernels_avx2 as kernels
    except ImportError:
        return _baseline, _baseline
    if cap == "avx2" or not _baseline.cpu_has_avx512():
        return kernels, kernels
    try:
        from bncy import _kernels_avx512 as wide
    except ImportError:
        return kernels, kernels
    return kernels, wide


_kernels, _kernels_wide = _select_kernels()

_BUILDS = tuple({id(m): m for m in (_baseline, _kernels, _kernels_wide)}.values())
_CACHES = _knobs.caches()
#: The speed knobs in force (see bncy._knobs and bncy/kernels/knobs.pxi).
_KNOBS: dict = {}
_KNOB_NAMES = frozenset(_baseline.KNOB_NAMES) | {"small_work", "wide_f64_bytes"}
# Mirrors of three knobs, read on every call.
SMALL_WORK = WIDE_F64_BYTES = _FAST_F64_BYTES = 0


def _build_for(dtype: np.dtype, nbytes: int):
    """The build of the kernels one call runs on. 512-bit vectors convert and
    accumulate twice the values per instruction (float32 passes and small calls
    ran faster with them), but float64 passes that stream from memory ran slower
    than with AVX2, so float64 arrays beyond wide_f64_bytes stay on the AVX2
    build. Every build computes the same bits."""
    if dtype.itemsize <= 4 or nbytes <= WIDE_F64_BYTES:
        return _kernels_wide
    return _kernels


def set_knobs(**values: int) -> dict:
    """Set speed knobs (see :func:`knobs`); returns the previous values of all.

    No knob changes a result, only which loop computes it; tests use this to
    drive every path on small arrays. Unknown names raise TypeError, values
    that are not integers >= 0 TypeError or ValueError, before anything is set.
    """
    for name, v in values.items():
        if name not in _KNOB_NAMES:
            raise TypeError(f"bncy: unknown knob {name!r}; knobs are {sorted(_KNOB_NAMES)}")
        # the narrow-row widths must hold a row of up to FLAT_MAX_K - 1 columns
        values[name] = _check_int(v, name, "an integer", 16 if name.startswith("flat") else 0)
    global SMALL_WORK, WIDE_F64_BYTES, _FAST_F64_BYTES
    previous = dict(_KNOBS)
    _KNOBS.update(values)
    kernel = {k: v for k, v in _KNOBS.items() if k in _baseline.KNOB_NAMES}
    for build in _BUILDS:
        build.set_knobs(kernel)
    SMALL_WORK = _KNOBS["small_work"]
    WIDE_F64_BYTES = _KNOBS["wide_f64_bytes"]
    # the largest float64 array the wide build's fast paths take
    _FAST_F64_BYTES = WIDE_F64_BYTES if _kernels_wide is not _kernels else 1 << 62
    return previous


def knobs() -> dict:
    """The speed knobs in force, and the cache sizes they were derived from
    (``caches``: bytes, and where they were read)."""
    return {**_KNOBS, "caches": dict(_CACHES)}


_Floats = NDArray[np.floating]

__all__ = [
    "forward", "backward", "inference", "openmp_enabled", "isa",
    "BatchStats", "GradStats", "batch_stats", "merge_stats", "apply_stats",
    "grad_stats", "merge_grad_stats", "apply_grad", "set_buffer_cache", "buffer_cache_info",
    "describe", "knobs", "set_knobs",
]

_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)
_FLOATS = (_F32, np.dtype(np.float64))
_DTYPES = "float32, float64, float16 and bfloat16"


def _supported(dt: np.dtype) -> bool:
    """float32, float64, float16, or bfloat16 (ml_dtypes' dtype, known by its name
    so that ml_dtypes is never imported here), in native byte order."""
    return dt in _FLOATS or dt == _F16 or (dt.name == "bfloat16" and dt.itemsize == 2
                                           and dt.isnative)


def _bits(a):
    """An array as the kernels take it: float16 as its bits in uint16, bfloat16 in
    int16 (bfloat16 cannot cross the buffer protocol); others as they are."""
    if a is None or a.itemsize != 2:
        return a
    return a.view(np.uint16 if a.dtype == _F16 else np.int16)


def _grad_dtype(dt: np.dtype) -> np.dtype:
    """dgamma's and dbeta's dtype: x's, float32 for 16-bit x (PyTorch's mixed type)."""
    return _F32 if dt.itemsize == 2 else dt


def openmp_enabled() -> bool:
    """Whether the kernels were compiled with OpenMP (else they run serially)."""
    return _kernels.openmp_enabled()


def isa() -> str:
    """The widest instruction set the kernels run on here: 'avx512', 'avx2' or
    'baseline' (AVX-512 for float32 data and arrays that fit in L2, AVX2 for the
    rest; see the README's Wheels section)."""
    return _kernels_wide.isa()


def describe(shape: Sequence[int], dtype, axis: int = 1,
             n_threads: int | None = None, *, activation: str | None = None,
             residual: bool = False) -> dict:
    """Which path each job takes for a call on an array of this shape and dtype.

    Returns a dict: ``ncs`` (the (N, C, S) view), ``n_threads`` (the threads the
    call would use), ``build`` (the instruction set of the kernels it runs on),
    and ``jobs``: for ``statistics``, ``normalize``, ``grad_sums`` and
    ``grad_input``, the ``schedule`` (rows, rows narrow, planes), the
    ``variant`` (plain, prefetch, chunked, ...) and the ``knobs`` that decided it
    with their values; ``grad_sums`` and ``grad_input`` give ``channel_group``
    when the backward takes its channels that many at a time (float64 on planes,
    beyond the ``group_bytes`` knob). The kernels take their decisions from the
    same functions.
    ``activation`` and ``residual`` describe the fused call (``forward(...,
    residual=r, activation=...)`` and its backward): each job it fuses has a
    ``fused`` key naming its loops, and ``fused`` gives the options.
    """
    dt = np.dtype(dtype)
    if not _supported(dt):
        raise TypeError(f"bncy: dtype {dt}; supported dtypes are {_DTYPES}")
    shape = tuple(operator.index(n) for n in shape)
    if len(shape) < 2 or min(shape) < 0:
        raise ValueError(f"bncy: shape must have at least 2 dimensions >= 0, got {shape}")
    ax = _check_axis(axis, len(shape))
    N, C, S = _ncs_shape(shape, ax)
    nt = _resolve_threads(n_threads, N * C * S)
    relu = _check_activation(activation)
    build = _build_for(dt, N * C * S * dt.itemsize)
    jobs = build.describe_paths(N, C, S, dt.itemsize, nt, relu, bool(residual))
    for job in jobs.values():
        job["knobs"] = {name: _KNOBS[name] for name in job["knobs"]}
    return {"ncs": (N, C, S), "n_threads": nt, "build": build.isa(), "jobs": jobs,
            "fused": {"activation": activation, "residual": bool(residual)},
            "decided_by": {"n_threads": {"small_work": SMALL_WORK},
                           "build": {"wide_f64_bytes": WIDE_F64_BYTES}}}


# ---------------------------------------------------------------------------
# The cache of freed output buffers (bncy._buffers)
# ---------------------------------------------------------------------------

def _check_int(value, name: str, what: str, minimum: int, unit: str = "") -> int:
    """value as an int >= minimum: TypeError for a bool or a non-integer (``what``
    says what was expected), ValueError below minimum."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"bncy: {name} must be {what}, got bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"bncy: {name} must be {what}, got {type(value).__name__}") from None
    if n < minimum:
        raise ValueError(f"bncy: {name} must be >= {minimum}{unit}, got {n}")
    return n


def _check_cache_limit(limit, name: str) -> int:
    return _check_int(limit, name, "an integer number of bytes", 0, " bytes")


def _default_cache_limit() -> int:
    """BNCY_BUFFER_CACHE (bytes) when set, else 1 GiB or an eighth of the
    machine's memory, whichever is less."""
    env = os.environ.get("BNCY_BUFFER_CACHE", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(
                f"bncy: BNCY_BUFFER_CACHE must be an integer number of bytes, got {env!r}"
            ) from None
        return _check_cache_limit(n, "BNCY_BUFFER_CACHE")
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        ram = 8 << 30
    return min(1 << 30, ram // 8)


def set_buffer_cache(limit: int) -> int:
    """Set how many bytes of freed output buffers bncy may keep for reuse.

    The outputs bncy allocates (``y``, ``dx``, and the C-ordered copies of
    inputs in other layouts) of 4 MiB or more come from a cache: when such an
    array and every view of it are gone, its memory waits there (up to
    ``limit`` bytes in all, oldest dropped first) and the next output of the
    same size reuses it. Memory the system hands out fresh has to be zeroed
    on first touch, which cost as much as the batch norm pass itself on large
    arrays (see the README's Performance section). ``out=`` arrays and the
    caller's own arrays are never involved.

    Parameters
    ----------
    limit : int
        Bytes the cache may hold, ``>= 0``. 0 empties it and allocates every
        output fresh. The default is the environment variable
        ``BNCY_BUFFER_CACHE`` when set, else 1 GiB or an eighth of the
        machine's memory, whichever is less.

    Returns
    -------
    int
        The previous limit.

    Raises
    ------
    TypeError
        If ``limit`` is not an integer.
    ValueError
        If ``limit`` is negative.
    """
    return _buffers.set_limit(_check_cache_limit(limit, "limit"))


def buffer_cache_info() -> dict:
    """The state of the output buffer cache (see :func:`set_buffer_cache`).

    Returns
    -------
    dict
        ``limit`` (bytes the cache may hold), ``held`` (bytes it holds now),
        ``blocks`` (how many buffers those are), ``hits`` and ``misses`` (cached
        allocations served from it and allocated fresh, since import), and
        ``min_bytes`` (the smallest output it serves).
    """
    limit, held, blocks, hits, misses = _buffers.info()
    return {"limit": limit, "held": held, "blocks": blocks, "hits": hits,
            "misses": misses, "min_bytes": _buffers.MIN_BYTES}


_buffers.set_limit(_default_cache_limit())
set_knobs(**{**_knobs.derive(_CACHES, _baseline.cpu_has_avx512()),
             **_knobs.from_env(os.environ.get("BNCY_KNOBS", ""), _KNOB_NAMES)})


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------

def _as_float_array(a, name: str) -> np.ndarray:
    arr = a if type(a) is np.ndarray else np.asarray(a)
    if arr.dtype not in _FLOATS and not _supported(arr.dtype):
        raise TypeError(f"bncy: {name} has dtype {arr.dtype}; supported dtypes are {_DTYPES}")
    return arr


def _check_x(x, name: str = "x", *, allow_empty: bool = False) -> np.ndarray:
    x = _as_float_array(x, name)
    if x.ndim < 2:
        raise ValueError(
            f"bncy: {name} must have at least 2 dimensions (batch and channel); "
            f"got shape {x.shape}"
        )
    if x.size == 0 and not allow_empty:
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
    if writeable:
        if arr.dtype not in _FLOATS:
            raise TypeError(f"bncy: {name} has dtype {arr.dtype}; running statistics "
                            f"are float32 or float64")
        if not (type(v) is np.ndarray and v.flags.writeable):
            raise ValueError(f"bncy: {name} must be a writeable ndarray (it is updated in place)")
    return arr


def _as_f64(v) -> np.ndarray | None:
    if v is None:
        return None
    return np.ascontiguousarray(v, dtype=np.float64)


def _check_activation(activation) -> bool:
    """True for "relu", False for None."""
    if activation is None:
        return False
    if not isinstance(activation, str):
        raise TypeError(f"bncy: activation must be None or 'relu', got "
                        f"{type(activation).__name__}")
    if activation != "relu":
        raise ValueError(f"bncy: activation must be None or 'relu', got {activation!r}")
    return True


def _check_residual(residual, x: np.ndarray, name: str = "residual"):
    """The residual as an ndarray of x's shape and dtype (any layout), or None."""
    if residual is None:
        return None
    r = _as_float_array(residual, name)
    if r.dtype != x.dtype:
        raise TypeError(f"bncy: {name} has dtype {r.dtype}, expected x's dtype {x.dtype}")
    if r.shape != x.shape:
        raise ValueError(f"bncy: {name} has shape {r.shape}, expected x's shape {x.shape}")
    return r


def _check_real(value, name: str) -> float:
    if type(value) is float:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"bncy: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_eps(eps) -> float:
    e = _check_real(eps, "eps")
    if not (math.isfinite(e) and e >= 0.0):
        raise ValueError(f"bncy: eps must be finite and >= 0, got {eps!r}")
    return e


def _resolve_threads(n_threads, size: int) -> int:
    # Below small_work elements the kernels run on the calling thread: starting
    # an OpenMP team costs more than it saves. Results do not depend on it.
    if type(n_threads) is int and n_threads >= 1:
        return 1 if size < SMALL_WORK else n_threads
    if n_threads is None:
        nt = _kernels.max_threads()
    else:
        nt = _check_int(n_threads, "n_threads", "an integer or None", 1)
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
    if t.flags.c_contiguous:
        return t
    c = _buffers.empty(t.shape, t.dtype)
    np.copyto(c, t)
    return c


def _ncs_shape(shape: tuple, axis: int) -> tuple:
    """(N, C, S) around the channel axis: N the product of the axes before it, S of
    those after it."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])



def _choose_layout(x: np.ndarray, out):
    """The axis order every array of one call is processed in (out, checked by
    _check_out, has one)."""
    perm = _layout_perm(x if out is None else out)
    return None if perm is False else perm


def _check_out(out, like: np.ndarray, name: str = "out") -> None:
    """An output array: an ndarray of like's shape and dtype, writeable; ``out``
    also in an order the kernels can write (residual_out in any: written back)."""
    if type(out) is not np.ndarray:
        raise TypeError(f"bncy: {name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"bncy: {name} has shape {out.shape}, expected {like.shape}")
    if out.dtype != like.dtype:
        raise TypeError(f"bncy: {name} has dtype {out.dtype}, expected {like.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"bncy: {name} is read-only")
    if name == "out" and _layout_perm(out) is False:
        raise ValueError("bncy: out must be C-contiguous (or laid out exactly like the input)")


def _check_residual_out(residual_out, x: np.ndarray, out, residual) -> None:
    """residual_out: None, or an output (_check_out) for a call with a residual,
    not overlapping out."""
    if residual_out is None:
        return
    if residual is None:
        raise ValueError("bncy: residual_out needs a residual")
    _check_out(residual_out, x, "residual_out")
    if out is not None and np.may_share_memory(residual_out, out):
        raise ValueError("bncy: residual_out and out overlap")


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
    return _buffers.empty(t.shape, t.dtype) if out is None else _in_order(out, perm)


_DBL_MIN = 2.0**-1022   # the smallest normal double


def _rescue_extreme_channels(x3, mean, m2, var, invstd, scale, gamma, count, eps):
    """Recompute, scaled by the channel's largest magnitude, the statistics of the
    channels whose float64 squares over- or underflowed (|x - mean| beyond about
    1e154, or a variance below the smallest normal double, 2**-1022, with eps
    too small to outweigh its lost bits): the channels _train_coefficients
    counts. Channels holding NaN or inf, and
    constant channels, are left as they are (NaN/inf propagate; see the README)."""
    with np.errstate(all="ignore"):
        for c in range(x3.shape[1]):
            if np.isfinite(mean[c]) and np.isfinite(m2[c]) and not (
                    m2[c] < count * _DBL_MIN and eps <= _DBL_MIN * 2.0**53):
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
            e = (eps / s) / s
            if np.isfinite(e) and np.isfinite(1.0 / s):
                invstd[c] = (1.0 / s) / np.sqrt(q + e)
            else:   # eps outweighs the variance: unscaled (var's lost bits do not count)
                invstd[c] = 1.0 / np.sqrt(var[c] + eps)
            scale[c] = invstd[c] * (1.0 if gamma is None else gamma[c])


# ---------------------------------------------------------------------------
# The phases every public function is made of: plan (all validation, nothing
# written), local reduction (one kernel), apply (coefficients, one elementwise
# kernel, running statistics). bncy.forward/backward run them back to back; the
# split-phase functions below expose them so that any all-reduce can sit between.
# ---------------------------------------------------------------------------

class _TrainPlan:
    """A validated training forward (bncy.forward, apply_stats) or batch_stats call:
    x, y as C-contiguous (N, C, S) views and float64 per-channel vectors."""

    __slots__ = ("x3", "y3", "res3", "relu", "result", "k", "nt", "C", "count", "gamma",
                 "shift", "eps", "running_mean", "running_var", "momentum")


class _GradPlan:
    """A validated backward (bncy.backward, grad_stats, apply_grad) call."""

    __slots__ = ("x3", "y3", "dy3", "res3", "dres3", "relu", "result", "dres_result",
                 "dres_back", "dres_copy", "k", "nt", "C", "count", "dtype", "mean",
                 "invstd", "gamma", "shift")


class _InferPlan:
    """A validated bncy.inference call."""

    __slots__ = ("x3", "y3", "res3", "relu", "result", "k", "nt", "running_mean",
                 "running_var", "gamma", "beta", "eps")


def _layout(plan, x: np.ndarray, ax: int, out, dy=None, res=None, res_out=False, *,
            output: bool = True) -> None:
    """Choose one axis order for x (dy, the residual res) and the output; set the
    (N, C, S) views (res3 None without a residual) and the build of the kernels
    that runs them. res_out None or an array: a second output, the residual's
    gradient (dres3, written back to res_out by _finish_dres when res_out is not
    in that order). output=False: a reduction only (phase 1 of the split API), no
    output allocated (y3 and result None)."""
    if res_out is not None and res_out is not False:   # checked by _check_residual_out
        x = _unaliased(x, res_out)
        dy = None if dy is None else _unaliased(dy, res_out)
        res = None if res is None else _unaliased(res, res_out)
    if out is not None:
        _check_out(out, x)
        x = _unaliased(x, out)
        if dy is not None:
            dy = _unaliased(dy, out)
        if res is not None:
            res = _unaliased(res, out)
    perm = _choose_layout(x, out)
    xt = _in_order(x, perm)
    axt = ax if perm is None else perm.index(ax)
    ncs = _ncs_shape(xt.shape, axt)
    plan.x3 = xt.reshape(ncs)
    if dy is not None:
        plan.dy3 = _in_order(dy, perm).reshape(ncs)
    if res is not None:
        plan.res3 = _in_order(res, perm).reshape(ncs)
    if res_out is not False:
        rt = _alloc_like(xt, None, perm)
        if res_out is not None and _layout_perm(res_out) == perm:
            rt = _in_order(res_out, perm)
        plan.dres3 = rt.reshape(ncs)
        plan.dres_back = _result(rt, perm)
        plan.dres_result = res_out if res_out is not None else plan.dres_back
    plan.y3 = plan.result = None
    if output:
        yt = _alloc_like(xt, out, perm)
        plan.y3 = yt.reshape(ncs)
        plan.result = out if out is not None else _result(yt, perm)
    plan.k = _build_for(xt.dtype, xt.nbytes)


def _check_train(x, gamma, beta, eps, axis, running_mean, running_var, momentum, *,
                 local: bool = True, residual=None, activation=None):
    """Every check of a training forward, nothing allocated: (x, axis, plan with
    the per-channel arguments). local=False: x is one part of a larger batch (it
    may be empty, and the count check waits for the merged statistics)."""
    x = _check_x(x, allow_empty=not local)
    ax = _check_axis(axis, x.ndim)
    p = _TrainPlan()
    p.C = C = x.shape[ax]
    if C == 0:
        raise ValueError(f"bncy: x has no channels (shape {x.shape}, axis={axis})")
    p.count = x.size // C
    p.relu = _check_activation(activation)
    p.res3 = _check_residual(residual, x)
    if local and p.count < 2:
        raise ValueError(
            f"bncy: expected more than 1 value per channel when training, "
            f"got input of shape {x.shape} (axis={axis})"
        )
    p.gamma = None if gamma is None else _as_f64(_check_vector(gamma, "gamma", C))
    p.shift = np.zeros(C) if beta is None else _as_f64(_check_vector(beta, "beta", C))
    p.eps = _check_eps(eps)
    if (running_mean is None) != (running_var is None):
        raise ValueError("bncy: give both running_mean and running_var, or neither")
    p.running_mean, p.running_var, p.momentum = running_mean, running_var, 0.0
    if running_mean is not None:
        _check_vector(running_mean, "running_mean", C, writeable=True)
        _check_vector(running_var, "running_var", C, writeable=True)
        p.momentum = _check_real(momentum, "momentum")
        if not 0.0 <= p.momentum <= 1.0:
            raise ValueError(f"bncy: momentum must be in [0, 1], got {momentum!r}")
    return x, ax, p


def _plan_train(x, gamma, beta, eps, axis, running_mean, running_var, momentum, out,
                n_threads, *, local: bool = True, residual=None, activation=None,
                output: bool = True) -> _TrainPlan:
    """_check_train, then the layout (see _layout for output)."""
    x, ax, p = _check_train(x, gamma, beta, eps, axis, running_mean, running_var, momentum,
                            local=local, residual=residual, activation=activation)
    p.nt = _resolve_threads(n_threads, x.size)
    _layout(p, x, ax, out, res=p.res3, output=output)
    return p


def _local_moments(p: _TrainPlan):
    """(count, mean, m2, mean_lo) of the plan's x: the moments kernel."""
    mean, m2, lo = np.zeros(p.C), np.zeros(p.C), np.zeros(p.C)
    if p.x3.size:
        p.k.moments(_bits(p.x3), mean, m2, p.nt, lo)
    return p.count, mean, m2, lo


def _apply_train(p: _TrainPlan, count: int, mean, m2):
    """Normalise with (count, mean, m2) as given and update the running statistics
    once: the kernels' apply job. A channel whose mean or M2 is not finite (NaN or
    inf in some part, or float64 squares that overflowed) gets NaN/inf, the same
    on every part: bncy.forward's rescue (_rescue_extreme_channels) needs the
    whole batch's values, which a part does not hold."""
    C = p.C
    var, invstd, scale = np.empty(C), np.empty(C), np.empty(C)
    p.k.apply_train(_bits(p.x3), _bits(p.res3), p.relu, float(count), mean, m2, p.gamma,
                    p.shift, p.eps, _bits(p.y3), var, invstd, scale, p.running_mean,
                    p.running_var, p.momentum, p.nt)
    return p.result, mean, invstd


def _finish_rescued(p: _TrainPlan, count: int, mean, m2, var, invstd, scale) -> None:
    """The apply job's second half, after the scaled recomputation."""
    _rescue_extreme_channels(p.x3, mean, m2, var, invstd, scale, p.gamma, count, p.eps)
    p.k.finish_train(_bits(p.x3), _bits(p.res3), p.relu, float(count), mean, m2, scale, p.shift,
                     _bits(p.y3), p.running_mean,
                     p.running_var, p.momentum, p.nt)


def _check_grad(dy, x, mean, invstd, gamma, axis, *, local: bool = True, beta=None,
                residual=None, activation=None):
    """Every check of a backward pass, nothing allocated (local=False: x may be an
    empty part of a batch): (dy, x, axis, plan with the per-channel arguments).
    With activation="relu", beta and the residual give the mask."""
    x = _check_x(x, allow_empty=not local)
    dy = _check_x(dy, "dy", allow_empty=not local)
    if dy.shape != x.shape:
        raise ValueError(f"bncy: dy has shape {dy.shape}, expected x's shape {x.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"bncy: dy has dtype {dy.dtype}, expected x's dtype {x.dtype}")
    ax = _check_axis(axis, x.ndim)
    p = _GradPlan()
    p.C = C = x.shape[ax]
    if C == 0:
        raise ValueError(f"bncy: x has no channels (shape {x.shape}, axis={axis})")
    p.count = x.size // C
    p.dtype = x.dtype
    p.mean = _as_f64(_check_vector(mean, "mean", C))
    p.invstd = _as_f64(_check_vector(invstd, "invstd", C))
    p.gamma = None if gamma is None else _as_f64(_check_vector(gamma, "gamma", C))
    p.relu = _check_activation(activation)
    p.res3 = _check_residual(residual, x)
    p.shift = np.zeros(C) if beta is None else _as_f64(_check_vector(beta, "beta", C))
    p.dres3 = p.dres_result = p.dres_back = p.dres_copy = None
    return dy, x, ax, p


def _plan_grad(dy, x, mean, invstd, gamma, axis, out, n_threads, *,
               local: bool = True, beta=None, residual=None, activation=None,
               residual_out=None, output: bool = True) -> _GradPlan:
    """_check_grad, then the layout (outputs allocated: dx, and the residual's
    gradient with a residual through ReLU)."""
    dy, x, ax, p = _check_grad(dy, x, mean, invstd, gamma, axis, local=local, beta=beta,
                               residual=residual, activation=activation)
    p.nt = _resolve_threads(n_threads, x.size)
    fused_res = p.relu and p.res3 is not None
    _check_residual_out(residual_out, x, out, p.res3)
    if not p.relu:
        p.res3 = None    # the add's gradient is dy itself: no kernel reads it
    if residual_out is not None and np.may_share_memory(x, residual_out):
        x = x.copy(order="K")   # the backward writes residual_out, then reads x
    _layout(p, x, ax, out, dy, p.res3, residual_out if fused_res else False,
            output=output)
    if p.res3 is None and residual is not None:
        # no activation: the residual's gradient is dy. residual_out receives it
        # from _copy_dres, after every check and before dx (which may alias dy)
        # is written; else a copy now when dx may overwrite dy.
        d = np.asarray(dy)
        if residual_out is not None:
            p.dres_result, p.dres_copy = residual_out, d
        else:
            p.dres_result = d.copy() if out is not None and np.may_share_memory(out, d) else d
    return p


def _copy_dres(p: _GradPlan) -> None:
    """dy into residual_out, for a residual without an activation (see _plan_grad)."""
    if p.dres_copy is not None:
        np.copyto(p.dres_result, p.dres_copy)


def _finish_dres(p: _GradPlan):
    """The residual's gradient of a plan: written back to residual_out when it was
    computed in another order."""
    r, back = p.dres_result, p.dres_back
    if back is not None and back is not r and not np.shares_memory(r, back):
        np.copyto(r, back)
    return r


def _local_grad_sums(p: _GradPlan):
    """(sum dy, sum dy * (x - mean)) of the plan's arrays: the gradient-sums kernel."""
    sdy, sdyx = np.zeros(p.C), np.zeros(p.C)
    if p.x3.size:
        scale = None
        if p.relu:   # the forward's scale, bit for bit (see _train_coefficients)
            scale = p.invstd * p.gamma if p.gamma is not None else p.invstd
        p.k.grad_sums(_bits(p.dy3), _bits(p.x3), p.mean, sdy, sdyx, p.nt, _bits(p.res3), p.relu,
                      scale, p.shift)
    return sdy, sdyx


def _apply_grad(p: _GradPlan, sdy, sdyx, count: int, *, batch_stats: bool = True):
    """dx from the (merged) sums; dgamma, dbeta: the kernels' gradient apply job.
    batch_stats=False: mean and invstd are constants (an eval-mode pass), so
    dx = gamma * invstd * dy."""
    dgamma = np.empty(p.C)
    _copy_dres(p)
    p.k.apply_grad(_bits(p.dy3), _bits(p.x3), _bits(p.res3), p.relu, p.mean, p.invstd, p.gamma,
                   p.shift, sdy, sdyx, float(count), batch_stats, _bits(p.y3), _bits(p.dres3),
                   dgamma, p.nt)
    gt = _grad_dtype(p.dtype)
    out = (p.result, dgamma.astype(gt, copy=False), np.asarray(sdy).astype(gt, copy=False))
    return out if p.dres_result is None else (*out, _finish_dres(p))


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------

def forward(x: ArrayLike, gamma: ArrayLike | None = None, beta: ArrayLike | None = None, *,
            eps: float = 1e-5, axis: int = 1, running_mean: _Floats | None = None,
            running_var: _Floats | None = None, momentum: float = 0.1,
            out: _Floats | None = None, n_threads: int | None = None,
            residual: ArrayLike | None = None, activation: str | None = None,
            ) -> tuple[_Floats, NDArray[np.float64], NDArray[np.float64]]:
    """Batch normalization, training mode: normalise with the batch statistics.

    Parameters
    ----------
    x : ndarray of shape (n_0, ..., n_axis = C, ..., n_k)
        The batch: float32, float64, float16 or bfloat16 (``ml_dtypes``). Statistics
        are taken per channel (along ``axis``) over every other axis, in float64.
        Read-only arrays and any memory layout are accepted.
    gamma, beta : ndarray of shape (C,), optional
        Per-channel scale and shift (any of those dtypes). None means 1 and 0.
    eps : float, default 1e-5
        Added to the variance before the square root; finite and >= 0.
    axis : int, default 1
        The channel axis; negative values count from the end.
    running_mean, running_var : ndarray of shape (C,), optional
        Running statistics (float32 or float64), updated in place (both or
        neither), PyTorch's way:
        ``r = (1 - momentum) * r + momentum * s`` with the batch mean and the
        unbiased batch variance (``var * n / (n - 1)``).
    momentum : float, default 0.1
        In [0, 1].
    out : ndarray, optional
        Where to write y: x's shape and dtype, writeable, contiguous in some axis
        order (C order, or laid out like x). May be x itself.
    n_threads : int, optional
        OpenMP threads; None uses OpenMP's default (OMP_NUM_THREADS, threadpoolctl).
        Results are bitwise identical for every value.
    residual : ndarray of x's shape and dtype, optional
        Added to the normalised value before the activation, in the same pass
        (a ResNet block's skip connection); any layout. ``out`` may be it.
    activation : None or "relu", optional
        Applied last, in the same pass: ``max(v, 0)`` (NaN stays NaN).

    Returns
    -------
    y : ndarray of x's shape and dtype
        ``act(gamma * (x - mean) * invstd + beta [+ residual])``, computed in
        float64 and rounded once; ``out`` when given, else a new array (of 4 MiB
        or more: memory from bncy's buffer cache, see :func:`set_buffer_cache`).
    mean : ndarray of shape (C,), float64
        The batch mean.
    invstd : ndarray of shape (C,), float64
        ``1 / sqrt(var + eps)`` with the biased batch variance.

    Raises
    ------
    TypeError
        An unsupported dtype, or an argument of the wrong kind.
    ValueError
        A wrong shape, axis, size or parameter, fewer than 2 values per channel,
        or an unusable ``out``. Nothing is written when an exception is raised.
    """
    # a plain call (fused or not) is checked and run in C, else None (see the
    # kernels' Fast paths)
    r = _kernels_wide.forward_fast(x, gamma, beta, eps, axis, running_mean, running_var,
                                   momentum, out, n_threads, SMALL_WORK, _FAST_F64_BYTES,
                                   residual, activation)
    if r is not None:
        return r
    p = _plan_train(x, gamma, beta, eps, axis, running_mean, running_var, momentum, out,
                    n_threads, residual=residual, activation=activation)
    C = p.C
    mean, m2, var, invstd, scale = (np.empty(C), np.empty(C), np.empty(C), np.empty(C),
                                    np.empty(C))
    # the forward job: moments, then the apply job (as batch_stats + apply_stats)
    if p.k.forward_train(_bits(p.x3), _bits(p.res3), p.relu, p.gamma, p.shift, p.eps, _bits(p.y3),
                         mean, m2, var, invstd,
                         scale, p.running_mean, p.running_var, p.momentum, p.nt):
        _finish_rescued(p, p.count, mean, m2, var, invstd, scale)  # a channel to rescue
    return p.result, mean, invstd


def inference(x: ArrayLike, running_mean: ArrayLike, running_var: ArrayLike,
              gamma: ArrayLike | None = None, beta: ArrayLike | None = None, *,
              eps: float = 1e-5, axis: int = 1, out: _Floats | None = None,
              n_threads: int | None = None, residual: ArrayLike | None = None,
              activation: str | None = None) -> _Floats:
    """Batch normalization, inference mode: normalise with the running statistics.

    Parameters
    ----------
    x : ndarray of shape (n_0, ..., n_axis = C, ..., n_k)
        The input (float32, float64, float16 or bfloat16); any layout.
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
    residual, activation : optional
        As in :func:`forward`.

    Returns
    -------
    y : ndarray of x's shape and dtype
        ``act(gamma * (x - running_mean) / sqrt(running_var + eps) + beta
        [+ residual])``; ``out`` or a new array, as in :func:`forward`.

    Raises
    ------
    TypeError, ValueError
        As in :func:`forward`. A single value per channel is fine here.
    """
    # a plain call (fused or not) is checked and run in C, else None (see the
    # kernels' Fast paths)
    y = _kernels_wide.inference_fast(x, running_mean, running_var, gamma, beta, eps, axis,
                                     out, n_threads, SMALL_WORK, _FAST_F64_BYTES, residual,
                                     activation)
    if y is not None:
        return y
    x = _check_x(x)
    ax = _check_axis(axis, x.ndim)
    C = x.shape[ax]
    p = _InferPlan()
    p.relu = _check_activation(activation)
    p.res3 = _check_residual(residual, x)
    p.running_mean = _as_f64(_check_vector(running_mean, "running_mean", C))
    p.running_var = _as_f64(_check_vector(running_var, "running_var", C))
    p.gamma = None if gamma is None else _as_f64(_check_vector(gamma, "gamma", C))
    p.beta = None if beta is None else _as_f64(_check_vector(beta, "beta", C))
    p.eps = _check_eps(eps)
    p.nt = _resolve_threads(n_threads, x.size)
    _layout(p, x, ax, out, res=p.res3)
    p.k.inference_train(_bits(p.x3), _bits(p.res3), p.relu, p.running_mean, p.running_var, p.gamma,
                        p.beta, p.eps, _bits(p.y3), p.nt)
    return p.result


def backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
             gamma: ArrayLike | None = None, *, axis: int = 1, out: _Floats | None = None,
             n_threads: int | None = None, beta: ArrayLike | None = None,
             residual: ArrayLike | None = None, activation: str | None = None,
             residual_out: _Floats | None = None) -> tuple[_Floats, ...]:
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
    x : ndarray, float32, float64, float16 or bfloat16
        The input of the forward pass.
    mean, invstd : ndarray of shape (C,), float32 or float64
        As returned by :func:`forward`.
    gamma : ndarray of shape (C,), optional
        The scale used in the forward pass; None means 1.
    axis : int, default 1
        The channel axis.
    out : ndarray, optional
        Where to write dx: x's shape and dtype, as in :func:`forward`. May be dy
        (or x) itself.
    n_threads : int, optional
        As in :func:`forward`; results are bitwise identical for every value.
    beta, residual, activation : optional
        Those of the forward pass (a fused ``forward(..., residual=,
        activation=)``). With ``activation="relu"`` dy is taken where the
        forward's y was > 0 (PyTorch's definition), else 0, without a masked
        copy: the mask is recomputed from x, mean, invstd, gamma, beta and the
        residual, the same float64 expression rounded the same way, so the same
        bits as ``y > 0``. This reads no more than the plain backward (y would be
        one more array in each of the two passes). They must be the values the
        forward used.
    residual_out : ndarray, optional
        Where to write the residual's gradient (x's shape and dtype); with
        ReLU it is written in the pass that writes dx, or for arrays beyond L2
        in the pass that sums (dx is then read from it). Must not overlap
        ``out``.

    Returns
    -------
    dx : ndarray of x's shape and dtype
        ``out`` or a new array, as in :func:`forward`.
    dgamma, dbeta : ndarray of shape (C,), x's dtype (float32 for 16-bit x)
    dresidual : ndarray of x's shape and dtype, only when ``residual`` is given
        The masked dy (``residual_out`` or a new array); without an activation
        it is dy (dy itself unless ``out`` or ``residual_out`` needed a copy).

    Raises
    ------
    TypeError, ValueError
        As in :func:`forward`; also when dy's shape or dtype differs from x's.
    """
    # a plain call (also through ReLU, with a residual and no residual_out) is
    # checked and run in C, else None (see the kernels' Fast paths)
    r = _kernels_wide.backward_fast(dy, x, mean, invstd, gamma, axis, out, n_threads,
                                    SMALL_WORK, _FAST_F64_BYTES, beta, residual, activation,
                                    residual_out)
    if r is not None:
        return r
    p = _plan_grad(dy, x, mean, invstd, gamma, axis, out, n_threads, beta=beta,
                   residual=residual, activation=activation, residual_out=residual_out)
    sdy, dgamma = np.empty(p.C), np.empty(p.C)
    _copy_dres(p)
    # the backward job: gradient sums, then the gradient apply job
    p.k.backward_train(_bits(p.dy3), _bits(p.x3), _bits(p.res3), p.relu, p.mean, p.invstd, p.gamma,
                       p.shift, _bits(p.y3), _bits(p.dres3), sdy, dgamma, p.nt)
    gt = _grad_dtype(p.dtype)
    out = (p.result, dgamma.astype(gt, copy=False), sdy.astype(gt, copy=False))
    return out if p.dres_result is None else (*out, _finish_dres(p))


def _backward_eval(dy, x, mean, invstd, gamma, axis, n_threads, **fused):
    """The gradient of an eval-mode pass (mean and invstd constants): the sums,
    then the gradient apply job with batch_stats=False (bncy.BatchNorm)."""
    p = _plan_grad(dy, x, mean, invstd, gamma, axis, None, n_threads, **fused)
    return _apply_grad(p, *_local_grad_sums(p), p.count, batch_stats=False)


# ---------------------------------------------------------------------------
# Split-phase API: the same kernels, with a merge step in between
# ---------------------------------------------------------------------------

class BatchStats(NamedTuple):
    """Per-channel statistics of (part of) a batch: the count of values per channel,
    their mean and their sum of squared deviations about it (M2), float64, and
    optionally ``mean_lo``, what rounding the mean to float64 dropped (``mean +
    mean_lo`` is nearer the exact mean; None counts as 0). :func:`merge_stats`
    uses it: parts' means rounded at the data's magnitude would otherwise bring
    an error relative to that magnitude into the merged M2."""

    count: int
    mean: NDArray[np.float64]
    m2: NDArray[np.float64]
    mean_lo: NDArray[np.float64] | None = None


class GradStats(NamedTuple):
    """Per-channel sums of (part of) a batch for the backward pass, float64:
    ``sum(dy)`` and ``sum(dy * (x - mean))`` with the mean of the whole batch."""

    sum_dy: NDArray[np.float64]
    sum_dy_xc: NDArray[np.float64]


def batch_stats(x: ArrayLike, *, axis: int = 1, n_threads: int | None = None) -> BatchStats:
    """Phase 1 of a split forward pass: the local statistics of x.

    x may be empty along its batch axes (a worker with no rows): count 0.
    Combine the parts with :func:`merge_stats`, normalise with :func:`apply_stats`.
    ``bncy.forward(x)`` equals ``apply_stats(x, batch_stats(x))`` bit for bit.
    """
    p = _plan_train(x, None, None, 0.0, axis, None, None, 0.1, None, n_threads, local=False,
                    output=False)
    return BatchStats(*_local_moments(p))


def merge_stats(parts: Sequence[BatchStats]) -> BatchStats:
    """Phase 2: the statistics of the union of the parts (Chan et al.'s formula,
    exact for unequal counts, float64), merged in the order given, so the result is
    the same wherever the same sequence is merged. Parts with count 0 are skipped;
    one part comes back as it is.

    The means are merged relative to the first part's (each part's as ``(mean -
    first mean) + mean_lo``, exact differences for data far from zero), so that
    rounding errors are relative to the data's spread, not its magnitude."""
    parts = list(parts)
    if not parts:
        raise ValueError("bncy: merge_stats needs at least one part")
    C = np.shape(parts[0].mean)[0]
    n, used = 0, 0
    ref, rel, m2 = np.zeros(C), np.zeros(C), np.zeros(C)
    for part in parts:
        nb = int(part.count)
        lo = getattr(part, "mean_lo", None)
        if (nb < 0 or np.shape(part.mean) != (C,) or np.shape(part.m2) != (C,)
                or (lo is not None and np.shape(lo) != (C,))):
            raise ValueError("bncy: parts must share one channel count and have count >= 0")
        if nb == 0:
            continue
        mb = np.asarray(part.mean, dtype=np.float64)
        qb = np.asarray(part.m2, dtype=np.float64)
        lob = np.zeros(C) if lo is None else np.asarray(lo, dtype=np.float64)
        used += 1
        if n == 0:
            ref, rel, m2 = mb.copy(), lob.copy(), qb.copy()
        else:
            tot = n + nb
            delta = ((mb - ref) + lob) - rel
            rel = rel + delta * (nb / tot)
            m2 = m2 + qb + delta * delta * (n * (nb / tot))
        n += nb
    if used == 1:   # the one part as it is: ref, m2, rel are copies of its arrays
        return BatchStats(n, ref, m2, rel)
    mean = ref + rel
    return BatchStats(n, mean, m2, rel - (mean - ref))


def apply_stats(x: ArrayLike, stats: BatchStats, gamma: ArrayLike | None = None,
                beta: ArrayLike | None = None, *, eps: float = 1e-5, axis: int = 1,
                running_mean: _Floats | None = None, running_var: _Floats | None = None,
                momentum: float = 0.1, out: _Floats | None = None,
                n_threads: int | None = None, residual: ArrayLike | None = None,
                activation: str | None = None,
                ) -> tuple[_Floats, NDArray[np.float64], NDArray[np.float64]]:
    """Phase 3 of a split forward pass: normalise x with (merged) statistics.

    Arguments and results as in :func:`forward` (``residual`` and ``activation``
    included), with ``stats`` from
    :func:`merge_stats`; the running statistics are updated with them. x may be
    empty. Raises ValueError when ``stats.count < 2``.
    """
    p = _plan_train(x, gamma, beta, eps, axis, running_mean, running_var, momentum, out,
                    n_threads, local=False, residual=residual, activation=activation)
    count = operator.index(stats.count)
    mean = _as_f64(_check_vector(stats.mean, "stats.mean", p.C)).copy()
    m2 = _as_f64(_check_vector(stats.m2, "stats.m2", p.C)).copy()
    if count < 2:
        raise ValueError(f"bncy: expected more than 1 value per channel when training, "
                         f"got {count} in the merged statistics")
    return _apply_train(p, count, mean, m2)


def grad_stats(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, *, axis: int = 1,
               n_threads: int | None = None, invstd: ArrayLike | None = None,
               gamma: ArrayLike | None = None, beta: ArrayLike | None = None,
               residual: ArrayLike | None = None,
               activation: str | None = None) -> GradStats:
    """Phase 1 of a split backward pass: the local sums, about the batch's mean.

    Sum the parts with :func:`merge_grad_stats`; finish with :func:`apply_grad`.
    With ``activation="relu"`` the sums are of dy masked as in :func:`backward`,
    which needs ``invstd`` (and gamma, beta, residual as in the forward).
    """
    C = _check_x(x, allow_empty=True).shape[_check_axis(axis, np.ndim(x))]
    if activation is not None and invstd is None:
        raise ValueError("bncy: grad_stats with an activation needs invstd")
    p = _plan_grad(dy, x, mean, np.ones(C) if invstd is None else invstd, gamma, axis,
                   None, n_threads, local=False, beta=beta, residual=residual,
                   activation=activation, output=False)
    return GradStats(*_local_grad_sums(p))


def merge_grad_stats(parts: Sequence[GradStats]) -> GradStats:
    """Phase 2: the sums of the parts, added in the order given."""
    parts = list(parts)
    if not parts:
        raise ValueError("bncy: merge_grad_stats needs at least one part")
    sdy = np.array(parts[0].sum_dy, dtype=np.float64)
    sdyx = np.array(parts[0].sum_dy_xc, dtype=np.float64)
    for part in parts[1:]:
        if np.shape(part.sum_dy) != sdy.shape or np.shape(part.sum_dy_xc) != sdy.shape:
            raise ValueError("bncy: parts must share one channel count")
        sdy = sdy + part.sum_dy
        sdyx = sdyx + part.sum_dy_xc
    return GradStats(sdy, sdyx)


def apply_grad(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
               stats: GradStats, count: int, gamma: ArrayLike | None = None, *,
               axis: int = 1, out: _Floats | None = None, n_threads: int | None = None,
               beta: ArrayLike | None = None, residual: ArrayLike | None = None,
               activation: str | None = None, residual_out: _Floats | None = None,
               ) -> tuple[_Floats, ...]:
    """Phase 3 of a split backward pass: dx of this part, dgamma and dbeta of the
    whole batch, from the merged sums and the batch's value count per channel.

    Arguments and results as in :func:`backward` (the fused options included;
    ``stats`` from :func:`grad_stats` with the same ones). x may be empty.
    """
    p = _plan_grad(dy, x, mean, invstd, gamma, axis, out, n_threads, local=False,
                   beta=beta, residual=residual, activation=activation,
                   residual_out=residual_out)
    sdy = _as_f64(_check_vector(stats.sum_dy, "stats.sum_dy", p.C))
    sdyx = _as_f64(_check_vector(stats.sum_dy_xc, "stats.sum_dy_xc", p.C))
    n = operator.index(count)
    if n < 1:
        raise ValueError(f"bncy: count must be >= 1, got {n}")
    return _apply_grad(p, sdy, sdyx, n)
