"""Build the compiled kernels of bncy, and its cache of output buffers
(``bncy._buffers``, a NumPy memory handler).

Compiler flags live in one place, ``BuildExt``: ``-O3`` plus OpenMP
(``-fopenmp`` with gcc/clang, ``/openmp`` with MSVC) when a probe program
builds, a serial build with a warning otherwise. ``-ffp-contract=off`` keeps
every build rounding the same way whether or not the target has FMA;
``-fno-math-errno`` lets gcc vectorise ``sqrt`` (correctly rounded either way;
nothing reads errno).
No ``-march=native`` and no ``-ffast-math``: wheels must run on any x86-64 and
NaN/inf must propagate.

On x86-64 the same kernels are compiled twice more: with ``-mavx2 -mf16c``
(``bncy._kernels_avx2``; F16C converts float16) and for AVX-512 with 512-bit vectors
(``bncy._kernels_avx512``); ``bncy._api`` uses them when the CPU has the
instructions. All perform the same IEEE operations in the same order, so results
are identical.

The kernels' Tempita templates (``bncy/kernels/*.pxi.tp``) are expanded here into
the ``.pxi`` files beside them before Cython runs, as scikit-learn does for its
``.pyx.tp`` files.

``BNCY_DEBUG=1`` builds with bounds checks, wraparound, initialisation checks,
C assertions on every block's bounds (``bncy_assert`` in the kernels) and
``-O0 -g``.
"""

import glob
import os
import platform
import tempfile
import textwrap
import warnings

import numpy
from Cython import Tempita
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("BNCY_DEBUG", "0") not in ("", "0")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    # C division semantics in both builds: IEEE inf/NaN for x/0.0 (eps = 0 on a
    # constant channel), not Python's ZeroDivisionError; integer divisors are > 0.
    "cdivision": True,
    "embedsignature": True,
}


def _openmp_flags(compiler):
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    return ["-fopenmp"], ["-fopenmp"]


def _has_openmp(compiler, cflags, lflags):
    """Compile and link a tiny OpenMP program with these flags."""
    src = textwrap.dedent(
        """
        #include <omp.h>
        int main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }
        """
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as fh:
            fh.write(src)
        try:
            objs = compiler.compile([path], output_dir=tmp, extra_postargs=cflags)
            compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=lflags)
        except Exception:  # noqa: BLE001 - any failure means no OpenMP
            return False
    return True


# gcc versions a loop with run-time overlap checks of its pointers before it
# vectorises it, and gives up beyond 10 checks: the fused residual loops of
# float64 (9 arrays read, 2 written; any may be the same array at the same
# index) stayed scalar, at twice the plain backward's time on small arrays.
# Vectorising an elementwise loop changes no value.
ALIAS_CHECKS = ["--param=vect-max-version-for-alias-checks=40"]


def _accepts(compiler, flags):
    """Whether the compiler compiles a trivial file with these flags, warning-free."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as fh:
            fh.write("int main(void) { return 0; }\n")
        try:
            compiler.compile([path], output_dir=tmp, extra_postargs=flags + ["-Werror"])
        except Exception:  # noqa: BLE001 - any failure means the flags are not taken
            return False
    return True


class BuildExt(build_ext):
    """Adds optimisation and OpenMP flags for the compiler actually in use, and
    compiles the extensions side by side: each is one C file, and the three
    kernel builds take about a minute each at -O3. ``-j N`` or
    ``BNCY_BUILD_JOBS=N`` sets how many at once (1: one by one); the default is
    the number of CPUs, except on Windows (one by one: MSVC's compiler object
    initialises itself on first use, untested from several threads)."""

    def finalize_options(self):
        if not self.parallel:   # a string is checked by build_ext, as -j's is
            default = 1 if os.name == "nt" else (os.cpu_count() or 1)
            self.parallel = os.environ.get("BNCY_BUILD_JOBS", "").strip() or default
        super().finalize_options()

    def build_extensions(self):
        cc = self.compiler
        omp_c, omp_l = _openmp_flags(cc)
        if os.environ.get("BNCY_NO_OPENMP", "0") not in ("", "0"):
            omp_c, omp_l = [], []
        elif not _has_openmp(cc, omp_c, omp_l):
            warnings.warn(
                "bncy: this compiler cannot build OpenMP programs; the kernels will "
                "run on one thread (bncy.openmp_enabled() returns False).",
                stacklevel=1,
            )
            omp_c, omp_l = [], []
        if cc.compiler_type == "msvc":
            opt = ["/Od", "/Zi"] if DEBUG else ["/O2", "/fp:precise"]
        else:
            opt = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3", "-DNDEBUG"]
            opt += ["-ffp-contract=off", "-fno-math-errno", "-Wno-unreachable-code"]
            if not DEBUG and _accepts(cc, ALIAS_CHECKS):
                opt += ALIAS_CHECKS
        for ext in self.extensions:
            isa = []
            if ext.name.endswith("_avx2"):
                isa = ["/arch:AVX2"] if cc.compiler_type == "msvc" else ["-mavx2", "-mf16c"]
            elif ext.name.endswith("_avx512"):
                isa = (["/arch:AVX512"] if cc.compiler_type == "msvc" else
                       ["-mavx512f", "-mavx512cd", "-mavx512bw", "-mavx512dq",
                        "-mavx512vl", "-mf16c", "-mprefer-vector-width=512"])
            ext.extra_compile_args = opt + isa + omp_c
            ext.extra_link_args = omp_l
        super().build_extensions()


def expand_templates():
    """Write each bncy/kernels/*.pxi.tp, expanded, as the .pxi beside it when the
    template is newer (Cython then sees the .pxi change and rebuilds)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for tp in glob.glob(os.path.join(here, "bncy", "kernels", "*.pxi.tp")):
        out = tp[: -len(".tp")]
        if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(tp):
            continue
        with open(tp, encoding="utf-8") as fh:
            text = Tempita.sub(fh.read())
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(f"# Generated from {os.path.basename(tp)} by setup.py: edit that.\n")
            fh.write(text)


expand_templates()

X86_64 = platform.machine().lower() in ("x86_64", "amd64")
# the fast paths and jobs (bncy/kernels/) use NumPy's C API
NUMPY = {"include_dirs": [numpy.get_include()],
         "define_macros": [("NPY_NO_DEPRECATED_API", "NPY_1_25_API_VERSION"),
                           ("NPY_TARGET_VERSION", "NPY_1_25_API_VERSION")]}
extensions = [Extension("bncy._buffers", ["bncy/_buffers.pyx"], **NUMPY),
              Extension("bncy._kernels", ["bncy/_kernels.pyx"], **NUMPY)]
if X86_64 and os.environ.get("BNCY_NO_AVX2", "0") in ("", "0"):
    extensions += [Extension("bncy._kernels_avx2", ["bncy/_kernels_avx2.pyx"], **NUMPY),
                   Extension("bncy._kernels_avx512", ["bncy/_kernels_avx512.pyx"], **NUMPY)]

setup(
    ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES,
                          force=DEBUG, quiet=True),
    cmdclass={"build_ext": BuildExt},
)
