"""Saving and loading networks: a directory a user can trust, written atomically.

This module owns the on-disk format. ``save(net, path)`` writes a directory::

    path/
        config.json            format_version, cnnx version, input_shape, dtype, layers (class +
                               get_config()), loss and optimizer (class + get_config()), and the
                               size and SHA-256 of every other file; written last
        layers/03_dense.npz    one per layer that has parameters or buffers (position + class)
        optimizer.npz          optimizer.state_dict(), when the network is compiled
        history.json           net.history (NaN written as null, so the file is standard JSON)

Keys inside a layer file are the names from ``layer.named_parameters()`` (``"weight"``,
``"block.0.weight"``) and, for non-trainable state from ``layer.named_buffers()``, the name
prefixed with ``"buffer:"`` (``"buffer:running_mean"``). ``save_weights`` writes a single .npz
keyed like ``Network.parameters()``: ``"3.weight"``, and ``"3.buffer:running_mean"`` for buffers.

Loading is all-or-nothing and spends memory only on what has been checked:

* a file is read only if it is a regular file of the size recorded in config.json (never a
  device or FIFO, never more bytes than recorded), then its SHA-256 is compared;
* an .npz is read header first (``_Npz``): each member's shape and dtype, never pickle;
* a layer is built only if ``config.json`` names one of cnnx's layers or a class registered
  with ``cnnx.register_layer``, and within the number of values its file holds
  (``cnnx.layers.base.state_budget``), so an edited config cannot make it allocate gigabytes;
* every array header is compared with the rebuilt network (keys, shapes, dtypes in either byte
  order) before its values are read, and every value (finite; running variances >= 0, unless
  ``allow_nonfinite``) before a single one is assigned.

Whatever is wrong -- a missing or truncated file, bad JSON, an unknown layer class, a format newer
than this cnnx -- raises :class:`ModelFormatError` naming the file (and the key).

Atomic saving. A save never destroys the previous checkpoint before the new one is complete,
and never deletes what cnnx did not write:

0. the lock file ``<name>.cnnx-lock`` beside ``path`` is taken (``flock``; a concurrent save to
   the same path waits for it), and ``path`` and ``<name>.bak`` are checked to hold only the
   files a save writes (otherwise ``FileExistsError``, nothing touched);
1. stale ``<name>.tmp-<pid>-*`` directories beside ``path`` left by dead processes are removed;
2. everything is written into a fresh ``<name>.tmp-<pid>-<hex>/`` in the same parent directory
   (so renames are atomic), ``config.json`` last; each file and directory is fsynced;
3. if ``path`` holds a complete checkpoint, the stale ``<name>.bak`` is removed and ``path`` is
   renamed to ``<name>.bak``;
4. the temporary directory is renamed to ``path`` (the parent directory is fsynced after each
   rename), then ``<name>.bak`` is removed, and the lock file deleted and released.

A directory counts as complete when it has ``config.json``; since that file is written last and
only after every other file is on disk, a complete directory is a whole checkpoint. ``load``
reads ``path`` and falls back to ``<name>.bak`` when ``path`` is missing or incomplete, so at every
moment of a save -- the process may be killed anywhere -- one of the two names holds a complete
checkpoint. Saves to one path from several processes take turns on the lock; loads take no
lock (a load racing a save may fail with ModelFormatError and can be retried).
"""
from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import math
import numbers
import os
import re
import secrets
import shutil
import stat
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .layers.base import layer_to_config

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

__all__ = ["ModelFormatError", "NpyVersionError", "save", "load", "save_weights", "load_weights", "json_safe",
           "read_npy_header", "FORMAT_VERSION"]

#: The format version this module writes; it reads every version up to this one.
FORMAT_VERSION = 1

_FORMAT_NAME = "cnnx.Network"
_CONFIG = "config.json"
_HISTORY = "history.json"
_OPTIMIZER = "optimizer.npz"
_BUFFER_PREFIX = "buffer:"
_TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]+$")
_LOCK_SUFFIX = ".cnnx-lock"
_SAVE_FILES = {_CONFIG, _HISTORY, _OPTIMIZER}
_LAYER_FILE_RE = re.compile(r"\d+_\w+\.npz")
_BUILD_SLACK_VALUES = 2**16  # what a layer may allocate beyond its file's values while it is built
_MAX_OPTIMIZER_ENTRY_BYTES = 2**20  # "step", "lr_schedule" (JSON as uint8): far below this
_MAX_JSON_BYTES = 64 * 2**20  # config.json of a very deep network is well under a megabyte
_MAX_INT_DIGITS = 40  # longer integer literals in a JSON file are refused (see _HugeInt)


class ModelFormatError(ValueError):
    """A saved network or weights file cannot be read: missing, truncated, corrupted, or
    inconsistent with the network it describes. The message names the file and, where one is
    at fault, the key."""


# ============================================================================ public API ======
def save(net, path, *, lock_timeout=60.0):
    """Save ``net`` (architecture, weights, loss, optimizer state, history) into directory ``path``.

    The write is atomic (see the module docstring): if the process dies during the save,
    :func:`load` still finds either the previous checkpoint or the new one, never a mix.

    Parameters
    ----------
    net : Network
    path : str or os.PathLike
        The directory to write; its parent directories are created. An existing checkpoint there
        is replaced. A directory holding anything cnnx.save does not write is left alone.
    lock_timeout : float, default 60.0
        Saves to one path are serialised by the lock file ``<path>.cnnx-lock`` beside it: a save
        waits up to this many seconds for another process's save to the same path to finish.

    Raises
    ------
    FileExistsError
        If ``path`` (or ``<path>.bak``) is a file, or a directory holding files or folders that
        cnnx.save did not write; nothing is deleted.
    TimeoutError
        If another process kept saving to ``path`` for longer than ``lock_timeout``.
    ValueError
        If a layer class is not registered (see :func:`cnnx.register_layer`), or a layer, loss
        or optimizer config is not JSON-serialisable.
    """
    from . import __version__

    path = _as_path(path)
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, numbers.Real) or not lock_timeout >= 0:
        raise ValueError(f"Expected lock_timeout to be a number of seconds >= 0, received: lock_timeout={lock_timeout!r}")
    _check_registered(net)

    # Serialise everything in memory first: a config that cannot be written fails before any
    # file is touched.
    files = {}  # relative name -> bytes, written in this order; config.json comes last
    layer_entries = []
    width = max(2, len(str(len(net.layers) - 1)))
    for i, layer in enumerate(net.layers):
        arrays = _layer_arrays(layer)
        name = _layer_file(i, layer, width) if arrays else None
        if arrays:
            files[name] = _npz_bytes(arrays)
        layer_entries.append({**layer_to_config(layer), "file": name})
    config = {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "cnnx_version": __version__,
        "input_shape": list(net.input_shape),
        "dtype": np.dtype(net.dtype).name,
        "layers": layer_entries,
        "loss": None,
        "optimizer": None,
        "history": _HISTORY,
    }
    if net.loss is not None:
        config["loss"] = {"class": type(net.loss).__name__, "config": net.loss.get_config()}
    if net.optimizer is not None:
        files[_OPTIMIZER] = _npz_bytes(net.optimizer.state_dict())
        config["optimizer"] = {
            "class": type(net.optimizer).__name__,
            "config": net.optimizer.get_config(),
            "file": _OPTIMIZER,
        }
    files[_HISTORY] = _json_bytes(json_safe(net.history), "history")
    config["files"] = {
        name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
    }
    config_bytes = _json_bytes(config, "config")

    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _save_lock(path, lock_timeout):
        # Checked under the lock: what a save may delete is what cnnx wrote there, nothing else.
        for target in (path, _backup_path(path)):
            _check_replaceable(target, path)
        _remove_stale_temporaries(path)
        tmp = parent / f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            (tmp / "layers").mkdir()
            for name, data in files.items():
                _write_durable(tmp / name, data)
            _fsync_dir(tmp / "layers")
            _write_durable(tmp / _CONFIG, config_bytes)  # last: its presence marks the dir complete
            _fsync_dir(tmp)
            _swap_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def load(path, *, allow_nonfinite=False):
    """Rebuild a network saved with :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
        The directory given to ``save``. When it is missing or incomplete (a save was
        interrupted), the previous checkpoint ``<path>.bak`` is read instead.
    allow_nonfinite : bool, default False
        By default a parameter, buffer or optimizer array holding NaN or infinity, or a
        BatchNorm running variance below zero, is refused (such a network predicts NaN).
        True loads the values as they are, e.g. to inspect a run that diverged.

    Returns
    -------
    Network
        With the saved weights and history, compiled with the saved loss and optimizer (and the
        optimizer's state) when they were saved, so ``fit`` continues exactly where it stopped.

    Raises
    ------
    ModelFormatError
        If the save is missing, truncated, corrupted or inconsistent; nothing is half-loaded.
    """
    path = _as_path(path)
    allow_nonfinite = _check_flag(allow_nonfinite, "allow_nonfinite")
    root = path
    if not (path / _CONFIG).is_file():
        backup = _backup_path(path)
        if (backup / _CONFIG).is_file():
            root = backup
        elif path.is_file():
            raise ModelFormatError(
                f"{path}: expected a directory written by cnnx.save, received a file "
                "(use cnnx.io.load_weights for a weights file)"
            )
        elif path.is_dir():
            raise ModelFormatError(f"{path / _CONFIG}: missing; {path} is not a complete cnnx save")
        else:
            raise ModelFormatError(f"{path}: no such directory (and no backup {backup.name})")
    return _load_dir(root, allow_nonfinite)


def save_weights(net, path):
    """Write every parameter and buffer of ``net`` into one .npz file, atomically.

    Keys are ``"<layer index>.<name>"`` as in ``net.parameters()`` (``"3.weight"``) and
    ``"<layer index>.buffer:<name>"`` for buffers. The file is written exactly at ``path`` (no
    suffix is added).
    """
    path = _as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    data = _npz_bytes(_network_arrays(net))
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write_durable(tmp, data)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one
        _fsync_dir(path.parent)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def load_weights(net, path, *, allow_nonfinite=False):
    """Load a file written by :func:`save_weights` into ``net``, all or nothing.

    Every key, shape and dtype is checked against ``net`` from the array headers, before any
    array is read, and every value before any is copied, so on error ``net`` is unchanged.
    Arrays are copied into the existing ones, so references held elsewhere (an optimizer's)
    stay valid. Big-endian arrays are converted to the native byte order.

    Parameters
    ----------
    net : Network
    path : str or os.PathLike
    allow_nonfinite : bool, default False
        As in :func:`load`: True accepts NaN/infinite values and negative running variances.

    Raises
    ------
    ModelFormatError
        Missing or unreadable file, missing or unexpected keys, wrong shape or dtype,
        non-finite values.
    """
    path = _as_path(path)
    allow_nonfinite = _check_flag(allow_nonfinite, "allow_nonfinite")
    targets = _network_targets(net)
    # An honest file is the arrays plus a few hundred bytes of zip and .npy headers per key.
    limit = 2 * sum(t.nbytes for t in targets.values()) + 4096 * (len(targets) + 1)
    try:
        data = _read_regular_file(path, limit=limit)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot be read ({exc})") from None
    npz = _Npz(data, path)
    _check_headers(npz.headers, targets, path)
    arrays = {key: npz.read(key) for key in targets}
    if not allow_nonfinite:
        _check_values(arrays, path)
    _assign(arrays, targets)


# ============================================================================ loading ========
def _load_dir(root, allow_nonfinite):
    from .losses import LOSSES
    from .network import Network
    from .optimizers import OPTIMIZERS

    config_file = root / _CONFIG
    config = _read_json(config_file)
    _check_config(config, config_file)
    files = config["files"]

    # 1. The layer entries and the files they name, checked before any class is looked up.
    entries = config["layers"]
    width = max(2, len(str(len(entries) - 1)))
    layer_files = []
    for i, entry in enumerate(entries):
        where = f"{config_file}: layers[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str) or not isinstance(
            entry.get("config"), dict
        ):
            raise ModelFormatError(f"{where}: expected {{'class': str, 'config': dict, 'file': ...}}, received: {entry!r:.200}")
        name = entry.get("file")
        expected = f"layers/{i:0{width}d}_{entry['class'].lower()}.npz"
        if name is not None and name != expected:
            raise ModelFormatError(f"{where} 'file': expected {expected!r} or None, received: {name!r:.200}")
        layer_files.append(name)
    expected_files = {name for name in layer_files if name is not None} | {_HISTORY}
    if config["history"] != _HISTORY:
        raise ModelFormatError(f"{config_file}: 'history': expected {_HISTORY!r}, received: {config['history']!r:.200}")
    opt_entry = config["optimizer"]
    if opt_entry is not None:
        if not isinstance(opt_entry, dict) or opt_entry.get("file") != _OPTIMIZER:
            raise ModelFormatError(
                f"{config_file}: 'optimizer': expected {{'class': str, 'config': dict, 'file': {_OPTIMIZER!r}}}, "
                f"received: {opt_entry!r:.200}"
            )
        expected_files.add(_OPTIMIZER)
    if set(files) != expected_files:
        raise ModelFormatError(
            f"{config_file}: 'files': expected entries {sorted(expected_files)}, received: {sorted(files)}"
        )

    # 2. Every layer file read (size and checksum checked) and its array headers parsed: what
    #    the layers may allocate is known before any is built.
    archives = [None if name is None else _Npz(_read_checked(root, name, files[name]), root / name)
                for name in layer_files]

    # 3. Build each layer within the number of values its file holds, then compare exactly.
    layers = []
    for i, (entry, npz) in enumerate(zip(entries, archives)):
        layer = _build_layer(entry, f"{config_file}: layers[{i}]", npz)
        has_state = bool(_expected_layer_keys(layer))
        if has_state != (npz is not None):
            expected = _layer_file(i, layer, width) if has_state else None
            raise ModelFormatError(
                f"{config_file}: layers[{i}] 'file': expected {expected!r}, received: {layer_files[i]!r}"
            )
        if npz is not None:
            # Keys and shapes now; dtypes once the network has cast the layers to its dtype.
            _check_headers(npz.headers, _expected_layer_keys(layer), npz.file, dtypes=False)
        layers.append(layer)

    try:
        net = Network(layers, tuple(config["input_shape"]), dtype=config["dtype"])
    except Exception as exc:  # whatever a layer's output_shape raises on a doctored config
        raise ModelFormatError(f"{config_file}: the layers do not form a network: {exc}") from None
    # Network casts the layers to its dtype: compare the headers once more, dtypes included.
    for i, npz in enumerate(archives):
        if npz is not None:
            _check_headers(npz.headers, _expected_layer_keys(layers[i]), npz.file)

    loss = optimizer = None
    if config["loss"] is not None:
        loss = _build_from_registry(config["loss"], LOSSES, "loss", config_file)
    if opt_entry is not None:
        optimizer = _build_from_registry(opt_entry, OPTIMIZERS, "optimizer", config_file)

    # 4. Read and check every array before assigning any.
    arrays = {}
    for i, npz in enumerate(archives):
        if npz is None:
            continue
        layer_arrays = {key: npz.read(key) for key in npz.headers}
        archives[i] = None  # the file's bytes are no longer needed: peak memory ~ model + 1 file
        if not allow_nonfinite:
            _check_values(layer_arrays, npz.file)
        arrays.update((f"{i}.{key}", a) for key, a in layer_arrays.items())
    history = _history_from_json(_read_json(root / _HISTORY, _read_checked(root, _HISTORY, files[_HISTORY])),
                                 root / _HISTORY)
    if optimizer is not None:
        state = _read_optimizer_state(root, files[_OPTIMIZER], net, allow_nonfinite)
        try:
            optimizer.load_state_dict(state, params=net.parameters())
        except Exception as exc:
            raise ModelFormatError(f"{root / _OPTIMIZER}: {exc}") from None

    # Everything is valid: assign (copying into the arrays the layers own) and compile.
    _assign(arrays, _network_targets(net))
    net.history = history
    if loss is not None and optimizer is not None:
        net.compile(loss, optimizer)
    else:
        net.loss, net.optimizer = loss, optimizer
    return net


def _read_optimizer_state(root, entry, net, allow_nonfinite):
    """The arrays of optimizer.npz, each header checked against the network's parameters first."""
    file = root / _OPTIMIZER
    npz = _Npz(_read_checked(root, _OPTIMIZER, entry), file)
    params = {key: p for key, p, _ in net.parameters()}
    for key, (shape, dtype) in npz.headers.items():
        if dtype.kind not in "fiu":
            raise ModelFormatError(f"{file}: key {key!r}: expected a numeric array, received: dtype={dtype.str}")
        if dtype.kind == "f" and dtype.newbyteorder("=") != net.dtype:
            raise ModelFormatError(
                f"{file}: key {key!r}: expected dtype {net.dtype.name}, received: {dtype.str!r}"
            )
        if "/" not in key:
            # Optimizer-wide entries ("step", a schedule's "lr_schedule" record) are small; the
            # optimizer validates their contents.
            n_bytes = math.prod(shape) * dtype.itemsize
            if n_bytes > _MAX_OPTIMIZER_ENTRY_BYTES:
                raise ModelFormatError(
                    f"{file}: key {key!r}: expected an optimizer-wide entry of at most "
                    f"{_MAX_OPTIMIZER_ENTRY_BYTES} bytes, received: shape {shape} of {dtype.str!r} ({n_bytes} bytes)"
                )
            continue
        param = params.get(key.partition("/")[2])
        if param is None:
            raise ModelFormatError(
                f"{file}: key {key!r}: expected '<state>/<parameter key>' naming a parameter of the "
                f"network, received: {key!r}"
            )
        allowed = [(), param.shape]  # per-parameter counts are scalars, moments as the parameter
        if shape not in allowed:
            raise ModelFormatError(f"{file}: key {key!r}: expected shape {allowed[-1]}, received: {shape}")
    state = {key: npz.read(key) for key in npz.headers}
    if not allow_nonfinite:
        _check_values(state, file)
    return state


def _check_config(config, file):
    if not isinstance(config, dict):
        raise ModelFormatError(f"{file}: expected a JSON object, received: {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFormatError(f"{file}: key 'format_version': expected a positive int, received: {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFormatError(
            f"{file}: key 'format_version': this save has format version {version}, written by cnnx "
            f"{config.get('cnnx_version', '?')}; this cnnx reads versions up to {FORMAT_VERSION}: upgrade cnnx"
        )
    if config.get("format") != _FORMAT_NAME:
        raise ModelFormatError(f"{file}: key 'format': expected {_FORMAT_NAME!r}, received: {config.get('format')!r}")
    required = {
        "input_shape": list, "dtype": str, "layers": list, "history": str, "files": dict,
    }
    for key, kind in required.items():
        if not isinstance(config.get(key), kind):
            raise ModelFormatError(
                f"{file}: key {key!r}: expected a JSON {kind.__name__}, received: {config.get(key)!r:.200}"
            )
    for key in ("loss", "optimizer"):
        if key not in config:
            raise ModelFormatError(f"{file}: key {key!r}: missing")
    if not config["layers"]:
        raise ModelFormatError(f"{file}: key 'layers': expected at least one layer, received: []")
    shape = config["input_shape"]
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ModelFormatError(f"{file}: key 'input_shape': expected a list of positive ints, received: {shape!r}")
    if config["dtype"] not in ("float32", "float64"):
        raise ModelFormatError(f"{file}: key 'dtype': expected 'float32' or 'float64', received: {config['dtype']!r}")
    for name, entry in config["files"].items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("bytes"), int) or isinstance(entry["bytes"], bool)
                or entry["bytes"] < 0):
            raise ModelFormatError(
                f"{file}: key 'files' / {name!r}: expected {{'bytes': int, 'sha256': str}}, received: {entry!r:.200}"
            )


def _build_layer(entry, where, npz):
    """Build the layer ``entry`` names, allocating at most what its file ``npz`` holds."""
    from .layers.base import StateSizeError, layer_class, state_budget

    name = entry["class"]
    try:
        cls = layer_class(name)
    except ValueError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None
    budget = 0 if npz is None else sum(math.prod(shape) for shape, _ in npz.headers.values())
    try:
        # A little slack, so that a small mismatch reaches the exact per-key comparison (whose
        # message names the key) while a config asking for millions of values more is refused.
        with state_budget(budget + _BUILD_SLACK_VALUES):
            return cls.from_config(entry["config"])
    except StateSizeError as exc:
        held = "it has no file" if npz is None else (
            f"{npz.file.name} holds {budget} values in all, keys {sorted(npz.headers)}")
        raise ModelFormatError(f"{where}: {name}: {exc} ({held}); refusing to build it") from None
    except Exception as exc:  # a bad config must surface as a format error, whatever the layer raises
        raise ModelFormatError(f"{where}: {name}.from_config failed: {type(exc).__name__}: {exc}") from None


def _build_from_registry(entry, registry, what, file):
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str) or not isinstance(
        entry.get("config"), dict
    ):
        raise ModelFormatError(f"{file}: key {what!r}: expected {{'class': str, 'config': dict}}, received: {entry!r:.200}")
    cls = registry.get(entry["class"])
    if cls is None:
        raise ModelFormatError(f"{file}: key {what!r}: unknown {what} class {entry['class']!r}; known: {sorted(registry)}")
    try:
        return cls.from_config(entry["config"])
    except Exception as exc:
        raise ModelFormatError(f"{file}: key {what!r}: {entry['class']}.from_config failed: {exc}") from None


def _read_checked(root, name, entry):
    """Bytes of ``root / name`` after checking its recorded size and SHA-256."""
    file = root / name
    try:
        data = _read_regular_file(file, limit=entry["bytes"], exact=True)
    except FileNotFoundError:
        raise ModelFormatError(f"{file}: missing (listed in {_CONFIG})") from None
    except OSError as exc:
        raise ModelFormatError(f"{file}: cannot be read ({exc})") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ModelFormatError(f"{file}: checksum does not match the one recorded in {_CONFIG} (corrupted)")
    return data


def _read_regular_file(file, limit, exact=False):
    """The bytes of ``file``, refusing anything but a regular file of at most ``limit`` bytes
    (exactly ``limit`` with ``exact``): a layer file that is a link to /dev/zero or a FIFO must
    not be read without end, or block."""
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelFormatError(f"{file}: expected a regular file, received: {_file_kind(st.st_mode)}")
        size = st.st_size
        if exact and size != limit:
            raise ModelFormatError(
                f"{file}: expected {limit} bytes as recorded in {_CONFIG}, received: {size} (truncated?)"
            )
        if size > limit:
            raise ModelFormatError(f"{file}: expected at most {limit} bytes, received: {size}")
        data = f.read(size + 1)  # one byte more: a file that grew since fstat is caught below
    if len(data) != size:
        raise ModelFormatError(f"{file}: changed size while being read ({size} -> {len(data)} bytes)")
    return data


def _file_kind(mode):
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


class NpyVersionError(ValueError):
    """A .npy file in a format version other than the 1.0 and 2.0 that ``numpy.save`` writes."""


def read_npy_header(f):
    """The header of the .npy array at the start of the binary file object ``f``.

    The one .npy header reader (save/load's .npz members, the command's image files): header
    first, so a size can be checked before any data is read. Reads no pickle.

    Returns
    -------
    (shape, fortran_order, dtype), with ``f`` left at the first byte of the data

    Raises
    ------
    NpyVersionError
        For a format version other than 1.0 and 2.0.
    ValueError, EOFError, SyntaxError, TypeError, OverflowError
        From NumPy, for a header that is not one ``numpy.save`` writes.
    """
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise NpyVersionError(f"expected .npy format version 1.0 or 2.0, received: {version[0]}.{version[1]}")


class _Npz:
    """An .npz held in memory, read without pickle: the header (shape, dtype) of every member
    first, each array's values only on request, so sizes are checked before memory is spent.

    Attributes
    ----------
    file : Path
        Named in every error.
    headers : dict
        ``key -> (shape, dtype)`` with the dtype as stored (possibly big-endian).
    """

    def __init__(self, data, file):
        self.file = file
        if not data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            raise ModelFormatError(f"{file}: not an .npz (zip) archive")
        self._members = {}  # key -> (ZipInfo, offset of the data, fortran_order)
        self.headers = {}
        try:
            self._zip = zipfile.ZipFile(_io.BytesIO(data))
            infos = self._zip.infolist()
        except _ZIP_ERRORS as exc:
            raise ModelFormatError(f"{file}: unreadable ({type(exc).__name__}: {exc})") from None
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise ModelFormatError(
                    f"{file}: member {info.filename!r:.100}: expected a .npy array, received another kind of file"
                )
            key = info.filename[: -len(".npy")]
            if key in self.headers:
                raise ModelFormatError(f"{file}: key {key!r}: stored twice")
            self._read_header(key, info)

    def _read_header(self, key, info):
        where = f"{self.file}: key {key!r}"
        try:
            with self._zip.open(info) as f:
                shape, fortran, dtype = read_npy_header(f)
                offset = f.tell()
        except _ZIP_ERRORS as exc:
            raise ModelFormatError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
        if dtype.hasobject:
            raise ModelFormatError(f"{where}: holds Python objects (pickle), which cnnx refuses to load")
        if dtype.kind not in "biuf" or dtype.subdtype is not None or dtype.fields is not None:
            raise ModelFormatError(f"{where}: expected a numeric array, received: dtype={dtype.str!r}")
        n_bytes = math.prod(shape) * dtype.itemsize
        if info.file_size != offset + n_bytes:
            raise ModelFormatError(
                f"{where}: header declares shape {shape} of {dtype.str!r} ({n_bytes} bytes), but the "
                f"member holds {info.file_size - offset} bytes of data (truncated or forged)"
            )
        self.headers[key] = (shape, dtype)
        self._members[key] = (info, offset, fortran)

    def read(self, key):
        """The array ``key``: a C-contiguous, writable copy in native byte order."""
        shape, dtype = self.headers[key]
        info, offset, fortran = self._members[key]
        n_bytes = math.prod(shape) * dtype.itemsize
        try:
            with self._zip.open(info) as f:
                f.seek(offset)
                raw = f.read(n_bytes)
        except _ZIP_ERRORS as exc:
            raise ModelFormatError(f"{self.file}: key {key!r}: unreadable ({type(exc).__name__}: {exc})") from None
        if len(raw) != n_bytes:
            raise ModelFormatError(f"{self.file}: key {key!r}: expected {n_bytes} bytes, received: {len(raw)}")
        a = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        return np.array(a, dtype=dtype.newbyteorder("="), order="C")


_ZIP_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, RuntimeError,
               NotImplementedError, OverflowError)


class _HugeInt:
    """What a JSON integer literal too long to be any count cnnx writes becomes: Python would
    spend quadratic time converting it (or refuse with a ValueError beyond 4300 digits)."""

    def __init__(self, digits):
        self.digits = digits

    def __repr__(self):
        return f"<an integer of {self.digits} digits>"


def _parse_json_int(text):
    digits = len(text.lstrip("-"))
    return _HugeInt(digits) if digits > _MAX_INT_DIGITS else int(text)


def _read_json(file, data=None):
    try:
        if data is None:
            data = _read_regular_file(file, limit=_MAX_JSON_BYTES)
        return json.loads(data.decode("utf-8"), parse_int=_parse_json_int)
    except FileNotFoundError:
        raise ModelFormatError(f"{file}: missing") from None
    except ModelFormatError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(f"{file}: not valid JSON ({exc})") from None


def _check_headers(headers, targets, file, dtypes=True):
    """Raise unless ``headers`` (key -> (shape, dtype)) has exactly the keys of ``targets`` with
    their shapes and dtypes (either byte order: arrays are converted to native when read)."""
    missing = sorted(set(targets) - set(headers))
    extra = sorted(set(headers) - set(targets))
    if missing:
        raise ModelFormatError(f"{file}: missing key {missing[0]!r} (missing: {missing}; expected: {sorted(targets)})")
    if extra:
        raise ModelFormatError(f"{file}: unexpected key {extra[0]!r} (unexpected: {extra}; expected: {sorted(targets)})")
    for key, target in targets.items():
        shape, dtype = headers[key]
        if shape != target.shape:
            raise ModelFormatError(f"{file}: key {key!r}: expected shape {target.shape}, received: {shape}")
        if dtypes and dtype.newbyteorder("=") != target.dtype:
            raise ModelFormatError(
                f"{file}: key {key!r}: expected dtype {target.dtype.name} ({target.dtype.str!r} or its "
                f"big-endian twin), received: {dtype.str!r}"
            )


def _check_values(arrays, file):
    """Refuse what no trained network holds: NaN or infinity, a negative running variance."""
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            n = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise ModelFormatError(
                f"{file}: key {key!r}: expected finite values, received: {n} NaN or infinite of {a.size} "
                "(pass allow_nonfinite=True to load them anyway)"
            )
        if key.startswith(_BUFFER_PREFIX) and key.endswith("running_var") and a.size and a.min() < 0:
            raise ModelFormatError(
                f"{file}: key {key!r}: expected a variance >= 0, received: min {a.min()!r} "
                "(pass allow_nonfinite=True to load it anyway)"
            )


def _assign(arrays, targets):
    # In place, so anything holding the layers' arrays (an optimizer, a cache) keeps seeing them.
    for key, target in targets.items():
        np.copyto(target, arrays[key])


# ============================================================================ arrays =========
def _layer_arrays(layer):
    arrays = {name: np.ascontiguousarray(p) for name, p, _ in layer.named_parameters()}
    for name, b in layer.named_buffers():
        arrays[_BUFFER_PREFIX + name] = np.ascontiguousarray(b)
    return arrays


def _expected_layer_keys(layer):
    """``{key: array}`` a layer file must match: what the freshly built layer holds."""
    return _layer_arrays(layer)


def _network_arrays(net):
    return {
        f"{i}.{key}": a for i, layer in enumerate(net.layers) for key, a in _layer_arrays(layer).items()
    }


def _network_targets(net):
    # The arrays themselves (not copies), to be written into.
    targets = {}
    for i, layer in enumerate(net.layers):
        for name, p, _ in layer.named_parameters():
            targets[f"{i}.{name}"] = p
        for name, b in layer.named_buffers():
            targets[f"{i}.{_BUFFER_PREFIX}{name}"] = b
    return targets


def _layer_file(i, layer, width):
    return f"layers/{i:0{width}d}_{type(layer).__name__.lower()}.npz"


def _npz_bytes(arrays):
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ============================================================================ JSON ===========
def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _json_bytes(obj, what):
    try:
        text = json.dumps(obj, indent=2, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Cannot save the {what}: it is not JSON-serialisable ({exc})") from None
    return (text + "\n").encode("utf-8")


def json_safe(obj):
    """``obj`` as standard JSON can hold it: NaN and infinite floats become None (a history has
    NaN for the epochs without validation), NumPy scalars and arrays become Python ones, dict
    keys become strings. Dicts, lists and tuples are converted all the way down."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def _check_flag(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"Expected {name} to be True or False, received: {name}={value!r}")
    return value


def _history_from_json(obj, file):
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{file}: expected a JSON object of lists, received: {type(obj).__name__}")
    history = {}
    for key, values in obj.items():
        ok = isinstance(values, list) and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values
        )
        try:
            if ok:
                history[key] = [math.nan if v is None else float(v) for v in values]
        except OverflowError:  # an int too large for a float
            ok = False
        if not ok:
            raise ModelFormatError(f"{file}: key {key!r}: expected a list of numbers or null, received: {values!r:.200}")
    return history


# ============================================================================ files ==========
def _as_path(path):
    if isinstance(path, (str, os.PathLike)):
        return Path(path)
    raise TypeError(f"Expected path as a str or os.PathLike, received: {type(path).__name__}")


def _backup_path(path):
    return path.parent / f"{path.name}.bak"


def _foreign_entries(directory):
    """What ``directory`` holds that cnnx.save does not write (relative names), by name and kind:
    config.json, history.json, optimizer.npz and layers/<NN>_<class>.npz, as regular files."""
    foreign = []
    for entry in sorted(directory.iterdir()):
        if entry.name in _SAVE_FILES and entry.is_file() and not entry.is_symlink():
            continue
        if entry.name == "layers" and entry.is_dir() and not entry.is_symlink():
            foreign += [f"layers/{f.name}" for f in sorted(entry.iterdir())
                        if not (_LAYER_FILE_RE.fullmatch(f.name) and f.is_file() and not f.is_symlink())]
            continue
        foreign.append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    return foreign


def _check_replaceable(target, path):
    """Raise FileExistsError unless ``target`` is absent or a directory of cnnx's own files."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(
            f"Refusing to overwrite {target}: it is not a directory written by cnnx.save "
            f"(a {'symlink' if target.is_symlink() else 'file'}); remove it or choose another path"
        )
    foreign = _foreign_entries(target)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"Refusing to save to {path}: {target} is not a directory written by cnnx.save: it holds "
            f"{shown}, which cnnx did not write and a save would delete; move them or choose another path"
        )


def _check_registered(net):
    """A save that cnnx.load would refuse is refused now, before any file is written: every
    layer, and every layer a container holds, must be of the class registered under its name."""
    from .layers import LAYER_CLASSES, Layer

    seen = set()

    def check(layer, where):
        if id(layer) in seen:  # shared or self-referencing layers are checked once
            return
        seen.add(id(layer))
        cls = type(layer)
        if LAYER_CLASSES.get(cls.__name__) is not cls:
            raise ValueError(
                f"Cannot save {where}: layer class {cls.__module__}.{cls.__qualname__} is not registered, "
                "so cnnx.load could not rebuild it; decorate the class with @cnnx.register_layer"
            )
        for attr, value in vars(layer).items():  # a container's children (Residual's block, ...)
            children = value if isinstance(value, (list, tuple)) else [value]
            for j, child in enumerate(children):
                if isinstance(child, Layer):
                    check(child, f"{where}.{attr}[{j}]" if isinstance(value, (list, tuple)) else f"{where}.{attr}")

    for i, layer in enumerate(net.layers):
        check(layer, f"layers[{i}]")


@contextlib.contextmanager
def _save_lock(path, timeout):
    """Hold ``<path>.cnnx-lock`` (an advisory lock, released by the OS if the process dies) for
    the duration of one save; wait up to ``timeout`` seconds for another holder."""
    lock_file = path.parent / f"{path.name}{_LOCK_SUFFIX}"
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if _try_lock(fd):
                # The previous holder deletes the file before unlocking; if it did while we
                # waited, we hold a lock no other process will look at: take the new file's.
                try:
                    current = os.path.samestat(os.fstat(fd), os.stat(lock_file))
                except FileNotFoundError:
                    current = False
                if current:
                    break
                _unlock(fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if time.monotonic() >= deadline:
            holder = _read_lock_holder(lock_file)
            raise TimeoutError(
                f"Cannot save to {path}: another save to it{holder} has held {lock_file.name} for more "
                f"than lock_timeout={timeout:g} s; wait for it, or save to another path"
            )
        time.sleep(0.02)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for the message above
        yield
    finally:
        if os.name != "nt":  # an open file cannot be deleted there; it stays, empty and unlocked
            _unlink_quietly(lock_file)
        _unlock(fd)
        os.close(fd)


def _try_lock(fd):
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError / PermissionError: held by someone else
        return False
    return True


def _unlock(fd):
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass


def _read_lock_holder(lock_file):
    try:
        pid = lock_file.read_text()[:20].strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


def _write_durable(file, data):
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory):
    # Makes the directory's entries (new files, renames) durable; not possible on Windows.
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp, path):
    """Rename the complete ``tmp`` to ``path``, keeping a complete checkpoint findable throughout."""
    parent = path.parent
    backup = _backup_path(path)
    if (path / _CONFIG).is_file():
        # path is complete, so the old backup is no longer needed; move it out of the way with
        # an atomic rename before deleting, so no half-deleted .bak is ever visible.
        if backup.exists():
            _discard(backup, path)
        os.rename(path, backup)
        _fsync_dir(parent)
    elif path.exists():
        # An incomplete directory (an empty one, or the remains of a manual delete): the
        # complete checkpoint, if any, is the backup, which stays until tmp is in place.
        _discard(path, path)
    os.rename(tmp, path)
    _fsync_dir(parent)
    if backup.exists():
        _discard(backup, path)


def _discard(directory, path):
    """Rename ``directory`` to a temporary name of ``path`` (which the next save cleans up if
    this one dies), then delete it."""
    trash = path.parent / f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temporaries(path):
    """Delete ``<name>.tmp-<pid>-*`` beside ``path`` left by processes that no longer run."""
    prefix = f"{path.name}.tmp-"
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        m = _TMP_RE.search(entry.name)
        if m is None or entry.name[: m.start()] != path.name:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another process may be saving right now
        if entry.is_dir() and not entry.is_symlink():
            try:
                foreign = _foreign_entries(entry)
            except OSError:  # unreadable: not ours to judge, so not ours to delete
                continue
            if not foreign:  # only what a save writes there, never a user's file
                shutil.rmtree(entry, ignore_errors=True)
        else:
            _unlink_quietly(entry)


def _pid_alive(pid):
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process there; leave its files
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or we cannot tell: keep its files
    return True


def _unlink_quietly(file):
    try:
        os.unlink(file)
    except OSError:
        pass
