"""Private kernels of bncy, baseline instruction set. Not public API: unchecked
loops behind bncy._api. The code and its Design notes are in _kernels_body.pxi."""

include "_kernels_body.pxi"
