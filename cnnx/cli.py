"""The ``cnnx`` command: train, evaluate, predict with, summarise and explain zoo models.

This module owns the command line and nothing else: it turns arguments into calls of the public
API (datasets, preprocessing, models, Network, io, visualize) and turns the library's exceptions
into one-line ``cnnx: error: ...`` messages with a non-zero exit status, never a traceback.

A training run writes everything needed to reuse the model into one directory::

    runs/lenet5/
        (the saved network, as written by cnnx.io: loadable with cnnx.load(dir))
        (history.json, part of the saved network: per-epoch loss / accuracy, train and validation)
        preprocessing.json     dataset, class names, input shape, standardisation mean/std
        run.json               the run's settings, training time and test result (no history:
                               history.json is the one history file)
        curves.png             loss and accuracy curves        (when matplotlib is installed)
        confusion_matrix.png   on the test set                  (when matplotlib is installed)

``evaluate`` and ``predict`` read ``preprocessing.json`` so new inputs get exactly the scaling
and standardisation the network was trained with.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from .datasets import DATASET_NAMES, dataset_record, load_dataset
from .io import json_safe

__all__ = ["main", "build_parser", "CLIError"]

PREPROCESSING_FILE = "preprocessing.json"
HISTORY_FILE = "history.json"  # written by cnnx.save with the network
RUN_FILE = "run.json"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"

# Exit statuses: 2 for a command line argparse refuses, 1 for a run that failed, 130 for Ctrl-C
# (128 + SIGINT, what shells report for an interrupted program).
EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A problem with what the user asked for; printed as ``cnnx: error: <message>``."""


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (argparse's default prints the usage first)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _argument_type(convert, accept, expected):
    """An argparse ``type``: ``convert(text)``, refused (saying ``expected``) unless ``accept``s it."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, received: {text!r}")
        return value

    return parse


def _is_float_range(value):
    from .image_files import FLOAT_RANGES

    return value in FLOAT_RANGES


_positive_int = _argument_type(int, lambda v: v >= 1, "a positive integer")
_positive_float = _argument_type(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_float_range = _argument_type(int, _is_float_range, "1 or 255")
_fraction = _argument_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def build_parser():
    """The ``cnnx`` argument parser (subcommands train, evaluate, predict, summary, explain, export, tune)."""
    from . import version_text
    from .models import MODELS

    models = sorted(MODELS)
    dataset_help = (f"one of {', '.join(DATASET_NAMES)}, or a directory holding the four IDX files "
                    "(MNIST-style) or the CIFAR-10 python batches")

    parser = _Parser(
        prog="cnnx",
        description="Train and use convolutional networks on the CPU.",
        epilog="Run 'cnnx COMMAND --help' for a command's options.",
    )
    version = parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    # What _check_global_options accepts before the command (``commands`` fills as they are added).
    parser.global_options = ["-h", "--help", *version.option_strings]
    parser.commands = sub.choices

    threads = _Parser(add_help=False)
    threads.add_argument("--threads", type=_positive_int, metavar="N",
                         help="threads for the compiled kernels and BLAS (default: all cores, "
                              "or $CNNX_NUM_THREADS)")

    p = sub.add_parser("train", parents=[threads], help="train a zoo model on a dataset",
                       description="Train a zoo model, report its test accuracy and save it.")
    p.add_argument("--model", required=True, choices=models, help="zoo model to train")
    p.add_argument("--dataset", default="fashion-mnist", metavar="DATASET",
                   help=f"{dataset_help} (default: fashion-mnist)")
    p.add_argument("--epochs", type=_positive_int, default=3, help="passes over the training set (default: 3)")
    p.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help="batch size (default: the zoo's, e.g. 128 for lenet5)")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"),
                   help="update rule (default: the zoo's for the model, e.g. SGD momentum 0.9 for lenet5)")
    p.add_argument("--lr", type=_positive_float, metavar="LR",
                   help="learning rate (default: the zoo's for the model)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, split and shuffling (default: 0)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1, metavar="F",
                   help="share of the training set held out, stratified, for validation; 0 for none "
                        "(default: 0.1)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="floating type of the weights and the computation (default: float32)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory to save the model, preprocessing, history and plots in "
                        "(default: runs/MODEL-DATASET)")
    p.add_argument("--limit", type=_positive_int, metavar="N",
                   help="use only the first N training images (quick trials and tests)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one plain line per epoch instead (the default when "
                        "stderr is not a terminal, e.g. a log file)")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    _add_training_options(p)
    p.add_argument("--distributed", choices=("mpi",),
                   help="data-parallel training over the ranks of 'mpiexec -n R cnnx train ...': each "
                        "batch is split across them; only rank 0 prints and saves (needs cnnx[mpi])")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", parents=[threads], help="test loss and accuracy of a trained model",
                       description="Evaluate a model saved by 'cnnx train' on a test set.")
    p.add_argument("model_dir", metavar="DIR", help="directory written by 'cnnx train'")
    p.add_argument("--dataset", metavar="DATASET",
                   help=f"{dataset_help} (default: the one the model was trained on)")
    p.add_argument("--batch-size", type=_positive_int, default=256, metavar="B",
                   help="images per forward pass (default: 256)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="use only the first N test images")
    p.set_defaults(func=_cmd_evaluate)

    images = _Parser(add_help=False)
    images.add_argument("--float-range", type=_float_range, default=1, metavar="{1,255}",
                        help="the range of float images: 1 = values in [0, 1], used as they are; "
                             "255 = values in [0, 255], divided by 255. Values outside the range, "
                             "NaN and infinity are refused, never clipped. uint8 images are always "
                             "divided by 255 (default: 1)")

    p = sub.add_parser("predict", parents=[threads, images], help="classify images stored in a .npy file",
                       description="Classify images with a model saved by 'cnnx train'. The input "
                                   "is a .npy array of uint8 (0..255) or float (see --float-range) "
                                   "images of shape (n, 28, 28), (n, 1, 28, 28) or (n, 3, 32, 32) "
                                   "(whatever the model takes); the training preprocessing is applied.")
    p.add_argument("model_dir", metavar="DIR", help="directory written by 'cnnx train'")
    p.add_argument("input", metavar="INPUT.npy", help="images to classify")
    p.add_argument("--out", metavar="FILE",
                   help="write the class ids (int64 .npy) to exactly this path instead of printing "
                        "one class name per line")
    p.add_argument("--batch-size", type=_positive_int, default=256, metavar="B",
                   help="images per forward pass (default: 256)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("summary", help="print a model's layers, output shapes and parameter counts",
                       description="Print the summary table of a zoo model or of a saved model.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", choices=models, help="zoo model")
    group.add_argument("model_dir", nargs="?", metavar="DIR", help="directory of a saved model")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("explain", parents=[threads, images],
                       help="feature maps, occlusion and saliency maps of one image",
                       description="Write PNGs that show what a trained model looks at for one "
                                   "image: feature maps, an occlusion map and a saliency map.")
    p.add_argument("model_dir", metavar="DIR", help="directory written by 'cnnx train'")
    p.add_argument("--input", required=True, metavar="INPUT.npy", help="images (as for predict)")
    p.add_argument("--index", type=int, default=0, metavar="K",
                   help="which image of INPUT.npy, counted from 0; negative counts from the end "
                        "(-1 is the last) (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the PNGs")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("export", help="write a saved model as ONNX and/or a PyTorch-style state dict",
                       description="Export a model saved by 'cnnx train' (or Network.save): --onnx "
                                   "writes an ONNX model (needs the onnx package) computing what "
                                   "'cnnx predict' does after preprocessing (the preprocessing is "
                                   "stored in its metadata); --state-dict writes the weights under "
                                   "torch.nn.Sequential's keys as .npz.")
    p.add_argument("model_dir", metavar="DIR", help="directory of a saved model")
    p.add_argument("--onnx", metavar="FILE.onnx", help="write the ONNX model here")
    p.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--state-dict", metavar="FILE.npz", help="write the PyTorch-style state dict here")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("tune", help="run a hyper-parameter sweep (locally or on Ray Tune)",
                       description="Train the trials of a sweep file in parallel, print the table of "
                                   "trials, write it as trials.csv / trials.json and save the best "
                                   "trial's model in STORAGE/NAME/best (for 'cnnx evaluate').")
    p.add_argument("sweep_file", metavar="SWEEP.json", help="the sweep (see cnnx.sweep for its keys)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: processes on this machine; ray: Ray Tune (needs cnnx[ray]) (default: local)")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster to join (engine ray; default: start Ray here)")
    p.add_argument("--num-samples", type=_positive_int, default=1, metavar="N",
                   help="repeat the grid N times with fresh random draws (default: 1)")
    p.add_argument("--cpus-per-trial", type=_positive_int, default=1, metavar="K",
                   help="cores (and threads) each trial gets (default: 1)")
    p.add_argument("--scheduler", choices=("fifo", "asha"), default="fifo",
                   help="asha stops poor trials early (engine ray) (default: fifo)")
    p.add_argument("--max-failures", type=int, default=1, metavar="M",
                   help="restart a failed trial from its last checkpoint up to M times (default: 1)")
    p.add_argument("--storage", default="runs/sweeps", metavar="DIR",
                   help="results and checkpoints go to DIR/NAME (shared by all nodes on a cluster) "
                        "(default: runs/sweeps)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in DIR/NAME")
    p.set_defaults(func=_cmd_tune)
    return parser


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def _as_nchw_float(x, dtype):
    """uint8 images to [0, 1] floats; grey (n, h, w) images get their channel axis."""
    from . import preprocessing

    if x.dtype.kind == "f":
        # scale() returns float input of the right dtype as is; the in-place standardisation
        # that follows must never write into the caller's array.
        x = x.astype(dtype, copy=True)
    x = preprocessing.scale(x, dtype=dtype)
    if x.ndim == 3:
        x = preprocessing.add_channel_axis(x)
    return x


def _check_input_shape(net, x, what, model_name=None):
    """Clear error when images do not fit the network (before any work is done)."""
    expected = tuple(net.input_shape)
    received = tuple(x.shape[1:])
    if received != expected:
        name = f"model {model_name}" if model_name else "the model"
        hint = ""
        if model_name is not None:
            from . import models

            fitting = [m for m in sorted(models.MODELS)
                       if tuple(models.build(m, seed=0).input_shape) == received]
            hint = f" (models for such images: {', '.join(fitting)})" if fitting else ""
        raise CLIError(f"{name} takes images of shape {expected}, {what} has {received}{hint}")


# --------------------------------------------------------------------------------------------
# Saved runs
# --------------------------------------------------------------------------------------------
def _check_out_dir(out):
    """Refuse, before hours of training, an --out the save would refuse afterwards."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CLIError(f"--out {str(out)!r} is a non-empty directory that holds no saved cnnx "
                       "model; choose a new or empty directory")


def _load_run(model_dir):
    """Load a saved network and, when present, the preprocessing written by ``cnnx train``."""
    import cnnx

    path = Path(model_dir)
    if path.is_file():
        raise CLIError(f"{str(model_dir)!r} is a file; expected the directory written by 'cnnx train'")
    if not path.is_dir():
        raise CLIError(f"model directory {str(model_dir)!r} does not exist")
    net = cnnx.load(path)
    meta_path = path / PREPROCESSING_FILE
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("expected a JSON object")
        except ValueError as exc:
            raise CLIError(f"{meta_path}: unreadable ({exc})") from None
    return net, meta


def _ensure_compiled(net):
    # evaluate needs a loss; a network saved without its training setup gets the one cnnx
    # train uses (the optimizer is never stepped, any will do).
    if not net.compiled:
        from . import losses, optimizers

        net.compile(losses.SoftmaxCrossEntropy(), optimizers.SGD(lr=0.01))


def _preprocess(x, net, meta):
    x = _as_nchw_float(x, net.dtype)
    if meta is not None and meta.get("mean") is not None:
        from .preprocessing import Standardizer

        stats = Standardizer().set_state({"mean": meta["mean"], "std": meta["std"]})
        x = stats.transform(x, copy=False)
    return x


def _class_names(meta, n_outputs):
    names = (meta or {}).get("class_names")
    if isinstance(names, list) and len(names) == n_outputs:
        return [str(n) for n in names]
    return [str(i) for i in range(n_outputs)]


# --------------------------------------------------------------------------------------------
# Plots (optional: matplotlib and cnnx.visualize)
# --------------------------------------------------------------------------------------------
def _note(message):
    print(f"cnnx: note: {message}", file=sys.stderr)


def _visualize():
    """The ``cnnx.visualize`` module ready to draw into files, or None with a one-line note."""
    try:
        import matplotlib
    except ImportError:
        _note("matplotlib is not installed, so no plots were drawn (pip install 'cnnx[plot]')")
        return None
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # the command only writes files: never open a window
    from . import visualize

    return visualize


def _plot(visualize, name, path, *args, **kwargs):
    """Draw ``visualize.<name>(*args, path=path, **kwargs)`` into ``path``; True when written.

    A missing function or a failing plot is a note, not an error: by then the real work (the
    trained model, the prediction) is done and saved.
    """
    func = getattr(visualize, name)
    import matplotlib.pyplot as plt

    try:
        fig = func(*args, path=path, **kwargs)
    except (ValueError, TypeError, IndexError, OSError, RuntimeError) as exc:
        _note(f"could not draw {path} with visualize.{name}: {_one_line(exc)}")
        return False
    finally:
        plt.close("all")  # a long-lived process (tests, notebooks) must not collect figures
    print(f"wrote {path}")
    return fig is not None


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def _make_optimizer(model, name, lr):
    """The zoo's optimizer for ``model`` unless ``--optimizer`` / ``--lr`` say otherwise."""
    from . import optimizers
    from .models import default_optimizer

    default = default_optimizer(model)
    if name is None or type(default).__name__.lower() == name:
        if lr is not None:
            default.lr = lr
        return default
    if name == "sgd":
        return optimizers.SGD(lr=0.01 if lr is None else lr, momentum=0.9)
    return optimizers.get(name, lr=1e-3 if lr is None else lr)


def _stderr_is_terminal():
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _epoch_printer(epochs):
    """A callback printing one plain line per epoch, used when no progress bar is shown (the bar
    stays on screen with the epoch's final figures, so the two are never shown together)."""
    from .callbacks import Callback

    class EpochLine(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            parts = [f"epoch {epoch + 1}/{epochs}", f"loss {logs.get('loss', math.nan):.4f}",
                     f"accuracy {logs.get('accuracy', math.nan):.4f}"]
            if "val_loss" in logs:
                parts += [f"val_loss {logs['val_loss']:.4f}", f"val_accuracy {logs['val_accuracy']:.4f}"]
            parts.append(f"{time.perf_counter() - self.start:.1f} s")
            print("  ".join(parts), flush=True)

    return EpochLine()


def _cmd_train(args):
    import cnnx
    from . import losses, metrics, models, preprocessing

    model_name = args.model
    out = Path(args.out) if args.out else Path("runs") / f"{model_name}-{Path(args.dataset).name}"
    _check_out_dir(out)
    if args.distributed:
        from . import distributed

        distributed.init()  # join the MPI job, size this rank's threads
        distributed.quiet_unless_root()

    (x_train, y_train), (x_test, y_test), class_names = load_dataset(args.dataset)
    if args.limit is not None:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]

    cnnx.manual_seed(args.seed)
    net = models.build(model_name, seed=args.seed, dtype=args.dtype)
    x_train = _as_nchw_float(x_train, args.dtype)
    x_test = _as_nchw_float(x_test, args.dtype)
    _check_input_shape(net, x_train, f"dataset {args.dataset}", model_name)

    if args.val_fraction > 0:
        if len(x_train) < 2:
            raise CLIError(f"need at least 2 training images for a validation split, have {len(x_train)}")
        (x_train, y_train), (x_val, y_val) = preprocessing.train_val_split(
            x_train, y_train, val_fraction=args.val_fraction, seed=args.seed)
    else:
        x_val = y_val = None
    # Statistics from the training part only: no validation or test pixel leaks into them.
    # In place (copy=False): the images are already fresh float copies, and a second copy of
    # CIFAR-10's 600 MB training set is worth avoiding.
    stats = preprocessing.Standardizer().fit(x_train)
    for x in (x_train, x_val, x_test):
        if x is not None:
            stats.transform(x, copy=False)

    optimizer = _make_optimizer(model_name, args.optimizer, args.lr)
    batch_size = args.batch_size or models.DEFAULT_BATCH_SIZE.get(model_name, 128)
    extras = _training_extras(args, optimizer, net)
    net.compile(losses.SoftmaxCrossEntropy(label_smoothing=args.label_smoothing), optimizer)
    n_val = 0 if x_val is None else len(x_val)
    print(f"model {model_name} ({net.num_params:,} parameters), dataset {args.dataset}: "
          f"{len(x_train)} train / {n_val} validation / {len(x_test)} test images")
    print(f"optimizer {optimizer!r}, batch size {batch_size}, {args.epochs} epoch(s), "
          f"{_threads()} thread(s)", flush=True)
    for line in extras.pop("describe"):
        print(line, flush=True)

    # One record per epoch: on a terminal the tqdm bar, left on screen with the epoch's final
    # loss / accuracy / validation figures; elsewhere (log files, pipes, --no-progress) one plain line.
    show_bar = not args.no_progress and _stderr_is_terminal()
    start = time.perf_counter()
    net.fit(x_train, y_train, epochs=args.epochs, batch_size=batch_size,
            validation_data=None if x_val is None else (x_val, y_val), seed=args.seed,
            callbacks=([] if show_bar else [_epoch_printer(args.epochs)]) + extras.pop("callbacks"),
            verbose=1 if show_bar else 0, distributed=args.distributed, **extras)
    train_seconds = time.perf_counter() - start
    if args.distributed and not distributed.is_root():
        return 0  # rank 0 evaluates and saves

    test = net.evaluate(x_test, y_test)
    print(f"training time: {train_seconds:.1f} s ({train_seconds / args.epochs:.1f} s per epoch)")
    print(f"test loss: {test['loss']:.4f}")
    print(f"test accuracy: {test['accuracy']:.4f}")

    # cnnx.save writes the directory atomically (a new one replaces the old in one rename), so
    # our own files go in after it.
    cnnx.save(net, out)
    state = stats.get_state()
    meta = {
        "model": model_name,
        "dataset": dataset_record(args.dataset),
        "class_names": list(class_names),
        "input_shape": list(net.input_shape),
        "scale": "uint8 images divided by 255; float images must be in [0, 1] (predict and "
                 "explain: or in [0, 255] with --float-range 255, divided by 255)",
        "mean": np.atleast_1d(state["mean"]).tolist(),
        "std": np.atleast_1d(state["std"]).tolist(),
    }
    (out / PREPROCESSING_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    # The per-epoch history is in history.json, saved with the network: not repeated here.
    record = {
        "model": model_name, "dataset": meta["dataset"], "epochs": args.epochs,
        "batch_size": batch_size, "optimizer": repr(optimizer), "seed": args.seed,
        "train_seconds": train_seconds,
        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
    }
    (out / RUN_FILE).write_text(json.dumps(json_safe(record), indent=2) + "\n")
    print(f"saved model and preprocessing to {out}")

    visualize = None if args.no_plots else _visualize()
    if visualize is not None:
        _plot(visualize, "plot_history", out / CURVES_FILE, net.history,
              title=f"{model_name} on {args.dataset}")
        predicted = net.predict_classes(x_test)
        matrix = metrics.confusion_matrix(y_test, predicted, n_classes=len(class_names))
        _plot(visualize, "plot_confusion_matrix", out / CONFUSION_FILE, matrix,
              class_names=list(class_names), title=f"{model_name} on {args.dataset}: test set")
    return 0


def _add_training_options(p):
    """Options of 'cnnx train' for schedules, augmentation, logging and the training details."""
    p.add_argument("--lr-schedule", metavar="SPEC",
                   help="learning-rate schedule NAME[:key=value,...], with PyTorch's names and "
                        "arguments: cosine, step:step_size=10, multistep:milestones=10/20, "
                        "exponential:gamma=0.95, warmup:total_iters=5, onecycle, plateau:patience=3 "
                        "(cosine defaults to T_max=EPOCHS); saved with the model")
    p.add_argument("--augment", metavar="NAMES",
                   help="augment training batches: comma-separated crop, flip, translate, cutout "
                        "(e.g. crop,flip)")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write TensorBoard curves, histograms and filters to DIR "
                        "(needs tensorboardX: pip install 'cnnx[tensorboard]')")
    p.add_argument("--csv-log", metavar="FILE", help="write one CSV row of metrics per epoch to FILE")
    p.add_argument("--label-smoothing", type=_fraction, default=0.0, metavar="EPS",
                   help="label smoothing of the cross-entropy, as PyTorch's (default: 0)")
    p.add_argument("--clip-grad-norm", type=_positive_float, metavar="MAX",
                   help="clip the gradients' global L2 norm to MAX before each step")
    p.add_argument("--class-weight", choices=("balanced",),
                   help="weigh each class by n / (classes * its count) in the gradient")


def _training_extras(args, optimizer, net):
    """fit keyword arguments (and callbacks, and lines to print) from the training options."""
    from . import augment, callbacks, schedules

    describe, cbs = [], []
    if args.lr_schedule:
        try:
            schedule = schedules.from_spec(args.lr_schedule, optimizer, args.epochs)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"--lr-schedule {args.lr_schedule!r}: {exc}") from None
        describe.append(f"lr schedule {schedule!r}")
    aug = None
    if args.augment:
        if len(net.input_shape) != 3:
            raise CLIError(f"--augment needs image inputs, model takes {net.input_shape}")
        try:
            aug = augment.from_names(args.augment, image_size=net.input_shape[1])
        except ValueError as exc:
            raise CLIError(f"--augment {args.augment!r}: {exc}") from None
        describe.append(f"augmentation {aug!r}")
    if args.tensorboard:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise CLIError("--tensorboard needs tensorboardX: pip install 'cnnx[tensorboard]'") from None
        cbs.append(callbacks.TensorBoard(args.tensorboard))
        describe.append(f"TensorBoard logs in {args.tensorboard} (tensorboard --logdir {args.tensorboard})")
    if args.csv_log:
        cbs.append(callbacks.CSVLogger(args.csv_log))
    return {"augment": aug, "clip_grad_norm": args.clip_grad_norm, "class_weight": args.class_weight,
            "callbacks": cbs, "describe": describe}


def _threads():
    from . import parallel

    return parallel.get_num_threads()


def _cmd_tune(args):
    from . import sweep

    if args.max_failures < 0:
        raise CLIError(f"--max-failures must be >= 0, received: {args.max_failures}")
    spec = sweep.load_sweep(args.sweep_file)
    rows, best = sweep.run(spec, engine=args.engine, storage=args.storage, num_samples=args.num_samples,
                           cpus_per_trial=args.cpus_per_trial, scheduler=args.scheduler,
                           max_failures=args.max_failures, resume=args.resume, address=args.address)
    print(sweep.format_table(rows, spec))
    root = Path(args.storage) / spec["name"]
    print(f"wrote {root / 'trials.csv'} and {root / 'trials.json'}")
    if best is None:
        raise CLIError("no trial finished an epoch; nothing to save")
    print(f"best trial's model: {best} (cnnx evaluate {best})")
    if any(r["status"] == "UNFINISHED" for r in rows):
        print("cnnx: the sweep was interrupted; continue it with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if all(r["status"] != "ERROR" for r in rows) else EXIT_FAILURE


def _cmd_evaluate(args):
    net, meta = _load_run(args.model_dir)
    spec = args.dataset or (meta or {}).get("dataset")
    if spec is None:
        raise CLIError(f"{args.model_dir} records no dataset (no {PREPROCESSING_FILE}); pass --dataset")
    _, (x_test, y_test), _ = load_dataset(spec)
    if args.limit is not None:
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    x_test = _preprocess(x_test, net, meta)
    _check_input_shape(net, x_test, f"dataset {spec}")
    _ensure_compiled(net)
    result = net.evaluate(x_test, y_test, batch_size=args.batch_size)
    print(f"dataset {spec}: {len(x_test)} test images")
    print(f"test loss: {result['loss']:.4f}")
    print(f"test accuracy: {result['accuracy']:.4f}")
    return 0


def _load_images(path, net, float_range, what):
    """Images from a .npy file, shaped (n, *input_shape): see ``cnnx.image_files`` for the rules."""
    from .image_files import read_images

    return read_images(path, net.input_shape, float_range=float_range, what=what)


def _write_npy_exactly(path, array):
    """``np.save`` to exactly ``path`` (np.save would append '.npy' to a name without it), through
    a temporary file in the same folder, so a failed write never leaves half a file there."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"--out {str(path)!r}: expected a file path, received: a directory")
    if not path.parent.is_dir():
        raise CLIError(f"--out {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _cmd_predict(args):
    net, meta = _load_run(args.model_dir)
    x = _preprocess(_load_images(args.input, net, args.float_range, "input"), net, meta)
    classes = np.asarray(net.predict_classes(x, batch_size=args.batch_size), dtype=np.int64)
    if args.out:
        written = _write_npy_exactly(args.out, classes)
        print(f"wrote {len(classes)} class ids to {written}")
    else:
        names = _class_names(meta, net.output_shape[0] if len(net.output_shape) == 1 else 0)
        print("\n".join(names[c] if c < len(names) else str(c) for c in classes))
    return 0


def _cmd_summary(args):
    if args.model is not None:
        from . import models

        net = models.build(args.model, seed=0)
        print(f"model {args.model}")
    else:
        net, _ = _load_run(args.model_dir)
    net.summary()
    return 0


def _cmd_explain(args):
    net, meta = _load_run(args.model_dir)
    images = _load_images(args.input, net, args.float_range, "--input")
    n = len(images)
    if not -n <= args.index < n:
        raise CLIError(f"--index: expected an index in [{-n}, {n - 1}] ({n} image(s) in "
                       f"{args.input}; negative counts from the end), received: {args.index}")
    index = args.index % n  # Python's rule: -1 is the last image
    x = _preprocess(images[index:index + 1], net, meta)
    names = _class_names(meta, net.output_shape[0] if len(net.output_shape) == 1 else 0)
    _ensure_compiled(net)
    probs = net.predict(x)[0]
    target = int(np.argmax(probs))
    label = names[target] if target < len(names) else str(target)
    print(f"image {index}: predicted {label} (probability {probs[target]:.3f})")

    visualize = _visualize()
    if visualize is None:
        raise CLIError("explain draws PNGs and needs matplotlib (pip install 'cnnx[plot]')")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    # Feature maps of the convolution layers (image-shaped outputs), first two at most.
    convs = [i for i, (layer, shape) in enumerate(zip(net.layers, net.shapes))
             if "conv" in type(layer).__name__.lower() and len(shape) == 3][:2]
    for i in convs:
        written += _plot(visualize, "plot_feature_maps", out / f"feature_maps_layer{i}.png",
                         net, x, i, titles=[label])
    patch, stride = 4, 2  # a 4-pixel patch hides a stroke or a detail of a 28-32 pixel image
    heat = visualize.occlusion_map(net, x, target, patch=patch, stride=stride)[0]
    sal = visualize.saliency_map(net, x, target)[0]
    written += _plot(visualize, "plot_occlusion", out / "occlusion.png", x[0], heat,
                     patch=patch, stride=stride, title=f"Occlusion sensitivity for {label}")
    written += _plot(visualize, "plot_saliency", out / "saliency.png", x[0], sal,
                     title=f"Saliency for {label}")
    if not written:
        raise CLIError("no explanation could be drawn (see the notes above)")
    return 0


def _cmd_export(args):
    if not args.onnx and not args.state_dict:
        raise CLIError("nothing to export: give --onnx FILE.onnx and/or --state-dict FILE.npz")
    for flag, target in (("--onnx", args.onnx), ("--state-dict", args.state_dict)):
        if target and not Path(target).resolve().parent.is_dir():
            raise CLIError(f"{flag} {target!r}: the directory {str(Path(target).parent)!r} does not exist")
        if target and Path(target).is_dir():
            raise CLIError(f"{flag} {target!r} is a directory; expected a file name")
    net, meta = _load_run(args.model_dir)
    if args.onnx:
        try:
            from . import onnx as cnnx_onnx

            metadata = {"cnnx.preprocessing": json.dumps(json_safe(meta))} if meta else None
            cnnx_onnx.export(net, args.onnx, opset=args.opset, metadata=metadata)
        except ImportError as exc:
            raise CLIError(f"--onnx needs the onnx package (pip install 'cnnx[onnx]'): {exc}") from None
        except NotImplementedError as exc:
            raise CLIError(str(exc)) from None
        print(f"wrote {args.onnx} (ONNX opset {args.opset}, input (batch, {', '.join(map(str, net.input_shape))}))")
    if args.state_dict:
        from .state_dict import save_npz

        try:
            save_npz(net, args.state_dict)
        except NotImplementedError as exc:
            raise CLIError(str(exc)) from None
        print(f"wrote {args.state_dict} ({len(net.state_dict())} arrays, torch.nn.Sequential keys)")
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _one_line(exc):
    """An exception's message on one line (some, like the dataset search, span several)."""
    parts = [part.strip() for part in str(exc).splitlines() if part.strip()]
    if not parts:
        return type(exc).__name__
    text = parts[0]
    for part in parts[1:]:
        text += (" " if text.endswith(":") else "; ") + part
    return text


def _library_errors():
    """Exception types that mean 'the input or the files are wrong', not 'cnnx has a bug'."""
    from .io import ModelFormatError

    return (CLIError, ValueError, TypeError, OSError, pickle.UnpicklingError, ArithmeticError, ModelFormatError)


def _check_global_options(parser, argv):
    """Name an unknown option given before the command (argparse would only say that COMMAND is
    missing), and say which commands there are when none is given."""
    commands, known = parser.commands, parser.global_options
    expected = f"expected a command ({', '.join(commands)}) or --help / --version"
    for token in argv:
        if token in commands or token == "--":
            return
        if token.startswith("-"):
            if any(opt.startswith(token) for opt in known):  # argparse accepts unique prefixes
                return
            parser.error(f"unknown option {token!r}: {expected}")
        parser.error(f"unknown command {token!r}: {expected}")
    parser.error(f"no command given: {expected}")


def main(argv=None):
    """Run the ``cnnx`` command.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success, 1 when the run failed (missing data, bad model directory,
        shape mismatch), 2 for arguments argparse refuses, 130 when interrupted. Errors are
        one line on stderr; set ``CNNX_TRACEBACK=1`` to get the traceback instead.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _check_global_options(parser, argv)
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and argument errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if getattr(args, "threads", None) is not None:
            from . import parallel

            parallel.set_num_threads(args.threads)
        return args.func(args)
    except KeyboardInterrupt:
        print("\ncnnx: interrupted", file=sys.stderr)
        _abort_distributed(args, EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except _library_errors() as exc:
        if os.environ.get("CNNX_TRACEBACK"):  # for maintainers chasing where an error came from
            raise
        print(f"cnnx: error: {_one_line(exc)}", file=sys.stderr)
        _abort_distributed(args, EXIT_FAILURE)
        return EXIT_FAILURE


def _abort_distributed(args, status):
    """A rank that fails ends the whole MPI job: the others would wait for it forever."""
    if getattr(args, "distributed", None):
        from . import distributed

        distributed.abort(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
