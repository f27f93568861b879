# ---------------------------------------------------------------------------
# Fast paths: bncy.forward, inference and backward for the plain call
# ---------------------------------------------------------------------------
# A small call spent more time in bncy._api's Python checks and allocations
# (4-5 us) than in the kernels. These take the public arguments as given (the
# fused ones too: activation None or "relu", a residual plain like x) and run
# only when each one is the plain case: exact ndarrays of native float32, float64,
# float16 or bfloat16 (ml_dtypes' dtype, known by its name, see _plain_type),
# C-contiguous and aligned; vectors of shape (C,); a float eps >= 0 and a float
# momentum in [0, 1]; running statistics both given and writeable, or neither;
# n_threads None or an int >= 1; enough values per channel; out None or a plain
# writeable array of x's shape and dtype that does not partly overlap the inputs
# (it may be x or dy itself: the kernels write element i after reading it). For
# anything else they return None before allocating or writing anything, and
# bncy._api takes its general path, which raises the error or normalises the
# layout. Both paths run the same cores (_forward_core, _backward_core,
# _inference_core, see jobs.pxi), so they return the same bits; tests/test_errors.py
# runs its table of bad calls through these too, and each must decline. The C
# work buffer is taken last, after every check and every allocation that could
# raise, so it is always freed.

from libc.math cimport isfinite
from libc.string cimport memcpy, memset

from bncy._buffers cimport new_array

cdef enum:
    MAX_FAST_THREADS = 4096

cdef extern from "numpy/arrayobject.h":
    enum:
        NPY_HALF      # float16's type number
        NPY_USERDEF   # the first type number of user types (bfloat16's is one)


cdef int _bf16_type = -1   # bfloat16's type number, once an array has shown it


cdef int _plain_type(object a) noexcept:
    # The type number (NPY_FLOAT32, NPY_FLOAT64, NPY_HALF or bfloat16's) of an
    # exact ndarray of native floats, C-contiguous and aligned; -1 for anything
    # else. bfloat16 is a user type of ml_dtypes (never imported here): known by
    # its name and size, as bncy._api._supported knows it, then by its number.
    global _bf16_type
    cdef cnp.ndarray arr
    cdef int t
    if not cnp.PyArray_CheckExact(a):
        return -1
    arr = <cnp.ndarray> a
    t = cnp.PyArray_TYPE(arr)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64 and t != NPY_HALF and t != _bf16_type:
        if t < NPY_USERDEF or _bf16_type >= 0:
            return -1
        try:
            if arr.dtype.name != "bfloat16" or arr.dtype.itemsize != 2:
                return -1
        except Exception:
            return -1
        _bf16_type = t
    if not (cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)
            and cnp.PyArray_ISNOTSWAPPED(arr)):
        return -1
    return t


cdef int _plain_vector(object v, Py_ssize_t C) noexcept:
    # _plain_type of v when it has shape (C,); else -1.
    cdef int t = _plain_type(v)
    if t < 0 or cnp.PyArray_NDIM(<cnp.ndarray> v) != 1:
        return -1
    if cnp.PyArray_DIMS(<cnp.ndarray> v)[0] != C:
        return -1
    return t


cdef inline bint _half(int t) noexcept:
    # A 16-bit type number of _plain_type.
    return t == NPY_HALF or (t == _bf16_type and t >= 0)


cdef void _copy_f64(object v, Py_ssize_t C, double* out) noexcept:
    # out[0:C] = v in float64 (exactly), for a vector _plain_vector(v, C) accepted.
    cdef const float* f
    cdef const unsigned short* h
    cdef Py_ssize_t c
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray> v)
    if t == cnp.NPY_FLOAT64:
        memcpy(out, cnp.PyArray_DATA(<cnp.ndarray> v), C * sizeof(double))
    elif t == cnp.NPY_FLOAT32:
        f = <const float*> cnp.PyArray_DATA(<cnp.ndarray> v)
        for c in range(C):
            out[c] = f[c]
    else:
        h = <const unsigned short*> cnp.PyArray_DATA(<cnp.ndarray> v)
        for c in range(C):
            out[c] = bncy_f16_load(h[c]) if t == NPY_HALF else bncy_bf16_load(<short> h[c])


cdef bint _same_shape(object a, object b) noexcept:
    # Two ndarrays of the same shape.
    cdef int i, nd = cnp.PyArray_NDIM(<cnp.ndarray> a)
    if cnp.PyArray_NDIM(<cnp.ndarray> b) != nd:
        return False
    for i in range(nd):
        if cnp.PyArray_DIMS(<cnp.ndarray> a)[i] != cnp.PyArray_DIMS(<cnp.ndarray> b)[i]:
            return False
    return True


cdef int _fast_eps(object eps, double* e) noexcept:
    # *e = eps for a float that is finite and >= 0 (0), else -1.
    if type(eps) is not float:
        return -1
    e[0] = eps
    return 0 if isfinite(e[0]) and e[0] >= 0.0 else -1


cdef int _fast_threads(object n_threads, Py_ssize_t size, Py_ssize_t small_work):
    # bncy._api._resolve_threads for None or an int in [1, MAX_FAST_THREADS]; 0
    # for anything else (the general path checks it).
    cdef int nt
    if n_threads is None:
        nt = omp_get_max_threads()
    elif type(n_threads) is int and 1 <= n_threads <= MAX_FAST_THREADS:
        nt = n_threads
    else:
        return 0
    return 1 if size < small_work else nt


cdef int _fast_ncs(object x, object axis, Py_ssize_t* ncs) noexcept:
    # (N, C, S) of a plain array of 2 or more dimensions around an int axis.
    cdef cnp.ndarray arr = <cnp.ndarray> x
    cdef int nd = cnp.PyArray_NDIM(arr), i
    cdef long ax
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(arr)
    if nd < 2 or type(axis) is not int or not -nd <= axis < nd:
        return -1
    ax = axis
    if ax < 0:
        ax += nd
    ncs[0] = 1
    ncs[1] = dims[ax]
    ncs[2] = 1
    for i in range(ax):
        ncs[0] *= dims[i]
    for i in range(ax + 1, nd):
        ncs[2] *= dims[i]
    return 0


cdef void* _plain_out(object out, object x, int t) noexcept:
    # out's data when it can take x's result in place of a fresh array: a plain
    # writeable array of x's dtype and shape, not overlapping x unless it is x's
    # very memory (the kernels allow out[i] to be x[i]); else NULL.
    cdef cnp.ndarray o, a = <cnp.ndarray> x
    cdef char* po
    cdef char* px
    cdef Py_ssize_t nbytes
    if _plain_type(out) != t:
        return NULL
    o = <cnp.ndarray> out
    if not cnp.PyArray_ISWRITEABLE(o) or not _same_shape(o, a):
        return NULL
    po, px = <char*> cnp.PyArray_DATA(o), <char*> cnp.PyArray_DATA(a)
    nbytes = cnp.PyArray_NBYTES(a)
    if po != px and po < px + nbytes and px < po + nbytes:
        return NULL
    return po


cdef cnp.ndarray _out_or_new(object out, object x, int t):
    # out when given (already accepted by _plain_out), else a new array of x's
    # shape and dtype t (from bncy._buffers' cache when large).
    if out is not None:
        return <cnp.ndarray> out
    return new_array(cnp.PyArray_NDIM(<cnp.ndarray> x), cnp.PyArray_DIMS(<cnp.ndarray> x), t)


cdef int _fast_relu(object activation) noexcept:
    # 1 for the exact str "relu", 0 for None, -1 for anything else (the general
    # path checks it).
    if activation is None:
        return 0
    if type(activation) is str and activation == "relu":
        return 1
    return -1


cdef int _fast_residual(object residual, object x, object out, int t) noexcept:
    # 0 without a residual or for a plain one of x's shape and dtype t that out
    # (when given) does not partly overlap; -1 for anything else.
    if residual is None:
        return 0
    if _plain_type(residual) != t or not _same_shape(residual, x):
        return -1
    if out is not None and _plain_out(out, residual, t) == NULL:
        return -1
    return 0


cdef Running _plain_running(object r, int t) noexcept:
    # A running statistic _plain_vector accepted, contiguous, of type t.
    cdef Running out
    out.data = <char*> cnp.PyArray_DATA(<cnp.ndarray> r)
    out.stride = 4 if t == cnp.NPY_FLOAT32 else 8
    out.t = t
    return out


def forward_fast(x, gamma, beta, eps, axis, running_mean, running_var, momentum, out,
                 n_threads, Py_ssize_t small_work, Py_ssize_t f64_limit, residual=None,
                 activation=None):
    """bncy.forward(x, gamma, beta, eps=eps, axis=axis, running_mean=..., running_var=...,
    momentum=..., out=..., n_threads=..., residual=..., activation=...) for a plain
    call (see Fast paths; a residual plain like x): (y, mean, invstd); None, with
    nothing written, for any other call or a float64 x beyond f64_limit bytes."""
    cdef int t = _plain_type(x), trm = -1, trv = -1, nt, rc, suspicious = 0
    cdef int relu = _fast_relu(activation)
    cdef void* pres = NULL
    cdef Py_ssize_t ncs[3]
    cdef Py_ssize_t N, C, S, size
    cdef double e, mom = 0.0
    cdef double* work
    cdef double* gam = NULL
    cdef Running rm, rv
    cdef void* px
    cdef void* py
    cdef double* pmean
    cdef double* pinvstd
    cdef cnp.ndarray y, mean, invstd
    if t < 0 or _fast_ncs(x, axis, ncs) < 0:
        return None
    N, C, S = ncs[0], ncs[1], ncs[2]
    size = N * C * S
    if C < 1 or N * S < 2 or (t == cnp.NPY_FLOAT64 and 8 * size > f64_limit):
        return None
    if _fast_eps(eps, &e) < 0 or relu < 0 or _fast_residual(residual, x, out, t) < 0:
        return None
    if running_mean is not None or running_var is not None:
        trm = _plain_vector(running_mean, C)
        trv = _plain_vector(running_var, C)
        if (trm < 0 or trv < 0 or _half(trm) or _half(trv) or type(momentum) is not float
                or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray> running_mean)
                or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray> running_var)):
            return None
        mom = momentum
        if not 0.0 <= mom <= 1.0:
            return None
        rm = _plain_running(running_mean, trm)
        rv = _plain_running(running_var, trv)
    else:
        rm.data = rv.data = NULL
    nt = _fast_threads(n_threads, size, small_work)
    if nt == 0:
        return None
    if out is not None and _plain_out(out, x, t) == NULL:
        return None
    if ((gamma is not None and _plain_vector(gamma, C) < 0)
            or (beta is not None and _plain_vector(beta, C) < 0)):
        return None
    y = _out_or_new(out, x, t)
    py = cnp.PyArray_DATA(y)
    mean = cnp.PyArray_EMPTY(1, <cnp.npy_intp*> &C, cnp.NPY_FLOAT64, 0)
    invstd = cnp.PyArray_EMPTY(1, <cnp.npy_intp*> &C, cnp.NPY_FLOAT64, 0)
    px = cnp.PyArray_DATA(<cnp.ndarray> x)
    if residual is not None:
        pres = cnp.PyArray_DATA(<cnp.ndarray> residual)
    pmean = <double*> cnp.PyArray_DATA(mean)
    pinvstd = <double*> cnp.PyArray_DATA(invstd)
    # gamma, shift, m2, var, scale (nothing from here on raises: work is freed)
    work = <double*> malloc(5 * C * sizeof(double))
    if work == NULL:
        return None
    if gamma is not None:
        _copy_f64(gamma, C, work)
        gam = work
    if beta is None:
        memset(work + C, 0, C * sizeof(double))
    else:
        _copy_f64(beta, C, work + C)
    with nogil:
        if t == cnp.NPY_FLOAT32:
            rc = _forward_core(<const float*> px, <const float*> pres, relu, N, C, S, gam,
                               work + C, e,
                               <float*> py,
                               pmean, work + 2 * C, work + 3 * C, pinvstd, work + 4 * C,
                               rm, rv, mom, nt, &suspicious)
        elif t == NPY_HALF:
            rc = _forward_core(<const f16_bits*> px, <const f16_bits*> pres, relu, N, C, S,
                               gam, work + C, e,
                               <f16_bits*> py,
                               pmean, work + 2 * C, work + 3 * C, pinvstd, work + 4 * C,
                               rm, rv, mom, nt, &suspicious)
        elif t == _bf16_type:
            rc = _forward_core(<const bf16_bits*> px, <const bf16_bits*> pres, relu, N, C, S,
                               gam, work + C, e,
                               <bf16_bits*> py,
                               pmean, work + 2 * C, work + 3 * C, pinvstd, work + 4 * C,
                               rm, rv, mom, nt, &suspicious)
        else:
            rc = _forward_core(<const double*> px, <const double*> pres, relu, N, C, S, gam,
                               work + C, e,
                               <double*> py,
                               pmean, work + 2 * C, work + 3 * C, pinvstd, work + 4 * C,
                               rm, rv, mom, nt, &suspicious)
    free(work)
    if rc != 0 or suspicious != 0:
        return None   # the general path allocates again (and raises) or rescues
    return y, mean, invstd


def backward_fast(dy, x, mean, invstd, gamma, axis, out, n_threads,
                  Py_ssize_t small_work, Py_ssize_t f64_limit, beta=None, residual=None,
                  activation=None, residual_out=None):
    """bncy.backward(dy, x, mean, invstd, gamma, axis=axis, out=..., n_threads=...,
    beta=..., residual=..., activation=...) for a plain call (see Fast paths; a
    residual only through ReLU, plain like x, and no residual_out): (dx, dgamma,
    dbeta[, dresidual]); None, with nothing written, for any other call or a float64
    x beyond f64_limit bytes."""
    cdef int t = _plain_type(x), nt, rc, gt
    cdef int relu = _fast_relu(activation)
    cdef void* pres = NULL
    cdef void* pdres = NULL
    cdef double* shift = NULL
    cdef cnp.ndarray dres = None
    cdef Py_ssize_t ncs[3]
    cdef Py_ssize_t N, C, S, size, c
    cdef double* work
    cdef double* gam = NULL
    cdef void* pdy
    cdef void* px
    cdef void* pdx
    cdef void* pdg
    cdef void* pdb
    cdef cnp.ndarray dx, dgamma, dbeta
    if (t < 0 or _plain_type(dy) != t or not _same_shape(dy, x)
            or _fast_ncs(x, axis, ncs) < 0):
        return None
    N, C, S = ncs[0], ncs[1], ncs[2]
    size = N * C * S
    if C < 1 or size < 1 or (t == cnp.NPY_FLOAT64 and 8 * size > f64_limit):
        return None
    nt = _fast_threads(n_threads, size, small_work)
    if nt == 0 or relu < 0 or residual_out is not None:
        return None
    if residual is not None and (relu == 0 or _fast_residual(residual, x, out, t) < 0):
        return None   # without ReLU the residual's gradient is dy: the general path
    if out is not None and (_plain_out(out, x, t) == NULL   # may be x or dy itself,
                            or _plain_out(out, dy, t) == NULL):  # never a partial overlap
        return None
    if (_plain_vector(mean, C) < 0 or _plain_vector(invstd, C) < 0
            or (gamma is not None and _plain_vector(gamma, C) < 0)
            or (beta is not None and _plain_vector(beta, C) < 0)):
        return None
    dx = _out_or_new(out, x, t)
    if residual is not None:
        dres = _out_or_new(None, x, t)
        pres = cnp.PyArray_DATA(<cnp.ndarray> residual)
        pdres = cnp.PyArray_DATA(dres)
    pdx = cnp.PyArray_DATA(dx)
    gt = cnp.NPY_FLOAT32 if _half(t) else t   # float32 for 16-bit x (_grad_dtype)
    dgamma = cnp.PyArray_EMPTY(1, <cnp.npy_intp*> &C, gt, 0)
    dbeta = cnp.PyArray_EMPTY(1, <cnp.npy_intp*> &C, gt, 0)
    pdy, px = cnp.PyArray_DATA(<cnp.ndarray> dy), cnp.PyArray_DATA(<cnp.ndarray> x)
    pdg, pdb = cnp.PyArray_DATA(dgamma), cnp.PyArray_DATA(dbeta)
    # mean, invstd, gamma, sdy, dgamma, 5 * C of _backward_core's work, shift (beta
    # for the mask) (nothing from here on raises: work is freed)
    work = <double*> malloc(11 * C * sizeof(double))
    if work == NULL:
        return None
    _copy_f64(mean, C, work)
    _copy_f64(invstd, C, work + C)
    if gamma is not None:
        _copy_f64(gamma, C, work + 2 * C)
        gam = work + 2 * C
    if relu:
        shift = work + 10 * C
        if beta is None:
            memset(shift, 0, C * sizeof(double))
        else:
            _copy_f64(beta, C, shift)
    with nogil:
        if t == cnp.NPY_FLOAT32:
            rc = _backward_core(<const float*> pdy, <const float*> px, <const float*> pres,
                                relu, N, C, S, work, work + C, gam, shift, <float*> pdx,
                                <float*> pdres, work + 3 * C, work + 4 * C, work + 5 * C, nt)
        elif t == NPY_HALF:
            rc = _backward_core(<const f16_bits*> pdy, <const f16_bits*> px,
                                <const f16_bits*> pres, relu, N, C, S, work, work + C, gam,
                                shift, <f16_bits*> pdx, <f16_bits*> pdres, work + 3 * C,
                                work + 4 * C, work + 5 * C, nt)
        elif t == _bf16_type:
            rc = _backward_core(<const bf16_bits*> pdy, <const bf16_bits*> px,
                                <const bf16_bits*> pres, relu, N, C, S, work, work + C, gam,
                                shift, <bf16_bits*> pdx, <bf16_bits*> pdres, work + 3 * C,
                                work + 4 * C, work + 5 * C, nt)
        else:
            rc = _backward_core(<const double*> pdy, <const double*> px, <const double*> pres,
                                relu, N, C, S, work, work + C, gam, shift, <double*> pdx,
                                <double*> pdres, work + 3 * C, work + 4 * C, work + 5 * C, nt)
        if gt == cnp.NPY_FLOAT32:
            for c in range(C):
                (<float*> pdg)[c] = <float> work[4 * C + c]
                (<float*> pdb)[c] = <float> work[3 * C + c]
        else:
            memcpy(pdg, work + 4 * C, C * sizeof(double))
            memcpy(pdb, work + 3 * C, C * sizeof(double))
    free(work)
    if rc != 0:
        return None   # the general path allocates again, and raises
    if residual is not None:
        return dx, dgamma, dbeta, dres
    return dx, dgamma, dbeta


def inference_fast(x, running_mean, running_var, gamma, beta, eps, axis, out, n_threads,
                   Py_ssize_t small_work, Py_ssize_t f64_limit, residual=None,
                   activation=None):
    """bncy.inference(x, running_mean, running_var, gamma, beta, eps=eps, axis=axis,
    out=..., n_threads=..., residual=..., activation=...) for a plain call (see Fast
    paths): y; None, with nothing written, for any other call or a float64 x beyond
    f64_limit bytes."""
    cdef int t = _plain_type(x), nt, rc
    cdef int relu = _fast_relu(activation)
    cdef void* pres = NULL
    cdef Py_ssize_t ncs[3]
    cdef Py_ssize_t N, C, S, size
    cdef double e
    cdef double* work
    cdef double* gam = NULL
    cdef double* bet = NULL
    cdef void* px
    cdef void* py
    cdef cnp.ndarray y
    if t < 0 or _fast_ncs(x, axis, ncs) < 0:
        return None
    N, C, S = ncs[0], ncs[1], ncs[2]
    size = N * C * S
    if C < 1 or size < 1 or (t == cnp.NPY_FLOAT64 and 8 * size > f64_limit):
        return None
    if _fast_eps(eps, &e) < 0 or relu < 0 or _fast_residual(residual, x, out, t) < 0:
        return None
    nt = _fast_threads(n_threads, size, small_work)
    if nt == 0:
        return None
    if out is not None and _plain_out(out, x, t) == NULL:
        return None
    if (_plain_vector(running_mean, C) < 0 or _plain_vector(running_var, C) < 0
            or (gamma is not None and _plain_vector(gamma, C) < 0)
            or (beta is not None and _plain_vector(beta, C) < 0)):
        return None
    y = _out_or_new(out, x, t)
    py = cnp.PyArray_DATA(y)
    px = cnp.PyArray_DATA(<cnp.ndarray> x)
    if residual is not None:
        pres = cnp.PyArray_DATA(<cnp.ndarray> residual)
    # running_mean, running_var, gamma, beta, 2 * C of _inference_core's work
    # (nothing from here on raises: work is freed)
    work = <double*> malloc(6 * C * sizeof(double))
    if work == NULL:
        return None
    _copy_f64(running_mean, C, work)
    _copy_f64(running_var, C, work + C)
    if gamma is not None:
        _copy_f64(gamma, C, work + 2 * C)
        gam = work + 2 * C
    if beta is not None:
        _copy_f64(beta, C, work + 3 * C)
        bet = work + 3 * C
    with nogil:
        if t == cnp.NPY_FLOAT32:
            rc = _inference_core(<const float*> px, <const float*> pres, relu, N, C, S, work,
                                 work + C, gam,
                                 bet, e,
                                 <float*> py, work + 4 * C, nt)
        elif t == NPY_HALF:
            rc = _inference_core(<const f16_bits*> px, <const f16_bits*> pres, relu, N, C, S,
                                 work, work + C, gam, bet, e,
                                 <f16_bits*> py, work + 4 * C, nt)
        elif t == _bf16_type:
            rc = _inference_core(<const bf16_bits*> px, <const bf16_bits*> pres, relu, N, C, S,
                                 work, work + C, gam, bet, e,
                                 <bf16_bits*> py, work + 4 * C, nt)
        else:
            rc = _inference_core(<const double*> px, <const double*> pres, relu, N, C, S,
                                 work, work + C, gam,
                                 bet, e,
                                 <double*> py, work + 4 * C, nt)
    free(work)
    if rc != 0:
        return None   # the general path allocates again, and raises
    return y
