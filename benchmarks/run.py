"""Training and inference throughput of cnnx against PyTorch and Keras (see benchmarks/README.md).

Usage::

    python benchmarks/run.py [--workloads seed-mnist lenet5 seed-cifar mind-cifar]
                             [--style user|zoo] [--seconds 5] [--rounds 3] [--threads T]
                             [--out benchmarks/results]

It measures the cnnx that Python imports from outside this folder: install it first
(``pip install .``). The exit status is 1 when any measurement failed.

Two styles of cnnx network (``--style``): ``user`` (the default) is what users write, each
activation its own layer (Conv2D, then LeakyReLU, then MaxPool2D), trained through
``Network.fit`` and run through ``Network.predict``; ``zoo`` is the zoo's form with the activation
fused into the layer (``activation=``), driven step by step through ``forward``/``backward`` and the
optimizer. The peers run their usual fastest loops: PyTorch ``nn.Sequential`` with an optimizer
step, Keras ``Sequential`` with ``train_on_batch`` / ``predict_on_batch``.

Every measurement runs in its own fresh subprocess (``run.py --worker FRAMEWORK WORKLOAD MODE``,
which prints one JSON line), so the frameworks never share a process, a thread pool or an
allocator. For each of R rounds and each workload and mode, the frameworks run one after the
other (cnnx, torch, keras, cnnx, torch, keras, ...), and every round starts with a NumPy float32
GEMM measured the same way. Per round we take the ratio cnnx / peer; the table reports their
median (and range). The machine is loaded by whatever else runs on it: compare ratios, not
absolute figures, and look at the load averages printed in the header.

Training throughput is images/s over whole steps (forward, loss, backward, optimizer update: the
zoo's optimizer, softmax cross-entropy on logits) after warm-up steps; inference throughput is
images/s of eval-mode forwards at the same batch size. Inputs are random float32 of the right
shape (NCHW; NHWC for Keras, its native CPU layout), labels random integers. GFLOP/s counts 3x
the forward FLOPs per training image and 1x per inference image.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The environment the workers inherit, captured before this process imports anything: importing
# cnnx sets OMP_WAIT_POLICY, which must not leak into the peers' processes.
_BASE_ENV = dict(os.environ)

# Only this folder (for workloads.py) goes on the path: cnnx must be the installed package,
# never the source tree above, which has no compiled kernels unless built in place.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

PEERS = ("torch", "keras")
FRAMEWORKS = ("cnnx",) + PEERS
MODES = ("train", "infer")
DEFAULT_WORKLOADS = ("seed-mnist", "lenet5", "seed-cifar", "mind-cifar")
STYLES = ("user", "zoo")
# The user style times fit/predict calls over this many batches each, so one call's fixed cost
# (argument checks, history, progress bookkeeping) is spread as it is in a real epoch.
BATCHES_PER_CALL = 8


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _rss_mb():
    import resource

    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 / (1024 * 1024) if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ============================================================================ worker ============
def _run_steps(step, seconds, warmup, min_steps=3):
    """Run ``step`` ``warmup`` times untimed, then until ``seconds`` have passed (at least
    ``min_steps`` times). Returns (steps, elapsed seconds, per-step times)."""
    for _ in range(warmup):
        step()
    clock = time.perf_counter
    times = []
    start = clock()
    while True:
        t0 = clock()
        step()
        t1 = clock()
        times.append(t1 - t0)
        if t1 - start >= seconds and len(times) >= min_steps:
            return len(times), t1 - start, times


def _worker_cnnx(workload, mode, threads, x, y, style="user"):
    import cnnx
    import numpy as np
    from workloads import cnnx_model, user_step

    cnnx.parallel.set_num_threads(threads)
    net = cnnx_model(workload, fused=(style == "zoo"))
    if style == "user":
        # BATCHES_PER_CALL batches per call: the driver counts images with images_per_step.
        xs = np.concatenate([x] * BATCHES_PER_CALL)
        ys = np.concatenate([y] * BATCHES_PER_CALL)
        step = user_step(net, xs, ys, len(x), mode)
    elif mode == "train":
        loss, opt = net.loss, net.optimizer

        def step():
            out = net.forward(x, training=True)
            loss.forward(out, y)
            net.backward(loss.backward())
            opt.step(net.parameters())
    else:
        def step():
            net.forward(x, training=False)
    return step, net.num_params, {"cnnx": cnnx.__version__, "cnnx_path": str(Path(cnnx.__file__).parent)}


def _worker_torch(workload, mode, threads, x, y):
    import torch
    import torch.nn.functional as F
    from workloads import torch_model, torch_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch_model(workload)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype("int64"))
    if mode == "train":
        model.train()
        opt = torch_optimizer(workload, model)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xt), yt)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                model(xt)
    params = sum(p.numel() for p in model.parameters())
    return step, params, {"torch": torch.__version__}


def _worker_keras(workload, mode, threads, x, y):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras
    from workloads import keras_compile, keras_model

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"Keras backend is {keras.backend.backend()!r}, expected 'tensorflow'")
    keras.utils.set_random_seed(0)
    model = keras_compile(workload, keras_model(workload))
    xt = tf.constant(x.transpose(0, 2, 3, 1).copy())  # NHWC: Keras's native CPU layout
    yt = tf.constant(y.astype("int32"))
    if mode == "train":
        def step():
            model.train_on_batch(xt, yt)  # returns the loss as a NumPy value: the step has finished
    else:
        def step():
            model.predict_on_batch(xt)
    return step, int(model.count_params()), {"tensorflow": tf.__version__, "keras": keras.__version__}


def _worker_gemm(size, threads, seconds):
    import numpy as np

    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    c = np.empty((size, size), dtype=np.float32)
    steps, elapsed, times = _run_steps(lambda: np.matmul(a, b, out=c), seconds, warmup=2)
    flops = 2.0 * size ** 3
    return {"framework": "numpy", "workload": f"gemm{size}", "mode": "gemm", "size": size,
            "threads": threads, "steps": steps, "seconds": elapsed,
            "gflops": flops * steps / elapsed / 1e9, "gflops_best": flops / min(times) / 1e9,
            "rss_mb": _rss_mb(), "loadavg": _loadavg(), "versions": {"numpy": np.__version__}}


def worker(framework, workload, mode, seconds, threads, warmup, gemm_size, style="user"):
    """Measure one (framework, workload, mode) and print one JSON line."""
    if framework == "cnnx":
        # Imported before NumPy, as cnnx recommends: cnnx then loads OpenBLAS with idle threads
        # that sleep instead of spinning against its OpenMP loops (see cnnx/__init__.py).
        import cnnx  # noqa: F401
    import numpy as np

    if framework == "numpy":
        return _worker_gemm(gemm_size, threads, min(seconds, 3.0))
    from workloads import WORKLOADS, canonical, cnnx_forward_flops

    workload = canonical(workload)
    spec = WORKLOADS[workload]
    batch = spec["batch"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + spec["input"], dtype=np.float32)
    y = rng.integers(0, 10, size=batch).astype(np.intp)
    t0 = time.perf_counter()
    if framework == "cnnx":
        step, params, versions = _worker_cnnx(workload, mode, threads, x, y, style)
        images_per_step = batch * (BATCHES_PER_CALL if style == "user" else 1)
    else:
        build = {"torch": _worker_torch, "keras": _worker_keras}[framework]
        step, params, versions = build(workload, mode, threads, x, y)
        images_per_step = batch
    setup = time.perf_counter() - t0
    cpu0 = os.times()
    steps, elapsed, times = _run_steps(step, seconds, warmup)
    cpu1 = os.times()
    # CPU seconds of this process (all its threads) per wall second, warm-up included: the cores
    # it actually got, which tells a thread setting that is not honoured from a loaded machine.
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    wall = cpu1.elapsed - cpu0.elapsed
    ips = steps * images_per_step / elapsed
    flops = cnnx_forward_flops(workload) * (3 if mode == "train" else 1)
    return {
        "framework": framework, "workload": workload, "mode": mode, "batch": batch, "threads": threads,
        "params": params, "params_expected": spec["params"], "steps": steps, "seconds": elapsed,
        "setup_s": setup, "images_per_s": ips,
        "images_per_s_median_step": images_per_step / statistics.median(times), "style": style,
        "flops_per_image": flops, "gflops": ips * flops / 1e9,
        "cores_used": cpu / wall if wall > 0 else None,
        "rss_mb": _rss_mb(), "loadavg": _loadavg(), "versions": versions,
        # How often cnnx.backoff halved its threads because other processes were busy.
        "backoff_halvings": _cnnx_backoff_halvings() if framework == "cnnx" else None,
    }


def _cnnx_backoff_halvings():
    import cnnx

    return cnnx.backoff.halvings()


# ============================================================================ driver ============
def _machine():
    """CPU, cores, BLAS, versions and load, without importing the peers into this process."""
    import numpy as np

    cpu = platform.processor() or platform.machine()
    simd = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw",
                                        "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
                            if f in flags]
                    break
    except OSError:
        pass
    blas = []
    try:
        from threadpoolctl import threadpool_info

        np.ones((2, 2), dtype=np.float32) @ np.ones((2, 2), dtype=np.float32)
        blas = [{k: v for k, v in info.items() if k in ("internal_api", "version", "num_threads",
                                                         "threading_layer", "architecture", "prefix")}
                for info in threadpool_info()]
    except ImportError:
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import cnnx

        versions["cnnx"] = cnnx.__version__
    except Exception as exc:  # reported in the header; each worker then reports its own error
        versions["cnnx"] = f"not importable: {exc}"
    from importlib.metadata import PackageNotFoundError, version

    for dist, key in (("torch", "torch"), ("tensorflow-cpu", "tensorflow"), ("tensorflow", "tensorflow"),
                      ("keras", "keras"), ("threadpoolctl", "threadpoolctl")):
        if key in versions:
            continue
        try:
            versions[key] = version(dist)
        except PackageNotFoundError:
            pass
    blas_env = {key: _BASE_ENV.get(key) for key in ("OPENBLAS_CORETYPE", "OPENBLAS_VERBOSE")}
    return {"cpu": cpu, "simd": simd, "blas_env": blas_env, "cores": _cores(), "platform": platform.platform(), "blas": blas,
            "versions": versions, "loadavg_start": _loadavg()}


def _available_peers():
    found = {}
    found["torch"] = importlib.util.find_spec("torch") is not None
    found["keras"] = (importlib.util.find_spec("keras") is not None
                      and importlib.util.find_spec("tensorflow") is not None)
    return found


def _spawn(framework, workload, mode, args):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", framework, workload, mode,
           "--seconds", str(args.seconds), "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--gemm-size", str(args.gemm_size), "--style", args.style]
    env = dict(_BASE_ENV)
    t = str(args.threads)
    env.update(OMP_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, MKL_NUM_THREADS=t, CNNX_NUM_THREADS=t,
               TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    timeout = 120 + 20 * args.seconds + 60 * args.warmup
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"framework": framework, "workload": workload, "mode": mode, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"framework": framework, "workload": workload, "mode": mode,
            "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _median(values):
    return statistics.median(values) if values else None


def summarise(runs, frameworks, workloads, modes):
    """Per (workload, mode, framework): median images/s, GFLOP/s, % of GEMM, peak RSS; and the
    per-round ratios cnnx / peer with their median."""
    gemm = {r["round"]: r["gflops"] for r in runs if r.get("framework") == "numpy" and "error" not in r}
    summary = []
    for wl in workloads:
        for mode in modes:
            entry = {"workload": wl, "mode": mode, "frameworks": {}, "ratios": {}}
            by_fw = {}
            for fw in frameworks:
                ok = [r for r in runs if r.get("framework") == fw and r.get("workload") == wl
                      and r.get("mode") == mode and "error" not in r]
                by_fw[fw] = {r["round"]: r for r in ok}
                if not ok:
                    errors = [r["error"] for r in runs if r.get("framework") == fw and r.get("workload") == wl
                              and r.get("mode") == mode and "error" in r]
                    entry["frameworks"][fw] = {"error": errors[0] if errors else "not run"}
                    continue
                ips = [r["images_per_s"] for r in ok]
                pct = [100 * r["gflops"] / gemm[r["round"]] for r in ok if gemm.get(r["round"])]
                entry["batch"] = ok[0]["batch"]
                entry["mflop_per_image"] = ok[0]["flops_per_image"] / (3 if mode == "train" else 1) / 1e6
                entry["frameworks"][fw] = {
                    "images_per_s": _median(ips), "images_per_s_min": min(ips), "images_per_s_max": max(ips),
                    "gflops": _median([r["gflops"] for r in ok]), "percent_of_gemm": _median(pct),
                    "rss_mb": max(r["rss_mb"] for r in ok), "params": ok[0]["params"],
                    "cores_used": _median([r["cores_used"] for r in ok if r.get("cores_used") is not None]),
                    "params_ok": all(r["params"] == r["params_expected"] for r in ok), "rounds": len(ok),
                }
            for peer in frameworks:
                if peer == "cnnx":
                    continue
                per_round = [by_fw["cnnx"][k]["images_per_s"] / by_fw[peer][k]["images_per_s"]
                             for k in sorted(by_fw.get("cnnx", {})) if k in by_fw.get(peer, {})]
                if per_round:
                    entry["ratios"][peer] = {"median": _median(per_round), "per_round": per_round}
            summary.append(entry)
    return summary, gemm


def _fmt(v, spec=",.0f"):
    return "—" if v is None else format(v, spec)


def render(machine, config, summary, gemm, found):
    frameworks = config["frameworks"]
    peers = [f for f in frameworks if f != "cnnx"]
    v = machine["versions"]
    lines = ["# cnnx benchmark results", ""]
    lines.append(f"- Machine: {machine['cpu']} (SIMD: {' '.join(machine.get('simd') or ['unknown'])}), "
                 f"{machine['cores']} cores available, {machine['platform']}")
    style = {"user": "user-written networks (separate activation layers) through fit / predict",
             "zoo": "zoo networks (activations fused via activation=) through forward / backward"}
    lines.append(f"- cnnx style: {style[config['style']]}")
    for info in machine["blas"]:
        lines.append(f"- NumPy BLAS: {info.get('internal_api')} {info.get('version')} "
                     f"({info.get('threading_layer')}, {info.get('architecture')}, {info.get('num_threads')} threads)")
    forced = {k: v for k, v in machine.get("blas_env", {}).items() if v}
    if forced:
        # OPENBLAS_CORETYPE=Haswell on an AVX-512 CPU halves cnnx's GEMM peak; the peers bring
        # their own kernels and are not affected, so a ratio under such a setting says so.
        lines.append("- BLAS settings from the environment (they bind cnnx's GEMMs, not the peers'): "
                     + ", ".join(f"{k}={v}" for k, v in forced.items()))
    lines.append("- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    peer_text = ", ".join(f"{p}: {'found' if found.get(p) else 'not installed'}" for p in PEERS)
    lines.append(f"- Peers: {peer_text}; measured: {', '.join(frameworks)}")
    lines.append(f"- Protocol: {config['rounds']} rounds, each framework in its own process, alternating; "
                 f"~{config['seconds']} s per measurement after {config['warmup']} warm-up steps; "
                 f"{config['threads']} threads for every framework and for the GEMM")
    lines.append(f"- Load average (1, 5, 15 min): {machine['loadavg_start']} at start, "
                 f"{machine.get('loadavg_end')} at end")
    g = list(gemm.values())
    lines.append(f"- NumPy float32 GEMM {config['gemm_size']}²: {_fmt(_median(g), '.1f')} GFLOP/s median "
                 f"(rounds: {', '.join(f'{x:.1f}' for x in g)})")
    lines.append("")
    head = ["workload", "mode", "batch"] + [f"{f} img/s" for f in frameworks] + [f"cnnx/{p} (median; per round)" for p in peers]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        row = [e["workload"], e["mode"], str(e.get("batch", "—"))]
        for f in frameworks:
            s = e["frameworks"].get(f, {})
            row.append(_fmt(s.get("images_per_s")) if "error" not in s else "error")
        for p in peers:
            r = e["ratios"].get(p)
            row.append("—" if r is None else f"**{r['median']:.2f}** ({', '.join(f'{x:.2f}' for x in r['per_round'])})")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    head = ["workload", "mode", "MFLOP/img"] + [f"{f} GFLOP/s (% GEMM)" for f in frameworks] + \
           [f"{f} peak RSS MB" for f in frameworks] + [f"{f} cores used" for f in frameworks]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        row = [e["workload"], e["mode"], _fmt(e.get("mflop_per_image"), ".2f")]
        for f in frameworks:
            s = e["frameworks"].get(f, {})
            row.append("—" if "gflops" not in s else f"{s['gflops']:.2f} ({_fmt(s['percent_of_gemm'], '.0f')}%)")
        for f in frameworks:
            row.append(_fmt(e["frameworks"].get(f, {}).get("rss_mb"), ".0f"))
        for f in frameworks:
            row.append(_fmt(e["frameworks"].get(f, {}).get("cores_used"), ".2f"))
        lines.append("| " + " | ".join(row) + " |")
    problems = []
    for e in summary:
        for f, s in e["frameworks"].items():
            if "error" in s:
                problems.append(f"- {f} {e['workload']} {e['mode']}: {s['error']}")
            elif not s["params_ok"]:
                problems.append(f"- {f} {e['workload']}: {s['params']:,} parameters, expected the seed report's count")
    if problems:
        lines += ["", "Problems:"] + problems
    lines += ["", "img/s: median over rounds; ratio > 1 means cnnx is faster. GFLOP/s counts 2·MAC of conv and "
              "dense layers, 3× the forward per training image; % GEMM is against the NumPy GEMM of the same round; "
              "cores used = the worker's CPU time / wall time (below the thread count when the machine is busy)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS))
    parser.add_argument("--style", default="user", choices=STYLES,
                        help="user: separate activation layers through fit/predict; "
                             "zoo: fused activations through forward/backward")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--frameworks", nargs="+", default=None, choices=FRAMEWORKS,
                        help="default: cnnx and every peer that is installed")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=_cores(), help="default: all available cores")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--gemm-size", type=int, default=1024)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--worker", nargs=3, metavar=("FRAMEWORK", "WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        fw, wl, mode = args.worker
        try:
            result = worker(fw, wl, mode, args.seconds, args.threads, args.warmup, args.gemm_size,
                            args.style)
        except Exception as exc:  # the driver reports it and goes on with the others
            print(json.dumps({"framework": fw, "workload": wl, "mode": mode,
                              "error": f"{type(exc).__name__}: {exc}"}))
            return 1
        print(json.dumps(result))
        return 0

    from workloads import canonical

    workloads = [canonical(w) for w in args.workloads]
    found = _available_peers()
    frameworks = args.frameworks or ["cnnx"] + [p for p in PEERS if found[p]]
    frameworks = [f for f in FRAMEWORKS if f in frameworks]
    missing = [p for p in frameworks if p != "cnnx" and not found[p]]
    if missing:
        print(f"note: {', '.join(missing)} not installed; measuring without it", file=sys.stderr)
        frameworks = [f for f in frameworks if f not in missing]
    machine = _machine()
    config = {"workloads": workloads, "modes": args.modes, "frameworks": frameworks, "style": args.style,
              "seconds": args.seconds,
              "rounds": args.rounds, "threads": args.threads, "warmup": args.warmup, "gemm_size": args.gemm_size}
    print(f"peers found: {', '.join(p for p in PEERS if found[p]) or 'none'}; measuring {', '.join(frameworks)} "
          f"on {machine['cpu']} ({machine['cores']} cores), load {machine['loadavg_start']}", file=sys.stderr)

    runs = []
    broken = set()  # frameworks whose import failed: not retried
    for rnd in range(args.rounds):
        r = _spawn("numpy", "gemm", "gemm", args)
        r["round"] = rnd
        runs.append(r)
        print(f"[round {rnd + 1}/{args.rounds}] numpy GEMM: {r.get('gflops', 0):.1f} GFLOP/s", file=sys.stderr)
        for wl in workloads:
            for mode in args.modes:
                for fw in frameworks:
                    if fw in broken:
                        continue
                    r = _spawn(fw, wl, mode, args)
                    r["round"] = rnd
                    runs.append(r)
                    if "error" in r:
                        print(f"[round {rnd + 1}] {fw:5s} {wl:10s} {mode:5s} ERROR {r['error']}", file=sys.stderr)
                        if "ModuleNotFoundError" in r["error"] or "ImportError" in r["error"]:
                            broken.add(fw)
                    else:
                        print(f"[round {rnd + 1}] {fw:5s} {wl:10s} {mode:5s} {r['images_per_s']:9,.0f} img/s  "
                              f"{r['gflops']:6.2f} GFLOP/s  {r['rss_mb']:5.0f} MB  {r['cores_used']:.2f} cores  "
                              f"({r['steps']} steps"
                              + (f", threads halved {r['backoff_halvings']}x" if r.get("backoff_halvings") else "")
                              + ")",
                              file=sys.stderr)
    machine["loadavg_end"] = _loadavg()
    summary, gemm = summarise(runs, frameworks, workloads, args.modes)
    text = render(machine, config, summary, gemm, found)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    payload = {"machine": machine, "config": config, "peers_found": found, "summary": summary,
               "gemm_gflops": gemm, "runs": runs}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}", file=sys.stderr)
    failures = [r for r in runs if "error" in r]
    if failures:
        print(f"error: {len(failures)} of {len(runs)} measurements failed (see Problems above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
