"""Learning-rate schedules with PyTorch's names, arguments and values.

This module owns the schedules. A schedule is built on an optimizer, as in PyTorch, and attaches
itself to it (``optimizer.schedule``); ``Network.fit`` then steps it at the end of every epoch
(``interval="epoch"``, the default) or after every batch (``interval="batch"``). Because the
schedule lives on the optimizer, it is saved and restored with it (``optimizer.state_dict()``
carries it, so ``cnnx.save`` / ``cnnx.load`` do too) and a resumed run continues the schedule::

    opt = cnnx.optimizers.SGD(lr=0.1, momentum=0.9)
    CosineAnnealingLR(opt, T_max=30)          # opt.schedule is now this schedule
    net.compile("SoftmaxCrossEntropy", opt)
    net.fit(x, y, epochs=30)                  # epoch e trains with lr = the value at e

Every schedule except ``ReduceLROnPlateau`` is a closed form ``lr_at(epoch)`` of the number of
steps taken, so its values are exact (no drift from chained multiplications) and equal to
``torch.optim.lr_scheduler``'s to rounding. Step ``0`` is the value in effect before the first
``step()``: constructing a schedule sets the optimizer's lr to it, as PyTorch's initial step does.
"""
from __future__ import annotations

import bisect
import json
import math
import numbers

import numpy as np

__all__ = [
    "LRSchedule",
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "LinearLR",
    "OneCycleLR",
    "SequentialLR",
    "ReduceLROnPlateau",
    "SCHEDULES",
    "from_spec",
]

#: Every schedule class by name: what save/load uses to rebuild one.
SCHEDULES: dict[str, type] = {}

_INTERVALS = ("epoch", "batch")


def _check_number(name, value, low=None, high=None, low_open=False, high_open=False):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"Expected {name} as a finite number, received: {name}={value!r}")
    value = float(value)
    if (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    ):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(
            f"Expected {name} in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}, "
            f"received: {name}={value!r}"
        )
    return value


def _check_count(name, value, minimum):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Expected {name} as an int >= {minimum}, received: {name}={value!r}")
    return int(value)


class LRSchedule:
    """Base class: sets ``optimizer.lr`` from the number of steps taken.

    Subclasses implement ``lr_at(epoch)`` (the closed form) and ``get_config()``; they register
    themselves in :data:`SCHEDULES` by class name.

    Parameters
    ----------
    optimizer : cnnx.optimizers.Optimizer
        The schedule attaches itself to it (``optimizer.schedule = self``), replacing any other.
    interval : {"epoch", "batch"}, default "epoch"
        When ``Network.fit`` calls :meth:`step`: after every epoch or after every batch.

    Attributes
    ----------
    base_lr : float
        The optimizer's lr when the schedule was built (PyTorch's ``initial_lr``).
    last_epoch : int
        Number of ``step()`` calls so far (PyTorch's ``last_epoch``, which counts batches when
        the schedule is stepped per batch).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        SCHEDULES[cls.__name__] = cls

    def __init__(self, optimizer, interval="epoch"):
        from .optimizers import Optimizer

        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Expected a cnnx optimizer as the first argument of {type(self).__name__}, "
                f"received: {type(optimizer).__name__}"
            )
        if interval not in _INTERVALS:
            raise ValueError(f"Expected interval 'epoch' or 'batch', received: interval={interval!r}")
        self.optimizer = optimizer
        self.interval = interval
        self.base_lr = float(optimizer.lr)
        self.last_epoch = 0

    def _start(self):
        """Attach to the optimizer and apply step 0 (called at the end of each constructor,
        once the subclass has validated its arguments)."""
        self.optimizer.schedule = self
        self._apply(0)

    # --- the schedule -----------------------------------------------------------------
    def lr_at(self, epoch):
        """The learning rate after ``epoch`` calls of :meth:`step` (a float)."""
        raise NotImplementedError

    def step(self, metrics=None):
        """Advance one epoch (or one batch) and set the optimizer's lr for the next one.

        ``metrics`` is ignored (only :class:`ReduceLROnPlateau` reads it).
        """
        self.last_epoch += 1
        self._apply(self.last_epoch)

    def get_last_lr(self):
        """The learning rate the schedule set last (the optimizer's current lr)."""
        return self.optimizer.lr

    def _apply(self, epoch):
        _set_lr(self.optimizer, self.lr_at(epoch))

    def _fit_step(self, logs):
        """What ``Network.fit`` calls: a plain step; ReduceLROnPlateau reads its monitored value."""
        self.step()

    def _check_fit(self, has_validation):
        """Raise before training when the schedule cannot run in this ``fit`` call."""

    # --- persistence --------------------------------------------------------------------
    def get_config(self):
        """JSON-serialisable constructor arguments except ``optimizer``."""
        return {"interval": self.interval}

    def state_dict(self):
        """JSON-serialisable state: what :meth:`load_state_dict` needs to continue exactly."""
        return {"base_lr": self.base_lr, "last_epoch": self.last_epoch, "lr": float(self.optimizer.lr)}

    def load_state_dict(self, state):
        """Restore a :meth:`state_dict` and set the optimizer's lr (and momentum) to match it."""
        self.base_lr = _check_number("base_lr", state["base_lr"], low=0.0)
        self.last_epoch = _check_count("last_epoch", state["last_epoch"], 0)
        _set_lr(self.optimizer, _check_number("lr", state["lr"], low=0.0))

    def to_record(self):
        """``{"class", "config", "state"}``: everything needed to rebuild the schedule."""
        return {"class": type(self).__name__, "config": self.get_config(), "state": self.state_dict()}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _set_lr(optimizer, lr):
    optimizer.lr = float(lr)


class StepLR(LRSchedule):
    """``lr = base_lr * gamma ** (epoch // step_size)``, as ``torch.optim.lr_scheduler.StepLR``.

    Parameters
    ----------
    optimizer : Optimizer
    step_size : int >= 1
    gamma : float > 0, default 0.1
    interval : {"epoch", "batch"}, default "epoch"
    """

    def __init__(self, optimizer, step_size, gamma=0.1, interval="epoch"):
        super().__init__(optimizer, interval)
        self.step_size = _check_count("step_size", step_size, 1)
        self.gamma = _check_number("gamma", gamma, low=0.0, low_open=True)
        self._start()

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)

    def get_config(self):
        return {"step_size": self.step_size, "gamma": self.gamma, **super().get_config()}


class MultiStepLR(LRSchedule):
    """``lr = base_lr * gamma ** (number of milestones <= epoch)``, as ``MultiStepLR``.

    Parameters
    ----------
    optimizer : Optimizer
    milestones : sequence of int >= 1, increasing
    gamma : float > 0, default 0.1
    interval : {"epoch", "batch"}, default "epoch"
    """

    def __init__(self, optimizer, milestones, gamma=0.1, interval="epoch"):
        super().__init__(optimizer, interval)
        if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
            raise TypeError(f"Expected milestones as a list of ints, received: milestones={milestones!r}")
        milestones = [_check_count("milestones[i]", m, 1) for m in milestones]
        if not milestones or any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"Expected milestones as a non-empty increasing list, received: {milestones!r}")
        self.milestones = milestones
        self.gamma = _check_number("gamma", gamma, low=0.0, low_open=True)
        self._start()

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, epoch)

    def get_config(self):
        return {"milestones": list(self.milestones), "gamma": self.gamma, **super().get_config()}


class ExponentialLR(LRSchedule):
    """``lr = base_lr * gamma ** epoch``, as ``ExponentialLR``.

    Parameters
    ----------
    optimizer : Optimizer
    gamma : float > 0
    interval : {"epoch", "batch"}, default "epoch"
    """

    def __init__(self, optimizer, gamma, interval="epoch"):
        super().__init__(optimizer, interval)
        self.gamma = _check_number("gamma", gamma, low=0.0, low_open=True)
        self._start()

    def lr_at(self, epoch):
        return self.base_lr * self.gamma**epoch

    def get_config(self):
        return {"gamma": self.gamma, **super().get_config()}


class CosineAnnealingLR(LRSchedule):
    """``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``, as
    ``CosineAnnealingLR`` (past ``T_max`` the cosine continues, rising again, as in PyTorch).

    Parameters
    ----------
    optimizer : Optimizer
    T_max : int >= 1
        Steps from ``base_lr`` down to ``eta_min`` (usually the number of epochs).
    eta_min : float >= 0, default 0
    interval : {"epoch", "batch"}, default "epoch"
    """

    def __init__(self, optimizer, T_max, eta_min=0.0, interval="epoch"):
        super().__init__(optimizer, interval)
        self.T_max = _check_count("T_max", T_max, 1)
        self.eta_min = _check_number("eta_min", eta_min, low=0.0)
        self._start()

    def lr_at(self, epoch):
        return self.eta_min + (self.base_lr - self.eta_min) * (1.0 + math.cos(math.pi * epoch / self.T_max)) / 2.0

    def get_config(self):
        return {"T_max": self.T_max, "eta_min": self.eta_min, **super().get_config()}


class LinearLR(LRSchedule):
    """Linear warm-up (or decay): the factor goes from ``start_factor`` to ``end_factor`` over
    ``total_iters`` steps and then stays, as ``LinearLR``::

        lr = base_lr * (start_factor + (end_factor - start_factor) * min(epoch, total_iters) / total_iters)

    Parameters
    ----------
    optimizer : Optimizer
    start_factor : float in (0, 1], default 1/3
    end_factor : float in [0, 1], default 1
    total_iters : int >= 1, default 5
    interval : {"epoch", "batch"}, default "epoch"
    """

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5, interval="epoch"):
        super().__init__(optimizer, interval)
        self.start_factor = _check_number("start_factor", start_factor, low=0.0, high=1.0, low_open=True)
        self.end_factor = _check_number("end_factor", end_factor, low=0.0, high=1.0)
        self.total_iters = _check_count("total_iters", total_iters, 1)
        self._start()

    def lr_at(self, epoch):
        t = min(epoch, self.total_iters) / self.total_iters
        return self.base_lr * (self.start_factor + (self.end_factor - self.start_factor) * t)

    def get_config(self):
        return {"start_factor": self.start_factor, "end_factor": self.end_factor,
                "total_iters": self.total_iters, **super().get_config()}


class OneCycleLR(LRSchedule):
    """The 1cycle policy, as ``torch.optim.lr_scheduler.OneCycleLR``.

    The lr rises from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of
    ``total_steps``, then anneals to ``max_lr / (div_factor * final_div_factor)``; with
    ``cycle_momentum`` the momentum (SGD's ``momentum``, Adam's ``betas[0]``) moves the opposite
    way between ``max_momentum`` and ``base_momentum``. PyTorch steps it per batch
    (``interval="batch"``, ``total_steps = epochs * batches per epoch``); per epoch works too.

    Parameters
    ----------
    optimizer : Optimizer
    max_lr : float > 0
    total_steps : int >= 2, optional
        Or give ``epochs`` and ``steps_per_epoch`` (their product).
    epochs, steps_per_epoch : int >= 1, optional
    pct_start : float in (0, 1), default 0.3
    anneal_strategy : {"cos", "linear"}, default "cos"
    cycle_momentum : bool, default True
    base_momentum, max_momentum : float, default 0.85, 0.95
    div_factor : float > 0, default 25
    final_div_factor : float > 0, default 1e4
    three_phase : bool, default False
        Come back down to ``max_lr / div_factor`` symmetrically before the final annealing.
    interval : {"epoch", "batch"}, default "epoch"

    Raises
    ------
    ValueError
        When stepped more than ``total_steps - 1`` times (as PyTorch).
    """

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None, pct_start=0.3,
                 anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85, max_momentum=0.95,
                 div_factor=25.0, final_div_factor=1e4, three_phase=False, interval="epoch"):
        super().__init__(optimizer, interval)
        self.max_lr = _check_number("max_lr", max_lr, low=0.0, low_open=True)
        if total_steps is None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError("Expected total_steps, or epochs and steps_per_epoch, received: none of them")
            total_steps = _check_count("epochs", epochs, 1) * _check_count("steps_per_epoch", steps_per_epoch, 1)
        self.total_steps = _check_count("total_steps", total_steps, 2)
        self.pct_start = _check_number("pct_start", pct_start, low=0.0, high=1.0, low_open=True, high_open=True)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"Expected anneal_strategy 'cos' or 'linear', received: {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        self.cycle_momentum = bool(cycle_momentum)
        self.base_momentum = _check_number("base_momentum", base_momentum, low=0.0, high=1.0, high_open=True)
        self.max_momentum = _check_number("max_momentum", max_momentum, low=0.0, high=1.0, high_open=True)
        self.div_factor = _check_number("div_factor", div_factor, low=0.0, low_open=True)
        self.final_div_factor = _check_number("final_div_factor", final_div_factor, low=0.0, low_open=True)
        self.three_phase = bool(three_phase)
        if self.cycle_momentum and not (hasattr(optimizer, "momentum") or hasattr(optimizer, "betas")):
            raise ValueError(f"cycle_momentum needs an optimizer with momentum or betas, received: {optimizer!r}")
        initial = self.max_lr / self.div_factor
        minimum = initial / self.final_div_factor
        total, pct = self.total_steps, self.pct_start
        # (end step, lr from, lr to, momentum from, momentum to), as torch builds its phases
        hi_m, lo_m = self.max_momentum, self.base_momentum
        if self.three_phase:
            self._phases = [
                (float(pct * total) - 1, initial, self.max_lr, hi_m, lo_m),
                (float(2 * pct * total) - 2, self.max_lr, initial, lo_m, hi_m),
                (total - 1, initial, minimum, hi_m, hi_m),
            ]
        else:
            self._phases = [
                (float(pct * total) - 1, initial, self.max_lr, hi_m, lo_m),
                (total - 1, self.max_lr, minimum, lo_m, hi_m),
            ]
        self._start()

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def _values_at(self, step):
        if step > self.total_steps:
            raise ValueError(
                f"OneCycleLR was stepped {step} times, past total_steps={self.total_steps}; "
                "give it more total_steps (epochs * steps_per_epoch)"
            )
        start = 0.0
        for i, (end, lr0, lr1, m0, m1) in enumerate(self._phases):
            if step <= end or i == len(self._phases) - 1:
                pct = (step - start) / (end - start)
                return self._anneal(lr0, lr1, pct), self._anneal(m0, m1, pct)
            start = end
        raise AssertionError("unreachable")

    def lr_at(self, epoch):
        return self._values_at(epoch)[0]

    def momentum_at(self, epoch):
        """The momentum (or Adam's beta1) after ``epoch`` steps."""
        return self._values_at(epoch)[1]

    def _apply(self, epoch):
        lr, momentum = self._values_at(epoch)
        _set_lr(self.optimizer, lr)
        if self.cycle_momentum:
            opt = self.optimizer
            if hasattr(opt, "betas"):
                opt.betas = (float(momentum), opt.betas[1])
            else:
                opt.momentum = float(momentum)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._apply(self.last_epoch)

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start,
                "anneal_strategy": self.anneal_strategy, "cycle_momentum": self.cycle_momentum,
                "base_momentum": self.base_momentum, "max_momentum": self.max_momentum,
                "div_factor": self.div_factor, "final_div_factor": self.final_div_factor,
                "three_phase": self.three_phase, **super().get_config()}


class SequentialLR(LRSchedule):
    """Schedules one after the other, as ``SequentialLR``: warm-up then cosine, for instance::

        warmup = LinearLR(opt, start_factor=0.1, total_iters=5)
        cosine = CosineAnnealingLR(opt, T_max=25)
        SequentialLR(opt, [warmup, cosine], milestones=[5])

    From milestone ``m`` on, the next schedule runs from its own step 0 (``lr_at(epoch - m)``).

    Parameters
    ----------
    optimizer : Optimizer
    schedules : list of LRSchedule
        Built on the same optimizer, all with a closed form (not ReduceLROnPlateau).
    milestones : list of int, increasing, ``len(schedules) - 1`` of them
    interval : {"epoch", "batch"}, default "epoch"
    """

    def __init__(self, optimizer, schedules, milestones, interval="epoch"):
        super().__init__(optimizer, interval)
        schedules = list(schedules)
        for s in schedules:
            if not isinstance(s, LRSchedule) or isinstance(s, (ReduceLROnPlateau, SequentialLR)):
                raise TypeError(f"Expected closed-form schedules (not ReduceLROnPlateau), received: {s!r}")
            if s.optimizer is not optimizer:
                raise ValueError(f"Expected every schedule built on the same optimizer, received: {s!r}")
        milestones = [_check_count("milestones[i]", m, 1) for m in milestones]
        if len(milestones) != len(schedules) - 1 or any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(
                f"Expected {len(schedules) - 1} increasing milestones for {len(schedules)} schedules, "
                f"received: {milestones!r}"
            )
        # Each part was built on the optimizer's lr before any of them changed it.
        self.base_lr = schedules[0].base_lr
        for s in schedules:
            s.base_lr = self.base_lr
        self.schedules = schedules
        self.milestones = milestones
        self._start()

    def lr_at(self, epoch):
        i = bisect.bisect_right(self.milestones, epoch)
        offset = self.milestones[i - 1] if i else 0
        return self.schedules[i].lr_at(epoch - offset)

    def get_config(self):
        return {"schedules": [{"class": type(s).__name__, "config": s.get_config()} for s in self.schedules],
                "milestones": list(self.milestones), **super().get_config()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for s in self.schedules:
            s.base_lr = self.base_lr


class ReduceLROnPlateau(LRSchedule):
    """Multiply the lr by ``factor`` when a metric stops improving, as ``ReduceLROnPlateau``.

    ``step(metrics)`` takes the epoch's value of the metric; in ``fit`` the schedule reads it
    from the epoch logs under ``monitor``.

    Parameters
    ----------
    optimizer : Optimizer
    mode : {"min", "max"}, default "min"
    factor : float in (0, 1), default 0.1
    patience : int >= 0, default 10
    threshold : float >= 0, default 1e-4
    threshold_mode : {"rel", "abs"}, default "rel"
    cooldown : int >= 0, default 0
    min_lr : float >= 0, default 0
    eps : float >= 0, default 1e-8
        Changes smaller than this are not applied.
    monitor : str, default "val_loss"
        Epoch-log key ``fit`` passes to ``step`` (``loss``, ``accuracy``, ``val_loss``, ...).
    """

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel",
                 cooldown=0, min_lr=0.0, eps=1e-8, monitor="val_loss"):
        super().__init__(optimizer, "epoch")
        if mode not in ("min", "max"):
            raise ValueError(f"Expected mode 'min' or 'max', received: mode={mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"Expected threshold_mode 'rel' or 'abs', received: threshold_mode={threshold_mode!r}")
        if not isinstance(monitor, str):
            raise TypeError(f"Expected monitor as a str, received: monitor={monitor!r}")
        self.mode = mode
        self.factor = _check_number("factor", factor, low=0.0, high=1.0, low_open=True, high_open=True)
        self.patience = _check_count("patience", patience, 0)
        self.threshold = _check_number("threshold", threshold, low=0.0)
        self.threshold_mode = threshold_mode
        self.cooldown = _check_count("cooldown", cooldown, 0)
        self.min_lr = _check_number("min_lr", min_lr, low=0.0)
        self.eps = _check_number("eps", eps, low=0.0)
        self.monitor = monitor
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.optimizer.schedule = self  # the lr is left as it is until a plateau

    def _is_better(self, value):
        if self.mode == "min":
            bound = self.best * (1.0 - self.threshold) if self.threshold_mode == "rel" else self.best - self.threshold
            return value < bound
        bound = self.best * (1.0 + self.threshold) if self.threshold_mode == "rel" else self.best + self.threshold
        return value > bound

    def step(self, metrics=None):
        """Record one epoch's ``metrics`` (a number) and reduce the lr after a plateau."""
        if metrics is None:
            raise TypeError("ReduceLROnPlateau.step needs the epoch's metric value, received: None")
        value = float(metrics)
        self.last_epoch += 1
        if self._is_better(value):
            self.best = value
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            old = self.optimizer.lr
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                _set_lr(self.optimizer, new)
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0

    def lr_at(self, epoch):
        raise TypeError("ReduceLROnPlateau has no closed form: its lr depends on the metric it watches")

    def _fit_step(self, logs):
        value = logs.get(self.monitor)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(
                f"ReduceLROnPlateau monitors {self.monitor!r}, which the epoch logs do not hold "
                f"(available: {sorted(k for k, v in logs.items() if not (isinstance(v, float) and math.isnan(v)))})"
            )
        self.step(value)

    def _check_fit(self, has_validation):
        if self.monitor.startswith("val_") and not has_validation:
            raise ValueError(
                f"Expected validation_data for ReduceLROnPlateau(monitor={self.monitor!r}), received: none; "
                "pass validation_data to fit or monitor 'loss'"
            )

    def get_config(self):
        return {"mode": self.mode, "factor": self.factor, "patience": self.patience, "threshold": self.threshold,
                "threshold_mode": self.threshold_mode, "cooldown": self.cooldown, "min_lr": self.min_lr,
                "eps": self.eps, "monitor": self.monitor}

    def state_dict(self):
        return {**super().state_dict(), "best": self.best, "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        best = state["best"]
        if not isinstance(best, numbers.Real) or isinstance(best, bool) or math.isnan(best):
            raise ValueError(f"Expected best as a number, received: best={best!r}")
        self.best = float(best)
        self.num_bad_epochs = _check_count("num_bad_epochs", state["num_bad_epochs"], 0)
        self.cooldown_counter = _check_count("cooldown_counter", state["cooldown_counter"], 0)


# ------------------------------------------------------------------------------------------------
# Rebuilding (save/load) and the command line's spelling
# ------------------------------------------------------------------------------------------------
def from_record(record, optimizer):
    """Rebuild a schedule from :meth:`LRSchedule.to_record` onto ``optimizer`` (attached to it).

    Raises
    ------
    ValueError
        Unknown class, bad config or state.
    """
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) or not isinstance(
        record.get("state"), dict
    ):
        raise ValueError(f"Expected a schedule record {{'class', 'config', 'state'}}, received: {record!r:.200}")
    schedule = _build(record, optimizer)
    schedule.load_state_dict(record["state"])
    return schedule


def _build(entry, optimizer):
    cls = SCHEDULES.get(entry.get("class"))
    if cls is None:
        raise ValueError(f"Expected a schedule class, one of {sorted(SCHEDULES)}, received: {entry.get('class')!r}")
    config = dict(entry["config"])
    if cls is SequentialLR:
        config["schedules"] = [_build(part, optimizer) for part in config.get("schedules", [])]
    return cls(optimizer, **config)


# Wire format inside the optimizer's state dict (a flat dict of arrays, saved as .npz): the
# record as UTF-8 JSON in a uint8 array, so no pickle and no float rounding.
STATE_KEY = "lr_schedule"


def encode_record(schedule):
    """The schedule's record as a uint8 array (UTF-8 JSON) for the optimizer's state dict."""
    return np.frombuffer(json.dumps(schedule.to_record()).encode("utf-8"), dtype=np.uint8).copy()


def decode_record(array):
    """Inverse of :func:`encode_record`."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError(f"Expected {STATE_KEY!r} as a 1-D uint8 array, received: {array.dtype} {array.shape}")
    try:
        return json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"Expected {STATE_KEY!r} to hold a JSON schedule record: {exc}") from None


_SPEC_NAMES = {
    "step": StepLR,
    "multistep": MultiStepLR,
    "exponential": ExponentialLR,
    "cosine": CosineAnnealingLR,
    "linear": LinearLR,
    "warmup": LinearLR,
    "onecycle": OneCycleLR,
    "plateau": ReduceLROnPlateau,
}


def from_spec(spec, optimizer, epochs):
    """Build a schedule from the command line's spelling ``NAME[:key=value,...]``.

    Names: ``step``, ``multistep``, ``exponential``, ``cosine``, ``linear`` (or ``warmup``),
    ``onecycle``, ``plateau``; keys are the PyTorch argument names, and lists use ``/``
    (``multistep:milestones=10/20,gamma=0.5``). ``cosine`` defaults to ``T_max=epochs``,
    ``onecycle`` to ``max_lr`` = the optimizer's lr and ``total_steps=epochs``, and ``warmup``
    to ``start_factor=0.1``. Every schedule steps per epoch.

    Raises
    ------
    ValueError
        Unknown name or key, or a value that does not parse.
    """
    name, _, rest = spec.partition(":")
    cls = _SPEC_NAMES.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"Expected a schedule name, one of {sorted(_SPEC_NAMES)}, received: {name!r}")
    kwargs = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Expected key=value in the schedule {spec!r}, received: {item!r}")
        kwargs[key.strip()] = _parse_value(value.strip())
    if cls is CosineAnnealingLR:
        kwargs.setdefault("T_max", epochs)
    elif cls is OneCycleLR:
        kwargs.setdefault("max_lr", optimizer.lr)
        kwargs.setdefault("total_steps", max(epochs, 2))
    elif name.strip().lower() == "warmup":
        kwargs.setdefault("start_factor", 0.1)
    try:
        return cls(optimizer, **kwargs)
    except TypeError as exc:
        raise ValueError(f"Bad arguments for {cls.__name__} in {spec!r}: {exc}") from None


def _parse_value(text):
    if "/" in text:
        return [_parse_value(part) for part in text.split("/") if part]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text
