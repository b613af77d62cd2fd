"""Regression tests for the promises of "Saving and loading: guarantees" (README), one per defect
found by feeding cnnx.save / cnnx.load damaged and hostile checkpoints (issue 11): foreign files
deleted by a save, concurrent saves, damaged files escaping as other errors, memory spent before
sizes were checked, non-finite weights loaded silently, and configs naming arbitrary classes."""
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cnnx
from cnnx.io import ModelFormatError
from cnnx.layers import LAYER_CLASSES, BatchNorm1D, Dense, Flatten, Layer, Residual
from cnnx.network import Network


# ------------------------------------------------------------------------------ helpers ------
def small_net(seed=0, dtype="float32"):
    cnnx.manual_seed(seed)
    net = Network([Flatten(), Dense(16, 8), BatchNorm1D(8), Dense(8, 3)], input_shape=(1, 4, 4), dtype=dtype)
    return net.compile("SoftmaxCrossEntropy", cnnx.optimizers.Adam(lr=1e-2))


def trained_save(path, seed=0):
    rng = np.random.default_rng(seed)
    net = small_net(seed)
    net.fit(rng.standard_normal((16, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, 16),
            epochs=1, batch_size=8, verbose=0)
    net.save(path)
    return net


def npz_bytes(arrays, compressed=False):
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def rewrite_file(save_dir, name, data):
    """Replace a file of a save and record its new size and checksum, so that the loader's own
    checks, not the checksum, must catch what is wrong."""
    (save_dir / name).write_bytes(data)
    edit_config(save_dir, lambda c: c["files"].__setitem__(
        name, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def edit_config(save_dir, fn):
    config = json.loads((save_dir / "config.json").read_text())
    fn(config)
    (save_dir / "config.json").write_text(json.dumps(config))


def layer_arrays(save_dir, name):
    with np.load(save_dir / name, allow_pickle=False) as f:
        return dict(f)


def peak_bytes(fn):
    """Peak memory traced (NumPy and Python allocations) while ``fn`` runs, and its exception."""
    tracemalloc.start()
    try:
        try:
            fn()
            error = None
        except Exception as exc:  # the caller asserts on it
            error = exc
        return tracemalloc.get_traced_memory()[1], error
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------ foreign files
def test_save_never_deletes_a_file_it_did_not_write_inside_layers(tmp_path):
    """Defect: a folder holding layers/ counted as a checkpoint; layers/anything.txt was gone
    after the next save."""
    path = tmp_path / "m"
    first = trained_save(path)
    (path / "layers" / "anything.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"layers/anything.txt.*cnnx did not write"):
        small_net(seed=1).save(path)
    assert (path / "layers" / "anything.txt").read_text() == "mine"
    np.testing.assert_array_equal(cnnx.load(path).layers[1].params["weight"], first.layers[1].params["weight"])


@pytest.mark.parametrize("where", ["top-level-file", "sub-folder", "backup", "layers-only-folder"])
def test_save_refuses_any_directory_holding_foreign_entries(tmp_path, where):
    """Defect: a directory whose top level held only cnnx's names was replaced whole, whatever
    was inside; the stale <name>.bak was deleted unchecked too."""
    path = tmp_path / "m"
    if where == "layers-only-folder":  # not a save at all, but named like one
        (path / "layers").mkdir(parents=True)
        victim = path / "layers" / "notes.md"
    else:
        trained_save(path)
        if where == "backup":
            trained_save(tmp_path / "m.bak")
            victim = tmp_path / "m.bak" / "README"
        elif where == "sub-folder":
            (path / "data").mkdir()
            victim = path / "data" / "x.csv"
        else:
            victim = path / "thesis.tex"
    victim.write_text("precious")
    with pytest.raises(FileExistsError, match="cnnx did not write"):
        small_net().save(path)
    assert victim.read_text() == "precious"


def test_stale_temporary_holding_foreign_files_is_left_alone(tmp_path):
    """Defect: a directory named like a dead save's temporary was removed without a look inside."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"m.tmp-{dead.pid}-0badf00d"
    stale.mkdir()
    (stale / "results.csv").write_text("precious")
    small_net().save(tmp_path / "m")
    assert (stale / "results.csv").read_text() == "precious"


# ------------------------------------------------------------------------------ concurrency --
SAVER = textwrap.dedent(
    """
    import sys, time
    import cnnx
    import cnnx.io
    from cnnx.layers import Dense, Flatten
    from cnnx.network import Network

    path, go, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
    real_swap = cnnx.io._swap_into_place

    def slow_swap(tmp, target):
        # Time spent holding the lock, on the clock both processes share (CLOCK_MONOTONIC).
        start = time.monotonic()
        time.sleep(0.05)  # a slow disk: the other process surely arrives meanwhile
        real_swap(tmp, target)
        print("held", start, time.monotonic(), flush=True)

    cnnx.io._swap_into_place = slow_swap
    net = Network([Flatten(), Dense(16, 3)], input_shape=(1, 4, 4)).compile("SoftmaxCrossEntropy", "Adam")
    print("ready", flush=True)
    while not __import__("os").path.exists(go):
        time.sleep(0.002)
    for k in range(4):
        for _, p, _ in net.parameters():
            p.fill(value + k)  # every array of one save holds one value: a mix would show
        called = time.monotonic()
        net.save(path)
        print("call", called, time.monotonic(), flush=True)
    """
)


def test_two_processes_saving_to_one_path_take_turns(tmp_path):
    """Defect: two processes saving at once got FileNotFoundError 'm' -> 'm.bak' or
    'Directory not empty'. Now a lock file makes them take turns: both succeed, the critical
    sections never overlap, and the result is one whole checkpoint."""
    path, go = tmp_path / "ckpt", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(Path(cnnx.__file__).resolve().parent.parent))
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(go), str(base)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for base in (100.0, 200.0)]
    for proc in procs:  # both imported and ready, however slowly each started
        if proc.stdout.readline() != b"ready\n":
            pytest.fail(f"a saver did not start: {proc.communicate()[1].decode()}")
    go.write_text("")
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode()
    held = [[tuple(map(float, line.split()[1:])) for line in out.decode().splitlines() if line.startswith("held")]
            for out, _ in outputs]
    calls = [[tuple(map(float, line.split()[1:])) for line in out.decode().splitlines() if line.startswith("call")]
             for out, _ in outputs]
    assert [len(h) for h in held] == [4, 4] and [len(c) for c in calls] == [4, 4]
    for a0, a1 in held[0]:
        for b0, b1 in held[1]:
            assert a1 <= b0 or b1 <= a0, "two saves held the lock at once"
    # The two did contend: some save of one process was called while the other held the lock.
    assert any(c0 < h1 and h0 < c1 for i in (0, 1) for c0, c1 in calls[i] for h0, h1 in held[1 - i])
    values = {float(v) for _, p, _ in cnnx.load(path).parameters() for v in np.unique(p)}
    assert len(values) == 1 and values <= {103.0, 203.0}  # the last save of one of them, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "go"]  # no lock file left


def test_save_waiting_for_another_save_times_out_with_a_clear_message(tmp_path):
    """Defect: no lock at all. A save that cannot get the lock says who holds it and how long
    it waited, and writes nothing."""
    path = tmp_path / "m"
    small_net(seed=0).save(path)
    with cnnx.io._save_lock(path, timeout=1):  # another save in progress (its own descriptor)
        with pytest.raises(TimeoutError, match=rf"another save to it \(process {os.getpid()}\).*lock_timeout=0.1 s"):
            cnnx.save(small_net(seed=1), path, lock_timeout=0.1)
    np.testing.assert_array_equal(cnnx.load(path).layers[1].params["weight"], small_net(seed=0).layers[1].params["weight"])
    cnnx.save(small_net(seed=1), path, lock_timeout=0)  # free again: no waiting needed
    with pytest.raises(ValueError, match="lock_timeout"):
        cnnx.save(small_net(), path, lock_timeout=-1)


# ------------------------------------------------------------------------------ damaged files
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "m"
    trained_save(path)
    return path


@pytest.fixture
def copy(tmp_path, pristine):
    import shutil

    shutil.copytree(pristine, tmp_path / "m")
    return tmp_path / "m"


def test_zip_member_that_is_not_npy_names_file_and_member(copy):
    """Defect: a zip member that is not a .npy gave AttributeError: 'bytes' object has no
    attribute 'dtype'."""
    arrays = layer_arrays(copy, "layers/01_dense.npz")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for key, a in arrays.items():
            member = io.BytesIO()
            np.save(member, a)
            z.writestr(key + ".npy", member.getvalue())
        z.writestr("notes.txt", b"hello")
    rewrite_file(copy, "layers/01_dense.npz", buf.getvalue())
    with pytest.raises(ModelFormatError, match=r"01_dense.npz: member 'notes.txt': expected a .npy array"):
        cnnx.load(copy)


def test_big_endian_weights_are_converted_to_native(copy, pristine):
    """Defect: big-endian weights gave 'expected dtype float32, received: float32'. They are
    the same numbers: accepted and converted to native order."""
    arrays = layer_arrays(copy, "layers/01_dense.npz")
    rewrite_file(copy, "layers/01_dense.npz", npz_bytes({k: a.astype(">f4") for k, a in arrays.items()}))
    loaded = cnnx.load(copy)
    weight = loaded.layers[1].params["weight"]
    assert weight.dtype == np.float32 and weight.dtype.isnative
    np.testing.assert_array_equal(weight, cnnx.load(pristine).layers[1].params["weight"])


def test_wrong_width_in_big_endian_is_named_by_its_byte_order(copy):
    """Defect: the message showed dtype names that read the same ('float32' vs 'float32')."""
    arrays = layer_arrays(copy, "layers/01_dense.npz")
    arrays["bias"] = arrays["bias"].astype(">f8")
    rewrite_file(copy, "layers/01_dense.npz", npz_bytes(arrays))
    with pytest.raises(ModelFormatError, match=r"01_dense.npz: key 'bias': expected dtype float32.*received: '>f8'"):
        cnnx.load(copy)


@pytest.mark.parametrize("file", ["history.json", "config.json"])
def test_five_thousand_digit_integer_in_json(copy, file):
    """Defect: a 5000-digit integer in history.json leaked Python's int-conversion ValueError."""
    huge = "9" * 5000
    if file == "history.json":
        rewrite_file(copy, file, ('{"loss": [' + huge + "]}").encode())
        match = r"history.json: key 'loss': expected a list of numbers.*integer of 5000 digits"
    else:
        text = (copy / file).read_text().replace('"format_version": 1', f'"format_version": {huge}')
        (copy / file).write_text(text)
        match = r"config.json: key 'format_version'.*integer of 5000 digits"
    with pytest.raises(ModelFormatError, match=match):
        cnnx.load(copy)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_layer_file_linked_to_dev_zero_is_refused_without_reading(copy):
    """Defect: a layer file that is a symlink to /dev/zero was read without bound until an
    empty MemoryError."""
    target = copy / "layers" / "01_dense.npz"
    target.unlink()
    target.symlink_to("/dev/zero")
    with pytest.raises(ModelFormatError, match=r"01_dense.npz: expected a regular file, received: a character device"):
        cnnx.load(copy)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_layer_file_that_is_a_fifo_is_refused_without_blocking(copy):
    """A FIFO would block open() or read() forever; it is refused like any non-regular file."""
    target = copy / "layers" / "01_dense.npz"
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(ModelFormatError, match=r"01_dense.npz: expected a regular file, received: a FIFO"):
        cnnx.load(copy)


def test_file_recorded_larger_than_it_is_is_not_read(copy):
    """A size recorded in config.json is compared with the file's size before reading it."""
    edit_config(copy, lambda c: c["files"]["layers/01_dense.npz"].update(bytes=10**15))
    with pytest.raises(ModelFormatError, match=r"01_dense.npz: expected 1000000000000000 bytes.*received: \d+"):
        cnnx.load(copy)


# ------------------------------------------------------------------------------ sizes first --
def test_compressed_oversized_array_is_refused_from_its_header(copy):
    """Defect: a 1 MB layer .npz holding a (16384, 16384) array used 1 GB before being refused.
    Here a (2048, 2048) float32 array (16 MB, a few KB compressed): refused from its header,
    without decompressing it."""
    arrays = layer_arrays(copy, "layers/01_dense.npz")
    arrays["weight"] = np.zeros((2048, 2048), np.float32)
    rewrite_file(copy, "layers/01_dense.npz", npz_bytes(arrays, compressed=True))
    del arrays
    peak, error = peak_bytes(lambda: cnnx.load(copy))
    assert isinstance(error, ModelFormatError), error
    assert "01_dense.npz: key 'weight': expected shape (8, 16), received: (2048, 2048)" in str(error)
    assert peak < 4 * 2**20, f"{peak} bytes traced: the array was decompressed"


def test_npy_header_claiming_more_than_the_member_holds(copy):
    """A forged header (16384, 16384) in front of a few bytes is refused as such, naming the key."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (16384, 16384)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("weight.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\0" * 64)
        z.writestr("bias.npy", npz_member(np.zeros(8, np.float32)))
    rewrite_file(copy, "layers/01_dense.npz", buf.getvalue())
    with pytest.raises(ModelFormatError, match=r"key 'weight': header declares shape \(16384, 16384\).*truncated or forged"):
        cnnx.load(copy)


def npz_member(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_layer_norm_config_asking_for_millions_is_refused_before_building(tmp_path):
    """LayerNorm (like BatchNorm) checks its size against the load budget before allocating."""
    from cnnx.layers import LayerNorm

    net = Network([Flatten(), Dense(16, 8), LayerNorm(8, axis=-1), Dense(8, 3)], input_shape=(1, 4, 4))
    net.save(tmp_path / "m")
    edit_config(tmp_path / "m", lambda c: c["layers"][2]["config"].update(num_features=3 * 10**8))
    peak, error = peak_bytes(lambda: cnnx.load(tmp_path / "m"))
    assert isinstance(error, ModelFormatError), error
    assert "layers[2]: LayerNorm: its config asks for num_features" in str(error)
    assert peak < 4 * 2**20, f"{peak} bytes traced before the refusal"


@pytest.mark.parametrize("edit", ["out_features", "num_features", "no-file"])
def test_config_asking_for_huge_layers_is_refused_before_building(copy, edit):
    """Defect: config.json edited to out_features=3*10**6 built the layer (1.3 GB, 4 s) before
    the arrays were compared. Now each layer is built within the values its file holds."""
    if edit == "out_features":
        edit_config(copy, lambda c: c["layers"][3]["config"].update(out_features=3 * 10**6))
        match = r"layers\[3\]: Dense: its config asks for a weight of shape \(3000000, 8\).*03_dense.npz holds 27 values"
    elif edit == "num_features":
        edit_config(copy, lambda c: c["layers"][2]["config"].update(num_features=3 * 10**6))
        match = r"layers\[2\]: BatchNorm1D: its config asks for num_features.*02_batchnorm1d.npz holds 32 values"
    else:  # a parameter-free layer replaced by a huge Dense that claims to have no file
        edit_config(copy, lambda c: c["layers"].__setitem__(0, {
            "class": "Dense", "config": {"in_features": 10**5, "out_features": 10**5}, "file": None}))
        match = r"layers\[0\]: Dense: .*it has no file"
    peak, error = peak_bytes(lambda: cnnx.load(copy))
    assert isinstance(error, ModelFormatError), error
    assert __import__("re").search(match, str(error)), str(error)
    assert peak < 4 * 2**20, f"{peak} bytes traced before the refusal"


# ------------------------------------------------------------------------------ values -------
@pytest.mark.parametrize("damage", ["nan-weight", "inf-bias", "negative-running-var", "nan-optimizer"])
def test_nonfinite_or_impossible_values_are_refused_unless_allowed(copy, damage):
    """Defect: NaN weights and a negative BatchNorm running variance loaded silently and the
    network predicted NaN. Refused by default; allow_nonfinite=True loads them as they are."""
    if damage == "nan-optimizer":
        name, key = "optimizer.npz", "exp_avg/1.weight"
    else:
        name, key = {"nan-weight": ("layers/01_dense.npz", "weight"), "inf-bias": ("layers/03_dense.npz", "bias"),
                     "negative-running-var": ("layers/02_batchnorm1d.npz", "buffer:running_var")}[damage]
    arrays = layer_arrays(copy, name)
    arrays[key] = arrays[key].copy()
    arrays[key].flat[1] = {"nan-weight": np.nan, "inf-bias": np.inf, "negative-running-var": -0.5,
                           "nan-optimizer": np.nan}[damage]
    rewrite_file(copy, name, npz_bytes(arrays))
    with pytest.raises(ModelFormatError, match=rf"{name}: key '{key}': expected .*allow_nonfinite=True"):
        cnnx.load(copy)
    net = cnnx.load(copy, allow_nonfinite=True)
    if damage != "nan-optimizer":
        layer = net.layers[int(name.split("/")[1][:2])]
        store = layer.buffers if key.startswith("buffer:") else layer.params
        np.testing.assert_array_equal(store[key.removeprefix("buffer:")], arrays[key])
    with pytest.raises(TypeError, match="allow_nonfinite"):
        cnnx.load(copy, allow_nonfinite="yes")


def test_load_weights_refuses_nan_unless_allowed(tmp_path):
    net = small_net()
    net.layers[1].params["weight"][0, 0] = np.nan
    net.save_weights(tmp_path / "w.npz")
    fresh = small_net(seed=3)
    before = fresh.layers[1].params["weight"].copy()
    with pytest.raises(ModelFormatError, match=r"w.npz: key '1.weight': expected finite values"):
        cnnx.load_weights(fresh, tmp_path / "w.npz")
    np.testing.assert_array_equal(fresh.layers[1].params["weight"], before)  # all or nothing
    cnnx.load_weights(fresh, tmp_path / "w.npz", allow_nonfinite=True)
    assert np.isnan(fresh.layers[1].params["weight"][0, 0])


# ------------------------------------------------------------------------------ registry -----
class Sneaky(Layer):
    """Defined by the loading program but never registered: a file must not be able to run it."""

    constructed = 0

    def __init__(self, **config):
        super().__init__()
        type(self).constructed += 1


@pytest.mark.parametrize("where", ["top-level", "inside-residual"])
def test_config_cannot_name_an_unregistered_layer_class(copy, where):
    """Defect: config.json could name any Layer subclass the loading program defined (every
    subclass registered itself by name) and its constructor ran."""
    sneaky = {"class": "Sneaky", "config": {"anything": 1}}
    if where == "top-level":
        edit_config(copy, lambda c: c["layers"].__setitem__(0, dict(sneaky, file=None)))
        match = r"layers\[0\]: unknown layer class 'Sneaky'.*cnnx.register_layer"
    else:
        edit_config(copy, lambda c: c["layers"].__setitem__(0, {
            "class": "Residual", "config": {"block": [sneaky], "shortcut": None}, "file": None}))
        match = r"layers\[0\]: Residual.from_config failed.*Sneaky"
    Sneaky.constructed = 0
    with pytest.raises(ModelFormatError, match=match):
        cnnx.load(copy)
    assert Sneaky.constructed == 0 and "Sneaky" not in LAYER_CLASSES
    with pytest.raises(ValueError, match="Sneaky"):
        Network.from_config({"input_shape": [1, 4, 4], "layers": [sneaky]})
    assert Sneaky.constructed == 0


@pytest.fixture
def scale_layer():
    @cnnx.register_layer
    class HardeningScale(Layer):
        def __init__(self, features):
            super().__init__()
            self.features = features
            self.params["weight"] = np.ones(features, np.float32)

        def forward(self, x, training=False):
            return x * self.params["weight"]

        def get_config(self):
            return {"features": self.features}

    yield HardeningScale
    LAYER_CLASSES.pop("HardeningScale", None)


def test_registered_layer_round_trips_and_unregistered_one_is_refused_at_save(tmp_path, scale_layer):
    net = Network([Flatten(), scale_layer(16), Dense(16, 3)], input_shape=(1, 4, 4))
    net.layers[1].params["weight"][:] = np.arange(16)
    net.save(tmp_path / "m")
    np.testing.assert_array_equal(cnnx.load(tmp_path / "m").layers[1].params["weight"], np.arange(16))

    class Unregistered(scale_layer):
        pass

    for layer in (Unregistered(16), Residual([Unregistered(16)])):
        bad = Network([Flatten(), layer, Dense(16, 3)], input_shape=(1, 4, 4))
        with pytest.raises(ValueError, match=r"layers\[1\].*'?Unregistered'? is not registered.*@cnnx.register_layer"):
            bad.save(tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_register_layer_refuses_name_clashes_and_non_layers(scale_layer):
    class Dense(Layer):  # noqa: F811 - the clash is the point
        pass

    with pytest.raises(ValueError, match=r"'Dense', already taken by cnnx.layers.dense.Dense"):
        cnnx.register_layer(Dense)
    with pytest.raises(TypeError, match="subclass of cnnx.layers.Layer"):
        cnnx.register_layer(int)
    assert LAYER_CLASSES["Dense"] is cnnx.layers.Dense
    assert cnnx.register_layer()(scale_layer) is scale_layer  # with parentheses too


def test_random_damage_to_layer_and_optimizer_files_never_escapes_as_another_error(copy):
    """Damaged files get ModelFormatError whatever byte is hit (zip structure, .npy header,
    data), even when the checksum is fixed to match: never AttributeError, MemoryError and co."""
    rng = np.random.default_rng(11)
    originals = {name: (copy / name).read_bytes() for name in ("layers/01_dense.npz", "optimizer.npz")}
    outcomes = set()
    for trial in range(120):
        name = sorted(originals)[trial % 2]
        data = bytearray(originals[name])
        if trial % 5 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
        rewrite_file(copy, name, bytes(data))
        try:
            cnnx.load(copy)
            outcomes.add("loaded")
        except ModelFormatError as exc:
            assert Path(name).name in str(exc), str(exc)
            outcomes.add("refused")
        rewrite_file(copy, name, originals[name])
    assert "refused" in outcomes


@pytest.mark.parametrize("key,shape,match", [
    ("step", (2**21,), r"key 'step': expected an optimizer-wide entry of at most 1048576 bytes"),
    ("exp_avg/1.weight", (64, 64), r"key 'exp_avg/1.weight': expected shape \(8, 16\), received: \(64, 64\)"),
    ("exp_avg/7.weight", (8, 16), r"key 'exp_avg/7.weight': expected '<state>/<parameter key>' naming a parameter"),
])
def test_optimizer_state_headers_are_checked_before_reading(copy, key, shape, match):
    """optimizer.npz has no fixed key list: each header is bounded by the network's parameters
    (moments) or by a small size (optimizer-wide entries) before any array is read."""
    arrays = layer_arrays(copy, "optimizer.npz")
    arrays[key] = np.zeros(shape, np.int64 if key == "step" else np.float32)
    rewrite_file(copy, "optimizer.npz", npz_bytes(arrays, compressed=True))
    with pytest.raises(ModelFormatError, match=rf"optimizer.npz: {match}"):
        cnnx.load(copy)
