"""Shared helpers: shapes, tolerances, data makers, the optional torch oracle."""

import os

import numpy as np
import pytest
from hypothesis import settings

import bncy

settings.register_profile("ci", max_examples=500, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

DTYPES = [np.float32, np.float64]
try:   # bfloat16 comes from ml_dtypes (the test extra); float16 is NumPy's
    import ml_dtypes
    HALF = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
except ImportError:
    HALF = [np.dtype(np.float16)]

# (shape, axis): every schedule and edge of the blocking (see bncy/kernels/common.pxi):
# rows (elementwise passes for S < 32; statistics also for longer runs when N >= S/8:
# float32 moments S < 256, float32 backward sums and float64 moments S < 128) with row
# blocks of 256 and column tiles of 1024 (256 with threads and few row blocks), planes
# (the rest) with segments of 4096, narrow rows (K < 16) R at a time, the smallest
# legal sizes, 3-D and 5-D, every axis form.
CASES = [
    ((2, 1), 1),            # M=2, C=1: the smallest training input
    ((2, 3), 1),
    ((7, 1), -1),
    ((64, 256), 1),         # exactly one block
    ((130, 513), 1),        # row blocks and column tiles with remainders
    ((270, 1301), 1),       # wide rows: elementwise passes in chunks of G rows x 8
                            # columns, with row and column remainders
    ((2305, 129), 1),       # float32 whole rows beyond L2 (1.2 MB): the prefetching
                            # backward sums; 9 row blocks and a last one of 1 row
    ((12801, 500), 1),      # rows of 500 columns beyond 24 MiB (both dtypes): the
                            # prefetching moments and grad_input, whole rows, pieces of
                            # 64 columns and one of 52; 51 row blocks, the last of 1 row
    ((4097, 1030), 1),      # rows of 1030 columns beyond 16 MiB, wider than grad_input's
                            # prefetching window: its chunks, with a column remainder
    ((3, 4, 5), 1),         # rows schedule with S=5 (columns merged per channel)
    ((2, 3, 4, 5), 1),      # NCHW, S=20 (rows schedule)
    ((3, 5, 6, 7), 1),      # NCHW, S=42, N < S/8: planes (one segment)
    ((8, 5, 6, 7), 1),      # S=42, N >= S/8: rows statistics, planes elementwise
    ((32, 3, 127), 1),      # the last run length with rows statistics for float64
                            # moments and float32 backward sums
    ((20, 2, 2, 64), 1),    # S=128: planes for those, rows for float32 moments
    ((40, 2, 255), 1),      # the last run length with rows float32 moments
    ((40, 2, 256), 1),      # S=256: planes statistics everywhere
    ((2, 3, 70, 70), 1),    # NCHW, S=4900 (planes, two segments)
    ((3, 5, 20011), 1),     # planes beyond L2 (1.2 MB): float32 grad_input on one thread
                            # prefetches; 5 segments a run, the last of 3627 values
    ((2, 5, 6, 7), -1),     # channels-last (N, H, W, C)
    ((40, 6, 6, 3), -1),    # narrow rows (K=3): affine 85 rows at a time, 80 left over;
                            # grad_input 42 at a time, 12 left over
    ((500, 3, 5), 1),       # narrow rows with S=5 (K=15), 17 and 8 rows at a time
    ((3, 4, 5), 0),         # channel axis first
    ((4, 3, 5, 2), 2),      # a middle axis
    ((2, 3, 2, 3, 4), 1),   # 5-D
    ((2, 3, 2, 3, 4), -2),
]


def case_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-ax{axis}"


def tol(dtype):
    """(rtol, atol) for results in dtype compared with the float64 reference."""
    if np.dtype(dtype) == np.float32:
        return 2e-6, 2e-6
    return 1e-11, 1e-11


def make(shape, dtype, rng, scale=1.0, offset=0.0):
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def force_threads():
    """Start OpenMP teams even for tiny inputs, so small tests exercise threads."""
    previous = bncy.set_knobs(small_work=0)
    yield
    bncy.set_knobs(small_work=previous["small_work"])


def per_channel(rng, C, dtype=np.float64):
    return rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
