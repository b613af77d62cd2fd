"""Learning-rate schedules: values per epoch against torch.optim.lr_scheduler, use from fit,
save/load continuing the schedule, the command-line spelling, bad input."""
import math

import numpy as np
import pytest

import cnnx
from cnnx import schedules
from cnnx.layers import Dense, ReLU
from cnnx.optimizers import SGD, Adam
from cnnx.schedules import (
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    MultiStepLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)

EPOCHS = 25

# (cnnx builder, torch builder) for the same schedule; both take their optimizer first.
CASES = {
    "step": (lambda o: StepLR(o, step_size=4, gamma=0.5),
             lambda o, S: S.StepLR(o, step_size=4, gamma=0.5)),
    "multistep": (lambda o: MultiStepLR(o, milestones=[3, 7, 15], gamma=0.3),
                  lambda o, S: S.MultiStepLR(o, milestones=[3, 7, 15], gamma=0.3)),
    "exponential": (lambda o: ExponentialLR(o, gamma=0.9),
                    lambda o, S: S.ExponentialLR(o, gamma=0.9)),
    # past T_max the cosine rises again in both
    "cosine": (lambda o: CosineAnnealingLR(o, T_max=10, eta_min=1e-3),
               lambda o, S: S.CosineAnnealingLR(o, T_max=10, eta_min=1e-3)),
    "cosine-to-zero": (lambda o: CosineAnnealingLR(o, T_max=EPOCHS),
                       lambda o, S: S.CosineAnnealingLR(o, T_max=EPOCHS)),
    "linear-warmup": (lambda o: LinearLR(o, start_factor=0.1, total_iters=6),
                      lambda o, S: S.LinearLR(o, start_factor=0.1, total_iters=6)),
    "linear-decay": (lambda o: LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=8),
                     lambda o, S: S.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=8)),
    "onecycle-cos": (lambda o: OneCycleLR(o, max_lr=0.5, total_steps=EPOCHS + 1),
                     lambda o, S: S.OneCycleLR(o, max_lr=0.5, total_steps=EPOCHS + 1)),
    "onecycle-linear-3phase": (
        lambda o: OneCycleLR(o, max_lr=0.4, total_steps=EPOCHS + 1, pct_start=0.25, anneal_strategy="linear",
                             three_phase=True, div_factor=10.0, final_div_factor=100.0),
        lambda o, S: S.OneCycleLR(o, max_lr=0.4, total_steps=EPOCHS + 1, pct_start=0.25, anneal_strategy="linear",
                                  three_phase=True, div_factor=10.0, final_div_factor=100.0)),
    "warmup-then-cosine": (
        lambda o: SequentialLR(o, [LinearLR(o, start_factor=0.1, total_iters=5), CosineAnnealingLR(o, T_max=20)],
                               milestones=[5]),
        lambda o, S: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.1, total_iters=5),
                                        S.CosineAnnealingLR(o, T_max=20)], milestones=[5])),
}


def torch_values(build, lr, momentum=0.9, epochs=EPOCHS):
    torch = pytest.importorskip("torch")
    S = torch.optim.lr_scheduler
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=momentum)
    sched = build(opt, S)
    lrs, moms = [], []
    while True:
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        if len(lrs) == epochs + 1:
            break
        opt.step()
        sched.step()
    return lrs, moms


def cnnx_values(build, lr, momentum=0.9, epochs=EPOCHS):
    opt = SGD(lr=lr, momentum=momentum)
    sched = build(opt)
    lrs, moms = [], []
    while True:
        lrs.append(opt.lr)
        moms.append(opt.momentum)
        if len(lrs) == epochs + 1:
            break
        sched.step()
    return lrs, moms


@pytest.mark.parametrize("name", list(CASES))
def test_values_per_epoch_match_torch(name):
    ours, theirs = CASES[name]
    lrs, moms = cnnx_values(ours, lr=0.2)
    expected, expected_moms = torch_values(theirs, lr=0.2)
    # torch computes most schedules recursively (lr *= factor each step): equal up to rounding
    np.testing.assert_allclose(lrs, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(moms, expected_moms, rtol=1e-12, atol=1e-15)


def test_closed_forms_by_hand():
    opt = SGD(lr=1.0)
    s = StepLR(opt, step_size=3, gamma=0.5)
    assert [s.lr_at(e) for e in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    c = CosineAnnealingLR(SGD(lr=1.0), T_max=4)
    np.testing.assert_allclose([c.lr_at(e) for e in range(5)], [1, (1 + math.sqrt(0.5)) / 2, 0.5,
                                                                 (1 - math.sqrt(0.5)) / 2, 0], atol=1e-16)


def test_reduce_on_plateau_matches_torch():
    torch = pytest.importorskip("torch")
    metrics = [1.0, 0.9, 0.95, 0.92, 0.91, 0.905, 0.8, 0.85, 0.86, 0.87, 0.88, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75]
    kwargs = dict(mode="min", factor=0.5, patience=1, threshold=0.01, cooldown=1, min_lr=0.01)
    t_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    t_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(t_opt, **kwargs)
    opt = SGD(lr=0.1)
    sched = ReduceLROnPlateau(opt, **kwargs)
    ours, theirs = [], []
    for value in metrics:
        sched.step(value)
        t_sched.step(value)
        ours.append(opt.lr)
        theirs.append(t_opt.param_groups[0]["lr"])
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert ours[0] == 0.1 and min(ours) == 0.01  # it did reduce, down to min_lr


def test_onecycle_cycles_adam_beta1_and_refuses_extra_steps():
    opt = Adam(lr=1e-3, betas=(0.9, 0.99))
    sched = OneCycleLR(opt, max_lr=0.01, total_steps=4, pct_start=0.5)
    assert opt.betas == (0.95, 0.99) and opt.lr == pytest.approx(0.01 / 25)
    sched.step()  # end of warm-up: top lr, lowest momentum
    assert opt.lr == pytest.approx(0.01) and opt.betas[0] == pytest.approx(0.85)
    for _ in range(3):
        sched.step()
    with pytest.raises(ValueError, match="past total_steps=4"):
        sched.step()


def mlp(seed=0):
    cnnx.manual_seed(seed)
    return cnnx.Network([Dense(4, 8), ReLU(), Dense(8, 3)], input_shape=(4,), dtype="float64")


def blobs(n, seed):
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, n)
    x = r.normal(size=(n, 4)) + y[:, None]
    return x, y


def test_fit_steps_the_schedule_per_epoch_and_records_lr():
    x, y = blobs(24, seed=1)
    opt = SGD(lr=0.1)
    net = mlp().compile("SoftmaxCrossEntropy", opt)
    seen = []
    cb = cnnx.callbacks.LambdaCallback(on_batch_begin=lambda b, logs: seen.append(opt.lr))
    CosineAnnealingLR(opt, T_max=4)
    net.fit(x, y, epochs=4, batch_size=12, verbose=0, callbacks=[cb])
    expected = [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(5)]
    assert net.history["lr"] == pytest.approx(expected[:4], abs=1e-16)
    assert seen == pytest.approx([v for v in expected[:4] for _ in range(2)], abs=1e-16)  # 2 batches an epoch
    assert opt.lr == pytest.approx(0.0, abs=1e-16)  # after the last step: the value for epoch 4


def test_fit_steps_a_batch_schedule_per_batch():
    x, y = blobs(30, seed=2)
    opt = SGD(lr=0.1)
    net = mlp().compile("SoftmaxCrossEntropy", opt)
    sched = OneCycleLR(opt, max_lr=0.2, epochs=2, steps_per_epoch=3, interval="batch", cycle_momentum=False)
    net.fit(x, y, epochs=2, batch_size=10, verbose=0)
    assert sched.last_epoch == 6
    assert opt.lr == pytest.approx(sched.lr_at(6))


def test_fit_reduce_on_plateau_reads_the_monitored_log():
    x, y = blobs(24, seed=3)
    opt = SGD(lr=1e-6)  # too small to learn: the loss plateaus at once
    net = mlp().compile("SoftmaxCrossEntropy", opt)
    ReduceLROnPlateau(opt, monitor="loss", patience=0, factor=0.5, threshold=0.5)
    net.fit(x, y, epochs=3, batch_size=24, shuffle=False, verbose=0)
    assert net.history["lr"] == pytest.approx([1e-6, 1e-6, 5e-7])
    assert opt.lr == pytest.approx(2.5e-7)
    opt2 = SGD(lr=0.1)
    net2 = mlp().compile("SoftmaxCrossEntropy", opt2)
    ReduceLROnPlateau(opt2)  # monitors val_loss
    with pytest.raises(ValueError, match="Expected validation_data for ReduceLROnPlateau"):
        net2.fit(x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("make", [
    lambda o: CosineAnnealingLR(o, T_max=6),
    lambda o: OneCycleLR(o, max_lr=0.3, total_steps=7),
    lambda o: SequentialLR(o, [LinearLR(o, start_factor=0.2, total_iters=2), ExponentialLR(o, gamma=0.8)], [2]),
    lambda o: ReduceLROnPlateau(o, monitor="loss", patience=0, threshold=0.9),
], ids=["cosine", "onecycle", "sequential", "plateau"])
def test_save_load_resumes_the_schedule_exactly(tmp_path, make):
    x, y = blobs(24, seed=4)
    # one unbroken run of 6 epochs ...
    opt = SGD(lr=0.1, momentum=0.9)
    make(opt)
    full = mlp(seed=5).compile("SoftmaxCrossEntropy", opt)
    full.fit(x, y, epochs=6, batch_size=8, seed=7, verbose=0)
    # ... against 3 epochs, save, load, 3 more
    opt = SGD(lr=0.1, momentum=0.9)
    make(opt)
    first = mlp(seed=5).compile("SoftmaxCrossEntropy", opt)
    first.fit(x, y, epochs=3, batch_size=8, seed=7, verbose=0)
    first.save(tmp_path / "run")
    resumed = cnnx.load(tmp_path / "run")
    assert type(resumed.optimizer.schedule) is type(opt.schedule)
    assert resumed.optimizer.schedule.last_epoch == 3
    resumed.fit(x, y, epochs=3, batch_size=8, seed=7, verbose=0)
    assert resumed.history["lr"] == pytest.approx(full.history["lr"], rel=1e-12)
    assert resumed.optimizer.lr == pytest.approx(full.optimizer.lr, rel=1e-12, abs=1e-18)
    np.testing.assert_allclose(resumed.history["loss"], full.history["loss"], rtol=1e-9)


def test_state_dict_round_trip_and_detach():
    opt = SGD(lr=0.1, momentum=0.9)
    StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.schedule.step()
    sd = opt.state_dict()
    assert sd["lr_schedule"].dtype == np.uint8
    other = SGD(lr=0.7)
    other.load_state_dict(sd)
    assert isinstance(other.schedule, StepLR) and other.schedule.last_epoch == 3
    assert other.lr == pytest.approx(0.05) and other.schedule.base_lr == 0.1
    other.schedule.step()
    assert other.lr == pytest.approx(0.025)
    del sd["lr_schedule"]
    other.load_state_dict(sd)  # a state dict without a schedule is a state without one
    assert other.schedule is None


def test_corrupt_schedule_state_is_refused_and_leaves_optimizer_unchanged():
    opt = SGD(lr=0.1)
    CosineAnnealingLR(opt, T_max=5)
    sd = opt.state_dict()
    sd["lr_schedule"] = np.frombuffer(b'{"class": "NoSuchLR", "config": {}, "state": {}}', dtype=np.uint8)
    target = SGD(lr=0.3)
    with pytest.raises(ValueError, match="NoSuchLR"):
        target.load_state_dict(sd)
    assert target.lr == 0.3 and target.schedule is None


def test_lr_zero_after_cosine_saves_and_loads(tmp_path):
    x, y = blobs(12, seed=5)
    opt = SGD(lr=0.1)
    CosineAnnealingLR(opt, T_max=2)
    net = mlp().compile("SoftmaxCrossEntropy", opt)
    net.fit(x, y, epochs=2, batch_size=12, verbose=0)
    assert opt.lr == pytest.approx(0.0, abs=1e-17)
    net.save(tmp_path / "z")
    assert cnnx.load(tmp_path / "z").optimizer.lr == pytest.approx(0.0, abs=1e-17)


@pytest.mark.parametrize("spec, cls, attrs", [
    ("cosine", CosineAnnealingLR, {"T_max": 10, "eta_min": 0.0}),
    ("cosine:eta_min=1e-4", CosineAnnealingLR, {"eta_min": 1e-4}),
    ("step:step_size=3,gamma=0.5", StepLR, {"step_size": 3, "gamma": 0.5}),
    ("multistep:milestones=4/8", MultiStepLR, {"milestones": [4, 8]}),
    ("exponential:gamma=0.9", ExponentialLR, {"gamma": 0.9}),
    ("warmup:total_iters=3", LinearLR, {"start_factor": 0.1, "total_iters": 3}),
    ("onecycle", OneCycleLR, {"max_lr": 0.05, "total_steps": 10}),
    ("plateau:patience=2,monitor=loss", ReduceLROnPlateau, {"patience": 2, "monitor": "loss"}),
])
def test_from_spec(spec, cls, attrs):
    sched = schedules.from_spec(spec, SGD(lr=0.05), epochs=10)
    assert type(sched) is cls
    for key, value in attrs.items():
        assert getattr(sched, key) == value


@pytest.mark.parametrize("spec, match", [
    ("sine", "schedule name"),
    ("step", "step_size"),
    ("step:gamma", "key=value"),
    ("step:step_size=0", "step_size as an int >= 1"),
    ("cosine:warp=2", "warp"),
])
def test_from_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        schedules.from_spec(spec, SGD(lr=0.05), epochs=10)


@pytest.mark.parametrize("build, match", [
    (lambda o: StepLR(o, step_size=0), "step_size"),
    (lambda o: ExponentialLR(o, gamma=-1), "gamma"),
    (lambda o: MultiStepLR(o, milestones=[5, 3]), "increasing"),
    (lambda o: CosineAnnealingLR(o, T_max=10, interval="week"), "interval"),
    (lambda o: OneCycleLR(o, max_lr=0.1), "total_steps"),
    (lambda o: ReduceLROnPlateau(o, mode="up"), "mode"),
    (lambda o: SequentialLR(o, [StepLR(o, 2)], milestones=[3]), "0 increasing milestones"),
], ids=["step-size", "gamma", "milestones", "interval", "onecycle-steps", "plateau-mode", "sequential"])
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build(SGD(lr=0.1))


def test_needs_a_cnnx_optimizer():
    with pytest.raises(TypeError, match="cnnx optimizer"):
        StepLR(object(), step_size=2)
