"""Build of the compiled extension ``cnnx._ops`` only; all metadata lives in pyproject.toml.

- Cython directives are set once here (checks off, cdivision on); ``CNNX_DEBUG=1`` turns bounds and
  initialisation checks back on for a debug build that the tests also run against.
- OpenMP is used when the compiler can build and link a tiny OpenMP program; otherwise the kernels
  are compiled serial (``prange`` becomes a plain loop).
"""
import os
import sys
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools._distutils.ccompiler import new_compiler
from setuptools._distutils.errors import CompileError, LinkError
from setuptools._distutils.sysconfig import customize_compiler

DEBUG = os.environ.get("CNNX_DEBUG", "") not in ("", "0")


def openmp_flags():
    """Return (compile_args, link_args) for OpenMP, or ([], []) when the compiler lacks it."""
    if os.environ.get("CNNX_NO_OPENMP", "") not in ("", "0"):
        return [], []
    if sys.platform == "win32":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    source = textwrap.dedent(
        """
        #include <omp.h>
        int main(void) { int n = 0;
        #pragma omp parallel reduction(+:n)
          n += 1;
          return n > 0 ? 0 : 1; }
        """
    )
    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_check.c")
        with open(src, "w") as f:
            f.write(source)
        for compile_args, link_args in candidates:
            try:
                objects = compiler.compile([src], output_dir=tmp, extra_postargs=compile_args)
                compiler.link_executable(objects, os.path.join(tmp, "omp_check"), extra_postargs=link_args)
            except (CompileError, LinkError):
                continue
            return compile_args, link_args
    print("cnnx: the compiler does not support OpenMP; building the kernels serial", file=sys.stderr)
    return [], []


omp_compile, omp_link = openmp_flags()
if sys.platform == "win32":
    opt_args = ["/O2"]
else:
    # -O3 but no -march=native: a wheel must run on any CPU of its platform.
    # -fno-trapping-math lets the compiler turn data-dependent float selects into blends instead
    # of branches (cnnx never enables floating-point traps).
    opt_args = ["-O3", "-ffp-contract=fast", "-fno-trapping-math"] if not DEBUG else ["-O1", "-g"]

extension = Extension(
    "cnnx._ops",
    sources=["cnnx/_ops.pyx"],
    include_dirs=[np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("CNNX_DEBUG_BUILD", "1" if DEBUG else "0")],
    extra_compile_args=opt_args + omp_compile,
    extra_link_args=omp_link,
)

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    # Kept off in the debug build too: with wraparound on, a negative index bug would silently
    # read from the end of the array instead of raising under boundscheck.
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

setup(
    ext_modules=cythonize(
        [extension],
        compiler_directives=directives,
        # Separate generated C for the two builds, so switching CNNX_DEBUG always recompiles.
        build_dir="build/cython-debug" if DEBUG else "build/cython-release",
    ),
)
