"""Looking inside a network: activations, occlusion and saliency maps, and the plots that show them.

This module owns explanation and plotting. The first half computes NumPy results only (it never
needs matplotlib): layer outputs, occlusion-sensitivity heatmaps, input gradients and saliency
maps, the confusion matrix. None of it trains: weights, gradients and optimizer state are left
exactly as they were, so these can be called from a callback in the middle of ``fit``.

The second half draws them with matplotlib, imported only when a plot is asked for (install it
with ``pip install cnnx[plot]``). Every ``plot_*`` function returns the ``Figure`` (a pyplot
figure, so ``plt.show()`` works) and saves a PNG when given ``path``; the caller closes it with
``matplotlib.pyplot.close(fig)``.
"""
from __future__ import annotations

import numbers
import os
import sys
from pathlib import Path

import numpy as np

from ._geometry import conv_output_size, positive_pair
from .metrics import confusion_matrix

__all__ = [
    "activations",
    "layer_names",
    "occlusion_map",
    "input_gradient",
    "saliency_map",
    "confusion_matrix",
    "plot_feature_maps",
    "plot_filters",
    "plot_occlusion",
    "plot_saliency",
    "plot_history",
    "plot_confusion_matrix",
    "plot_reconstructions",
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


def _layer_index(net, layer):
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


def _check_input(net, x, name="x"):
    """``x`` as a contiguous batch of the network dtype, shaped ``(n, *net.input_shape)``."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"Expected {name} to hold real numbers, received: dtype={x.dtype}")
    expected = tuple(net.input_shape)
    if x.ndim != len(expected) + 1 or x.shape[1:] != expected:
        hint = f"; a single sample needs a batch axis: {name}[None]" if x.shape == expected else ""
        raise ValueError(
            f"Expected {name} of shape (n, {', '.join(map(str, expected))}), received: {x.shape}{hint}"
        )
    if len(x) == 0:
        raise ValueError(f"Expected {name} to hold at least one sample, received: {x.shape}")
    return np.ascontiguousarray(x, dtype=net.dtype)


def _check_batch_size(batch_size):
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"Expected batch_size as an int >= 1, received: batch_size={batch_size!r}")
    return int(batch_size)


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
    x = _check_input(net, x)
    if layers is None:
        wanted = set(range(len(net.layers)))
    elif isinstance(layers, (numbers.Integral, str)) and not isinstance(layers, bool):
        wanted = {_layer_index(net, layers)}
    else:
        wanted = {_layer_index(net, layer) for layer in layers}
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
    loss = getattr(net, "loss", None)
    if loss is not None and not getattr(loss, "from_logits", False):
        from .losses import BinaryCrossEntropy, CrossEntropy

        return isinstance(loss, (CrossEntropy, BinaryCrossEntropy))
    return False


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
        p1 = out[:, 0] if is_prob else 0.5 * (1.0 + np.tanh(0.5 * out[:, 0]))  # overflow-free sigmoid
        return np.stack([1.0 - p1, p1], axis=1)
    if is_prob:
        return out
    z = out - out.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


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
    x = _check_input(net, x)
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
    batch_size = _check_batch_size(batch_size)
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
    x = _check_input(net, x)
    batch_size = _check_batch_size(batch_size)
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


# ================================================================================================
# Plots (matplotlib, imported lazily)
# ================================================================================================
def _pyplot():
    """matplotlib.pyplot, with the non-interactive Agg backend when there is no display."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "cnnx.visualize plots need matplotlib: pip install cnnx[plot] (or pip install matplotlib)"
        ) from None
    headless = sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )
    # Only choose a backend the user has not chosen and before pyplot has picked one.
    if headless and "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path, dpi=120):
    """Save ``fig`` as PNG to ``path`` (making its folder) when given; return ``fig``."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight", format="png")
    return fig


def _display_image(image):
    """An image as imshow wants it: ``(h, w)`` grey or ``(h, w, 3)`` RGB scaled to [0, 1].

    Accepts ``(h, w)``, ``(1, h, w)``, ``(3, h, w)`` (cnnx's channels-first) or ``(h, w, 3)``.
    """
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    elif a.ndim == 3 and a.shape[0] == 3:
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[2] == 3:
        lo, hi = a.min(), a.max()
        # Standardised images are not in [0, 1]: stretch them for display only.
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    raise ValueError(
        f"Expected an image of shape (h, w), (1, h, w), (3, h, w) or (h, w, 3), received: {np.shape(image)}"
    )


def _show_image(ax, image, title=None):
    a = _display_image(image)
    ax.imshow(a, cmap="gray" if a.ndim == 2 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def plot_feature_maps(net, x, layer, max_maps=16, path=None, titles=None, cmap="viridis"):
    """Feature maps of one layer: per image, the input beside its maps laid out in a grid.

    The maps of one image fill a near-square grid (16 maps: 4 x 4, 6 maps: 3 x 2) rather than
    one long strip, so each map stays large enough to read; images are stacked top to bottom.

    Parameters
    ----------
    net : Network
    x : ndarray of shape (c, h, w) (one image) or (n, c, h, w) (one block of maps per image)
    layer : int or str
        The layer whose output is shown (index or name, see :func:`layer_names`); its output must
        be ``(channels, h, w)`` per sample.
    max_maps : int, default 16
        Show the first ``max_maps`` channels.
    path : str or Path, optional
        Save the figure there as PNG.
    titles : sequence of str, optional
        One label per image (e.g. its class name), shown beside the input image.
    cmap : str, default "viridis"

    Returns
    -------
    matplotlib.figure.Figure
        The maps of one image share one colour scale, shown by the colour bar at its grid's side.
    """
    plt = _pyplot()
    x = np.asarray(x)
    if x.shape == tuple(net.input_shape):
        x = x[None]
    index = _layer_index(net, layer)
    name = layer_names(net)[index]
    maps = activations(net, x, layers=index)[name]
    if maps.ndim != 4:
        raise ValueError(
            f"Expected a layer with image-like outputs (channels, h, w), received: layer {name!r} "
            f"with outputs of shape {maps.shape[1:]}"
        )
    if not isinstance(max_maps, numbers.Integral) or max_maps < 1:
        raise ValueError(f"Expected max_maps as an int >= 1, received: max_maps={max_maps!r}")
    n, channels = maps.shape[:2]
    if titles is not None and len(titles) < n:
        raise ValueError(f"Expected one title per image ({n}), received: {len(titles)} titles")
    shown = min(channels, int(max_maps))
    grid_cols = int(np.ceil(np.sqrt(shown)))
    grid_rows = -(-shown // grid_cols)
    fig = plt.figure(figsize=(1.3 * (grid_cols + 1) + 1.0, (1.3 * grid_rows + 0.4) * n + 0.6),
                     layout="constrained")
    blocks = fig.subfigures(n, 1, squeeze=False)[:, 0]
    for i, block in enumerate(blocks):
        # Column 0 holds the input (top cell); columns 1.. hold the maps, row by row.
        axes = block.subplots(grid_rows, grid_cols + 1, squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        _show_image(axes[0, 0], x[i], "input")
        axes[0, 0].axis("on")
        if titles is not None:
            axes[0, 0].set_ylabel(titles[i], fontsize=9)
        lo, hi = float(maps[i, :shown].min()), float(maps[i, :shown].max())
        map_axes = []
        for j in range(shown):
            ax = axes[j // grid_cols, 1 + j % grid_cols]
            ax.axis("on")
            im = ax.imshow(maps[i, j], cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"ch {j}", fontsize=8)
            map_axes.append(ax)
        block.colorbar(im, ax=map_axes, fraction=0.04, pad=0.02, label="activation")
    fig.suptitle(f"Feature maps of layer {name} ({shown} of {channels} channels)")
    return _finish(fig, path)


def plot_filters(net, layer=0, path=None, max_filters=64, max_in=8, cmap="RdBu_r"):
    """The kernels of a convolution layer as image grids (first layer by default).

    A layer with 3 input channels shows each filter as one RGB image; otherwise each filter is a
    row of grey-scale kernels, one per input channel (a layer with one input channel shows its
    filters in a square grid). Weights share one colour scale, symmetric about zero.

    Parameters
    ----------
    net : Network
    layer : int or str, default 0
        A layer with a 4-D ``params["weight"]`` of shape (out_channels, in_channels, kh, kw).
    path : str or Path, optional
    max_filters : int, default 64
        Show at most this many output channels.
    max_in : int, default 8
        Show at most this many input channels per filter.
    cmap : str, default "RdBu_r"

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    index = _layer_index(net, layer)
    name = layer_names(net)[index]
    weight = getattr(net.layers[index], "params", {}).get("weight")
    if weight is None or weight.ndim != 4:
        raise ValueError(
            f"Expected a convolution layer (weight of shape (out, in, kh, kw)), received: layer {name!r} "
            f"({type(net.layers[index]).__name__})"
        )
    w = np.asarray(weight, dtype=np.float64)
    c_out, c_in, kh, kw = w.shape
    n_f = min(c_out, max_filters)
    title = f"Filters of layer {name}: {c_out}x{c_in}x{kh}x{kw}"
    if c_in == 3:
        cols = int(np.ceil(np.sqrt(n_f)))
        rows = -(-n_f // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols + 0.5, 1.2 * rows + 0.7), squeeze=False,
                                 layout="constrained")
        for ax in axes.ravel():
            ax.axis("off")
        for f in range(n_f):
            ax = axes.ravel()[f]
            ax.imshow(_display_image(w[f]), interpolation="nearest")
            ax.set_title(f"{f}", fontsize=8)
        fig.suptitle(title + " (each filter stretched to [0, 1] as RGB)")
        return _finish(fig, path)
    vmax = float(np.abs(w[:n_f, :max_in]).max()) or 1.0
    if c_in == 1:
        cols = int(np.ceil(np.sqrt(n_f)))
        rows = -(-n_f // cols)
        cells = [(f, 0, divmod(f, cols)) for f in range(n_f)]
    else:
        cols = min(c_in, max_in)
        rows = n_f
        cells = [(f, ci, (f, ci)) for f in range(n_f) for ci in range(cols)]
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + 1.2, 1.1 * rows + 0.7), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    im = None
    for f, ci, (r, s) in cells:
        ax = axes[r, s]
        ax.axis("on")
        im = ax.imshow(w[f, ci], cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if c_in == 1:
            ax.set_title(f"filter {f}", fontsize=8)
        else:
            if s == 0:
                ax.set_ylabel(f"out {f}", fontsize=8)
            if r == 0:
                ax.set_title(f"in {ci}", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label="weight")
    fig.suptitle(title)
    return _finish(fig, path)


def _overlay(ax, values, mappable, vmax, extent):
    """Draw ``values`` over an image in ``mappable``'s colours, opaque in proportion to |value|,
    so the image stays visible wherever the map is near zero."""
    rgba = mappable.cmap(mappable.norm(values))
    rgba[..., 3] = 0.85 * np.clip(np.abs(values) / (vmax or 1.0), 0.0, 1.0)
    ax.imshow(rgba, extent=extent, interpolation="nearest")
    h, w = ax.images[0].get_array().shape[:2]
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def _heat_extent(heat_shape, image_shape, patch, stride):
    """imshow extent putting each occlusion cell over the centre of its patch."""
    h, w = image_shape
    out_h, out_w = heat_shape
    if patch is None or stride is None:
        return (-0.5, w - 0.5, h - 0.5, -0.5)  # stretched over the whole image
    ph, pw = positive_pair(patch, "patch")
    sy, sx = positive_pair(stride, "stride")
    left = (pw - 1) / 2 - sx / 2
    top = (ph - 1) / 2 - sy / 2
    return (left, left + out_w * sx, top + out_h * sy, top)


def plot_occlusion(image, heatmap, path=None, title="Occlusion sensitivity", patch=None, stride=None,
                   cmap="RdBu_r"):
    """An image, its occlusion heatmap, and the heatmap laid over the image.

    Parameters
    ----------
    image : ndarray of shape (h, w), (1, h, w), (3, h, w) or (h, w, 3)
    heatmap : ndarray of shape (out_h, out_w)
        One image's result of :func:`occlusion_map` (probability drop per patch position).
    path : str or Path, optional
    title : str
    patch, stride : int or pair, optional
        The values given to ``occlusion_map``: each cell is then drawn centred on its patch.
        Without them the heatmap is stretched over the image.
    cmap : str, default "RdBu_r"
        Diverging: red where occluding lowered the class probability, blue where it raised it.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2:
        raise ValueError(f"Expected one heatmap of shape (out_h, out_w), received: {heat.shape}")
    shown = _display_image(image)
    extent = _heat_extent(heat.shape, shown.shape[:2], patch, stride)
    vmax = float(np.abs(heat).max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), layout="constrained")
    _show_image(axes[0], image, "image")
    im = axes[1].imshow(heat, cmap=cmap, vmin=-vmax, vmax=vmax, extent=extent, interpolation="nearest")
    axes[1].set_xlim(-0.5, shown.shape[1] - 0.5)
    axes[1].set_ylim(shown.shape[0] - 0.5, -0.5)
    axes[1].set_title("probability drop", fontsize=9)
    _show_image(axes[2], image, "overlay")
    _overlay(axes[2], heat, im, vmax, extent)
    axes[1].set_xlabel("x (pixels)")
    axes[1].set_ylabel("y (pixels)")
    fig.colorbar(im, ax=axes.tolist(), fraction=0.025, pad=0.02, label="baseline p - occluded p")
    fig.suptitle(title)
    return _finish(fig, path)


def plot_saliency(image, saliency, path=None, title="Saliency (|d score / d input|)", cmap="hot"):
    """An image, its saliency map, and the map laid over the image, side by side.

    Parameters
    ----------
    image : ndarray of shape (h, w), (1, h, w), (3, h, w) or (h, w, 3)
    saliency : ndarray of shape (h, w)
        One image's result of :func:`saliency_map`.
    path : str or Path, optional
    title : str
    cmap : str, default "hot"

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    sal = np.asarray(saliency, dtype=np.float64)
    if sal.ndim != 2:
        raise ValueError(f"Expected one saliency map of shape (h, w), received: {sal.shape}")
    if sal.shape != _display_image(image).shape[:2]:
        raise ValueError(
            f"Expected a saliency map of the image's size {_display_image(image).shape[:2]}, received: {sal.shape}"
        )
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), layout="constrained")
    _show_image(axes[0], image, "image")
    im = axes[1].imshow(sal, cmap=cmap, vmin=0.0, interpolation="nearest")
    axes[1].set_title("saliency", fontsize=9)
    axes[1].set_xlabel("x (pixels)")
    axes[1].set_ylabel("y (pixels)")
    _show_image(axes[2], image, "overlay")
    # Dim the image on black so the bright end of "hot" stays visible over white garments.
    axes[2].set_facecolor("black")
    axes[2].images[0].set_alpha(0.5)
    _overlay(axes[2], sal, im, float(sal.max()), None)
    fig.colorbar(im, ax=axes.tolist(), fraction=0.025, pad=0.02, label="|gradient|")
    fig.suptitle(title)
    return _finish(fig, path)


def plot_history(history, path=None, title="Training history"):
    """Loss and accuracy per epoch, training and validation, in two panels.

    Parameters
    ----------
    history : dict of lists
        ``Network.history``: ``loss``, ``accuracy`` and optionally ``val_loss``, ``val_accuracy``
        (NaN entries, for epochs without validation, leave gaps).
    path : str or Path, optional
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    if not isinstance(history, dict) or "loss" not in history:
        raise ValueError(f"Expected a history dict with at least a 'loss' list, received: {history!r:.80}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        for prefix, style, name in (("", "o-", "train"), ("val_", "s--", "validation")):
            values = np.asarray(history.get(prefix + key, []), dtype=np.float64)
            if values.size and not np.all(np.isnan(values)):
                ax.plot(np.arange(1, values.size + 1), values, style, label=name, markersize=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return _finish(fig, path)


def plot_confusion_matrix(cm, class_names=None, path=None, normalize=False, title="Confusion matrix",
                          cmap="Blues"):
    """A confusion matrix as a heatmap with the count (or rate) written in each cell.

    Parameters
    ----------
    cm : ndarray of shape (k, k)
        Rows are the true class, columns the predicted class (as :func:`confusion_matrix`).
    class_names : sequence of k str, optional
    path : str or Path, optional
    normalize : bool, default False
        Divide each row by its total, so a cell is the fraction of the true class predicted as
        the column's class (rows with no samples stay zero).
    title : str
    cmap : str, default "Blues"

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"Expected a square confusion matrix (k, k), received: shape {cm.shape}")
    k = cm.shape[0]
    if class_names is None:
        class_names = [str(i) for i in range(k)]
    class_names = [str(c) for c in class_names]
    if len(class_names) != k:
        raise ValueError(f"Expected {k} class names, received: {len(class_names)}")
    values = cm.astype(np.float64)
    if normalize:
        totals = values.sum(axis=1, keepdims=True)
        values = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    size = max(4.0, 0.55 * k + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size), layout="constrained")
    im = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title + (" (normalised by row)" if normalize else ""))
    threshold = values.max() / 2 if values.size else 0
    for i in range(k):
        for j in range(k):
            text = f"{values[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if values[i, j] > threshold else "black")
    return _finish(fig, path)


def plot_reconstructions(noisy, reconstructed, clean, path=None, max_images=8, title="Reconstructions",
                         labels=("noisy", "reconstructed", "clean")):
    """A grid for denoising / autoencoder results: rows noisy input, reconstruction, clean target.

    Parameters
    ----------
    noisy, reconstructed, clean : ndarray of shape (n, c, h, w) or (n, h, w), or None
        Images in matching order; a row given as None is left out (at least one is needed).
    path : str or Path, optional
    max_images : int, default 8
        Show the first ``max_images`` images (one column each).
    title : str
    labels : three str, default ("noisy", "reconstructed", "clean")
        The row labels, e.g. ``("noisy", "denoised", "clean")`` for a denoising autoencoder.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _pyplot()
    if isinstance(labels, str) or len(labels) != 3 or not all(isinstance(t, str) for t in labels):
        raise ValueError(f"Expected labels as three strings (noisy, reconstructed, clean), received: labels={labels!r}")
    rows = [(label, np.asarray(a)) for label, a in
            zip(labels, (noisy, reconstructed, clean)) if a is not None]
    if not rows:
        raise ValueError("Expected at least one of noisy, reconstructed, clean, received: all None")
    n = min(len(a) for _, a in rows)
    if any(len(a) != n for _, a in rows):
        raise ValueError(f"Expected the same number of images in every row, received: {[len(a) for _, a in rows]}")
    cols = min(n, int(max_images))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols + 0.8, 1.4 * len(rows) + 0.5), squeeze=False,
                             layout="constrained")
    for r, (label, images) in enumerate(rows):
        for j in range(cols):
            ax = axes[r, j]
            _show_image(ax, images[j])
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(title)
    return _finish(fig, path)
