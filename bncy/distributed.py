"""Synchronized batch normalization across processes, over MPI (mpi4py).

Each process holds a slice of the batch; the statistics are those of the whole
batch. The work is bncy's split-phase API with one collective per phase:

* forward: :func:`bncy.batch_stats` on the local slice, an ``allgather`` of every
  rank's (count, mean, M2, the mean's low part), :func:`bncy.merge_stats` in rank
  order (Chan's formula, exact for unequal counts, on the means relative to the
  first rank's), :func:`bncy.apply_stats` on the local slice;
* backward: :func:`bncy.grad_stats` on the local slice, an ``allgather`` of every
  rank's sums, :func:`bncy.merge_grad_stats` in rank order,
  :func:`bncy.apply_grad` on the local slice.

Merging gathered parts in rank order (rather than an MPI floating-point
reduction, whose order MPI does not fix) gives every rank the same bits, for any
``n_threads``. Every rank validates its arguments before the collective and sends
either its statistics or its error, so a bad argument or a channel mismatch on
any rank raises the same exception on every rank instead of leaving the others
waiting; so does an error of any other kind in a rank's local step (MemoryError
included). A rank may hold zero rows.

``comm`` is an mpi4py communicator (``MPI.COMM_WORLD`` or a sub-communicator);
mpi4py is optional: ``pip install bncy[mpi]`` brings it with the ``mpich`` wheel,
whose ``mpiexec`` needs no root.
"""

from __future__ import annotations

from numpy.typing import ArrayLike, NDArray

from bncy import _api
from bncy._layer import BatchNorm

__all__ = ["forward", "backward", "SyncBatchNorm"]


def _require_comm(comm):
    if comm is None or not hasattr(comm, "allgather"):
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            raise ImportError(
                "bncy.distributed needs mpi4py: pip install 'bncy[mpi]' "
                "(mpi4py and the mpich wheel, which provides mpiexec)"
            ) from None
        raise TypeError("bncy.distributed: comm must be an mpi4py communicator, "
                        f"got {type(comm).__name__}")
    return comm


_KINDS = {"TypeError": TypeError, "ValueError": ValueError, "MemoryError": MemoryError}


def _exchange(comm, local):
    """Allgather one message per rank; raise every rank's first error on every rank.
    A message is ("ok", C, dtype, payload) or ("error", exception type, text);
    an error of a kind other than TypeError, ValueError or MemoryError comes back
    as RuntimeError naming it."""
    messages = comm.allgather(local)
    for rank, msg in enumerate(messages):
        if msg[0] == "error":
            raise _KINDS.get(msg[1], RuntimeError)(f"bncy.distributed: rank {rank}: "
                                                    f"{msg[2]}")
    shapes = {(msg[1], msg[2]) for msg in messages}
    if len(shapes) > 1:
        raise ValueError("bncy.distributed: ranks disagree on the number of channels or "
                         f"the dtype: {[(r, m[1], m[2]) for r, m in enumerate(messages)]}")
    return [msg[3] for msg in messages]


def _fail(comm, exc: Exception):
    """Raise a rank's local error on every rank through the exchange the other
    ranks are waiting in (a check that ran before forward's or backward's)."""
    def step():
        raise exc
    _exchange(comm, _guarded(step))


def _guarded(step):
    """Run a local step; return ("ok", result) or the error, of any kind, as a
    message (so that no rank is left waiting in the collective)."""
    try:
        return ("ok", step())
    except Exception as exc:  # noqa: BLE001 - every error goes to every rank
        text = str(exc).removeprefix("bncy: ")
        if type(exc).__name__ not in _KINDS:
            text = f"{type(exc).__name__}: {text}"
        return ("error", type(exc).__name__, text)


def forward(x: ArrayLike, gamma: ArrayLike | None = None, beta: ArrayLike | None = None, *,
            comm, eps: float = 1e-5, axis: int = 1, running_mean=None, running_var=None,
            momentum: float = 0.1, out=None, n_threads: int | None = None,
            residual=None, activation=None) -> tuple[NDArray, NDArray, NDArray]:
    """Training-mode batch normalization with the statistics of all ranks' batches.

    Arguments and results as in :func:`bncy.forward`, plus ``comm`` (an mpi4py
    communicator; every rank of it must call this). ``y`` is this rank's slice of
    the output; ``mean`` and ``invstd`` are the whole batch's, the same bits on every
    rank. x may have zero rows on some ranks; the whole batch needs 2 values per
    channel.
    """
    comm = _require_comm(comm)

    def local():
        # every argument of apply_stats checked before the collective
        x_, _, p = _api._check_train(x, gamma, beta, eps, axis, running_mean, running_var,
                                     momentum, local=False, residual=residual,
                                     activation=activation)
        if out is not None:
            _api._check_out(out, x_)
        _api._resolve_threads(n_threads, 0)
        return p.C, x_.dtype.str, _api.batch_stats(x_, axis=axis, n_threads=n_threads)

    status = _guarded(local)
    msg = ("ok",) + status[1] if status[0] == "ok" else status
    parts = _exchange(comm, msg)
    total = _api.merge_stats([_api.BatchStats(*part) for part in parts])
    if total.count < 2:
        raise ValueError("bncy.distributed: expected more than 1 value per channel when "
                         f"training, got {total.count} over all ranks")
    return _api.apply_stats(x, total, gamma, beta, eps=eps, axis=axis,
                            running_mean=running_mean, running_var=running_var,
                            momentum=momentum, out=out, n_threads=n_threads,
                            residual=residual, activation=activation)


def backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
             gamma: ArrayLike | None = None, *, comm, axis: int = 1, out=None,
             n_threads: int | None = None, beta=None, residual=None, activation=None,
             residual_out=None) -> tuple[NDArray, ...]:
    """Gradients of :func:`forward`: this rank's dx; dgamma, dbeta of the whole batch
    (and this rank's residual gradient when a residual is given).

    Arguments and results as in :func:`bncy.backward`, plus ``comm``; ``mean`` and
    ``invstd`` are those :func:`forward` returned.
    """
    comm = _require_comm(comm)

    def local():
        # every argument of apply_grad checked before the collective
        dy_, x_, _, p = _api._check_grad(dy, x, mean, invstd, gamma, axis, local=False,
                                         beta=beta, residual=residual,
                                         activation=activation)
        if out is not None:
            _api._check_out(out, x_)
        _api._check_residual_out(residual_out, x_, out, residual)
        _api._resolve_threads(n_threads, 0)
        g = _api.grad_stats(dy_, x_, mean, axis=axis, n_threads=n_threads, invstd=invstd,
                            gamma=gamma, beta=beta, residual=residual,
                            activation=activation)
        return p.C, p.dtype.str, (p.count, g.sum_dy, g.sum_dy_xc)

    status = _guarded(local)
    msg = ("ok",) + status[1] if status[0] == "ok" else status
    parts = _exchange(comm, msg)
    count = sum(part[0] for part in parts)
    total = _api.merge_grad_stats([_api.GradStats(part[1], part[2]) for part in parts])
    return _api.apply_grad(dy, x, mean, invstd, total, count, gamma, axis=axis, out=out,
                           n_threads=n_threads, beta=beta, residual=residual,
                           activation=activation, residual_out=residual_out)


class SyncBatchNorm(BatchNorm):
    """:class:`bncy.BatchNorm` whose training statistics span every rank of ``comm``.

    Same constructor (plus ``comm``), attributes and methods as
    :class:`bncy.BatchNorm`; eval mode is purely local (running statistics). Every
    rank must call forward/backward in training mode together.
    """

    def __init__(self, num_features: int, *, comm, **kwargs):
        super().__init__(num_features, comm=_require_comm(comm), **kwargs)
