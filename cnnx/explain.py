"""Explaining a network: layer activations, occlusion-sensitivity and saliency maps, input
gradients.

This module owns the explanations and computes NumPy results only: it never imports matplotlib
(:mod:`cnnx.plots` draws them). None of it trains: weights, gradients and optimizer state are left
exactly as they were, so these can be called from a callback in the middle of ``fit``. Everything
goes through the network's public calls (``forward``, ``backward``, ``check_inputs``) and
the loss's ``takes_probabilities``.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import functional as F
from .geometry import conv_output_size, positive_pair
from .validation import check_int

__all__ = [
    "activations",
    "layer_names",
    "layer_index",
    "occlusion_map",
    "input_gradient",
    "saliency_map",
]


# ================================================================================================
# NumPy results
# ================================================================================================
def layer_names(net):
    """The names ``activations`` knows the layers of ``net`` by, in order.

    A layer's ``name`` attribute when it has a non-empty string one, else ``f"{i}_{class}"`` with
    the class name in lower case (``"0_conv2d"``, ``"5_flatten"``).

    Returns
    -------
    list of str
    """
    names = []
    for i, layer in enumerate(net.layers):
        name = getattr(layer, "name", None)
        names.append(name if isinstance(name, str) and name else f"{i}_{type(layer).__name__.lower()}")
    return names


def layer_index(net, layer):
    """Index into ``net.layers`` of a layer given by index (negative allowed) or name."""
    n = len(net.layers)
    if isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
        if not -n <= layer < n:
            raise IndexError(f"Expected a layer index in [{-n}, {n}), received: layer={layer}")
        return int(layer) % n
    if isinstance(layer, str):
        names = layer_names(net)
        if layer in names:
            return names.index(layer)
        raise ValueError(f"Expected a layer name, one of {names}, received: layer={layer!r}")
    raise TypeError(f"Expected a layer as an int index or a name (str), received: {type(layer).__name__}")


def activations(net, x, layers=None):
    """Outputs of some (or all) layers of ``net`` for the batch ``x``, in eval mode.

    Parameters
    ----------
    net : Network
    x : ndarray of shape (n, *net.input_shape)
    layers : None, int, str or sequence of int / str
        Which layers, by index into ``net.layers`` (negative counts from the end) or by name (see
        :func:`layer_names`). None: all of them.

    Returns
    -------
    dict
        ``{name: ndarray of shape (n, *net.layers[i].output_shape(...))}`` in layer order, each a
        copy (a layer may reuse its output buffer on its next call).

    Examples
    --------
    >>> maps = activations(net, x_test[:4], layers=["0_conv2d", 2])
    >>> maps["0_conv2d"].shape
    (4, 6, 28, 28)
    """
    x = net.check_inputs(x, "x", check_finite=False)
    if layers is None:
        wanted = set(range(len(net.layers)))
    elif isinstance(layers, (numbers.Integral, str)) and not isinstance(layers, bool):
        wanted = {layer_index(net, layers)}
    else:
        wanted = {layer_index(net, layer) for layer in layers}
    if not wanted:
        return {}
    names = layer_names(net)
    out = {}
    last = max(wanted)
    for i, layer in enumerate(net.layers[: last + 1]):  # layers after the last wanted one: no need
        x = layer.forward(x, training=False)
        if i in wanted:
            out[names[i]] = np.array(x, copy=True)
    return out


# ---------------------------------------------------------------------- class scores ----------
def _outputs_are_probabilities(net):
    """True when the network's outputs are already probabilities (no softmax/sigmoid to apply).

    That is the case when the last layer is a Softmax or Sigmoid (layer or fused activation), or
    when the loss it was compiled with takes probabilities (e.g. ``CrossEntropy``, not
    ``SoftmaxCrossEntropy``). Otherwise the outputs are taken to be logits.
    """
    from .layers import Sigmoid, Softmax

    last = net.layers[-1]
    if isinstance(last, (Softmax, Sigmoid)) or getattr(last, "activation", None) == "sigmoid":
        return True
    return net.loss is not None and net.loss.takes_probabilities


def _n_classes(net):
    shape = tuple(net.output_shape)
    if len(shape) != 1:
        raise ValueError(
            f"Expected a network that outputs class scores of shape (k,) per sample, "
            f"received: a network with outputs of shape {shape}"
        )
    return shape[0]


def _check_target(target, n, n_classes):
    """Per-sample class ids ``(n,)`` from an int or an array of ids."""
    k = max(n_classes, 2)  # a single output scores two classes: 0 and 1
    t = np.asarray(target)
    integral = t.dtype.kind in "iu" or (t.dtype.kind == "f" and bool(np.all(t == np.round(t))))
    if not integral:
        raise TypeError(f"Expected target as an int class id or an array of ids, received: {target!r}")
    if t.ndim == 0:
        t = np.full(n, int(t), dtype=np.intp)
    elif t.shape != (n,):
        raise ValueError(f"Expected target as an int or an array of {n} class ids, received: shape {t.shape}")
    t = t.astype(np.intp)
    if t.size and (t.min() < 0 or t.max() >= k):
        raise ValueError(f"Expected target class ids in [0, {k}), received: values in [{t.min()}, {t.max()}]")
    return t


def _class_probabilities(net, out):
    """Class probabilities ``(m, k)`` (``(m, 2)`` for a single output) from raw outputs."""
    out = np.asarray(out, dtype=np.float64)
    is_prob = _outputs_are_probabilities(net)
    if out.shape[1] == 1:
        p1 = out[:, 0] if is_prob else F.ACTIVATIONS["sigmoid"].forward(out[:, 0])  # overflow-free
        return np.stack([1.0 - p1, p1], axis=1)
    return out if is_prob else F.SOFTMAX.forward(out)


def _score_gradient(net, out, target, score):
    """d(score of class ``target``)/d(outputs) for a batch of raw outputs ``out`` (m, k)."""
    m, k = out.shape
    rows = np.arange(m)
    seed = np.zeros((m, k), dtype=np.float64)
    if score == "logit":
        # The raw output of the class; for a single output, +z scores class 1 and -z class 0.
        if k == 1:
            seed[:, 0] = np.where(target == 1, 1.0, -1.0)
        else:
            seed[rows, target] = 1.0
        return seed
    # score == "probability"
    if _outputs_are_probabilities(net):
        if k == 1:
            seed[:, 0] = np.where(target == 1, 1.0, -1.0)
        else:
            seed[rows, target] = 1.0
        return seed
    if k == 1:
        p1 = _class_probabilities(net, out)[:, 1]
        seed[:, 0] = np.where(target == 1, 1.0, -1.0) * p1 * (1.0 - p1)
        return seed
    # d p_t / d z = p_t (e_t - p): the softmax Jacobian's row t.
    p = _class_probabilities(net, out)
    pt = p[rows, target][:, None]
    seed -= p * pt
    seed[rows, target] += pt[:, 0]
    return seed


# ---------------------------------------------------------------------- occlusion -------------
def occlusion_map(net, x, target, patch=4, stride=2, fill=0.0, batch_size=256):
    """Occlusion sensitivity (Zeiler & Fergus, 2014): how much covering each patch of the image
    lowers the probability of the target class.

    A square (or rectangular) patch of ``fill`` slides over every image; all occluded copies go
    through the network in a few large eval-mode batches (``batch_size`` copies each, mixing
    images when there are several), not one forward pass per position.

    Parameters
    ----------
    net : Network
        A classifier (outputs ``(k,)`` per sample; see ``_outputs_are_probabilities`` for how
        logits and probabilities are told apart: logits get a softmax).
    x : ndarray of shape (n, c, h, w)
    target : int or ndarray of shape (n,)
        Class whose probability is watched, one for all images or one per image.
    patch : int or (ph, pw), default 4
    stride : int or (sy, sx), default 2
        Patch positions are ``0, sy, 2 sy, ...`` while the patch fits inside the image; with
        ``(h - ph) % sy != 0`` the last few rows are never covered (as a "valid" convolution).
    fill : float or "mean", default 0.0
        Value written into the patch, in the network's input space: after standardisation 0.0 is
        the dataset mean. ``"mean"`` uses each image's own mean.
    batch_size : int, default 256

    Returns
    -------
    ndarray of shape (n, out_h, out_w), float64
        ``out_h = (h - ph) // sy + 1`` (likewise ``out_w``). Entry ``[i, r, s]`` is the baseline
        probability of the target class minus its probability with the patch whose top-left
        corner is ``(r * sy, s * sx)`` occluded: positive where the patch hid evidence for the
        class, negative where it hid evidence against it.
    """
    x = net.check_inputs(x, "x", check_finite=False)
    if x.ndim != 4:
        raise ValueError(f"Expected images of shape (n, c, h, w), received: {x.shape}")
    n, c, h, w = x.shape
    ph, pw = positive_pair(patch, "patch")
    sy, sx = positive_pair(stride, "stride")
    if ph > h or pw > w:
        raise ValueError(f"Expected a patch no larger than the image {(h, w)}, received: patch={(ph, pw)}")
    if isinstance(fill, str):
        if fill != "mean":
            raise ValueError(f"Expected fill as a number or 'mean', received: fill={fill!r}")
        fills = x.reshape(n, -1).mean(axis=1)
    elif isinstance(fill, numbers.Real) and np.isfinite(fill):
        fills = np.full(n, float(fill))
    else:
        raise ValueError(f"Expected fill as a finite number or 'mean', received: fill={fill!r}")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    k = _n_classes(net)
    target = _check_target(target, n, k)

    out_h = conv_output_size(h, ph, sy, 0)
    out_w = conv_output_size(w, pw, sx, 0)
    positions = out_h * out_w
    base = _class_probabilities(net, _raw(net, x, batch_size))
    base = base[np.arange(n), target]

    heat = np.empty(n * positions, dtype=np.float64)
    rows_h = np.arange(h)
    cols_w = np.arange(w)
    fills = fills.astype(x.dtype)
    # The copies are indexed by one flat counter over (image, position), so every forward pass
    # is full even when there are many images and few positions or the other way round.
    for lo in range(0, n * positions, batch_size):
        hi = min(lo + batch_size, n * positions)
        g = np.arange(lo, hi)
        img, pos = np.divmod(g, positions)
        top = (pos // out_w) * sy
        left = (pos % out_w) * sx
        inside_r = (rows_h[None, :] >= top[:, None]) & (rows_h[None, :] < top[:, None] + ph)
        inside_c = (cols_w[None, :] >= left[:, None]) & (cols_w[None, :] < left[:, None] + pw)
        mask = inside_r[:, None, :, None] & inside_c[:, None, None, :]  # (m, 1, h, w)
        batch = np.where(mask, fills[img][:, None, None, None], x[img])
        probs = _class_probabilities(net, net.forward(batch, training=False))
        heat[lo:hi] = base[img] - probs[np.arange(hi - lo), target[img]]
    return heat.reshape(n, out_h, out_w)


def _raw(net, x, batch_size):
    """Raw eval-mode outputs, copied batch by batch (the last layer may reuse its buffer)."""
    out = np.empty((len(x),) + tuple(net.output_shape), dtype=np.float64)
    for lo in range(0, len(x), batch_size):
        out[lo:lo + batch_size] = net.forward(x[lo:lo + batch_size], training=False)
    return out


# ---------------------------------------------------------------------- gradients -------------
def _sublayers(layer):
    """``layer`` and every Layer nested in it (containers such as a residual block)."""
    from .layers import Layer

    yield layer
    for value in vars(layer).values():
        if isinstance(value, Layer):
            yield from _sublayers(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, Layer):
                    yield from _sublayers(item)


class _PreservedGrads:
    """Context manager: whatever ``backward`` does to the gradients inside, restore them after.

    Each layer's ``grads`` dict gets back its original arrays (an optimizer or a training loop
    may hold references to them), and their original values are written back into them.
    """

    def __init__(self, net):
        self.saved = []
        for top in net.layers:
            for layer in _sublayers(top):
                grads = getattr(layer, "grads", None)
                if isinstance(grads, dict):
                    entries = {name: (g, None if g is None else np.array(g, copy=True))
                               for name, g in grads.items()}
                    self.saved.append((layer, grads, entries))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for layer, grads, entries in self.saved:
            grads.clear()
            for name, (array, values) in entries.items():
                if array is not None:
                    array[...] = values
                grads[name] = array
            layer.grads = grads
        return False


def input_gradient(net, x, target, score="logit", batch_size=256):
    """Gradient of a class score with respect to the input images.

    Runs ``net.forward(x, training=False)`` and ``net.backward(seed, need_input_grad=True)``
    where ``seed`` is the gradient of the score with respect to the outputs. No optimizer step is
    taken and the layers' ``grads`` are restored afterwards (arrays and values), so this is safe
    to call in the middle of training.

    Parameters
    ----------
    net : Network
        A classifier (outputs ``(k,)`` per sample).
    x : ndarray of shape (n, *net.input_shape)
    target : int or ndarray of shape (n,)
        Class whose score is differentiated, for all images or per image.
    score : {"logit", "probability"}, default "logit"
        ``"logit"``: the network's raw output for the class (for a single output ``z``: ``z``
        for class 1, ``-z`` for class 0). ``"probability"``: the class probability (softmax of
        logits, or the output itself when the network already outputs probabilities).
        Gradients of the logit are the usual choice for saliency (Simonyan et al., 2014): the
        probability's gradient vanishes once the network is confident.
    batch_size : int, default 256

    Returns
    -------
    ndarray of the shape of ``x``, in the network's dtype
    """
    if score not in ("logit", "probability"):
        raise ValueError(f"Expected score 'logit' or 'probability', received: score={score!r}")
    x = net.check_inputs(x, "x", check_finite=False)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    n = len(x)
    k = _n_classes(net)
    target = _check_target(target, n, k)
    grad = np.empty_like(x)
    with _PreservedGrads(net):
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            out = np.array(net.forward(x[lo:hi], training=False), dtype=np.float64)
            seed = _score_gradient(net, out, target[lo:hi], score).astype(net.dtype)
            grad[lo:hi] = net.backward(seed, need_input_grad=True)
    return grad


def saliency_map(net, x, target, score="logit", batch_size=256):
    """Vanilla gradient saliency (Simonyan et al., 2014).

    The absolute input gradient of the class score, reduced over channels by its **maximum**
    (as in the paper: a pixel counts as much as its most sensitive channel).

    Parameters
    ----------
    net, x, target, score, batch_size
        As :func:`input_gradient`; ``x`` holds images ``(n, c, h, w)``.

    Returns
    -------
    ndarray of shape (n, h, w), non-negative
    """
    g = input_gradient(net, x, target, score=score, batch_size=batch_size)
    if g.ndim != 4:
        raise ValueError(f"Expected images of shape (n, c, h, w), received: {g.shape}")
    return np.abs(g).max(axis=1)
