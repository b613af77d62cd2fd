"""cnnx.onnx.export: standard ONNX models that onnxruntime runs to net.predict's outputs.

Every zoo model and two networks using every layer are exported, checked with onnx.checker
(independently of the exporter's own check) and run in onnxruntime in float32; outputs must agree
with ``net.predict`` to 1e-5. The ``cnnx export`` command is tested here too.
"""
import sys

import numpy as np
import pytest

import cnnx
from cnnx import cli
from cnnx.layers import AvgPool2D, Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU
from export_nets import has_new_layers, image_net, new_layers_net, randomized, sequence_net

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import cnnx.onnx  # noqa: E402  (after the skip: needs onnx)

TOL = 1e-5  # float32 in two runtimes with different summation orders


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": x.astype(np.float32)})[0]


def max_difference(net, path, x):
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return float(np.max(np.abs(run_onnx(path, x) - net.predict(x))))


def test_import_finds_the_real_onnx_package():
    # cnnx/onnx.py must not shadow the onnx package it imports.
    assert cnnx.onnx is not onnx and sys.modules["onnx"] is onnx
    assert "cnnx" not in onnx.__file__.replace("\\", "/").split("/")[-2]
    assert hasattr(onnx, "checker") and hasattr(cnnx.onnx, "export")


@pytest.mark.parametrize("name", sorted(cnnx.models.MODELS))
@pytest.mark.parametrize("compiled", [True, False], ids=["probabilities", "logits"])
def test_zoo_model_runs_in_onnxruntime_like_predict(name, compiled, tmp_path, rng):
    net = randomized(cnnx.models.build(name, seed=0), weights=False)  # BatchNorm statistics != (0, 1)
    if compiled:  # predict then returns softmax probabilities, and so must the ONNX model
        net.compile(cnnx.losses.SoftmaxCrossEntropy(), cnnx.optimizers.Adam())
    model = cnnx.onnx.export(net, tmp_path / "m.onnx")
    assert model.opset_import[0].version == 17
    x = rng.standard_normal((6,) + net.input_shape).astype(np.float32)
    diff = max_difference(net, tmp_path / "m.onnx", x)
    print(f"\nONNX max |onnxruntime - predict| {name} ({'probabilities' if compiled else 'logits'}): {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("opset", [17, 20], ids=["opset17-gelu-decomposed", "opset20-gelu-node"])
@pytest.mark.parametrize("build", [image_net, sequence_net], ids=["image-layers", "sequence-layers"])
def test_every_layer_exports(build, opset, tmp_path, rng):
    net = build("float32")
    cnnx.onnx.export(net, tmp_path / "m.onnx", opset=opset)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert ("Gelu" in ops) == (opset >= 20)
    for batch in (1, 5):  # the batch axis is free
        x = rng.standard_normal((batch,) + net.input_shape).astype(np.float32)
        assert max_difference(net, tmp_path / "m.onnx", x) <= TOL


@pytest.mark.skipif(not has_new_layers(), reason="needs LayerNorm, global pools, Concat, grouped Conv2D")
@pytest.mark.parametrize("opset", [17, 20])
def test_new_layers_export(opset, tmp_path, rng):
    net = new_layers_net("float32")
    cnnx.onnx.export(net, tmp_path / "m.onnx", opset=opset)
    x = rng.standard_normal((4,) + net.input_shape).astype(np.float32)
    assert max_difference(net, tmp_path / "m.onnx", x) <= TOL


def test_asymmetric_pool_padding_and_float64_network(tmp_path, rng):
    net = cnnx.Network([
        Conv2D(2, 3, 3, padding=((0, 2), (1, 0)), activation="leaky_relu", negative_slope=0.3, rng=0),
        MaxPool2D(3, stride=2, padding=((1, 0), (0, 1))),
        AvgPool2D(2, stride=1, padding=((0, 1), (1, 0))),
        Flatten(), Dense(3 * 4 * 4, 4, rng=1),
    ], (2, 9, 9), dtype="float64")
    model = cnnx.onnx.export(net, tmp_path / "m.onnx")
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT}
    x = rng.standard_normal((3, 2, 9, 9))
    assert max_difference(net, tmp_path / "m.onnx", x) <= TOL


def test_output_raw_skips_the_softmax_and_initializers_are_named_by_layer(tmp_path, rng):
    net = cnnx.models.lenet5(seed=0)
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), cnnx.optimizers.Adam())
    model = cnnx.onnx.export(net, tmp_path / "m.onnx", output="raw")
    assert "Softmax" not in {node.op_type for node in model.graph.node}
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x), net.forward(x), atol=TOL, rtol=0)
    names = {t.name for t in model.graph.initializer}
    assert {key for key, _, _ in net.parameters()} <= names


def test_binary_classifier_on_logits_exports_the_sigmoid(tmp_path, rng):
    net = cnnx.Network([Dense(6, 8, activation="tanh", rng=0), Dense(8, 1, rng=1)], (6,))
    net.compile(cnnx.losses.BinaryCrossEntropyWithLogits(), cnnx.optimizers.SGD(lr=0.1))
    model = cnnx.onnx.export(net, tmp_path / "m.onnx")
    assert model.graph.node[-1].op_type == "Sigmoid"
    x = 3 * rng.standard_normal((5, 6)).astype(np.float32)
    assert max_difference(net, tmp_path / "m.onnx", x) <= TOL


def test_metadata_is_stored(tmp_path):
    model = cnnx.onnx.export(cnnx.models.lenet5(seed=0), tmp_path / "m.onnx", metadata={"classes": "a,b"})
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props} == {"classes": "a,b"}
    assert model.producer_name == "cnnx"


def test_unknown_layer_is_named_and_an_existing_file_is_kept(tmp_path):
    class Mystery(Layer):
        def forward(self, x, training=False):
            return x

    try:
        net = cnnx.Network([Dense(4, 4), Mystery(), ReLU()], (4,))
        target = tmp_path / "m.onnx"
        target.write_bytes(b"previous")
        with pytest.raises(NotImplementedError, match=r"layer 1 \(Mystery\).*converter\('Mystery'\)"):
            cnnx.onnx.export(net, target)
        assert target.read_bytes() == b"previous"
        assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind
    finally:
        cnnx.layers.LAYER_CLASSES.pop("Mystery", None)


def test_a_registered_converter_is_used(tmp_path, rng):
    class Double(Layer):
        def forward(self, x, training=False):
            return 2 * x

    @cnnx.onnx.converter("Double")
    def _double(g, layer, x, shape):
        return g.node("Mul", [x, g.scalar(2.0)])

    try:
        net = cnnx.Network([Dense(4, 3, rng=0), Double()], (4,))
        cnnx.onnx.export(net, tmp_path / "m.onnx")
        x = rng.standard_normal((2, 4)).astype(np.float32)
        assert max_difference(net, tmp_path / "m.onnx", x) <= TOL
    finally:
        cnnx.onnx.CONVERTERS.pop("Double", None)
        cnnx.layers.LAYER_CLASSES.pop("Double", None)


def test_bad_arguments(tmp_path):
    net = cnnx.models.lenet5(seed=0)
    with pytest.raises(ValueError, match="opset an int in"):
        cnnx.onnx.export(net, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match="output 'predict' or 'raw'"):
        cnnx.onnx.export(net, tmp_path / "m.onnx", output="logits")
    with pytest.raises(ValueError, match="existing directory"):
        cnnx.onnx.export(net, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="to a file"):
        cnnx.onnx.export(net, tmp_path)
    with pytest.raises(TypeError, match="cnnx Network"):
        cnnx.onnx.export(net.layers, tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="metadata"):
        cnnx.onnx.export(net, tmp_path / "m.onnx", metadata={"a": 1})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- cnnx export ----
@pytest.fixture
def saved_run(tmp_path):
    net = randomized(cnnx.models.resnet8(seed=0), weights=False)
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), cnnx.optimizers.Adam())
    net.save(tmp_path / "run")
    (tmp_path / "run" / cli.PREPROCESSING_FILE).write_text('{"mean": [0.5], "std": [0.25], "class_names": ["a"]}')
    return net, tmp_path / "run"


def test_cli_export_writes_onnx_and_state_dict(saved_run, tmp_path, capsys, rng):
    net, run = saved_run
    code = cli.main(["export", str(run), "--onnx", str(tmp_path / "m.onnx"), "--state-dict", str(tmp_path / "w.npz")])
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    x = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert max_difference(net, tmp_path / "m.onnx", x) <= TOL
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert '"std": [0.25]' in meta["cnnx.preprocessing"]
    with np.load(tmp_path / "w.npz") as data:
        assert sorted(data.files) == sorted(net.state_dict())
        np.testing.assert_array_equal(data["0.weight"], net.layers[0].params["weight"])  # exact: a file copy


@pytest.mark.parametrize("args, message", [
    (["{run}"], "nothing to export"),
    (["{tmp}/absent", "--onnx", "{tmp}/m.onnx"], "does not exist"),
    (["{run}", "--onnx", "{tmp}/no/such/m.onnx"], "does not exist"),
    (["{run}", "--state-dict", "{tmp}"], "is a directory"),
    (["{run}", "--onnx", "{tmp}/m.onnx", "--opset", "9"], "opset"),
], ids=["no-output", "missing-run", "missing-directory", "directory-as-file", "old-opset"])
def test_cli_export_errors_are_one_line(saved_run, tmp_path, capsys, args, message):
    _, run = saved_run
    argv = ["export"] + [a.format(run=run, tmp=tmp_path) for a in args]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("cnnx: error:") and message in err and err.count("\n") == 1
