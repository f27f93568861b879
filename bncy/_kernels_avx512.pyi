# Same functions as bncy._kernels (the AVX-512 build of the same source).
from bncy._kernels import *  # noqa: F403
