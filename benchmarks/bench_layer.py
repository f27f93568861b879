"""bncy.BatchNorm: one training step (forward and backward) of the layer."""

import numpy as np

import bncy

from .common import DTYPES, Benchmark, make_inputs


class LayerStep(Benchmark):
    params = [["MxD-small", "NCHW"], DTYPES]
    param_names = ["layout", "dtype"]

    def setup(self, layout, dtype):
        self.x, self.dy, axis, C = make_inputs(layout, dtype)
        self.bn = bncy.BatchNorm(C, axis=axis, dtype=np.dtype(dtype))

    def time_train_step(self, layout, dtype):
        self.bn(self.x)
        self.bn.backward(self.dy)
