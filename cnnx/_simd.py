"""Which build of the compiled kernels runs: the widest instruction set the CPU has.

setup.py compiles ``cnnx/_ops.pyx`` once per instruction set: ``cnnx._ops`` (portable baseline,
SSE2 on x86-64), ``cnnx._ops_avx2`` (AVX2 + FMA) and ``cnnx._ops_avx512`` (AVX-512 F/BW/VL/DQ +
FMA). At import this module reads the CPU's features (``/proc/cpuinfo`` on Linux, which lists only
what the kernel has enabled) and imports the widest build the CPU supports; anything it cannot
tell falls back to the baseline. ``CNNX_ISA=baseline|avx2|avx512`` forces a build (tests and
benchmarks); a forced build the CPU lacks, or one not compiled, falls back with a warning
rather than crash on an illegal instruction.

``ops`` is the chosen module (``cnnx.functional`` calls only it), ``ISA`` its name.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings

# Widest first: the order in which the automatic choice tries them.
ISAS = ("avx512", "avx2", "baseline")
_MODULES = {"baseline": "cnnx._ops", "avx2": "cnnx._ops_avx2", "avx512": "cnnx._ops_avx512"}
# CPU flags (as /proc/cpuinfo spells them) each build's instructions need.
_REQUIRED_FLAGS = {
    "baseline": frozenset(),
    "avx2": frozenset({"avx2", "fma"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"}),
}


def cpu_flags():
    """The CPU feature flags the OS reports (a set of lower-case names; empty when unknown)."""
    if not sys.platform.startswith("linux"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model():
    """The CPU's model name, or the platform's processor string."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_supports(isa, flags=None):
    """Whether the CPU has every instruction set ``isa``'s build uses."""
    flags = cpu_flags() if flags is None else flags
    return _REQUIRED_FLAGS[isa] <= flags


def available_isas():
    """The builds that are compiled and that this CPU can run, widest first."""
    flags = cpu_flags()
    found = []
    for isa in ISAS:
        if not cpu_supports(isa, flags):
            continue
        try:
            importlib.import_module(_MODULES[isa])
        except ImportError:
            continue
        found.append(isa)
    return found


def load(isa):
    """Import the build of the kernels for ``isa`` (no CPU check: see ``available_isas``)."""
    if isa not in _MODULES:
        raise ValueError(f"Expected an ISA among {tuple(_MODULES)}, received: {isa!r}")
    return importlib.import_module(_MODULES[isa])


def _choose():
    forced = os.environ.get("CNNX_ISA", "").strip().lower()
    if forced and forced not in _MODULES:
        raise ValueError(f"Expected CNNX_ISA to be one of {tuple(_MODULES)}, received: CNNX_ISA={forced!r}")
    flags = cpu_flags()
    if forced:
        if not cpu_supports(forced, flags):
            missing = sorted(_REQUIRED_FLAGS[forced] - flags)
            warnings.warn(f"CNNX_ISA={forced}: this CPU lacks {missing}; using the baseline kernels",
                          RuntimeWarning, stacklevel=2)
        else:
            try:
                return forced, importlib.import_module(_MODULES[forced])
            except ImportError:
                warnings.warn(f"CNNX_ISA={forced}: this installation has no {_MODULES[forced]}; "
                              "using the baseline kernels", RuntimeWarning, stacklevel=2)
        return "baseline", importlib.import_module(_MODULES["baseline"])
    for isa in ISAS:
        if cpu_supports(isa, flags):
            try:
                return isa, importlib.import_module(_MODULES[isa])
            except ImportError:  # a build without this variant (non-x86, or an old compiler)
                continue
    return "baseline", importlib.import_module(_MODULES["baseline"])


ISA, ops = _choose()

# OpenBLAS's kernel families (threadpoolctl's "architecture") by the widest ISA build of cnnx
# whose vectors they match; anything not listed (older or non-x86 cores) counts as the baseline.
_BLAS_AVX512 = frozenset({"skylakex", "cooperlake", "sapphirerapids"})
_BLAS_AVX2 = frozenset({"haswell", "zen", "skylake", "excavator", "steamroller"})


@functools.lru_cache(maxsize=1)
def blas_isa():
    """The instruction set NumPy's BLAS kernels use, on the scale of ``ISAS`` ("avx512", "avx2",
    "baseline"), or None when threadpoolctl reports no OpenBLAS (another BLAS: assumed to match the
    CPU). OpenBLAS picks its kernels from the CPU unless ``OPENBLAS_CORETYPE`` forces narrower ones."""
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("internal_api") == "openblas" and pool.get("architecture"):
            arch = str(pool["architecture"]).lower()
            return "avx512" if arch in _BLAS_AVX512 else "avx2" if arch in _BLAS_AVX2 else "baseline"
    return None


def blas_narrower_than_kernels():
    """Whether NumPy's BLAS runs narrower vectors than cnnx's kernels (e.g. AVX2 kernels forced by
    ``OPENBLAS_CORETYPE=Haswell`` on an AVX-512 CPU): then cnnx's own GEMM beats it on more shapes."""
    blas = blas_isa()
    return blas is not None and ISAS.index(blas) > ISAS.index(ISA)


def openmp_idle_wait():
    """How idle OpenMP threads wait, as cnnx loaded the kernels: e.g. "OMP_WAIT_POLICY=PASSIVE,
    GOMP_SPINCOUNT=20000" (spin, then sleep), or a note that OpenMP was loaded before cnnx."""
    from . import OPENMP_WAIT

    if OPENMP_WAIT is None:
        return "set before cnnx was imported (libgomp was already loaded)"
    settings = [f"{key}={value}" for key, value in OPENMP_WAIT.items() if value is not None]
    return ", ".join(settings) or "libgomp's defaults"


def config():
    """What the compiled kernels run with: a dict of ISA, OpenMP, threads, debug build, CPU."""
    from . import __version__, parallel

    return {
        "version": __version__,
        "kernels": ISA,
        "kernels_available": available_isas(),
        "cpu": cpu_model(),
        "cpu_simd_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "amx", "sse4"))),
        "openmp": bool(ops.openmp_enabled()),
        "openmp_idle_wait": openmp_idle_wait(),
        "threads": parallel.get_num_threads(),
        "debug_build": bool(ops.debug_build()),
        "blas_kernels": blas_isa(),
    }


def version_text():
    """One line for ``cnnx --version``: the version, the kernels in use and the thread count."""
    c = config()
    openmp = "OpenMP" if c["openmp"] else "no OpenMP"
    debug = ", debug build" if c["debug_build"] else ""
    return f"cnnx {c['version']} (kernels: {c['kernels']}, {openmp}, {c['threads']} threads{debug})"


def show_config(file=None):
    """Print which kernels run (instruction set), OpenMP, threads and the CPU.

    Parameters
    ----------
    file : text stream, default ``sys.stdout``
    """
    c = config()
    lines = [
        f"cnnx {c['version']}",
        f"kernels: {c['kernels']} (available on this CPU: {', '.join(c['kernels_available'])}; "
        "CNNX_ISA forces one)",
        f"OpenMP: {'yes' if c['openmp'] else 'no (serial kernels)'}",
        f"OpenMP idle threads: {c['openmp_idle_wait']}",
        f"threads: {c['threads']} (CNNX_NUM_THREADS / OMP_NUM_THREADS, cnnx.parallel.set_num_threads)",
        f"debug build: {'yes' if c['debug_build'] else 'no'}",
        f"CPU: {c['cpu']}",
        f"CPU SIMD flags: {' '.join(c['cpu_simd_flags']) or 'unknown'}",
        f"NumPy BLAS kernels: {c['blas_kernels'] or 'not OpenBLAS (assumed to match the CPU)'}"
        + (" (narrower than cnnx's kernels: more GEMMs run cnnx's own)"
           if blas_narrower_than_kernels() else ""),
    ]
    print("\n".join(lines), file=file or sys.stdout)
