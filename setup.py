"""Build of the compiled kernels ``cnnx._ops*`` only; all metadata lives in pyproject.toml.

- One source, ``cnnx/_ops.pyx``, compiled once per instruction set: ``cnnx._ops`` (the portable
  baseline, no ``-march``) and, on x86-64 with GCC or Clang, ``cnnx._ops_avx2`` (AVX2 + FMA) and
  ``cnnx._ops_avx512`` (AVX-512 F/BW/VL/DQ + FMA); ``cnnx._simd`` picks one at import from the
  CPU's features. Each variant is built only when the compiler accepts its flags;
  ``CNNX_ISA_BUILDS=0`` builds the baseline alone.

- Cython directives are set once here (checks off, cdivision on); ``CNNX_DEBUG=1`` turns bounds and
  initialisation checks back on for a debug build that the tests also run against.
- OpenMP is used when the compiler can build and link a tiny OpenMP program; otherwise the kernels
  are compiled serial (``prange`` becomes a plain loop).
"""
import os
import platform
import sys
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
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


# The per-ISA variants: module suffix and the compiler flags that enable the instruction set.
ISA_VARIANTS = {
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
}


def isa_variants():
    """The ISA variants this platform and compiler can build: {name: flags}."""
    if os.environ.get("CNNX_ISA_BUILDS", "") == "0" or sys.platform == "win32":
        return {}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    compiler = new_compiler()
    customize_compiler(compiler)
    accepted = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "isa_check.c")
        with open(src, "w") as f:
            f.write("int cnnx_isa_check(void) { return 0; }\n")
        for name, flags in ISA_VARIANTS.items():
            try:
                compiler.compile([src], output_dir=os.path.join(tmp, name), extra_postargs=flags)
            except CompileError:
                print(f"cnnx: the compiler does not accept {' '.join(flags)}; no {name} kernels", file=sys.stderr)
                continue
            accepted[name] = flags
    return accepted


omp_compile, omp_link = openmp_flags()
if sys.platform == "win32":
    opt_args = ["/O2"]
else:
    # -O3 but no -march=native: a wheel must run on any CPU of its platform.
    # -fno-trapping-math lets the compiler turn data-dependent float selects into blends instead
    # of branches (cnnx never enables floating-point traps).
    # -fno-math-errno: sqrt (Adam) becomes one vector instruction; cnnx never reads errno.
    opt_args = ["-O3", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno"] if not DEBUG else ["-O1", "-g"]



def kernels_extension(suffix, isa_flags):
    """``cnnx._ops<suffix>`` from ``cnnx/_ops<suffix>.pyx`` (each variant's .pyx includes _ops.pyx)."""
    return Extension(
        f"cnnx._ops{suffix}",
        sources=[f"cnnx/_ops{suffix}.pyx"],
        # Included sources: a change to either rebuilds every variant.
        depends=["cnnx/_ops.pyx", "cnnx/_gemm.pxi", "cnnx/_dense_gemm.pxi", "cnnx/_winograd.pxi"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("CNNX_DEBUG_BUILD", "1" if DEBUG else "0")],
        extra_compile_args=opt_args + isa_flags + omp_compile,
        extra_link_args=omp_link,
    )


extensions = [kernels_extension("", [])]
extensions += [kernels_extension(f"_{name}", flags) for name, flags in isa_variants().items()]

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


class BuildExtByMode(build_ext):
    """build_ext that rebuilds every module when ``CNNX_DEBUG`` changed since the last build here:
    setuptools compares only timestamps, so after a debug build a release build (or the reverse)
    would silently leave the other build's modules in place."""

    def run(self):
        marker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "cnnx-build-mode")
        mode = "debug" if DEBUG else "release"
        try:
            with open(marker) as f:
                self.force = self.force or f.read() != mode
        except OSError:  # no marker yet: the first build here, or one built before the marker existed
            self.force = True
        super().run()
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(mode)


setup(
    cmdclass={"build_ext": BuildExtByMode},
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        # Separate generated C for the two builds, so switching CNNX_DEBUG always recompiles.
        build_dir="build/cython-debug" if DEBUG else "build/cython-release",
    ),
)
