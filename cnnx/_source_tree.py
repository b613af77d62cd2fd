"""What ``import cnnx`` does when it finds this source tree without its compiled kernels.

Running a script from a clone's root (``python -m cnnx``, ``python benchmarks/run.py``, the
README's quickstart saved as a script) puts the root first on ``sys.path``, so Python finds the
uncompiled ``cnnx/`` folder before the installed package. Rather than fail half-way through the
import, the source package hands over to an installed copy found further down ``sys.path``; with
none, the import stops with the two ways out. Only the standard library is used here: nothing of
the package may load before this decision.
"""
import importlib.machinery
import importlib.util
import os
import sys


def has_compiled_ops(package_dir):
    """Whether ``package_dir`` holds the compiled ``_ops`` extension (a build or an install)."""
    return any(os.path.exists(os.path.join(package_dir, "_ops" + suffix))
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _installed_spec(name, source_dir):
    """The spec of another ``name`` package on ``sys.path`` that has its compiled kernels."""
    source_root = os.path.realpath(os.path.dirname(source_dir))
    others = [entry for entry in sys.path
              if os.path.realpath(entry or os.curdir) != source_root]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or not spec.submodule_search_locations:
        return None
    if not any(has_compiled_ops(location) for location in spec.submodule_search_locations):
        return None
    return spec


def hand_over_to_installed(name, source_dir):
    """Replace the half-imported source package ``name`` in ``sys.modules`` by an installed copy.

    Python's import statement returns whatever ``sys.modules[name]`` holds once the package's
    ``__init__`` has run, so ``import cnnx`` (and ``python -m cnnx``) then see the installed package.

    Raises
    ------
    ImportError
        When no installed copy with compiled kernels exists: says what happened and what to do.
    """
    spec = _installed_spec(name, source_dir)
    if spec is None:
        raise ImportError(
            f"cnnx's compiled kernels (cnnx._ops) are missing: Python found the source tree at "
            f"{source_dir}, which has not been built, before any installed cnnx (no installed copy "
            f"was found on sys.path either). Either install it (`pip install .` in the clone) and "
            f"run from any directory, or build it in place: `python setup.py build_ext --inplace`."
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
