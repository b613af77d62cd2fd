"""ONNX export: ``cnnx.onnx.export(net, path)`` writes a standard ONNX model of a Network.

The ``onnx`` package (the optional extra ``cnnx[onnx]``) is imported inside the functions only.
This module is ``cnnx.onnx``, yet ``import onnx`` inside it finds the real package: Python 3
imports are absolute (only ``from . import`` is relative to the package).

Design: one converter per layer class, in ``CONVERTERS`` (class name -> function). A converter
gets the graph being built, the layer, the name of its input tensor and the per-sample input
shape, adds nodes and returns the name of its output. Adding a layer is a few lines::

    @converter("GlobalAvgPool2D")                    # (n, c, h, w) -> (n, c)
    def _global_avg_pool(g, layer, x, shape):
        return g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)

Parameters become initializers with ``g.param(layer, "weight")``, fused activations nodes with
``g.activation(layer.activation, y, layer.negative_slope)``.
Containers call ``g.sequence(layers, x, shape, scope)`` on their children (see ``Residual``).
The exported graph computes what ``net.predict`` returns (eval mode: Dropout is the identity,
BatchNorm uses its running statistics; a softmax / sigmoid after the last layer when the loss
works on logits), in float32, with a free batch axis.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = ["export", "converter", "CONVERTERS", "GraphBuilder", "DEFAULT_OPSET"]

#: The opset ``export`` writes unless told otherwise (``Gelu`` appears as one node from 20 on).
DEFAULT_OPSET = 17
_MIN_OPSET = 17

#: Layer class name -> converter ``f(g, layer, x, shape) -> output name``.
CONVERTERS = {}


def converter(*class_names):
    """Register the decorated function as the ONNX converter of the named layer classes."""

    def register(fn):
        for name in class_names:
            CONVERTERS[name] = fn
        return fn

    return register


class GraphBuilder:
    """Collects nodes and initializers while converters run; names every tensor uniquely.

    Parameter initializers are named by the layer's path in the network (``"3.weight"``,
    ``"2.block.0.weight"``) so a reader can match them to ``net.parameters()``.
    """

    def __init__(self, opset):
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.opset = opset
        self.nodes = []
        self.initializers = []
        self.scope = ""
        self._used = set()
        self._scalars = {}

    def fresh(self, hint):
        """A tensor / node name not used yet, starting with the current scope."""
        base = f"{self.scope}{hint}"
        name, k = base, 1
        while name in self._used:
            name, k = f"{base}_{k}", k + 1
        self._used.add(name)
        return name

    def constant(self, array, hint):
        """Add ``array`` as an initializer (floats as float32, ints as int64); return its name."""
        array = np.asarray(array)
        array = array.astype(np.float32 if array.dtype.kind == "f" else np.int64)
        name = self.fresh(hint)
        self.initializers.append(self._numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def scalar(self, value):
        """A shared float32 scalar initializer."""
        key = float(value)
        if key not in self._scalars:
            scope, self.scope = self.scope, ""
            self._scalars[key] = self.constant(np.float32(value), f"const_{len(self._scalars)}")
            self.scope = scope
        return self._scalars[key]

    def param(self, layer, name):
        """The layer's parameter or buffer ``name`` as an initializer named ``"<scope><name>"``."""
        store = layer.params if name in layer.params else layer.buffers
        return self.constant(store[name], name)

    def node(self, op_type, inputs, hint=None, **attributes):
        """Add one node with a single output; return the output's name."""
        out = self.fresh(hint or op_type)
        self.nodes.append(self._helper.make_node(op_type, list(inputs), [out], name=out, **attributes))
        return out

    def activation(self, name, x, negative_slope=0.01, approximate="none"):
        """The nodes of activation ``name`` (as in ``cnnx.layers.ACTIVATIONS``) applied to ``x``."""
        if name is None:
            return x
        if name == "relu":
            return self.node("Relu", [x])
        if name == "leaky_relu":
            return self.node("LeakyRelu", [x], alpha=float(negative_slope))
        if name == "sigmoid":
            return self.node("Sigmoid", [x])
        if name == "tanh":
            return self.node("Tanh", [x])
        if name == "gelu":
            return self._gelu(x, approximate)
        if name == "softmax":
            return self.node("Softmax", [x], axis=1)
        raise NotImplementedError(f"cnnx.onnx has no conversion for activation {name!r}")

    def _gelu(self, x, approximate):
        if self.opset >= 20:
            return self.node("Gelu", [x], approximate=approximate)
        if approximate == "tanh":
            # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            x3 = self.node("Mul", [self.node("Mul", [x, x]), x])
            inner = self.node("Add", [x, self.node("Mul", [x3, self.scalar(0.044715)])])
            t = self.node("Tanh", [self.node("Mul", [inner, self.scalar(math.sqrt(2.0 / math.pi))])])
        else:
            # 0.5 x (1 + erf(x / sqrt(2)))
            t = self.node("Erf", [self.node("Mul", [x, self.scalar(math.sqrt(0.5))])])
        half_x = self.node("Mul", [x, self.scalar(0.5)])
        return self.node("Mul", [half_x, self.node("Add", [t, self.scalar(1.0)])], hint="Gelu")

    def sequence(self, layers, x, shape, scope=""):
        """Convert ``layers`` in order from tensor ``x`` of per-sample ``shape``; return the output name.

        ``scope`` prefixes the names (``"2.block."``); layer ``i`` is converted under ``scope + f"{i}."``.
        """
        outer = self.scope
        for i, layer in enumerate(layers):
            kind = type(layer).__name__
            self.scope = f"{outer}{scope}{i}."
            fn = CONVERTERS.get(kind)
            if fn is None:
                raise NotImplementedError(
                    f"cnnx.onnx.export has no converter for layer {self.scope[:-1]} ({kind}); "
                    f"register one with @cnnx.onnx.converter({kind!r})"
                )
            x = fn(self, layer, x, tuple(shape))
            shape = tuple(layer.output_shape(shape))
        self.scope = outer
        return x


# ------------------------------------------------------------------------------------------
# Converters
# ------------------------------------------------------------------------------------------
def _conv_attributes(layer, spatial_pads):
    """Conv attributes shared by Conv2D and Conv1D; dilation / groups read from the config."""
    config = layer.get_config()
    dims = len(spatial_pads)
    kernel = layer.kernel_size if isinstance(layer.kernel_size, tuple) else (layer.kernel_size,)
    stride = layer.stride if isinstance(layer.stride, tuple) else (layer.stride,)
    dilation = config.get("dilation", 1)
    dilation = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,) * dims
    begins = [p[0] for p in spatial_pads]
    ends = [p[1] for p in spatial_pads]
    return dict(kernel_shape=list(kernel), strides=list(stride), pads=begins + ends,
                dilations=[int(d) for d in dilation], group=int(config.get("groups", 1)))


def _weights_and_bias(g, layer):
    inputs = [g.param(layer, "weight")]
    if "bias" in layer.params:
        inputs.append(g.param(layer, "bias"))
    return inputs


@converter("Conv2D")
def _conv2d(g, layer, x, shape):
    pads = layer.explicit_padding(shape[1:])
    y = g.node("Conv", [x] + _weights_and_bias(g, layer), **_conv_attributes(layer, pads))
    return g.activation(layer.activation, y, layer.negative_slope)


@converter("Conv1D")
def _conv1d(g, layer, x, shape):
    pads = (layer.explicit_padding(shape[1]),)
    y = g.node("Conv", [x] + _weights_and_bias(g, layer), **_conv_attributes(layer, pads))
    return g.activation(layer.activation, y, layer.negative_slope)


@converter("ConvTranspose2D")
def _conv_transpose2d(g, layer, x, shape):
    # ONNX's weight layout (C_in, C_out / group, kh, kw) is cnnx's (and PyTorch's).
    ph, pw = layer.padding
    return g.node("ConvTranspose", [x] + _weights_and_bias(g, layer), kernel_shape=list(layer.kernel_size),
                  strides=list(layer.stride), pads=[ph, pw, ph, pw], output_padding=list(layer.output_padding))


@converter("MaxPool2D", "AvgPool2D")
def _pool2d(g, layer, x, shape):
    (pt, pb), (pl, pr) = layer.pads
    attrs = dict(kernel_shape=list(layer.kernel_size), strides=list(layer.stride), pads=[pt, pl, pb, pr])
    if type(layer).__name__ == "MaxPool2D":
        return g.node("MaxPool", [x], **attrs)  # padding never wins: ONNX pads max-pool with -inf
    return g.node("AveragePool", [x], count_include_pad=1, **attrs)  # cnnx counts zero padding


@converter("MaxPool1D", "AvgPool1D")
def _pool1d(g, layer, x, shape):
    left, right = layer.pads
    attrs = dict(kernel_shape=[layer.kernel_size], strides=[layer.stride], pads=[left, right])
    if type(layer).__name__ == "MaxPool1D":
        return g.node("MaxPool", [x], **attrs)
    return g.node("AveragePool", [x], count_include_pad=1, **attrs)


@converter("Upsample2D")
def _upsample2d(g, layer, x, shape):
    sy, sx = layer.scale_factor
    scales = g.constant(np.array([1.0, 1.0, sy, sx], dtype=np.float32), "scales")
    # Output pixel i reads input floor(i / s): exactly cnnx's repetition of each pixel.
    return g.node("Resize", [x, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
                  nearest_mode="floor")


@converter("Dense")
def _dense(g, layer, x, shape):
    y = g.node("Gemm", [x] + _weights_and_bias(g, layer), transB=1)  # weight is (out, in)
    return g.activation(layer.activation, y, layer.negative_slope)


@converter("Flatten")
def _flatten(g, layer, x, shape):
    return g.node("Flatten", [x], axis=1)


@converter("Reshape")
def _reshape(g, layer, x, shape):
    target = [0] + list(layer.output_shape(shape))  # 0: keep the batch size
    return g.node("Reshape", [x, g.constant(np.array(target, dtype=np.int64), "shape")])


@converter("Dropout")
def _dropout(g, layer, x, shape):
    return g.node("Identity", [x])  # inference


@converter("ReLU", "LeakyReLU", "Sigmoid", "Tanh", "GELU", "Softmax")
def _activation_layer(g, layer, x, shape):
    name = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "GELU": "gelu",
            "Softmax": "softmax"}[type(layer).__name__]
    return g.activation(name, x, getattr(layer, "negative_slope", 0.01), getattr(layer, "approximate", "none"))


def _scale_and_shift(g, layer):
    """A normalisation layer's ``weight`` and ``bias`` (ones and zeros without ``affine``)."""
    if layer.affine:
        return g.param(layer, "weight"), g.param(layer, "bias")
    c = layer.num_features
    return g.constant(np.ones(c), "weight"), g.constant(np.zeros(c), "bias")


@converter("BatchNorm1D", "BatchNorm2D")
def _batchnorm(g, layer, x, shape):
    scale, bias = _scale_and_shift(g, layer)
    inputs = [x, scale, bias, g.param(layer, "running_mean"), g.param(layer, "running_var")]
    return g.node("BatchNormalization", inputs, epsilon=layer.eps)


@converter("Residual")
def _residual(g, layer, x, shape):
    a = g.sequence(layer.block, x, shape, "block.")
    s = x if layer.shortcut is None else g.sequence(layer.shortcut, x, shape, "shortcut.")
    return g.activation(layer.activation, g.node("Add", [a, s]), layer.negative_slope)


# The layers below come from the branch adding LayerNorm, global pools and Concat; converters are
# keyed by class name, so they wait here harmlessly until those classes exist.
@converter("Concat")
def _concat(g, layer, x, shape):
    outputs = [g.sequence(branch, x, shape, f"branches.{b}.") for b, branch in enumerate(layer.branches)]
    return g.node("Concat", outputs, axis=1)


@converter("GlobalAvgPool2D", "GlobalMaxPool2D")
def _global_pool2d(g, layer, x, shape):
    op = "GlobalAveragePool" if type(layer).__name__ == "GlobalAvgPool2D" else "GlobalMaxPool"
    y = g.node(op, [x])  # (n, c, 1, 1)
    return y if layer.keepdims else g.node("Flatten", [y], axis=1)


@converter("LayerNorm")
def _layer_norm(g, layer, x, shape):
    scale, bias = _scale_and_shift(g, layer)
    if layer.axis == -1 or len(shape) == 1:
        return g.node("LayerNormalization", [x, scale, bias], axis=-1, epsilon=layer.eps)
    # Over the channels of (n, c, ...): move them last, normalise, move them back.
    rank = len(shape) + 1
    last = g.node("Transpose", [x], perm=[0] + list(range(2, rank)) + [1])
    y = g.node("LayerNormalization", [last, scale, bias], axis=-1, epsilon=layer.eps)
    return g.node("Transpose", [y], perm=[0, rank - 1] + list(range(1, rank - 1)))


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------
def _check_opset(opset):
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not _MIN_OPSET <= opset <= newest:
        raise ValueError(f"Expected opset an int in [{_MIN_OPSET}, {newest}], received: opset={opset!r}")
    return opset


def to_model(net, opset=DEFAULT_OPSET, output="predict", metadata=None):
    """Build (and check) the ONNX ``ModelProto`` of ``net`` without writing it.

    Parameters as :func:`export`.
    """
    try:
        import onnx
    except ImportError:
        raise ImportError("cnnx.onnx needs the onnx package: pip install 'cnnx[onnx]'") from None
    from onnx import TensorProto, helper

    from .network import Network

    if not isinstance(net, Network):
        raise TypeError(f"Expected a cnnx Network, received: {type(net).__name__}")
    opset = _check_opset(opset)
    if output not in ("predict", "raw"):
        raise ValueError(f"Expected output 'predict' or 'raw', received: output={output!r}")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError(f"Expected metadata as a dict of str -> str, received: {metadata!r}")

    g = GraphBuilder(opset)
    y = g.sequence(net.layers, "input", net.input_shape)
    if output == "predict":
        kind = net.output_activation
        if kind == "softmax" and len(net.output_shape) == 1:  # as Network.predict: class rows only
            y = g.activation("softmax", y)
        elif kind == "sigmoid":
            y = g.activation("sigmoid", y)
    y = g.node("Identity", [y], hint="output_identity") if y == "input" else y
    # Rename the last tensor to "output" (the graph output name users see).
    for node in g.nodes:
        node.output[:] = ["output" if o == y else o for o in node.output]
        node.input[:] = ["output" if i == y else i for i in node.input]

    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *net.input_shape])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *net.output_shape])
    graph = helper.make_graph(g.nodes, "cnnx_network", [inp], [out], initializer=g.initializers)
    from . import __version__

    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="cnnx", producer_version=__version__)
    # The oldest IR version that carries this opset, not the newest the onnx package writes: older
    # runtimes refuse IR versions they do not know.
    model.ir_version = helper.find_min_ir_version_for(opsets)
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def export(net, path, opset=DEFAULT_OPSET, output="predict", metadata=None):
    """Write ``net`` as an ONNX model file.

    Parameters
    ----------
    net : Network
    path : str or Path
        The ``.onnx`` file; written atomically (a temporary file renamed into place), its
        directory must exist.
    opset : int, default 17
        ONNX opset, from 17 to the newest the installed ``onnx`` knows.
    output : {"predict", "raw"}, default "predict"
        ``"predict"``: the graph returns what ``net.predict`` does (class probabilities when the
        network was compiled with a loss on logits); ``"raw"``: the last layer's output.
    metadata : dict of str -> str, optional
        Stored in the model's ``metadata_props`` (``cnnx export`` stores the preprocessing).

    Returns
    -------
    onnx.ModelProto
        The model written, already validated with ``onnx.checker.check_model(full_check=True)``.
        Input ``"input"`` of shape ``(batch, *net.input_shape)`` float32, output ``"output"``.

    Raises
    ------
    NotImplementedError
        For a layer with no converter (the message names it and how to register one).
    ImportError
        Without the ``onnx`` package.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected path as a str or Path, received: {type(path).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"Expected path in an existing directory, received: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"Expected path to a file, received the directory {str(path)!r}")
    model = to_model(net, opset, output, metadata)
    from .state_dict import write_atomically

    write_atomically(path, model.SerializeToString())
    return model
