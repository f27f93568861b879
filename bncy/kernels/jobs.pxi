# ---------------------------------------------------------------------------
# Jobs: per-channel coefficients, the running-statistics update, one core per job
# ---------------------------------------------------------------------------
# Each job has one core (nogil, on pointers), which the fast paths and the entry
# points below (bncy._api's general path, the split-phase API, the layer) all run:
#   forward   = _moments, then _apply_core
#   apply     = _apply_core: _train_coefficients, then _finish_train (the affine
#               pass and the running-statistics update, _ema)
#   backward  = _grad_sums, then _grad_apply_core: _backward_coefficients, then
#               _grad_input
#   inference = _inference_core: its scale, then the affine pass
# Per-channel vectors are C doubles; gamma and beta may be NULL (ones, zeros).

cimport numpy as cnp

cnp.import_array()


cdef int _train_coefficients(const double* mean, const double* m2, Py_ssize_t C,
                             double count, double eps, const double* gamma,
                             double* var_out, double* invstd_out,
                             double* scale_out) noexcept nogil:
    # Per channel: var, invstd, gamma * invstd, in loops without branches (gcc
    # vectorises them; a vector lane computes what a scalar one did). Counts the
    # channels that need bncy._api's scaled recomputation: a non-finite mean or
    # M2 (float64 data whose squares overflow, or NaN/inf in the channel), or a
    # variance below DBL_MIN (squares that underflowed to subnormals or 0, or a
    # constant channel) with eps <= DBL_MIN * 2**53, too small to outweigh the
    # bits it lost (_rescue_extreme_channels selects the same channels).
    cdef Py_ssize_t c
    cdef int suspicious = 0
    for c in range(C):
        var_out[c] = m2[c] / count
        invstd_out[c] = 1.0 / sqrt(var_out[c] + eps)
    if gamma != NULL:
        for c in range(C):
            scale_out[c] = invstd_out[c] * gamma[c]
    else:
        for c in range(C):
            scale_out[c] = invstd_out[c]
    for c in range(C):
        if (not (m2[c] - m2[c] == 0.0) or not (mean[c] - mean[c] == 0.0)
                or (m2[c] < count * DBL_MIN and eps <= DBL_MIN * 9007199254740992.0)):
            suspicious += 1
    return suspicious


cdef struct Running:
    # A running statistic to update in place: its data, its stride in bytes and
    # its type (NPY_FLOAT32 or NPY_FLOAT64); data NULL when there is none.
    char* data
    Py_ssize_t stride
    int t


cdef void _ema(Running r, const double* v, Py_ssize_t C, double momentum,
               double factor) noexcept nogil:
    # r = (1 - momentum) * r + momentum * (factor * v), in float64, rounded once.
    # A contiguous statistic takes a loop gcc vectorises (the same operations).
    cdef Py_ssize_t c
    cdef float* f = <float*> r.data
    cdef double* d = <double*> r.data
    if r.t == cnp.NPY_FLOAT32 and r.stride == sizeof(float):
        for c in range(C):
            f[c] = <float> ((1.0 - momentum) * f[c] + momentum * (factor * v[c]))
    elif r.t == cnp.NPY_FLOAT32:
        for c in range(C):
            f = <float*> (r.data + c * r.stride)
            f[0] = <float> ((1.0 - momentum) * f[0] + momentum * (factor * v[c]))
    elif r.stride == sizeof(double):
        for c in range(C):
            d[c] = (1.0 - momentum) * d[c] + momentum * (factor * v[c])
    else:
        for c in range(C):
            d = <double*> (r.data + c * r.stride)
            d[0] = (1.0 - momentum) * d[0] + momentum * (factor * v[c])


cdef int _finish_train(const stored* x, const stored* res, bint relu, Py_ssize_t N,
                       Py_ssize_t C, Py_ssize_t S, const double* mean, const double* m2, const double* scale,
                       const double* shift, double count, stored* y_out,
                       Running rm, Running rv, double momentum,
                       int n_threads) noexcept nogil:
    # The affine pass with (mean, scale, shift), the residual res (NULL: none)
    # and ReLU when relu (none when x is empty), then the running statistics with the batch mean and the unbiased variance
    # m2 / (count - 1). Returns 0, or -1 when a work buffer could not be had
    # (nothing written then).
    cdef int rc = 0
    if N * C * S > 0:
        rc = _affine_fused(x, res, relu, mean, scale, shift, N, C, S, y_out, n_threads)
    if rc == 0 and rm.data != NULL:
        _ema(rm, mean, C, momentum, 1.0)
        _ema(rv, m2, C, momentum, 1.0 / (count - 1.0))
    return rc


cdef int _apply_core(const stored* x, const stored* res, bint relu, Py_ssize_t N,
                     Py_ssize_t C, Py_ssize_t S, double count, const double* mean, const double* m2,
                     const double* gamma, const double* shift, double eps,
                     stored* y_out, double* var_out, double* invstd_out,
                     double* scale_out, Running rm, Running rv, double momentum,
                     bint rescue, int n_threads, int* suspicious) noexcept nogil:
    # Coefficients, then _finish_train. With rescue, a channel that needs
    # bncy._api's scaled recomputation (*suspicious > 0) stops it before anything
    # is written; without, the coefficients are used as they are (NaN/inf
    # propagate). Returns 0, or -1 when a work buffer could not be had.
    suspicious[0] = _train_coefficients(mean, m2, C, count, eps, gamma, var_out,
                                        invstd_out, scale_out)
    if rescue and suspicious[0] != 0:
        return 0
    return _finish_train(x, res, relu, N, C, S, mean, m2, scale_out, shift, count, y_out,
                         rm, rv, momentum, n_threads)


cdef int _forward_core(const stored* x, const stored* res, bint relu, Py_ssize_t N,
                       Py_ssize_t C, Py_ssize_t S, const double* gamma, const double* shift, double eps,
                       stored* y_out, double* mean_out, double* m2_out, double* var_out,
                       double* invstd_out, double* scale_out, Running rm, Running rv,
                       double momentum, int n_threads, int* suspicious) noexcept nogil:
    # _moments, then _apply_core with rescue.
    cdef int rc = _moments(x, N, C, S, mean_out, m2_out, NULL, n_threads)
    suspicious[0] = 0
    if rc != 0:
        return rc
    return _apply_core(x, res, relu, N, C, S, <double> (N * S), mean_out, m2_out, gamma, shift, eps,
                       y_out, var_out, invstd_out, scale_out, rm, rv, momentum, True,
                       n_threads, suspicious)


cdef void _backward_coefficients(const double* sdy, const double* sdyx,
                                 const double* invstd, const double* gamma, Py_ssize_t C,
                                 double count, bint batch_stats, double* a_out,
                                 double* b_out, double* k_out,
                                 double* dgamma_out) noexcept nogil:
    # dx = a*dy + b*xhat + k (the closed form, see docs/derivation.md), each
    # product grouped so that every factor is O(1) or O(dy) whatever x's
    # magnitude. batch_stats False: mean and invstd were constants (an eval-mode
    # pass), so dx = gamma * invstd * dy.
    # (The eval-mode zeros are a loop of their own: a select in this loop kept
    # gcc from vectorising its divisions.)
    cdef Py_ssize_t c
    cdef double s, g
    for c in range(C):
        g = gamma[c] if gamma != NULL else 1.0
        s = invstd[c]
        dgamma_out[c] = sdyx[c] * s
        a_out[c] = g * s
        b_out[c] = -(g * s) * ((s * sdyx[c]) / count)
        k_out[c] = -(g * s) * (sdy[c] / count)
    if not batch_stats:
        for c in range(C):
            b_out[c] = 0.0
            k_out[c] = 0.0


cdef int _grad_apply_core(const stored* dy, const stored* x, const stored* res,
                          bint relu, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                          Py_ssize_t P, const double* mean, const double* invstd,
                          const double* gamma, const double* shift, const double* sdy,
                          const double* sdyx, double count, bint batch_stats,
                          stored* dx_out, stored* dres_out, double* dgamma_out,
                          double* work, int n_threads) noexcept nogil:
    # Coefficients from the (merged) sums, then grad_input (none when x is
    # empty), through ReLU when relu (mask from x, the coefficients, shift and
    # res; with res, its gradient to dres_out); work holds 3 * C doubles. P as
    # in _grad_sums. Returns 0, or -1 when a work buffer could not be had.
    _backward_coefficients(sdy, sdyx, invstd, gamma, C, count, batch_stats, work,
                           work + C, work + 2 * C, dgamma_out)
    if N * C * S == 0:
        return 0
    return _grad_input_fused(dy, x, res, relu, mean, invstd, work, work + C, work + 2 * C,
                             shift, N, C, S, P, dx_out, dres_out, n_threads)


cdef int _inference_core(const stored* x, const stored* res, bint relu, Py_ssize_t N,
                         Py_ssize_t C, Py_ssize_t S, const double* running_mean, const double* running_var,
                         const double* gamma, const double* beta, double eps,
                         stored* y_out, double* work, int n_threads) noexcept nogil:
    # scale = gamma / sqrt(running_var + eps), then the affine pass (with res
    # and relu as in _finish_train); work holds
    # 2 * C doubles. Returns 0, or -1 when a work buffer could not be had.
    # (Loops without branches, which gcc vectorises.)
    cdef Py_ssize_t c
    for c in range(C):
        work[c] = 1.0 / sqrt(running_var[c] + eps)
    if gamma != NULL:
        for c in range(C):
            work[c] = work[c] * gamma[c]
    for c in range(C):
        work[C + c] = beta[c] if beta != NULL else 0.0
    return _affine_fused(x, res, relu, running_mean, work, work + C, N, C, S, y_out,
                         n_threads)


# ---------------------------------------------------------------------------
# Entry points for bncy._api's general path: arrays already validated, laid out
# as C-contiguous (N, C, S) views, per-channel vectors as float64 (or None)
# ---------------------------------------------------------------------------

cdef Running _running(object r):
    # A validated running statistic (a writeable float32/float64 ndarray of any
    # stride), or None.
    cdef Running out
    out.data = NULL
    out.stride = 0
    out.t = cnp.NPY_FLOAT64
    if r is not None:
        out.data = <char*> cnp.PyArray_DATA(<cnp.ndarray> r)
        out.stride = cnp.PyArray_STRIDES(<cnp.ndarray> r)[0]
        out.t = cnp.PyArray_TYPE(<cnp.ndarray> r)
    return out


cdef inline const double* _opt(const double[::1] v):
    # The data of an optional per-channel vector, NULL for None.
    return &v[0] if v is not None else NULL


def apply_train(const stored[:, :, ::1] x,   # IN (N, C, S), may be empty
                const stored[:, :, ::1] res, # IN (N, C, S) residual, or None
                bint relu,                     # IN ReLU after the residual
                double count,                  # IN values per channel, whole batch
                const double[::1] mean,        # IN (C,) batch mean
                const double[::1] m2,          # IN (C,) its M2
                const double[::1] gamma,       # IN (C,) or None (ones)
                const double[::1] shift,       # IN (C,) beta, or zeros
                double eps,
                stored[:, :, ::1] y_out,     # OUT (N, C, S), may be x itself
                double[::1] var_out,           # OUT (C,)
                double[::1] invstd_out,        # OUT (C,)
                double[::1] scale_out,         # OUT (C,) gamma * invstd
                running_mean, running_var,     # IN/OUT (C,) ndarrays, or None
                double momentum, int n_threads):
    """_apply_core without rescue: the coefficients, the affine pass, the running
    statistics (NaN/inf propagate). Returns the count of channels to rescue."""
    cdef int rc, suspicious = 0
    cdef Running rm = _running(running_mean), rv = _running(running_var)
    cdef const double* gam = _opt(gamma)
    cdef bint some = x.shape[0] * x.shape[2] > 0
    with nogil:
        rc = _apply_core(&x[0, 0, 0] if some else NULL,
                         &res[0, 0, 0] if some and res is not None else NULL, relu,
                         x.shape[0], mean.shape[0],
                         x.shape[2], count, &mean[0], &m2[0], gam, &shift[0], eps,
                         &y_out[0, 0, 0] if some else NULL,
                         &var_out[0], &invstd_out[0], &scale_out[0], rm, rv, momentum,
                         False, n_threads, &suspicious)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the per-column coefficients")
    return suspicious


def finish_train(const stored[:, :, ::1] x, const stored[:, :, ::1] res, bint relu,
                 double count, const double[::1] mean,
                 const double[::1] m2, const double[::1] scale, const double[::1] shift,
                 stored[:, :, ::1] y_out, running_mean, running_var, double momentum,
                 int n_threads):
    """_finish_train with coefficients bncy._api has rescued."""
    cdef int rc
    cdef Running rm = _running(running_mean), rv = _running(running_var)
    with nogil:
        rc = _finish_train(&x[0, 0, 0], &res[0, 0, 0] if res is not None else NULL, relu,
                           x.shape[0], x.shape[1], x.shape[2], &mean[0],
                           &m2[0], &scale[0], &shift[0], count, &y_out[0, 0, 0], rm, rv,
                           momentum, n_threads)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the per-column coefficients")


def forward_train(const stored[:, :, ::1] x,   # IN (N, C, S)
                  const stored[:, :, ::1] res, # IN (N, C, S) residual, or None
                  bint relu,                     # IN ReLU after the residual
                  const double[::1] gamma,       # IN (C,) or None (ones)
                  const double[::1] shift,       # IN (C,) beta, or zeros
                  double eps,
                  stored[:, :, ::1] y_out,     # OUT (N, C, S), may be x itself
                  double[::1] mean_out,          # OUT (C,)
                  double[::1] m2_out,            # OUT (C,)
                  double[::1] var_out,           # OUT (C,)
                  double[::1] invstd_out,        # OUT (C,)
                  double[::1] scale_out,         # OUT (C,) gamma * invstd
                  running_mean, running_var, double momentum, int n_threads):
    """moments, then _apply_core with rescue. Returns the count of channels to
    rescue; when it is not 0, y and the running statistics are left unwritten."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef int rc, suspicious = 0
    cdef Running rm = _running(running_mean), rv = _running(running_var)
    cdef const double* gam = _opt(gamma)
    with nogil:
        rc = _forward_core(&x[0, 0, 0], &res[0, 0, 0] if res is not None else NULL, relu,
                           N, C, S, gam, &shift[0], eps, &y_out[0, 0, 0],
                           &mean_out[0], &m2_out[0], &var_out[0], &invstd_out[0],
                           &scale_out[0], rm, rv, momentum, n_threads, &suspicious)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the partial statistics")
    return suspicious


def apply_grad(const stored[:, :, ::1] dy,   # IN (N, C, S), may be empty
               const stored[:, :, ::1] x,    # IN (N, C, S)
               const stored[:, :, ::1] res,  # IN (N, C, S) residual, or None
               bint relu,                      # IN through ReLU
               const double[::1] mean,         # IN (C,)
               const double[::1] invstd,       # IN (C,)
               const double[::1] gamma,        # IN (C,) or None (ones)
               const double[::1] shift,        # IN (C,) beta (for the mask)
               const double[::1] sdy,          # IN (C,) sum of dy, whole batch
               const double[::1] sdyx,         # IN (C,) sum of dy * (x - mean)
               double count, bint batch_stats,
               stored[:, :, ::1] dx_out,     # OUT (N, C, S), may be dy or x
               stored[:, :, ::1] dres_out,   # OUT (N, C, S) with res, else None
               double[::1] dgamma_out,         # OUT (C,)
               int n_threads):
    """_grad_apply_core: the coefficients from the (merged) sums, then dx (and
    the residual's gradient)."""
    cdef Py_ssize_t N = x.shape[0], C = mean.shape[0], S = x.shape[2]
    cdef bint some = N * S > 0
    cdef int rc
    cdef const double* gam = _opt(gamma)
    cdef double* work = <double*> malloc(3 * C * sizeof(double))
    if work == NULL:
        raise MemoryError("bncy: could not allocate the per-channel coefficients")
    with nogil:
        rc = _grad_apply_core(&dy[0, 0, 0] if some else NULL, &x[0, 0, 0] if some else NULL,
                              &res[0, 0, 0] if some and res is not None else NULL, relu,
                              N, C, S, C * S, &mean[0], &invstd[0], gam, &shift[0], &sdy[0],
                              &sdyx[0], count, batch_stats,
                              &dx_out[0, 0, 0] if some else NULL,
                              &dres_out[0, 0, 0] if some and res is not None else NULL,
                              &dgamma_out[0], work, n_threads)
    free(work)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the per-column coefficients")


def backward_train(const stored[:, :, ::1] dy,   # IN (N, C, S)
                   const stored[:, :, ::1] x,    # IN (N, C, S)
                   const stored[:, :, ::1] res,  # IN (N, C, S) residual, or None
                   bint relu,                      # IN through ReLU
                   const double[::1] mean,         # IN (C,)
                   const double[::1] invstd,       # IN (C,)
                   const double[::1] gamma,        # IN (C,) or None (ones)
                   const double[::1] shift,        # IN (C,) beta (for the mask)
                   stored[:, :, ::1] dx_out,     # OUT (N, C, S), may be dy or x
                   stored[:, :, ::1] dres_out,   # OUT (N, C, S) with res, else None
                   double[::1] sdy_out,            # OUT (C,) sum of dy (= dbeta)
                   double[::1] dgamma_out,         # OUT (C,)
                   int n_threads):
    """grad_sums, then apply_grad (batch statistics)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef int rc
    cdef const double* gam = _opt(gamma)
    cdef double* work = <double*> malloc(5 * C * sizeof(double))
    if work == NULL:
        raise MemoryError("bncy: could not allocate the per-channel coefficients")
    with nogil:
        rc = _backward_core(&dy[0, 0, 0], &x[0, 0, 0],
                            &res[0, 0, 0] if res is not None else NULL, relu, N, C, S,
                            &mean[0], &invstd[0], gam, &shift[0], &dx_out[0, 0, 0],
                            &dres_out[0, 0, 0] if res is not None else NULL,
                            &sdy_out[0], &dgamma_out[0], work, n_threads)
    free(work)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the partial sums")


cdef void _forward_scale(const double* invstd, const double* gamma, Py_ssize_t C,
                         double* scale_out) noexcept nogil:
    # gamma * invstd as the forward computed it (_train_coefficients), for the
    # ReLU mask.
    cdef Py_ssize_t c
    for c in range(C):
        scale_out[c] = invstd[c] * gamma[c] if gamma != NULL else invstd[c]


cdef int _backward_core(const stored* dy, const stored* x, const stored* res,
                        bint relu, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                        const double* mean, const double* invstd, const double* gamma,
                        const double* shift, stored* dx_out, stored* dres_out,
                        double* sdy_out, double* dgamma_out, double* work,
                        int n_threads) noexcept nogil:
    # grad_sums (masked when relu), then _grad_apply_core; work holds 5 * C
    # doubles. With a residual (through ReLU) beyond L2 (_res_grad_in_sums), the
    # sums pass writes its gradient, the masked dy, to dres_out and dx comes from
    # that, unmasked; else grad_input masks again and writes both (as the split
    # phases do). The same bits either way. dres_out may be dy or res, never x.
    # Channels go in groups of G (_bwd_group): each group's sums, then its dx,
    # while its planes are still in cache. A channel's values are the same
    # whatever the group (its sums and its dx depend on its own planes only).
    # A failed allocation in a later group leaves the earlier groups' dx written.
    cdef int rc = 0
    cdef bint in_sums = res != NULL and _res_grad_in_sums(N * C * S * sizeof(stored))
    cdef Py_ssize_t G = _bwd_group(N, C, S, sizeof(stored)), c0 = 0, o, Cg
    cdef const double* scale = work + 4 * C
    cdef const stored* rg
    bncy_assert(res == NULL or (relu and dres_out != NULL and dres_out != x))
    _forward_scale(invstd, gamma, C, work + 4 * C)
    while rc == 0:
        Cg = _imin(G, C - c0)
        o = c0 * S
        rg = _cat(res, o)
        rc = _grad_sums_fused(dy + o, x + o, rg, _at(dres_out, o) if in_sums else NULL,
                              relu, mean + c0, scale + c0, _cd(shift, c0), N, Cg, S, C * S,
                              sdy_out + c0, work + c0, n_threads)
        if rc == 0:
            if in_sums:   # dx from the residual's gradient, unmasked
                rg = NULL
            rc = _grad_apply_core(<const stored*> _at(dres_out, o) if in_sums else dy + o, x + o,
                                  rg, relu and not in_sums,
                                  N, Cg, S, C * S, mean + c0, invstd + c0, _cd(gamma, c0),
                                  _cd(shift, c0), sdy_out + c0, work + c0, <double> (N * S),
                                  True, dx_out + o, _at(dres_out, o), dgamma_out + c0,
                                  work + C + 3 * c0, n_threads)
        c0 += G
        if c0 >= C:
            break
    return rc


def inference_train(const stored[:, :, ::1] x,   # IN (N, C, S)
                    const stored[:, :, ::1] res, # IN (N, C, S) residual, or None
                    bint relu,                     # IN ReLU after the residual
                    const double[::1] running_mean, const double[::1] running_var,
                    const double[::1] gamma,        # IN (C,) or None (ones)
                    const double[::1] beta,         # IN (C,) or None (zeros)
                    double eps,
                    stored[:, :, ::1] y_out,      # OUT (N, C, S), may be x itself
                    int n_threads):
    """_inference_core (bncy.inference)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2]
    cdef int rc
    cdef const double* gam = _opt(gamma)
    cdef const double* bet = _opt(beta)
    cdef double* work = <double*> malloc(2 * C * sizeof(double))
    if work == NULL:
        raise MemoryError("bncy: could not allocate the per-channel coefficients")
    with nogil:
        rc = _inference_core(&x[0, 0, 0], &res[0, 0, 0] if res is not None else NULL,
                             relu, N, C, S, &running_mean[0], &running_var[0],
                             gam, bet, eps, &y_out[0, 0, 0], work,
                             n_threads)
    free(work)
    if rc != 0:
        raise MemoryError("bncy: could not allocate the per-column coefficients")
