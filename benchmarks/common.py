"""Shared pieces of bncy's asv suite: data makers, parameters, the base class.

Conventions of NumPy's and scikit-learn's suites: one module per public function
family, classes with ``params``/``param_names``, ``setup``, ``time_*`` (wall clock:
a CPU-time timer would add up the OpenMP threads), ``peakmem_*``, and ``track_*``
for figures that are not times (GB/s, fraction of the bandwidth bound).
"""

import timeit

import numpy as np

# (name, shape, channel axis): 2-D, NCHW and NHWC, small and large, and the two
# edges of the schedules: 7x7 maps (runs of 49 values: rows statistics, planes
# elementwise passes) and 3 channels last (narrow rows)
LAYOUTS = {
    "MxD-small": ((64, 256), 1),
    "MxD-large": ((8192, 1024), 1),
    "NCHW": ((16, 64, 32, 32), 1),
    "NHWC": ((16, 32, 32, 64), -1),
    "NCHW-7x7": ((64, 256, 7, 7), 1),
    "NHWC-C3": ((32, 112, 112, 3), -1),
}
DTYPES = ["float32", "float64"]
THREADS = [1, 2]


def make_inputs(layout, dtype, seed=0):
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    return x, dy, axis, C


class Benchmark:
    """Base class: wall-clock timing, one process, short runs."""

    timer = timeit.default_timer
    processes = 1
    repeat = (3, 10, 10.0)
    number = 0
    warmup_time = 0.05
    timeout = 120


def best_seconds(f, repeats=5):
    f()
    return min(timeit.repeat(f, number=1, repeat=repeats))
