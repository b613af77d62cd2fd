"""The benchmark workloads (see benchmarks/README.md), built in cnnx, PyTorch and Keras (TensorFlow backend).

This module owns the peer model definitions. Each peer mirrors the cnnx zoo model exactly: the
same layers in the same order, the same parameter count (checked against the seed report's
numbers), the same optimizer with the same hyperparameters, softmax cross-entropy on logits.
Each framework gets its native layout: NCHW for cnnx and PyTorch, NHWC (channels_last) for
Keras, whose CPU convolutions need it.

``python benchmarks/workloads.py`` checks every peer that is installed: parameter counts, and
the same logits as cnnx (eval mode) once cnnx's weights are copied into the peer model.
"""
from __future__ import annotations

import os
import sys

import numpy as np

# name -> input shape (c, h, w), batch size, parameters (the seed report's numbers)
WORKLOADS = {
    "seed-mnist": {"input": (1, 28, 28), "batch": 256, "params": 806_394},
    "lenet5": {"input": (1, 28, 28), "batch": 128, "params": 61_706},
    "seed-cifar": {"input": (3, 32, 32), "batch": 64, "params": 544_122},
    "mind-cifar": {"input": (3, 32, 32), "batch": 128, "params": 179_402},
}

#: Forward MFLOP per image as the workload table states them (run.py checks its own count against these).
STATED_MFLOP = {"seed-mnist": 2.51, "seed-cifar": 6.05, "lenet5": 0.83, "mind-cifar": 85.7}

NUM_CLASSES = 10
SLOPE = 0.01  # LeakyReLU slope of the seed networks

# Architecture, framework-neutral, mirroring cnnx/models.py. Ops:
#   ("conv", out, k, padding, act)  padding "same", "valid" or an int; act None/"relu"/"lrelu"
#   ("pool",)  2x2 max-pool stride 2;  ("drop", p);  ("flat",);  ("dense", out, act)
SPECS = {
    "seed-mnist": [
        ("conv", 16, 2, "same", "lrelu"), ("pool",),
        ("conv", 32, 2, "same", "lrelu"),
        ("flat",), ("dense", 128, "lrelu"), ("dense", 10, None),
    ],
    "seed-cifar": [
        ("conv", 32, 2, "same", "lrelu"), ("pool",),
        ("conv", 64, 2, "same", "lrelu"), ("pool",),
        ("flat",), ("dense", 128, "lrelu"), ("dense", 64, "lrelu"), ("dense", 32, "lrelu"),
        ("dense", 16, "lrelu"), ("dense", 10, None),
    ],
    "lenet5": [
        ("conv", 6, 5, 2, "relu"), ("pool",),
        ("conv", 16, 5, "valid", "relu"), ("pool",),
        ("flat",), ("dense", 120, "relu"), ("dense", 84, "relu"), ("dense", 10, None),
    ],
    "mind-cifar": [
        ("conv", 32, 3, "same", "relu"),
        ("conv", 64, 3, "same", "relu"), ("pool",), ("drop", 0.25),
        ("conv", 128, 3, "same", "relu"), ("pool",),
        ("conv", 128, 2, "same", "relu"), ("pool",), ("drop", 0.25),
        ("flat",), ("dense", 10, None),
    ],
}

# (class name, arguments) as cnnx.models.default_optimizer gives them; Adam betas (0.9, 0.999),
# eps 1e-8 (PyTorch's default; Keras's default is 1e-7, so it is set explicitly).
OPTIMIZERS = {
    "seed-mnist": ("Adam", {"lr": 1e-4}),
    "seed-cifar": ("Adam", {"lr": 5e-5}),
    "lenet5": ("SGD", {"lr": 0.05, "momentum": 0.9}),
    "mind-cifar": ("Adam", {"lr": 1e-3}),
}


def canonical(name):
    key = name.strip().lower().replace("_", "-")
    if key not in WORKLOADS:
        raise ValueError(f"Expected a workload, one of {sorted(WORKLOADS)}, received: {name!r}")
    return key


# ---------------------------------------------------------------------- cnnx -----------------
def user_step(net, x, y, batch, mode):
    """A call of what a user runs on ``x`` (and labels ``y``) in batches of ``batch``: one epoch of
    ``fit`` in order (``mode`` "train") or ``predict`` (any other mode)."""
    if mode == "train":
        return lambda: net.fit(x, y, epochs=1, batch_size=batch, shuffle=False, verbose=0)
    return lambda: net.predict(x, batch_size=batch)


def cnnx_model(name, seed=0, fused=True):
    """The zoo network, compiled with its workload's optimizer and softmax cross-entropy.

    ``fused=False`` writes each activation as its own layer, as users do; ``True`` passes it
    to the Conv2D/Dense layer (``activation=``), the zoo's form.
    """
    import cnnx
    from cnnx.models import build, default_optimizer

    net = build(name, seed=seed, fused=fused)
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), default_optimizer(name))
    return net


def spec_input_shapes(name):
    """``(op, (c, h, w))`` for each op of ``SPECS[name]``: the op and the shape of one image
    entering it (convolutions with integer or "valid" padding, 2x2 pools)."""
    c, h, w = WORKLOADS[name]["input"]
    for op in SPECS[name]:
        yield op, (c, h, w)
        if op[0] == "conv":
            _, out, k, pad, _ = op
            if pad == "valid":
                h, w = h - k + 1, w - k + 1
            elif not isinstance(pad, str):
                h, w = h + 2 * pad - k + 1, w + 2 * pad - k + 1
            c = out
        elif op[0] == "pool":
            h, w = h // 2, w // 2


def cnnx_forward_flops(name):
    """Forward FLOPs per image, counted from the cnnx network's layer shapes."""
    from cnnx.models import build
    from cnnx.profiler import forward_flops

    return forward_flops(build(name, seed=0))


# ---------------------------------------------------------------------- PyTorch --------------
def torch_model(name):
    """``torch.nn.Sequential`` mirroring the zoo model (NCHW)."""
    import torch.nn as nn

    c, h, w = WORKLOADS[name]["input"]
    mods = []
    features = None
    for op in SPECS[name]:
        kind = op[0]
        if kind == "conv":
            _, out, k, pad, act = op
            # padding="same" with an even kernel puts the extra row/column at the bottom/right, as cnnx.
            mods.append(nn.Conv2d(c, out, k, padding=pad))
            if pad == "valid":
                h, w = h - k + 1, w - k + 1
            elif pad != "same":
                h, w = h + 2 * pad - k + 1, w + 2 * pad - k + 1
            c = out
            mods += _torch_act(act)
        elif kind == "pool":
            mods.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        elif kind == "drop":
            mods.append(nn.Dropout(op[1]))
        elif kind == "flat":
            mods.append(nn.Flatten())
            features = c * h * w
        elif kind == "dense":
            _, out, act = op
            mods.append(nn.Linear(features, out))
            features = out
            mods += _torch_act(act)
    return nn.Sequential(*mods)


def _torch_act(act):
    import torch.nn as nn

    if act == "relu":
        return [nn.ReLU()]
    if act == "lrelu":
        return [nn.LeakyReLU(SLOPE)]
    return []


def torch_optimizer(name, model):
    import torch

    cls, kw = OPTIMIZERS[name]
    if cls == "Adam":
        return torch.optim.Adam(model.parameters(), lr=kw["lr"], betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.SGD(model.parameters(), lr=kw["lr"], momentum=kw["momentum"])


# ---------------------------------------------------------------------- Keras ----------------
def keras_model(name):
    """``keras.Sequential`` mirroring the zoo model, channels_last (NHWC) input."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    from keras import layers as kl

    c, h, w = WORKLOADS[name]["input"]
    mods = [keras.Input(shape=(h, w, c))]
    for op in SPECS[name]:
        kind = op[0]
        if kind == "conv":
            _, out, k, pad, act = op
            if not isinstance(pad, str):  # lenet5's explicit padding 2, then a valid convolution
                mods.append(kl.ZeroPadding2D(pad))
                pad = "valid"
            # Keras "same" with an even kernel also puts the extra row/column at the bottom/right.
            mods.append(kl.Conv2D(out, k, padding=pad, activation="relu" if act == "relu" else None))
            if act == "lrelu":
                mods.append(kl.LeakyReLU(negative_slope=SLOPE))
        elif kind == "pool":
            mods.append(kl.MaxPooling2D(2))
        elif kind == "drop":
            mods.append(kl.Dropout(op[1]))
        elif kind == "flat":
            mods.append(kl.Flatten())
        elif kind == "dense":
            _, out, act = op
            mods.append(kl.Dense(out, activation="relu" if act == "relu" else None))
            if act == "lrelu":
                mods.append(kl.LeakyReLU(negative_slope=SLOPE))
    return keras.Sequential(mods)


def keras_compile(name, model):
    import keras

    cls, kw = OPTIMIZERS[name]
    if cls == "Adam":
        opt = keras.optimizers.Adam(learning_rate=kw["lr"], beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    else:
        opt = keras.optimizers.SGD(learning_rate=kw["lr"], momentum=kw["momentum"])
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


# ---------------------------------------------------------------------- checks ---------------
def _copy_to_torch(net, model):
    import torch

    params = [p for _, p, _ in net.parameters()]
    with torch.no_grad():
        for target, source in zip(model.parameters(), params):
            assert tuple(target.shape) == source.shape, (tuple(target.shape), source.shape)
            target.copy_(torch.from_numpy(source))


def _copy_to_keras(net, model):
    """cnnx (PyTorch-shaped, NCHW-flattened) weights into the NHWC Keras model."""
    from cnnx.layers import Conv2D, Dense, Flatten

    flat_chw = None
    shape = net.input_shape
    pending = []
    for layer, out_shape in zip(net.layers, net.shapes):
        if isinstance(layer, Flatten):
            flat_chw = shape
        if isinstance(layer, Conv2D):
            pending.append(layer.params["weight"].transpose(2, 3, 1, 0))  # (kh, kw, in, out)
            pending.append(layer.params["bias"])
        elif isinstance(layer, Dense):
            wt = layer.params["weight"]  # (out, in)
            if flat_chw is not None:
                c, h, w = flat_chw  # the first Dense after Flatten: reorder its inputs CHW -> HWC
                wt = wt.reshape(len(wt), c, h, w).transpose(0, 2, 3, 1).reshape(len(wt), -1)
                flat_chw = None
            pending.append(wt.T)
            pending.append(layer.params["bias"])
        shape = out_shape
    model.set_weights([np.ascontiguousarray(a) for a in pending])


def check(names=None, frameworks=("torch", "keras")):
    """Print parameter counts and the largest logit difference to cnnx for every installed peer."""
    ok = True
    rng = np.random.default_rng(0)
    for name in names or WORKLOADS:
        net = cnnx_model(name)
        flops = cnnx_forward_flops(name) / 1e6
        x = rng.standard_normal((4,) + WORKLOADS[name]["input"]).astype(np.float32)
        ref = net.forward(x, training=False).copy()
        expected = WORKLOADS[name]["params"]
        line = [f"{name:11s} expected {expected:>9,}  cnnx {net.num_params:>9,}  {flops:.2f} MFLOP/img"]
        ok &= net.num_params == expected and abs(flops - STATED_MFLOP[name]) < 0.01
        if "torch" in frameworks and _importable("torch"):
            import torch

            model = torch_model(name).eval()
            count = sum(p.numel() for p in model.parameters())
            _copy_to_torch(net, model)
            with torch.no_grad():
                diff = float(np.abs(model(torch.from_numpy(x)).numpy() - ref).max())
            line.append(f"torch {count:>9,} max|dlogit| {diff:.1e}")
            ok &= count == expected and diff < 1e-3
        if "keras" in frameworks and _importable("keras") and _importable("tensorflow"):
            model = keras_model(name)
            count = int(model.count_params())
            _copy_to_keras(net, model)
            out = np.asarray(model(x.transpose(0, 2, 3, 1), training=False))
            diff = float(np.abs(out - ref).max())
            line.append(f"keras {count:>9,} max|dlogit| {diff:.1e}")
            ok &= count == expected and diff < 1e-3
        print("  ".join(line))
    print("OK" if ok else "MISMATCH")
    return ok


def _importable(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(0 if check(sys.argv[1:] or None) else 1)
