"""Time two builds of bncy side by side: each case runs on the old and the new
build alternately, in two worker processes, several rounds; the best time of each
build is kept. Prints one line per case with both times and new/old.

    python tools/ab_time.py OLD_DIR NEW_DIR [--rounds 5] [--threads 1 2]

OLD_DIR and NEW_DIR are source trees built in place (python setup.py build_ext
--inplace). Speed belongs in benchmarks, not tests: this is the A/B log behind a
refactor's commit message.
"""

import argparse
import json
import os
import subprocess
import sys

WORKER = r'''
import json, sys, time
import numpy as np
import bncy
rng = np.random.default_rng(0)
arrays = {}
def data(shape, dtype, layout):
    key = (shape, dtype, layout)
    if key not in arrays:
        xs = [rng.standard_normal(shape).astype(dtype) for _ in range(3)]
        if layout == "nhwc":   # NCHW view of NHWC memory
            xs = [np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
                  for a in xs]
        arrays.clear()
        arrays[key] = xs
    return arrays[key]
for line in sys.stdin:
    op, shape, axis, dtype, layout, nt, reps = json.loads(line)
    shape = tuple(shape)
    x, dy, res = data(shape, dtype, layout)
    C = x.shape[axis]
    g, b = np.ones(C, dtype), np.zeros(C, dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y, mean, invstd = bncy.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv,
                                   n_threads=nt)
    call = {"forward": lambda: bncy.forward(x, g, b, axis=axis, running_mean=rm,
                                            running_var=rv, n_threads=nt),
            "backward": lambda: bncy.backward(dy, x, mean, invstd, g, axis=axis,
                                              n_threads=nt),
            "inference": lambda: bncy.inference(x, rm, rv, g, b, axis=axis,
                                                n_threads=nt),
            "backward_res": lambda: bncy.backward(dy, x, mean, invstd, g, axis=axis,
                                                  beta=b, residual=res, activation="relu",
                                                  n_threads=nt)}[op]
    call()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        r = call()
        best = min(best, time.perf_counter() - t)
        del r
    print(json.dumps(best), flush=True)
'''

# (shape, axis, layout): the bench matrix, then the extra shapes and a few
# that take other paths; "nhwc" is an NCHW view of NHWC memory.
CASES = [((64, 256), 1, "c"), ((1024, 4096), 1, "c"), ((65536, 512), 1, "c"),
         ((32, 64, 56, 56), 1, "c"), ((32, 56, 56, 64), -1, "c"), ((256, 16384), 1, "c"),
         ((64, 256, 28, 28), 1, "c"), ((8, 7, 7, 512), -1, "c"), ((32, 64, 56, 56), 1, "nhwc"),
         ((256, 512, 7, 7), 1, "c"), ((100352, 64), 1, "c"), ((4, 64, 8, 8), 1, "c")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shapes", nargs="+", default=None,
                    help='only these cases, e.g. "(64, 256)"')
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--ops", nargs="+", default=["forward", "backward", "inference"],
                    help="also backward_res: through ReLU with a residual")
    args = ap.parse_args()
    workers = {}
    for name, path in (("old", args.old), ("new", args.new)):
        env = {**os.environ, "PYTHONPATH": os.path.abspath(path)}
        workers[name] = subprocess.Popen([sys.executable, "-c", WORKER], env=env,
                                         cwd="/", stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
    print(f"{'case':44s} {'old ms':>9s} {'new ms':>9s} {'new/old':>8s}", flush=True)
    for shape, axis, layout in CASES:
        if args.shapes and str(shape) not in args.shapes:
            continue
        size = 1
        for n in shape:
            size *= n
        for dtype in args.dtypes:
            reps = max(3, min(200, int(2e8 // (size * 8))))
            for nt in args.threads:
                for op in args.ops:
                    best = {"old": float("inf"), "new": float("inf")}
                    for _ in range(args.rounds):
                        for name in ("old", "new"):
                            w = workers[name]
                            w.stdin.write(json.dumps([op, shape, axis, dtype, layout, nt,
                                                              reps])
                                          + "\n")
                            w.stdin.flush()
                            best[name] = min(best[name], json.loads(w.stdout.readline()))
                    case = f"{op} {shape} ax{axis} {layout} {dtype} t{nt}"
                    print(f"{case:44s} {best['old'] * 1e3:9.4f} {best['new'] * 1e3:9.4f} "
                          f"{best['new'] / best['old']:8.3f}", flush=True)


if __name__ == "__main__":
    main()
