"""Data-parallel training over MPI (mpi4py): ``fit(..., distributed="mpi")``.

This module owns everything MPI. ``Network.fit`` calls four hooks of the object
:func:`data_parallel` returns and otherwise runs its usual loop on this rank's share of each batch:

- ``begin_fit``: checks that every rank called ``fit`` alike, broadcasts rank 0's weights, agrees
  on a shuffling seed, sizes this rank's thread pools, and gives rank 0 the user's callbacks (the
  others run none, print nothing and save nothing);
- ``local_range``: the slice of a global batch this rank trains on (contiguous, sizes differ by
  at most one);
- ``allreduce_gradients``: after the backward pass, every gradient weighted by this rank's share
  of the batch, plus the BatchNorm running statistics weighted the same way, go into one flat
  buffer summed in place by a single ``Allreduce``; every rank then takes the same optimizer step,
  so the replicas stay equal without sending weights;
- ``sum_over_ranks`` / ``evaluate``: epoch metrics and validation, each rank doing its share.

The loss is a mean over the batch, so the weighted sum of the ranks' gradients is the gradient of
the whole global batch: with the same seed and global batch size, R ranks follow one process's
trajectory to float32 round-off (tests/test_distributed.py checks it). Not covered by that
equality: BatchNorm normalises each rank's part with that part's statistics (as PyTorch DDP does
without SyncBatchNorm), and Dropout draws its masks per rank.

Run with ``mpiexec -n R python script.py`` (or ``mpiexec -n R cnnx train ... --distributed mpi``).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .callbacks import Callback

__all__ = ["MPIDataParallel", "init", "data_parallel", "rank", "is_root", "quiet_unless_root", "abort"]

_ROOT = 0
_default = None


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            f"distributed='mpi' needs mpi4py and an MPI library ({exc}); install them with "
            "pip install 'cnnx[mpi]' and launch with mpiexec -n R ..."
        ) from None
    return MPI


def init():
    """Join the MPI job and size this rank's thread pools; call it at the top of the script.

    ``fit(..., distributed="mpi")`` calls it too, but thread limits set inside a Network call are
    undone when the call returns (cnnx runs BLAS single-threaded there), so a script whose own
    NumPy work should respect the rank's share calls ``init()`` before anything else.

    It also makes an uncaught exception on any rank end the whole job (``MPI_Abort``, as
    ``python -m mpi4py`` does): otherwise the other ranks would wait for it in the next
    ``Allreduce`` forever.

    Returns
    -------
    MPIDataParallel
        The process's synchroniser over ``MPI.COMM_WORLD`` (the same object on every call).
    """
    global _default
    if _default is None:
        _default = MPIDataParallel()
        if _default.size > 1:
            _abort_on_uncaught_exception()
    return _default


def abort(status=1):
    """End every rank of the job with ``status`` (a no-op without MPI or with a single rank)."""
    if _default is not None and _default.size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        _default.comm.Abort(status)


def _abort_on_uncaught_exception():
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)  # the traceback first, then the job ends
        abort(1)

    sys.excepthook = hook


def data_parallel(distributed):
    """The synchroniser for ``fit(..., distributed=...)``.

    Parameters
    ----------
    distributed : "mpi" or MPIDataParallel
        ``"mpi"``: MPI's world communicator (one object per process, reused across ``fit`` calls).

    Returns
    -------
    MPIDataParallel
    """
    if isinstance(distributed, MPIDataParallel):
        return distributed
    if distributed == "mpi":
        return init()
    raise ValueError(f"Expected distributed=None, 'mpi' or an MPIDataParallel, received: distributed={distributed!r}")


def rank():
    """This process's MPI rank, 0 when mpi4py is absent or the process was not started by mpiexec."""
    try:
        from mpi4py import MPI
    except ImportError:
        return 0
    return MPI.COMM_WORLD.Get_rank()


def is_root():
    """True on rank 0 (and in a process without MPI): the rank that prints, saves and reports."""
    return rank() == _ROOT


def quiet_unless_root():
    """Send this process's standard output to ``os.devnull`` unless it is rank 0 (errors still show)."""
    if not is_root():
        sys.stdout = open(os.devnull, "w")


class MPIDataParallel:
    """Synchronous data parallelism over an MPI communicator.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Communicator of the ranks that train together (default: ``MPI.COMM_WORLD``).

    Attributes
    ----------
    rank, size : int
        This process's rank and the number of ranks.
    threads : int
        Thread count this rank settled on: its share of the cores it shares with other ranks
        on the node (see ``_pin_threads``).
    """

    def __init__(self, comm=None):
        MPI = _mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._net = None
        self._share = 1.0
        self._flat = None
        self.threads = self._pin_threads()

    @property
    def is_root(self):
        return self.rank == _ROOT

    # ---------------------------------------------------------------- fit hooks ----
    def begin_fit(self, net, n, batch_size, shuffle, seed, callbacks, verbose):
        """Prepare this rank for a ``fit`` call; every rank must call it with the same arguments.

        Returns
        -------
        seed : int or None
            The shuffling seed all ranks use (rank 0 draws one when ``seed`` is None).
        callbacks : list of Callback
            Rank 0: the user's, then one that sends the stop flag; other ranks: one that receives it.
        verbose : int
            ``verbose`` on rank 0, 0 elsewhere.
        """
        per_batch = any(_overrides(cb, "on_batch_end") for cb in callbacks)
        mine = {"samples": n, "batch_size": batch_size, "shuffle": bool(shuffle), "seed": seed,
                "epochs_done": len(net.history.get("loss", ())), "parameters": net.num_params,
                "dtype": net.dtype.name, "batch_callbacks": per_batch}
        everyone = self.comm.allgather(mine)
        for key in mine:
            values = [entry[key] for entry in everyone]
            if any(v != values[0] for v in values):
                raise ValueError(
                    f"Expected every rank to call fit alike, received different {key} per rank: {values} "
                    "(run the same script with the same data on every rank)"
                )
        if batch_size < self.size:
            raise ValueError(f"Expected batch_size >= the number of ranks ({self.size}), received: "
                             f"batch_size={batch_size}")
        last = n % batch_size
        if 0 < last < self.size:
            raise ValueError(
                f"Expected every batch to hold at least one sample per rank, received: the last batch of "
                f"{n} samples with batch_size={batch_size} holds {last} for {self.size} ranks; "
                "choose a batch size that leaves no such remainder or trim the data"
            )
        if shuffle and seed is None:
            # One order for all: each rank must take its part of the same global batch.
            seed = self.comm.bcast(int(np.random.SeedSequence().entropy % (1 << 63)) if self.is_root else None,
                                   root=_ROOT)
        self._net = net
        self._flat = None
        self.broadcast_weights(net)
        if self.is_root:
            return seed, list(callbacks) + [_StopFlagLeader(self, per_batch)], verbose
        return seed, [_StopFlagFollower(self, per_batch)], 0

    def local_range(self, lo, hi):
        """This rank's part ``[start, end)`` of the global batch ``[lo, hi)``."""
        m = hi - lo
        start = lo + m * self.rank // self.size
        end = lo + m * (self.rank + 1) // self.size
        self._share = (end - start) / m
        return start, end

    def allreduce_gradients(self):
        """Replace every gradient (and BatchNorm buffer) by the batch-weighted sum over ranks."""
        arrays = self._synced_arrays()
        flat = self._flat
        if flat is None or flat.size != sum(a.size for a in arrays):
            flat = self._flat = np.empty(sum(a.size for a in arrays), dtype=self._net.dtype)
        offset = 0
        for a in arrays:
            np.multiply(a.reshape(-1), self._share, out=flat[offset:offset + a.size])
            offset += a.size
        self.comm.Allreduce(self._MPI.IN_PLACE, flat, op=self._MPI.SUM)
        offset = 0
        for a in arrays:
            a.reshape(-1)[...] = flat[offset:offset + a.size]
            offset += a.size

    def sum_over_ranks(self, *values):
        """Sum each number over the ranks (float64); returns a tuple in the same order."""
        local = np.array(values, dtype=np.float64)
        total = np.empty_like(local)
        self.comm.Allreduce(local, total, op=self._MPI.SUM)
        return tuple(float(v) for v in total)

    def evaluate(self, x, targets, ids, batch_size):
        """Validation metrics of the whole set, each rank evaluating a contiguous share of it."""
        n = len(x)
        lo, hi = n * self.rank // self.size, n * (self.rank + 1) // self.size
        loss_sum = correct = 0.0
        if hi > lo:
            part = self._net._evaluate(x[lo:hi], targets[lo:hi], None if ids is None else ids[lo:hi], batch_size)
            loss_sum = part["loss"] * (hi - lo)
            correct = 0.0 if ids is None else part["accuracy"] * (hi - lo)
        loss_sum, correct = self.sum_over_ranks(loss_sum, correct)
        return {"loss": loss_sum / n, "accuracy": correct / n if ids is not None else float("nan")}

    # ---------------------------------------------------------------- helpers ----
    def broadcast_weights(self, net):
        """Copy rank 0's parameters and buffers into every rank's network."""
        arrays = [p for _, p, _ in net.parameters()] + [b for _, b in net.buffers()]
        for a in arrays:
            if not a.flags.c_contiguous:
                raise ValueError("Expected C-contiguous parameters to broadcast")
            self.comm.Bcast(a, root=_ROOT)

    def _synced_arrays(self):
        net = self._net
        grads = [g for _, _, g in net.parameters() if g is not None]
        buffers = [b for _, b in net.buffers() if b.dtype.kind == "f"]
        return grads + buffers

    def _pin_threads(self):
        """Give this rank its share of the cores it shares with other ranks on the node.

        A rank bound to its own core(s) (Open MPI's default when cores suffice) keeps them all;
        unbound ranks (``--bind-to none``, ``--oversubscribe``) split the cores they all see.
        The count is only ever lowered: an explicit, smaller ``--threads`` stays.
        """
        from . import parallel, workers

        try:
            cores = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = set(range(os.cpu_count() or 1))
        node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED)
        try:
            sharing = sum(1 for other in node.allgather(sorted(cores)) if cores & set(other))
        finally:
            node.Free()
        share = max(1, len(cores) // max(1, sharing))
        return workers.use_cores(min(share, parallel.get_num_threads()))

    def __repr__(self):
        return f"MPIDataParallel(rank={self.rank}, size={self.size})"


def _overrides(callback, hook):
    """True when ``callback`` does something in ``hook`` (a subclass method or a LambdaCallback function)."""
    fn = getattr(callback, hook, None)
    return getattr(fn, "__func__", fn) is not getattr(Callback, hook)


class _StopFlagLeader(Callback):
    """Rank 0, after the user's callbacks: tells the other ranks whether training stops, and at each
    epoch's end sends its weights, so round-off in a reduction can never let the replicas drift."""

    def __init__(self, sync, per_batch):
        self.sync = sync
        self.per_batch = per_batch

    def on_batch_end(self, batch, logs=None):
        if self.per_batch:
            self.sync.comm.bcast(bool(self.network.stop_training), root=_ROOT)

    def on_epoch_end(self, epoch, logs=None):
        self.sync.comm.bcast(bool(self.network.stop_training), root=_ROOT)
        self.sync.broadcast_weights(self.network)


class _StopFlagFollower(Callback):
    """Every other rank: receives rank 0's stop flag (and weights) where the leader sends them."""

    def __init__(self, sync, per_batch):
        self.sync = sync
        self.per_batch = per_batch

    def on_batch_end(self, batch, logs=None):
        if self.per_batch:
            self.network.stop_training = self.sync.comm.bcast(None, root=_ROOT)

    def on_epoch_end(self, epoch, logs=None):
        self.network.stop_training = self.sync.comm.bcast(None, root=_ROOT)
        self.sync.broadcast_weights(self.network)
