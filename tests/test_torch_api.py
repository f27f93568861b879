"""bncy.torch: the op, the modules, convert, SyncBatchNorm over gloo, threads.

The oracle is PyTorch itself: torch.nn.functional.batch_norm and torch's modules
with autograd, in float64 (the float64 truth for float32 inputs too). Skipped
without torch==2.13.0 (pip install 'bncy[torch]')."""

import copy
import datetime
import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.__version__.startswith("2.13.0"):
    pytest.skip(f"bncy.torch is tested against torch 2.13.0, not {torch.__version__}",
                allow_module_level=True)

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch_resnet import resnet18  # noqa: E402  (tests/torch_resnet.py)

import bncy  # noqa: E402
import bncy.torch as bt  # noqa: E402

F = nn.functional
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(bncy.__file__)))


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def data(shape, dtype=torch.float64, seed=0, scale=2.0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def laid_out(t, layout):
    """t in a layout: "c" contiguous, "cl" channels_last, "perm" dense but neither,
    "sliced" not dense (every other element of the last axis)."""
    if layout == "cl":
        return t.contiguous(memory_format=CL[t.dim()])
    if layout == "perm":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced":
        return torch.stack([t, torch.full_like(t, 1e30)], dim=-1)[..., 0]
    return t.contiguous()


def tol(dtype):
    """(rtol, atol) against the float64 truth."""
    return (2e-6, 2e-6) if dtype == torch.float32 else (1e-10, 1e-11)


def assert_close(a, b, dtype, scale=1.0):
    rtol, atol = tol(dtype)
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale)


def vectors(C, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(C, generator=g, dtype=dtype), torch.randn(C, generator=g, dtype=dtype)
    rm = torch.randn(C, generator=g, dtype=dtype)
    rv = torch.rand(C, generator=g, dtype=dtype) + 0.5
    return w, b, rm, rv


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------
# the functional op against torch.nn.functional.batch_norm
# ---------------------------------------------------------------------------

CASES = [((16, 5), "c"), ((6, 4, 7), "c"), ((4, 3, 6, 7), "c"), ((4, 3, 6, 7), "cl"),
         ((2, 3, 1, 5), "cl"), ((3, 4, 3, 5, 6), "cl"), ((4, 3, 6, 7), "perm"),
         ((6, 4, 7), "sliced"), ((4, 3, 6, 7), "sliced")]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{lay}" for s, lay in CASES])
def test_matches_torch_functional(shape, layout, dtype, training, affine):
    """Forward, running statistics over 3 steps, and gradients, against torch's
    batch_norm in float64 on the same values."""
    C = shape[1]
    w, b, rm, rv = vectors(C, dtype)
    w, b = (w.requires_grad_(), b.requires_grad_()) if affine else (None, None)
    truth = [t if t is None else t.detach().double().clone().requires_grad_(t.requires_grad)
             for t in (w, b, rm, rv)]                  # copies, also of float64 tensors
    for step in range(3):
        x = laid_out(data(shape, dtype, seed=step, offset=step), layout).requires_grad_()
        x64 = x.detach().double().clone().requires_grad_()
        y = bt.batch_norm(x, rm, rv, w, b, training, momentum=0.2, eps=1e-3)
        y64 = F.batch_norm(x64, truth[2], truth[3], truth[0], truth[1], training,
                           momentum=0.2, eps=1e-3)
        assert y.dtype == dtype and y.shape == x.shape
        assert_close(y, y64, dtype, scale=10)
        assert_close(rm, truth[2], dtype)
        assert_close(rv, truth[3], dtype)
    # results keep the input's memory format; other layouts come back contiguous
    fmt = CL[x.dim()] if layout == "cl" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    grads, truths = _grads_and_truths(y, y64, x, x64, w, b, truth, shape, dtype)
    M = x.numel() // C
    for g, g64 in zip(grads, truths):
        assert g.dtype == dtype
        assert_close(g, g64, dtype, scale=M)


def _grads_and_truths(y, y64, x, x64, w, b, truth, shape, dtype):
    """The gradients of x (and of w, b when given) for one dy, through bncy's y and
    through the float64 truth y64 (whose w, b are truth[:2])."""
    dy = data(shape, dtype, seed=9, offset=0.0)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    truths = torch.autograd.grad(y64, [x64] + [t for t in truth[:2] if t is not None],
                                 dy.double())
    return grads, truths


def test_momentum_and_eps_edges_match_torch():
    x = data((8, 3, 4), torch.float64)
    for momentum, eps in [(0.0, 1e-30), (1.0, 1e-5), (0.5, 2.0)]:
        w, b, rm, rv = vectors(3, torch.float64)
        rm2, rv2 = rm.clone(), rv.clone()
        y = bt.batch_norm(x, rm, rv, w, b, True, momentum, eps)
        y2 = F.batch_norm(x, rm2, rv2, w, b, True, momentum, eps)
        torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close((rm, rv), (rm2, rv2), rtol=1e-13, atol=1e-14)


def test_training_without_running_statistics():
    x = data((10, 4), torch.float32)
    torch.testing.assert_close(bt.batch_norm(x, None, None, training=True),
                               F.batch_norm(x.double(), None, None, training=True).float(),
                               rtol=2e-6, atol=2e-6)


def test_empty_batch_in_eval_mode():
    w, b, rm, rv = vectors(3, torch.float32)
    x = torch.empty(0, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = bt.batch_norm(x, rm, rv, w, b, False)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 3, 0, 4)])
def test_empty_batch_in_training_as_torch(shape):
    """An empty batch in training (detection models' empty proposal batches): an
    empty result, zero gradients for weight and bias,
    the running statistics untouched, num_batches_tracked counted; through the
    eager path, the custom ops and the module, as torch does it."""
    for via in ("eager", "ops"):
        w, b, rm, rv = vectors(3, torch.float32)
        w.requires_grad_()
        b.requires_grad_()
        rm0, rv0 = rm.clone(), rv.clone()
        x = torch.empty(shape)
        if len(shape) == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        fn = bt.batch_norm if via == "eager" else bt._batch_norm_ops
        args = (x, rm, rv, w, b, True, 0.1, 1e-5) + (() if via == "eager" else (None, None))
        y = fn(*args)
        want = F.batch_norm(x, rm0.clone(), rv0.clone(), w, b, True)
        assert y.shape == want.shape and y.dtype == want.dtype
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
        assert gx.shape == x.shape and torch.equal(gw, torch.zeros(3))
        assert torch.equal(gb, torch.zeros(3))
        xh = torch.empty(shape, dtype=torch.bfloat16)   # 16-bit input, float32 parameters
        assert fn(xh, *args[1:]).dtype == torch.bfloat16
        r = torch.empty(shape).requires_grad_()          # a residual through ReLU
        fused = (x, rm, rv, w, b, True, 0.1, 1e-5) + ((r, "relu") if via == "ops" else ())
        y = fn(*fused, **({} if via == "ops" else {"residual": r, "activation": "relu"}))
        gx, gr = torch.autograd.grad(y.sum(), (x, r))
        assert gx.shape == gr.shape == x.shape
    m, ref = bt.BatchNorm2d(3), nn.BatchNorm2d(3)
    if len(shape) == 4:
        for mod in (m, ref):
            mod(torch.empty(shape))
        assert torch.equal(m.num_batches_tracked, ref.num_batches_tracked)
        assert torch.equal(m.running_mean, ref.running_mean)


def test_gradcheck_float64():
    """Finite differences through the eager path and through the custom op."""
    w, b, rm, rv = vectors(3, torch.float64)
    w.requires_grad_()
    b.requires_grad_()
    for layout in ("c", "cl"):
        x = laid_out(data((3, 3, 2, 2), seed=4), layout).requires_grad_()
        for training in (True, False):
            def eager(x_, w_, b_, training=training):
                return bt.batch_norm(x_, None if training else rm, None if training else rv,
                                     w_, b_, training, eps=1e-3)

            def op(x_, w_, b_, training=training):
                return torch.ops.bncy.batch_norm(x_, None if training else rm,
                                                 None if training else rv, w_, b_,
                                                 training, 1e-3)[0]

            assert torch.autograd.gradcheck(eager, (x, w, b))
            assert torch.autograd.gradcheck(op, (x, w, b))


def test_double_backward_is_refused_not_wrong():
    """create_graph=True works for the first derivative; a second one through the
    op raises instead of silently being zero."""
    x = data((8, 3)).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(bt.batch_norm(x, None, None, w, None, True).pow(3).sum(), x,
                             create_graph=True)
    x2 = x.detach().clone().requires_grad_()
    g2, = torch.autograd.grad(F.batch_norm(x2, None, None, w, None, True).pow(3).sum(), x2)
    torch.testing.assert_close(g.detach(), g2, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


@pytest.mark.parametrize("via", ["eager", "ops", "module"])
def test_second_derivative_with_inputs_raises(via):
    """A gradient penalty (WGAN-GP) through a batch norm: grad(penalty, W1), whose
    only path through the norm is its backward's dependence on x, raises rather
    than leaving that term out (once_differentiable's error node had no edges,
    so grad(..., inputs=...) never reached it). hessian too."""
    torch.manual_seed(0)
    lin, w = nn.Linear(4, 3).double(), torch.rand(3, dtype=torch.float64, requires_grad=True)
    if via == "module":
        bn = bt.BatchNorm1d(3).double()
    elif via == "eager":
        def bn(h):
            return bt.batch_norm(h, None, None, w, None, True)
    else:
        def bn(h):
            return bt._batch_norm_ops(h, None, None, w, None, True, 0.1, 1e-5, None, None)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(torch.tanh(bn(lin(x))).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(g.pow(2).sum(), lin.weight)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.functional.hessian(lambda a: bn(a).pow(3).sum(), data((4, 3)))


def test_saved_tensors_go_through_autograd():
    """The backward's tensors are saved with save_for_backward: saved-tensor hooks
    (activation checkpointing, save_on_cpu) see the input, and a block under
    torch.utils.checkpoint (non-reentrant) gives the gradients it gives without."""
    packed = []
    x = data((6, 3)).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t,
                                                  lambda t: t):
        bt.batch_norm(x, None, None, w, None, True)
    assert any(t is x for t in packed)
    torch.manual_seed(0)
    block = bt.convert(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(),
                                     nn.Linear(4, 2))).double()
    plain = torch.autograd.grad(block(x).pow(2).sum(), list(block.parameters()))
    ckpt = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    for a, b in zip(plain, torch.autograd.grad(ckpt.pow(2).sum(), list(block.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_counts_batches_as_torch(reentrant):
    """Under torch.utils.checkpoint the module's forward runs again in the backward
    (the non-reentrant kind stops once the saved tensors are packed): torch counts
    num_batches_tracked before its call, so it counts the re-run too. bncy counts
    the same, and with momentum=None the running statistics then follow torch's
    over several steps."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None)).double()
    mine = bt.convert(copy.deepcopy(ref))
    for step in range(3):
        x = data((6, 3), seed=step).requires_grad_()
        for m in (ref, mine):
            torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant).sum().backward()
        assert int(mine[1].num_batches_tracked) == int(ref[1].num_batches_tracked) > step + 1
        torch.testing.assert_close(mine[1].running_mean, ref[1].running_mean,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mine[1].running_var, ref[1].running_var,
                                   rtol=1e-12, atol=1e-12)


def test_forward_ad_and_func_transforms_raise():
    """Forward-mode AD and torch.func's grad transforms, which the op cannot
    follow, raise NotImplementedError (their tangents came out None or zero)."""
    import torch.autograd.forward_ad as fwAD
    x, t = data((6, 3)), torch.randn(6, 3, dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        bt.batch_norm(fwAD.make_dual(x, t), None, None, training=True)
    def f(a):
        return bt.batch_norm(a, None, None, training=True).pow(3).sum()
    for call in (lambda: torch.func.jvp(f, (x,), (t,)), lambda: torch.func.grad(f)(x),
                 lambda: torch.func.jacrev(f)(x)):
        with pytest.raises(NotImplementedError, match="not supported"):
            call()
    # no dual tensor among the arguments: runs as usual inside a dual level
    with fwAD.dual_level():
        assert torch.equal(bt.batch_norm(x, None, None, training=True),
                           bt.batch_norm(x, None, None, training=True))


def test_jit_trace_records_the_op():
    """torch.jit.trace goes through the custom ops: the traced module computes
    from its input (it had baked the traced output in as a constant)."""
    model = bt.convert(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))).double()
    x1, x2 = data((8, 4), seed=1), data((8, 4), seed=2)
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            traced = torch.jit.trace(model, x1, check_trace=False)
            assert torch.equal(traced(x2), model(x2))


def test_traced_training_module_leaves_stats_on_an_empty_batch():
    """A module traced in training mode and then given an empty batch leaves its
    running statistics as they are, as torch's does (the empty-batch check runs
    in the op, not once at trace time)."""
    mods = {"torch": nn.Sequential(nn.BatchNorm1d(3)).double()}
    mods["bncy"] = bt.convert(copy.deepcopy(mods["torch"]))
    x = data((6, 3), seed=1)
    for name, m in mods.items():
        with torch.no_grad(), pytest.warns():   # tracing itself warns (deprecated)
            traced = torch.jit.trace(m, x, check_trace=False)
        before = [t.clone() for t in (m[0].running_mean, m[0].running_var)]
        with torch.no_grad():
            traced(torch.empty(0, 3, dtype=torch.float64))
        assert torch.equal(m[0].running_mean, before[0]), name
        assert torch.equal(m[0].running_var, before[1]), name
        with torch.no_grad():
            traced(data((6, 3), seed=2))
        assert not torch.equal(m[0].running_mean, before[0]), name
    torch.testing.assert_close(mods["bncy"][0].running_var, mods["torch"][0].running_var,
                               rtol=1e-12, atol=1e-12)


def test_vmap_as_torch():
    """torch.vmap over training calls: per-sample statistics without running
    ones, an empty batch leaves the running statistics alone, and a batch with
    them raises (vmap cannot update one buffer per sample), as torch does."""
    x = data((3, 6, 4))
    y = torch.vmap(lambda t: bt.batch_norm(t, None, None, training=True))(x)
    assert torch.equal(y, torch.stack([bt.batch_norm(t, None, None, training=True)
                                       for t in x]))
    for fn in (bt.batch_norm, torch.nn.functional.batch_norm):
        rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        out = torch.vmap(lambda t: fn(t, rm, rv, training=True))(
            torch.empty(2, 0, 4, dtype=torch.float64))
        assert out.shape == (2, 0, 4) and torch.equal(rm, torch.zeros(4))
        assert torch.equal(rv, torch.ones(4))
        with pytest.raises(RuntimeError):
            torch.vmap(lambda t: fn(t, rm, rv, training=True))(x)


def test_fx_symbolic_trace():
    """bncy's batch_norm is a leaf of torch.fx.symbolic_trace, as torch's is; a
    module in training mode with running statistics is refused (the graph
    would not count num_batches_tracked)."""
    model = bt.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(2, 3, 4, 4)
    gm = torch.fx.symbolic_trace(model.eval())
    assert torch.equal(gm(x), model(x))
    gm = torch.fx.symbolic_trace(lambda a: bt.batch_norm(a, None, None, training=True))
    assert torch.equal(gm(x), bt.batch_norm(x, None, None, training=True))
    with pytest.raises(NotImplementedError, match="fx"):
        torch.fx.symbolic_trace(model.train())


@pytest.mark.parametrize("changed", ["input", "weight"])
def test_in_place_change_before_backward_raises_as_in_torch(changed):
    """Changing the input or the weight in place between the forward and the
    backward makes the backward raise, as it does with torch's batch norm."""
    for fn in (F.batch_norm, bt.batch_norm):
        x0 = data((6, 3)).requires_grad_()
        w = torch.rand(3, dtype=torch.float64, requires_grad=True)
        x = x0 * 1.0
        y = fn(x, None, None, w, None, True)
        with torch.no_grad():
            (x if changed == "input" else w).add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


# ---------------------------------------------------------------------------
# fused: activation(batch_norm(x) + residual) against torch's relu(F.batch_norm + r)
# ---------------------------------------------------------------------------

FUSED = [(None, True), ("relu", False), ("relu", True)]   # (activation, with a residual)


def _fused_truth(x, rm, rv, w, b, training, r, activation):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum=0.2, eps=1e-3)
    y = y if r is None else y + r
    return torch.relu(y) if activation else y


@pytest.mark.parametrize("activation,with_residual", FUSED)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["c", "cl"])
def test_fused_matches_torch(layout, dtype, training, activation, with_residual):
    """Output, running statistics and the gradients of x, weight, bias and the
    residual, against torch's relu(batch_norm(x) + r) in float64. The residual is
    in another layout (read as it is)."""
    shape, C = (6, 3, 4, 5), 3
    w, b, rm, rv = vectors(C, dtype)
    w.requires_grad_()
    b.requires_grad_()
    x = laid_out(data(shape, dtype, offset=0.5), layout).requires_grad_()
    r = laid_out(data(shape, dtype, seed=5, offset=0.0), "perm").requires_grad_() \
        if with_residual else None
    to64 = [t if t is None else t.detach().double().clone().requires_grad_(t.requires_grad)
            for t in (x, rm, rv, w, b, r)]
    y = bt.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-3, residual=r,
                      activation=activation)
    y64 = _fused_truth(*to64[:5], training, to64[5], activation)
    assert y.dtype == dtype and y.is_contiguous(
        memory_format=CL[4] if layout == "cl" else torch.contiguous_format)
    if activation:
        assert 0.2 < float((y64 == 0).double().mean()) < 0.8     # the mask matters
    assert_close(y, y64, dtype, scale=10)
    assert_close(rm, to64[1], dtype)
    assert_close(rv, to64[2], dtype)
    dy = data(shape, dtype, seed=9, offset=0.0)
    leaves = [t for t in (x, w, b, r) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    truths = torch.autograd.grad(y64, [t for t in (to64[0], *to64[3:]) if t is not None],
                                 dy.double())
    for g, g64 in zip(grads, truths):
        assert g.dtype == dtype
        assert_close(g, g64, dtype, scale=x.numel() // C)


@pytest.mark.parametrize("layout", ["c", "cl"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_opcheck(layout, training):
    x = laid_out(data((4, 3, 5, 6), offset=0.5), layout).requires_grad_()
    r = laid_out(data((4, 3, 5, 6), seed=5, offset=0.0), layout).requires_grad_()
    w, b, rm, rv = vectors(3, torch.float64)
    w.requires_grad_()
    b.requires_grad_()
    for args in [(x, rm, rv, w, b, training, 1e-5, r, "relu"),
                 (x, rm, rv, w, None, training, 1e-5, None, "relu"),
                 (x, rm, rv, None, b, training, 1e-5, r, None)]:
        torch.library.opcheck(torch.ops.bncy.batch_norm.default, args)
    _, mean, invstd, _ = torch.ops.bncy.batch_norm(x, rm, rv, w, b, training, 1e-5, r, "relu")
    torch.library.opcheck(torch.ops.bncy.batch_norm_backward.default,
                          (laid_out(data(x.shape, seed=3), layout), x.detach(), w.detach(),
                           mean, invstd, training, b.detach(), r.detach(), "relu"))


@pytest.mark.parametrize("training", [True, False])
def test_fused_compile_equals_eager_bitwise(training):
    """The custom ops (torch.compile, fullgraph) give the eager path's bits for the
    fused call: output, gradients of x, weight, bias and the residual, running
    statistics."""
    w, b, rm, rv = vectors(6, torch.float32)
    w.requires_grad_()
    b.requires_grad_()

    def f(x, r, rm, rv):
        return bt.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-4, residual=r,
                             activation="relu")

    x = laid_out(data((5, 6, 4, 3), torch.float32, offset=0.5), "cl").requires_grad_()
    r = data((5, 6, 4, 3), torch.float32, seed=5, offset=0.0).requires_grad_()
    stats = [(rm.clone(), rv.clone()) for _ in range(2)]
    eager = _step(lambda x_: f(x_, r, *stats[0]), x, w, b, r)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = _step(lambda x_: compiled(x_, r, *stats[1]), x, w, b, r)
    for a, e in zip(got, eager):
        assert torch.equal(a, e)
    assert torch.equal(stats[1][0], stats[0][0]) and torch.equal(stats[1][1], stats[0][1])


# ---------------------------------------------------------------------------
# memory: NumPy views, no copies for contiguous and channels_last
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["c", "cl", "perm"])
def test_contiguous_and_channels_last_are_not_copied(layout, monkeypatch):
    seen = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen[name] = (args, out)
            return out
        monkeypatch.setattr(bncy, name, wrapped)

    spy("forward", bncy.forward)
    spy("backward", bncy.backward)
    x = laid_out(data((4, 6, 5, 3), torch.float32), layout).requires_grad_()
    dy = laid_out(data((4, 6, 5, 3), torch.float32, seed=2), layout)
    y = bt.batch_norm(x, None, None, training=True)
    y.backward(dy)
    xn = seen["forward"][0][0]
    assert (xn.__array_interface__["data"][0] == x.data_ptr()) == (layout != "perm")
    # y is the array bncy returned, wrapped in place
    assert y.data_ptr() == seen["forward"][1][0].__array_interface__["data"][0]
    dyn = seen["backward"][0][0]
    assert (dyn.__array_interface__["data"][0] == dy.data_ptr()) == (layout != "perm")
    if layout != "perm":   # else autograd copies dx into x's own strides
        assert x.grad.data_ptr() == seen["backward"][1][0].__array_interface__["data"][0]


# ---------------------------------------------------------------------------
# errors: TypeError (dtype, kind, device) or ValueError (shape, parameter), nothing
# written
# ---------------------------------------------------------------------------

def _bad_calls():
    x = data((4, 3, 2, 2), torch.float32)
    w, b, rm, rv = vectors(3, torch.float32)
    meta = torch.empty(4, 3, 2, 2, device="meta")
    return [
        (TypeError, "float16 or float32", dict(input=x.half(), weight=w.double(),
                                               running_mean=None, running_var=None)),
        (TypeError, "share one dtype", dict(input=x.half(), running_mean=rm.half(),
                                            running_var=rv.half())),
        (TypeError, "share one dtype", dict(weight=w.half())),
        (TypeError, "float32, float64, float16 and bfloat16", dict(input=x.int())),
        (TypeError, "CPU", dict(input=meta)),
        (TypeError, "torch.Tensor", dict(input=x.numpy())),
        (TypeError, "dtype", dict(weight=w.double())),
        (TypeError, "CPU", dict(bias=torch.empty(3, device="meta"))),
        (TypeError, "layout", dict(input=x.to_sparse())),
        (TypeError, "real number", dict(momentum="0.1")),
        (ValueError, "2D", dict(input=x[0, 0, 0])),
        (ValueError, "shape", dict(weight=w[:2])),
        (ValueError, "both", dict(running_var=None)),
        (ValueError, "training=False", dict(running_mean=None, running_var=None,
                                            training=False)),
        (ValueError, "momentum", dict(momentum=1.5)),
        (ValueError, "eps", dict(eps=-1.0)),
        (ValueError, "eps", dict(eps=float("nan"))),
        (ValueError, "positive", dict(eps=0.0)),
        (ValueError, "more than 1 value", dict(input=x[:1, :, :1, :1])),
        (ValueError, "channels", dict(input=x[:, :0])),
        (ValueError, "activation", dict(activation="gelu")),
        (TypeError, "activation", dict(activation=1)),
        (ValueError, "residual", dict(residual=x[:2])),
        (TypeError, "residual", dict(residual=x.double())),
        (TypeError, "residual", dict(residual=x.numpy())),
    ], (x, w, b, rm, rv)


@pytest.mark.parametrize("case", range(len(_bad_calls()[0])))
def test_bad_input_raises_before_anything_is_written(case):
    calls, (x, w, b, rm, rv) = _bad_calls()
    kind, match, change = calls[case]
    args = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True,
                momentum=0.1, eps=1e-5)
    args.update(change)
    before = [t.clone() for t in (rm, rv)]
    with pytest.raises(kind, match=match):
        bt.batch_norm(**args)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_module_errors_leave_num_batches_tracked_alone():
    m = bt.BatchNorm2d(3)
    with pytest.raises(TypeError, match="supported dtypes"):
        m(torch.ones(2, 3, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError):
        m(torch.ones(1, 3, 1, 1))
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros(3))


def test_import_error_without_torch(tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import bncy.torch\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert "bncy[torch]" in r.stdout


# ---------------------------------------------------------------------------
# the custom ops: opcheck, torch.compile without graph breaks, same bits as eager
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["c", "cl"])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(layout, training):
    x = laid_out(data((4, 3, 5, 6)), layout).requires_grad_()
    w, b, rm, rv = vectors(3, torch.float64)
    w.requires_grad_()
    args = (x, rm, rv, w, None, training, 1e-5)
    torch.library.opcheck(torch.ops.bncy.batch_norm.default, args)
    if training:     # the running statistics are optional (and unused) when training
        torch.library.opcheck(torch.ops.bncy.batch_norm.default, (x, None, None) + args[3:])
    _, mean, invstd, _ = torch.ops.bncy.batch_norm(*args)
    torch.library.opcheck(torch.ops.bncy.batch_norm_backward.default,
                          (laid_out(data(x.shape, seed=3), layout), x.detach(), w.detach(),
                           mean, invstd, training))
    if training:
        torch.library.opcheck(torch.ops.bncy.update_running_stats.default,
                              (rm, rv, mean, torch.rand(3, dtype=torch.float64), 0.1))


def _step(fn, x, *params):
    """fn's output and the gradients of a weighted sum of it."""
    y = fn(x)
    loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()
    return (y.detach(), *torch.autograd.grad(loss, (x, *params)))


@pytest.mark.parametrize("layout", ["c", "cl"])
def test_compile_fullgraph_equals_eager_bitwise(layout):
    """torch.compile(fullgraph=True) traces through the custom ops (a graph break
    would raise) and gives the eager path's bits: y, gradients, running stats."""
    w, b, rm, rv = vectors(6, torch.float32)
    w.requires_grad_()
    b.requires_grad_()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, rm, rv):
        y = bt.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-4)
        return bt.batch_norm(torch.relu(y), rm, rv, w, None, False, 0.3, 1e-4)

    x = laid_out(data((5, 6, 4, 3), torch.float32), layout).requires_grad_()
    stats = [(rm.clone(), rv.clone()) for _ in range(3)]
    eager = _step(lambda x_: f(x_, *stats[0]), x, w, b)
    for backend, (srm, srv) in zip([record, "aot_eager"], stats[1:]):
        compiled = torch.compile(f, backend=backend, fullgraph=True)
        got = _step(lambda x_, c=compiled, a=srm, v=srv: c(x_, a, v), x, w, b)
        for a, e in zip(got, eager):
            assert torch.equal(a, e)
        assert torch.equal(srm, stats[0][0]) and torch.equal(srv, stats[0][1])
        assert got[0].is_contiguous(memory_format=CL[4] if layout == "cl"
                                    else torch.contiguous_format)
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {"bncy.batch_norm", "bncy.update_running_stats"} <= ops


# ---------------------------------------------------------------------------
# modules, convert, state_dict
# ---------------------------------------------------------------------------

MODULES = [(bt.BatchNorm1d, nn.BatchNorm1d, (8, 5)), (bt.BatchNorm1d, nn.BatchNorm1d, (8, 5, 3)),
           (bt.BatchNorm2d, nn.BatchNorm2d, (4, 5, 3, 3)),
           (bt.BatchNorm3d, nn.BatchNorm3d, (2, 5, 2, 3, 3))]
CONFIGS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
           dict(bias=False, momentum=0.5)]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("mine,theirs,shape", MODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_modules_match_torch_modules(mine, theirs, shape, config):
    a = mine(5, dtype=torch.float64, **config)
    t = theirs(5, dtype=torch.float64, **config)
    assert isinstance(a, theirs)
    if a.weight is not None:
        with torch.no_grad():
            a.weight.copy_(torch.linspace(0.5, 2, 5))
        t.weight = nn.Parameter(a.weight.detach().clone())
    assert list(a.state_dict()) == list(t.state_dict())
    for step in range(4):
        if step == 3:
            a.eval()
            t.eval()
        x = data(shape, seed=step, offset=step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        ya, yt = a(x), t(x2)
        torch.testing.assert_close(ya, yt, rtol=1e-10, atol=1e-11)
        ya.square().sum().backward()
        yt.square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-10)
        for p, q in zip(a.parameters(), t.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)
        for (k, u), v in zip(a.state_dict().items(), t.state_dict().values()):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-13, msg=k)


@pytest.mark.parametrize("training", [True, False])
def test_module_with_activation_matches_torch(training):
    """BatchNorm2d(activation="relu")(x, r) against relu(nn.BatchNorm2d(x) + r):
    outputs, running statistics and gradients over 2 steps (float64)."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    with torch.no_grad():
        for t in (ref.weight, ref.bias, ref.running_mean):
            t.normal_()
    mine = bt.BatchNorm2d(3, momentum=None, dtype=torch.float64, activation="relu")
    mine.load_state_dict(ref.state_dict())
    assert "activation='relu'" in repr(mine)
    for m in (ref, mine):
        m.train(training)
    for step in range(2):
        x = data((4, 3, 5, 5), seed=step, offset=0.0).requires_grad_()
        r = data((4, 3, 5, 5), seed=10 + step, offset=0.0).requires_grad_()
        x2, r2 = (t.detach().clone().requires_grad_() for t in (x, r))
        y, y2 = mine(x, r), torch.relu(ref(x2) + r2)
        torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
        g = torch.autograd.grad(y.sum(), (x, r, mine.weight, mine.bias))
        g2 = torch.autograd.grad(y2.sum(), (x2, r2, ref.weight, ref.bias))
        torch.testing.assert_close(g, g2, rtol=1e-10, atol=1e-10)
    for a, b in zip(mine.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="activation"):
        bt.BatchNorm1d(3, activation="tanh")
    with pytest.raises(ValueError, match="SyncBatchNorm fuses none"):
        bt.convert_sync_batchnorm(seq := nn.Sequential(nn.BatchNorm1d(3), mine))
    assert type(seq[0]) is nn.BatchNorm1d and type(mine) is bt.BatchNorm2d   # untouched


def test_state_dicts_are_interchangeable():
    t = nn.BatchNorm2d(4)
    t(data((3, 4, 2, 2), torch.float32))
    a = bt.BatchNorm2d(4)
    a.load_state_dict(t.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(a.state_dict()[k], v)
    a(data((3, 4, 2, 2), torch.float32, seed=5))
    t.load_state_dict(a.state_dict())
    assert int(t.num_batches_tracked) == 2


class MyBN(nn.BatchNorm2d):
    """A user's subclass: convert leaves it alone."""


def test_convert_swaps_in_place_and_keeps_every_tensor():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4),
                          nn.Sequential(nn.BatchNorm2d(2), MyBN(2), nn.SyncBatchNorm(2)),
                          nn.BatchNorm3d(2))
    model.eval()
    hook = model[1].register_forward_hook(lambda m, i, o: o * 2)
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    params = list(model.parameters())
    assert bt.convert(model) is model
    kinds = [type(m) for m in (model[1], model[2][0], model[2][1], model[2][2], model[3])]
    assert kinds == [bt.BatchNorm1d, bt.BatchNorm2d, MyBN, nn.SyncBatchNorm, bt.BatchNorm3d]
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is v for k, v in before.items())
    assert list(model.parameters()) == params and not model[1].training
    x = data((5, 3), torch.float32)
    expect = 2 * F.batch_norm(model[0](x), model[1].running_mean, model[1].running_var,
                              model[1].weight, model[1].bias, False)
    torch.testing.assert_close(model[:2](x), expect)          # the hook still runs
    hook.remove()
    bn = nn.BatchNorm2d(3)
    assert bt.convert(bn) is bn and type(bn) is bt.BatchNorm2d


def test_convert_refuses_non_cpu_and_converts_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, device="meta"))
    with pytest.raises(TypeError, match="meta"):
        bt.convert(model)
    assert [type(m) for m in model] == [nn.BatchNorm1d, nn.BatchNorm1d]
    with pytest.raises(TypeError, match="Module"):
        bt.convert("model")


def test_an_optimizer_built_before_convert_still_trains():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))
    ref.double()
    model = copy.deepcopy(ref)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, model)]
    bt.convert(model)
    for step in range(3):
        x = data((16, 4), seed=step)
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(ref.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# a ResNet-18-shaped model (tests/torch_resnet.py), converted
# ---------------------------------------------------------------------------

def _train(model, steps, seed=0, dtype=torch.float32, layout="c"):
    """Losses, outputs and parameter gradients of SGD steps on fixed batches."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = laid_out(torch.randn(4, 3, 16, 16, generator=g, dtype=dtype), layout)
        target = torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        y = model(x)
        loss = F.cross_entropy(y, target)
        loss.backward()
        out.append((loss.detach(), y.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return out


def _model(dtype=torch.float32, layout="c"):
    torch.manual_seed(0)
    m = resnet18(width=8, classes=10, small_input=True).to(dtype)
    return m.to(memory_format=torch.channels_last) if layout == "cl" else m


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converted_resnet_trains_like_torch(dtype):
    """Forward, loss and every parameter's gradient over 3 SGD steps, against the
    unconverted model (float32: 20 batch norms deep, relative to each tensor's norm)."""
    ref = _model(dtype)
    ours = bt.convert(copy.deepcopy(ref))
    assert sum(isinstance(m, bt.BatchNorm2d) for m in ours.modules()) == 20
    for (l1, y1, g1), (l2, y2, g2) in zip(_train(ref, 3, dtype=dtype),
                                          _train(ours, 3, dtype=dtype)):
        if dtype == torch.float64:
            torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-10)
            for a, b in zip(g2, g1):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        else:
            assert abs(float(l2 - l1)) < 1e-5 and _rel(y2, y1) < 1e-4
            assert max(_rel(a, b) for a, b in zip(g2, g1)) < 1e-2


def test_converted_resnet_is_bitwise_equal_at_1_and_2_threads(threads):
    """A training step of the channels_last model: the output, the loss, the input's
    gradient and every batch norm parameter's gradient. (The convolutions' weight
    gradients are torch's, whose sums over the batch depend on the thread count.)"""
    results = []
    for nt in (1, 2):
        torch.set_num_threads(nt)
        model = bt.convert(_model(layout="cl"))
        x = laid_out(data((4, 3, 16, 16), torch.float32), "cl").requires_grad_()
        y = model(x)
        loss = F.cross_entropy(y, torch.arange(4))
        loss.backward()
        bn = [p.grad for m in model.modules() if isinstance(m, bt.BatchNorm2d)
              for p in m.parameters()]
        results.append([y, loss, x.grad, *bn] + list(model.buffers()))
    assert len(results[0]) == 3 + 2 * 20 + 3 * 20
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_converted_resnet_compiled_matches_eager():
    """fullgraph: no graph break anywhere in the model; AOTAutograd through the ops'
    fake and autograd registrations; the same bits as eager."""
    eager = bt.convert(_model())
    compiled = copy.deepcopy(eager)
    opt_model = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for (l1, y1, g1), (l2, y2, g2) in zip(_train(eager, 2), _train(opt_model, 2)):
        assert torch.equal(l1, l2) and torch.equal(y1, y2)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    for a, b in zip(eager.buffers(), compiled.buffers()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_converted_resnet_under_inductor_matches_eager():
    """Inductor compiles the rest of the model to C++ (its own rounding): close."""
    eager = bt.convert(_model())
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    for (l1, y1, g1), (l2, y2, g2) in zip(_train(eager, 2), _train(compiled, 2)):
        torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-5)
        for a, b in zip(g2, g1):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------
# float16 and bfloat16 (bfloat16 needs ml_dtypes), torch's CPU mixed types
# ---------------------------------------------------------------------------

HALVES = [torch.float16, torch.bfloat16]
# one unit in the last place, relative: 11 and 8 significant bits
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def half(dtype):
    """dtype, after skipping a bfloat16 test when ml_dtypes is not installed."""
    if dtype == torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    return dtype


def assert_within_ulp(a, truth):
    """a (16-bit) within one unit in its last place of the float64 truth."""
    assert a.dtype in HALVES and truth.dtype == torch.float64
    torch.testing.assert_close(a.double(), truth, rtol=ULP[a.dtype], atol=1e-6)


@pytest.mark.parametrize("layout", ["c", "cl"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("params", ["same", "float32", "none"])
@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_half_matches_torch_functional_in_float64(dtype, params, training, layout):
    """16-bit input; weight, bias and running statistics in the input's dtype, in
    float32 (mixed precision), or none (no affine, float32 statistics), as torch's
    CPU batch_norm takes them. The oracle is torch in float64 on the same (widened)
    values: y, dx and the running statistics within 1 ulp of the 16-bit dtype,
    dweight and dbias in the parameters' dtype, close to the float64 truth."""
    dtype = half(dtype)
    pdt = {"same": dtype, "float32": torch.float32, "none": torch.float32}[params]
    C, shape = 3, (6, 3, 5, 4)
    w, b, rm, rv = (t.to(pdt) for t in vectors(C, torch.float64))
    w, b = (w.requires_grad_(), b.requires_grad_()) if params != "none" else (None, None)
    truth = [t if t is None else t.detach().double().requires_grad_(t.requires_grad)
             for t in (w, b, rm, rv)]
    for step in range(2):
        x = laid_out(data(shape, dtype, seed=step, offset=step), layout).requires_grad_()
        x64 = x.detach().double().requires_grad_()
        y = bt.batch_norm(x, rm, rv, w, b, training, momentum=0.2, eps=1e-3)
        y64 = F.batch_norm(x64, truth[2], truth[3], truth[0], truth[1], training,
                           momentum=0.2, eps=1e-3)
        assert y.dtype == dtype and y.shape == x.shape
        assert_within_ulp(y, y64.detach())
        assert rm.dtype == rv.dtype == pdt
        if pdt == dtype:    # rounded from a float32 copy: the float64 truth's ulp
            assert_within_ulp(rm, truth[2])
            assert_within_ulp(rv, truth[3])
            truth[2], truth[3] = rm.double(), rv.double()   # go on from the same values
        else:
            torch.testing.assert_close(rm.double(), truth[2], rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(rv.double(), truth[3], rtol=2e-6, atol=2e-6)
    fmt = CL[4] if layout == "cl" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    grads, truths = _grads_and_truths(y, y64, x, x64, w, b, truth, shape, dtype)
    assert grads[0].dtype == dtype
    assert_within_ulp(grads[0], truths[0])
    for g, g64 in zip(grads[1:], truths[1:]):
        assert g.dtype == pdt
        rtol = ULP[dtype] if pdt == dtype else 1e-5
        torch.testing.assert_close(g.double(), g64, rtol=rtol, atol=1e-4)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_half_mixed_types_follow_torch(dtype):
    """The dtype combinations torch's CPU batch_norm takes for a 16-bit input are
    the ones bncy takes; the others raise TypeError in both."""
    dtype = half(dtype)
    x = data((4, 3, 2), dtype)
    for pdt in (dtype, torch.float32, torch.float64):
        for rdt in (dtype, torch.float32, torch.float64):
            w, b, rm, rv = (t.to(dt) for t, dt in zip(vectors(3, torch.float64),
                                                      (pdt, pdt, rdt, rdt)))
            try:
                F.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
                ok = True
            except RuntimeError:
                ok = False
            if ok:
                y = bt.batch_norm(x, rm, rv, w, b, True)
                assert y.dtype == dtype
            else:
                with pytest.raises(TypeError, match="dtype"):
                    bt.batch_norm(x, rm, rv, w, b, True)
            assert ok == (pdt == rdt and pdt in (dtype, torch.float32)), (pdt, rdt)


@pytest.mark.parametrize("layout", ["c", "cl"])
@pytest.mark.parametrize("dtype,pdt", [(torch.bfloat16, torch.bfloat16),
                                       (torch.float16, torch.float32)], ids=str)
def test_half_bitwise_identical_at_1_and_2_threads(dtype, pdt, layout, threads):
    """y, the gradients and the running statistics (16-bit ones rounded from their
    float32 update) have the same bits at 1 and 2 threads."""
    dtype = half(dtype)
    results = []
    for nt in (1, 2):
        torch.set_num_threads(nt)
        w, b, _, _ = (t.to(pdt).requires_grad_() for t in vectors(16, torch.float64))
        rm, rv = torch.zeros(16, dtype=pdt), torch.ones(16, dtype=pdt)
        x = laid_out(data((8, 16, 24, 24), dtype), layout).requires_grad_()
        results.append((*_step(lambda x_: bt.batch_norm(x_, rm, rv, w, b, True), x, w, b),
                        rm, rv))
    for a, c in zip(*results):
        assert a.dtype == c.dtype and torch.equal(a.view(torch.int16) if a.itemsize == 2
                                                  else a, c.view(torch.int16)
                                                  if c.itemsize == 2 else c)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype,pdt", [(torch.bfloat16, torch.bfloat16),
                                       (torch.bfloat16, torch.float32),
                                       (torch.float16, torch.float16)], ids=str)
def test_half_opcheck(dtype, pdt, training):
    """The custom ops with 16-bit inputs, contiguous and channels_last: the fake
    implementations give the real dtypes (y and dx in the input's, dweight and dbias
    in the weight's, the statistics float64)."""
    dtype = half(dtype)
    w, b, rm, rv = (t.to(pdt) for t in vectors(3, torch.float64))
    w.requires_grad_()
    for layout in ("c", "cl"):
        x = laid_out(data((4, 3, 5, 6), dtype), layout).requires_grad_()
        args = (x, rm, rv, w, b, training, 1e-5)
        torch.library.opcheck(torch.ops.bncy.batch_norm.default, args)
        y, mean, invstd, _ = torch.ops.bncy.batch_norm(*args)
        assert y.dtype == dtype and mean.dtype == invstd.dtype == torch.float64
        bargs = (laid_out(data(x.shape, dtype, seed=3), layout), x.detach(), w.detach(),
                 mean, invstd, training)
        torch.library.opcheck(torch.ops.bncy.batch_norm_backward.default, bargs)
        dx, dw, db, _ = torch.ops.bncy.batch_norm_backward(*bargs)
        assert dx.dtype == dtype and dw.dtype == db.dtype == pdt
    if training:
        torch.library.opcheck(torch.ops.bncy.update_running_stats.default,
                              (rm, rv, mean, torch.rand(3, dtype=torch.float64), 0.1))


def test_half_compile_equals_eager_bitwise():
    """bfloat16 through the custom ops under torch.compile: the eager bits."""
    dtype = half(torch.bfloat16)
    w, b, _, _ = (t.to(dtype).requires_grad_() for t in vectors(3, torch.float64))
    runs = []
    for fn in (bt.batch_norm, torch.compile(bt.batch_norm, backend="aot_eager",
                                            fullgraph=True)):
        rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
        x = laid_out(data((4, 3, 5, 6), dtype), "cl").requires_grad_()
        runs.append((*_step(lambda x_: fn(x_, rm, rv, w, b, True), x, w, b), rm, rv))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_converted_model_in_bfloat16_trains():
    """model.to(torch.bfloat16) then convert: bfloat16 parameters and buffers; one
    SGD step matches torch's own bfloat16 model's within bfloat16's rounding, and
    the running statistics move and stay bfloat16."""
    half(torch.bfloat16)
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(8, 2)).to(torch.bfloat16)
    mine = bt.convert(copy.deepcopy(theirs))
    assert isinstance(mine[1], bt.BatchNorm2d) and mine[1].weight.dtype == torch.bfloat16
    x = data((8, 3, 6, 6), torch.bfloat16, offset=0.0)
    for model in (theirs, mine):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).square().mean().backward()
        opt.step()
    assert mine[1].running_mean.dtype == torch.bfloat16
    assert not torch.equal(mine[1].running_var, torch.ones(8, dtype=torch.bfloat16))
    assert int(mine[1].num_batches_tracked) == 1
    for (name, p), q in zip(theirs.state_dict().items(), mine.state_dict().values()):
        assert q.dtype == p.dtype, name
        torch.testing.assert_close(q.double(), p.double(), rtol=2 ** -6, atol=1e-2,
                                   msg=name)
    mine.eval()
    assert mine(x).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", HALVES)
def test_converted_model_under_cpu_autocast_as_torch(dtype):
    """torch.autocast("cpu") runs the convolutions in 16 bits and hands batch norm a
    16-bit input with float32 parameters and buffers (torch leaves batch_norm
    out of its cast lists). Over 2 SGD steps the converted model gives torch's
    output dtype, and its running statistics, gradients and eval output agree
    with torch's own model under autocast within the 16-bit rounding."""
    half(dtype)
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(),
                           nn.Linear(4 * 6 * 6, 2))
    mine = bt.convert(copy.deepcopy(theirs))
    x = data((8, 3, 6, 6), torch.float32, offset=0.0)
    grads = []
    for model in (theirs, mine):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                out = model(x)
            assert out.dtype == dtype
            out.float().square().mean().backward()
            opt.step()
        grads.append([p.grad for p in model.parameters()])
    assert isinstance(mine[1], bt.BatchNorm2d) and mine[1].running_mean.dtype == torch.float32
    for (name, p), q in zip(theirs.state_dict().items(), mine.state_dict().values()):
        assert q.dtype == p.dtype, name
        torch.testing.assert_close(q, p, rtol=ULP[dtype], atol=1e-5, msg=name)
    for g, h in zip(*grads):
        torch.testing.assert_close(h, g, rtol=ULP[dtype], atol=1e-4)
    for model in (theirs, mine):
        model.eval()
    with torch.autocast("cpu", dtype=dtype):
        y_theirs, y_mine = theirs(x), mine(x)
    assert y_mine.dtype == y_theirs.dtype == dtype
    torch.testing.assert_close(y_mine.float(), y_theirs.float(), rtol=2 * ULP[dtype],
                               atol=1e-3)


def test_bfloat16_without_ml_dtypes_raises_a_clear_type_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    monkeypatch.setattr(bt, "_BFLOAT16", [])
    x = data((4, 3), torch.bfloat16)
    with pytest.raises(TypeError, match="pip install ml_dtypes"):
        bt.batch_norm(x, None, None, training=True)
    with pytest.raises(TypeError, match="pip install ml_dtypes"):
        bt.BatchNorm1d(3)(x)
    assert bt.batch_norm(x.half(), None, None, training=True).dtype == torch.float16


# ---------------------------------------------------------------------------
# threads and determinism
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["c", "cl"])
def test_bitwise_identical_for_any_thread_count(layout, dtype, threads, monkeypatch):
    """Large enough for bncy's threads (>= 32768 values); the count bncy is given is
    torch's."""
    passed = []
    forward = bncy.forward
    monkeypatch.setattr(bncy, "forward",
                        lambda *a, **k: passed.append(k["n_threads"]) or forward(*a, **k))
    w, b, _, _ = vectors(16, dtype)
    w.requires_grad_()
    results = []
    for nt, deterministic in [(1, False), (2, False), (2, True), (1, True)]:
        torch.set_num_threads(nt)
        torch.use_deterministic_algorithms(deterministic)
        try:
            rm, rv = torch.zeros(16, dtype=dtype), torch.ones(16, dtype=dtype)
            x = laid_out(data((8, 16, 24, 24), dtype), layout).requires_grad_()
            results.append((*_step(lambda x_: bt.batch_norm(x_, rm, rv, w, b, True), x, w),
                            rm, rv))
        finally:
            torch.use_deterministic_algorithms(False)
    assert passed == [1, 2, 2, 1]
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


COEXIST = r"""
import os, sys, hashlib
order = sys.argv[1]
if order == "torch-first":
    import torch, bncy
else:
    import bncy, torch
import bncy.torch as bt
from threadpoolctl import threadpool_limits

def tasks():
    return len(os.listdir("/proc/self/task"))

def run():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, 32, generator=g).requires_grad_()   # 65536 values
    w = torch.ones(32, requires_grad=True)
    y = bt.batch_norm(x, None, None, w, None, True)
    (y * y).sum().backward()
    h = hashlib.sha256()
    for t in (y, x.grad, w.grad):
        h.update(t.detach().numpy().tobytes())
    return h.hexdigest()

start = tasks()
with threadpool_limits(1):
    assert torch.get_num_threads() == 1
    one = run()
assert tasks() == start, ("threadpoolctl's limit not honoured", start, tasks())
torch.set_num_threads(1)
assert run() == one and tasks() == start, ("set_num_threads(1) not honoured", tasks())
torch.set_num_threads(2)
two = run()
grew = tasks() > start
print(one == two, grew, bncy.openmp_enabled())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/task")
def test_openmp_coexistence_and_thread_limits(tmp_path):
    """Both import orders, each in a fresh process with OMP_NUM_THREADS=2 (run side
    by side): one thread under threadpoolctl and torch.set_num_threads(1) (no OpenMP
    thread started), a second thread at 2, the same bits either way."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", COEXIST, order], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for order in ("torch-first", "bncy-first")]
    outs = []
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        same, grew, openmp = out.split()
        assert same == "True"
        assert grew == openmp    # threads were started only where 2 were allowed


# ---------------------------------------------------------------------------
# SyncBatchNorm
# ---------------------------------------------------------------------------

def test_sync_batchnorm_without_a_process_group_is_batch_norm():
    assert not dist.is_initialized()
    s, t = bt.SyncBatchNorm(4, dtype=torch.float64), nn.BatchNorm2d(4, dtype=torch.float64)
    x = data((3, 4, 2, 5))
    torch.testing.assert_close(s(x), t(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.running_var, t.running_var, rtol=1e-13, atol=0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(bt.BatchNorm2d(3)),
                          nn.SyncBatchNorm(3), MyBN(3))
    weight = model[0].weight
    assert bt.convert_sync_batchnorm(model, process_group="pg") is model
    assert [type(m) for m in (model[0], model[1][0], model[2], model[3])] == [
        bt.SyncBatchNorm, bt.SyncBatchNorm, bt.SyncBatchNorm, MyBN]
    assert model[0].process_group == "pg" and model[0].weight is weight
    # DistributedDataParallel refuses torch.nn.SyncBatchNorm in a CPU model
    assert not isinstance(model[0], nn.SyncBatchNorm)
    assert isinstance(model[0], nn.modules.batchnorm._BatchNorm)
    with pytest.raises(TypeError, match="meta"):
        bt.convert_sync_batchnorm(nn.BatchNorm1d(2, device="meta"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo")
def test_sync_batchnorm_over_gloo_equals_one_process(tmp_path):
    """2 processes on 127.0.0.1 (see _sync_worker for what each checks)."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"        # the loopback interface only
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            "import test_torch_api as t; t._sync_worker(int(sys.argv[1]), 2, int(sys.argv[2]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank), str(port)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}:\n{out[-4000:]}"
        assert f"rank {rank}: ok" in out


def _sync_worker(rank, world, port):
    """One rank of test_sync_batchnorm_over_gloo_equals_one_process."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for dtype, layout, split in [(torch.float64, "c", (3, 5)),
                                     (torch.float32, "cl", (0, 6)),
                                     (torch.float64, "cl", (4, 1))]:
            _sync_matches_one_process(rank, dtype, layout, split)
        _sync_errors_raise_on_every_rank(rank)
        _sync_ddp_trains_like_one_process(rank, world)
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: ok", flush=True)


def _same_on_every_rank(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    assert all(torch.equal(parts[0], p) for p in parts[1:])


def _sync_matches_one_process(rank, dtype, layout, split):
    """Unequal parts of one batch (zero rows allowed): y and dx are the rows of the
    one-process result, the running statistics the whole batch's, the same bits on
    every rank and at 1 and 2 threads; bit for bit what bncy's split-phase API gives
    one process merging the same parts in rank order."""
    C, N = 4, sum(split)
    x = laid_out(data((N, C, 3, 5), dtype), layout)
    dy = laid_out(data((N, C, 3, 5), dtype, seed=7, offset=0.0), layout)
    w, b, _, _ = vectors(C, dtype)
    lo, hi = sum(split[:rank]), sum(split[:rank + 1])
    runs = []
    for nt in (1, 2):
        torch.set_num_threads(nt)
        m = bt.SyncBatchNorm(C, momentum=0.3, dtype=dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
        m(x[lo:hi])                                             # a first step: stats move
        xl = x[lo:hi].clone().requires_grad_()
        y = m(xl)
        y.backward(dy[lo:hi])
        runs.append((y.detach(), xl.grad, m.weight.grad, m.bias.grad, m.running_mean,
                     m.running_var))
        assert int(m.num_batches_tracked) == 2
    assert all(torch.equal(a, c) for a, c in zip(*runs))
    y, dx, dw, db, rm, rv = runs[0]
    if hi > lo:
        assert y.is_contiguous(memory_format=CL[4] if layout == "cl" else
                               torch.contiguous_format)
    for t in (rm, rv):
        _same_on_every_rank(t)
    # the float64 truth: torch on the whole batch in one process
    t = nn.BatchNorm2d(C, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        t.weight.copy_(w)
        t.bias.copy_(b)
    t(x.double())
    x64 = x.detach().double().clone().requires_grad_()
    t(x64).backward(dy.double())
    y64 = F.batch_norm(x.double(), None, None, t.weight, t.bias, True)
    assert_close(y, y64[lo:hi], dtype, scale=10)
    assert_close(dx, x64.grad[lo:hi], dtype, scale=N)
    assert_close(rm, t.running_mean, dtype)
    assert_close(rv, t.running_var, dtype)
    gw, gb = dw.clone(), db.clone()                           # DDP would sum these
    dist.all_reduce(gw)
    dist.all_reduce(gb)
    assert_close(gw, t.weight.grad, dtype, scale=N * 15)
    assert_close(gb, t.bias.grad, dtype, scale=N * 15)
    # bit for bit: one process driving bncy's split-phase API over the same parts
    parts = [x[sum(split[:r]):sum(split[:r + 1])] for r in range(len(split))]
    rm0, rv0 = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    for _ in range(2):
        total = bncy.merge_stats([bncy.batch_stats(p.numpy()) for p in parts])
        ys, mean, invstd = bncy.apply_stats(x[lo:hi].numpy(), total, w.numpy(), b.numpy(),
                                            running_mean=rm0.numpy(), running_var=rv0.numpy(),
                                            momentum=0.3)
    assert torch.equal(torch.from_numpy(ys), y)
    assert torch.equal(rm0, rm) and torch.equal(rv0, rv)
    dparts = [dy[sum(split[:r]):sum(split[:r + 1])] for r in range(len(split))]
    sums = [bncy.grad_stats(d.numpy(), p.numpy(), mean) for d, p in zip(dparts, parts)]
    dxs, _, _ = bncy.apply_grad(dy[lo:hi].numpy(), x[lo:hi].numpy(), mean, invstd,
                                bncy.merge_grad_stats(sums), total.count, w.numpy())
    assert torch.equal(torch.from_numpy(dxs), dx)
    assert torch.equal(db, torch.from_numpy(sums[rank].sum_dy.astype(dxs.dtype)))


def _sync_errors_raise_on_every_rank(rank):
    """A bad input on one rank: the same exception on every rank, no hang; the next
    step works."""
    m = bt.SyncBatchNorm(3)
    good = data((4, 3, 2, 2), torch.float32)
    cases = [(TypeError, "rank 1: .*supported dtypes", good.int() if rank == 1 else good),
             (TypeError, "ranks disagree on the dtype", good.half() if rank == 1 else good),
             (ValueError, "rank 0: expected 3 channels", good[:, :2] if rank == 0 else good),
             (ValueError, "rank 1: expected at least 2D", good[0, 0, 0] if rank == 1 else good),
             (ValueError, "more than 1 value per channel", good[:1, :, :1, :1]
              if rank == 0 else good[:0])]
    for kind, match, x in cases:
        with pytest.raises(kind, match=match):
            m(x)
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_var, torch.ones(3))
    x = good.clone().requires_grad_()
    m(x).sum().backward()
    assert int(m.num_batches_tracked) == 1


def _sync_ddp_trains_like_one_process(rank, world):
    """convert_sync_batchnorm + DistributedDataParallel on halves of each batch:
    the parameters after each SGD step are those of one process on whole batches."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double()
    one = bt.convert(copy.deepcopy(base))
    ddp = nn.parallel.DistributedDataParallel(bt.convert_sync_batchnorm(base))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (one, ddp)]
    for step in range(2):
        x = data((8, 3, 6, 6), seed=step)
        for model, opt, batch in [(one, opts[0], x), (ddp, opts[1], x.chunk(world)[rank])]:
            opt.zero_grad()
            model(batch).square().mean().backward()
            opt.step()
        for p, q in zip(one.state_dict().values(), ddp.module.state_dict().values()):
            torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)

