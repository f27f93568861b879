"""bncy.set_buffer_cache and bncy.buffer_cache_info: the cache of freed output buffers.

Outputs of 4 MiB and more come from blocks that earlier outputs freed. These tests
check that a block is reused only once nothing refers to it, that a reused block's old
contents never leak into a result (results against the reference), and that the limit
and its validation hold."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import bncy
from bncy import reference
from conftest import tol as tolerances

MIB = 1 << 20


def _handler_name(a):
    core = getattr(np, "_core", None) or np.core
    return core.multiarray.get_handler_name(a)


@pytest.fixture
def cache():
    """The cache on with room for several blocks, emptied first; the old limit after."""
    old = bncy.set_buffer_cache(0)
    bncy.set_buffer_cache(256 * MIB)
    yield
    bncy.set_buffer_cache(old)


def _big(dtype, rows=1024, cols=2048, seed=0):
    # 8 MiB in float32, 16 MiB in float64: above the cache's 4 MiB threshold
    rng = np.random.default_rng(seed)
    return (3.0 + rng.standard_normal((rows, cols))).astype(dtype)


def _addr(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_freed_output_is_reused_and_overwritten(cache, dtype):
    x = _big(dtype)
    g = np.linspace(0.5, 2.0, x.shape[1])
    b = np.linspace(-1.0, 1.0, x.shape[1])
    y, _, _ = bncy.forward(x, g, b)
    assert _handler_name(y) == "bncy_buffers"
    a = _addr(y)
    y[...] = np.nan  # what the block holds when it is handed out again
    del y
    before = bncy.buffer_cache_info()
    assert before["blocks"] == 1 and before["held"] == x.nbytes
    y2, mean, invstd = bncy.forward(x, g, b)
    after = bncy.buffer_cache_info()
    assert _addr(y2) == a
    assert after["hits"] == before["hits"] + 1 and after["held"] == 0
    ref, rmean, rinvstd = reference.forward(x, g, b)
    rtol, atol = tolerances(dtype)
    assert_allclose(y2, ref, rtol=rtol, atol=atol)
    assert_allclose(mean, rmean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_inference_and_layout_copies_use_it(cache, dtype):
    x = _big(dtype)
    dy = _big(dtype, seed=1)
    C = x.shape[1]
    g = np.linspace(0.5, 2.0, C)
    _, mean, invstd = bncy.forward(x, g)
    rtol, atol = tolerances(dtype)
    for _ in range(2):  # the second round takes the blocks the first freed
        dx, dg, db = bncy.backward(dy, x, mean, invstd, g)
        rdx, rdg, rdb = reference.backward(dy, x, mean, invstd, g)
        assert _handler_name(dx) == "bncy_buffers"
        assert_allclose(dx, rdx, rtol=rtol, atol=atol)
        dx[...] = np.nan
        del dx
        var = 1.0 / invstd**2
        y = bncy.inference(x, mean, var, g)
        assert _handler_name(y) == "bncy_buffers"
        assert_allclose(y, reference.inference(x, mean, var, g), rtol=rtol, atol=atol)
        y[...] = np.inf
        del y
        # Fortran order: bncy copies x to C order first (a cached block too)
        xf = np.asfortranarray(x)
        yf, mf, _ = bncy.forward(xf, g)
        assert_allclose(yf, reference.forward(x, g)[0], rtol=rtol, atol=atol)
        assert_allclose(mf, mean, rtol=1e-12, atol=1e-12)
        del yf, xf
    assert bncy.buffer_cache_info()["hits"] >= 3


def test_a_view_keeps_its_block(cache):
    x1, x2 = _big(np.float64, seed=1), _big(np.float64, seed=2)
    y1, _, _ = bncy.forward(x1)
    view = y1[3:, ::2]
    snapshot = view.copy()
    del y1  # the view still holds the block: nothing is freed
    assert bncy.buffer_cache_info()["blocks"] == 0
    y2, _, _ = bncy.forward(x2)
    assert not np.shares_memory(view, y2)
    assert_array_equal(view, snapshot)
    base = view.base
    del view, base
    assert bncy.buffer_cache_info()["blocks"] == 1


def test_limit_bounds_what_it_holds(cache):
    x = _big(np.float32)  # 8 MiB outputs
    bncy.set_buffer_cache(3 * x.nbytes)
    ys = [bncy.forward(x)[0] for _ in range(5)]
    addrs = [_addr(y) for y in ys]
    for i in range(5):  # freed in order: the first two are dropped
        ys[i] = None
    info = bncy.buffer_cache_info()
    assert info["blocks"] == 3 and info["held"] == 3 * x.nbytes <= info["limit"]
    # newest first: the next output takes the block freed last
    y = bncy.forward(x)[0]
    assert _addr(y) == addrs[4]
    del y
    assert sorted(addrs[2:]) == sorted(set(addrs[2:]))  # three distinct blocks
    assert bncy.set_buffer_cache(x.nbytes) == 3 * x.nbytes
    assert bncy.buffer_cache_info()["held"] <= x.nbytes


def test_limit_zero_turns_it_off(cache):
    x = _big(np.float32)
    y = bncy.forward(x)[0]
    del y
    assert bncy.buffer_cache_info()["blocks"] == 1
    bncy.set_buffer_cache(0)
    info = bncy.buffer_cache_info()
    assert info["blocks"] == 0 and info["held"] == 0 and info["limit"] == 0
    y = bncy.forward(x)[0]
    assert _handler_name(y) != "bncy_buffers"
    assert bncy.buffer_cache_info()["hits"] == info["hits"]
    rtol, atol = tolerances(np.float32)
    assert_allclose(y, reference.forward(x)[0], rtol=rtol, atol=atol)


def test_small_outputs_and_out_bypass_it(cache):
    before = bncy.buffer_cache_info()
    x = np.random.default_rng(0).standard_normal((64, 256))
    y = bncy.forward(x)[0]
    assert _handler_name(y) != "bncy_buffers"
    big = _big(np.float64)
    out = np.empty_like(big)
    y = bncy.forward(big, out=out)[0]
    assert y is out and _handler_name(y) != "bncy_buffers"
    after = bncy.buffer_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_resize_of_a_cached_output(cache):
    x = _big(np.float64)
    y = bncy.forward(x)[0]
    head = y[:10].copy()
    y.resize((x.shape[0] + 7, x.shape[1]), refcheck=False)  # the handler's realloc
    assert_array_equal(y[:10], head)
    del y  # freed with its new size
    info = bncy.buffer_cache_info()
    assert info["blocks"] == 1 and info["held"] == (x.shape[0] + 7) * x.shape[1] * 8


def test_threads_share_it(cache):
    xs = [_big(np.float32, rows=512, seed=s) for s in range(4)]  # 4 MiB each
    want = [bncy.forward(x, n_threads=1)[0] for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(8):
                y = bncy.forward(xs[i], n_threads=1)[0]
                if not np.array_equal(y, want[i]):
                    errors.append(i)
                y[...] = np.nan
                del y
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    assert bncy.buffer_cache_info()["hits"] > 0


@pytest.mark.parametrize("bad", [1.5, "1", None, True, np.float64(8.0)])
def test_limit_type_error(cache, bad):
    with pytest.raises(TypeError, match="limit must be an integer"):
        bncy.set_buffer_cache(bad)


def test_limit_value_error(cache):
    limit = bncy.buffer_cache_info()["limit"]
    with pytest.raises(ValueError, match="limit must be >= 0"):
        bncy.set_buffer_cache(-1)
    assert bncy.buffer_cache_info()["limit"] == limit
    assert bncy.set_buffer_cache(np.int64(5 * MIB)) == limit
    assert bncy.buffer_cache_info()["limit"] == 5 * MIB


def _python(code, cache, cwd):
    """Run code in a new interpreter with BNCY_BUFFER_CACHE=cache and the bncy under
    test first on its path (run from cwd, away from a source tree's bncy/)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(bncy.__file__)))
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, BNCY_BUFFER_CACHE=cache, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, cwd=cwd)


def test_environment_variable(tmp_path):
    code = "import bncy; print(bncy.buffer_cache_info()['limit'])"
    r = _python(code, str(12 * MIB), tmp_path)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == 12 * MIB
    r = _python(code, "0", tmp_path)
    assert r.returncode == 0 and int(r.stdout) == 0
    for bad in ("lots", "-5"):
        r = _python(code, bad, tmp_path)
        assert r.returncode != 0 and "BNCY_BUFFER_CACHE" in r.stderr


OOM_SCRIPT = r"""
import re, resource, numpy as np, bncy
MIB = 1 << 20
xa = np.ones((96 * MIB // 4 // 1024, 1024), np.float32)
xb = np.ones((300 * MIB // 4 // 1024, 1024), np.float32)
ys = [bncy.forward(xa, n_threads=1)[0] for _ in range(3)]
del ys  # three 96 MiB blocks wait in the cache
assert bncy.buffer_cache_info()["held"] == 3 * xa.nbytes
vm = int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 250 * MIB, resource.RLIM_INFINITY))
y = bncy.forward(xb, n_threads=1)[0]  # 300 MiB: fits only once the cache lets go
assert bncy.buffer_cache_info()["held"] == 0
assert float(y[5, 7]) == 0.0
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and RLIMIT_AS")
def test_out_of_memory_gives_the_cache_back(tmp_path):
    r = _python(OOM_SCRIPT, str(1 << 30), tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
