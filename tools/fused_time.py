"""Time the fused calls against plain bncy and the unfused NumPy composition,
side by side: within one process, every variant of a case runs once per round,
in turn, for several rounds; the best time of each is kept. Prints one line per
case (shape, dtype, threads) with the times and the ratios the fused issue
sets targets for.

    python tools/fused_time.py [--rounds 9] [--threads 1,2] [--dtypes float32,float64]

Speed belongs in benchmarks, not tests: this is the log behind the fused
kernels' commit messages and docs/tuning.md.
"""

import argparse
import time

import numpy as np

import bncy
from bncy.bench import SHAPES, _unfused_case


def case(shape, axis, dtype, nt):
    rng = np.random.default_rng(0)
    x, dy, r = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    C = shape[axis]
    g, b = np.ones(C, dtype), np.full(C, 0.1, dtype)
    rm, rv = np.zeros(C), np.ones(C)
    _, m, s = bncy.forward(x, g, b, axis=axis)
    relu = _unfused_case(x, dy, None, g, b, rm, rv, axis, nt)
    kw = dict(axis=axis, n_threads=nt)
    return {
        "fwd": lambda: bncy.forward(x, g, b, **kw),
        "fwd_relu": lambda: bncy.forward(x, g, b, activation="relu", **kw),
        "fwd_np": relu["forward"],
        "fwd_res": lambda: bncy.forward(x, g, b, residual=r, activation="relu", **kw),
        "bwd": lambda: bncy.backward(dy, x, m, s, g, **kw),
        "bwd_relu": lambda: bncy.backward(dy, x, m, s, g, beta=b, activation="relu", **kw),
        "bwd_np": relu["backward"],
        "bwd_res": lambda: bncy.backward(dy, x, m, s, g, beta=b, residual=r,
                                         activation="relu", **kw),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--dtypes", default="float32,float64")
    args = p.parse_args()
    print(f"{'case':24s} {'dtype':7s} thr   fwd ms  relu/fwd  np/relu  res/fwd |"
          f"   bwd ms  relu/bwd  np/relu  res/bwd")
    for name, shape, axis in SHAPES:
        for dtype in args.dtypes.split(","):
            for nt in (int(t) for t in args.threads.split(",")):
                fs = case(shape, axis, np.dtype(dtype), nt)
                best = dict.fromkeys(fs, float("inf"))
                for _ in range(args.rounds):
                    for k, f in fs.items():
                        t0 = time.perf_counter()
                        f()
                        best[k] = min(best[k], time.perf_counter() - t0)
                t = best
                print(f"{name:24s} {dtype:7s} {nt:3d} {t['fwd'] * 1e3:8.3f} "
                      f"{t['fwd_relu'] / t['fwd']:9.2f} {t['fwd_np'] / t['fwd_relu']:8.2f} "
                      f"{t['fwd_res'] / t['fwd']:8.2f} | {t['bwd'] * 1e3:8.3f} "
                      f"{t['bwd_relu'] / t['bwd']:9.2f} {t['bwd_np'] / t['bwd_relu']:8.2f} "
                      f"{t['bwd_res'] / t['bwd']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
