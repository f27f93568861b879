"""``python -m bncy``: run forward and backward on sample data, check them against
the NumPy reference and print the agreement and the speed-up."""

from __future__ import annotations

import argparse
import time

import numpy as np

import bncy
from bncy import reference


def _median_time(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bncy", description=__doc__)
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads (default: all)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    cases = [
        ("(M, D) = (8192, 512)", (8192, 512), 1),
        ("NCHW (16, 64, 32, 32)", (16, 64, 32, 32), 1),
        ("NHWC (16, 32, 32, 64)", (16, 32, 32, 64), -1),
    ]
    print(f"bncy {bncy.__version__}  OpenMP: {bncy.openmp_enabled()}  "
          f"threads: {args.threads or 'default'}")
    print(f"{'case':24s} {'dtype':8s} {'max |y - ref|':>14s} {'max |dx - ref|':>15s} "
          f"{'fwd speed-up':>13s} {'bwd speed-up':>13s}")
    tolerance = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}
    ok = True
    for name, shape, axis in cases:
        C = shape[axis]
        for dtype in (np.float32, np.float64):
            # offset data: the case where naive float32 statistics fail
            x = (100.0 + 3.0 * rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            g, b = rng.standard_normal(C), rng.standard_normal(C)
            y, m, s = bncy.forward(x, g, b, axis=axis, n_threads=args.threads)
            dx, dg, db = bncy.backward(dy, x, m, s, g, axis=axis, n_threads=args.threads)
            yr, mr, sr = reference.forward(x, g, b, axis=axis)
            dxr, _, _ = reference.backward(dy, x, mr, sr, g, axis=axis)
            ey = float(np.max(np.abs(y - yr)))
            edx = float(np.max(np.abs(dx - dxr)))
            ok = ok and max(ey, edx) <= tolerance[np.dtype(dtype)]
            tf = _median_time(lambda: bncy.forward(x, g, b, axis=axis,
                                                   n_threads=args.threads), args.repeats)
            tfr = _median_time(lambda: reference.forward(x, g, b, axis=axis), args.repeats)
            tb = _median_time(lambda: bncy.backward(dy, x, m, s, g, axis=axis,
                                                    n_threads=args.threads), args.repeats)
            tbr = _median_time(lambda: reference.backward(dy, x, mr, sr, g, axis=axis),
                               args.repeats)
            print(f"{name:24s} {np.dtype(dtype).name:8s} {ey:14.2e} {edx:15.2e} "
                  f"{tfr / tf:12.1f}x {tbr / tb:12.1f}x")
    print("agreement with the float64 reference:", "OK" if ok else "FAILED",
          "(tolerance: float32 1e-5, float64 1e-10)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
