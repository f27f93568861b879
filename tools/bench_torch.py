"""bncy.torch against PyTorch's own batch norm, as a PyTorch user calls them.

    python tools/bench_torch.py                     # the shapes below, 1 and 2 threads
    python tools/bench_torch.py --quick             # (64, 256) only
    python tools/bench_torch.py --resnet            # also a ResNet-18 training step
    python tools/bench_torch.py --json out.json

Per case and thread count, in one process, the calls of both libraries are
interleaved (one of each per round) and the minimum over the rounds is reported
(the medians are in the JSON):

* forward: a training-mode call with running statistics, under torch.no_grad();
* backward: the backward of one graph, replayed (retain_graph=True) for
  dx, dweight and dbias;
* fwd+bwd: a fresh training step, y = bn(x) then torch.autograd.grad(y, (x, w, b), dy);
* numpy: bncy.forward / bncy.backward on NumPy views of the same memory: what
  bncy.torch adds over bncy itself is the difference;
* floor (fwd+bwd only): the same step through a torch.autograd.Function that
  computes nothing (its forward and backward return new empty tensors): the
  least that autograd costs a Python-defined op, whatever it computes;
* bare (fwd+bwd only): the same step through a Function that makes NumPy views
  of the tensors, calls bncy.forward / bncy.backward and wraps the results, and
  does nothing else (no checks, no bookkeeping): the least that a Python op
  around bncy's kernels costs.

bncy.torch is ``bncy.torch.batch_norm`` (the eager path); torch is
``torch.nn.functional.batch_norm``. Outputs are new tensors on every call, as in
training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import bncy
import bncy.torch as bt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from torch_resnet import resnet18  # noqa: E402  (tests/torch_resnet.py)

SHAPES = [
    ("(64, 256)", (64, 256), False, torch.float32),
    ("(64, 256)", (64, 256), False, torch.float64),
    ("NCHW (32, 64, 56, 56)", (32, 64, 56, 56), False, torch.float32),
    ("NCHW (32, 64, 56, 56)", (32, 64, 56, 56), False, torch.float64),
    ("channels_last (32, 64, 56, 56)", (32, 64, 56, 56), True, torch.float32),
    ("(65536, 512)", (65536, 512), False, torch.float32),
]


def _rounds(fns: dict, repeats: int, budget: float) -> dict:
    """{name: (minimum, median)} seconds per call of each function. Each round
    calls every function in turn, each in a loop of as many calls as take about
    2 ms (one for slow calls; sized in a warm-up round), for up to ``repeats``
    rounds or ``budget`` seconds. The order rotates from round to round, so that
    no function always runs after the same one (whose data may still be in cache)."""
    loops = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        loops[k] = max(1, min(50, int(2e-3 / max(time.perf_counter() - t0, 1e-6))))
    items = list(fns.items())
    times = {k: [] for k in fns}
    end = time.perf_counter() + budget
    for r in range(repeats):
        for k, f in items[r % len(items):] + items[:r % len(items)]:
            n = loops[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times[k].append((time.perf_counter() - t0) / n)
        if r >= 4 and time.perf_counter() > end:
            break
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


class _Nothing(torch.autograd.Function):
    """A Function that computes nothing: autograd's own cost (see floor above)."""

    @staticmethod
    def forward(ctx, x, w, b):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return torch.empty_like(dy), dy.new_empty(dy.shape[1]), dy.new_empty(dy.shape[1])


class _Bare(torch.autograd.Function):
    """bncy's NumPy calls in a Function and nothing else (see bare above)."""

    @staticmethod
    def forward(ctx, x, w, b, rm, rv):
        y, mean, invstd = bncy.forward(x.detach().numpy(), w.detach().numpy(),
                                       b.detach().numpy(), running_mean=rm.numpy(),
                                       running_var=rv.numpy(), n_threads=torch.get_num_threads())
        ctx.save_for_backward(x, w)
        ctx.stats = mean, invstd
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        r = bncy.backward(dy.numpy(), x.detach().numpy(), *ctx.stats, w.detach().numpy(),
                          n_threads=torch.get_num_threads())
        return torch.from_numpy(r[0]), torch.from_numpy(r[1]), torch.from_numpy(r[2]), None, None


def _case(shape, channels_last, dtype):
    """The calls to time for one case: {name: callable}."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype) + 3
    dy = torch.randn(shape, generator=g, dtype=dtype)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    C = shape[1]
    w = torch.ones(C, dtype=dtype, requires_grad=True)
    b = torch.zeros(C, dtype=dtype, requires_grad=True)
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    xg = x.clone().requires_grad_()
    graphs = {name: fn(xg, rm.clone(), rv.clone(), w, b, True)
              for name, fn in (("bncy.torch", bt.batch_norm), ("torch", F.batch_norm))}
    xn, dyn = x.numpy(), dy.numpy()
    wn, bn_, rmn, rvn = (t.detach().numpy() for t in (w, b, rm, rv))
    _, mean, invstd = bncy.forward(xn, wn, bn_)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(x, rm, rv, w, b, True)
        return run

    def step(fn):
        return lambda: torch.autograd.grad(fn(xg, rm, rv, w, b, True), (xg, w, b), dy)

    def backward(name):
        return lambda: torch.autograd.grad(graphs[name], (xg, w, b), dy, retain_graph=True)

    nt = torch.get_num_threads

    def numpy_step():   # y lives until after the backward, as in a training step
        y, m, s = bncy.forward(xn, wn, bn_, running_mean=rmn, running_var=rvn, n_threads=nt())
        bncy.backward(dyn, xn, m, s, wn, n_threads=nt())
        return y

    return {
        ("forward", "bncy.torch"): forward(bt.batch_norm),
        ("forward", "torch"): forward(F.batch_norm),
        ("forward", "numpy"): lambda: bncy.forward(xn, wn, bn_, running_mean=rmn,
                                                   running_var=rvn, n_threads=nt()),
        ("backward", "bncy.torch"): backward("bncy.torch"),
        ("backward", "torch"): backward("torch"),
        ("backward", "numpy"): lambda: bncy.backward(dyn, xn, mean, invstd, wn,
                                                     n_threads=nt()),
        ("fwd+bwd", "bncy.torch"): step(bt.batch_norm),
        ("fwd+bwd", "torch"): step(F.batch_norm),
        ("fwd+bwd", "numpy"): lambda: numpy_step(),
        ("fwd+bwd", "floor"): lambda: torch.autograd.grad(_Nothing.apply(xg, w, b), (xg, w, b),
                                                          dy),
        ("fwd+bwd", "bare"): lambda: torch.autograd.grad(_Bare.apply(xg, w, b, rm, rv),
                                                         (xg, w, b), dy),
    }


def _fmt(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def run_ops(threads, shapes, repeats, budget):
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for label, shape, cl, dtype in shapes:
            calls = _case(shape, cl, dtype)
            t = _rounds(calls, repeats, budget)
            for op in ("forward", "backward", "fwd+bwd"):
                row = {"case": label, "dtype": str(dtype).removeprefix("torch."), "op": op,
                       "threads": nt}
                for who in ("bncy.torch", "torch", "numpy", "floor", "bare"):
                    if (op, who) in t:
                        key = who.replace(".", "_")
                        row[f"{key}_s"], row[f"{key}_median_s"] = t[(op, who)]
                rows.append(row)
            del calls
    return rows


def print_ops(rows):
    print(f"{'case':32s} {'dtype':8s} {'op':9s} {'thr':>3s} {'bncy.torch':>11s} "
          f"{'torch':>10s} {'vs torch':>9s} {'numpy':>10s} {'over numpy':>11s} "
          f"{'floor':>10s} {'over np+floor':>14s} {'bare':>10s} {'torch/bare':>11s}")
    for r in rows:
        numpy, floor, bare = r.get("numpy_s"), r.get("floor_s"), r.get("bare_s")
        over = "-" if numpy is None else f"{(r['bncy_torch_s'] - numpy) * 1e6:+.1f} us"
        over_floor = "-" if floor is None else \
            f"{(r['bncy_torch_s'] - numpy - floor) * 1e6:+.1f} us"
        vs_bare = "-" if bare is None else f"{r['torch_s'] / bare:.2f}x"
        print(f"{r['case']:32s} {r['dtype']:8s} {r['op']:9s} {r['threads']:>3d} "
              f"{_fmt(r['bncy_torch_s']):>11s} {_fmt(r['torch_s']):>10s} "
              f"{r['torch_s'] / r['bncy_torch_s']:>8.2f}x "
              f"{'-' if numpy is None else _fmt(numpy):>10s} {over:>11s} "
              f"{'-' if floor is None else _fmt(floor):>10s} {over_floor:>14s} "
              f"{'-' if bare is None else _fmt(bare):>10s} {vs_bare:>11s}")


# ---------------------------------------------------------------------------
# A ResNet-18 training step (torchvision's layout: tests/torch_resnet.py)
# ---------------------------------------------------------------------------

def run_resnet(threads, repeats, budget, batch=16, size=112, channels_last=False):
    """Seconds per SGD step (forward, cross-entropy, backward, update), torch's batch
    norm against bncy.convert'ed, interleaved."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = {"torch": resnet18().to(memory_format=fmt)}
    models["bncy.torch"] = bt.convert(resnet18().to(memory_format=fmt))
    models["bncy.torch"].load_state_dict(models["torch"].state_dict())
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,))
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        steps = {}
        for name, m in models.items():
            opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

            def step(m=m, opt=opt):
                opt.zero_grad()
                F.cross_entropy(m(x), target).backward()
                opt.step()
            steps[name] = step
        t = _rounds(steps, repeats, budget)
        rows.append({"case": f"ResNet-18 step, batch {batch}, {size}x{size}"
                     + (", channels_last" if channels_last else ""), "threads": nt,
                     "bncy_torch_s": t["bncy.torch"][0], "torch_s": t["torch"][0],
                     "bncy_torch_median_s": t["bncy.torch"][1],
                     "torch_median_s": t["torch"][1]})
    return rows


def print_resnet(rows):
    for r in rows:
        print(f"{r['case']:48s} thr {r['threads']}: bncy.torch {_fmt(r['bncy_torch_s'])}, "
              f"torch {_fmt(r['torch_s'])}, {r['torch_s'] / r['bncy_torch_s']:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=41, help="rounds per case (at most)")
    ap.add_argument("--budget", type=float, default=6.0, help="seconds per case (at most)")
    ap.add_argument("--quick", action="store_true", help="(64, 256) only")
    ap.add_argument("--resnet", action="store_true", help="also a ResNet-18 training step")
    ap.add_argument("--resnet-only", action="store_true")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    threads = [int(v) for v in args.threads.split(",")]
    print(f"bncy {bncy.__version__} (isa {bncy.isa()}, OpenMP {bncy.openmp_enabled()}), "
          f"torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}; minima of interleaved rounds")
    out = {}
    if not args.resnet_only:
        shapes = SHAPES[:2] if args.quick else SHAPES
        out["ops"] = run_ops(threads, shapes, args.repeats, args.budget)
        print_ops(out["ops"])
    if args.resnet or args.resnet_only:
        out["resnet"] = run_resnet(threads, min(args.repeats, 11), 4 * args.budget)
        print_resnet(out["resnet"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
