"""bncy.BatchNorm: a batch-normalization layer for neural networks written in NumPy."""

from __future__ import annotations

import operator

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bncy import _api

__all__ = ["BatchNorm"]


class BatchNorm:
    """Batch normalization over a channel axis, with its backward pass.

    Numbers match ``torch.nn.BatchNorm1d``/``2d``/``3d`` (momentum, unbiased
    running variance, eps) in training and in eval mode.

    Parameters
    ----------
    num_features : int
        C, the number of channels (the length of ``axis``).
    eps : float, default 1e-5
        Added to the variance; finite and >= 0.
    momentum : float, default 0.1
        Weight of the batch statistics in the running statistics, in [0, 1].
    affine : bool, default True
        Learnable ``gamma`` (ones) and ``beta`` (zeros); None when False.
    axis : int, default 1
        The channel axis of the inputs (1 for (N, C) and NCHW, -1 for NHWC).
    dtype : float32 or float64, default float32
        dtype of gamma, beta and the running statistics. The inputs may be
        float32, float64, float16 or bfloat16 whatever it is (a float32 layer on
        16-bit activations is mixed precision's usual arrangement).
    n_threads : int, optional
        OpenMP threads for every call; None uses OpenMP's default.
    activation : None or "relu", default None
        Fused after the normalisation (and the residual given to :meth:`forward`),
        in the same pass; the backward recomputes ReLU's mask from x.
    comm : mpi4py communicator, optional
        Synchronized batch norm: training statistics (and the gradient's sums) span
        the batches of every rank of ``comm`` (see :mod:`bncy.distributed`); every
        rank must call forward/backward together. Eval mode stays local.

    Attributes
    ----------
    gamma, beta : ndarray of shape (C,) or None
    running_mean, running_var : ndarray of shape (C,)
    dgamma, dbeta : ndarray of shape (C,) or None
        Set by :meth:`backward` (also when ``affine=False``: they are the
        gradients with respect to the implicit scale 1 and shift 0).
    num_batches_tracked : int
        Training-mode forward passes so far.
    training : bool
        Mode: :meth:`train` and :meth:`eval` switch it.

    Between :meth:`forward` and :meth:`backward` the layer keeps a reference to x
    and 2·C statistics, nothing of x's size.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, axis: int = 1, dtype=np.float32,
                 n_threads: int | None = None, comm=None, activation: str | None = None,
                 ) -> None:
        try:
            C = operator.index(num_features)
        except TypeError:
            raise TypeError("bncy: num_features must be an integer") from None
        if C < 1:
            raise ValueError(f"bncy: num_features must be >= 1, got {C}")
        dt = np.dtype(dtype)
        if dt not in _api._FLOATS:
            raise TypeError(f"bncy: dtype {dt} is not supported; use float32 or float64")
        self.eps = _api._check_eps(eps)
        _api._check_activation(activation)
        self.activation = activation
        m = _api._check_real(momentum, "momentum")
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"bncy: momentum must be in [0, 1], got {momentum!r}")
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise TypeError("bncy: axis must be an integer")
        if n_threads is not None:
            _api._resolve_threads(n_threads, 0)
        if comm is not None:
            from bncy import distributed

            comm = distributed._require_comm(comm)
        self.comm = comm
        self.num_features = C
        self.momentum = m
        self.affine = bool(affine)
        self.axis = int(axis)
        self.dtype = dt
        self.n_threads = n_threads
        self.gamma = np.ones(C, dt) if self.affine else None
        self.beta = np.zeros(C, dt) if self.affine else None
        self.running_mean = np.zeros(C, dt)
        self.running_var = np.ones(C, dt)
        self.dgamma: NDArray | None = None
        self.dbeta: NDArray | None = None
        self.num_batches_tracked = 0
        self.training = True
        self._saved = None  # (x, mean, invstd, batch_stats, residual) of the last forward

    # -- modes ---------------------------------------------------------------
    def train(self, mode: bool = True) -> BatchNorm:
        """Training mode (batch statistics, running statistics updated); returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Eval mode (running statistics, nothing updated); returns self."""
        return self.train(False)

    # -- passes --------------------------------------------------------------
    def _fail_everywhere(self, exc: Exception, batch_stats: bool) -> None:
        """A synchronized training pass: the other ranks wait in its exchange, so
        this rank's error is raised on every rank through it (else the caller
        raises it here alone)."""
        if batch_stats and self.comm is not None:
            from bncy import distributed

            distributed._fail(self.comm, exc)

    def _check_input(self, x) -> np.ndarray:
        x = _api._check_x(x, allow_empty=self.comm is not None)
        ax = _api._check_axis(self.axis, x.ndim)
        if x.shape[ax] != self.num_features:
            raise ValueError(f"bncy: expected {self.num_features} channels on axis "
                             f"{self.axis}, got input of shape {x.shape}")
        return x

    def forward(self, x: ArrayLike, residual: ArrayLike | None = None) -> NDArray:
        """Normalise x: batch statistics in training mode, running ones in eval mode;
        then add the residual (x's shape and dtype) and apply the activation.

        Returns y of x's shape and dtype. The layer keeps references to x and the
        residual (which the caller holds anyway), nothing of x's size besides.
        """
        try:
            x = self._check_input(x)
            residual = _api._check_residual(residual, x)
        except Exception as exc:
            self._fail_everywhere(exc, self.training)
            raise
        fused = {"residual": residual, "activation": self.activation}
        if self.training:
            if self.comm is None:
                fwd, extra = _api.forward, {}
            else:
                from bncy import distributed

                fwd, extra = distributed.forward, {"comm": self.comm}
            y, mean, invstd = fwd(
                x, self.gamma, self.beta, eps=self.eps, axis=self.axis,
                running_mean=self.running_mean, running_var=self.running_var,
                momentum=self.momentum, n_threads=self.n_threads, **extra, **fused)
            self.num_batches_tracked += 1
            self._saved = (x, mean, invstd, True, residual)
        else:
            y = _api.inference(x, self.running_mean, self.running_var, self.gamma,
                               self.beta, eps=self.eps, axis=self.axis,
                               n_threads=self.n_threads, **fused)
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            self._saved = (x, self.running_mean.astype(np.float64), invstd, False, residual)
        return y

    __call__ = forward

    def backward(self, dy: ArrayLike):
        """Gradient with respect to the input of the last :meth:`forward`, and with
        respect to its residual when one was given (then ``(dx, dresidual)``).

        After a training-mode forward this is the closed-form batch-norm gradient
        (through the batch mean and variance). After an eval-mode forward it is the
        gradient of the eval-mode transform, a per-channel affine map:
        ``dx = gamma / sqrt(running_var + eps) * dy``. Sets :attr:`dgamma` and
        :attr:`dbeta` either way.

        Raises
        ------
        RuntimeError
            If no forward pass came first.
        ValueError, TypeError
            If dy's shape or dtype differs from the input's.
        """
        try:
            if self._saved is None:
                raise RuntimeError("bncy: backward() needs a forward() first")
            x, mean, invstd, batch_stats, residual = self._saved
            dy = _api._check_x(dy, "dy", allow_empty=self.comm is not None)
            if dy.shape != x.shape:
                raise ValueError(f"bncy: dy has shape {dy.shape}, expected {x.shape}")
        except Exception as exc:
            self._fail_everywhere(exc, self.training if self._saved is None
                                  else self._saved[3])
            raise
        fused = {"beta": self.beta, "residual": residual, "activation": self.activation}
        if batch_stats and self.comm is not None:
            from bncy import distributed

            r = distributed.backward(dy, x, mean, invstd, self.gamma, comm=self.comm,
                                     axis=self.axis, n_threads=self.n_threads, **fused)
        elif batch_stats:
            r = _api.backward(dy, x, mean, invstd, self.gamma, axis=self.axis,
                              n_threads=self.n_threads, **fused)
        else:
            r = _api._backward_eval(dy, x, mean, invstd, self.gamma, self.axis,
                                    self.n_threads, **fused)
        self.dgamma, self.dbeta = r[1].astype(self.dtype), r[2].astype(self.dtype)
        return r[0] if residual is None else (r[0], r[3])

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Copies of the parameters and running statistics, as plain arrays."""
        state = {"running_mean": self.running_mean.copy(),
                 "running_var": self.running_var.copy(),
                 "num_batches_tracked": self.num_batches_tracked}
        if self.affine:
            state["gamma"] = self.gamma.copy()
            state["beta"] = self.beta.copy()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load what :meth:`state_dict` returned; everything is checked before anything
        is written."""
        keys = ["running_mean", "running_var"] + (["gamma", "beta"] if self.affine else [])
        missing = [k for k in keys + ["num_batches_tracked"] if k not in state]
        if missing:
            raise ValueError(f"bncy: state_dict lacks {missing}")
        arrays = {k: _api._check_vector(state[k], k, self.num_features) for k in keys}
        nbt = operator.index(state["num_batches_tracked"])
        for k, v in arrays.items():
            np.copyto(getattr(self, k), v, casting="same_kind")
        self.num_batches_tracked = nbt

    def __repr__(self) -> str:
        sync = "" if self.comm is None else f", comm=<{self.comm.Get_size()} ranks>"
        return (f"BatchNorm({self.num_features}, eps={self.eps:g}, momentum={self.momentum:g}, "
                f"affine={self.affine}, axis={self.axis}, dtype={self.dtype.name}, "
                f"n_threads={self.n_threads}, training={self.training}{sync})")
