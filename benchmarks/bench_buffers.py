"""bncy's buffer cache (bncy.set_buffer_cache): calls that allocate their outputs,
with the cache on and off. Arrays beyond glibc's 32 MiB mmap threshold, where a
fresh output is new pages that the kernel zeroes on first write."""

import numpy as np

import bncy

from .common import THREADS, Benchmark

SHAPES = {"65536x512": (65536, 512), "1024x8192": (1024, 8192)}


class AllocatingCalls(Benchmark):
    params = [list(SHAPES), ["float32", "float64"], THREADS, [True, False]]
    param_names = ["shape", "dtype", "n_threads", "cache"]

    def setup(self, shape, dtype, n_threads, cache):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(SHAPES[shape]).astype(dtype)
        self.dy = rng.standard_normal(SHAPES[shape]).astype(dtype)
        _, self.mean, self.invstd = bncy.forward(self.x)
        self.limit = bncy.set_buffer_cache((1 << 30) if cache else 0)

    def teardown(self, shape, dtype, n_threads, cache):
        bncy.set_buffer_cache(self.limit)

    def time_forward(self, shape, dtype, n_threads, cache):
        bncy.forward(self.x, n_threads=n_threads)

    def time_backward(self, shape, dtype, n_threads, cache):
        bncy.backward(self.dy, self.x, self.mean, self.invstd, n_threads=n_threads)
