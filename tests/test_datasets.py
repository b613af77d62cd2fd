"""Tests for cnnx.datasets: IDX reading, dataset discovery, the embedded sample, CIFAR-10 batches.

Every file read here is written by the test itself in tmp_path (IDX bytes, CIFAR pickles in both
the original Python 2 layout and a Python 3 re-pickle), except the real Fashion-MNIST files of the
Debian package, which are used when installed and skipped otherwise.
"""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from cnnx import datasets
from cnnx.datasets import (
    CIFAR10_CLASSES,
    CLASS_NAMES,
    FASHION_MNIST_CLASSES,
    load_cifar10,
    load_fashion_mnist,
    load_idx,
    load_mnist,
)

IDX_CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C,
             "float32": 0x0D, "float64": 0x0E}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(arr, code=None):
    """IDX encoding of ``arr``: magic (0, 0, type code, ndim), big-endian dims, big-endian data."""
    arr = np.asarray(arr)
    code = IDX_CODES[arr.dtype.name] if code is None else code
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, gz=False, code=None):
    data = idx_bytes(arr, code)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------------------------
# load_idx
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize(
    "dtype,shape",
    [("uint8", (4, 5, 3)), ("int8", (7,)), ("int16", (3, 2)), ("int32", (2, 3, 2)),
     ("float32", (5, 4)), ("float64", (2, 2, 2, 2))],
    ids=["uint8-3d", "int8-1d", "int16", "int32", "float32", "float64-4d"],
)
def test_idx_round_trip(tmp_path, rng, dtype, shape, gz):
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        arr = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        arr = rng.standard_normal(shape).astype(dtype)
    got = load_idx(write_idx(tmp_path / "a.idx", arr, gz=gz))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    assert got.shape == shape
    np.testing.assert_array_equal(got, arr)
    got[...] = 0  # the result owns writable memory, not a view of the read-only file bytes


def test_idx_compression_detected_by_magic_not_name(tmp_path, rng):
    arr = rng.integers(0, 256, size=(3, 4), dtype=np.uint8)
    gz_named_raw = write_idx(tmp_path / "raw.gz", arr, gz=False)
    raw_named_gz = write_idx(tmp_path / "packed-ubyte", arr, gz=True)
    np.testing.assert_array_equal(load_idx(gz_named_raw), arr)
    np.testing.assert_array_equal(load_idx(raw_named_gz), arr)


def test_idx_empty_dimension(tmp_path):
    got = load_idx(write_idx(tmp_path / "empty", np.zeros((0, 28, 28), np.uint8)))
    assert got.shape == (0, 28, 28)


def _corrupt(kind, good):
    if kind == "bad-magic":
        return b"\x01" + good[1:]
    if kind == "unknown-type-code":
        return good[:2] + b"\x0a" + good[3:]
    if kind == "zero-ndim":
        return good[:3] + b"\x00"
    if kind == "truncated-payload":
        return good[:-1]
    if kind == "trailing-bytes":
        return good + b"\x00"
    if kind == "truncated-header":
        return good[:9]
    if kind == "too-short":
        return good[:2]
    raise AssertionError(kind)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("kind,match", [
    ("bad-magic", "two zero bytes"),
    ("unknown-type-code", "type code.*0x0A"),
    ("zero-ndim", "at least one dimension"),
    ("truncated-payload", "truncated IDX payload.*expected 24 bytes.*received: 23"),
    ("trailing-bytes", "trailing bytes"),
    ("truncated-header", "truncated IDX header"),
    ("too-short", "4-byte magic"),
])
def test_idx_bad_file_names_file_and_problem(tmp_path, kind, match, gz):
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    data = _corrupt(kind, good)
    path = tmp_path / f"broken-{kind}"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=match) as exc:
        load_idx(path)
    assert str(path) in str(exc.value)


def test_idx_truncated_gzip_stream(tmp_path):
    packed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "cut.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="gzip") as exc:
        load_idx(path)
    assert str(path) in str(exc.value)


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_idx(tmp_path / "nope")


# --------------------------------------------------------------------------------------------
# MNIST-style directories
# --------------------------------------------------------------------------------------------
def make_mnist_dir(directory, rng, n_train=12, n_test=5, gz=True, n_train_labels=None):
    directory.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    x_tr = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    y_tr = (np.arange(n_train if n_train_labels is None else n_train_labels) % 10).astype(np.uint8)
    x_te = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    y_te = (np.arange(n_test) % 10).astype(np.uint8)
    write_idx(directory / f"train-images-idx3-ubyte{sfx}", x_tr, gz=gz)
    write_idx(directory / f"train-labels-idx1-ubyte{sfx}", y_tr, gz=gz)
    write_idx(directory / f"t10k-images-idx3-ubyte{sfx}", x_te, gz=gz)
    write_idx(directory / f"t10k-labels-idx1-ubyte{sfx}", y_te, gz=gz)
    return (x_tr, y_tr), (x_te, y_te)


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """Hide $CNNX_DATA and the system directories so discovery sees only what a test makes."""
    monkeypatch.delenv("CNNX_DATA", raising=False)
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-fashion")
    monkeypatch.setattr(datasets, "MNIST_SYSTEM_DIR", tmp_path / "no-system-mnist")


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_load_fashion_mnist_from_path(tmp_path, rng, gz):
    (x_tr, y_tr), (x_te, y_te) = make_mnist_dir(tmp_path / "fm", rng, gz=gz)
    (a, b), (c, d) = load_fashion_mnist(tmp_path / "fm")
    assert a.dtype == np.uint8 and a.shape == (12, 28, 28)
    assert b.dtype == np.int64 and d.dtype == np.int64
    np.testing.assert_array_equal(a, x_tr)
    np.testing.assert_array_equal(b, y_tr)
    np.testing.assert_array_equal(c, x_te)
    np.testing.assert_array_equal(d, y_te)


def test_image_label_count_mismatch(tmp_path, rng):
    make_mnist_dir(tmp_path, rng, n_train=12, n_train_labels=11)
    with pytest.raises(ValueError, match="11 labels.*12 images"):
        load_fashion_mnist(tmp_path)


def test_label_out_of_range(tmp_path, rng):
    make_mnist_dir(tmp_path, rng)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 10], np.uint8),
              gz=True)
    with pytest.raises(ValueError, match=r"labels in \[0, 9\]"):
        load_fashion_mnist(tmp_path)


def test_wrong_image_shape(tmp_path, rng):
    make_mnist_dir(tmp_path, rng)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 32, 32), np.uint8), gz=True)
    with pytest.raises(ValueError, match=r"shape \(n, 28, 28\)"):
        load_fashion_mnist(tmp_path)


def test_missing_dataset_lists_every_place(tmp_path, monkeypatch, no_system_data):
    data = tmp_path / "cnnx-data"
    data.mkdir()
    monkeypatch.setenv("CNNX_DATA", str(data))
    with pytest.raises(FileNotFoundError) as exc:
        load_fashion_mnist()
    msg = str(exc.value)
    assert msg.startswith("Fashion-MNIST not found")
    for place in (data / "fashion-mnist", data, tmp_path / "no-system-fashion"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "CNNX_DATA" in msg and "sample=True" in msg


def test_incomplete_directory_names_missing_files(tmp_path, rng, no_system_data):
    make_mnist_dir(tmp_path, rng)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path)


def test_explicit_path_does_not_fall_back(tmp_path, rng, monkeypatch):
    # A complete dataset under $CNNX_DATA must not be used when an explicit path is wrong.
    make_mnist_dir(tmp_path / "data", rng)
    monkeypatch.setenv("CNNX_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="typo"):
        load_fashion_mnist(tmp_path / "typo")


def test_cnnx_data_subdirectory_first(tmp_path, rng, monkeypatch, no_system_data):
    make_mnist_dir(tmp_path / "data" / "fashion-mnist", rng, n_train=7)
    make_mnist_dir(tmp_path / "data", rng, n_train=9)
    monkeypatch.setenv("CNNX_DATA", str(tmp_path / "data"))
    (x_tr, _), _ = load_fashion_mnist()
    assert x_tr.shape[0] == 7


def test_load_mnist_from_cnnx_data(tmp_path, rng, monkeypatch, no_system_data):
    (x_tr, _), (x_te, _) = make_mnist_dir(tmp_path / "data" / "mnist", rng, gz=False)
    monkeypatch.setenv("CNNX_DATA", str(tmp_path / "data"))
    (a, _), (c, _) = load_mnist()
    np.testing.assert_array_equal(a, x_tr)
    np.testing.assert_array_equal(c, x_te)


def test_load_mnist_missing(tmp_path, no_system_data):
    with pytest.raises(FileNotFoundError, match="CNNX_DATA"):
        load_mnist()


def test_class_names():
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert CLASS_NAMES["mnist"] == tuple("0123456789")
    assert CLASS_NAMES["cifar10"][0] == "airplane" and len(CIFAR10_CLASSES) == 10


# --------------------------------------------------------------------------------------------
# Real data: the Debian package and the embedded sample
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def debian_fashion():
    if not DEBIAN_DIR.is_dir():
        pytest.skip(f"{DEBIAN_DIR} absent (apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist(DEBIAN_DIR)


def test_debian_fashion_mnist(debian_fashion):
    (x_tr, y_tr), (x_te, y_te) = debian_fashion
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28)
    assert x_tr.dtype == np.uint8 and y_tr.dtype == np.int64
    # Fashion-MNIST is exactly balanced: 6000 / 1000 images per class.
    np.testing.assert_array_equal(np.bincount(y_tr), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(y_te), np.full(10, 1000))


def test_embedded_sample(monkeypatch):
    monkeypatch.delenv("CNNX_DATA", raising=False)
    (x_tr, y_tr), (x_te, y_te) = load_fashion_mnist(sample=True)
    assert x_tr.dtype == np.uint8 and x_tr.shape == (6000, 28, 28)
    assert x_te.dtype == np.uint8 and x_te.shape == (1000, 28, 28)
    assert y_tr.dtype == np.int64 and y_te.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y_tr, minlength=10), np.full(10, 600))
    np.testing.assert_array_equal(np.bincount(y_te, minlength=10), np.full(10, 100))
    assert x_tr.max() == 255 and x_tr.mean() > 20  # real images, not a zero placeholder


def test_embedded_sample_is_real_fashion_mnist(debian_fashion):
    (x_tr, y_tr), (x_te, y_te) = debian_fashion
    sample_path = Path(datasets.__file__).parent / "data" / datasets.SAMPLE_FILE
    with np.load(sample_path, allow_pickle=False) as npz:
        tr, te = npz["train_index"], npz["test_index"]
    (s_x_tr, s_y_tr), (s_x_te, s_y_te) = load_fashion_mnist(sample=True)
    np.testing.assert_array_equal(s_x_tr, x_tr[tr])
    np.testing.assert_array_equal(s_y_tr, y_tr[tr])
    np.testing.assert_array_equal(s_x_te, x_te[te])
    np.testing.assert_array_equal(s_y_te, y_te[te])


def test_sample_and_path_conflict(tmp_path):
    with pytest.raises(ValueError, match="either path or sample=True"):
        load_fashion_mnist(tmp_path, sample=True)


def test_sample_file_size_budget():
    sample_path = Path(datasets.__file__).parent / "data" / datasets.SAMPLE_FILE
    assert sample_path.stat().st_size <= 3 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------
def _py2_str(b):
    """SHORT_BINSTRING / BINSTRING: how Python 2's str (bytes here) is pickled."""
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_int(i):
    return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)


def _py2_obj(obj):
    """Pickle opcodes (protocol 2) for obj as Python 2's cPickle and numpy 1.x wrote them."""
    if isinstance(obj, bytes):
        return _py2_str(obj)
    if isinstance(obj, int):
        return _py2_int(obj)
    if isinstance(obj, list):
        return b"](" + b"".join(_py2_obj(v) for v in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2_obj(k) + _py2_obj(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, np.ndarray):
        assert obj.dtype == np.uint8
        dtype = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"\x89\x88\x87R"
                 + b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1)
                 + _py2_int(0) + b"tb")
        shape = b"(" + b"".join(_py2_int(d) for d in obj.shape) + b"t"
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
                + _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
                + b"(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(obj.tobytes()) + b"tb")
    raise TypeError(type(obj))


def py2_pickle(obj):
    return b"\x80\x02" + _py2_obj(obj) + b"."


def make_cifar_dir(directory, rng, n=4, py2=False, meta=True, protocol=4):
    """Fake cifar-10-batches-py with ``n`` images per batch; returns the expected arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    dump = py2_pickle if py2 else (lambda o: pickle.dumps(o, protocol=protocol))
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        (directory / name).write_bytes(dump(batch))
        xs.append(data)
        ys.append(labels)
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        (directory / "batches.meta").write_bytes(
            dump({b"label_names": names, b"num_cases_per_batch": n, b"num_vis": 3072}))
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], np.array(ys[5])


@pytest.mark.parametrize("py2", [True, False], ids=["python2-pickle", "python3-pickle"])
def test_cifar10_fake_batches(tmp_path, rng, py2):
    d_tr, y_tr, d_te, y_te = make_cifar_dir(tmp_path / "cifar-10-batches-py", rng, py2=py2)
    (x_train, y_train), (x_test, y_test), names = load_cifar10(
        tmp_path / "cifar-10-batches-py", with_label_names=True)
    assert x_train.shape == (20, 3, 32, 32) and x_train.dtype == np.uint8
    assert x_test.shape == (4, 3, 32, 32)
    assert y_train.dtype == np.int64 and y_train.shape == (20,)
    np.testing.assert_array_equal(y_train, y_tr)
    np.testing.assert_array_equal(y_test, y_te)
    # Row layout: 1024 red, 1024 green, 1024 blue, each 32x32 row-major.
    for i, c, r, col in [(0, 0, 0, 0), (3, 1, 5, 7), (17, 2, 31, 30), (9, 2, 0, 31)]:
        assert x_train[i, c, r, col] == d_tr[i, c * 1024 + r * 32 + col]
    np.testing.assert_array_equal(x_test.reshape(4, -1), d_te)
    assert names == tuple(f"class{i}" for i in range(10))


def test_cifar10_parent_directory_and_default_names(tmp_path, rng):
    make_cifar_dir(tmp_path / "cifar-10-batches-py", rng, meta=False)
    (x_train, _), _, names = load_cifar10(tmp_path, with_label_names=True)
    assert x_train.shape == (20, 3, 32, 32)
    assert names == CIFAR10_CLASSES
    assert len(load_cifar10(tmp_path)) == 2


def test_cifar10_missing(tmp_path, rng, monkeypatch):
    monkeypatch.delenv("CNNX_DATA", raising=False)
    make_cifar_dir(tmp_path, rng)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-10-python"):
        load_cifar10()


def test_cifar10_bad_batch_contents(tmp_path, rng):
    make_cifar_dir(tmp_path, rng)
    bad = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(bad, protocol=4))
    with pytest.raises(ValueError, match=r"data_batch_2.*\(n, 3072\)"):
        load_cifar10(tmp_path)
    bad = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(bad, protocol=4))
    with pytest.raises(ValueError, match="4 integers"):
        load_cifar10(tmp_path)


def test_cifar10_truncated_batch(tmp_path, rng):
    make_cifar_dir(tmp_path, rng)
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable CIFAR-10 batch") as exc:
        load_cifar10(tmp_path)
    assert str(path) in str(exc.value)


class _ShellPayload:
    """Unpickling this runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _OpenPayload:
    """Unpickling this creates a file (no shell, so it works on every platform)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import builtins
        return (builtins.open, (self.path, "w"))


@pytest.mark.parametrize("where", ["whole-file", "inside-labels"])
def test_cifar10_malicious_pickle_is_refused_without_running(tmp_path, rng, where):
    make_cifar_dir(tmp_path, rng)
    shell_marker = tmp_path / "pwned-by-shell"
    open_marker = tmp_path / "pwned-by-open"
    if where == "whole-file":
        payload = pickle.dumps(_ShellPayload(f"touch '{shell_marker}'"), protocol=2)
    else:
        payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8),
                                b"labels": [_OpenPayload(open_marker)]}, protocol=4)
    (tmp_path / "data_batch_1").write_bytes(payload)

    with pytest.raises(pickle.UnpicklingError, match="refusing to load global") as exc:
        load_cifar10(tmp_path)
    assert "data_batch_1" in str(exc.value)
    assert not shell_marker.exists() and not open_marker.exists()

    if where == "inside-labels":
        # The payload is live: an ordinary unpickler does create the marker.
        f = pickle.loads(payload)[b"labels"][0]
        f.close()
        assert open_marker.exists()


@pytest.mark.parametrize("keys", ["bytes-keys", "str-keys"])
@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_cifar10_batch_re_pickled_by_python3_with_any_protocol(tmp_path, rng, protocol, keys):
    """Defect: a batch re-pickled by Python 3 with protocol 2 was refused ("refusing to load
    global _codecs.encode"): protocols 0-2 rebuild every bytes object with _codecs.encode, and
    protocol 5 rebuilds arrays with numpy's _frombuffer. All load now, through stand-ins."""
    d_tr, y_tr, d_te, y_te = make_cifar_dir(tmp_path, rng, py2=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        # What a user does: load the original batch with encoding="bytes", dump it again.
        batch = pickle.loads((tmp_path / name).read_bytes(), encoding="bytes")
        if keys == "str-keys":
            batch = {k.decode(): v for k, v in batch.items()}
        batch[b"empty" if keys == "bytes-keys" else "empty"] = b""  # bytes() with protocols 0-2
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    if protocol <= 2:
        assert b"_codecs" in (tmp_path / "test_batch").read_bytes()  # the case of the defect
    (x_train, y_train), (x_test, y_test), names = load_cifar10(tmp_path, with_label_names=True)
    np.testing.assert_array_equal(x_train.reshape(20, -1), d_tr)
    np.testing.assert_array_equal(y_train, y_tr)
    np.testing.assert_array_equal(x_test.reshape(4, -1), d_te)
    np.testing.assert_array_equal(y_test, y_te)
    assert names == tuple(f"class{i}" for i in range(10))


@pytest.mark.parametrize("payload,match", [
    # _codecs.encode("abc", "rot13"): allowed only as Python pickles bytes, encode(str, "latin1").
    (b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.",
     r"refusing _codecs.encode\(str, 'rot13'\)"),
    # bytes(10**9): only the argument-less bytes() of b"" is allowed (this one would allocate 1 GB).
    (b"\x80\x02c__builtin__\nbytes\nJ\x00\xca\x9a;\x85R.", r"refusing bytes\(\) with arguments"),
], ids=["codecs-rot13", "bytes-one-gigabyte"])
def test_cifar10_stand_ins_refuse_other_arguments(tmp_path, rng, payload, match):
    make_cifar_dir(tmp_path, rng)
    (tmp_path / "data_batch_1").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=match) as exc:
        load_cifar10(tmp_path)
    assert "data_batch_1" in str(exc.value)


# --------------------------------------------------------------------------------------------
# load_idx reads what the header says, never more
# --------------------------------------------------------------------------------------------
def test_idx_gzip_with_a_huge_tail_is_not_decompressed(tmp_path):
    """Defect: a 1 MB gzip whose header claims a small array was decompressed whole (2.1 GB
    peak) before "trailing bytes" was reported. Here a 10-byte array followed by 48 MB of zeros
    (about 50 KB compressed): refused after reading the header, the payload and one byte."""
    import tracemalloc

    path = tmp_path / "bomb-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(np.arange(10, dtype=np.uint8)))
        block = bytes(1 << 20)
        for _ in range(48):
            f.write(block)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"{path.name}: trailing bytes after the IDX payload: expected 10 bytes"):
            load_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak} bytes traced: the tail was decompressed"


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_header_claiming_a_huge_array_is_not_allocated(tmp_path, gz):
    """A (2**31, 2**31) header in front of 100 bytes: refused as truncated, nothing allocated
    for the claimed size."""
    header = bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 2**31, 2**31)
    path = tmp_path / "claims-idx2-ubyte"
    data = header + bytes(100)
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=rf"{path.name}: truncated IDX payload: expected {2**62} bytes"):
        load_idx(path)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_255_dimension_header_names_the_file(tmp_path, gz):
    """Defect: a 255-dimension header leaked NumPy's "maximum supported dimension" error,
    without the file name."""
    data = bytes([0, 0, 0x08, 255]) + struct.pack(">255I", *([1] * 255)) + b"\x07"
    path = tmp_path / "deep-idx-ubyte"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=rf"{path.name}: expected at most 32 dimensions .*received: 255"):
        load_idx(path)
