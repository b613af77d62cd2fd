"""cnnx: convolutional networks on the CPU, with a compiled (Cython) hot path."""
__version__ = "0.1.0"

import os as _os
import sys as _sys

from . import _source_tree

# An uncompiled source tree (a clone's root first on sys.path) hands over to the installed cnnx:
# from here on `import cnnx` yields that package. The rest of this file then only re-binds names
# of modules the installed copy has already imported.
if not _source_tree.has_compiled_ops(_os.path.dirname(__file__)):
    _source_tree.hand_over_to_installed(__name__, _os.path.dirname(__file__))


# Spins of an idle OpenMP thread (one PAUSE each) before it sleeps: about 0.6 ms on an AMD EPYC
# Zen 5 (29 ns per PAUSE), longer on CPUs with a slower PAUSE (~140 cycles on recent Intel Xeons).
# Long enough that the next parallel call of a training step usually finds the thread awake (on a
# virtual machine whose idle vCPUs halt, waking one costs 40-70 us per call); bounded, so that a
# thread holds a core it does not use for at most that long. Other busy processes are
# cnnx.backoff's job. Measured in docs/PERFORMANCE_LOG.md ("sixth session").
IDLE_SPINS = 20_000

# The OpenMP wait settings cnnx loaded its kernels with (for show_config).
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _load_runtimes():
    """Import NumPy (OpenBLAS) and the compiled kernels (OpenMP) with idle threads that wait briefly.

    OpenMP's idle threads spin ``IDLE_SPINS`` times after each parallel loop, then sleep
    (``OMP_WAIT_POLICY=PASSIVE`` with ``GOMP_SPINCOUNT``; libgomp's default spins ~15x longer and
    PASSIVE alone not at all). libgomp also stops spinning when it runs more threads than there
    are CPUs (several Python threads calling cnnx at once). OpenBLAS's idle threads sleep at once:
    on a 2-core machine a spinning BLAS thread halves the speed of the OpenMP loop that runs next
    (measured: a max-pool took 8.5 ms right after a GEMM, 4.4 ms with the BLAS thread asleep).

    The runtimes read these variables once, when they load, so they are set for the import and
    then restored: child processes inherit nothing. Values the user set are kept, and a user's
    ``OMP_WAIT_POLICY`` alone decides OpenMP's waiting. OpenBLAS is loaded by NumPy, so its setting
    only applies when cnnx is imported before NumPy (or set in the environment).

    Returns the OpenMP wait settings in effect ({variable: value or None when unset}), or None
    when libgomp was already loaded (by a package imported before cnnx) with settings of its own.
    """
    wanted = {"OMP_WAIT_POLICY": "PASSIVE"}
    if "OMP_WAIT_POLICY" not in _os.environ:
        wanted["GOMP_SPINCOUNT"] = str(IDLE_SPINS)
    if "numpy" not in _sys.modules:
        wanted["OPENBLAS_THREAD_TIMEOUT"] = "4"  # spin 2**4 cycles, then sleep
    saved = {key: _os.environ.get(key) for key in wanted}
    for key, value in wanted.items():
        _os.environ.setdefault(key, value)
    effective = None if _libgomp_loaded() else {key: _os.environ.get(key) for key in OPENMP_WAIT_VARIABLES}
    try:
        import numpy  # noqa: F401
        from . import _simd  # noqa: F401  (imports the kernels built for this CPU)
    finally:
        for key, value in saved.items():
            if value is None:
                _os.environ.pop(key, None)
            else:
                _os.environ[key] = value
    return effective


def _libgomp_loaded():
    """Whether GNU OpenMP (libgomp.so, the copy cnnx's kernels link) is already in this process:
    it then read its settings before cnnx could set them. Bundled copies (PyTorch's
    libgomp-<hash>.so) are separate libraries and do not count."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            return any("/libgomp.so" in line for line in maps)
    except OSError:  # not Linux: cannot tell, assume cnnx's settings applied
        return False


OPENMP_WAIT = _load_runtimes()

from ._simd import show_config, version_text
from .random import manual_seed
from . import layers
from .layers import register_layer
from . import losses, optimizers, metrics
from .network import Network, NonFiniteLossError
from . import callbacks, models
from . import augment, schedules
from . import datasets, preprocessing
from . import parallel, visualize
from .io import ModelFormatError, load, load_weights, save, save_weights
from .checkpoint import ModelCheckpoint
