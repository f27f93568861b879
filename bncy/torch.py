"""bncy for PyTorch: a deterministic CPU batch norm op, drop-in modules, and
synchronized batch norm over ``torch.distributed`` on the CPU.

Importable only when PyTorch is installed (``pip install 'bncy[torch]'``, which
pins ``torch==2.13.0``).

* :func:`batch_norm` has ``torch.nn.functional.batch_norm``'s signature and
  semantics, and optionally fuses a residual add and a ReLU (``residual=``,
  ``activation="relu"``) into bncy's pass. In eager mode it calls bncy directly
  on NumPy views of the tensors' memory (no copy for contiguous or
  channels_last inputs) under a ``torch.autograd.Function``; under
  ``torch.compile`` and other tracing it goes through three ``torch.library``
  custom ops (below), so the graph has no break inside it.
* :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d` subclass
  torch's modules and only replace ``forward``: same constructor (plus an
  optional ``activation``), attributes and ``state_dict``; ``forward(input,
  residual=None)``. :func:`convert` swaps them into a model in place.
* :class:`SyncBatchNorm` and :func:`convert_sync_batchnorm` synchronize the
  training statistics over a ``torch.distributed`` process group (gloo, or any
  backend with ``all_gather`` of CPU tensors), with bncy's split-phase API.

Custom ops (namespace ``bncy``): ``torch.library`` refuses an autograd formula
for an op that mutates its arguments, so the op is split in two:

* ``bncy::batch_norm(input, running_mean?, running_var?, weight?, bias?,
  training, eps, residual?, activation?) -> (y, mean, invstd, var)``,
  functional, with
  ``register_autograd`` whose backward is ``bncy::batch_norm_backward`` (bncy's
  closed form, :func:`bncy.backward`); mean, invstd and the unbiased batch
  variance var are float64 (C,).
* ``bncy::update_running_stats(running_mean!, running_var!, mean, var,
  momentum, batch?)``, which declares the running statistics as mutated
  arguments (left alone when the batch, the input, is empty).

dtypes: float32, float64, float16 and bfloat16 (bfloat16 through ml_dtypes,
imported on first use). Weight, bias and the running statistics share one
dtype, torch's CPU rule: the input's, or float32 for a 16-bit input. The output
has the input's dtype, dweight and dbias the weight's. 16-bit running
statistics are updated through a float32 copy (bncy updates float32/float64
ones in place) and rounded back to nearest even.

Results are bitwise identical for every ``torch.set_num_threads`` and between
the eager and the compiled paths.
"""

try:
    import torch
except ImportError as exc:  # torch is an optional extra
    raise ImportError(
        "bncy.torch needs PyTorch: pip install 'bncy[torch]' (torch==2.13.0, CPU build)"
    ) from exc

import math
import numbers

import numpy as np
import torch.distributed as dist
from torch import nn

import bncy

__all__ = [
    "batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert",
    "SyncBatchNorm", "convert_sync_batchnorm",
]

_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)
_DTYPES = (*_FLOATS, *_HALVES)   # SyncBatchNorm's dtype codes are indices here
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


# ---------------------------------------------------------------------------
# Validation: everything is checked before anything is written
# ---------------------------------------------------------------------------

def _not_tensor(t, name: str):
    return TypeError(f"bncy.torch: {name} must be a torch.Tensor, got {type(t).__name__}")


def _not_dense_cpu(t, name: str):
    """The TypeError for a tensor off the CPU or not strided, else None."""
    if not t.is_cpu:
        return TypeError(f"bncy.torch: {name} is on {t.device}; bncy runs on CPU tensors only")
    if t.layout is not torch.strided:
        return TypeError(f"bncy.torch: {name} has layout {t.layout}; only dense (strided) "
                         "tensors are supported")
    return None


def _check_tensor(t, name: str) -> None:
    """A dense CPU tensor of float32, float64, float16 or bfloat16 (with ml_dtypes
    installed), else TypeError."""
    if not isinstance(t, torch.Tensor):
        raise _not_tensor(t, name)
    if (exc := _not_dense_cpu(t, name)) is not None:
        raise exc
    if t.dtype not in _DTYPES:
        raise TypeError(f"bncy.torch: {name} has dtype {t.dtype}; supported dtypes are "
                        "float32, float64, float16 and bfloat16")
    if t.dtype is torch.bfloat16:
        _np_bfloat16()


def _param_dtype(input, vectors):
    """The dtype that weight, bias and the running statistics share, as torch's CPU
    batch_norm wants it: the input's, or float32 for a float16/bfloat16 input
    (mixed precision); the first given vector decides. TypeError otherwise."""
    dtype = input.dtype
    for t, name in vectors:
        if isinstance(t, torch.Tensor):
            if t.dtype is dtype or (t.dtype is torch.float32 and dtype in _HALVES):
                return t.dtype
            extra = " or float32" if dtype in _HALVES else ""
            raise TypeError(f"bncy.torch: {name} has dtype {t.dtype}, expected the input's "
                            f"dtype {dtype}{extra}")
    return dtype


def _check_vector(t, name: str, C: int, dtype) -> None:
    """None, or a dense CPU tensor of shape (C,) and dtype (checked)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise _not_tensor(t, name)
    if t.dtype is not dtype:
        raise TypeError(f"bncy.torch: {name} has dtype {t.dtype}, expected {dtype} (weight, "
                        "bias and the running statistics share one dtype: the input's, or "
                        "float32 for a float16/bfloat16 input)")
    if (exc := _not_dense_cpu(t, name)) is not None:
        raise exc
    if t.shape != (C,):
        raise ValueError(f"bncy.torch: {name} must have shape ({C},), got {tuple(t.shape)}")


def _check_activation(activation) -> None:
    """None or "relu", else TypeError (another kind) or ValueError."""
    if activation is None or (type(activation) is str and activation == "relu"):
        return
    if not isinstance(activation, str):
        raise TypeError(f"bncy.torch: activation must be None or 'relu', got "
                        f"{type(activation).__name__}")
    raise ValueError(f"bncy.torch: activation must be None or 'relu', got {activation!r}")


def _check_real(value, name: str, lo: float, hi: float) -> float:
    """A real number in [lo, hi]: TypeError for another kind, ValueError outside."""
    if type(value) is not float and (isinstance(value, bool)
                                     or not isinstance(value, numbers.Real)):
        raise TypeError(f"bncy.torch: {name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"bncy.torch: {name} must be finite and in [{lo:g}, {hi:g}], "
                         f"got {value!r}")
    return v


def _check(input, running_mean, running_var, weight, bias, training, momentum, eps, *,
           channels: int | None = None, residual=None, activation=None):
    """Validate a batch_norm call; return the memory format of its results.

    ``channels``: the number of channels the caller expects (a module's
    ``num_features``), checked against ``input.shape[1]``.
    """
    _check_activation(activation)
    _check_tensor(input, "input")
    if input.dim() < 2:
        raise ValueError(f"bncy.torch: expected at least 2D input (got {input.dim()}D input)")
    C = input.shape[1]
    if C == 0 or (channels is not None and C != channels):
        want = "at least 1" if channels is None else str(channels)
        raise ValueError(f"bncy.torch: expected {want} channels, got input of shape "
                         f"{tuple(input.shape)}")
    vectors = ((running_mean, "running_mean"), (running_var, "running_var"),
               (weight, "weight"), (bias, "bias"))
    dtype = _param_dtype(input, vectors)
    for t, name in vectors:
        _check_vector(t, name, C, dtype)
    if residual is not None:
        _check_tensor(residual, "residual")
        if residual.dtype is not input.dtype or residual.shape != input.shape:
            kind = TypeError if residual.dtype is not input.dtype else ValueError
            raise kind(f"bncy.torch: residual must have input's shape {tuple(input.shape)} "
                       f"and dtype {input.dtype}, got {tuple(residual.shape)} and "
                       f"{residual.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bncy.torch: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("bncy.torch: running_mean and running_var are needed when "
                         "training=False")
    if training and running_mean is not None:
        _check_real(momentum, "momentum", 0.0, 1.0)
    if _check_real(eps, "eps", 0.0, math.inf) == 0.0 and training:
        raise ValueError("bncy.torch: eps must be positive when training, as in torch, got "
                         f"{eps!r}")
    return _memory_format(input)


def _eager_format(input, running_mean, running_var, weight, bias, training, eps,
                  residual=None, activation=None):
    """The eager path's check, 1 us: the memory format of a call that bncy can run
    directly and whose arguments follow torch's rules at a glance (a plain float32
    or float64 strided tensor, vectors of its dtype, eps a float and > 0 when
    training, running statistics in eval mode, a residual of its dtype, activation
    None or "relu"), with nothing traced (see _eager);
    None sends the call through _eager and _check. bncy checks the rest (shapes,
    momentum, eps) before it writes anything, and NumPy refuses tensors off the CPU;
    their errors are then replaced by _check's messages."""
    if type(input) is not torch.Tensor or _compiling() or type(eps) is not float \
            or _dispatch_depth() or _transforms_active() or _wrapped(input) \
            or input.layout is not torch.strided or _tracing() is not None \
            or _fwd_ad._current_level >= 0:
        return None
    dtype = input.dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        return None
    for t in (running_mean, running_var, weight, bias, residual):
        if t is not None and not (isinstance(t, torch.Tensor) and t.dtype is dtype):
            return None
    if (training and not eps > 0.0) or (not training and running_mean is None) \
            or not (activation is None or (type(activation) is str and activation == "relu")):
        return None
    return _memory_format(input)


_compiling = torch.compiler.is_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack
_transforms_active = torch._C._are_functorch_transforms_active
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_tracing = torch._C._get_tracing_state   # torch.jit.trace
_fwd_ad = torch.autograd.forward_ad      # its _current_level is -1 outside dual_level()
_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                      torch.fx._symbolic_trace.is_fx_tracing)


def _refuse_transforms(tensors) -> None:
    """NotImplementedError for what the op cannot follow: forward-mode AD (dual
    tensors, torch.func.jvp; their tangents came out None or zero) and
    torch.func's grad transforms (grad, vjp, jacrev, hessian; they failed inside
    torch). Not called while compiling."""
    if _fwd_ad._current_level >= 0 and any(
            isinstance(t, torch.Tensor) and _fwd_ad.unpack_dual(t).tangent is not None
            for t in tensors):
        raise NotImplementedError("bncy.torch: forward-mode AD (torch.autograd.forward_ad) "
                                  "is not supported")
    if _transforms_active():
        kinds = {i.key() for i in torch._C._functorch.get_interpreter_stack() or ()}
        if kinds & {_Transform.Jvp, _Transform.Grad}:
            raise NotImplementedError("bncy.torch: torch.func.grad, vjp, jacrev, jacfwd, jvp "
                                      "and hessian are not supported (torch.autograd.grad "
                                      "and torch.vmap are)")


_Transform = torch._C._functorch.TransformType


# ---------------------------------------------------------------------------
# Layouts: NumPy views of the tensors' memory
# ---------------------------------------------------------------------------

def _memory_format(t) -> torch.memory_format:
    """channels_last (3d) for a 4-D (5-D) tensor laid out that way and not also
    contiguous; else contiguous. Results take this format."""
    fmt = _CHANNELS_LAST.get(t.dim())
    if fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


def _dense_strides(shape, fmt) -> tuple:
    """The strides torch gives a new tensor of this shape in this memory format."""
    n = len(shape)
    order = range(n) if fmt is torch.contiguous_format else (0, *range(2, n), 1)
    strides, step = [0] * n, 1
    for d in reversed(tuple(order)):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def _canonical(t, fmt):
    """t in memory format fmt with torch's own strides for it: a copy only when t's
    memory is not laid out that way (other strides, overlaps). A contiguous tensor
    is returned as is: bncy reads it as C order whatever its size-1 strides."""
    if not t.is_contiguous(memory_format=fmt):
        t = t.contiguous(memory_format=fmt)
    if fmt is torch.contiguous_format:
        return t
    strides = _dense_strides(t.shape, fmt)    # size-1 axes may carry any stride
    return t if t.stride() == strides else t.as_strided(t.shape, strides)


def _np(t):
    """A NumPy view of a CPU tensor's memory (None stays None). ``.data`` rather
    than ``.detach()`` for a tensor that requires grad: the same memory, half the
    cost, and no write goes through it that autograd should see. bfloat16, which
    NumPy does not know, is viewed through its bits as ml_dtypes.bfloat16."""
    if t is None:
        return None
    if t.dtype is torch.bfloat16:
        return t.data.view(torch.int16).numpy().view(_np_bfloat16())
    return t.data.numpy() if t.requires_grad else t.numpy()


def _tensor(a, fmt=torch.contiguous_format):
    """A tensor over a NumPy result of bncy (no copy), in memory format fmt (bncy
    keeps the input's layout; channels_last gets torch's strides on size-1 axes)."""
    if a.dtype.kind == "V":   # bfloat16 (ml_dtypes'); dtype.name is built per call
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    return t if fmt is torch.contiguous_format else _canonical(t, fmt)


def _empty_result(xn, fmt):
    """The result of an empty batch: a new tensor of xn's shape and dtype, with
    torch's strides for memory format fmt."""
    dtype = torch.bfloat16 if xn.dtype.kind == "V" else torch.from_numpy(xn[:0]).dtype
    return torch.empty(xn.shape, dtype=dtype, memory_format=fmt)


_BFLOAT16 = []   # ml_dtypes.bfloat16's NumPy dtype, once imported


def _np_bfloat16() -> np.dtype:
    """ml_dtypes.bfloat16 as a NumPy dtype, imported on first use (only bfloat16
    tensors need it); TypeError naming the package when it is not installed."""
    if not _BFLOAT16:
        try:
            import ml_dtypes
        except ImportError as exc:
            raise TypeError("bncy.torch: torch.bfloat16 tensors need ml_dtypes (NumPy's "
                            "bfloat16): pip install ml_dtypes") from exc
        _BFLOAT16.append(np.dtype(ml_dtypes.bfloat16))
    return _BFLOAT16[0]


def _vector(a, dtype):
    """A (C,) NumPy result of bncy (float32 for 16-bit data, or float64) as a tensor
    of dtype, rounded once to nearest even from float32 for a 16-bit dtype."""
    t = torch.from_numpy(a)
    if dtype in _HALVES and t.dtype is torch.float64:
        t = t.float()
    return t if t.dtype is dtype else t.to(dtype)


def _grad_dtype(input, weight, bias):
    """dweight's and dbias's dtype: the parameters' (float32 for 16-bit input
    without them, bncy's own)."""
    for t in (weight, bias):
        if t is not None:
            return t.dtype
    return torch.float32 if input.dtype in _HALVES else input.dtype


def _widened(a):
    """Running statistics as bncy takes them: 16-bit ones as a float32 copy (exact;
    bncy updates only float32/float64 statistics in place), others as they are."""
    return a if a is None or a.itemsize != 2 else a.astype(np.float32)


def _store(dst, src) -> None:
    """Write an updated float32 copy made by _widened back, rounded to nearest even."""
    if src is not dst:
        dst[...] = src


def _written(running_mean, running_var) -> None:
    """Bump the version of running statistics written through NumPy, as an in-place
    torch op would (autograd then refuses stale saved copies of them)."""
    if running_mean is not None:
        _bump_version((running_mean, running_var))


_bump_version = torch._C._increment_version


def _eval_stats(running_mean, running_var, eps: float):
    """float64 mean and invstd = 1 / sqrt(running_var + eps) of an eval-mode pass."""
    mean = np.array(_np(running_mean), dtype=np.float64)
    invstd = 1.0 / np.sqrt(_np(running_var).astype(np.float64) + eps)
    return mean, invstd


# ---------------------------------------------------------------------------
# The computations, on NumPy views (arguments already checked, x canonical)
# ---------------------------------------------------------------------------

def _forward(xn, rmn, rvn, wn, bn, training, momentum, eps, fmt, rn=None, act=None):
    """(y, mean, invstd) from NumPy views of x, the running statistics, weight, bias
    and residual (or None): y = act(bn(x) + residual) a tensor; in training the batch
    statistics as float64 arrays, with the running statistics updated in place in
    bncy.forward's one call (the caller bumps their version); in eval mode (None,
    None) (see _eval_stats)."""
    nt = torch.get_num_threads()
    rm32, rv32 = _widened(rmn), _widened(rvn)
    if training:
        y, mean, invstd = bncy.forward(xn, wn, bn, eps=eps, axis=1, running_mean=rm32,
                                       running_var=rv32, momentum=momentum, n_threads=nt,
                                       residual=rn, activation=act)
        _store(rmn, rm32)
        _store(rvn, rv32)
        return _tensor(y, fmt), mean, invstd
    if xn.size == 0:
        return _empty_result(xn, fmt), None, None
    y = bncy.inference(xn, rm32, rv32, wn, bn, eps=eps, axis=1, n_threads=nt, residual=rn,
                       activation=act)
    return _tensor(y, fmt), None, None


def _forward_unbiased(xn, wn, bn, eps, fmt, rn=None, act=None):
    """Training forward for the custom op, which may not touch the running
    statistics: (y, mean, invstd, var) with var the unbiased batch variance. One
    bncy.forward call updating float64 scratch statistics, zeros, with momentum 1:
    they receive exactly the mean and the unbiased variance that bncy.forward's own
    update blends in (0 * 0 + 1 * s is s)."""
    mean_s, var_s = np.zeros(xn.shape[1]), np.zeros(xn.shape[1])
    y, mean, invstd = bncy.forward(xn, wn, bn, eps=eps, axis=1, running_mean=mean_s,
                                   running_var=var_s, momentum=1.0,
                                   n_threads=torch.get_num_threads(), residual=rn,
                                   activation=act)
    return _tensor(y, fmt), mean, invstd, var_s


def _update_running(running_mean, running_var, mean, var, momentum: float):
    """r = (1 - momentum) * r + momentum * s in place, with the batch mean and the
    unbiased batch variance var: bncy.apply_stats on an empty part, whose update is
    bncy.forward's. Its m2 / (count - 1) is var itself with count 2."""
    rmn, rvn = _np(running_mean), _np(running_var)
    rm32, rv32 = _widened(rmn), _widened(rvn)
    bncy.apply_stats(np.empty((0, rmn.shape[0]), rm32.dtype), bncy.BatchStats(2, mean, var),
                     running_mean=rm32, running_var=rv32, momentum=momentum)
    _store(rmn, rm32)
    _store(rvn, rv32)
    _written(running_mean, running_var)


def _backward(dy, xn, wn, mean, invstd, training, fmt, gdt, bn=None, rn=None, act=None,
              res=False):
    """(dx, dweight, dbias, dresidual) tensors (dresidual None unless res: the
    forward had a residual), from dy, NumPy views of x, weight, bias and the
    residual (or None; read only for the training ReLU mask) and the float64
    statistics of the forward. Training: bncy's closed form (bncy.backward;
    with act="relu" it recomputes the forward's mask from x, weight, bias and the
    residual). Eval: the gradient of the per-channel affine map, dx = weight *
    invstd * dy, dweight = sum(dy * (x - mean)) * invstd, dbias = sum(dy), with dy
    already masked by the caller for an activation. The residual's gradient is dy
    (masked with an activation). dweight and dbias come in dtype gdt."""
    dyn, nt = _np(_canonical(dy, fmt)), torch.get_num_threads()
    if xn.size == 0:   # an empty batch (a copy: the custom op may not return grad_out)
        dres = None if not res else dy if act is None else dy.clone()
        return torch.empty_like(dy, memory_format=fmt), torch.zeros(xn.shape[1], dtype=gdt), \
            torch.zeros(xn.shape[1], dtype=gdt), dres
    if training:
        r = bncy.backward(dyn, xn, mean, invstd, wn, axis=1, n_threads=nt, beta=bn,
                          residual=rn if act else None, activation=act)
        dres = None if not res else dy if act is None else _tensor(r[3], fmt)
        return _tensor(r[0], fmt), _vector(r[1], gdt), _vector(r[2], gdt), dres
    dres = dy if res else None
    sums = bncy.grad_stats(dyn, xn, mean, axis=1, n_threads=nt)
    scale = invstd if wn is None else wn.astype(np.float64) * invstd
    zeros = np.zeros_like(invstd)
    # scale * dy rounded once: inference with mean 0, variance 0 and eps 1 (invstd 1)
    dx = bncy.inference(dyn, zeros, zeros, scale, None, eps=1.0, axis=1, n_threads=nt)
    return _tensor(dx, fmt), _vector(sums.sum_dy_xc * invstd, gdt), \
        _vector(np.asarray(sums.sum_dy, np.float64), gdt), dres


def _empty_batch(input, weight, bias, residual, activation, fmt):
    """A training call on an empty batch, as torch answers it: an empty result of
    input's shape, differentiable (the gradients of weight and bias are zeros),
    and the running statistics left as they are."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    y = input.clone(memory_format=fmt)
    if weight is not None:   # (float32 parameters of 16-bit input: input's dtype)
        y = y * weight.view(shape).to(input.dtype)
    if bias is not None:
        y = y + bias.view(shape).to(input.dtype)
    if residual is not None:
        y = y + residual
    if activation is not None:
        y = torch.relu(y)
    return y.contiguous(memory_format=fmt)


def _relu_masked(dy, y):
    """dy where the output y > 0, else 0 (torch's ReLU gradient), a new tensor."""
    return torch.where(y > 0, dy, 0.0)


# ---------------------------------------------------------------------------
# The eager path: bncy on NumPy views, autograd through a Function
# ---------------------------------------------------------------------------

class _BatchNormFunction(torch.autograd.Function):
    """batch_norm in eager mode, called through _apply. The backward's tensors go
    through save_for_backward (input, weight; bias and the residual for the
    training ReLU mask; the output for the eval ReLU mask), so that autograd
    checks their versions and saved-tensor hooks (activation checkpointing,
    save_on_cpu) see them; ctx.state holds the float64 statistics and flags. The
    arguments that take no gradient travel in one tuple: every tensor argument
    of a Function costs time."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, rest):
        running_mean, running_var, training, momentum, eps, fmt, act = rest
        y, mean, invstd = _forward(_np(_canonical(input, fmt)), _np(running_mean),
                                   _np(running_var), _np(weight), _np(bias), training,
                                   momentum, eps, fmt, _np(residual), act)
        if not training:
            mean, invstd = _eval_stats(running_mean, running_var, eps)
        elif running_mean is not None:
            _bump_version((running_mean, running_var))
        mask = training and act is not None   # recomputed from bias and the residual too
        ctx.save_for_backward(input, weight, bias if mask else None,
                              residual if mask else None,
                              y if act is not None and not training else None)
        ctx.state = (mean, invstd, training, fmt, act, residual is not None,
                     _grad_dtype(input, weight, bias))
        return y

    @staticmethod
    def backward(ctx, dy):
        if _grad_enabled():   # create_graph=True
            input, weight, bias, residual, _ = ctx.saved_tensors
            return _FirstDerivatives.apply(_function_backward, ctx, dy, input, weight, bias,
                                           residual)
        return _function_backward(ctx, dy)


def _function_backward(ctx, dy):
    input, weight, bias, residual, y = ctx.saved_tensors
    mean, invstd, training, fmt, act, has_residual, gdt = ctx.state
    if act is not None and not training:
        dy = _relu_masked(dy, y)
    dx, dw, db, dres = _backward(dy, _np(_canonical(input, fmt)), _np(weight), mean, invstd,
                                 training, fmt, gdt, _np(bias), _np(residual), act,
                                 has_residual)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
            dres if need[3] else None, None)


class _FirstDerivatives(torch.autograd.Function):
    """The first derivatives under create_graph=True, fn(fctx, dy), as the outputs
    of a node with an edge to every tensor they depend on (dy and the forward's
    inputs), whose backward raises: a second derivative through them reaches it
    whatever torch.autograd.grad's inputs are. (once_differentiable's error node
    has no edges, so grad(..., inputs=...) did not reach it and silently left
    the second-order term out.)"""

    @staticmethod
    def forward(ctx, fn, fctx, dy, *inputs):
        # an output that is dy itself (the residual's gradient) becomes a copy
        return tuple(t.clone() if t is dy else t for t in fn(fctx, dy))

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_TWICE)


_TWICE = ("bncy.torch: trying to differentiate twice: the gradient of batch_norm is "
          "bncy's closed form, computed outside autograd; create_graph=True gives the "
          "first derivative only")

# Function.apply without its Python wrapper (8 us), which routes functorch
# transforms and binds the defaults of a setup_context: _eager_format sends every
# call under a transform elsewhere, and the Function has no setup_context.
_apply = super(torch.autograd.Function, _BatchNormFunction).apply
_grad_enabled = torch.is_grad_enabled


def _eager(input) -> bool:
    """Whether bncy can run directly on this call's tensors: a plain tensor, no
    compilation, no dispatch mode (FakeTensorMode, make_fx) and no functorch
    transform. Tensor subclasses and anything traced go through the custom ops;
    a non-tensor stays here, to be refused by _check."""
    if type(input) is not torch.Tensor:
        return not isinstance(input, torch.Tensor)
    return not (_compiling() or _dispatch_depth() or _transforms_active()
                or _wrapped(input) or _tracing() is not None)


# ---------------------------------------------------------------------------
# The custom ops (torch.compile, export, FakeTensor tracing)
# ---------------------------------------------------------------------------

@torch.library.custom_op(
    "bncy::batch_norm", mutates_args=(),
    schema="(Tensor input, Tensor? running_mean, Tensor? running_var, Tensor? weight, "
           "Tensor? bias, bool training, float eps, Tensor? residual=None, "
           "str? activation=None) -> (Tensor, Tensor, Tensor, Tensor)")
def _op_batch_norm(input, running_mean, running_var, weight, bias, training, eps,
                   residual=None, activation=None):
    """(y, mean, invstd, var), y = activation(bn(input) + residual): training uses
    the batch statistics and leaves the running ones alone
    (bncy::update_running_stats updates them with mean and var, the unbiased batch
    variance); eval uses the running statistics (mean and invstd their float64
    form, var zeros)."""
    fmt = _check(input, running_mean, running_var, weight, bias, training, 0.0, eps,
                 residual=residual, activation=activation)
    xn, rn = _np(_canonical(input, fmt)), _np(residual)
    if training and xn.size == 0:   # torch's empty batch (_batch_norm_ops skips the update)
        zeros = np.zeros(xn.shape[1])
        return (_empty_result(xn, fmt), *(torch.from_numpy(zeros.copy()) for _ in range(3)))
    if training:
        y, mean, invstd, var = _forward_unbiased(xn, _np(weight), _np(bias), eps, fmt, rn,
                                                 activation)
    else:
        y = _forward(xn, _np(running_mean), _np(running_var), _np(weight), _np(bias),
                     False, 0.0, eps, fmt, rn, activation)[0]
        mean, invstd = _eval_stats(running_mean, running_var, eps)
        var = np.zeros_like(mean)
    return y, torch.from_numpy(mean), torch.from_numpy(invstd), torch.from_numpy(var)


@_op_batch_norm.register_fake
def _(input, running_mean, running_var, weight, bias, training, eps, residual=None,
      activation=None):
    C = input.shape[1]
    y = torch.empty_like(input, memory_format=_memory_format(input))
    return (y, *(input.new_empty((C,), dtype=torch.float64) for _ in range(3)))


@torch.library.custom_op(
    "bncy::batch_norm_backward", mutates_args=(),
    schema="(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
           "bool training, Tensor? bias=None, Tensor? residual=None, "
           "str? activation=None) -> (Tensor, Tensor, Tensor, Tensor)")
def _op_batch_norm_backward(grad_out, input, weight, mean, invstd, training, bias=None,
                            residual=None, activation=None):
    """(dx, dweight, dbias, dresidual) of bncy::batch_norm; dweight and dbias also
    without weight. activation: training only (an eval-mode caller masks grad_out
    itself); dresidual is the residual's gradient when bncy computes it (training
    with an activation and a residual), else empty."""
    fmt = _memory_format(input)
    rn = _np(residual) if training and activation else None
    dx, dw, db, dres = _backward(grad_out, _np(_canonical(input, fmt)), _np(weight),
                                 mean.numpy(), invstd.numpy(), training, fmt,
                                 _grad_dtype(input, weight, bias), _np(bias), rn,
                                 activation if training else None, rn is not None)
    return dx, dw, db, grad_out.new_empty((0,)) if rn is None else dres


@_op_batch_norm_backward.register_fake
def _(grad_out, input, weight, mean, invstd, training, bias=None, residual=None,
      activation=None):
    C, fmt = input.shape[1], _memory_format(input)
    dx = torch.empty_like(input, memory_format=fmt)
    dres = grad_out.new_empty((0,)) if not (training and activation and residual is not None) \
        else torch.empty_like(input, memory_format=fmt)
    gdt = _grad_dtype(input, weight, bias)
    return dx, input.new_empty((C,), dtype=gdt), input.new_empty((C,), dtype=gdt), dres


def _setup_context(ctx, inputs, output):
    input, _, _, weight, bias, training, _, residual, activation = inputs
    y, mean, invstd, var = output
    # eval with an activation: the backward masks dy with the output
    ctx.save_for_backward(input, weight, bias, residual, mean, invstd,
                          y if activation and not training else None)
    ctx.training, ctx.activation = training, activation
    ctx.given = weight is not None, bias is not None, residual is not None
    ctx.mark_non_differentiable(mean, invstd, var)


def _op_backward(ctx, dy, _dmean, _dinvstd, _dvar):
    input, weight, bias, residual, mean, invstd, y = ctx.saved_tensors
    act = ctx.activation
    if act is not None and not ctx.training:
        dy, act = _relu_masked(dy, y), None
    dx, dw, db, dres = torch.ops.bncy.batch_norm_backward(dy, input, weight, mean, invstd,
                                                          ctx.training, bias, residual, act)
    if act is None:
        dres = dy
    has_weight, has_bias, has_residual = ctx.given
    return (dx, None, None, dw if has_weight else None, db if has_bias else None, None, None,
            dres if has_residual else None, None)


_op_batch_norm.register_autograd(_op_backward, setup_context=_setup_context)


def _op_backward_twice(ctx, *grads):
    """bncy::batch_norm_backward's own backward: there is none (create_graph=True
    gives the first derivative only), and asking for it raises rather than
    leaving the term out."""
    raise RuntimeError(_TWICE)


_op_batch_norm_backward.register_autograd(_op_backward_twice)


@torch.library.custom_op(
    "bncy::update_running_stats", mutates_args=("running_mean", "running_var"),
    schema="(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
           "float momentum, Tensor? batch=None) -> ()")
def _op_update_running_stats(running_mean, running_var, mean, var, momentum, batch=None):
    """r = (1 - momentum) * r + momentum * s, with the batch mean and the unbiased
    batch variance var (float64), as bncy.forward updates them; nothing when batch
    (the input) is empty, as torch leaves them (checked here, when the op runs:
    a traced graph does not bake the first batch's size in)."""
    _check_tensor(running_mean, "running_mean")
    if running_mean.dim() != 1:
        raise ValueError(f"bncy.torch: running_mean must be 1-D, got shape "
                         f"{tuple(running_mean.shape)}")
    C = running_mean.shape[0]
    _check_vector(running_var, "running_var", C, running_mean.dtype)
    _check_vector(mean, "mean", C, torch.float64)
    _check_vector(var, "var", C, torch.float64)
    _check_real(momentum, "momentum", 0.0, 1.0)
    if batch is None or batch.numel() > 0:
        _update_running(running_mean, running_var, mean.numpy(), var.numpy(), momentum)


@_op_update_running_stats.register_fake
def _(running_mean, running_var, mean, var, momentum, batch=None):
    return None


def _batch_norm_ops(input, running_mean, running_var, weight, bias, training, momentum,
                    eps, residual, activation):
    """batch_norm through the custom ops (traceable, no graph break). The running
    statistics go to bncy::batch_norm in training too, to be checked there."""
    y, mean, _, var = torch.ops.bncy.batch_norm(input, running_mean, running_var, weight,
                                                bias, bool(training), eps, residual,
                                                activation)
    # an empty batch leaves them; under torch.jit.trace the op itself checks, so
    # that the graph does not keep the traced batch's size
    if training and running_mean is not None and running_var is not None \
            and (_tracing() is not None or input.numel() > 0):
        torch.ops.bncy.update_running_stats(running_mean, running_var, mean, var, momentum,
                                            input)
    return y


# ---------------------------------------------------------------------------
# The functional interface
# ---------------------------------------------------------------------------

@torch.fx.wrap   # a leaf of torch.fx.symbolic_trace, as torch's batch norm is
def batch_norm(input, running_mean, running_var, weight=None, bias=None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               residual=None, activation: str | None = None):
    """Batch normalization over dimension 1, ``torch.nn.functional.batch_norm``'s
    signature and semantics, computed by bncy; optionally fused with a residual
    add and a ReLU: ``activation(batch_norm(input, ...) + residual)`` in one pass.

    Parameters
    ----------
    input : Tensor of shape (N, C, ...), float32, float64, float16 or bfloat16, on the CPU
        Contiguous and channels_last (3d) tensors are read in place; other
        strides are copied first. The result has input's memory format
        (channels_last stays channels_last).
    running_mean, running_var : Tensor of shape (C,) or None
        Both or neither. Used when ``training`` is False; updated in place when
        it is True: ``r = (1 - momentum) * r + momentum * s`` with the batch mean
        and the unbiased batch variance (16-bit ones through a float32 copy,
        rounded back to nearest even).
    weight, bias : Tensor of shape (C,), optional
        Per-channel scale and shift; None means 1 and 0. They and the running
        statistics share one dtype: input's, or float32 for a float16/bfloat16
        input (torch's CPU mixed precision).
    training : bool, default False
        Normalise with the batch statistics (True) or the running ones.
    momentum : float, default 0.1
        In [0, 1].
    eps : float, default 1e-5
        Finite and > 0 (>= 0 in eval mode), as in torch.
    residual : Tensor, optional
        Of input's shape and dtype (any strides), added to the normalized result;
        differentiable.
    activation : None or "relu", default None
        Applied last; its gradient is torch's (dy where the output is > 0).

    Returns
    -------
    Tensor
        Of input's shape, dtype and memory format; differentiable with respect to
        input, weight and bias (bncy's closed-form backward; not twice); the
        gradients of weight and bias have weight's dtype.

    Raises
    ------
    TypeError
        A dtype other than float32/float64/float16/bfloat16 or a mix torch
        refuses, bfloat16 without ml_dtypes installed, a tensor not on the CPU
        or not dense, an argument of the wrong kind.
    ValueError
        A wrong shape (the residual's included), fewer than 2 values per
        channel when training, missing running statistics in eval mode,
        momentum or eps out of range, an activation other than None and
        "relu". Nothing is written when an exception is raised.
    NotImplementedError
        Forward-mode AD (dual tensors, ``torch.func.jvp``) and ``torch.func``'s
        grad transforms. A second derivative through the result raises
        RuntimeError when it is asked for.

    Notes
    -----
    Statistics are accumulated in float64 and the results are bitwise identical
    for every ``torch.set_num_threads`` (bncy uses torch's thread count). In
    eager mode bncy is called directly; under ``torch.compile`` the call goes
    through the ``bncy::batch_norm`` and ``bncy::update_running_stats`` custom
    ops, with the same bits.
    """
    fmt = _eager_format(input, running_mean, running_var, weight, bias, training, eps,
                        residual, activation)
    if fmt is None:
        if not _compiling():
            _refuse_transforms((input, weight, bias, residual, running_mean, running_var))
        if not _eager(input):
            return _batch_norm_ops(input, running_mean, running_var, weight, bias, training,
                                   momentum, eps, residual, activation)
        fmt = _check(input, running_mean, running_var, weight, bias, training, momentum, eps,
                     residual=residual, activation=activation)
    training = bool(training)
    try:
        if _grad_enabled() and (input.requires_grad
                                or (weight is not None and weight.requires_grad)
                                or (bias is not None and bias.requires_grad)
                                or (residual is not None and residual.requires_grad)):
            return _apply(input, weight, bias, residual, (running_mean, running_var, training,
                                                          momentum, eps, fmt, activation))
        y = _forward(_np(_canonical(input, fmt)), _np(running_mean), _np(running_var),
                     _np(weight), _np(bias), training, momentum, eps, fmt, _np(residual),
                     activation)[0]
    except (TypeError, ValueError):
        # the precise message when an argument is at fault, else bncy's
        _check(input, running_mean, running_var, weight, bias, training, momentum, eps,
               residual=residual, activation=activation)
        if training and input.numel() == 0:
            return _empty_batch(input, weight, bias, residual, activation, fmt)
        raise
    if training:
        _written(running_mean, running_var)
    return y


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------

class _BncyForward:
    """The forward of torch's _BatchNorm, calling :func:`batch_norm`, with an
    optional fused activation (constructor keyword ``activation=None|"relu"``)
    and residual (``forward(input, residual=None)``)."""

    activation = None   # the class default: the modules made by convert() have none

    def __init__(self, *args, activation: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_activation(activation)
        if activation is not None:
            self.activation = activation

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.activation is None else f"{s}, activation={self.activation!r}"

    def _arguments(self):
        """(running_mean, running_var, use_batch_stats), torch's rules: batch
        statistics in training mode and when there are no running ones; running
        statistics passed when they are used or tracked."""
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        if self.training and not self.track_running_stats:
            return None, None, use_batch
        return self.running_mean, self.running_var, use_batch

    def forward(self, input, residual=None):
        if isinstance(input, torch.Tensor):   # else batch_norm's TypeError
            self._check_input_dim(input)
        elif self.training and self.track_running_stats and _fx_tracing():
            raise NotImplementedError(
                "bncy.torch: torch.fx.symbolic_trace of a bncy batch norm in training mode "
                "with running statistics is not supported (the traced graph would not count "
                "num_batches_tracked); trace it in eval mode")
        running_mean, running_var, use_batch = self._arguments()
        return self._counted(lambda factor: batch_norm(
            input, running_mean, running_var, self.weight, self.bias, use_batch, factor,
            self.eps, residual=residual, activation=self.activation))

    def _counted(self, run):
        """run(factor) of a pass, with num_batches_tracked += 1 first in training,
        as torch counts: a forward that torch.utils.checkpoint re-runs (stopping
        once the saved tensors are packed) counts again, as torch's does. factor:
        ``momentum``, or with momentum=None the cumulative average's 1 / (batches
        tracked, this one included). Bad input takes the count back."""
        counted = (self.training and self.track_running_stats
                   and self.num_batches_tracked is not None)
        if counted:
            self.num_batches_tracked.add_(1)
        factor = self.momentum
        if factor is None:
            factor = 1.0 / float(self.num_batches_tracked) if counted else 0.0
        try:
            return run(factor)
        except (TypeError, ValueError, NotImplementedError):
            if counted:
                self.num_batches_tracked.sub_(1)
            raise


class BatchNorm1d(_BncyForward, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by bncy: same constructor, attributes and
    ``state_dict``; (N, C) or (N, C, L) CPU input (float32, float64, float16 or
    bfloat16). Also
    ``activation="relu"`` and ``forward(input, residual)``: ``relu(bn(input) +
    residual)`` in one pass (the same in BatchNorm2d and BatchNorm3d)."""


class BatchNorm2d(_BncyForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by bncy: same constructor, attributes and
    ``state_dict``; (N, C, H, W) CPU input of a float dtype, contiguous or
    channels_last (read in place, result in the same format)."""


class BatchNorm3d(_BncyForward, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by bncy: same constructor, attributes and
    ``state_dict``; (N, C, D, H, W) CPU input of a float dtype, contiguous or
    channels_last_3d."""


_DROP_IN = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
            nn.BatchNorm3d: BatchNorm3d}


def _check_on_cpu(modules) -> None:
    """TypeError naming the first module with a parameter or buffer off the CPU."""
    for name, m in modules:
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if not t.is_cpu:
                raise TypeError(f"bncy.torch: {name or 'the model'} ({type(m).__name__}) "
                                f"holds tensors on {t.device}; bncy runs on the CPU only")


def _swap(model, classes: dict, **attributes):
    """Change the class of every submodule whose exact type is a key of classes (the
    model too), after checking them all, as torch's lazy modules become their
    concrete class: parameters, buffers, hooks and mode stay the same objects."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"bncy.torch: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    targets = [(n, m) for n, m in model.named_modules() if type(m) in classes]
    _check_on_cpu(targets)
    for name, m in targets:
        if classes is _TO_SYNC and getattr(m, "activation", None) is not None:
            raise ValueError(f"bncy.torch: {name or 'the model'} has activation="
                             f"{m.activation!r}; SyncBatchNorm fuses none")
    for _, m in targets:
        m.__class__ = classes[type(m)]
        m.__dict__.update(attributes)
    return model


def convert(model: nn.Module) -> nn.Module:
    """Make every ``nn.BatchNorm1d/2d/3d`` of a model compute with bncy, in place.

    Each such module (exactly those types: subclasses, ``SyncBatchNorm`` and lazy
    modules not yet initialised are left alone) becomes the bncy module of the
    same dimension. It keeps its parameters, buffers, hooks and mode: the very
    same tensors, so an optimizer built before the conversion still updates them.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        model itself.

    Raises
    ------
    TypeError
        If model is not a Module, or a batch norm module holds a tensor that is not
        on the CPU (nothing is converted then).
    """
    return _swap(model, _DROP_IN)


# ---------------------------------------------------------------------------
# Synchronized batch norm over torch.distributed
# ---------------------------------------------------------------------------

_ERRORS = (None, TypeError, ValueError, RuntimeError)   # kind 0 is "ok"
_HEAD = 4                                  # int64 header: kind, dtype, count, message length
_MESSAGE_BYTES = 512


def _pack(kind: int, dtype_code: int, count: int, rows, nrows: int, C: int,
          message: str = ""):
    """One rank's message for an all_gather: a uint8 tensor of the same size on every
    rank (an int64 header, nrows float64 vectors of C values, an error message)."""
    buf = np.zeros(8 * _HEAD + 8 * nrows * C + _MESSAGE_BYTES, np.uint8)
    text = message.encode()[:_MESSAGE_BYTES]
    buf[:8 * _HEAD].view(np.int64)[:] = (kind, dtype_code, count, len(text))
    if kind == 0:
        buf[8 * _HEAD:8 * _HEAD + 8 * nrows * C].view(np.float64)[:] = np.concatenate(rows)
    buf[len(buf) - _MESSAGE_BYTES:][:len(text)] = np.frombuffer(text, np.uint8)
    return torch.from_numpy(buf)


def _unpack(t, nrows: int, C: int):
    """(kind, dtype_code, count, rows, message) of a gathered message."""
    buf = t.numpy()
    kind, dtype_code, count, n = (int(v) for v in buf[:8 * _HEAD].view(np.int64))
    rows = buf[8 * _HEAD:8 * _HEAD + 8 * nrows * C].view(np.float64).reshape(nrows, C)
    message = bytes(buf[len(buf) - _MESSAGE_BYTES:][:n]).decode(errors="replace")
    return kind, dtype_code, count, rows, message


def _exchange(group, C: int, nrows: int, local):
    """All-gather every rank's (dtype_code, count, rows) or error in one collective.

    local is ("ok", dtype_code, count, rows) or ("error", exception). Returns the
    parts in rank order; raises the first rank's error (or a dtype disagreement)
    on every rank, so that no rank is left waiting in a later collective.
    """
    if local[0] == "ok":
        mine = _pack(0, local[1], local[2], local[3], nrows, C)
    else:
        exc = local[1]
        text = str(exc).removeprefix("bncy.torch: ").removeprefix("bncy: ")
        kind = 1 if isinstance(exc, TypeError) else 2 if isinstance(exc, ValueError) else 3
        mine = _pack(kind, 0, 0, None, nrows, C,
                     text if kind < 3 else f"{type(exc).__name__}: {text}")
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    parts = [_unpack(t, nrows, C) for t in gathered]
    for rank, (kind, _, _, _, message) in enumerate(parts):
        if kind != 0:
            raise _ERRORS[kind](f"bncy.torch.SyncBatchNorm: rank {rank}: {message}")
    codes = [p[1] for p in parts]
    if len(set(codes)) > 1:
        names = [str(_DTYPES[c]) for c in codes]
        raise TypeError(f"bncy.torch.SyncBatchNorm: ranks disagree on the dtype: {names}")
    return [(count, rows) for _, _, count, rows, _ in parts]


def _guarded(step):
    """("ok", *step()) or ("error", exc) for an error of any kind in a local step,
    so that it travels in the exchange instead of leaving this rank alone (other
    kinds than TypeError and ValueError come back as RuntimeError naming them)."""
    try:
        return ("ok", *step())
    except Exception as exc:  # noqa: BLE001 - every error goes to every rank
        return ("error", exc)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with the statistics of every rank of a group.

    Forward: bncy.batch_stats of the local part, one all_gather of every rank's
    (count, mean, M2, the mean's low part) or error, bncy.merge_stats in rank
    order, bncy.apply_stats.
    Backward: bncy.grad_stats, one all_gather of the two sums, bncy.merge_grad_stats
    in rank order, bncy.apply_grad. dweight and dbias are this rank's part (sums
    over its rows, about the whole batch's statistics), as torch's SyncBatchNorm
    returns them: DistributedDataParallel's gradient all-reduce completes them.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group,
                C):
        def local():
            fmt = _check(input, running_mean, running_var, weight, bias, True, momentum, eps,
                         channels=C)
            x = _canonical(input, fmt)
            return x, fmt, bncy.batch_stats(_np(x), axis=1, n_threads=torch.get_num_threads())

        status = _guarded(local)
        if status[0] == "ok":
            _, x, ctx.fmt, part = status
            status = ("ok", _DTYPES.index(x.dtype), part.count,
                      (part.mean, part.m2, part.mean_lo))
        parts = _exchange(group, C, 3, status)
        total = bncy.merge_stats([bncy.BatchStats(n, *rows) for n, rows in parts])
        if total.count < 2:
            raise ValueError("bncy.torch.SyncBatchNorm: expected more than 1 value per "
                             f"channel when training, got {total.count} over all ranks")
        rmn, rvn = _np(running_mean), _np(running_var)
        rm32, rv32 = _widened(rmn), _widened(rvn)
        y, ctx.mean, ctx.invstd = bncy.apply_stats(
            _np(x), total, _np(weight), _np(bias), eps=eps, axis=1, running_mean=rm32,
            running_var=rv32, momentum=momentum, n_threads=torch.get_num_threads())
        _store(rmn, rm32)
        _store(rvn, rv32)
        _written(running_mean, running_var)
        ctx.count, ctx.group, ctx.C = total.count, group, C
        ctx.gdt = _grad_dtype(input, weight, bias)
        ctx.save_for_backward(input, weight)   # x again in the backward
        return _tensor(y, ctx.fmt)

    @staticmethod
    def backward(ctx, dy):
        if _grad_enabled():   # create_graph=True
            return _FirstDerivatives.apply(_sync_backward, ctx, dy, *ctx.saved_tensors)
        return _sync_backward(ctx, dy)


def _sync_backward(ctx, dy):
    """_SyncBatchNormFunction's backward: dx from the sums of every rank."""
    input, weight = ctx.saved_tensors
    x = _canonical(input, ctx.fmt)
    nt = torch.get_num_threads()
    dyn, xn = _np(_canonical(dy, ctx.fmt)), _np(x)

    def local():
        sums = bncy.grad_stats(dyn, xn, ctx.mean, axis=1, n_threads=nt)
        return _DTYPES.index(x.dtype), 0, (sums.sum_dy, sums.sum_dy_xc)

    status = _guarded(local)
    need = ctx.needs_input_grad
    dx = None
    if need[0]:     # the same graph on every rank, so every rank takes part
        parts = _exchange(ctx.group, ctx.C, 2, status)
        total = bncy.merge_grad_stats([bncy.GradStats(*rows) for _, rows in parts])
        dxn, _, _ = bncy.apply_grad(dyn, xn, ctx.mean, ctx.invstd, total, ctx.count,
                                    _np(weight), axis=1, n_threads=nt)
        dx = _tensor(dxn, ctx.fmt)
    elif status[0] == "error":
        raise status[1]
    sum_dy, sum_dy_xc = status[3]
    dw = _vector(sum_dy_xc * ctx.invstd, ctx.gdt)
    db = _vector(np.asarray(sum_dy, np.float64), ctx.gdt)
    return (dx, dw if need[1] else None, db if need[2] else None,
            None, None, None, None, None, None)


def _sync_group(process_group):
    """The group to synchronize over, or None when there is nothing to synchronize
    with (torch.distributed not initialized, or a group of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class SyncBatchNorm(_BncyForward, nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` for CPU tensors, computed by bncy.

    Same constructor (``process_group`` included), attributes and ``state_dict``
    as torch's. In training mode the statistics (and the backward's sums) span
    the batches of every rank of ``process_group`` (default: the whole world):
    one ``all_gather`` per phase, merged in rank order, so every rank has the
    same bits, for any thread count. Ranks may hold different numbers of rows,
    zero included. A bad input on any rank raises the same exception on every
    rank. Eval mode, or no initialized process group of more than one rank,
    is plain :func:`batch_norm`. Every rank must call it together in training.

    Not a subclass of ``torch.nn.SyncBatchNorm``, which DistributedDataParallel
    refuses in a CPU model; ``isinstance(m, torch.nn.modules.batchnorm._BatchNorm)``
    holds, as for torch's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias)
        self.process_group = process_group
        _prepare_sync()

    def _check_input_dim(self, input) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        group = _sync_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(input)
        # every check runs inside the first exchange, so a bad input raises on all ranks
        running_mean, running_var, _ = self._arguments()
        return self._counted(lambda factor: (_sync_call or _sync_batch_norm)(
            input, self.weight, self.bias, running_mean, running_var, factor, self.eps,
            group, self.num_features))


def _sync_batch_norm(*args):
    return _SyncBatchNormFunction.apply(*args)


_sync_call = None   # _sync_batch_norm behind torch.compiler.disable, once a module exists


def _prepare_sync() -> None:
    """Wrap the synchronized pass in torch.compiler.disable (collectives and NumPy
    calls run eagerly under torch.compile). Done when a SyncBatchNorm is made, not
    at import: the wrapper imports torch._dynamo (1.5 s)."""
    global _sync_call
    if _sync_call is None:
        _sync_call = torch.compiler.disable(_sync_batch_norm)


_TO_SYNC = {cls: SyncBatchNorm for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                           nn.SyncBatchNorm, BatchNorm1d, BatchNorm2d,
                                           BatchNorm3d, SyncBatchNorm)}


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Make every batch norm module of a model a :class:`SyncBatchNorm`, in place.

    :func:`convert` (the same result and errors) for modules of exactly the types
    ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and bncy's own, whose ranks
    share statistics over ``process_group`` (a ``torch.distributed``
    ProcessGroup; None means the whole world). A ValueError, and nothing
    converted, for a bncy module with an activation.
    """
    _prepare_sync()
    return _swap(model, _TO_SYNC, process_group=process_group)
