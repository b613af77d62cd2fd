"""benchmarks/run.py measures the installed cnnx and fails loudly (issue 11: it put the source tree
first on its workers' path, so it never measured an installed cnnx, printed a table of `error`
and exited 0)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cnnx

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
pytestmark = pytest.mark.skipif(not RUN_PY.is_file(), reason="needs the repository's benchmarks/")


def run_harness(out_dir, cwd, extra_env=None):
    env = {**os.environ, "PYTHONPATH": str(Path(cnnx.__file__).parent.parent), **(extra_env or {})}
    command = [sys.executable, str(RUN_PY), "--frameworks", "cnnx", "--workloads", "lenet5",
               "--modes", "infer", "--seconds", "0.2", "--rounds", "1", "--warmup", "1",
               "--gemm-size", "64", "--threads", "1", "--out", str(out_dir)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_measures_the_installed_package_even_from_the_repository_root(tmp_path):
    result = run_harness(tmp_path, cwd=RUN_PY.parents[1])
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    measured = [r for r in runs if r["framework"] == "cnnx"]
    assert len(measured) == 1 and measured[0]["images_per_s"] > 0
    assert Path(measured[0]["versions"]["cnnx_path"]) == Path(cnnx.__file__).parent
    assert "SIMD:" in (tmp_path / "results.md").read_text()


def test_a_failed_measurement_makes_the_exit_status_non_zero(tmp_path):
    # An unknown kernel build makes `import cnnx` fail in the worker: the measurement errors.
    result = run_harness(tmp_path, cwd=tmp_path, extra_env={"CNNX_ISA": "no-such-isa"})
    assert result.returncode == 1
    assert "measurements failed" in result.stderr
    assert "Problems:" in (tmp_path / "results.md").read_text()
