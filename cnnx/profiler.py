"""Where a training step's time goes: per plan step forward / backward, loss, optimizer, the rest.

This module owns measurement only. ``profile`` runs whole training steps through the very calls
``Network.fit`` makes (``net.forward_checked``, the loss, ``net.backward``, the optimizer's update),
asking the network's execution plan (``cnnx.plan``) to add each step's time to a counter. A row
is a plan step: one layer, or several the plan fused into one pass (the row says which layers it
covers, e.g. ``0-2  Conv2D + LeakyReLU + MaxPool2D``). The weights, gradients and buffers are
restored afterwards, so the network is left as it was; the plan's caches (and the library
random generator, which Dropout draws from) do change. The optimizer and loss are deep-copied,
so their state is untouched too.

FLOPs are counted as benchmarks/README.md counts them: 2 x multiply-adds of convolutions and dense
layers only (elementwise passes and pooling count zero); a training step is about 3x the forward.
"""
from __future__ import annotations

import copy
import time
from typing import NamedTuple

import numpy as np

from .geometry import int_pair
from .parallel import with_single_threaded_blas
from .validation import check_int

__all__ = ["Profile", "profile", "layer_flops", "forward_flops"]


# ---------------------------------------------------------------------- FLOP counts ----------
def layer_flops(layer, input_shape, output_shape):
    """Forward FLOPs per sample (2 x multiply-adds) of one layer; 0 for layers without a GEMM.

    Parameters
    ----------
    layer : Layer
    input_shape, output_shape : tuple of int
        Per-sample shapes (no batch axis), as ``Network.shapes`` holds them.

    Returns
    -------
    int
    """
    from .layers import Conv1D, Conv2D, ConvTranspose2D, Dense, Residual

    if isinstance(layer, Conv2D):
        kh, kw = layer.kernel_size
        c_out, out_h, out_w = output_shape
        return 2 * c_out * out_h * out_w * layer.in_channels * kh * kw
    if isinstance(layer, Dense):
        rows = int(np.prod(input_shape[:-1])) if len(input_shape) > 1 else 1
        return 2 * rows * layer.in_features * layer.out_features
    if isinstance(layer, Conv1D):
        k = layer.kernel_size[0] if isinstance(layer.kernel_size, tuple) else layer.kernel_size
        c_out, length = output_shape
        return 2 * c_out * length * layer.in_channels * k
    if isinstance(layer, ConvTranspose2D):
        # Every input pixel scatters a (out_channels, kh, kw) patch.
        kh, kw = int_pair(layer.kernel_size, "kernel_size")
        c_in, h, w = input_shape
        return 2 * c_in * h * w * layer.out_channels * kh * kw
    if isinstance(layer, Residual):
        total = 0
        for _, child, child_in, child_out in _residual_children(layer, input_shape):
            total += layer_flops(child, child_in, child_out)
        return total
    return 0


def forward_flops(net):
    """Forward FLOPs per sample of a ``Network`` (sum of :func:`layer_flops`)."""
    return sum(layer_flops(layer, shape_in, shape_out) for layer, shape_in, shape_out in _layer_shapes(net))


def _layer_shapes(net):
    """``(layer, input_shape, output_shape)`` per top-level layer."""
    inputs = [tuple(net.input_shape)] + [tuple(s) for s in net.shapes[:-1]]
    return list(zip(net.layers, inputs, [tuple(s) for s in net.shapes]))


def _residual_children(block, input_shape):
    """The children of a Residual container (its ``block`` and ``shortcut`` paths) with their shapes."""
    children = []
    for attr in ("block", "shortcut"):
        shape = tuple(input_shape)
        for child in getattr(block, attr, None) or ():
            try:
                out = tuple(child.output_shape(shape))
            except Exception:  # a FLOP count must not fail on an odd container
                break
            children.append((attr, child, shape, out))
            shape = out
    return children


# ---------------------------------------------------------------------- the profile ----------
class Profile(NamedTuple):
    """What :func:`profile` returns.

    Attributes
    ----------
    rows : list of dict
        One per step of the network's plan, in order: ``index`` (of the step), ``layers`` (the
        indices of the layers it runs: one, or several fused into one pass), ``kind``
        (``"layer"``, ``"conv+act"``, ...), ``layer`` (their classes joined by " + ", with a
        layer's own fused activation), ``output_shape`` (of the step's last layer, with the batch
        axis), ``forward_ms``, ``backward_ms``, ``total_ms`` (means per step), ``percent`` (of
        the whole step), ``mflop`` (forward MFLOP per batch), ``forward_gflops`` and
        ``backward_gflops`` (achieved; backward counts 2x the forward FLOPs, 1x for the first
        step, which skips its input gradient; None where a step has no FLOPs).
    totals : dict
        Means per step in ms: ``step_ms`` (wall time of a whole step), ``forward_ms``,
        ``backward_ms`` (sums over steps), ``loss_ms`` (loss forward + backward),
        ``optimizer_ms``, ``overhead_ms`` (the rest: Python between the timed calls), their
        ``*_percent``, plus ``batch``, ``steps``, ``images_per_s``, ``gflops`` (achieved over
        the whole step, 3x forward FLOPs for training), ``cores_used`` (CPU time of all threads
        over wall time: how many cores the step kept busy) and ``training``.
    text : str
        The table, formatted for a terminal.
    """

    rows: list
    totals: dict
    text: str

    def __str__(self):
        return self.text


@with_single_threaded_blas  # as Network.fit: BLAS at one thread, cnnx's threads are the parallelism
def profile(net, x, y=None, steps=10, warmup=2, loss=None, optimizer=None, training=True):
    """Time each plan step's forward and backward over ``steps`` training steps on the batch ``(x, y)``.

    A step is what ``Network.fit`` runs per batch, through the same calls: the plan's training
    forward, the loss's forward and backward, the plan's backward and the optimizer's update.
    With ``training=False`` a step is one inference forward as ``predict`` runs it (with its
    conv + max-pool fusions): no loss, backward or update.

    Parameters
    ----------
    net : Network
    x : ndarray of shape (n, *net.input_shape)
        One batch; cast to the network dtype once, before timing.
    y : ndarray, optional
        Targets for the loss (class ids or one-hot rows); required when ``training``.
    steps : int, default 10
        Timed steps; the table reports the mean per step.
    warmup : int, default 2
        Untimed steps first (buffers are allocated and caches warmed on the first).
    loss, optimizer : optional
        Default to the network's (``compile``), else ``SoftmaxCrossEntropy()`` and no update
        (the optimizer row then reads 0). Both are deep-copied: their state is not changed.
    training : bool, default True

    Returns
    -------
    Profile
        ``rows`` (one dict per plan step), ``totals`` and ``text``; ``str(profile)`` is the table.

    Notes
    -----
    The network's weights, gradients and buffers are restored afterwards; only the plan's
    caches and the library random generator (Dropout) change. Per-step timing adds about a
    microsecond per step call, counted in the step's time.
    """
    from . import losses

    steps_count = check_int(steps, "steps", minimum=1)
    warmup = check_int(warmup, "warmup", minimum=0)
    x = net.check_inputs(x, "x", check_finite=False)
    batch = len(x)
    if training:
        if y is None:
            raise ValueError("Expected targets y for a training profile, received: y=None")
        targets, _ = net.check_targets(y, batch, "y")
        loss_fn = copy.deepcopy(loss if loss is not None else (net.loss or losses.SoftmaxCrossEntropy()))
        if isinstance(loss_fn, str):
            loss_fn = losses.get(loss_fn)
        opt = optimizer if optimizer is not None else net.optimizer
        if isinstance(opt, str):
            from . import optimizers

            opt = optimizers.get(opt)
        opt = copy.deepcopy(opt)

    plan = net.plan
    steps = plan.steps(training)
    # An inference forward runs the inference steps only where predict would (no caches kept).
    fwd = np.zeros(len(steps))
    bwd = np.zeros(len(steps))
    saved_weights = net.get_weights()
    saved_grads = [(g, g.copy()) for _, _, g in net.parameters() if isinstance(g, np.ndarray)]
    clock = time.perf_counter
    t_loss = t_opt = t_step = 0.0
    try:
        for s in range(warmup + steps_count):
            if s == warmup:  # discard what the warm-up steps accumulated
                fwd[:] = 0.0
                bwd[:] = 0.0
                t_loss = t_opt = t_step = 0.0
            if s == warmup:
                cpu0 = time.process_time()
            t0 = clock()
            if not training:
                net.forward_checked(x, False, timer=fwd)
                t_step += clock() - t0
                continue
            out = net.forward_checked(x, True, timer=fwd)
            t1 = clock()
            loss_fn.forward(out, targets)
            d = loss_fn.backward()
            t2 = clock()
            net.backward(d, timer=bwd)
            t3 = clock()
            if opt is not None:
                opt.step(net.parameters())
            t4 = clock()
            t_loss += t2 - t1
            t_opt += t4 - t3
            t_step += t4 - t0
        cpu_s = time.process_time() - cpu0
    finally:
        net.set_weights(saved_weights)
        for grad, value in saved_grads:
            np.copyto(grad, value)

    scale = 1e3 / steps_count  # seconds summed over steps -> ms per step
    fwd_ms, bwd_ms = fwd * scale, bwd * scale
    step_ms = t_step * scale
    loss_ms, opt_ms = t_loss * scale, t_opt * scale
    layer_fwd_total, layer_bwd_total = float(fwd_ms.sum()), float(bwd_ms.sum())
    overhead_ms = max(0.0, step_ms - layer_fwd_total - layer_bwd_total - loss_ms - opt_ms)

    def pct(ms):
        return 100.0 * ms / step_ms if step_ms > 0 else 0.0

    shapes = _layer_shapes(net)
    rows = []
    total_flops = 0
    for k, step in enumerate(steps):
        flops = sum(layer_flops(*shapes[i]) for i in step.indices) * batch
        total_flops += flops
        # The first step skips its input gradient: a conv / dense backward is one GEMM, not two.
        bwd_flops = flops * (2 if k > 0 else 1)
        f, b = float(fwd_ms[k]), float(bwd_ms[k])
        rows.append({
            "index": k,
            "layers": tuple(step.indices),
            "kind": step.kind,
            "layer": step.label,
            "output_shape": (batch,) + tuple(net.shapes[step.indices[-1]]),
            "forward_ms": f,
            "backward_ms": b,
            "total_ms": f + b,
            "percent": pct(f + b),
            "mflop": flops / 1e6,
            "forward_gflops": flops / (f * 1e6) if flops and f > 0 else None,
            "backward_gflops": bwd_flops / (b * 1e6) if flops and training and b > 0 else None,
        })
    step_flops = total_flops * (3 if training else 1)
    totals = {
        "training": bool(training),
        "batch": batch,
        "steps": steps_count,
        "step_ms": step_ms,
        "forward_ms": layer_fwd_total,
        "backward_ms": layer_bwd_total,
        "loss_ms": loss_ms,
        "optimizer_ms": opt_ms,
        "overhead_ms": overhead_ms,
        "images_per_s": batch * 1e3 / step_ms if step_ms > 0 else float("inf"),
        "gflops": step_flops / (step_ms * 1e6) if step_ms > 0 else 0.0,
        # CPU time of all the process's threads over wall time of the timed steps.
        "cores_used": cpu_s * 1e3 / (step_ms * steps_count) if step_ms > 0 else 0.0,
    }
    for key in ("forward_ms", "backward_ms", "loss_ms", "optimizer_ms", "overhead_ms"):
        totals[key.replace("_ms", "_percent")] = pct(totals[key])
    return Profile(rows, totals, _format(rows, totals))


# ---------------------------------------------------------------------- helpers --------------
def _gf(value):
    return "" if value is None else f"{value:.1f}"


def _format(rows, totals):
    training = totals["training"]
    if training:
        header = ["#", "layers", "layer", "output shape", "fwd ms", "bwd ms", "% step", "MFLOP", "fwd GF/s", "bwd GF/s"]
    else:
        header = ["#", "layers", "layer", "output shape", "fwd ms", "% step", "MFLOP", "fwd GF/s"]
    col = {name: j for j, name in enumerate(header)}

    def line(**cells):
        out = [""] * len(header)
        for name, value in cells.items():
            out[col[name]] = value
        return out

    table = [header]
    for r in rows:
        first, last = r["layers"][0], r["layers"][-1]
        cells = {"#": str(r["index"]), "layers": str(first) if first == last else f"{first}-{last}",
                 "layer": r["layer"], "output shape": str(r["output_shape"]),
                 "fwd ms": f"{r['forward_ms']:.3f}", "% step": f"{r['percent']:.1f}",
                 "MFLOP": f"{r['mflop']:.1f}" if r["mflop"] else "", "fwd GF/s": _gf(r["forward_gflops"])}
        if training:
            cells["bwd ms"] = f"{r['backward_ms']:.3f}"
            cells["bwd GF/s"] = _gf(r["backward_gflops"])
        table.append(line(**cells))
    extra = []
    if training:
        extra.append(line(layer="layers (sum)", **{"fwd ms": f"{totals['forward_ms']:.3f}",
                                                  "bwd ms": f"{totals['backward_ms']:.3f}",
                                                  "% step": f"{totals['forward_percent'] + totals['backward_percent']:.1f}"}))
        for label, key in (("loss (fwd+bwd)", "loss"), ("optimizer step", "optimizer")):
            extra.append(line(layer=label, **{"fwd ms": f"{totals[key + '_ms']:.3f}",
                                              "% step": f"{totals[key + '_percent']:.1f}"}))
    extra.append(line(layer="other (Python)", **{"fwd ms": f"{totals['overhead_ms']:.3f}",
                                                  "% step": f"{totals['overhead_percent']:.1f}"}))
    extra.append(line(layer="whole step", **{"fwd ms": f"{totals['step_ms']:.3f}", "% step": "100.0"}))
    widths = [max(len(r[c]) for r in table + extra) for c in range(len(header))]
    left = {col["layer"], col["output shape"]}

    def fmt(r):
        return "  ".join(c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "-" * len(fmt([h.ljust(w) for h, w in zip(header, widths)]))
    mode = "training step" if training else "inference (eval forward)"
    title = (f"{mode}: batch {totals['batch']}, mean of {totals['steps']} steps: {totals['step_ms']:.2f} ms/step, "
             f"{totals['images_per_s']:,.0f} images/s, {totals['gflops']:.2f} GFLOP/s, "
             f"{totals['cores_used']:.2f} cores used")
    lines = [title, rule, fmt(header), rule] + [fmt(r) for r in table[1:]] + [rule] + [fmt(r) for r in extra]
    return "\n".join(lines)
