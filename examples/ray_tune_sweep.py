"""A learning-rate / batch-size search for LeNet-5 on Fashion-MNIST with Ray Tune, in your own code.

What ``cnnx tune SWEEP.json --engine ray`` does, written out: each trial trains with
``cnnx.tune.TuneReportCallback`` (a report and a checkpoint per epoch), starts with
``cnnx.tune.restore_or_build`` (so a trial Ray restarts after a crash continues from its last
epoch, exactly), and sizes its threads to the CPUs Ray gave it (``cnnx.tune.use_trial_cores``).
ASHA stops the poor trials after their first epochs.

Run from the repository root (``pip install "cnnx[ray]"``)::

    python examples/ray_tune_sweep.py --sample                     # the sample shipped with cnnx
    python examples/ray_tune_sweep.py --num-samples 16 --epochs 5  # full Fashion-MNIST
    python examples/ray_tune_sweep.py --address auto --storage /shared/ray-results   # on a cluster

On a cluster, ``--storage`` must be a directory every node sees (NFS) or a cloud URI, so that a
trial restarted on another node finds its checkpoints.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cnnx
from cnnx import datasets, preprocessing
from cnnx.tune import MODEL_DIR, TuneReportCallback, restore_or_build, use_trial_cores


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sample", action="store_true", help="use the Fashion-MNIST sample shipped with cnnx")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--num-samples", type=int, default=8, help="trials to draw")
    parser.add_argument("--cpus-per-trial", type=int, default=1, help="cores (and threads) of each trial")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (None: all)")
    parser.add_argument("--address", default=None,
                        help="a running Ray cluster ('auto' finds a local one; None: start Ray here)")
    parser.add_argument("--storage", default="runs/ray", help="where Ray keeps results and checkpoints")
    parser.add_argument("--out", default="runs/ray-best-lenet5", help="where the best model is saved")
    return parser.parse_args(argv)


def load_data(sample, limit):
    """Standardised (x, y), (x_val, y_val), (x_test, y_test) as float32 NCHW arrays."""
    (x, y), (x_test, y_test) = datasets.load_fashion_mnist(sample=sample)
    if limit:
        x, y = x[:limit], y[:limit]
    x, x_test = preprocessing.scale(x)[:, None], preprocessing.scale(x_test)[:, None]
    (x, y), (x_val, y_val) = preprocessing.train_val_split(x, y, val_fraction=0.2, seed=0)
    stats = preprocessing.Standardizer().fit(x)
    return (stats.transform(x), y), (stats.transform(x_val), y_val), (stats.transform(x_test), y_test)


def train_lenet5(config, data, epochs):
    """One trial: the trainable Ray Tune calls with a config drawn from the search space."""
    use_trial_cores()
    (x, y), (x_val, y_val) = data

    def build():
        net = cnnx.models.lenet5(seed=0)
        return net.compile("SoftmaxCrossEntropy", cnnx.optimizers.SGD(lr=config["lr"], momentum=config["momentum"]))

    net = restore_or_build(build)   # Ray's last checkpoint of this trial, if any
    net.fit(x, y, epochs=epochs - len(net.history["loss"]), batch_size=config["batch_size"], seed=0,
            validation_data=(x_val, y_val), verbose=0, callbacks=[TuneReportCallback()])


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    train, val, (x_test, y_test) = load_data(args.sample, args.limit)
    print(f"{len(train[0])} training, {len(val[0])} validation, {len(x_test)} test images")
    if not ray.is_initialized():
        ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)

    trainable = tune.with_parameters(train_lenet5, data=(train, val), epochs=args.epochs)  # data sent once
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": args.cpus_per_trial}),
        param_space={"lr": tune.loguniform(1e-2, 2e-1), "momentum": tune.choice([0.8, 0.9]),
                     "batch_size": tune.choice([32, 64, 128])},
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", num_samples=args.num_samples,
            scheduler=ASHAScheduler(time_attr="epoch", max_t=args.epochs, grace_period=1, reduction_factor=2)),
        run_config=tune.RunConfig(name="lenet5-asha", storage_path=str(Path(args.storage).resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=2)),
    )
    results = tuner.fit()

    print(f"{'lr':>8}  {'momentum':>8}  {'batch':>5}  {'epochs':>6}  {'val_accuracy':>12}")
    for result in sorted(results, key=lambda r: -r.metrics.get("val_accuracy", 0)):
        c, m = result.config, result.metrics
        print(f"{c['lr']:8.4f}  {c['momentum']:8.2f}  {c['batch_size']:5d}  {m.get('epoch', 0):6d}  "
              f"{m.get('val_accuracy', float('nan')):12.4f}")
    best = results.get_best_result()
    with best.checkpoint.as_directory() as directory:
        net = cnnx.load(Path(directory) / MODEL_DIR)
    test = net.evaluate(x_test, y_test)
    print(f"best trial: {best.config}, test accuracy {test['accuracy']:.4f}")
    net.save(args.out)
    print(f"saved the best model to {args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
