"""``python -m cnnx``: the same as the ``cnnx`` command (see :mod:`cnnx.cli`)."""
import sys

from .cli import main

sys.exit(main())
