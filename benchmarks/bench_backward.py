"""bncy.backward: time, peak memory, achieved GB/s."""

import numpy as np

import bncy

from .common import DTYPES, LAYOUTS, THREADS, Benchmark, best_seconds, make_inputs


class Backward(Benchmark):
    params = [list(LAYOUTS), DTYPES, THREADS]
    param_names = ["layout", "dtype", "n_threads"]

    def setup(self, layout, dtype, n_threads):
        self.x, self.dy, self.axis, C = make_inputs(layout, dtype)
        self.gamma = np.ones(C, dtype)
        _, self.mean, self.invstd = bncy.forward(self.x, self.gamma, axis=self.axis)
        self.out = np.empty_like(self.x)

    def _call(self, n_threads):
        bncy.backward(self.dy, self.x, self.mean, self.invstd, self.gamma, axis=self.axis,
                      out=self.out, n_threads=n_threads)

    def time_backward(self, layout, dtype, n_threads):
        self._call(n_threads)

    def peakmem_backward_allocating(self, layout, dtype, n_threads):
        bncy.backward(self.dy, self.x, self.mean, self.invstd, axis=self.axis,
                      n_threads=n_threads)

    def track_backward_gbs(self, layout, dtype, n_threads):
        """x and dy read twice plus dx written, per second."""
        return 5 * self.x.nbytes / best_seconds(lambda: self._call(n_threads)) / 1e9

    track_backward_gbs.unit = "GB/s"
