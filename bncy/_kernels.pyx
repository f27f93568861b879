"""Private kernels of bncy, baseline instruction set. Not public API: unchecked
loops behind bncy._api. The code and its Design notes are in kernels/ (common.pxi)."""

include "kernels/kernels.pxi"
