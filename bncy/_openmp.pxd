# OpenMP entry points with serial stand-ins, so that the kernels compile (and run
# on one thread) with a compiler that has no OpenMP. Never cimport openmp directly.
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define BNCY_OPENMP_ENABLED 1
    #else
    #define BNCY_OPENMP_ENABLED 0
    static inline int omp_get_max_threads(void) { return 1; }
    static inline int omp_get_thread_num(void) { return 0; }
    #endif
    """
    bint BNCY_OPENMP_ENABLED
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
