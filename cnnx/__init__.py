"""cnnx: convolutional networks on the CPU, with a compiled (Cython) hot path."""
__version__ = "0.1.0"

import os as _os

# Idle OpenMP threads sleep instead of spinning. On small shared machines a spinning thread
# competes with BLAS's threads and other processes; measured here, a small conv2d call took
# 14.6 ms with spinning threads under load and 0.17 ms with passive ones. Must be set before the
# OpenMP runtime loads (with cnnx._ops); a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .random import manual_seed
from . import layers
from . import losses, optimizers, metrics
from .network import Network, NonFiniteLossError
from . import callbacks, models
from . import datasets, preprocessing
from . import parallel, visualize
from .io import ModelFormatError, load, load_weights, save, save_weights
from .checkpoint import ModelCheckpoint
