"""bncy.forward (training) and bncy.inference: time, peak memory, achieved GB/s."""

import numpy as np

import bncy

from .common import DTYPES, LAYOUTS, THREADS, Benchmark, best_seconds, make_inputs


class Forward(Benchmark):
    params = [list(LAYOUTS), DTYPES, THREADS]
    param_names = ["layout", "dtype", "n_threads"]

    def setup(self, layout, dtype, n_threads):
        self.x, _, self.axis, C = make_inputs(layout, dtype)
        self.gamma, self.beta = np.ones(C, dtype), np.zeros(C, dtype)
        self.rm, self.rv = np.zeros(C), np.ones(C)
        self.out = np.empty_like(self.x)

    def _call(self):
        bncy.forward(self.x, self.gamma, self.beta, axis=self.axis, running_mean=self.rm,
                     running_var=self.rv, out=self.out, n_threads=self.n_threads)

    def time_forward(self, layout, dtype, n_threads):
        self.n_threads = n_threads
        self._call()

    def peakmem_forward_allocating(self, layout, dtype, n_threads):
        bncy.forward(self.x, axis=self.axis, n_threads=n_threads)

    def track_forward_gbs(self, layout, dtype, n_threads):
        """x's bytes read twice plus y's bytes written, per second."""
        self.n_threads = n_threads
        return 3 * self.x.nbytes / best_seconds(self._call) / 1e9

    track_forward_gbs.unit = "GB/s"


class Inference(Benchmark):
    params = [list(LAYOUTS), DTYPES, THREADS]
    param_names = ["layout", "dtype", "n_threads"]

    def setup(self, layout, dtype, n_threads):
        self.x, _, self.axis, C = make_inputs(layout, dtype)
        self.rm, self.rv = np.zeros(C), np.ones(C)
        self.out = np.empty_like(self.x)

    def time_inference(self, layout, dtype, n_threads):
        bncy.inference(self.x, self.rm, self.rv, axis=self.axis, out=self.out,
                       n_threads=n_threads)

    def track_inference_vs_copy(self, layout, dtype, n_threads):
        """Inference time over np.copyto's (the 2-crossing floor); 1.0 is ideal."""
        t = best_seconds(lambda: bncy.inference(self.x, self.rm, self.rv, axis=self.axis,
                                                out=self.out, n_threads=n_threads))
        return t / best_seconds(lambda: np.copyto(self.out, self.x))

    track_inference_vs_copy.unit = "ratio"
