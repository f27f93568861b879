# Type stub of bncy/_buffers.pyx, the cache of freed output buffers. Private: no
# validation (bncy.set_buffer_cache checks the limit).
import numpy as np
import numpy.typing as npt

MIN_BYTES: int
SLOTS: int

def set_limit(limit: int) -> int: ...
def info() -> tuple[int, int, int, int, int]: ...
def empty(shape: tuple[int, ...], dtype: npt.DTypeLike) -> npt.NDArray[np.floating]: ...
