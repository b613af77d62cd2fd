"""Optimizers: the update rules and the per-parameter state they carry between steps.

This module owns SGD (momentum, Nesterov, weight decay, dampening), Adam and AdamW, with
PyTorch's update equations, and the flat ``state_dict`` save/load writes.

Contract (docs/INTERNALS.md)::

    opt.step([(key, param, grad), ...])   # updates each param in place; grad None -> skipped
    opt.state_dict() -> {"step": ..., "exp_avg/3.weight": ..., ...}
    opt.load_state_dict(d)

State is keyed by the parameter keys (``"3.weight"``), so it survives rebuilding the network.
A step runs every batch over every parameter: for float32 / float64 C-contiguous arrays (what
layers hold) each parameter's update is one compiled, threaded pass over parameter, gradient and
state (``cnnx.functional.sgd_step`` / ``adam_step``); other arrays take NumPy ufuncs writing with
``out=`` into the state and into scratch buffers allocated once per parameter. Either way a
steady-state step allocates nothing.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np

from . import functional as F
from .validation import from_identifier

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "OPTIMIZERS", "get"]

# Every Optimizer subclass by class name: what ``get`` and save/load use to rebuild an optimizer.
OPTIMIZERS: dict[str, type] = {}


def _check_real(name, value, low=None, high=None, low_open=False, high_open=False):
    """Return ``value`` as a float after checking it is a finite real number in the given range."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"Expected {name} as a finite number, received: {name}={value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        bounds = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"Expected {name} in {bounds}, received: {name}={value!r}")
    return value


class Optimizer:
    """Base class: ``step(params)``, ``state_dict()``, ``load_state_dict(d)``, ``get_config()``.

    Subclasses implement ``_update(key, param, grad, state)`` and list the names of their
    per-parameter arrays in ``_state_names``; they register themselves in :data:`OPTIMIZERS`.

    Attributes
    ----------
    lr : float
        Learning rate; may be changed between steps (schedules do).
    iterations : int
        Number of ``step`` calls so far (``"step"`` in the state dict).
    state : dict[str, dict]
        Per-parameter state by key: arrays named as in ``_state_names`` (plus an int ``"step"``
        for optimizers that count steps per parameter).
    schedule : cnnx.schedules.LRSchedule or None
        The learning-rate schedule built on this optimizer (it attaches itself); ``fit`` steps
        it, and the state dict carries it.
    """

    _state_names: tuple[str, ...] = ()
    schedule = None
    _counts_param_steps = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        OPTIMIZERS[cls.__name__] = cls

    def __init__(self, lr):
        self.lr = lr
        self.iterations = 0
        self.state: dict[str, dict] = {}
        self._scratch: dict[str, list[np.ndarray]] = {}

    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        # 0 is allowed, as in PyTorch: a schedule may anneal to it (cosine with eta_min=0), and a
        # network saved there must load again.
        self._lr = _check_real("lr", value, low=0.0)

    # --- the contract -------------------------------------------------------------------
    def step(self, params):
        """Apply one update to every parameter that has a gradient.

        Parameters
        ----------
        params : iterable of (key, param, grad)
            ``key`` a stable string (``"3.weight"``), ``param`` an ndarray updated in place,
            ``grad`` an ndarray of param's shape, or None to skip the parameter this step.
        """
        # check everything before touching anything, so a bad entry cannot leave half a step applied
        todo = []
        for item in params:
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise TypeError(f"Expected params as (key, param, grad) triples, received: {str(item)[:80]}")
            key, param, grad = item
            if grad is None:
                continue
            if not isinstance(param, np.ndarray) or not isinstance(grad, np.ndarray):
                raise TypeError(
                    f"Expected param and grad of {key!r} as numpy arrays, received: "
                    f"{type(param).__name__} and {type(grad).__name__}"
                )
            if grad.shape != param.shape:
                raise ValueError(
                    f"Expected the grad of {key!r} to have the param's shape {param.shape}, "
                    f"received: shape={grad.shape}"
                )
            state = self.state.get(key)
            if state is not None:
                self._conform_state(key, param, state)
            todo.append((key, param, grad))
        self.iterations += 1
        for key, param, grad in todo:
            state = self.state.get(key)
            if state is None:
                state = self.state[key] = {}
            self._update(key, param, grad, state)

    def _update(self, key, param, grad, state):
        raise NotImplementedError

    def get_config(self):
        """JSON-serialisable constructor arguments: ``type(opt)(**opt.get_config())`` rebuilds it."""
        return {"lr": self.lr}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    # --- state --------------------------------------------------------------------------
    def state_dict(self):
        """Flat copy of the optimizer's state, ready for ``np.savez``.

        Returns
        -------
        dict[str, ndarray]
            ``"step"`` (int64 scalar: number of steps taken) and ``"<name>/<key>"`` for each
            per-parameter array (``"momentum_buffer/3.weight"``, ``"exp_avg/3.weight"``,
            ``"exp_avg_sq/3.weight"``) and, for Adam, ``"step/<key>"`` (steps that parameter has
            been updated: a parameter skipped with grad None does not advance its bias correction),
            and ``"lr_schedule"`` when a schedule is attached (its class, config and state as
            UTF-8 JSON in a uint8 array, see :mod:`cnnx.schedules`).
        """
        out = {"step": np.array(self.iterations, dtype=np.int64)}
        for key, state in self.state.items():
            for name, value in state.items():
                if isinstance(value, np.ndarray):
                    out[f"{name}/{key}"] = value.copy()
                else:
                    out[f"{name}/{key}"] = np.array(value, dtype=np.int64)
        if self.schedule is not None:
            from . import schedules

            out[schedules.STATE_KEY] = schedules.encode_record(self.schedule)
        return out

    def load_state_dict(self, state_dict, params=None):
        """Replace the optimizer's state with one from :meth:`state_dict`.

        Parameters
        ----------
        state_dict : mapping of str to ndarray
        params : iterable of (key, param, grad) or (key, param), or dict key -> param, optional
            When given, every state entry must name one of these parameters and match its shape
            (arrays are cast to the parameter's dtype). Without it the shapes are checked at the
            next ``step``.

        Raises
        ------
        ValueError
            Unknown or malformed keys, a missing ``"step"``, inconsistent shapes.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Expected a state dict (mapping), received: {type(state_dict).__name__}")
        if "step" not in state_dict:
            raise ValueError(
                f"Expected a 'step' entry in the {type(self).__name__} state dict, "
                f"received keys: {sorted(state_dict)}"
            )
        iterations = self._as_count("step", state_dict["step"])
        schedule_record = None
        if "lr_schedule" in state_dict:
            from . import schedules

            schedule_record = schedules.decode_record(state_dict["lr_schedule"])
        known = set(self._state_names) | ({"step"} if self._counts_param_steps else set())
        new_state: dict[str, dict] = {}
        for full, value in state_dict.items():
            if full in ("step", "lr_schedule"):
                continue
            name, sep, key = str(full).partition("/")
            if not sep or not key or name not in known:
                expected = ", ".join(f"'{n}/<key>'" for n in sorted(known)) or "no per-parameter entries"
                raise ValueError(
                    f"Expected {type(self).__name__} state keys 'step', {expected}, received: {full!r}"
                )
            if name == "step":
                new_state.setdefault(key, {})[name] = self._as_count(full, value)
                continue
            arr = np.array(value, copy=True)
            if arr.dtype.kind != "f":
                raise ValueError(f"Expected a floating-point array for {full!r}, received: dtype={arr.dtype}")
            new_state.setdefault(key, {})[name] = arr
        for key, state in new_state.items():
            shapes = {name: a.shape for name, a in state.items() if isinstance(a, np.ndarray)}
            if len(set(shapes.values())) > 1:
                raise ValueError(f"Expected the state arrays of {key!r} to share one shape, received: {shapes}")
            self._complete_loaded_state(key, state, iterations)
        if params is not None:
            if isinstance(params, Mapping):
                by_key = dict(params)
            else:
                by_key = {item[0]: item[1] for item in params}
            for key, state in new_state.items():
                if key not in by_key:
                    raise ValueError(
                        f"Expected state only for known parameters {sorted(by_key)}, received state for {key!r}"
                    )
                self._conform_state(key, by_key[key], state)
        if schedule_record is not None:
            # Built last, once everything else is valid: it attaches itself and sets lr / momentum.
            from . import schedules

            previous = (self.schedule, self._lr, getattr(self, "momentum", None), getattr(self, "betas", None))
            try:
                schedules.from_record(schedule_record, self)
            except (TypeError, ValueError, KeyError) as exc:
                self.schedule, self._lr = previous[0], previous[1]
                if previous[2] is not None:
                    self.momentum = previous[2]
                if previous[3] is not None:
                    self.betas = previous[3]
                raise ValueError(f"Expected a valid 'lr_schedule' entry: {type(exc).__name__}: {exc}") from None
        else:
            self.schedule = None
        self.iterations = iterations
        self.state = new_state
        self._scratch = {}

    def _complete_loaded_state(self, key, state, iterations):
        """Hook for subclasses to check a loaded entry is complete (all arrays present)."""

    @staticmethod
    def _as_count(name, value):
        arr = np.asarray(value)
        if arr.shape != () or arr.dtype.kind not in "iu" or int(arr) < 0:
            raise ValueError(f"Expected {name!r} as a non-negative integer scalar, received: {value!r}")
        return int(arr)

    @staticmethod
    def _conform_state(key, param, state):
        # loaded state is checked here once, and cast to the param's dtype once, not every step
        for name, value in state.items():
            if not isinstance(value, np.ndarray):
                continue
            if value.shape != param.shape:
                raise ValueError(
                    f"Expected optimizer state {name!r} of {key!r} to have the param's shape {param.shape}, "
                    f"received: shape={value.shape}"
                )
            if value.dtype != param.dtype or not value.flags.writeable:
                state[name] = value.astype(param.dtype)

    @staticmethod
    def _compiled(param, grad, *state):
        """Whether the compiled update applies: float32/float64 C-contiguous arrays of one dtype
        (``grad`` may be strided: it is read through a contiguous copy)."""
        arrays = (param, *state)
        return (F.compiled_dtype(param, grad, *state) and param.flags.writeable
                and all(a.flags.c_contiguous for a in arrays))

    def _buffers(self, key, param, count):
        """``count`` scratch arrays shaped like ``param``, allocated once and reused every step."""
        bufs = self._scratch.get(key)
        if bufs is None or len(bufs) < count or bufs[0].shape != param.shape or bufs[0].dtype != param.dtype:
            bufs = [np.empty_like(param) for _ in range(count)]
            self._scratch[key] = bufs
        return bufs


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, as ``torch.optim.SGD``.

    Per parameter ``p`` with gradient ``grad``::

        g = grad + weight_decay * p
        buf = g                                      (first step)
        buf = momentum * buf + (1 - dampening) * g   (later steps)
        g = g + momentum * buf  if nesterov  else  buf
        p -= lr * g

    Parameters
    ----------
    lr : float >= 0
    momentum : float >= 0, default 0
    nesterov : bool, default False
        Needs ``momentum > 0`` and ``dampening == 0``.
    weight_decay : float >= 0, default 0
        L2 penalty added to the gradient.
    dampening : float in [0, 1], default 0
    """

    _state_names = ("momentum_buffer",)

    def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        super().__init__(lr)
        self.momentum = _check_real("momentum", momentum, low=0.0)
        self.dampening = _check_real("dampening", dampening, low=0.0, high=1.0)
        self.weight_decay = _check_real("weight_decay", weight_decay, low=0.0)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"Expected nesterov as a bool, received: nesterov={nesterov!r}")
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "Expected momentum > 0 and dampening == 0 for nesterov=True, "
                f"received: momentum={momentum!r}, dampening={dampening!r}"
            )
        self.nesterov = bool(nesterov)

    def get_config(self):
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "dampening": self.dampening,
        }

    def _update(self, key, p, grad, state):
        lr, mu, wd = self.lr, self.momentum, self.weight_decay
        buf = state.get("momentum_buffer")
        if self._compiled(p, grad, *(() if buf is None else (buf,))):
            first = bool(mu) and buf is None
            if first:
                buf = state["momentum_buffer"] = np.empty_like(p)
            F.sgd_step(p, np.ascontiguousarray(grad), buf if mu else p, lr, mu, self.dampening, wd,
                       self.nesterov, first)
            return
        # scratch: s holds g (when weight decay makes a new g) and the final lr * g;
        # t holds momentum * buf for Nesterov while s still holds g
        nbuf = 2 if (self.nesterov and wd) else 1
        s = self._buffers(key, p, nbuf)[0]
        g = grad
        if wd:
            np.multiply(p, wd, out=s)
            np.add(grad, s, out=s)
            g = s
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                # torch starts the buffer at g itself, undamped
                buf = state["momentum_buffer"] = np.array(g, dtype=p.dtype, copy=True)
            else:
                np.multiply(buf, mu, out=buf)
                if self.dampening:
                    np.multiply(g, 1.0 - self.dampening, out=s)
                    np.add(buf, s, out=buf)
                else:
                    np.add(buf, g, out=buf)
            if self.nesterov:
                t = self._scratch[key][1] if g is s else s
                np.multiply(buf, mu, out=t)
                np.add(g, t, out=s)
                g = s
            else:
                g = buf
        np.multiply(g, lr, out=s)
        np.subtract(p, s, out=p)


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 weight decay added to the gradient).

    Per parameter, at its step ``t``::

        g = grad + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        denom = sqrt(v) / sqrt(1 - beta2 ** t) + eps
        p -= (lr / (1 - beta1 ** t)) * m / denom

    Parameters
    ----------
    lr : float >= 0, default 1e-3
    betas : pair of floats in [0, 1), default (0.9, 0.999)
    eps : float >= 0, default 1e-8
    weight_decay : float >= 0, default 0
    """

    _state_names = ("exp_avg", "exp_avg_sq")
    _counts_param_steps = True
    _decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Expected betas as a pair of floats in [0, 1), received: betas={betas!r}")
        self.betas = (
            _check_real("betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
            _check_real("betas[1]", betas[1], low=0.0, high=1.0, high_open=True),
        )
        self.eps = _check_real("eps", eps, low=0.0)
        self.weight_decay = _check_real("weight_decay", weight_decay, low=0.0)

    def get_config(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def _complete_loaded_state(self, key, state, iterations):
        missing = [n for n in self._state_names if n not in state]
        if missing:
            raise ValueError(
                f"Expected {', '.join(f'{n}/{key}' for n in self._state_names)} in the state dict, "
                f"received none for: {', '.join(f'{n}/{key}' for n in missing)}"
            )
        # a state dict without per-parameter counts: every parameter was updated every step
        state.setdefault("step", iterations)

    def _update(self, key, p, grad, state):
        lr, wd, eps = self.lr, self.weight_decay, self.eps
        beta1, beta2 = self.betas
        t = state.get("step", 0) + 1
        state["step"] = t
        m = state.get("exp_avg")
        if m is None:
            m = state["exp_avg"] = np.zeros_like(p)
            state["exp_avg_sq"] = np.zeros_like(p)
        v = state["exp_avg_sq"]
        if self._compiled(p, grad, m, v):
            F.adam_step(p, np.ascontiguousarray(grad), m, v, t, lr, beta1, beta2, eps, wd, self._decoupled)
            return
        coupled = wd and not self._decoupled
        bufs = self._buffers(key, p, 2 if coupled else 1)
        s = bufs[0]
        g = grad
        if wd:
            if self._decoupled:
                np.multiply(p, 1.0 - lr * wd, out=p)
            else:
                g = bufs[1]
                np.multiply(p, wd, out=g)
                np.add(grad, g, out=g)
        # m += (1 - beta1) (g - m): torch's lerp_, the same as beta1 m + (1 - beta1) g
        np.subtract(g, m, out=s)
        np.multiply(s, 1.0 - beta1, out=s)
        np.add(m, s, out=m)
        np.multiply(v, beta2, out=v)
        np.multiply(g, g, out=s)
        np.multiply(s, 1.0 - beta2, out=s)
        np.add(v, s, out=v)
        bias_correction1 = 1.0 - beta1**t
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
        step_size = lr / bias_correction1
        np.sqrt(v, out=s)
        np.divide(s, bias_correction2_sqrt, out=s)
        np.add(s, eps, out=s)
        np.divide(m, s, out=s)
        np.multiply(s, step_size, out=s)
        np.subtract(p, s, out=p)


class AdamW(Adam):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    Before the Adam step (which then sees the plain gradient): ``p *= 1 - lr * weight_decay``.

    Parameters
    ----------
    lr : float >= 0, default 1e-3
    betas : pair of floats in [0, 1), default (0.9, 0.999)
    eps : float >= 0, default 1e-8
    weight_decay : float >= 0, default 1e-2 (torch's default)
    """

    _decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def get(identifier, **kwargs):
    """Return an optimizer from an instance, a class, a name or a config dict.

    Parameters
    ----------
    identifier : Optimizer, Optimizer subclass, str or dict
        A name matches a class name ignoring case, underscores and hyphens (``"sgd"``, ``"adam"``,
        ``"adamw"``). A dict is ``{"class": name, "config": {...}}`` as save/load writes it.
    **kwargs
        Constructor arguments, when ``identifier`` is a name or class (SGD needs ``lr``).

    Returns
    -------
    Optimizer
    """
    return from_identifier(identifier, Optimizer, OPTIMIZERS, ("an Optimizer", "an optimizer"), kwargs)
