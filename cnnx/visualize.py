"""Looking inside a network: the explanations of :mod:`cnnx.explain` and the plots of
:mod:`cnnx.plots` under one name, ``cnnx.visualize.X``, as before they were two modules.

``cnnx.explain`` computes NumPy results only (activations, occlusion and saliency maps, input
gradients); ``cnnx.plots`` draws with matplotlib, imported only when a plot is asked for.
"""
from __future__ import annotations

from . import explain, plots
from .explain import activations, input_gradient, layer_index, layer_names, occlusion_map, saliency_map  # noqa: F401
from .metrics import confusion_matrix
from .plots import (  # noqa: F401
    plot_confusion_matrix,
    plot_feature_maps,
    plot_filters,
    plot_history,
    plot_occlusion,
    plot_reconstructions,
    plot_saliency,
)

__all__ = [*explain.__all__, "confusion_matrix", *plots.__all__]
