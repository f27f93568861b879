cimport numpy as cnp

cdef cnp.ndarray new_array(int nd, cnp.npy_intp* dims, int typenum)
