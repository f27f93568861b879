"""The build: OpenMP present, thread limits honoured, package metadata."""

import os

import numpy as np
import pytest

import bncy
from bncy import _kernels


def test_openmp_enabled():
    if os.environ.get("BNCY_EXPECT_SERIAL"):
        pytest.skip("serial build expected (BNCY_EXPECT_SERIAL set)")
    assert bncy.openmp_enabled(), (
        "bncy was built without OpenMP: the compiler could not build an OpenMP program "
        "(see the warning printed by setup.py); kernels run on one thread"
    )


def test_threadpoolctl_limits_are_honoured():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not bncy.openmp_enabled():
        pytest.skip("no OpenMP")
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert _kernels.max_threads() == 1
    assert _kernels.max_threads() >= 1


def test_version_and_public_names():
    assert isinstance(bncy.__version__, str) and bncy.__version__.count(".") >= 2
    for name in bncy.__all__:
        assert hasattr(bncy, name)


def test_gil_is_released_during_a_long_call():
    """Another Python thread makes progress in the middle of one long kernel call
    (with the GIL held it could only run before or after the call)."""
    import threading
    import time

    x = np.random.default_rng(0).standard_normal((4096, 4096))
    stamps = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    t = threading.Thread(target=tick)
    t.start()
    try:
        while not stamps:
            time.sleep(0.001)
        t0 = time.perf_counter()
        bncy.forward(x, n_threads=1)
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join()
    lo, hi = t0 + (t1 - t0) / 3, t0 + 2 * (t1 - t0) / 3
    assert sum(lo <= s <= hi for s in stamps) > 10


@pytest.mark.parametrize("cap", ["", "avx2", "baseline"])
def test_isa_is_the_widest_build_the_cpu_runs_within_the_cap(cap, tmp_path):
    """BNCY_ISA caps the build; without it the widest build this CPU supports runs.
    (The child runs in an empty folder: ``-c`` puts the working directory, perhaps
    the source tree, first on sys.path.)"""
    import subprocess
    import sys

    code = "import bncy, bncy._api as a; print(bncy.isa(), a._kernels.isa())"
    env = {**os.environ, "BNCY_ISA": cap}
    wide, narrow = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                  cwd=tmp_path, capture_output=True,
                                  text=True).stdout.split()
    order = ["baseline", "avx2", "avx512"]
    supported = ["baseline"]
    if _kernels.cpu_has_avx2() and _has_module("bncy._kernels_avx2"):
        supported.append("avx2")
        if _kernels.cpu_has_avx512() and _has_module("bncy._kernels_avx512"):
            supported.append("avx512")
    if cap:
        supported = [s for s in supported if order.index(s) <= order.index(cap)]
    assert wide == supported[-1]
    assert narrow == min(supported[-1], "avx2", key=order.index)


def _has_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None
