"""Run by tests/test_distributed.py under ``mpiexec -n R`` (or alone): a seeded data-parallel fit.

usage: python mpi_fit_script.py OUT_DIR EPOCHS [--kill-at EPOCH:BATCH] [--resume] [--single]

Trains LeNet-5 on the first 256 images of the bundled Fashion-MNIST sample with a global batch
of 64 (``--single``: in this process, without MPI). Rank 0 saves a checkpoint after every epoch
into OUT_DIR/checkpoint and the final weights into OUT_DIR/weights.npz; every rank writes its CPU
affinity and thread counts (``cnnx.workers.thread_counts``) into OUT_DIR/threads-rank<R>.json.
``--kill-at`` makes rank 0 SIGKILL itself at that (1-based) epoch and batch; ``--resume``
continues from OUT_DIR/checkpoint.
"""
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

import cnnx
import cnnx.workers
from cnnx import distributed


def main(argv):
    size = 1
    if "--single" not in argv:
        size = distributed.init().size  # first: joins the job and sizes this rank's thread pools
    out, epochs = Path(argv[0]), int(argv[1])
    kill_at = None
    if "--kill-at" in argv:
        kill_at = tuple(int(v) for v in argv[argv.index("--kill-at") + 1].split(":"))
    (x, y), _ = cnnx.datasets.load_fashion_mnist(sample=True)
    x = cnnx.preprocessing.scale(x[:256])[:, None]
    y = y[:256]
    checkpoint = out / "checkpoint"
    if "--resume" in argv:
        net = cnnx.load(checkpoint)
    else:
        net = cnnx.models.lenet5(seed=3)
        net.compile("SoftmaxCrossEntropy", cnnx.optimizers.SGD(lr=0.1, momentum=0.9))
    callbacks = [cnnx.ModelCheckpoint(str(checkpoint))]
    if kill_at is not None:
        def kill(batch, logs):
            epoch = len(net.history["loss"]) + 1  # 1-based epoch in progress
            if (epoch, batch + 1) == kill_at:
                print(f"rank {distributed.rank()} killing itself at epoch {epoch} batch {batch + 1}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        callbacks.append(cnnx.callbacks.LambdaCallback(on_batch_end=kill))
    remaining = epochs - len(net.history["loss"])
    net.fit(x, y, epochs=remaining, batch_size=64, seed=7, verbose=0, callbacks=callbacks,
            distributed="mpi" if size > 1 else None)
    report = {"rank": distributed.rank(), "ranks": size, "affinity": sorted(os.sched_getaffinity(0)),
              "threads": cnnx.workers.thread_counts()}
    (out / f"threads-rank{distributed.rank()}.json").write_text(json.dumps(report))
    if distributed.is_root():
        np.savez(out / "weights.npz", **net.get_weights())
        print(f"ranks {size}: loss {net.history['loss']} resumed_at_epoch {len(net.history['loss']) - remaining + 1}")


if __name__ == "__main__":
    main(sys.argv[1:])
