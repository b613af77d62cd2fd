"""The per-ISA builds of the kernels (cnnx._ops, _ops_avx2, _ops_avx512): each one this CPU can
run gives the reference results over the geometry grid and the baseline's per-element results to
round-off; CNNX_ISA picks the build; show_config / --version say which one runs."""
import os
import subprocess
import sys

import numpy as np
import pytest

import cnnx
import cnnx.functional as F
from cnnx import _simd
import reference as ref
from test_functional import GRID, PADDINGS, TOL, grid_id, non_contiguous

# Every build this machine can run except the baseline (test_functional covers the baseline).
WIDE_ISAS = [isa for isa in _simd.available_isas() if isa != "baseline"]


@pytest.fixture(params=WIDE_ISAS)
def isa_ops(request, monkeypatch):
    """cnnx.functional running on one ISA's build of the kernels."""
    module = _simd.load(request.param)
    monkeypatch.setattr(F, "_ops", module)
    return module


@pytest.mark.parametrize("case", GRID, ids=[grid_id(c) for c in GRID])
def test_conv2d_of_each_isa_matches_reference(case, isa_ops, rng):
    dtype, stride, pad_name, kernel, batch = case
    pads = PADDINGS[pad_name]
    x = rng.standard_normal((batch, 2, 7, 9)).astype(dtype)
    w = rng.standard_normal((3, 2) + kernel).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    if batch > 1:
        x = non_contiguous(x)
    y = F.conv2d(x, w, b, stride=stride, padding=pads, activation="leaky_relu", negative_slope=0.1)
    z = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), stride, pads)
    np.testing.assert_allclose(y, np.where(z > 0, z, 0.1 * z), **TOL[dtype])
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, dw, db = F.conv2d_backward(dy, x, w, stride=stride, padding=pads)
    edx, edw, edb = ref.conv2d_backward(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), stride, pads)
    loose = dict(rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)
    np.testing.assert_allclose(dx, edx, **TOL[dtype])
    np.testing.assert_allclose(dw, edw, **loose)
    np.testing.assert_allclose(db, edb, **loose)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kernel,stride,pad_name", [((2, 2), None, "p0"), ((3, 3), (2, 2), "p1"), ((2, 3), (1, 2), "asym")])
def test_pooling_of_each_isa_matches_reference(dtype, kernel, stride, pad_name, isa_ops, rng):
    pads = PADDINGS[pad_name] if pad_name != "asym" else ((0, 1), (1, 0))
    x = non_contiguous(rng.standard_normal((3, 3, 7, 8)).astype(dtype))
    s = kernel if stride is None else stride
    y, idx = F.max_pool2d(x, kernel, stride, pads)
    np.testing.assert_array_equal(y, ref.max_pool2d(x, kernel, s, pads))
    np.testing.assert_allclose(F.avg_pool2d(x, kernel, stride, pads),
                               ref.avg_pool2d(x.astype(np.float64), kernel, s, pads), **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_per_element_passes_of_each_isa_match_the_baseline(dtype, isa_ops, rng, monkeypatch):
    x = (rng.standard_normal(3 * 11 * 400) * 4).astype(dtype)
    dy = rng.standard_normal(x.size).astype(dtype)
    p = rng.standard_normal(x.size).astype(dtype)

    def run():
        pa, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
        F.adam_step(pa, dy, m, v, 1, 1e-2, 0.9, 0.999, 1e-8, 0.01, True)
        ps, buf = p.copy(), np.empty_like(p)
        F.sgd_step(ps, dy, buf, 0.1, 0.9, 0.0, 1e-3, True, True)
        x3 = x.reshape(3, 11, -1)
        bn = F.batch_norm_train(x3, np.ones(11, dtype), np.zeros(11, dtype), 1e-5)
        return [F.leaky_relu(x, 0.01), F.leaky_relu_backward(dy, x, 0.01), F.sigmoid(x), F.tanh(x),
                F.gelu(x), F.gelu_backward(dy, x), F.gelu(x, "tanh"), F.dropout(x, 4321, 0.3)[0],
                F.softmax_cross_entropy(x[:4000].reshape(400, 10), ids=np.arange(400) % 10)[1],
                pa, m, v, ps, buf, bn[0]]

    wide = run()
    monkeypatch.setattr(F, "_ops", _simd.load("baseline"))
    baseline = run()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)
    for a, b in zip(wide, baseline):
        np.testing.assert_allclose(a, b, **tol)


def _run_python(code, **env):
    environment = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          cwd=os.path.dirname(os.path.dirname(cnnx.__file__)))


def test_cnnx_isa_forces_the_baseline_and_refuses_unknown_names():
    done = _run_python("import cnnx._simd as s; print(s.ISA)", CNNX_ISA="baseline")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "baseline"
    bad = _run_python("import cnnx", CNNX_ISA="sse9")
    assert bad.returncode != 0
    assert "Expected CNNX_ISA to be one of" in bad.stderr


def test_automatic_choice_is_the_widest_available_build():
    assert _simd.available_isas()[-1] == "baseline"
    if not os.environ.get("CNNX_ISA"):
        assert _simd.ISA == _simd.available_isas()[0]


def test_an_isa_the_cpu_lacks_is_never_loaded(monkeypatch):
    # Without the flags, a wider build is not even a candidate (it would die on an illegal instruction).
    monkeypatch.setattr(_simd, "cpu_flags", lambda: {"sse2"})
    assert _simd.available_isas() == ["baseline"]
    assert not _simd.cpu_supports("avx2", {"avx2"})  # FMA missing
    assert _simd.cpu_supports("avx2", {"avx2", "fma"})


def test_show_config_and_version_name_the_kernels(capsys):
    cnnx.show_config()
    out = capsys.readouterr().out
    assert f"kernels: {_simd.ISA}" in out
    assert "OpenMP:" in out and "threads:" in out
    assert f"OpenMP idle threads: {_simd.openmp_idle_wait()}" in out
    assert f"NumPy BLAS kernels: {_simd.blas_isa() or 'not OpenBLAS'}" in out
    text = _simd.version_text()
    assert text.startswith(f"cnnx {cnnx.__version__} (kernels: {_simd.ISA}")
    assert f"{cnnx.parallel.get_num_threads()} threads" in text
