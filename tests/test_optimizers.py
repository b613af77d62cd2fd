"""Optimizers (cnnx.optimizers): update rules against hand-written formulas and torch.optim,
in-place updates without steady-state allocation, state_dict round trips, validation.
"""
import json
import tracemalloc

import numpy as np
import pytest

from cnnx import optimizers
from cnnx.optimizers import SGD, Adam, AdamW

SHAPES = {"0.weight": (4, 3, 2, 2), "0.bias": (4,), "3.weight": (5, 7)}


def make_params(rng, dtype=np.float64):
    return {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}


def make_grads(rng, steps, dtype=np.float64):
    return [{k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()} for _ in range(steps)]


def run(opt, params, grads):
    for g in grads:
        opt.step([(k, params[k], g[k]) for k in params])
    return params


# ------------------------------------------------------------------------------------------------
# Naive references: the update equations written out, one new array per operation
# ------------------------------------------------------------------------------------------------
def sgd_reference(params, grads, lr, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
    params = {k: v.copy() for k, v in params.items()}
    bufs = {}
    for step, g_all in enumerate(grads):
        for k, p in params.items():
            g = g_all[k] + weight_decay * p
            if momentum:
                bufs[k] = g.copy() if step == 0 else momentum * bufs[k] + (1 - dampening) * g
                g = g + momentum * bufs[k] if nesterov else bufs[k]
            params[k] = p - lr * g
    return params


def adam_reference(params, grads, lr, betas, eps, weight_decay, decoupled=False):
    params = {k: v.copy() for k, v in params.items()}
    b1, b2 = betas
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, g_all in enumerate(grads, start=1):
        for k, p in params.items():
            g = g_all[k]
            if decoupled:
                p = p * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            params[k] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


SGD_CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening": dict(lr=0.05, momentum=0.8, dampening=0.3),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "weight-decay": dict(lr=0.1, weight_decay=0.01),
    "nesterov-weight-decay": dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.05),
    "momentum-dampening-weight-decay": dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.02),
}
ADAM_CONFIGS = {
    "default": dict(lr=1e-2),
    "weight-decay": dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
}


@pytest.mark.parametrize("config", SGD_CONFIGS.values(), ids=SGD_CONFIGS.keys())
def test_sgd_matches_reference(config, rng):
    params, grads = make_params(rng), make_grads(rng, 6)
    expected = sgd_reference(params, grads, **config)
    got = run(SGD(**config), params, grads)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("cls", [Adam, AdamW], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("config", ADAM_CONFIGS.values(), ids=ADAM_CONFIGS.keys())
def test_adam_matches_reference(cls, config, rng):
    params, grads = make_params(rng), make_grads(rng, 6)
    opt = cls(**config)
    expected = adam_reference(params, grads, opt.lr, opt.betas, opt.eps, opt.weight_decay, decoupled=cls is AdamW)
    got = run(opt, params, grads)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-12, atol=1e-14)


def test_hand_computed_scalar_steps():
    # SGD, lr 0.1, momentum 0.9, constant grad 1: buf 1 -> 1.9; p 1 -> 0.9 -> 0.71
    p = np.array([1.0])
    opt = SGD(lr=0.1, momentum=0.9)
    opt.step([("w", p, np.array([1.0]))])
    assert p[0] == pytest.approx(0.9, abs=1e-15)
    opt.step([("w", p, np.array([1.0]))])
    assert p[0] == pytest.approx(0.71, abs=1e-15)
    # Nesterov: step 1 g = 1 + 0.9*1 = 1.9 -> p = 1 - 0.19 = 0.81
    p = np.array([1.0])
    SGD(lr=0.1, momentum=0.9, nesterov=True).step([("w", p, np.array([1.0]))])
    assert p[0] == pytest.approx(0.81, abs=1e-15)
    # Adam's first step is lr * g / (|g| + eps): a step of ~lr against the gradient's sign
    p = np.array([1.0, 1.0])
    Adam(lr=0.01, eps=0.0).step([("w", p, np.array([3.0, -0.5]))])
    np.testing.assert_allclose(p, [0.99, 1.01], rtol=0, atol=1e-15)
    # AdamW decays first: p = 1 * (1 - 0.01 * 0.5) - 0.01
    p = np.array([1.0])
    AdamW(lr=0.01, eps=0.0, weight_decay=0.5).step([("w", p, np.array([2.0]))])
    assert p[0] == pytest.approx(0.995 - 0.01, abs=1e-15)


# ------------------------------------------------------------------------------------------------
# In place, no allocation, dtype, skipping
# ------------------------------------------------------------------------------------------------
ALL_OPTIMIZERS = {
    "sgd": lambda: SGD(lr=0.1),
    "sgd-nesterov-wd": lambda: SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-dampening-wd": lambda: SGD(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "adam-wd": lambda: Adam(weight_decay=1e-3),
    "adamw": lambda: AdamW(),
}


@pytest.mark.parametrize("make", ALL_OPTIMIZERS.values(), ids=ALL_OPTIMIZERS.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_updates_in_place_keep_dtype_and_leave_grads_alone(make, dtype, rng):
    params, grads = make_params(rng, dtype), make_grads(rng, 3, dtype)
    before = {k: p.copy() for k, p in params.items()}
    grads_before = [{k: g.copy() for k, g in gs.items()} for gs in grads]
    objects = {k: id(p) for k, p in params.items()}
    opt = make()
    run(opt, params, grads)
    for k, p in params.items():
        assert id(p) == objects[k] and p.dtype == dtype
        assert not np.array_equal(p, before[k])
        for name, value in opt.state[k].items():
            if isinstance(value, np.ndarray):
                assert value.dtype == dtype, name
    for gs, gs_before in zip(grads, grads_before):
        for k in gs:
            np.testing.assert_array_equal(gs[k], gs_before[k])


@pytest.mark.parametrize("make", ALL_OPTIMIZERS.values(), ids=ALL_OPTIMIZERS.keys())
def test_steady_state_step_allocates_no_parameter_sized_arrays(make, rng):
    # one large parameter (800 kB): any per-step temporary of its size would show in the peak
    p = rng.normal(size=100_000)
    g = rng.normal(size=100_000)
    opt = make()
    for _ in range(2):  # state and scratch buffers are created in the first steps
        opt.step([("w", p, g)])
    tracemalloc.start()
    try:
        opt.step([("w", p, g)])
        opt.step([("w", p, g)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < p.nbytes // 10


def test_grad_none_is_skipped(rng):
    params = make_params(rng)
    frozen = params["0.bias"].copy()
    for opt in (SGD(lr=0.1, momentum=0.9), Adam()):
        opt.step([(k, p, None if k == "0.bias" else rng.normal(size=p.shape)) for k, p in params.items()])
        np.testing.assert_array_equal(params["0.bias"], frozen)
        assert "0.bias" not in opt.state
    # Adam counts steps per parameter: a skipped step does not advance the bias correction
    opt = Adam()
    p = np.zeros(3)
    opt.step([("w", p, None)])
    opt.step([("w", p, np.ones(3))])
    assert opt.iterations == 2 and opt.state["w"]["step"] == 1
    np.testing.assert_allclose(p, -1e-3, rtol=1e-6)


def test_lr_can_change_between_steps():
    p = np.array([1.0])
    opt = SGD(lr=0.1)
    opt.step([("w", p, np.array([1.0]))])
    opt.lr = 0.01
    opt.step([("w", p, np.array([1.0]))])
    assert p[0] == pytest.approx(0.89, abs=1e-15)
    with pytest.raises(ValueError, match=r"lr in \[0.0, inf\].*-1"):
        opt.lr = -1


def test_bad_grad_leaves_params_untouched(rng):
    params = make_params(rng)
    before = {k: p.copy() for k, p in params.items()}
    opt = Adam()
    bad = [(k, p, np.zeros(p.shape)) for k, p in params.items()] + [("x", np.zeros(3), np.zeros(4))]
    with pytest.raises(ValueError, match=r"grad of 'x'.*\(3,\).*\(4,\)"):
        opt.step(bad)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    assert opt.iterations == 0
    with pytest.raises(TypeError, match=r"\(key, param, grad\)"):
        opt.step([("w", np.zeros(2))])
    with pytest.raises(TypeError, match="numpy arrays.*list"):
        opt.step([("w", np.zeros(2), [0.0, 0.0])])


# ------------------------------------------------------------------------------------------------
# state_dict
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", ALL_OPTIMIZERS.values(), ids=ALL_OPTIMIZERS.keys())
def test_state_dict_round_trip_continues_identically(make, rng, tmp_path):
    params, grads = make_params(rng), make_grads(rng, 6)
    a = make()
    run(a, params, grads[:3])
    np.savez(tmp_path / "opt.npz", **a.state_dict())
    params_b = {k: p.copy() for k, p in params.items()}
    b = type(a).from_config(json.loads(json.dumps(a.get_config())))
    with np.load(tmp_path / "opt.npz") as f:
        b.load_state_dict(dict(f), params=[(k, p, None) for k, p in params_b.items()])
    assert b.iterations == 3
    run(a, params, grads[3:])
    run(b, params_b, grads[3:])
    for k in SHAPES:
        np.testing.assert_array_equal(params_b[k], params[k])


def test_state_dict_keys_and_copies(rng):
    params, grads = make_params(rng), make_grads(rng, 2)
    opt = Adam()
    run(opt, params, grads)
    d = opt.state_dict()
    expected = {"step"} | {f"{n}/{k}" for n in ("exp_avg", "exp_avg_sq", "step") for k in SHAPES}
    assert set(d) == expected
    assert d["step"].dtype == np.int64 and int(d["step"]) == 2
    d["exp_avg/3.weight"][...] = 0  # a copy: changing it leaves the optimizer alone
    assert np.any(opt.state["3.weight"]["exp_avg"] != 0)
    sgd = SGD(lr=0.1, momentum=0.9)
    run(sgd, params, grads)
    assert set(sgd.state_dict()) == {"step"} | {f"momentum_buffer/{k}" for k in SHAPES}
    assert set(SGD(lr=0.1).state_dict()) == {"step"}


def test_load_state_dict_without_param_steps_uses_global_step(rng):
    params, grads = make_params(rng), make_grads(rng, 4)
    a = Adam()
    run(a, params, grads[:2])
    d = {k: v for k, v in a.state_dict().items() if not k.startswith("step/")}
    b = Adam()
    b.load_state_dict(d)
    assert all(s["step"] == 2 for s in b.state.values())


def test_load_state_dict_errors(rng):
    params = make_params(rng)
    good = {"step": np.array(1), "momentum_buffer/0.bias": np.zeros(4)}
    opt = SGD(lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="'step' entry"):
        opt.load_state_dict({"momentum_buffer/0.bias": np.zeros(4)})
    with pytest.raises(ValueError, match="momentum_buffer/<key>.*'exp_avg/0.bias'"):
        opt.load_state_dict({"step": np.array(1), "exp_avg/0.bias": np.zeros(4)})
    with pytest.raises(ValueError, match="non-negative integer"):
        opt.load_state_dict({"step": np.array(-1)})
    with pytest.raises(ValueError, match="non-negative integer"):
        opt.load_state_dict({"step": np.array(1.5)})
    with pytest.raises(ValueError, match=r"param's shape \(4,\).*\(5,\)"):
        opt.load_state_dict({"step": np.array(1), "momentum_buffer/0.bias": np.zeros(5)}, params=params)
    with pytest.raises(ValueError, match="known parameters.*'9.weight'"):
        opt.load_state_dict({"step": np.array(1), "momentum_buffer/9.weight": np.zeros(5)}, params=params)
    with pytest.raises(ValueError, match="floating-point"):
        opt.load_state_dict({"step": np.array(1), "momentum_buffer/0.bias": np.zeros(4, dtype=int)})
    with pytest.raises(TypeError, match="mapping"):
        opt.load_state_dict([("step", 1)])
    with pytest.raises(ValueError, match="exp_avg_sq/w"):
        Adam().load_state_dict({"step": np.array(1), "exp_avg/w": np.zeros(2)})
    with pytest.raises(ValueError, match="share one shape"):
        Adam().load_state_dict({"step": np.array(1), "exp_avg/w": np.zeros(2), "exp_avg_sq/w": np.zeros(3)})
    # without params the shape is checked at the next step, before anything changes
    opt.load_state_dict({"step": np.array(1), "momentum_buffer/0.bias": np.zeros(5)})
    before = params["0.bias"].copy()
    with pytest.raises(ValueError, match=r"momentum_buffer.*'0.bias'.*\(4,\).*\(5,\)"):
        opt.step([("0.bias", params["0.bias"], np.ones(4))])
    np.testing.assert_array_equal(params["0.bias"], before)
    # a failed load leaves the previous state in place
    opt.load_state_dict(good)
    with pytest.raises(ValueError):
        opt.load_state_dict({"step": np.array(5), "bogus/x": np.zeros(1)})
    assert opt.iterations == 1 and set(opt.state) == {"0.bias"}


def test_loaded_state_is_cast_to_param_dtype(rng):
    p = rng.normal(size=3).astype(np.float32)
    opt = SGD(lr=0.1, momentum=0.9)
    opt.load_state_dict({"step": np.array(1), "momentum_buffer/w": np.ones(3)})
    opt.step([("w", p, np.ones(3, dtype=np.float32))])
    assert opt.state["w"]["momentum_buffer"].dtype == np.float32 and p.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# Validation, registry, config
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, error, match",
    [
        # lr = 0 is valid, as in PyTorch (a cosine schedule anneals to it): negative is not.
        (lambda: SGD(lr=-0.5), ValueError, r"lr in \[0.0, inf\].*lr=-0.5"),
        (lambda: SGD(lr=float("nan")), ValueError, "finite.*lr=nan"),
        (lambda: SGD(lr="0.1"), ValueError, "finite number.*'0.1'"),
        (lambda: SGD(lr=0.1, momentum=-0.1), ValueError, "momentum.*-0.1"),
        (lambda: SGD(lr=0.1, dampening=1.5), ValueError, "dampening.*1.5"),
        (lambda: SGD(lr=0.1, weight_decay=-1), ValueError, "weight_decay.*-1"),
        (lambda: SGD(lr=0.1, nesterov=True), ValueError, "momentum > 0 and dampening == 0.*momentum=0"),
        (lambda: SGD(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "dampening=0.1"),
        (lambda: SGD(lr=0.1, momentum=0.9, nesterov=1), TypeError, "nesterov as a bool"),
        (lambda: Adam(betas=(0.9, 1.0)), ValueError, r"betas\[1\] in \[0.0, 1.0\).*1.0"),
        (lambda: Adam(betas=(-0.1, 0.9)), ValueError, r"betas\[0\].*-0.1"),
        (lambda: Adam(betas=0.9), ValueError, "pair.*0.9"),
        (lambda: Adam(eps=-1e-8), ValueError, "eps.*-1e-08"),
        (lambda: AdamW(weight_decay=-0.1), ValueError, "weight_decay.*-0.1"),
    ],
    ids=[
        "lr-negative", "lr-nan", "lr-str", "momentum", "dampening", "weight-decay", "nesterov-no-momentum",
        "nesterov-dampening", "nesterov-int", "beta2-one", "beta1-negative", "betas-scalar", "eps", "adamw-wd",
    ],
)
def test_hyperparameter_validation(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("name, cls", [("sgd", SGD), ("SGD", SGD), ("adam", Adam), ("AdamW", AdamW), ("adam_w", AdamW)])
def test_get_by_name(name, cls):
    opt = optimizers.get(name, lr=0.5)
    assert type(opt) is cls and opt.lr == 0.5


def test_get_instance_dict_and_errors():
    opt = Adam(lr=3e-4)
    assert optimizers.get(opt) is opt
    rebuilt = optimizers.get({"class": "Adam", "config": opt.get_config()})
    assert rebuilt.get_config() == opt.get_config()
    assert type(optimizers.get(SGD, lr=0.1)) is SGD
    with pytest.raises(ValueError, match="optimizer name.*'rmsprop'"):
        optimizers.get("rmsprop")
    with pytest.raises(TypeError, match="received: float"):
        optimizers.get(0.1)


@pytest.mark.parametrize("make", ALL_OPTIMIZERS.values(), ids=ALL_OPTIMIZERS.keys())
def test_config_round_trip_and_repr(make):
    opt = make()
    config = json.loads(json.dumps(opt.get_config()))
    assert type(opt).from_config(config).get_config() == opt.get_config()
    assert repr(opt).startswith(type(opt).__name__ + "(lr=")
    assert type(opt).__name__ in optimizers.OPTIMIZERS


# ------------------------------------------------------------------------------------------------
# Cross-check against torch.optim (skipped without torch)
# ------------------------------------------------------------------------------------------------
def _torch_run(torch_cls, config, params, grads):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.tensor(p.copy(), requires_grad=True) for k, p in params.items()}
    opt = torch_cls(list(tensors.values()), **config)
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        opt.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


@pytest.mark.parametrize("config", SGD_CONFIGS.values(), ids=SGD_CONFIGS.keys())
def test_sgd_matches_torch(config, rng):
    torch = pytest.importorskip("torch")
    params, grads = make_params(rng), make_grads(rng, 5)
    expected = _torch_run(torch.optim.SGD, config, params, grads)
    got = run(SGD(**config), {k: p.copy() for k, p in params.items()}, grads)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("config", ADAM_CONFIGS.values(), ids=ADAM_CONFIGS.keys())
def test_adam_matches_torch(name, config, rng):
    torch = pytest.importorskip("torch")
    params, grads = make_params(rng), make_grads(rng, 5)
    ours = getattr(optimizers, name)(**config)
    expected = _torch_run(getattr(torch.optim, name), ours.get_config(), params, grads)
    got = run(ours, {k: p.copy() for k, p in params.items()}, grads)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-12, atol=1e-12)
