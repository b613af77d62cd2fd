"""Data-parallel fit over MPI against one process, on this machine: where does the time go?

    python benchmarks/mpi_data_parallel.py                  # one process, all cores
    mpiexec -n 2 python benchmarks/mpi_data_parallel.py     # two ranks (each its share of the cores)

Trains seed-mnist (806k parameters) for one epoch on 4096 images of the bundled Fashion-MNIST
sample with a global batch of 256 and prints images/s and, with MPI, the time spent in the
gradient Allreduce (one per step, over a flat float32 buffer of every gradient).
"""
import sys
import time


import cnnx
from cnnx import distributed


def main(argv):
    model = argv[0] if argv else "seed-mnist"
    size = 1
    try:
        from mpi4py import MPI

        size = MPI.COMM_WORLD.Get_size()
    except ImportError:
        pass
    sync = distributed.init() if size > 1 else None
    (x, y), _ = cnnx.datasets.load_fashion_mnist(sample=True)
    x = cnnx.preprocessing.scale(x[:4096])[:, None]
    y = y[:4096]
    net = cnnx.models.build(model, seed=0)
    net.compile("SoftmaxCrossEntropy", cnnx.optimizers.Adam(lr=1e-3))
    reduce_seconds = [0.0]
    if sync is not None:
        allreduce = sync.allreduce_gradients

        def timed():
            start = time.perf_counter()
            allreduce()
            reduce_seconds[0] += time.perf_counter() - start

        sync.allreduce_gradients = timed
    net.fit(x[:512], y[:512], epochs=1, batch_size=256, seed=0, verbose=0, distributed="mpi" if sync else None)  # warm-up
    reduce_seconds[0] = 0.0
    start = time.perf_counter()
    net.fit(x, y, epochs=1, batch_size=256, seed=0, verbose=0, distributed="mpi" if sync else None)
    seconds = time.perf_counter() - start
    if distributed.is_root():
        threads = cnnx.parallel.get_num_threads()
        print(f"{model}: {size} rank(s) x {threads} thread(s): {len(x) / seconds:.0f} images/s "
              f"({seconds:.2f} s/epoch, Allreduce {reduce_seconds[0]:.3f} s = "
              f"{100 * reduce_seconds[0] / seconds:.1f} %, {net.num_params * 4 / 1e6:.1f} MB per step)")


if __name__ == "__main__":
    main(sys.argv[1:])
