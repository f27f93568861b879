"""Synchronized batch norm over MPI: each rank normalises its slice of a batch with
the statistics of the whole batch, and the result is checked against one process.

    pip install ".[mpi]"
    mpiexec -n 2 python examples/sync_bn_mpi.py            # one machine, 2 processes
    srun -n 64 python examples/sync_bn_mpi.py               # a cluster: same script

It also times one training step (forward and backward) and splits it into the
local kernels and the two collectives (one per phase), so the cost of
synchronisation is on record.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

import bncy
import bncy.distributed as dist


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="64,64,28,28", help="the whole batch, NCHW")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    shape = tuple(int(v) for v in args.shape.split(","))

    rng = np.random.default_rng(0)                   # the same whole batch on every rank
    x = (3.0 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    C = shape[1]
    cuts = np.linspace(0, shape[0], size + 1).astype(int)
    xl, dyl = x[cuts[rank]:cuts[rank + 1]], dy[cuts[rank]:cuts[rank + 1]]

    # a training step of the synchronized layer, checked against one process
    sync = bncy.BatchNorm(C, comm=comm, n_threads=args.threads)
    yl = sync(xl)
    dxl = sync.backward(dyl)
    y, m, s = bncy.forward(x)
    dx, dg, db = bncy.backward(dy, x, m, s)
    err = max(np.abs(yl - y[cuts[rank]:cuts[rank + 1]]).max(initial=0),
              np.abs(dxl - dx[cuts[rank]:cuts[rank + 1]]).max(initial=0))
    err = comm.allreduce(float(err), op=MPI.MAX)

    # where the time goes: local kernels vs the collectives
    def timed(f):
        comm.Barrier()
        best = np.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t0)
        return comm.allreduce(best, op=MPI.MAX)

    nt = args.threads
    t_step = timed(lambda: dist.backward(dyl, xl, *dist.forward(xl, comm=comm, n_threads=nt)[1:],
                                         comm=comm, n_threads=nt))
    st = bncy.batch_stats(xl, n_threads=nt)
    t_local = timed(lambda: (bncy.batch_stats(xl, n_threads=nt),
                             bncy.apply_stats(xl, st, n_threads=nt),
                             bncy.grad_stats(dyl, xl, st.mean, n_threads=nt),
                             bncy.apply_grad(dyl, xl, st.mean, np.ones(C),
                                             bncy.GradStats(np.zeros(C), np.zeros(C)),
                                             max(st.count, 1), n_threads=nt)))
    msg = ("ok", C, "<f4", (st.count, st.mean, st.m2))
    t_comm = timed(lambda: (comm.allgather(msg), comm.allgather(msg)))
    if rank == 0:
        print(f"{size} ranks, whole batch {shape} float32, {nt} OpenMP thread(s) per rank")
        print(f"max |difference| from one process (y, dx): {err:.2e}")
        print(f"training step (forward + backward): {t_step * 1e3:.2f} ms; local kernels "
              f"{t_local * 1e3:.2f} ms; the two collectives {t_comm * 1e3:.3f} ms "
              f"({100 * t_comm / t_step:.1f}% of the step)")


if __name__ == "__main__":
    main()
