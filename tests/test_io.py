"""Save / load / resume (cnnx.io, ModelCheckpoint): round trips, exact resumption, refusal of
damaged files without partial loads, and atomic saves that survive SIGKILL."""
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cnnx
from cnnx.io import ModelFormatError
from cnnx.layers import LAYER_CLASSES, Conv2D, Dense, Flatten, Layer, MaxPool2D
from cnnx.network import Network

DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------------------ helpers ------
def small_net(dtype="float32", seed=0, optimizer=None):
    cnnx.manual_seed(seed)
    net = Network(
        [Conv2D(1, 3, (3, 2), padding="same", activation="relu"), MaxPool2D(2), Flatten(), Dense(3 * 4 * 4, 3)],
        input_shape=(1, 8, 8),
        dtype=dtype,
    )
    return net.compile("SoftmaxCrossEntropy", optimizer or cnnx.optimizers.Adam(lr=1e-2))


def toy_data(n=24, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, size=n)


def weights(net):
    return {key: p.copy() for key, p, _ in net.parameters()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].dtype == wb[key].dtype
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)


def rewrite_npz(save_dir, name, arrays):
    """Replace a file of a save with ``arrays`` and fix its recorded checksum, so the loader's
    own checks (not the checksum) must catch what is wrong."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    rewrite_file(save_dir, name, buf.getvalue())


def rewrite_file(save_dir, name, data):
    (save_dir / name).write_bytes(data)
    config = json.loads((save_dir / "config.json").read_text())
    config["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (save_dir / "config.json").write_text(json.dumps(config))


def edit_config(save_dir, fn):
    config = json.loads((save_dir / "config.json").read_text())
    fn(config)
    (save_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture
def buffered_layer():
    """A layer with a buffer (as BatchNorm's running stats), registered (cnnx.register_layer)
    only for this test."""

    class IoTestScale(Layer):
        def __init__(self, features):
            super().__init__()
            self.features = features
            self.params["weight"] = np.ones(features, dtype=np.float32)
            self.grads["weight"] = np.zeros(features, dtype=np.float32)
            self.buffers["running_mean"] = np.zeros(features, dtype=np.float32)

        def forward(self, x, training=False):
            if training:
                self.buffers["running_mean"] *= 0.5
                self.buffers["running_mean"] += 0.5 * x.mean(axis=0)
            self._x = x
            return x * self.params["weight"] - self.buffers["running_mean"]

        def backward(self, dy):
            self.grads["weight"][...] = (dy * self._x).sum(axis=0)
            return dy * self.params["weight"]

        def get_config(self):
            return {"features": self.features}

    cnnx.register_layer(IoTestScale)
    yield IoTestScale
    LAYER_CLASSES.pop("IoTestScale", None)


# ------------------------------------------------------------------------------ round trip ---
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip_is_bit_identical(tmp_path, dtype):
    x, y = toy_data()
    net = small_net(dtype)
    net.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    net.save(str(tmp_path / "m"))
    loaded = cnnx.load(tmp_path / "m")
    assert loaded.dtype == np.dtype(dtype) and loaded.input_shape == net.input_shape
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in net.layers]
    assert_same_weights(net, loaded)
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))
    assert type(loaded.loss) is type(net.loss) and loaded.optimizer.get_config() == net.optimizer.get_config()
    assert loaded.history == net.history
    assert sorted(p.name for p in (tmp_path / "m" / "layers").iterdir()) == ["00_conv2d.npz", "03_dense.npz"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format_version"] == 1 and config["cnnx_version"] == cnnx.__version__
    assert config["layers"][1] == {"class": "MaxPool2D", "config": config["layers"][1]["config"], "file": None}
    # Keys of a layer file are the layer's parameter names.
    with np.load(tmp_path / "m" / "layers" / "03_dense.npz") as f:
        assert sorted(f.files) == ["bias", "weight"]


def test_uncompiled_network_round_trips_uncompiled(tmp_path):
    net = small_net()
    net.loss = net.optimizer = None
    cnnx.save(net, tmp_path / "m")
    assert not (tmp_path / "m" / "optimizer.npz").exists()
    loaded = cnnx.load(tmp_path / "m")
    assert loaded.loss is None and loaded.optimizer is None
    assert_same_weights(net, loaded)


def test_buffers_are_saved_with_prefixed_keys(tmp_path, buffered_layer):
    x, y = toy_data()
    net = Network([Flatten(), buffered_layer(64), Dense(64, 3)], input_shape=(1, 8, 8))
    net.compile("SoftmaxCrossEntropy", cnnx.optimizers.SGD(lr=0.1))
    net.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    running = net.layers[1].buffers["running_mean"].copy()
    assert np.any(running != 0)
    net.save(tmp_path / "m")
    with np.load(tmp_path / "m" / "layers" / "01_iotestscale.npz") as f:
        assert sorted(f.files) == ["buffer:running_mean", "weight"]
    loaded = cnnx.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.layers[1].buffers["running_mean"], running)
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))
    # and through save_weights / load_weights
    net.save_weights(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz") as f:
        assert "1.buffer:running_mean" in f.files and "2.weight" in f.files
    fresh = Network([Flatten(), buffered_layer(64), Dense(64, 3)], input_shape=(1, 8, 8))
    fresh.load_weights(tmp_path / "w.npz")
    np.testing.assert_array_equal(fresh.layers[1].buffers["running_mean"], running)


def zoo_net(dtype="float32", seed=0):
    """Every kind of state a save must carry: BatchNorm buffers, a Residual nesting children
    (with a shortcut), a transposed conv, parameter-free layers in between."""
    from cnnx.layers import AvgPool2D, BatchNorm2D, ConvTranspose2D, ReLU, Residual

    cnnx.manual_seed(seed)
    block = [Conv2D(4, 4, 3, padding="same"), BatchNorm2D(4), ReLU(), Conv2D(4, 6, 3, padding="same")]
    shortcut = [Conv2D(4, 6, 1, bias=False), BatchNorm2D(6)]
    net = Network(
        [Conv2D(1, 4, 3, padding="same"), BatchNorm2D(4), Residual(block, shortcut, activation="relu"),
         AvgPool2D(2), ConvTranspose2D(6, 2, 2, stride=2), MaxPool2D(2), Flatten(), Dense(2 * 4 * 4, 3)],
        input_shape=(1, 8, 8),
        dtype=dtype,
    )
    return net.compile("SoftmaxCrossEntropy", cnnx.optimizers.AdamW(lr=1e-2))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_real_layers_with_buffers_and_containers_resume_exactly(tmp_path, dtype):
    x, y = toy_data()
    straight = zoo_net(dtype)
    straight.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
    first = zoo_net(dtype)
    first.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    first.save(tmp_path / "zoo")
    with np.load(tmp_path / "zoo" / "layers" / "02_residual.npz") as f:
        assert "buffer:block.1.running_mean" in f.files and "shortcut.0.weight" in f.files
    loaded = cnnx.load(tmp_path / "zoo")
    np.testing.assert_array_equal(loaded.predict(x), first.predict(x))
    for (key, a), (_, b) in zip(loaded.buffers(), first.buffers()):
        np.testing.assert_array_equal(a, b, err_msg=key)
    loaded.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    assert_same_weights(loaded, straight)
    for (key, a), (_, b) in zip(loaded.buffers(), straight.buffers()):
        np.testing.assert_array_equal(a, b, err_msg=key)
    assert loaded.history == straight.history


# ------------------------------------------------------------------------------ resume -------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "make_opt",
    [lambda: cnnx.optimizers.Adam(lr=1e-2), lambda: cnnx.optimizers.SGD(lr=0.05, momentum=0.9)],
    ids=["adam", "sgd-momentum"],
)
@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled-seeded"])
def test_resume_equals_uninterrupted_training(tmp_path, dtype, make_opt, shuffle):
    x, y = toy_data()
    val = toy_data(8, seed=2)
    # Seeded shuffling counts epochs over the network's history, so the resumed epoch 3 sees the
    # same order as epoch 3 of the straight run.
    kw = dict(batch_size=8, shuffle=shuffle, seed=7 if shuffle else None, validation_data=val, verbose=0)
    straight = small_net(dtype, optimizer=make_opt())
    straight.fit(x, y, epochs=3, **kw)

    first = small_net(dtype, optimizer=make_opt())
    first.fit(x, y, epochs=2, **kw)
    first.save(tmp_path / "run")
    del first
    resumed = cnnx.load(tmp_path / "run")
    resumed.fit(x, y, epochs=1, **kw)

    assert_same_weights(straight, resumed)
    assert resumed.history == straight.history
    for key, value in straight.optimizer.state_dict().items():
        np.testing.assert_array_equal(resumed.optimizer.state_dict()[key], value, err_msg=key)


# ------------------------------------------------------------------------------ weights file --
def test_save_weights_load_weights(tmp_path):
    x, _ = toy_data()
    net, other = small_net(seed=0), small_net(seed=5)
    cnnx.save_weights(net, str(tmp_path / "w.npz"))
    with np.load(tmp_path / "w.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    held = other.layers[0].params["weight"]
    other.load_weights(tmp_path / "w.npz")
    assert other.layers[0].params["weight"] is held  # copied into place: references stay valid
    np.testing.assert_array_equal(other.predict(x), net.predict(x))


def test_save_weights_writes_exactly_the_given_path(tmp_path):
    small_net().save_weights(tmp_path / "weights")
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("3.bias"), "missing key '3.bias'"),
        (lambda d: d.update({"4.weight": np.zeros(2, np.float32)}), "unexpected key '4.weight'"),
        (lambda d: d.update({"3.weight": np.zeros((3, 5), np.float32)}), "key '3.weight': expected shape"),
        (lambda d: d.update({"0.bias": d["0.bias"].astype(np.float64)}), "key '0.bias': expected dtype float32"),
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_load_weights_is_all_or_nothing(tmp_path, change, message):
    source, target = small_net(seed=0), small_net(seed=5)
    arrays = {key: p.copy() for key, p, _ in source.parameters()}
    # Every other array is valid and would be loaded first by a naive loader.
    change(arrays)
    np.savez(tmp_path / "w.npz", **arrays)
    before = weights(target)
    with pytest.raises(ModelFormatError, match=message) as info:
        target.load_weights(tmp_path / "w.npz")
    assert "w.npz" in str(info.value)
    for key, value in before.items():
        np.testing.assert_array_equal(weights(target)[key], value)


def test_load_weights_refuses_pickled_objects_and_garbage(tmp_path):
    net = small_net()
    arrays = {key: p.copy() for key, p, _ in net.parameters()}
    arrays["0.weight"] = np.array([object()], dtype=object)
    np.savez(tmp_path / "obj.npz", **arrays)
    with pytest.raises(ModelFormatError, match="Python objects"):
        net.load_weights(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelFormatError, match="junk.npz"):
        net.load_weights(tmp_path / "junk.npz")
    with pytest.raises(ModelFormatError, match="no such file"):
        net.load_weights(tmp_path / "absent.npz")


# ------------------------------------------------------------------------------ refusal ------
def _break_missing_layer_file(d):
    (d / "layers" / "03_dense.npz").unlink()


def _break_truncated(d):
    f = d / "layers" / "03_dense.npz"
    f.write_bytes(f.read_bytes()[:100])


def _break_flipped_byte(d):
    f = d / "layers" / "03_dense.npz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _npz_change(fn):
    def breaker(d):
        with np.load(d / "layers" / "03_dense.npz") as f:
            arrays = dict(f)
        fn(arrays)
        rewrite_npz(d, "layers/03_dense.npz", arrays)

    return breaker


def _not_a_zip_with_valid_checksum(d):
    rewrite_file(d, "layers/03_dense.npz", b"\x93NUMPY garbage")


def _empty_zip_with_valid_checksum(d):
    rewrite_file(d, "layers/03_dense.npz", b"PK\x05\x06" + b"\x00" * 18)


def _broken_zip_with_valid_checksum(d):
    data = (d / "layers" / "03_dense.npz").read_bytes()
    rewrite_file(d, "layers/03_dense.npz", data[: len(data) // 2])


def _zip_member_corrupted_with_valid_checksum(d):
    # A valid zip whose member is not a .npy array.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("weight.npy", b"\x93NUMPY garbage")
        z.writestr("bias.npy", b"")
    rewrite_file(d, "layers/03_dense.npz", buf.getvalue())


def _object_array(d):
    with np.load(d / "layers" / "03_dense.npz") as f:
        arrays = dict(f)
    arrays["bias"] = np.array([None, 1, "x"], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # pickles the object array
    rewrite_file(d, "layers/03_dense.npz", buf.getvalue())


def _optimizer_state_for_unknown_param(d):
    with np.load(d / "optimizer.npz") as f:
        state = dict(f)
    state["exp_avg/9.weight"] = state["exp_avg/3.weight"]
    rewrite_npz(d, "optimizer.npz", state)


def _config(fn):
    return lambda d: edit_config(d, fn)


BREAKERS = {
    "no-config": (lambda d: (d / "config.json").unlink(), "config.json"),
    "config-not-json": (lambda d: (d / "config.json").write_text('{"format_version": 1, '), "config.json: not valid JSON"),
    "config-not-object": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object"),
    "newer-format": (_config(lambda c: c.update(format_version=99)), "format version 99.*upgrade cnnx"),
    "unknown-layer": (_config(lambda c: c["layers"][1].update({"class": "Conv5D"})), "unknown layer class 'Conv5D'"),
    "bad-layer-config": (_config(lambda c: c["layers"][0]["config"].update(stride=0)), r"layers\[0\]: Conv2D.from_config"),
    "layers-do-not-chain": (_config(lambda c: c["layers"][3]["config"].update(in_features=7)), "03_dense.npz|do not form"),
    "path-traversal": (_config(lambda c: c["layers"][3].update(file="../../etc/passwd")), r"layers\[3\] 'file'"),
    "unknown-optimizer": (_config(lambda c: c["optimizer"].update({"class": "Adagrad"})), "unknown optimizer class 'Adagrad'"),
    "unknown-loss": (_config(lambda c: c["loss"].update({"class": "Hinge"})), "unknown loss class 'Hinge'"),
    "missing-checksum": (_config(lambda c: c["files"].pop("history.json")), "'files': expected entries"),
    "missing-layer-file": (_break_missing_layer_file, "03_dense.npz: missing"),
    "truncated": (_break_truncated, "03_dense.npz: expected .* bytes"),
    "flipped-byte": (_break_flipped_byte, "03_dense.npz: checksum"),
    "missing-key": (_npz_change(lambda a: a.pop("bias")), "03_dense.npz: missing key 'bias'"),
    "extra-key": (_npz_change(lambda a: a.update(gamma=a["bias"])), "03_dense.npz: unexpected key 'gamma'"),
    "wrong-shape": (_npz_change(lambda a: a.update(weight=a["weight"][:, :5])), "03_dense.npz: key 'weight': expected shape"),
    "wrong-dtype": (_npz_change(lambda a: a.update(bias=a["bias"].astype(np.float64))), "03_dense.npz: key 'bias': expected dtype"),
    "not-a-zip": (_not_a_zip_with_valid_checksum, "03_dense.npz: not an .npz"),
    "empty-zip": (_empty_zip_with_valid_checksum, "03_dense.npz: missing key"),
    "broken-zip": (_broken_zip_with_valid_checksum, "03_dense.npz.*unreadable"),
    "bad-member": (_zip_member_corrupted_with_valid_checksum, "03_dense.npz: key 'weight'.*unreadable"),
    "object-array": (_object_array, "03_dense.npz: key 'bias'.*Python objects"),
    "optimizer-state": (_optimizer_state_for_unknown_param, "optimizer.npz.*9.weight"),
    "history-not-json": (lambda d: rewrite_file(d, "history.json", b"{nope"), "history.json: not valid JSON"),
    "history-wrong-type": (lambda d: rewrite_file(d, "history.json", b'{"loss": "x"}'), "history.json: key 'loss'"),
}


@pytest.fixture(scope="module")
def pristine_save(tmp_path_factory):
    """A trained, compiled network saved once; each damage test breaks a copy of it."""
    x, y = toy_data()
    net = small_net()
    net.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    path = tmp_path_factory.mktemp("pristine") / "m"
    net.save(path)
    return path


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_damaged_save_raises_model_format_error(tmp_path, pristine_save, name):
    breaker, message = BREAKERS[name]
    shutil.copytree(pristine_save, tmp_path / "m")
    cnnx.load(tmp_path / "m")  # the copy is intact before it is broken
    breaker(tmp_path / "m")
    with pytest.raises(ModelFormatError, match=message):
        cnnx.load(tmp_path / "m")


def test_random_damage_to_config_never_escapes_as_another_error(tmp_path, pristine_save):
    """config.json has no checksum of its own: flipped bytes and truncations must still end in
    either a valid network or ModelFormatError, never another exception."""
    rng = np.random.default_rng(7)
    original = (pristine_save / "config.json").read_bytes()
    shutil.copytree(pristine_save, tmp_path / "m")
    outcomes = set()
    for trial in range(80):
        data = bytearray(original)
        if trial % 4 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            data[int(rng.integers(len(data)))] = int(rng.integers(32, 127))
        (tmp_path / "m" / "config.json").write_bytes(bytes(data))
        try:
            cnnx.load(tmp_path / "m")
            outcomes.add("loaded")
        except ModelFormatError:
            outcomes.add("refused")
    assert "refused" in outcomes


def test_load_of_nothing_or_a_file(tmp_path):
    with pytest.raises(ModelFormatError, match="no such directory"):
        cnnx.load(tmp_path / "absent")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="received a file"):
        cnnx.load(tmp_path / "file")
    assert issubclass(ModelFormatError, ValueError)


def test_save_refuses_to_clobber_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a directory written by cnnx.save"):
        small_net().save(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    small_net().save(tmp_path / "empty")  # an empty directory is fine
    cnnx.load(tmp_path / "empty")


# ------------------------------------------------------------------------------ atomicity ----
class Crash(BaseException):
    """Stands for the process dying at a given point of a save."""


@pytest.mark.parametrize("crash_at", [0, 1, 2, 3], ids=["rename-old-bak", "path-to-bak", "tmp-to-path", "drop-bak"])
def test_crash_at_any_rename_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, crash_at):
    path = tmp_path / "m"
    old, new = small_net(seed=0), small_net(seed=1)
    old.save(path)
    old.save(path)  # a second save: leaves a clean path, no .bak
    (tmp_path / "m.bak").mkdir()  # and a stale backup, which the next save must clear first
    old.save(tmp_path / "m.bak")

    calls = []
    real_rename = os.rename

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) - 1 == crash_at:
            raise Crash
        real_rename(src, dst)

    monkeypatch.setattr(cnnx.io.os, "rename", rename)
    try:
        new.save(path)
    except Crash:
        pass
    monkeypatch.setattr(cnnx.io.os, "rename", real_rename)

    loaded = cnnx.load(path)
    assert_same_weights(loaded, new if crash_at >= 3 else old)
    # The next save completes and leaves nothing behind.
    new.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert_same_weights(cnnx.load(path), new)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"m.tmp-{dead.pid}-0badf00d"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (tmp_path / f"m.tmp-{os.getpid()}-12345678").mkdir()  # our own, from an earlier failed save
    (tmp_path / "m2.tmp-1-00").mkdir()  # another save's: not ours to remove
    small_net().save(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m2.tmp-1-00"]


SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import cnnx
    from cnnx.layers import Conv2D, Dense, Flatten, MaxPool2D
    from cnnx.network import Network

    net = Network([Conv2D(1, 3, 3, padding="same"), MaxPool2D(2), Flatten(), Dense(48, 3)], input_shape=(1, 8, 8))
    net.compile("SoftmaxCrossEntropy", "Adam")
    k = 0
    while True:
        for _, p, _ in net.parameters():
            p.fill(k)  # every array of version k holds k: a mixed checkpoint would show
        net.history["loss"].append(float(k))
        net.save(sys.argv[1])
        if k == 0:
            print("ready", flush=True)
        k += 1
    """
)


def test_sigkill_during_saves_never_leaves_an_unloadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(Path(cnnx.__file__).resolve().parent.parent))
    delays = random.Random(4).sample([i / 100 for i in range(50)], 6)
    last = -1
    for delay in delays:
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline() == b"ready\n"
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        net = cnnx.load(path)
        values = {float(v) for _, p, _ in net.parameters() for v in np.unique(p)}
        assert len(values) == 1, f"a checkpoint mixing versions {values}"
        (k,) = values
        assert net.history["loss"] == [float(i) for i in range(int(k) + 1)]
        assert k >= 0 and net.compiled
        last = max(last, k)
    assert last > 0  # the kills did land in later saves, not only the first one
    # The next save clears whatever the killed processes left behind.
    cnnx.save(net, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ------------------------------------------------------------------------------ checkpoint ---
def test_model_checkpoint_every_n_epochs_with_formatted_path(tmp_path):
    x, y = toy_data()
    net = small_net()
    cb = cnnx.ModelCheckpoint(str(tmp_path / "e{epoch:02d}-{loss:.2f}"), every=2)
    net.fit(x, y, epochs=5, batch_size=8, shuffle=False, verbose=0, callbacks=[cb])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n[:3] for n in names] == ["e02", "e04"]
    at4 = cnnx.load(cb.last_saved)
    assert len(at4.history["loss"]) == 4
    assert names[1] == f"e04-{at4.history['loss'][-1]:.2f}"


def test_model_checkpoint_final_save_resumes(tmp_path):
    x, y = toy_data()
    net = small_net()
    net.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0, callbacks=[cnnx.ModelCheckpoint(tmp_path / "c")])
    loaded = cnnx.load(tmp_path / "c")
    assert_same_weights(loaded, net)
    assert loaded.history == net.history


def _drive(cb, net, values, monitor="val_loss"):
    """Feed ``cb`` epochs with the given monitored values; return the epochs it saved at."""
    saved = []
    cb.set_network(net)
    cb.on_train_begin({})
    for epoch, value in enumerate(values):
        net.history["loss"].append(0.0)
        net.history.setdefault(monitor, []).append(value)
        before = cb.last_saved, cb.best
        cb.on_epoch_end(epoch, {"loss": 0.0, monitor: value})
        if (cb.last_saved, cb.best) != before:
            saved.append(len(net.history["loss"]))
    return saved


@pytest.mark.parametrize(
    "monitor, mode, values, expected",
    [
        ("val_loss", "auto", [0.9, 0.7, 0.8, 0.6, 0.6], [1, 2, 4]),
        ("val_accuracy", "auto", [0.5, 0.4, 0.7, 0.7, 0.9], [1, 3, 5]),
        ("val_loss", "max", [0.9, 0.7, 1.0], [1, 3]),
    ],
    ids=["min-auto", "max-auto", "max-explicit"],
)
def test_model_checkpoint_save_best_only(tmp_path, monitor, mode, values, expected):
    net = small_net()
    cb = cnnx.ModelCheckpoint(tmp_path / "best", save_best_only=True, monitor=monitor, mode=mode)
    assert _drive(cb, net, values, monitor) == expected
    assert cnnx.load(tmp_path / "best").history[monitor][-1] == cb.best


def test_model_checkpoint_best_survives_resume(tmp_path):
    net = small_net()
    cb = cnnx.ModelCheckpoint(tmp_path / "best", save_best_only=True, save_weights_only=False)
    _drive(cb, net, [0.5, 0.3])
    net.save(tmp_path / "run")
    resumed = cnnx.load(tmp_path / "run")
    # A new callback on the resumed run starts from the best in the history: 0.4 is no improvement.
    cb2 = cnnx.ModelCheckpoint(tmp_path / "best", save_best_only=True)
    assert _drive(cb2, resumed, [0.4, 0.2]) == [4]
    assert cnnx.load(tmp_path / "best").history["val_loss"] == [0.5, 0.3, 0.4, 0.2]


def test_model_checkpoint_warns_when_metric_missing(tmp_path):
    net = small_net()
    cb = cnnx.ModelCheckpoint(tmp_path / "best", save_best_only=True)
    cb.set_network(net)
    net.history["loss"].append(1.0)
    with pytest.warns(RuntimeWarning, match="val_loss"):
        cb.on_epoch_end(0, {"loss": 1.0})
    assert not (tmp_path / "best").exists()


def test_model_checkpoint_weights_only(tmp_path):
    x, y = toy_data()
    net = small_net()
    net.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0,
            callbacks=[cnnx.ModelCheckpoint(tmp_path / "w.npz", save_weights_only=True)])
    other = small_net(seed=3)
    other.load_weights(tmp_path / "w.npz")
    assert_same_weights(other, net)


@pytest.mark.parametrize(
    "kwargs, error",
    [({"every": 0}, ValueError), ({"mode": "best"}, ValueError), ({"monitor": 3}, TypeError)],
    ids=["every", "mode", "monitor"],
)
def test_model_checkpoint_validates_arguments(tmp_path, kwargs, error):
    with pytest.raises(error):
        cnnx.ModelCheckpoint(tmp_path / "c", **kwargs)


# ------------------------------------------------------------------------------ compat -------
def test_format_v1_save_still_loads():
    """tests/data/compat_v1 was written by tools/make_compat_model.py with format version 1."""
    net = cnnx.load(DATA / "compat_v1")
    with np.load(DATA / "compat_v1_expected.npz", allow_pickle=False) as f:
        x, expected = f["x"], f["predictions"]
    # Bit-equal on the machine that wrote it; another BLAS may round the last bits differently.
    np.testing.assert_allclose(net.predict(x), expected, rtol=1e-5, atol=1e-7)
    assert net.compiled and net.optimizer.state_dict()["step"] == 4
    assert len(net.history["loss"]) == 1
