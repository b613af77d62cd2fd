"""Smoke tests of the examples added for issue 8: each main() runs end to end on a few images.

The examples are scripts, not part of the package, so they are imported from ``examples/`` by
path. Fashion-MNIST is the sample shipped with cnnx, cut down further (the test images too) so the
whole file takes seconds; the numbers are not checked, only that the scripts finish and report.
"""
import importlib.util
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from cnnx import datasets

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_fashion_mnist(monkeypatch):
    """load_fashion_mnist(sample=True), keeping 200 training and 100 test images."""
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(sample=True)
    small = ((x_train[:200], y_train[:200]), (x_test[:100], y_test[:100]))
    monkeypatch.setattr(datasets, "load_fashion_mnist", lambda path=None, sample=False: small)


def test_conv_autoencoder(tiny_fashion_mnist, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    example = load_example("conv_autoencoder")
    example.main(["--sample", "--epochs", "1", "--limit", "150", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "150 training, 100 test images" in out
    assert "conv autoencoder, 18,817 parameters" in out
    assert "dense autoencoder" in out
    assert (tmp_path / "denoising.png").stat().st_size > 0
    assert (tmp_path / "model" / "config.json").is_file()


def test_dense_comparison_has_a_similar_size():
    example = load_example("conv_autoencoder")
    conv = example.conv_autoencoder()
    dense = example.dense_autoencoder(example.hidden_for(conv.num_params))
    assert abs(dense.num_params - conv.num_params) <= 1569 / 2 + 1   # the nearest hidden width
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    for net in (conv, dense):
        y = net.predict(x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1   # Sigmoid pixels


def test_conv1d_sequences(tiny_fashion_mnist, tmp_path, capsys):
    example = load_example("conv1d_sequences")
    example.main(["--sample", "--epochs", "1", "--out", str(tmp_path / "net")])
    out = capsys.readouterr().out
    assert "180 training, 20 validation, 100 test sequences of shape (28, 28)" in out
    assert "test accuracy:" in out
    assert (tmp_path / "net" / "config.json").is_file()


def test_sequences_are_rows_as_steps():
    example = load_example("conv1d_sequences")
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28)
    seq = example.as_sequences(images)
    # channel j at step t is the pixel in row t, column j
    assert seq.shape == (2, 28, 28) and seq[1, 5, 9] == images[1, 9, 5]


def test_resnet8_without_cifar10_exits_1_and_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNNX_DATA", str(tmp_path))
    example = load_example("resnet8_cifar10")
    with pytest.raises(SystemExit) as exc:
        example.main(["--out", str(tmp_path / "net")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "CIFAR-10 not found" in err and str(tmp_path) in err and "cifar-10-python.tar.gz" in err
    assert "Traceback" not in err


def test_resnet8_on_fake_cifar10_batches(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 10)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (data / name).write_bytes(pickle.dumps(batch, protocol=4))
    example = load_example("resnet8_cifar10")
    example.main(["--data", str(data), "--epochs", "1", "--out", str(tmp_path / "net")])
    out = capsys.readouterr().out
    assert "36 training, 4 validation, 10 test images" in out
    assert "test accuracy:" in out
    assert (tmp_path / "net" / "config.json").is_file()


EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_help_shows_every_default(name, capsys):
    """Defect: the examples' --help showed no defaults. Each option now says its default
    (ArgumentDefaultsHelpFormatter), e.g. '--epochs EPOCHS  passes over ... (default: 3)'."""
    example = load_example(name)
    with pytest.raises(SystemExit) as exc:
        example.main(["--help"])
    assert exc.value.code == 0
    options = capsys.readouterr().out.split("options:", 1)[1]
    # One block per option: from a line starting with "  -" to the next such line.
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    blocks = [b for b in blocks if not b.lstrip().startswith("-h, --help")]
    assert len(blocks) >= 3, options
    for block in blocks:
        assert "(default: " in " ".join(block.split()), block


def test_dense_autoencoder_labels_rows_as_the_readme_says(tiny_fashion_mnist, tmp_path, monkeypatch, capsys):
    """Defect: dense_autoencoder.py labelled its middle row "reconstructed" while the README
    says the grid is noisy/denoised/clean."""
    pytest.importorskip("matplotlib")
    from cnnx import visualize

    readme = (EXAMPLES.parent / "README.md").read_text()
    for name in ("dense_autoencoder", "conv_autoencoder"):
        row = next(line for line in readme.splitlines() if f"examples/{name}.py" in line)
        assert "noisy/denoised/clean" in row
    labels = []
    original = visualize.plot_reconstructions

    def recording(*args, **kwargs):
        fig = original(*args, **kwargs)
        labels.append([ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()])
        return fig

    monkeypatch.setattr(visualize, "plot_reconstructions", recording)
    example = load_example("dense_autoencoder")
    example.main(["--sample", "--epochs", "1", "--out", str(tmp_path)])
    assert labels == [["noisy", "denoised", "clean"]]
    assert (tmp_path / "denoising.png").stat().st_size > 0
