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


def _load_runtimes():
    """Import NumPy (OpenBLAS) and the compiled kernels (OpenMP) with idle threads that sleep.

    Both thread pools otherwise spin for a while after each parallel call, and on a 2-core
    machine a spinning BLAS thread halves the speed of the OpenMP loop that runs next (measured:
    a max-pool took 8.5 ms right after a GEMM, 4.4 ms with the BLAS thread asleep). The runtimes
    read these variables once, when they load, so they are set for the import and then restored:
    child processes inherit nothing. Values the user set are kept. OpenBLAS is loaded by NumPy,
    so its setting only applies when cnnx is imported before NumPy (or set in the environment).
    """
    wanted = {"OMP_WAIT_POLICY": "PASSIVE"}
    if "numpy" not in _sys.modules:
        wanted["OPENBLAS_THREAD_TIMEOUT"] = "4"  # spin 2**4 cycles, then sleep
    saved = {key: _os.environ.get(key) for key in wanted}
    for key, value in wanted.items():
        _os.environ.setdefault(key, value)
    try:
        import numpy  # noqa: F401
        from . import _simd  # noqa: F401  (imports the kernels built for this CPU)
    finally:
        for key, value in saved.items():
            if value is None:
                _os.environ.pop(key, None)
            else:
                _os.environ[key] = value


_load_runtimes()

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
