"""Importing cnnx from a clone's root, where the uncompiled source tree shadows the installed
package (issue 11: `python -m cnnx --help`, the quickstart and `python benchmarks/run.py` failed
there with "cannot import name '_ops' from partially initialized module 'cnnx'")."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cnnx


def uncompiled_source_copy(root):
    """The package's Python files, without the compiled extension: a fresh clone's ``cnnx/``."""
    installed = Path(cnnx.__file__).parent
    shutil.copytree(installed, root / "cnnx",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "data"))
    return root


def installed_env():
    """The environment with the package under test importable (installed or built in place)."""
    return {**os.environ, "PYTHONPATH": str(Path(cnnx.__file__).parent.parent)}


def run_python(code, cwd, env=None):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=env or installed_env(), timeout=120)


def test_source_tree_hands_over_to_the_installed_package(tmp_path):
    clone = uncompiled_source_copy(tmp_path)
    result = run_python("import cnnx, cnnx.layers; print(cnnx.__file__); "
                        "print(cnnx.Network.__module__, cnnx.layers.Conv2D.__name__)", clone)
    assert result.returncode == 0, result.stderr
    first_line = result.stdout.splitlines()[0]
    assert Path(first_line).parent == Path(cnnx.__file__).parent
    assert "cnnx.network Conv2D" in result.stdout


def test_python_dash_m_cnnx_works_from_the_source_tree(tmp_path):
    clone = uncompiled_source_copy(tmp_path)
    result = subprocess.run([sys.executable, "-m", "cnnx", "--help"], cwd=clone,
                            capture_output=True, text=True, env=installed_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: cnnx" in result.stdout


def test_source_tree_without_installed_copy_says_both_ways_out(tmp_path):
    clone = uncompiled_source_copy(tmp_path)
    # -S: no site-packages, so the clone and the standard library are all Python can see.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-S", "-c", "import cnnx"], cwd=clone,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: cnnx's compiled kernels (cnnx._ops) are missing")
    assert "pip install ." in last_line and "build_ext --inplace" in last_line
    assert "partially initialized" not in result.stderr
