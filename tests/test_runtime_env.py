"""How importing cnnx loads OpenMP and OpenBLAS: idle OpenMP threads spin ``cnnx.IDLE_SPINS`` times
and then sleep, unless the user chose a wait policy; the variables are set only for the import
(child processes inherit nothing); show_config says what is in effect. Each case runs in a fresh
interpreter, because the runtimes read their settings once, when they load."""
import json
import os
import subprocess
import sys

import cnnx

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT")

REPORT = """
import json, os{preload}
import cnnx
print(json.dumps({{"wait": cnnx.OPENMP_WAIT, "shown": cnnx._simd.config()["openmp_idle_wait"],
                  "left": {{k: os.environ.get(k) for k in {variables!r}}}}}))
"""


def _import_cnnx(preload="", **env):
    """Import cnnx in a fresh interpreter whose environment has none of the wait variables but
    ``env``; return what it reported."""
    environment = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    environment.update(env)
    code = REPORT.format(preload=preload, variables=WAIT_VARIABLES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          cwd=os.path.dirname(os.path.dirname(cnnx.__file__)), timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_is_a_bounded_spin_then_sleep_and_the_environment_is_restored():
    report = _import_cnnx()
    assert report["wait"] == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(cnnx.IDLE_SPINS)}
    assert report["shown"] == f"OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT={cnnx.IDLE_SPINS}"
    assert report["left"] == {k: None for k in WAIT_VARIABLES}  # nothing leaks to child processes


def test_a_users_wait_policy_alone_decides():
    report = _import_cnnx(OMP_WAIT_POLICY="ACTIVE")
    assert report["wait"] == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None}
    assert report["shown"] == "OMP_WAIT_POLICY=ACTIVE"
    assert report["left"]["OMP_WAIT_POLICY"] == "ACTIVE" and report["left"]["GOMP_SPINCOUNT"] is None


def test_a_users_spin_count_is_kept():
    report = _import_cnnx(GOMP_SPINCOUNT="0")
    assert report["wait"] == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    assert report["left"]["GOMP_SPINCOUNT"] == "0" and report["left"]["OMP_WAIT_POLICY"] is None


def test_openmp_loaded_before_cnnx_is_reported_not_misdescribed():
    report = _import_cnnx(preload='\nimport ctypes; ctypes.CDLL("libgomp.so.1")')
    assert report["wait"] is None
    assert report["shown"] == "set before cnnx was imported (libgomp was already loaded)"
