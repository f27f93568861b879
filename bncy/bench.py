"""``python -m bncy.bench``: bncy against PyTorch's CPU kernels and the NumPy reference.

Same arrays, same thread count, one run. For every case it reports the median
time, the speed-up over torch and over the reference, and the fraction of the
memory-bandwidth bound reached, with the bandwidth measured in the same run by
two kernels compiled into bncy (a read sweep and a read+write sweep). bncy,
torch, and the unfused composition or further peers where asked for, are called
in turn round after round, so that they meet the same load of the machine.

The bound counts the fewest crossings of the memory bus: inference reads x and
writes y; training forward also reads x once more for the statistics, unless x
fits in the last-level cache; backward reads x and dy for the sums and again
for dx (unless they fit in cache), and writes dx.

By default every call returns new output arrays, as a user's call does. torch's
outputs beyond glibc's 32 MiB mmap threshold are then fresh pages that the
kernel faults in and zeroes on every call (one more write of the output, and
page faults); bncy's come from its cache of freed output buffers
(``bncy.set_buffer_cache``), as they do in a user's training loop, unless
``--no-cache`` turns that off for the run. ``--out`` writes into preallocated
outputs instead (bncy's ``out=``, torch's ``.out`` overloads) and so times the
kernels alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

import bncy
from bncy import reference
from bncy._api import _kernels, _kernels_wide

LLC_BYTES = 32 << 20  # re-reads of arrays this small are assumed to hit the cache

SHAPES = [
    ("(64, 256)", (64, 256), 1),
    ("(1024, 4096)", (1024, 4096), 1),
    ("(65536, 512)", (65536, 512), 1),
    ("NCHW (32, 64, 56, 56)", (32, 64, 56, 56), 1),
    ("NHWC (32, 56, 56, 64)", (32, 56, 56, 64), -1),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[3]]
OPS = ("forward", "inference", "backward")


def _median(f, repeats: int, budget: float) -> float:
    return _medians([f], repeats, budget)[0]


def _medians(fs, repeats: int, budget: float) -> list:
    """The median time of each of fs, called in turn round after round (the
    order rotating), so that every one of them meets the same load of this
    machine: their ratios are steadier than those of back-to-back runs. One
    warm-up call each; at least 3 rounds, then until repeats or len(fs) * budget
    seconds."""
    for f in fs:
        f()
    times = [[] for _ in fs]
    t_end = time.perf_counter() + budget * len(fs)
    for i in range(repeats):
        for j in range(len(fs)):
            k = (i + j) % len(fs)
            t0 = time.perf_counter()
            fs[k]()
            times[k].append(time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() > t_end:
            break
    return [float(np.median(t)) for t in times]


def measure_bandwidth(n_threads: int, nbytes: int = 256 << 20) -> dict:
    """Read and read+write bandwidth in GB/s (bytes crossing the bus per second)."""
    x = np.ones(nbytes // 4, dtype=np.float32)
    y = np.empty_like(x)
    builds = {_kernels, _kernels_wide}   # the best of the builds bncy runs on
    t_read = min(_median(lambda: k.stream_read(x, n_threads), 3, 2.0)
                 for _ in range(2) for k in builds)
    t_copy = min(_median(lambda: k.stream_scale(x, y, n_threads), 3, 2.0)
                 for _ in range(2) for k in builds)
    return {"read": x.nbytes / t_read / 1e9, "copy": 2 * x.nbytes / t_copy / 1e9}


def bound_seconds(op: str, nbytes: int, bw: dict) -> float:
    R, W = bw["read"] * 1e9, bw["copy"] * 1e9
    cached = nbytes * (2 if op == "backward" else 1) <= LLC_BYTES // 2
    if op == "inference":
        return 2 * nbytes / W
    if op == "forward":
        return 2 * nbytes / W + (0 if cached else nbytes / R)
    return 3 * nbytes / W + (0 if cached else 2 * nbytes / R)


def _as_torch(torch, a):
    """A zero-copy tensor of a (bfloat16 through its int16 bits: NumPy's bfloat16
    has no torch counterpart to convert from)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_tensors(torch, x, dy, axis):
    tx, tdy = _as_torch(torch, x), _as_torch(torch, dy)
    if axis == -1 and x.ndim > 2:   # the NCHW view of NHWC memory: channels_last
        perm = (0, x.ndim - 1, *range(1, x.ndim - 1))
        return tx.permute(*perm), tdy.permute(*perm)
    return tx, tdy


def _aten_case(torch, tx, tdy, C, wrap=lambda f: f, prealloc=False):
    """torch's native_batch_norm (training, inference) and its backward on tx, tdy;
    ``wrap`` (torch.compile, say) is applied to each of the three calls; prealloc:
    the ``.out`` overloads, into outputs allocated once."""
    w, b = torch.ones(C, dtype=tx.dtype), torch.zeros(C, dtype=tx.dtype)
    rm, rv = torch.zeros(C, dtype=tx.dtype), torch.ones(C, dtype=tx.dtype)
    nbn, nbn_bwd = torch.ops.aten.native_batch_norm, torch.ops.aten.native_batch_norm_backward
    saved = nbn(tx, w, b, None, None, True, 0.1, 1e-5)
    if prealloc:
        o, g = torch.empty_like(tx), torch.empty_like(tx)   # keep tx's memory format
        v = [torch.empty(C, dtype=tx.dtype) for _ in range(4)]
        return {
            "forward": lambda: nbn.out(tx, w, b, rm, rv, True, 0.1, 1e-5, out=o,
                                       save_mean=v[0], save_invstd=v[1]),
            "inference": lambda: nbn.out(tx, w, b, rm, rv, False, 0.1, 1e-5, out=o,
                                         save_mean=v[0], save_invstd=v[1]),
            "backward": lambda: nbn_bwd.out(tdy, tx, w, rm, rv, saved[1], saved[2], True,
                                            1e-5, [True, True, True], out0=g, out1=v[2],
                                            out2=v[3]),
        }
    fwd = wrap(lambda x_, train: nbn(x_, w, b, rm, rv, train, 0.1, 1e-5))
    bwd = wrap(lambda dy_, x_: nbn_bwd(dy_, x_, w, rm, rv, saved[1], saved[2], True, 1e-5,
                                       [True, True, True]))
    return {
        "forward": lambda: fwd(tx, True),
        "inference": lambda: fwd(tx, False),
        "backward": lambda: bwd(tdy, tx),
    }


def _torch_case(torch, x, dy, axis, C, prealloc=False):
    return _aten_case(torch, *_torch_tensors(torch, x, dy, axis), C, prealloc=prealloc)


def _mkldnn_case(torch, x, dy, axis, C):
    """PyTorch's oneDNN kernels on x.to_mkldnn(): float32 NCHW only, else {}."""
    if x.dtype != np.float32 or x.ndim != 4 or axis != 1:
        return {}
    return _aten_case(torch, torch.from_numpy(x).to_mkldnn(),
                      torch.from_numpy(dy).to_mkldnn(), C)


def _compile_case(torch, x, dy, axis, C):
    """The same aten calls through torch.compile (Inductor's generated C++); the
    first call, which compiles, is the warm-up that _medians discards."""
    return _aten_case(torch, *_torch_tensors(torch, x, dy, axis), C, wrap=torch.compile)


PEERS = {"mkldnn": _mkldnn_case, "compile": _compile_case}


def _torch_fused_case(torch, x, dy, r, axis, C):
    """PyTorch eager relu(batch_norm(x) [+ r]) and its backward as autograd runs
    it: threshold_backward on the saved output, then native_batch_norm_backward
    (eager fuses nothing)."""
    tx, tdy = _torch_tensors(torch, x, dy, axis)
    tr = None if r is None else _torch_tensors(torch, r, r, axis)[0]
    w, b = torch.ones(C, dtype=tx.dtype), torch.zeros(C, dtype=tx.dtype)
    rm, rv = torch.zeros(C, dtype=tx.dtype), torch.ones(C, dtype=tx.dtype)
    nbn, nbn_bwd = torch.ops.aten.native_batch_norm, torch.ops.aten.native_batch_norm_backward

    def fwd(train):
        y, m, s = nbn(tx, w, b, rm, rv, train, 0.1, 1e-5)
        return torch.relu(y if tr is None else y + tr), m, s

    ty, m, s = fwd(True)

    def bwd():
        g = torch.ops.aten.threshold_backward(tdy, ty, 0)
        return nbn_bwd(g, tx, w, rm, rv, m, s, True, 1e-5, [True, True, True]), g

    return {"forward": lambda: fwd(True), "inference": lambda: fwd(False), "backward": bwd}


def _unfused_case(x, dy, r, g, b, rm, rv, axis, n_threads):
    """The NumPy composition a user writes today: plain bncy, then the residual
    add and np.maximum; backward masks dy where the kept y > 0, then bncy.backward
    (the residual's gradient is that masked dy)."""
    y, m, s = bncy.forward(x, g, b, axis=axis, n_threads=n_threads)
    y = np.maximum(y if r is None else y + r, 0)

    def fwd():
        z = bncy.forward(x, g, b, axis=axis, running_mean=rm, running_var=rv,
                         n_threads=n_threads)[0]
        return np.maximum(z if r is None else z + r, 0)

    def inf():
        z = bncy.inference(x, rm, rv, g, b, axis=axis, n_threads=n_threads)
        return np.maximum(z if r is None else z + r, 0)

    def bwd():
        gm = np.where(y > 0, dy, 0)
        return bncy.backward(gm, x, m, s, g, axis=axis, n_threads=n_threads), gm

    return {"forward": fwd, "inference": inf, "backward": bwd}


def run(threads, shapes, dtypes, repeats, budget, with_reference=True, progress=True,
        peers=(), bandwidth_bytes=256 << 20, prealloc=False, activation=None,
        residual=False):
    """Time every case; prealloc: bncy and torch write into outputs allocated once
    (the reference and the further peers allocate as usual). activation="relu"
    and/or residual: bncy's fused calls, against the unfused NumPy composition
    (the "unfused" column) and torch eager relu(batch_norm(x) [+ r])."""
    fused = activation is not None or residual
    try:
        import torch
    except ImportError:
        torch = None
        print("note: torch is not installed; its column is empty "
              "(pip install torch==2.13.0)", file=sys.stderr)
    rows, bws = [], {}
    total = len(threads) * len(shapes) * len(dtypes)
    done = 0
    for nt in threads:
        bws[nt] = measure_bandwidth(nt, bandwidth_bytes)
        if torch is not None:
            torch.set_num_threads(nt)
        for name, shape, axis in shapes:
            for dtype in dtypes:
                done += 1
                if progress:
                    print(f"\r[{done}/{total}] {nt} thread(s) {name} {np.dtype(dtype).name}"
                          + " " * 10, end="", file=sys.stderr, flush=True)
                rng = np.random.default_rng(0)
                x = rng.standard_normal(shape).astype(dtype)
                dy = rng.standard_normal(shape).astype(dtype)
                r = rng.standard_normal(shape).astype(dtype) if residual else None
                C = shape[axis]
                g, b = np.ones(C, dtype), np.zeros(C, dtype)
                rm, rv = np.zeros(C), np.ones(C)
                _, m, s = bncy.forward(x, g, b, axis=axis)
                yo = np.empty_like(x) if prealloc else None
                dxo = np.empty_like(x) if prealloc else None
                dro = np.empty_like(x) if prealloc and residual and activation else None
                fk = {"residual": r, "activation": activation}
                ours = {
                    "forward": lambda: bncy.forward(x, g, b, axis=axis, running_mean=rm,
                                                    running_var=rv, out=yo, n_threads=nt,
                                                    **fk),
                    "inference": lambda: bncy.inference(x, rm, rv, g, b, axis=axis, out=yo,
                                                        n_threads=nt, **fk),
                    "backward": lambda: bncy.backward(dy, x, m, s, g, axis=axis, out=dxo,
                                                      n_threads=nt, beta=b,
                                                      residual_out=dro, **fk),
                }
                ref = {
                    "forward": lambda: reference.forward(x, g, b, axis=axis, **fk),
                    "inference": lambda: reference.inference(x, rm, rv, g, b, axis=axis,
                                                             **fk),
                    "backward": lambda: reference.backward(dy, x, m, s, g, axis=axis,
                                                           beta=b, **fk),
                }
                unfused = (_unfused_case(x, dy, r, g, b, rm, rv, axis, nt) if fused
                           else {})
                if torch is None:
                    peer = {}
                elif fused:
                    peer = _torch_fused_case(torch, x, dy, r, axis, C)
                else:
                    peer = _torch_case(torch, x, dy, axis, C, prealloc)
                extra = {name: PEERS[name](torch, x, dy, axis, C) if torch is not None else {}
                         for name in peers}
                for op in OPS:
                    # bncy, torch, the unfused composition and the further peers
                    # in turn (_medians); the slow reference on its own
                    timed = {"bncy": ours[op]}
                    if op in peer:
                        timed["torch"] = peer[op]
                    if fused:
                        timed["unfused"] = unfused[op]
                    for pname, fs in extra.items():
                        if op in fs:
                            timed[pname] = fs[op]
                    got = dict(zip(timed, _medians(list(timed.values()), repeats, budget)))
                    t, tt = got["bncy"], got.get("torch")
                    tr = (_median(ref[op], max(3, repeats // 3), budget)
                          if with_reference else None)
                    tb = bound_seconds(op, x.nbytes, bws[nt])
                    row = {
                        "case": name, "shape": list(shape), "axis": axis,
                        "dtype": np.dtype(dtype).name, "op": op, "threads": nt,
                        "bncy_s": t, "torch_s": tt, "reference_s": tr,
                        "bound_s": tb, "mbytes": x.nbytes / 1e6,
                        "activation": activation, "residual": bool(residual),
                    }
                    if fused:
                        row["unfused_s"] = got["unfused"]
                    for pname in extra:
                        row[f"{pname}_s"] = got.get(pname)
                    rows.append(row)
    if progress:
        print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
    return rows, bws


def _fmt_time(t):
    if t is None:
        return "-"
    return f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def table(rows, bws, peers=()) -> str:
    out = []
    if rows and "unfused_s" in rows[0]:
        peers = ("unfused", *peers)   # the NumPy composition, as one more peer
    for nt, bw in bws.items():
        out.append(f"threads={nt}: read {bw['read']:.1f} GB/s, read+write {bw['copy']:.1f} GB/s")
    head = (f"{'case':24s} {'dtype':8s} {'op':10s} {'thr':>3s} {'bncy':>10s} {'torch':>10s} "
            f"{'reference':>10s} {'vs torch':>9s} {'vs ref':>8s} {'of bound':>9s}"
            + "".join(f" {p if p == 'unfused' else 'torch ' + p:>14s} {'vs it':>6s}"
                      for p in peers))
    out += [head, "-" * len(head)]
    for r in rows:
        vt = f"{r['torch_s'] / r['bncy_s']:.2f}x" if r["torch_s"] else "-"
        vr = f"{r['reference_s'] / r['bncy_s']:.1f}x" if r["reference_s"] else "-"
        frac = f"{100 * r['bound_s'] / r['bncy_s']:.0f}%"
        out.append(f"{r['case']:24s} {r['dtype']:8s} {r['op']:10s} {r['threads']:3d} "
                   f"{_fmt_time(r['bncy_s']):>10s} {_fmt_time(r['torch_s']):>10s} "
                   f"{_fmt_time(r['reference_s']):>10s} {vt:>9s} {vr:>8s} {frac:>9s}"
                   + "".join(f" {_fmt_time(r[p + '_s']):>14s} "
                             + (f"{r[p + '_s'] / r['bncy_s']:5.2f}x" if r[p + '_s'] else "     -")
                             for p in peers))
    return "\n".join(out)


def plot(rows, bws, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted(bws)
    fig, axes = plt.subplots(len(threads), 1, figsize=(14, 4.5 * len(threads)), squeeze=False)
    for ax, nt in zip(axes[:, 0], threads):
        sel = [r for r in rows if r["threads"] == nt]
        labels = [f"{r['case']}\n{r['dtype']} {r['op']}" for r in sel]
        pos = np.arange(len(sel))
        gbs = lambda key: [r["mbytes"] / 1e3 / r[key] if r[key] else 0 for r in sel]  # noqa: E731
        for i, (key, name) in enumerate([("bncy_s", "bncy"), ("torch_s", "torch"),
                                         ("reference_s", "NumPy reference")]):
            ax.bar(pos + (i - 1) * 0.27, gbs(key), width=0.27, label=name)
        ax.plot(pos, [r["mbytes"] / 1e3 / r["bound_s"] for r in sel], "k_", ms=14,
                label="bandwidth bound")
        ax.set_xticks(pos, labels, rotation=90, fontsize=6)
        ax.set_ylabel("x's size / time (GB/s)")
        ax.set_title(f"{nt} thread(s), {platform.processor() or platform.machine()}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_dtype(name: str) -> np.dtype:
    """float32, float64, float16, or bfloat16 (which needs ml_dtypes: pip install
    bncy[bf16])."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError("bfloat16 needs ml_dtypes (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r}") from None


def half_summary(rows) -> str:
    """Each 16-bit row's time over bncy's own float32 time on the same case, op
    and thread count (the 16-bit issue's first target)."""
    f32 = {(r["case"], r["op"], r["threads"]): r["bncy_s"] for r in rows
           if r["dtype"] == "float32"}
    out = []
    for r in rows:
        key = (r["case"], r["op"], r["threads"])
        if r["dtype"] in ("float16", "bfloat16") and key in f32:
            out.append(f"{r['case']:24s} {r['dtype']:8s} {r['op']:10s} {r['threads']:3d} "
                       f"{r['bncy_s'] / f32[key]:.2f}x bncy float32's time")
    return "\n".join(out)


def parse_shape(spec: str):
    """'256x512x7x7' or '256x7x7x512:-1' as a (label, shape, axis) case of the
    matrix: the channel axis is 1 (NCHW, (M, D)) or, after the colon, -1 (channels
    last), the two layouts torch's kernels take."""
    dims, _, ax = spec.partition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
        axis = int(ax) if ax else 1
    except ValueError:
        raise ValueError(f"bad shape {spec!r}: expected e.g. 256x512x7x7 or "
                         "256x7x7x512:-1") from None
    if len(shape) < 2 or min(shape) < 1 or axis not in (1, -1):
        raise ValueError(f"bad shape {spec!r}: at least 2 positive sizes; axis 1 or -1")
    if axis == -1 and len(shape) == 2:
        axis = 1
    label = str(shape) + (" axis=-1" if axis == -1 else "")
    return label, shape, axis


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bncy.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (1,2)")
    p.add_argument("--quick", action="store_true", help="a small subset, well under a minute")
    p.add_argument("--dtypes", default="float32,float64",
                   help="comma-separated: float32, float64, float16, bfloat16 (ml_dtypes)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--budget", type=float, default=1.5, help="seconds per timing at most")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--peers", default="", metavar="mkldnn,compile",
                   help="further torch peers: 'mkldnn' (oneDNN on x.to_mkldnn(), float32 "
                        "NCHW only) and 'compile' (the aten calls through torch.compile)")
    p.add_argument("--out", action="store_true",
                   help="bncy and torch write into preallocated outputs (out=, .out): "
                        "the kernels without the cost of fresh output pages")
    p.add_argument("--no-cache", action="store_true",
                   help="bncy allocates every output fresh (bncy.set_buffer_cache(0)), "
                        "as torch does")
    p.add_argument("--shape", action="append", metavar="AxBxC[:AXIS]",
                   help="a case to run instead of the default matrix (repeatable), e.g. "
                        "256x512x7x7 or 256x7x7x512:-1 (channel axis 1 unless given)")
    p.add_argument("--activation", choices=["relu"],
                   help="time the fused calls with this activation (torch: relu after "
                        "batch_norm; 'unfused': bncy then np.maximum)")
    p.add_argument("--residual", action="store_true",
                   help="time the fused calls with a residual added before the activation")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    try:
        dtypes = [parse_dtype(d) for d in args.dtypes.split(",")]
    except ValueError as e:
        p.error(str(e))
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shape:
        try:
            shapes = [parse_shape(q) for q in args.shape]
        except ValueError as e:
            p.error(str(e))
    repeats = 5 if args.quick else args.repeats
    budget = 0.3 if args.quick else args.budget
    peers = [q for q in args.peers.split(",") if q]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        p.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    cache = bncy.set_buffer_cache(0) if args.no_cache else None
    try:
        rows, bws = run(threads, shapes, dtypes, repeats, budget,
                        with_reference=not args.no_reference, peers=peers,
                        prealloc=args.out, activation=args.activation,
                        residual=args.residual)
        cache_info = bncy.buffer_cache_info()
    finally:
        if cache is not None:
            bncy.set_buffer_cache(cache)
    print(f"bncy {bncy.__version__}, OpenMP {bncy.openmp_enabled()}, isa {bncy.isa()}, "
          f"{platform.machine()}, {platform.python_version()}; outputs "
          + ("preallocated (--out)" if args.out else
             "new per call, bncy's " + ("fresh (--no-cache)" if args.no_cache
                                        else "from its buffer cache"))
          + (f"; fused: activation={args.activation}, residual={args.residual}"
             if args.activation or args.residual else ""))
    print(table(rows, bws, peers))
    halves = half_summary(rows)
    if halves:
        print("\n16-bit storage against bncy's own float32:\n" + halves)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bandwidth_gbs": bws, "rows": rows, "machine": platform.machine(),
                       "isa": bncy.isa(), "preallocated_outputs": args.out,
                       "buffer_cache": cache_info}, fh, indent=1)
    if args.plot:
        plot(rows, bws, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
