# ---------------------------------------------------------------------------
# Memory-bandwidth probes for bncy.bench (same compiler, flags and threads)
# ---------------------------------------------------------------------------

def stream_read(const floating[::1] x, int n_threads):
    """Sum of x in SEG-sized chunks (a read-only sweep); returns the sum."""
    cdef Py_ssize_t n = x.shape[0], nb = _cdiv(n, SEG), b
    cdef double total = 0.0
    with nogil:
        for b in prange(nb, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            total += _run_shifted_sum(&x[b * SEG], _imin(SEG, n - b * SEG), 0.0)
    return total


def stream_scale(const floating[::1] x, floating[::1] y_out, int n_threads):
    """y = 2 * x (one read and one write sweep)."""
    cdef Py_ssize_t n = x.shape[0], i
    with nogil:
        for i in prange(n, schedule='static', num_threads=n_threads,
                        use_threads_if=n_threads > 1):
            y_out[i] = x[i] * 2
