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

Loading is all-or-nothing: every file is read with ``allow_pickle=False``, checked against its
recorded size and checksum, and every array against the network rebuilt from the config (keys,
shapes, dtypes) before a single value is assigned. Whatever is wrong -- a missing or truncated
file, bad JSON, an unknown layer class, a format newer than this cnnx -- raises
:class:`ModelFormatError` naming the file (and the key).

Atomic saving. A save never destroys the previous checkpoint before the new one is complete:

1. stale ``<name>.tmp-<pid>-*`` directories beside ``path`` left by dead processes are removed;
2. everything is written into a fresh ``<name>.tmp-<pid>-<hex>/`` in the same parent directory
   (so renames are atomic), ``config.json`` last; each file and directory is fsynced;
3. if ``path`` holds a complete checkpoint, the stale ``<name>.bak`` is removed and ``path`` is
   renamed to ``<name>.bak``;
4. the temporary directory is renamed to ``path`` (the parent directory is fsynced after each
   rename), then ``<name>.bak`` is removed.

A directory counts as complete when it has ``config.json``; since that file is written last and
only after every other file is on disk, a complete directory is a whole checkpoint. ``load``
reads ``path`` and falls back to ``<name>.bak`` when ``path`` is missing or incomplete, so at every
moment of a save -- the process may be killed anywhere -- one of the two names holds a complete
checkpoint. Concurrent saves to the same path from several processes are not supported.
"""
from __future__ import annotations

import hashlib
import io as _io
import json
import math
import numbers
import os
import re
import secrets
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["ModelFormatError", "save", "load", "save_weights", "load_weights", "FORMAT_VERSION"]

#: The format version this module writes; it reads every version up to this one.
FORMAT_VERSION = 1

_FORMAT_NAME = "cnnx.Network"
_CONFIG = "config.json"
_HISTORY = "history.json"
_OPTIMIZER = "optimizer.npz"
_BUFFER_PREFIX = "buffer:"
_TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]+$")


class ModelFormatError(ValueError):
    """A saved network or weights file cannot be read: missing, truncated, corrupted, or
    inconsistent with the network it describes. The message names the file and, where one is
    at fault, the key."""


# ============================================================================ public API ======
def save(net, path):
    """Save ``net`` (architecture, weights, loss, optimizer state, history) into directory ``path``.

    The write is atomic (see the module docstring): if the process dies during the save,
    :func:`load` still finds either the previous checkpoint or the new one, never a mix.

    Parameters
    ----------
    net : Network
    path : str or os.PathLike
        The directory to write; its parent directories are created. An existing checkpoint there
        is replaced. A non-empty directory that is not a cnnx checkpoint is left alone.

    Raises
    ------
    FileExistsError
        If ``path`` is a file, or a non-empty directory that does not look like a cnnx save.
    ValueError
        If a layer, loss or optimizer config is not JSON-serialisable.
    """
    from . import __version__

    path = _as_path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not _replaceable(path):
        raise FileExistsError(
            f"Refusing to overwrite {path}: it is not a directory written by cnnx.save "
            f"(no {_CONFIG}); remove it or choose another path"
        )
    _remove_stale_temporaries(path)

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
        layer_entries.append({"class": type(layer).__name__, "config": layer.get_config(), "file": name})
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
    files[_HISTORY] = _json_bytes(_history_to_json(net.history), "history")
    config["files"] = {
        name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
    }
    config_bytes = _json_bytes(config, "config")

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


def load(path):
    """Rebuild a network saved with :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
        The directory given to ``save``. When it is missing or incomplete (a save was
        interrupted), the previous checkpoint ``<path>.bak`` is read instead.

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
    return _load_dir(root)


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


def load_weights(net, path):
    """Load a file written by :func:`save_weights` into ``net``, all or nothing.

    Every key, shape and dtype is checked against ``net`` before any value is copied, so on
    error ``net`` is unchanged. Arrays are copied into the existing ones, so references held
    elsewhere (an optimizer's) stay valid.

    Raises
    ------
    ModelFormatError
        Missing or unreadable file, missing or unexpected keys, wrong shape or dtype.
    """
    path = _as_path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot be read ({exc})") from None
    arrays = _read_npz(data, path)
    targets = _network_targets(net)
    _check_arrays(arrays, targets, path)
    _assign(arrays, targets)


# ============================================================================ loading ========
def _load_dir(root):
    from .losses import LOSSES
    from .network import Network
    from .optimizers import OPTIMIZERS

    config_file = root / _CONFIG
    config = _read_json(config_file)
    _check_config(config, config_file)
    files = config["files"]

    # Every file the config refers to must be listed with a checksum, and nothing else.
    width = max(2, len(str(len(config["layers"]) - 1)))
    layers = []
    expected_files = set()
    layer_files = []
    for i, entry in enumerate(config["layers"]):
        where = f"{config_file}: layers[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str) or not isinstance(
            entry.get("config"), dict
        ):
            raise ModelFormatError(f"{where}: expected {{'class': str, 'config': dict, 'file': ...}}, received: {entry!r:.200}")
        layers.append(_build_layer(entry, where))
        layer_files.append(entry.get("file"))
    for i, (layer, name) in enumerate(zip(layers, layer_files)):
        has_state = bool(_expected_layer_keys(layer))
        expected = _layer_file(i, layer, width) if has_state else None
        if name != expected:
            raise ModelFormatError(
                f"{config_file}: layers[{i}] 'file': expected {expected!r}, received: {name!r}"
            )
        if expected:
            expected_files.add(expected)
    expected_files.add(_HISTORY)
    if config["history"] != _HISTORY:
        raise ModelFormatError(f"{config_file}: 'history': expected {_HISTORY!r}, received: {config['history']!r}")
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

    try:
        net = Network(layers, tuple(config["input_shape"]), dtype=config["dtype"])
    except Exception as exc:  # whatever a layer's output_shape raises on a doctored config
        raise ModelFormatError(f"{config_file}: the layers do not form a network: {exc}") from None

    loss = optimizer = None
    if config["loss"] is not None:
        loss = _build_from_registry(config["loss"], LOSSES, "loss", config_file)
    if opt_entry is not None:
        optimizer = _build_from_registry(opt_entry, OPTIMIZERS, "optimizer", config_file)

    # Read and check every array before assigning any.
    arrays = {}
    for i, layer in enumerate(layers):
        name = layer_files[i]
        if name is None:
            continue
        file = root / name
        layer_arrays = _read_npz(_read_checked(root, name, files[name]), file)
        expected = _expected_layer_keys(layer)
        _check_arrays(layer_arrays, expected, file)
        arrays.update((f"{i}.{key}", a) for key, a in layer_arrays.items())
    history = _history_from_json(_read_json(root / _HISTORY, _read_checked(root, _HISTORY, files[_HISTORY])),
                                 root / _HISTORY)
    if optimizer is not None:
        file = root / _OPTIMIZER
        state = _read_npz(_read_checked(root, _OPTIMIZER, files[_OPTIMIZER]), file)
        for key, a in state.items():
            if a.dtype.kind not in "fiu":
                raise ModelFormatError(f"{file}: key {key!r}: expected a numeric array, received: dtype={a.dtype}")
            if a.dtype.kind == "f" and a.dtype != net.dtype:
                raise ModelFormatError(
                    f"{file}: key {key!r}: expected dtype {net.dtype.name}, received: {a.dtype.name}"
                )
        try:
            optimizer.load_state_dict(state, params=net.parameters())
        except Exception as exc:
            raise ModelFormatError(f"{file}: {exc}") from None

    # Everything is valid: assign (copying into the arrays the layers own) and compile.
    _assign(arrays, _network_targets(net))
    net.history = history
    if loss is not None and optimizer is not None:
        net.compile(loss, optimizer)
    else:
        net.loss, net.optimizer = loss, optimizer
    return net


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
                or not isinstance(entry.get("bytes"), int)):
            raise ModelFormatError(
                f"{file}: key 'files' / {name!r}: expected {{'bytes': int, 'sha256': str}}, received: {entry!r:.200}"
            )


def _build_layer(entry, where):
    from .layers import LAYER_CLASSES

    name = entry["class"]
    cls = LAYER_CLASSES.get(name)
    if cls is None:
        raise ModelFormatError(f"{where}: unknown layer class {name!r}; known: {sorted(LAYER_CLASSES)}")
    try:
        return cls.from_config(entry["config"])
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
        data = file.read_bytes()
    except FileNotFoundError:
        raise ModelFormatError(f"{file}: missing (listed in {_CONFIG})") from None
    except OSError as exc:
        raise ModelFormatError(f"{file}: cannot be read ({exc})") from None
    if len(data) != entry["bytes"]:
        raise ModelFormatError(
            f"{file}: expected {entry['bytes']} bytes as recorded in {_CONFIG}, received: {len(data)} (truncated?)"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ModelFormatError(f"{file}: checksum does not match the one recorded in {_CONFIG} (corrupted)")
    return data


def _read_npz(data, file):
    """All arrays of an .npz held in ``data``, read without pickle; errors name file and key."""
    if not data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise ModelFormatError(f"{file}: not an .npz (zip) archive")
    arrays = {}
    key = None
    try:
        with np.load(_io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                arrays[key] = npz[key]
    except ModelFormatError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, RuntimeError,
            NotImplementedError, MemoryError) as exc:
        where = f"{file}: key {key!r}" if key is not None else f"{file}"
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ModelFormatError(f"{where}: holds Python objects (pickle), which cnnx refuses to load") from None
        raise ModelFormatError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
    for key, a in arrays.items():
        if a.dtype.hasobject:
            raise ModelFormatError(f"{file}: key {key!r}: holds Python objects, which cnnx refuses to load")
    return arrays


def _read_json(file, data=None):
    try:
        if data is None:
            data = file.read_bytes()
        return json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{file}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFormatError(f"{file}: not valid JSON ({exc})") from None


def _check_arrays(arrays, targets, file):
    """Raise unless ``arrays`` has exactly the keys of ``targets`` with their shapes and dtypes."""
    missing = sorted(set(targets) - set(arrays))
    extra = sorted(set(arrays) - set(targets))
    if missing:
        raise ModelFormatError(f"{file}: missing key {missing[0]!r} (missing: {missing}; expected: {sorted(targets)})")
    if extra:
        raise ModelFormatError(f"{file}: unexpected key {extra[0]!r} (unexpected: {extra}; expected: {sorted(targets)})")
    for key, target in targets.items():
        a = arrays[key]
        if a.shape != target.shape:
            raise ModelFormatError(f"{file}: key {key!r}: expected shape {target.shape}, received: {a.shape}")
        if a.dtype != target.dtype:
            raise ModelFormatError(
                f"{file}: key {key!r}: expected dtype {target.dtype.name}, received: {a.dtype.name}"
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


def _history_to_json(history):
    out = {}
    for key, values in history.items():
        out[str(key)] = [None if (isinstance(v, numbers.Real) and not math.isfinite(v)) else v for v in values]
    return out


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


def _replaceable(path):
    """True for what a save may replace: a cnnx save (complete or not) or an empty directory."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return _CONFIG in names or names <= {"layers", _OPTIMIZER, _HISTORY}


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
