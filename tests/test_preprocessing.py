"""Tests for cnnx.preprocessing: scaling, standardisation, one-hot labels, splits, channel axis."""
import numpy as np
import pytest

from cnnx.preprocessing import (
    Standardizer,
    add_channel_axis,
    from_one_hot,
    one_hot,
    scale,
    standardize,
    train_val_split,
)


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


# --------------------------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------------------------
def test_scale_uint8(rng):
    x = rng.integers(0, 256, size=(3, 5, 5), dtype=np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 255
    y = scale(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x.astype(np.float64) / 255, rtol=1e-6)
    assert y[0, 0, 0] == 0 and y[0, 0, 1] == 1
    assert scale(x, dtype=np.float64).dtype == np.float64


def test_scale_float_is_not_divided(rng):
    x = rng.random((2, 3)).astype(np.float64)
    y = scale(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x, rtol=1e-6)
    x32 = x.astype(np.float32)
    assert scale(x32) is x32  # nothing to do, no copy


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.bool_], ids=str)
def test_scale_refuses_ambiguous_dtypes(dtype):
    with pytest.raises(TypeError, match="uint8.*received"):
        scale(np.zeros(4, dtype=dtype))


def test_scale_refuses_integer_output_dtype():
    with pytest.raises(TypeError, match="float32 or float64"):
        scale(np.zeros(4, np.uint8), dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Standardizer
# --------------------------------------------------------------------------------------------
def test_standardizer_per_channel_nchw(rng):
    offsets = np.array([0.0, 5.0, -3.0]).reshape(1, 3, 1, 1)
    spreads = np.array([1.0, 0.1, 4.0]).reshape(1, 3, 1, 1)
    x_train = (rng.standard_normal((50, 3, 6, 6)) * spreads + offsets).astype(np.float32)
    s = Standardizer()
    z = s.fit_transform(x_train)
    assert z.dtype == np.float32 and s.mean_.shape == (3,)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-5)
    # Test data uses the *training* statistics: a shift of 1 in channel 1 becomes 1 / std.
    x_test = x_train + np.float32(1)
    np.testing.assert_allclose(s.transform(x_test).mean(axis=(0, 2, 3)),
                               1 / s.std_, rtol=1e-4)


def test_standardizer_global_for_grey_images(rng):
    x = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    s = Standardizer().fit(x)
    assert s.mean_.shape == ()
    z = s.transform(x)
    assert z.dtype == np.float32  # integer input -> float32
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-5
    np.testing.assert_allclose(s.mean_, x.mean(dtype=np.float64))


def test_standardizer_forced_modes(rng):
    x = rng.standard_normal((10, 2, 4, 4))
    assert Standardizer(per_channel=False).fit(x).mean_.shape == ()
    assert Standardizer(per_channel=True).fit(x[:, 0]).mean_.shape == (4,)  # (n, c, length)


def test_standardizer_constant_channel_no_nan(rng):
    x = rng.standard_normal((10, 2, 3, 3))
    x[:, 1] = 7.0
    z = Standardizer().fit_transform(x)
    assert np.all(np.isfinite(z))
    np.testing.assert_array_equal(z[:, 1], 0)


def test_standardizer_state_round_trip(tmp_path, rng):
    x = rng.standard_normal((20, 3, 4, 4)).astype(np.float32) * 3 + 1
    s = Standardizer().fit(x)
    np.savez(tmp_path / "s.npz", **s.get_state())
    with np.load(tmp_path / "s.npz", allow_pickle=False) as state:
        s2 = Standardizer().set_state(state)
    np.testing.assert_array_equal(s2.transform(x), s.transform(x))


def test_standardizer_errors(rng):
    with pytest.raises(RuntimeError, match="fit"):
        Standardizer().transform(np.zeros((2, 3, 4, 4)))
    s = Standardizer().fit(rng.standard_normal((4, 3, 2, 2)))
    with pytest.raises(ValueError, match="3 channels.*received: x.shape=\\(4, 1, 2, 2\\)"):
        s.transform(np.zeros((4, 1, 2, 2)))
    with pytest.raises(ValueError, match="finite"):
        Standardizer().fit(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="at least one sample"):
        Standardizer().fit(np.zeros((0, 3, 2, 2)))
    with pytest.raises(ValueError, match="std"):
        Standardizer().set_state({"mean": np.zeros(3), "std": np.array([1.0, 0.0, 1.0])})
    with pytest.raises(TypeError, match="per_channel"):
        Standardizer(per_channel="yes")


def test_standardize_fits_on_train_only(rng):
    x_train = rng.standard_normal((30, 1, 4, 4)) * 2 + 3
    x_test = rng.standard_normal((10, 1, 4, 4)) * 5 - 1
    a, b = standardize(x_train, x_test)
    s = Standardizer().fit(x_train)
    np.testing.assert_allclose(a, s.transform(x_train))
    np.testing.assert_allclose(b, s.transform(x_test))
    assert abs(b.mean()) > 0.5  # not re-fitted on the test split


# --------------------------------------------------------------------------------------------
# one-hot
# --------------------------------------------------------------------------------------------
def test_one_hot_values():
    y = one_hot([2, 0, 1, 2])
    assert y.dtype == np.float32 and y.shape == (4, 3)
    np.testing.assert_array_equal(y, [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert one_hot(np.array([1], np.uint8), n_classes=5, dtype=np.float64).shape == (1, 5)


def test_one_hot_round_trip(rng):
    labels = rng.integers(0, 10, size=200)
    y = one_hot(labels, 10)
    np.testing.assert_array_equal(y.sum(axis=1), 1)
    back = from_one_hot(y)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, labels)


def test_one_hot_accepts_whole_floats():
    np.testing.assert_array_equal(from_one_hot(one_hot(np.array([1.0, 3.0]))), [1, 3])


@pytest.mark.parametrize("labels,n_classes,exc,match", [
    ([0, -1, 2], None, ValueError, ">= 0.*-1"),
    ([0, 3], 3, ValueError, "< n_classes=3.*3"),
    ([0.5, 1.0], None, ValueError, "non-integer.*0.5"),
    ([0.0, np.nan], None, ValueError, "non-integer"),
    (["a", "b"], None, TypeError, "integer class ids"),
    ([True, False], None, TypeError, "integer class ids"),
    ([[0, 1]], None, ValueError, r"shape \(n,\)"),
    ([], None, ValueError, "n_classes"),
    ([0, 1], 0, ValueError, "positive int"),
], ids=["negative", "too-large", "fractional", "nan", "strings", "bools", "2-d", "empty",
        "zero-classes"])
def test_one_hot_bad_labels(labels, n_classes, exc, match):
    with pytest.raises(exc, match=match):
        one_hot(labels, n_classes)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (3, 0)], ids=["1-d", "3-d", "no-columns"])
def test_from_one_hot_requires_2d(shape):
    with pytest.raises(ValueError, match=r"\(n, n_classes\)"):
        from_one_hot(np.zeros(shape))


# --------------------------------------------------------------------------------------------
# train_val_split
# --------------------------------------------------------------------------------------------
@pytest.fixture
def imbalanced(rng):
    y = rng.permutation(np.repeat([0, 1, 2], [500, 300, 200]))
    x = np.arange(y.size)  # x holds the row index, so the split can be traced
    return x, y


def test_split_stratified_keeps_class_ratios(imbalanced):
    x, y = imbalanced
    (x_tr, y_tr), (x_va, y_va) = train_val_split(x, y, val_fraction=0.1, seed=3)
    np.testing.assert_array_equal(np.bincount(y_va), [50, 30, 20])
    np.testing.assert_array_equal(np.bincount(y_tr), [450, 270, 180])
    # A partition of the rows, each part in the original order, labels still attached.
    np.testing.assert_array_equal(np.sort(np.concatenate([x_tr, x_va])), x)
    assert np.all(np.diff(x_tr) > 0) and np.all(np.diff(x_va) > 0)
    np.testing.assert_array_equal(y[x_va], y_va)


def test_split_reproducible_with_seed(imbalanced):
    x, y = imbalanced
    a = train_val_split(x, y, seed=7)
    b = train_val_split(x, y, seed=7)
    c = train_val_split(x, y, seed=8)
    np.testing.assert_array_equal(a[1][0], b[1][0])
    assert not np.array_equal(a[1][0], c[1][0])


def test_split_exact_total_with_rounding():
    y = np.repeat([0, 1, 2], 7)
    (_, _), (x_va, y_va) = train_val_split(np.arange(21), y, val_fraction=0.3)
    assert x_va.size == round(21 * 0.3) == 6
    np.testing.assert_array_equal(np.bincount(y_va), [2, 2, 2])


def test_split_one_hot_labels(imbalanced):
    x, y = imbalanced
    (_, y_tr), (_, y_va) = train_val_split(x, one_hot(y), val_fraction=0.2)
    assert y_va.shape == (200, 3) and y_tr.shape == (800, 3)
    np.testing.assert_array_equal(y_va.sum(axis=0), [100, 60, 40])


def test_split_unstratified(imbalanced):
    x, y = imbalanced
    (x_tr, _), (x_va, _) = train_val_split(x, y, val_fraction=0.25, stratify=False, seed=1)
    assert x_va.size == 250 and x_tr.size == 750
    assert np.intersect1d(x_tr, x_va).size == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(val_fraction=0.0), "0 < val_fraction < 1"),
    (dict(val_fraction=1.0), "0 < val_fraction < 1"),
    (dict(y=np.zeros(9, int)), "same n"),
    (dict(y=np.full(10, -1)), ">= 0"),
], ids=["zero", "one", "length-mismatch", "negative-labels"])
def test_split_errors(kwargs, match):
    args = dict(x=np.zeros((10, 2)), y=np.zeros(10, int))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train_val_split(**args)


# --------------------------------------------------------------------------------------------
# add_channel_axis
# --------------------------------------------------------------------------------------------
def test_add_channel_axis():
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    y = add_channel_axis(x)
    assert y.shape == (2, 1, 3, 4)
    assert np.shares_memory(x, y)
    np.testing.assert_array_equal(y[:, 0], x)
    with pytest.raises(ValueError, match=r"\(n, h, w\)"):
        add_channel_axis(y)


def test_standardizer_transform_in_place_with_copy_false(rng):
    x = rng.normal(3.0, 2.0, size=(6, 3, 4, 4)).astype(np.float32)
    s = Standardizer().fit(x)
    expected = s.transform(x)
    assert expected is not x
    out = s.transform(x, copy=False)
    assert out is x  # standardised in place: no second copy of a large training set
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)


def test_standardizer_copy_false_still_copies_what_it_must_not_write(rng):
    raw = rng.integers(0, 256, size=(4, 1, 3, 3)).astype(np.uint8)
    before = raw.copy()
    s = Standardizer().fit(raw)
    out = s.transform(raw, copy=False)  # uint8 -> float32: a new array, the input untouched
    assert out.dtype == np.float32 and out is not raw
    np.testing.assert_array_equal(raw, before)
    frozen = raw.astype(np.float32)
    frozen.flags.writeable = False
    out = s.transform(frozen, copy=False)
    assert out is not frozen
    np.testing.assert_allclose(out, s.transform(frozen), rtol=1e-6)
