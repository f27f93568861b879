"""A cache of freed output buffers: bncy's large outputs are allocated here.

Private module of bncy. Not public API (``bncy.set_buffer_cache`` and
``bncy.buffer_cache_info`` are its public face).

Why. A new array of 32 MiB or more comes from glibc's mmap, which maps pages
that the kernel must zero on the first write: a fresh 134 MB float32 output cost
8.5 ms to fill against 3.8 ms for one already mapped (one thread), as much as
the batch norm pass itself. A training loop allocates outputs of the same sizes
every step, so bncy keeps the data of its freed outputs (up to a limit) and
hands the same block out again, already mapped.

How. A NumPy memory handler (NEP 49): bncy's outputs of at least MIN_BYTES are
allocated with it (``empty`` here and ``new_array`` for the kernels' fast
paths, with the handler set for that one allocation only), so the array owns
its data as usual and NumPy gives the block back to this handler's free when
the array and every view of it are gone. Freed blocks of at least MIN_BYTES
wait in a small list, newest first, while their total stays within the limit
(oldest dropped first); an allocation of exactly a waiting block's size takes
the newest such block, and one that the system refuses is tried again after
every waiting block is given back. Blocks are 2 MiB-aligned and asked for huge pages, as
NumPy does for its own large arrays. Every other allocation, and every array
not made by bncy, goes through NumPy's usual allocator. A lock guards the list
(NumPy may free from any thread).

Nothing here changes a value: a block's old contents are overwritten by the
kernels, as with ``np.empty``.
"""

cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_New

import numpy as np

cnp.import_array()

cdef extern from *:
    """
    #include <stdlib.h>
    #include <pythread.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    #include "numpy/arrayobject.h"

    #define BNCY_MIN_BYTES ((size_t)4 << 20)   /* NumPy's huge-page threshold */
    #define BNCY_ALIGN ((size_t)2 << 20)       /* one huge page */
    #define BNCY_SLOTS 16                      /* waiting blocks, at most */

    typedef struct { void* p; size_t n; } bncy_block;

    static bncy_block bncy_list[BNCY_SLOTS];   /* [0] oldest ... [count-1] newest */
    static int bncy_count = 0;
    static size_t bncy_held = 0;
    static size_t bncy_limit = 0;
    static unsigned long long bncy_hits = 0, bncy_misses = 0;
    static PyThread_type_lock bncy_lock = NULL;

    static void* bncy_fresh(size_t n) {
        void* p = NULL;
        if (posix_memalign(&p, BNCY_ALIGN, n) != 0)
            return NULL;
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        madvise(p, (n + 4095) & ~(size_t)4095, MADV_HUGEPAGE);
    #endif
        return p;
    }

    /* The newest waiting block of exactly n bytes, removed from the list; NULL
       when there is none. */
    static void* bncy_take(size_t n) {
        void* p = NULL;
        int i, j;
        PyThread_acquire_lock(bncy_lock, WAIT_LOCK);
        for (i = bncy_count - 1; i >= 0; i--) {
            if (bncy_list[i].n == n) {
                p = bncy_list[i].p;
                for (j = i; j < bncy_count - 1; j++)
                    bncy_list[j] = bncy_list[j + 1];
                bncy_count--;
                bncy_held -= n;
                break;
            }
        }
        if (p != NULL) bncy_hits++; else bncy_misses++;
        PyThread_release_lock(bncy_lock);
        return p;
    }

    /* With the lock held: drops the oldest blocks until `room` more bytes fit
       within `cap` and a slot is free (room 0: until the held bytes are within
       cap); returns how many, their pointers in out[] to be freed after the
       lock (bncy_release). */
    static int bncy_evict(size_t cap, size_t room, void** out) {
        int k = 0, i;
        while (bncy_count > 0 && (bncy_held + room > cap
                                  || (room > 0 && bncy_count == BNCY_SLOTS))) {
            out[k++] = bncy_list[0].p;
            bncy_held -= bncy_list[0].n;
            for (i = 0; i < bncy_count - 1; i++)
                bncy_list[i] = bncy_list[i + 1];
            bncy_count--;
        }
        return k;
    }

    static void bncy_release(void** drop, int k) {
        int i;
        for (i = 0; i < k; i++)
            free(drop[i]);
    }

    /* Frees every waiting block (the limit stays). */
    static void bncy_drop_all(void) {
        void* drop[BNCY_SLOTS + 1];
        int k;
        PyThread_acquire_lock(bncy_lock, WAIT_LOCK);
        k = bncy_evict(0, 0, drop);
        PyThread_release_lock(bncy_lock);
        bncy_release(drop, k);
    }

    static void* bncy_malloc(void* ctx, size_t n) {
        void* p;
        (void)ctx;
        if (n < BNCY_MIN_BYTES)
            return malloc(n);
        p = bncy_take(n);
        if (p == NULL)
            p = bncy_fresh(n);
        if (p == NULL) {       /* out of memory: give the waiting blocks back first */
            bncy_drop_all();
            p = bncy_fresh(n);
        }
        return p;
    }

    static void* bncy_calloc(void* ctx, size_t nelem, size_t elsize) {
        (void)ctx;
        return calloc(nelem, elsize);
    }

    static void* bncy_realloc(void* ctx, void* p, size_t n) {
        (void)ctx;
        return realloc(p, n);
    }

    static void bncy_free(void* ctx, void* p, size_t n) {
        void* drop[BNCY_SLOTS + 1];
        int k = 0, kept = 0;
        (void)ctx;
        if (p == NULL)
            return;
        if (n >= BNCY_MIN_BYTES) {
            PyThread_acquire_lock(bncy_lock, WAIT_LOCK);
            if (n <= bncy_limit) {
                k = bncy_evict(bncy_limit, n, drop);
                bncy_list[bncy_count].p = p;
                bncy_list[bncy_count].n = n;
                bncy_count++;
                bncy_held += n;
                kept = 1;
            }
            PyThread_release_lock(bncy_lock);
        }
        bncy_release(drop, k);
        if (!kept)
            free(p);
    }

    /* Sets the limit, dropping the oldest blocks beyond it; returns the old one. */
    static size_t bncy_set_limit(size_t limit) {
        void* drop[BNCY_SLOTS + 1];
        int k;
        size_t old;
        PyThread_acquire_lock(bncy_lock, WAIT_LOCK);
        old = bncy_limit;
        bncy_limit = limit;
        k = bncy_evict(limit, 0, drop);
        PyThread_release_lock(bncy_lock);
        bncy_release(drop, k);
        return old;
    }

    static void bncy_info(size_t* limit, size_t* held, int* count,
                          unsigned long long* hits, unsigned long long* misses) {
        PyThread_acquire_lock(bncy_lock, WAIT_LOCK);
        *limit = bncy_limit;
        *held = bncy_held;
        *count = bncy_count;
        *hits = bncy_hits;
        *misses = bncy_misses;
        PyThread_release_lock(bncy_lock);
    }

    static PyDataMem_Handler bncy_handler = {
        "bncy_buffers", 1,
        {NULL, bncy_malloc, bncy_calloc, bncy_realloc, bncy_free}
    };

    static int bncy_init_lock(void) {
        bncy_lock = PyThread_allocate_lock();
        return bncy_lock == NULL ? -1 : 0;
    }
    """
    const size_t BNCY_MIN_BYTES
    const int BNCY_SLOTS
    ctypedef struct PyDataMem_Handler:
        pass
    PyDataMem_Handler bncy_handler
    int bncy_init_lock()
    size_t bncy_set_limit(size_t limit)
    void bncy_info(size_t* limit, size_t* held, int* count, unsigned long long* hits,
                   unsigned long long* misses)
    object PyDataMem_SetHandler(object handler)


#: Outputs of at least this many bytes are allocated through the cache.
MIN_BYTES = BNCY_MIN_BYTES
#: Blocks that may wait in the cache at once.
SLOTS = BNCY_SLOTS

if bncy_init_lock() != 0:
    raise MemoryError("bncy: could not allocate the buffer cache's lock")

# Never released: every array allocated with the handler holds a reference too.
cdef object _handler = PyCapsule_New(<void*> &bncy_handler, "mem_handler", NULL)
cdef bint _enabled = False


def set_limit(Py_ssize_t limit):
    """Set the bytes of freed blocks the cache may hold (0: none, and outputs
    are allocated as usual); drops the oldest blocks beyond it. Returns the
    previous limit. Unchecked: bncy.set_buffer_cache validates."""
    global _enabled
    _enabled = limit >= <Py_ssize_t> BNCY_MIN_BYTES
    return bncy_set_limit(<size_t> limit)


def info():
    """(limit, held bytes, blocks held, hits, misses)."""
    cdef size_t limit, held
    cdef int count
    cdef unsigned long long hits, misses
    bncy_info(&limit, &held, &count, &hits, &misses)
    return limit, held, count, hits, misses


cdef cnp.ndarray new_array(int nd, cnp.npy_intp* dims, int typenum):
    # A new C-contiguous array of a float type (float32, float64, or a 16-bit
    # type), its data from the cache when it is large enough and the cache is on.
    cdef cnp.ndarray a
    cdef object old
    cdef Py_ssize_t i, n = 8 if typenum == cnp.NPY_DOUBLE else (4 if typenum == cnp.NPY_FLOAT else 2)
    for i in range(nd):
        n *= dims[i]
    if not _enabled or n < <Py_ssize_t> BNCY_MIN_BYTES:
        return cnp.PyArray_EMPTY(nd, dims, typenum, 0)
    old = PyDataMem_SetHandler(_handler)
    try:
        a = cnp.PyArray_EMPTY(nd, dims, typenum, 0)
    finally:
        PyDataMem_SetHandler(old)
    return a


def empty(shape, dtype):
    """np.empty(shape, dtype) for a float32 or float64 dtype, C order, its data
    from the cache when large enough."""
    cdef cnp.npy_intp dims[32]
    cdef int i, nd = len(shape)
    cdef int t = np.dtype(dtype).num
    if nd > 32 or (t != cnp.NPY_FLOAT and t != cnp.NPY_DOUBLE):
        return np.empty(shape, dtype)
    for i in range(nd):
        dims[i] = shape[i]
    return new_array(nd, dims, t)
