"""Hash every output of bncy over shapes that take every kernel path.

A refactor keeps the bits: run this on the old and the new build and diff the
output (one line per case, dtype, layout and thread count).
--fused adds the fused calls (ReLU, with and without a residual); --no-large
leaves the large shapes out; --dtypes float16,bfloat16 (needs ml_dtypes) hashes
other storage types than the default float32,float64.

    PYTHONPATH=OLD python tools/hash_outputs.py > old.txt
    PYTHONPATH=NEW python tools/hash_outputs.py > new.txt && diff old.txt new.txt

Covers forward (y, mean, invstd, running statistics), backward (dx, dgamma,
dbeta), inference, the split-phase API and the layer, for float32 and float64,
C order and an NCHW view of NHWC memory, on 1 to 4 threads. The tests' CASES
reach every schedule and edge of the blocking; the large shapes here reach the
prefetching loops at their default gates and the wide-row chunks.
"""

import hashlib
import sys

import numpy as np

import bncy

sys.path.insert(0, "tests")
from conftest import CASES  # noqa: E402

LARGE = [((65536, 512), 1), ((1024, 4096), 1), ((256, 16384), 1), ((32, 64, 56, 56), 1),
         ((64, 256, 28, 28), 1), ((8, 7, 7, 512), -1), ((100352, 64), 1),
         ((256, 512, 7, 7), 1), ((43690, 768), 1)]


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def run(shape, axis, dtype, nt, layout):
    rng = np.random.default_rng(hash((shape, axis)) % (1 << 32))
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ax = axis % len(shape)
    C = shape[ax]
    if layout == "nhwc-view" and len(shape) == 4 and ax == 1:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    gamma = rng.standard_normal(C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    sdt = dtype if np.dtype(dtype).itemsize > 2 else np.float32  # running stats
    rm, rv = np.zeros(C, sdt), np.ones(C, sdt)
    out = []
    y, mean, invstd = bncy.forward(x, gamma, beta, axis=axis, running_mean=rm,
                                   running_var=rv, n_threads=nt)
    out.append(digest(y, mean, invstd, rm, rv))
    dx, dg, db = bncy.backward(dy, x, mean, invstd, gamma, axis=axis, n_threads=nt)
    out.append(digest(dx, dg, db))
    out.append(digest(bncy.inference(x, rm, rv, gamma, beta, axis=axis, n_threads=nt)))
    st = bncy.batch_stats(x, axis=axis, n_threads=nt)
    rm2, rv2 = np.zeros(C), np.ones(C)
    ys = bncy.apply_stats(x, st, gamma, beta, axis=axis, running_mean=rm2,
                          running_var=rv2, n_threads=nt)
    out.append(digest(st.mean, st.m2, *ys, rm2, rv2))
    gs = bncy.grad_stats(dy, x, mean, axis=axis, n_threads=nt)
    out.append(digest(gs.sum_dy, gs.sum_dy_xc,
                      *bncy.apply_grad(dy, x, mean, invstd, gs, x.size // C, gamma,
                                       axis=axis, n_threads=nt)))
    bn = bncy.BatchNorm(C, axis=axis, dtype=sdt, n_threads=nt)
    yl = bn(x)
    dxl = bn.backward(dy)
    out.append(digest(yl, dxl, bn.dgamma, bn.dbeta, bn.running_mean, bn.running_var))
    bn.eval()
    yl = bn(x)
    out.append(digest(yl, bn.backward(dy), bn.dgamma, bn.dbeta))
    if FUSED:
        r = rng.standard_normal(shape).astype(dtype)
        for res in (None, r):
            yf, mf, sf = bncy.forward(x, gamma, beta, axis=axis, residual=res,
                                      activation="relu", n_threads=nt)
            g = bncy.backward(dy, x, mf, sf, gamma, axis=axis, beta=beta, residual=res,
                              activation="relu", n_threads=nt)
            yi = bncy.inference(x, rm, rv, gamma, beta, axis=axis, residual=res,
                                activation="relu", n_threads=nt)
            out.append(digest(yf, *g, yi))
    return " ".join(out)


FUSED = "--fused" in sys.argv


def dtypes():
    names = "float32,float64"
    if "--dtypes" in sys.argv:
        names = sys.argv[sys.argv.index("--dtypes") + 1]
    if "bfloat16" in names:
        import ml_dtypes  # noqa: F401  (registers the dtype name)
    return [np.dtype(n) for n in names.split(",")]


def main():
    large = "--no-large" not in sys.argv
    cases = CASES + (LARGE if large else [])
    for shape, axis in cases:
        if np.prod(shape) < 2 * shape[axis % len(shape)]:
            continue
        for dtype in dtypes():
            layouts = ["c"] + (["nhwc-view"] if len(shape) == 4 and axis == 1 else [])
            for layout in layouts:
                lines = {nt: run(shape, axis, dtype, nt, layout) for nt in (1, 2, 3, 4)}
                same = len(set(lines.values())) == 1
                print(f"{shape} ax{axis} {np.dtype(dtype).name} {layout} "
                      f"{'threads-same' if same else 'THREADS-DIFFER'} {lines[1]}",
                      flush=True)


if __name__ == "__main__":
    main()
