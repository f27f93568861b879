"""Synchronized batch norm, run on every rank under mpiexec (tests/test_distributed.py
launches it with -n 2 and -n 3). With one process it runs as a 1-rank test."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

MPI = pytest.importorskip("mpi4py.MPI")

import bncy  # noqa: E402
import bncy.distributed as dist  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

CASES = [((23, 6), 1), ((7, 4, 5, 6), 1), ((9, 5, 4, 3), -1), ((5, 3, 40), 1)]


def rows(n):
    """Uneven slices of n rows, rank 0 empty when there are several ranks."""
    if size == 1:
        return slice(0, n)
    cuts = [0, 0] + [1 + (n - 1) * k // (size - 1) for k in range(1, size)]
    cuts[-1] = n
    return slice(cuts[rank], cuts[rank + 1])


def same_on_every_rank(a):
    gathered = comm.allgather(np.asarray(a))
    for other in gathered[1:]:
        assert_array_equal(gathered[0], other)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_matches_the_single_process_result(shape, axis, dtype):
    rng = np.random.default_rng(7)                  # the same full batch on every rank
    x = (5.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    rm, rv = np.zeros(C), np.ones(C)
    y, m, s = bncy.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv)
    dx, dg, db = bncy.backward(dy, x, m, s, g, axis=axis)
    sl = rows(shape[0])
    xl, dyl = x[sl], dy[sl]
    results = []
    for nt in (1, 2):
        lrm, lrv = np.zeros(C), np.ones(C)
        yl, ml, sl_ = dist.forward(xl, g, b, comm=comm, axis=axis, running_mean=lrm,
                                   running_var=lrv, n_threads=nt)
        dxl, dgl, dbl = dist.backward(dyl, xl, ml, sl_, g, comm=comm, axis=axis, n_threads=nt)
        results.append((yl, ml, sl_, lrm, lrv, dxl, dgl, dbl))
    for a, b_ in zip(*results):                      # independent of n_threads
        assert_array_equal(a, b_)
    yl, ml, sl_, lrm, lrv, dxl, dgl, dbl = results[0]
    f32 = dtype == np.float32
    rt, at = (2e-6, 2e-6) if f32 else (1e-11, 1e-11)
    M = x.size // C
    assert_allclose(yl, y[sl], rtol=rt, atol=at)
    assert_allclose(ml, m, rtol=1e-13)
    assert_allclose(sl_, s, rtol=1e-12)
    assert_allclose(lrm, rm, rtol=1e-13)
    assert_allclose(lrv, rv, rtol=1e-12)
    assert_allclose(dxl, dx[sl], rtol=rt, atol=at)
    assert_allclose(dgl, dg, rtol=rt, atol=at * M)
    assert_allclose(dbl, db, rtol=rt, atol=at * M)
    for a in (ml, sl_, lrm, lrv, dgl, dbl):         # the same bits on every rank
        same_on_every_rank(a)


def test_offset_data_keeps_float64_accuracy():
    """Each rank's mean travels with its low part (BatchStats.mean_lo), and the
    merge takes the means relative to the first rank's: 1e12 + N(0, 1) loses
    nothing to the means' rounding at 1e12."""
    import math

    x = 1e12 + np.random.default_rng(11).standard_normal((600, 8))
    _, m, s = dist.forward(x[rows(600)], comm=comm, eps=0.0)
    for c in range(8):
        m0 = math.fsum(x[:, c]) / 600
        d = x[:, c] - m0
        s1 = math.fsum(d)
        var = (math.fsum(d * d) - s1 * (s1 / 600)) / 600
        assert abs(m[c] - (m0 + s1 / 600)) <= np.spacing(m[c])
        assert abs(1.0 / s[c] ** 2 - var) <= 1e-13 * var
    same_on_every_rank(m)
    same_on_every_rank(s)


def test_channel_mismatch_raises_on_every_rank():
    C = 4 if rank == size - 1 and size > 1 else 3
    x = np.random.default_rng(rank).standard_normal((5, C))
    if size == 1:
        pytest.skip("needs two ranks")
    with pytest.raises(ValueError, match="channels"):
        dist.forward(x, comm=comm)
    comm.Barrier()


def test_bad_argument_on_one_rank_raises_on_every_rank():
    x = np.random.default_rng(rank).standard_normal((6, 3))
    eps = -1.0 if rank == 0 else 1e-5
    with pytest.raises(ValueError, match="rank 0: eps"):
        dist.forward(x, comm=comm, eps=eps)
    dy = np.ones((6 if rank else 5, 3))
    with pytest.raises(ValueError, match="rank 0: dy"):
        dist.backward(dy, x, np.zeros(3), np.ones(3), comm=comm)
    comm.Barrier()


def test_sync_batchnorm_layer_over_training_steps():
    C = 5
    sync = dist.SyncBatchNorm(C, comm=comm, dtype=np.float64)
    ref = bncy.BatchNorm(C, dtype=np.float64)
    rng = np.random.default_rng(3)
    for step in range(3):
        x = rng.standard_normal((17, C, 2, 2)) * (1 + step)
        dy = rng.standard_normal(x.shape)
        sl = rows(17)
        assert_allclose(sync(x[sl]), ref(x)[sl], rtol=1e-11, atol=1e-12)
        assert_allclose(sync.backward(dy[sl]), ref.backward(dy)[sl], rtol=1e-10, atol=1e-11)
        assert_allclose(sync.dgamma, ref.dgamma, rtol=1e-10, atol=1e-10)
    assert_allclose(sync.running_mean, ref.running_mean, rtol=1e-12)
    assert_allclose(sync.running_var, ref.running_var, rtol=1e-12)
    assert "ranks" in repr(sync)
    sync.eval()
    x = rng.standard_normal((4, C, 2, 2))
    assert_allclose(sync(x), ref.eval()(x), rtol=1e-12)


@pytest.mark.parametrize("kind", [MemoryError, KeyError])
def test_any_error_on_one_rank_raises_on_every_rank(kind, monkeypatch):
    """An error of any kind in one rank's local step (here raised by its batch_stats
    and grad_stats) reaches every rank, as the same kind or RuntimeError, no hang."""
    if size < 2:
        pytest.skip("needs two ranks")
    if rank == size - 1:
        def fail(*args, **kwargs):
            raise kind("out of luck")
        monkeypatch.setattr(bncy._api, "batch_stats", fail)
        monkeypatch.setattr(bncy._api, "grad_stats", fail)
    expected = kind if kind is MemoryError else RuntimeError
    x = np.random.default_rng(rank).standard_normal((6, 3))
    with pytest.raises(expected, match=f"rank {size - 1}: .*out of luck"):
        dist.forward(x, comm=comm)
    with pytest.raises(expected, match=f"rank {size - 1}"):
        dist.backward(x, x, np.zeros(3), np.ones(3), comm=comm)
    comm.Barrier()


def test_layer_bad_input_on_one_rank_raises_on_every_rank():
    """The layer's own checks (channels, residual, dy) run before the exchange;
    an error there reaches every rank through it, no hang."""
    if size < 2:
        pytest.skip("needs two ranks")
    bad = rank == size - 1
    sync = dist.SyncBatchNorm(3, comm=comm, dtype=np.float64)
    x = np.random.default_rng(rank).standard_normal((6, 3))
    with pytest.raises(ValueError, match=f"rank {size - 1}: expected 3 channels"):
        sync(np.ones((6, 4)) if bad else x)
    with pytest.raises(ValueError, match=f"rank {size - 1}: residual"):
        sync(x, residual=np.ones((6, 2)) if bad else None)
    sync(x)
    with pytest.raises(ValueError, match=f"rank {size - 1}: dy"):
        sync.backward(np.ones((5, 3)) if bad else np.ones((6, 3)))
    comm.Barrier()


def test_output_checks_before_the_exchange():
    """out's layout and residual_out are checked before the exchange: an error
    there raises on every rank, and no rank writes anything."""
    if size < 2:
        pytest.skip("needs two ranks")
    bad = rank == size - 1
    x = np.random.default_rng(rank).standard_normal((6, 3))
    rm = np.zeros(3)
    out = np.empty((6, 6))[:, ::2] if bad else np.empty_like(x)   # not dense
    with pytest.raises(ValueError, match=f"rank {size - 1}: out must be C-contiguous"):
        dist.forward(x, comm=comm, out=out, running_mean=rm, running_var=np.ones(3))
    assert np.all(rm == 0)
    ro = np.empty((6, 2)) if bad else np.empty_like(x)
    with pytest.raises(ValueError, match=f"rank {size - 1}: residual_out"):
        dist.backward(x, x, np.zeros(3), np.ones(3), comm=comm, residual=x, residual_out=ro)
    comm.Barrier()


def test_nan_on_one_rank_gives_nan_in_that_channel_on_every_rank():
    """A channel whose merged statistics are not finite is NaN on every rank, as
    in one process; the other channels and the running statistics (updated once)
    are the single-process ones."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((9, 3))
    x[8, 1] = np.nan
    rm, rv = np.zeros(3), np.ones(3)
    rm1, rv1 = np.zeros(3), np.ones(3)
    y1, m1, s1 = bncy.forward(x, running_mean=rm1, running_var=rv1)
    sl = rows(9)
    y, m, s = dist.forward(x[sl], comm=comm, running_mean=rm, running_var=rv)
    assert np.all(np.isnan(y[:, 1]))
    assert_allclose(y[:, [0, 2]], y1[sl][:, [0, 2]], rtol=1e-12, atol=1e-12)
    assert_allclose(rm, rm1, rtol=1e-12)
    assert_allclose(rv, rv1, rtol=1e-12)
    same_on_every_rank(m)
    same_on_every_rank(rm)


def test_sync_batchnorm_is_a_batchnorm_class():
    sync = dist.SyncBatchNorm(3, comm=comm)
    assert isinstance(sync, dist.SyncBatchNorm) and isinstance(sync, bncy.BatchNorm)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_storage_matches_the_single_process_result(name):
    if name == "bfloat16":
        dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
        rt = 2.0**-7          # one unit of bfloat16
    else:
        dtype, rt = np.dtype(np.float16), 2.0**-10
    rng = np.random.default_rng(8)
    shape, C = (9, 4, 5, 6), 4
    x = (5.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    y, m, s = bncy.forward(x, g, b)
    dx, dg, db = bncy.backward(dy, x, m, s, g)
    sl = rows(shape[0])
    yl, ml, sl_ = dist.forward(x[sl], g, b, comm=comm)
    dxl, dgl, dbl = dist.backward(dy[sl], x[sl], ml, sl_, g, comm=comm)
    assert yl.dtype == dtype and dxl.dtype == dtype and dgl.dtype == np.float32
    f = lambda a: np.asarray(a).astype(np.float64)
    assert_allclose(f(yl), f(y[sl]), rtol=rt, atol=rt * 1e-3)
    assert_allclose(f(dxl), f(dx[sl]), rtol=rt, atol=rt * 1e-2)
    assert_allclose(ml, m, rtol=1e-13)
    assert_allclose(dgl, dg, rtol=1e-5, atol=1e-5)
    for a in (ml, sl_, dgl, dbl):
        same_on_every_rank(a)
