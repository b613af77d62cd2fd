"""Looking inside a network: the explanations of :mod:`cnnx.explain` and the plots of
:mod:`cnnx.plots` under one name, ``cnnx.visualize.X``, as before they were two modules.

``cnnx.explain`` computes NumPy results only (activations, occlusion and saliency maps, input
gradients); ``cnnx.plots`` draws with matplotlib, imported only when a plot is asked for.
"""
from __future__ import annotations

from .explain import activations, input_gradient, layer_names, occlusion_map, saliency_map
from .metrics import confusion_matrix
from .plots import (
    plot_confusion_matrix,
    plot_feature_maps,
    plot_filters,
    plot_history,
    plot_occlusion,
    plot_reconstructions,
    plot_saliency,
)

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
