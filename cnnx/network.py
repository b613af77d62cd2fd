"""The ``Network``: a chain of layers with compile / fit / evaluate / predict / summary.

This module owns the network: building and shape inference, compile, the public calls, and the
checks of their inputs and targets (everything a user can get wrong is checked once per call,
before any work). How the layers run is the execution plan's (cnnx.plan); the training loop and
its history are cnnx.training's, which ``fit`` hands over to.
"""
from __future__ import annotations

import numpy as np

from . import functional as F
from . import training
from .layers.base import Layer, layer_to_config, layers_from_config
from .parallel import with_single_threaded_blas
from .plan import Plan, layer_label
from .training import NonFiniteLossError
from .validation import check_int, check_shape

__all__ = ["Network", "NonFiniteLossError"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Network:
    """A feed-forward chain of layers.

    Parameters
    ----------
    layers : sequence of Layer
        The layers, applied in order. Each layer instance may appear only once.
    input_shape : tuple of int
        Per-sample input shape, without the batch axis: ``(c, h, w)`` for images.
    dtype : {"float32", "float64"}, default "float32"
        Dtype of parameters and activations; layers are cast to it.

    Raises
    ------
    ValueError
        If a layer cannot take the output of the layer before it (the message names the layer
        index and class) or an argument is out of range.
    TypeError
        If ``layers`` holds something that is not a ``cnnx.layers.Layer``.

    Examples
    --------
    >>> net = Network([Conv2D(1, 16, 2, padding="same"), ...], input_shape=(1, 28, 28))
    >>> net.compile("SoftmaxCrossEntropy", "Adam")
    >>> history = net.fit(x_train, y_train, epochs=15, batch_size=256)
    """

    def __init__(self, layers, input_shape, dtype="float32"):
        if isinstance(layers, Layer) or not isinstance(layers, (list, tuple)):
            raise TypeError(f"Expected layers to be a list of Layer instances, received: {type(layers).__name__}")
        if len(layers) == 0:
            raise ValueError("Expected at least one layer, received: an empty list")
        seen = set()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"Expected every element of layers to be a cnnx Layer, received at index {i}: "
                    f"{type(layer).__name__}"
                )
            # A layer used twice would share (and overwrite) its cache and its parameter keys.
            if id(layer) in seen:
                raise ValueError(f"Layer {i} ({type(layer).__name__}) appears more than once in layers")
            seen.add(id(layer))
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"Expected dtype 'float32' or 'float64', received: dtype={dtype!r}") from None
        if dtype not in _DTYPES:
            raise ValueError(f"Expected dtype 'float32' or 'float64', received: dtype={dtype.name!r}")

        self.layers = list(layers)
        self.input_shape = check_shape(input_shape)
        self.dtype = dtype
        self.shapes = self._infer_shapes()
        self.output_shape = self.shapes[-1]
        for layer in self.layers:
            layer.astype(dtype)
        # How the layers run (fusions, per-thread caches): see cnnx.plan. Rebuilt when the layer
        # list changes or ``fuse`` is switched.
        self._fuse = True
        self._plan = Plan(self.layers)

        self.loss = None
        self.optimizer = None
        self.history: dict[str, list] = {"loss": [], "accuracy": []}
        self.stop_training = False

    # ------------------------------------------------------------------ construction ----
    def _infer_shapes(self):
        """Per-sample output shape of every layer; a mismatch names the layer that refused it."""
        shapes = []
        shape = self.input_shape
        for i, layer in enumerate(self.layers):
            try:
                shape = check_shape(layer.output_shape(shape))
            except (ValueError, TypeError) as exc:
                source = "the network input" if i == 0 else f"layer {i - 1} ({type(self.layers[i - 1]).__name__})"
                raise ValueError(
                    f"Layer {i} ({type(layer).__name__}) cannot take input of shape {shape} "
                    f"coming from {source}: {exc}"
                ) from exc
            shapes.append(shape)
        return shapes

    @property
    def num_params(self):
        """Total number of trainable scalars."""
        return int(sum(p.size for _, p, _ in self.parameters()))

    @property
    def compiled(self):
        return self.loss is not None and self.optimizer is not None

    @property
    def output_activation(self):
        """"softmax" / "sigmoid" when the compiled loss takes logits of that kind (``predict``
        applies it, see ``Loss.output_activation``), else None (also before ``compile``)."""
        return None if self.loss is None else self.loss.output_activation

    def parameters(self):
        """List of ``(key, param, grad)`` with keys ``f"{i}.{name}"``.

        Rebuilt on every call: a layer's ``backward`` may assign new gradient arrays.
        """
        return [
            (f"{i}.{name}", p, g)
            for i, layer in enumerate(self.layers)
            for name, p, g in layer.named_parameters()
        ]

    def buffers(self):
        """List of ``(key, array)`` for non-trainable state (BatchNorm running statistics).

        Keys are ``f"{i}.{name}"`` like parameters' (``"3.running_mean"``).
        """
        return [
            (f"{i}.{name}", b) for i, layer in enumerate(self.layers) for name, b in layer.named_buffers()
        ]

    def get_weights(self):
        """Copies of every parameter and buffer, as a dict ``key -> ndarray``."""
        weights = {key: p.copy() for key, p, _ in self.parameters()}
        weights.update((key, b.copy()) for key, b in self.buffers())
        return weights

    def set_weights(self, weights):
        """Copy ``weights`` (as returned by ``get_weights``) into the network, in place.

        Arrays are overwritten rather than replaced, so an optimizer's references (and its state,
        keyed by the same names) stay valid.
        """
        targets = {key: p for key, p, _ in self.parameters()}
        targets.update(self.buffers())
        missing = sorted(set(targets) - set(weights))
        unexpected = sorted(set(weights) - set(targets))
        if missing or unexpected:
            raise ValueError(f"Expected weights for keys {sorted(targets)}, missing: {missing}, unexpected: {unexpected}")
        for key, target in targets.items():
            value = np.asarray(weights[key])
            if value.shape != target.shape:
                raise ValueError(f"Expected {key} of shape {target.shape}, received: {value.shape}")
            target[...] = value

    def state_dict(self):
        """Parameters and buffers under the keys of the equivalent ``torch.nn.Sequential``
        (``"0.weight"``, ``"1.running_mean"``, ...), as copies. See :mod:`cnnx.state_dict`."""
        from . import state_dict as _sd

        return _sd.state_dict(self)

    def load_state_dict(self, state_dict, strict=True):
        """Copy a PyTorch-style state dict (NumPy arrays or torch tensors) into the network, all
        or nothing; returns ``(missing_keys, unexpected_keys)``. See :mod:`cnnx.state_dict`."""
        from . import state_dict as _sd

        return _sd.load_state_dict(self, state_dict, strict=strict)

    def get_config(self):
        """JSON-serialisable description: input shape, dtype and each layer's class and config."""
        return {
            "input_shape": list(self.input_shape),
            "dtype": self.dtype.name,
            "layers": [layer_to_config(layer) for layer in self.layers],
        }

    @classmethod
    def from_config(cls, config):
        """Rebuild an (uncompiled, freshly initialised) network from ``get_config()``."""
        layers = layers_from_config(config["layers"], "layers")
        return cls(layers, tuple(config["input_shape"]), dtype=config.get("dtype", "float32"))

    # ------------------------------------------------------------------ forward / backward
    @with_single_threaded_blas
    def forward(self, x, training=False):
        """Run the layers on a batch.

        Parameters
        ----------
        x : ndarray of shape (n, *input_shape)
            Cast to the network dtype when it differs.
        training : bool
            Training mode (Dropout, BatchNorm). Caches for ``backward`` are kept either way.

        Returns
        -------
        ndarray of shape (n, *output_shape)
        """
        x = self.check_inputs(x, "x", check_finite=False)
        return self.forward_checked(x, training)

    __call__ = forward

    @property
    def fuse(self):
        """Whether the plan fuses layers (Conv2D + activation layer + max-pool, Dense + activation).

        True by default; False runs every layer as its own step (same results to round-off,
        slower). Settable.
        """
        return self._fuse

    @fuse.setter
    def fuse(self, value):
        if not isinstance(value, bool):
            raise TypeError(f"Expected fuse to be a bool, received: fuse={value!r}")
        self._fuse = value
        self._plan = None

    @property
    def plan(self):
        """The execution plan (``cnnx.plan.Plan``) for the current layer list."""
        plan = self._plan
        if plan is None or plan.fuse != self._fuse or not plan.matches(self.layers):
            plan = self._plan = Plan(self.layers, fuse=self._fuse)
        return plan

    def __getstate__(self):
        # The plan holds locks and per-thread caches: a copy or a pickle builds its own.
        state = self.__dict__.copy()
        state["_plan"] = None
        return state

    def forward_checked(self, x, training=False, timer=None):
        """``forward`` on a batch already checked by :meth:`check_inputs`, with no check of its
        own: the per-batch call of the training loop and the profiler.

        ``timer`` (a ``cnnx.profiler`` timer, optional) records the time of each plan step.
        """
        # Inference may run steps that keep no caches (conv + max-pool): a backward that follows
        # (saliency maps) replays the forward first.
        return self.plan.forward(x, training, keep_caches=False, timer=timer)

    @with_single_threaded_blas
    def backward(self, dloss, need_input_grad=False, timer=None):
        """Back-propagate ``dloss`` (the gradient w.r.t. the last ``forward``'s output).

        Fills every layer's ``grads``. Returns the gradient w.r.t. the network input when
        ``need_input_grad`` is true (saliency maps), else None. Uses the caches of the calling
        thread's last ``forward``. ``timer`` as in :meth:`forward_checked`.
        """
        return self.plan.backward(dloss, need_input_grad, timer=timer)

    # ------------------------------------------------------------------ training ----------
    def compile(self, loss, optimizer):
        """Set the loss and the optimizer (instances, or names for ``cnnx.losses.get`` /
        ``cnnx.optimizers.get``). Returns the network."""
        from . import losses, optimizers

        self.loss = losses.get(loss)
        self.optimizer = optimizers.get(optimizer)
        return self

    @with_single_threaded_blas
    def fit(self, x, y, epochs=1, batch_size=32, validation_data=None, shuffle=True, seed=None,
            callbacks=None, verbose=1, augment=None, clip_grad_norm=None, class_weight=None,
            distributed=None):
        """Train for ``epochs`` passes over ``(x, y)``.

        Parameters
        ----------
        x : ndarray of shape (n, *input_shape)
            Finite inputs; cast once to the network dtype (no copy when it already matches).
        y : ndarray of shape (n,) or (n, k)
            Integer class ids in ``[0, k)`` or one-hot / probability rows of width ``k``, where
            ``k`` is the network's number of outputs.
        epochs : int
        batch_size : int
            The last batch of an epoch may be smaller.
        validation_data : tuple (x_val, y_val), optional
            Evaluated at the end of every epoch.
        shuffle : bool
            Visit samples in a new random order each epoch; False visits them in order, so a run
            can be reproduced step for step.
        seed : int or None
            Seed of the shuffling: epoch ``e`` of the network's history is shuffled by
            ``default_rng([seed, e])``, so resuming a saved network continues the same sequence
            (None: not reproducible).
        callbacks : list of Callback, optional
        verbose : {0, 1, 2}
            0 silent, 1 a progress bar per epoch, 2 one line per epoch.
        augment : cnnx.augment.Augmentation or list of them, optional
            Applied to every training batch (never to validation, ``evaluate`` or ``predict``),
            drawing from ``default_rng([seed, e, ...])`` for epoch ``e`` of the history: a seeded
            run repeats exactly.
        clip_grad_norm : float > 0, optional
            Clip the gradients' global L2 norm to this before each step
            (``cnnx.gradients.clip_grad_norm_``, as ``torch.nn.utils.clip_grad_norm_``).
        class_weight : dict {class id: weight} or "balanced", optional
            Keras' ``class_weight``: the gradient is that of ``sum_i w[y_i] loss_i / n``. The
            reported ``loss`` stays the unweighted mean, the quantity ``evaluate`` reports.
        distributed : {None, "mpi"} or cnnx.distributed.MPIDataParallel
            ``"mpi"``: data-parallel training over the ranks started by ``mpiexec``; every rank
            calls ``fit`` alike, each global batch is split across them and gradients are summed
            (see :mod:`cnnx.distributed`). Only rank 0 prints and runs ``callbacks``.

        The learning-rate schedule attached to the optimizer (``cnnx.schedules``), if any, is
        stepped after every epoch (or batch, with ``interval="batch"``); epoch logs then carry
        ``lr`` (the rate at the epoch's start) and ``history`` gains an ``lr`` list.

        Returns
        -------
        dict of lists
            ``self.history``: per-epoch ``loss``, ``accuracy`` and, once validation data has been
            given, ``val_loss``, ``val_accuracy``. It grows across ``fit`` calls; all its lists
            have one entry per epoch trained (NaN where an epoch had no validation).

        Raises
        ------
        NonFiniteLossError
            (a FloatingPointError) when the loss becomes NaN or infinite; names epoch and batch.
        """
        self._require_compiled("fit")
        return training.fit(self, x, y, epochs=epochs, batch_size=batch_size, validation_data=validation_data,
                            shuffle=shuffle, seed=seed, callbacks=callbacks, verbose=verbose, augment=augment,
                            clip_grad_norm=clip_grad_norm, class_weight=class_weight, distributed=distributed)

    @with_single_threaded_blas
    def evaluate(self, x, y, batch_size=256):
        """Mean loss and accuracy over ``(x, y)`` in eval mode.

        Returns
        -------
        dict
            ``{"loss": float, "accuracy": float}`` (accuracy is NaN for outputs that are not
            class scores).
        """
        self._require_compiled("evaluate")
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        x = self.check_inputs(x, "x")
        targets, ids = self.check_targets(y, len(x), "y")
        return training.evaluate_batches(self, x, targets, ids, batch_size)

    @with_single_threaded_blas
    def predict(self, x, batch_size=256):
        """Outputs for ``x`` in eval mode, as class probabilities where the loss says how.

        With a softmax cross-entropy (on logits) loss, the softmax of the outputs; with a binary
        cross-entropy on logits, their sigmoid; otherwise (or before ``compile``) the raw outputs.

        Returns
        -------
        ndarray of shape (n, *output_shape)
        """
        out = self._predict_raw(x, batch_size)
        kind = self.output_activation
        if kind == "softmax" and out.ndim == 2:
            F.SOFTMAX.forward(out, out=out)
        elif kind == "sigmoid":
            F.ACTIVATIONS["sigmoid"].forward(out, out=out)  # never overflows for large |z|
        return out

    def predict_classes(self, x, batch_size=256):
        """Predicted class ids, shape ``(n,)`` (a threshold for a single output)."""
        out = self._predict_raw(x, batch_size)
        if out.ndim != 2:
            raise ValueError(f"predict_classes expects class scores of shape (n, k), the network outputs {out.shape}")
        if out.shape[1] == 1:
            return (out[:, 0] > training.class_threshold(self.loss)).astype(np.intp)
        return out.argmax(axis=1)

    def _predict_raw(self, x, batch_size):
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        x = self.check_inputs(x, "x", check_finite=False)
        n = len(x)
        out = np.empty((n,) + self.output_shape, dtype=self.dtype)
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            # Copy: the last layer may hand back a buffer it reuses on the next batch.
            out[lo:hi] = self.forward_checked(x[lo:hi], False)
        return out

    # ------------------------------------------------------------------ display ------------
    def summary(self, print_fn=print):
        """Print (with ``print_fn``; None to skip) and return a table of the layers.

        Columns: index, layer (with a fused activation shown), output shape, parameter count.
        """
        rows = [("#", "Layer", "Output shape", "Params")]
        rows.append(("", "Input", _shape_str(self.input_shape), ""))
        for i, (layer, shape) in enumerate(zip(self.layers, self.shapes)):
            rows.append((str(i), layer_label(layer), _shape_str(shape), f"{layer.num_params:,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]

        def fmt(r):
            return (f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}").rstrip()

        rule = "-" * len(fmt(tuple("x" * w for w in widths)))
        lines = [f"Network ({self.dtype.name})", rule, fmt(rows[0]), rule]
        lines += [fmt(r) for r in rows[1:]]
        lines += [rule, f"Total params: {self.num_params:,}", f"Output shape: {_shape_str(self.output_shape)}"]
        if self.compiled:
            lines.append(f"Loss: {self.loss!r}    Optimizer: {self.optimizer!r}")
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text

    def __repr__(self):
        body = "".join(f"\n  ({i}) {layer!r}," for i, layer in enumerate(self.layers))
        return f"Network(input_shape={self.input_shape}, dtype={self.dtype.name!r}, layers=[{body}\n])"

    def __len__(self):
        return len(self.layers)

    # ------------------------------------------------------------------ checks --------------
    def _require_compiled(self, what):
        if not self.compiled:
            raise RuntimeError(
                f"Network.{what}() needs a loss and an optimizer: call net.compile(loss, optimizer) first"
            )

    def check_inputs(self, x, name="x", check_finite=True):
        """``x`` as a contiguous array of the network dtype, shaped ``(n, *input_shape)``.

        Casts without a copy when ``x`` already is one; refuses (naming ``name``) a wrong shape,
        no samples, non-real values and, with ``check_finite``, NaN or inf.
        """
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except Exception:
                raise TypeError(f"Expected {name} to be a numpy array, received: {type(x).__name__}") from None
        if x.dtype.kind not in "biuf":
            raise TypeError(f"Expected {name} to hold real numbers, received: dtype={x.dtype}")
        expected = self.input_shape
        if x.shape[1:] != expected or x.ndim != len(expected) + 1:
            msg = f"Expected {name} of shape (n, {', '.join(map(str, expected))}), received: {x.shape}"
            if x.shape == expected:
                msg += f"; a single sample needs a batch axis: {name}[None]"
            elif len(expected) >= 2 and expected[0] == 1 and x.shape[1:] == expected[1:]:
                msg += f"; add the channel axis with {name}[:, None]"
            elif len(expected) == 3 and x.ndim == 4 and x.shape[1:] == expected[1:] + expected[:1]:
                msg += f"; channels-last input needs {name}.transpose(0, 3, 1, 2) (cnnx is NCHW)"
            raise ValueError(msg)
        if len(x) == 0:
            raise ValueError(f"Expected {name} to hold at least one sample, received: {x.shape}")
        cast = x.dtype != self.dtype
        # No copy when x is already a contiguous array of the network dtype. Values too large for
        # the dtype become inf here, which the finite check below reports (no cast warning).
        with np.errstate(over="ignore"):
            x = np.ascontiguousarray(x, dtype=self.dtype)
        if check_finite and not np.isfinite(x.sum(dtype=np.float64)):
            # The sum is one pass without a temporary; only a non-finite sum pays for the search.
            bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
            if len(bad):
                raise ValueError(
                    f"Expected {name} to be finite, received NaN or inf in {len(bad)} sample(s), the first at "
                    f"index {bad[0]}" + (f" (after the cast to {self.dtype.name})" if cast else "")
                )
        return x

    def check_targets(self, y, n, name="y"):
        """``(targets, ids)`` for ``n`` samples: targets as the loss takes them, class ids
        ``(n,)`` for accuracy (None when the outputs are not class scores)."""
        if not isinstance(y, np.ndarray):
            y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"Expected {name} to hold class ids or one-hot rows, received: dtype={y.dtype}")
        if y.ndim == 0 or len(y) != n:
            raise ValueError(f"Expected {name} to have {n} rows (one per sample), received: shape {y.shape}")
        out_shape = self.output_shape
        k = out_shape[0] if len(out_shape) == 1 else None
        if y.ndim == 1 and k is not None:
            if y.dtype.kind == "f":
                if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                    raise ValueError(
                        f"Expected {name} as integer class ids or one-hot rows of width {k}, received: "
                        f"non-integer values in a 1-D {y.dtype} array"
                    )
            lo, hi = (int(y.min()), int(y.max())) if len(y) else (0, 0)
            n_classes = max(k, 2)  # a single output is a binary classifier: ids 0 and 1
            if lo < 0 or hi >= n_classes:
                raise ValueError(
                    f"Expected {name} class ids in [0, {n_classes}) for a network with {k} output(s), "
                    f"received: values in [{lo}, {hi}]"
                )
            ids = np.ascontiguousarray(y, dtype=np.intp)
            if k == 1:
                # Binary targets go to the loss with pred's shape (n, 1).
                return np.ascontiguousarray(ids.reshape(n, 1), dtype=self.dtype), ids
            if self.loss is not None and self.loss.dense_targets:
                # MSE / binary cross-entropy compare element-wise: give them one-hot rows.
                rows = np.zeros((n, k), dtype=self.dtype)
                rows[np.arange(n), ids] = 1
                return rows, ids
            return ids, ids
        if y.shape[1:] == out_shape:
            targets = np.ascontiguousarray(y, dtype=self.dtype)
            if not np.isfinite(targets.sum(dtype=np.float64)):
                raise ValueError(f"Expected {name} to be finite, received NaN or inf")
            if k is None or not _are_class_rows(targets):
                # Regression targets (an autoencoder's images): accuracy means nothing, report NaN.
                return targets, None
            ids = (targets[:, 0] >= 0.5).astype(np.intp) if k == 1 else targets.argmax(axis=1)
            return targets, ids
        if k is not None:
            expected = f"(n,) class ids or (n, {k}) one-hot rows"
        else:
            expected = f"(n, {', '.join(map(str, out_shape))})"
        raise ValueError(f"Expected {name} of shape {expected}, received: {y.shape}")

    # ------------------------------------------------------------------ persistence (cnnx.io)
    def save(self, path):
        """Save architecture, weights, loss, optimizer state and history into directory ``path``
        (atomically); ``cnnx.load(path)`` rebuilds the network. See :func:`cnnx.io.save`."""
        from . import io  # lazily: io imports this module

        io.save(self, path)

    def save_weights(self, path):
        """Write parameters and buffers into one .npz file. See :func:`cnnx.io.save_weights`."""
        from . import io

        io.save_weights(self, path)

    def load_weights(self, path):
        """Load a :meth:`save_weights` file into this network, all or nothing. See
        :func:`cnnx.io.load_weights`."""
        from . import io

        io.load_weights(self, path)


# ---------------------------------------------------------------------- helpers --------------
def _are_class_rows(targets):
    """True for class targets given as rows: one-hot / probability rows summing to 1, or 0/1 labels
    of a single-output binary classifier."""
    if targets.shape[1] == 1:
        return bool(np.all((targets == 0) | (targets == 1)))
    return bool(np.all(targets >= 0)) and bool(np.allclose(targets.sum(axis=1), 1, atol=1e-3))


def _shape_str(shape):
    return str(tuple(shape))
