"""Plots of what :mod:`cnnx.explain` computes and of training results, with matplotlib.

This module owns every matplotlib call of the library; matplotlib is imported only when a plot is
asked for (install it with ``pip install cnnx[plot]``). Every ``plot_*`` function returns the
``Figure`` (a pyplot figure, so ``plt.show()`` works) and saves a PNG when given ``path``; the
caller closes it with ``matplotlib.pyplot.close(fig)``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from .geometry import positive_pair
from .explain import activations, layer_index, layer_names
from .validation import check_int

__all__ = [
    "plot_feature_maps",
    "plot_filters",
    "plot_occlusion",
    "plot_saliency",
    "plot_history",
    "plot_confusion_matrix",
    "plot_reconstructions",
]


def _pyplot():
    """matplotlib.pyplot, with the non-interactive Agg backend when there is no display."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "cnnx plots need matplotlib: pip install cnnx[plot] (or pip install matplotlib)"
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
    index = layer_index(net, layer)
    name = layer_names(net)[index]
    maps = activations(net, x, layers=index)[name]
    if maps.ndim != 4:
        raise ValueError(
            f"Expected a layer with image-like outputs (channels, h, w), received: layer {name!r} "
            f"with outputs of shape {maps.shape[1:]}"
        )
    max_maps = check_int(max_maps, "max_maps", minimum=1)
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
    max_filters = check_int(max_filters, "max_filters", minimum=1)
    max_in = check_int(max_in, "max_in", minimum=1)
    plt = _pyplot()
    index = layer_index(net, layer)
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


def _one_map(values, what, shape):
    """``values`` as a 2-D float64 array, or a ValueError naming ``what`` and its ``shape``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"Expected one {what} of shape {shape}, received: {values.shape}")
    return values


def _image_and_map(image, values, map_title, **imshow_kwargs):
    """Three panels: ``image``, the map ``values`` (drawn with ``imshow_kwargs``) and ``image``
    again for an overlay; returns ``(fig, axes, mappable of the map)``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), layout="constrained")
    _show_image(axes[0], image, "image")
    im = axes[1].imshow(values, interpolation="nearest", **imshow_kwargs)
    axes[1].set_title(map_title, fontsize=9)
    axes[1].set_xlabel("x (pixels)")
    axes[1].set_ylabel("y (pixels)")
    _show_image(axes[2], image, "overlay")
    return fig, axes, im


def _finish_map(fig, axes, im, label, title, path):
    """The colour bar (``label``) and ``title`` of an ``_image_and_map`` figure; saved to ``path``."""
    fig.colorbar(im, ax=axes.tolist(), fraction=0.025, pad=0.02, label=label)
    fig.suptitle(title)
    return _finish(fig, path)


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
    heat = _one_map(heatmap, "heatmap", "(out_h, out_w)")
    shown = _display_image(image)
    extent = _heat_extent(heat.shape, shown.shape[:2], patch, stride)
    vmax = float(np.abs(heat).max()) or 1.0
    fig, axes, im = _image_and_map(image, heat, "probability drop", cmap=cmap, vmin=-vmax, vmax=vmax, extent=extent)
    axes[1].set_xlim(-0.5, shown.shape[1] - 0.5)
    axes[1].set_ylim(shown.shape[0] - 0.5, -0.5)
    _overlay(axes[2], heat, im, vmax, extent)
    return _finish_map(fig, axes, im, "baseline p - occluded p", title, path)


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
    sal = _one_map(saliency, "saliency map", "(h, w)")
    if sal.shape != _display_image(image).shape[:2]:
        raise ValueError(
            f"Expected a saliency map of the image's size {_display_image(image).shape[:2]}, received: {sal.shape}"
        )
    fig, axes, im = _image_and_map(image, sal, "saliency", cmap=cmap, vmin=0.0)
    # Dim the image on black so the bright end of "hot" stays visible over white garments.
    axes[2].set_facecolor("black")
    axes[2].images[0].set_alpha(0.5)
    _overlay(axes[2], sal, im, float(sal.max()), None)
    return _finish_map(fig, axes, im, "|gradient|", title, path)


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
