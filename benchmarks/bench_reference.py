"""The NumPy reference at one size, so that bncy's gap to it stays on record."""

from bncy import reference

from .common import DTYPES, Benchmark, make_inputs


class Reference(Benchmark):
    params = [DTYPES]
    param_names = ["dtype"]

    def setup(self, dtype):
        self.x, self.dy, self.axis, _ = make_inputs("NCHW", dtype)
        _, self.mean, self.invstd = reference.forward(self.x, axis=self.axis)

    def time_reference_forward(self, dtype):
        reference.forward(self.x, axis=self.axis)

    def time_reference_backward(self, dtype):
        reference.backward(self.dy, self.x, self.mean, self.invstd, axis=self.axis)
