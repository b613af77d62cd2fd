"""Augmentations against per-image loop references, seeding, composition, and their use in fit
(training batches only, reproducible with a seed)."""
import numpy as np
import pytest

import cnnx
from cnnx.augment import Compose, Cutout, RandomCrop, RandomHorizontalFlip, RandomTranslation, from_names
from cnnx.layers import Conv2D, Dense, Flatten, ReLU
from cnnx.optimizers import SGD


def images(rng, n=6, c=3, h=7, w=9, dtype=np.float32):
    return rng.normal(size=(n, c, h, w)).astype(dtype)


def shift_reference(img, dy, dx):
    """Out pixel (i, j) = in pixel (i - dy, j - dx), zero outside: the obvious double loop."""
    c, h, w = img.shape
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            si, sj = i - dy, j - dx
            if 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = img[:, si, sj]
    return out


def test_random_crop_is_a_padded_crop(rng):
    x = images(rng)
    p = 3
    out = RandomCrop(padding=p)(x, np.random.default_rng(5))
    # the same draws, replayed: offsets in [-p, p] per image and axis
    draw = np.random.default_rng(5)
    dy = draw.integers(-p, p + 1, size=len(x))
    dx = draw.integers(-p, p + 1, size=len(x))
    for k in range(len(x)):
        # torchvision's RandomCrop(padding=p) takes the window at (p - dy, p - dx) of the padded image
        padded = np.pad(x[k], ((0, 0), (p, p), (p, p)))
        top, left = p - dy[k], p - dx[k]
        np.testing.assert_array_equal(out[k], padded[:, top:top + x.shape[2], left:left + x.shape[3]])
        np.testing.assert_array_equal(out[k], shift_reference(x[k], dy[k], dx[k]))
    assert out.dtype == x.dtype and out.shape == x.shape


def test_translation_shifts_within_the_fraction(rng):
    x = images(rng, n=40, c=1, h=10, w=20)
    out = RandomTranslation(height_factor=0.2, width_factor=0.1)(x, np.random.default_rng(1))
    draw = np.random.default_rng(1)
    dy = draw.integers(-2, 3, size=40)
    dx = draw.integers(-2, 3, size=40)
    for k in range(40):
        np.testing.assert_array_equal(out[k], shift_reference(x[k], dy[k], dx[k]))
    assert set(dy) == {-2, -1, 0, 1, 2}


def test_flip_mirrors_the_chosen_images(rng):
    x = images(rng, n=50)
    out = RandomHorizontalFlip(p=0.5)(x, np.random.default_rng(2))
    flipped = np.random.default_rng(2).random(50) < 0.5
    np.testing.assert_array_equal(out[flipped], x[flipped][..., ::-1])
    np.testing.assert_array_equal(out[~flipped], x[~flipped])
    assert 10 < flipped.sum() < 40
    np.testing.assert_array_equal(RandomHorizontalFlip(p=1.0)(x, rng), x[..., ::-1])


def test_cutout_zeros_one_square_per_image(rng):
    x = np.ones((30, 2, 12, 12), dtype=np.float64)
    out = Cutout(size=4)(x, np.random.default_rng(3))
    draw = np.random.default_rng(3)
    cy = draw.integers(0, 12, size=30)
    cx = draw.integers(0, 12, size=30)
    for k in range(30):
        expected = np.ones((12, 12))
        expected[max(cy[k] - 2, 0):max(cy[k] + 2, 0), max(cx[k] - 2, 0):max(cx[k] + 2, 0)] = 0
        np.testing.assert_array_equal(out[k, 0], expected)
        np.testing.assert_array_equal(out[k, 1], expected)  # same square on every channel
    np.testing.assert_array_equal(Cutout(size=4, p=0.0)(x, rng), x)


def test_never_writes_into_the_input_and_repeats_with_the_same_seed(rng):
    x = images(rng, n=8)
    before = x.copy()
    aug = Compose([RandomCrop(2), RandomHorizontalFlip(), RandomTranslation(0.2), Cutout(3)])
    a = aug(x, np.random.default_rng(11))
    b = aug(x, np.random.default_rng(11))
    c = aug(x, np.random.default_rng(12))
    np.testing.assert_array_equal(x, before)
    # same generator state -> the same draws -> identical arrays (pure integer indexing and
    # zeroing, so equality is exact)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_compose_equals_sequential_application(rng):
    x = images(rng)
    crop, flip, cut = RandomCrop(2), RandomHorizontalFlip(), Cutout(3)
    composed = Compose([crop, flip, cut])(x, np.random.default_rng(4))
    g = np.random.default_rng(4)
    by_hand = cut(flip(crop(x, g), g), g)
    np.testing.assert_array_equal(composed, by_hand)


def test_from_names():
    aug = from_names("crop,flip,translate,cutout", image_size=32)
    assert [type(a) for a in aug.augmentations] == [RandomCrop, RandomHorizontalFlip, RandomTranslation, Cutout]
    assert aug.augmentations[0].padding == 4 and aug.augmentations[3].size == 8
    with pytest.raises(ValueError, match="rotate"):
        from_names("crop,rotate", image_size=32)


@pytest.mark.parametrize("build, match", [
    (lambda: RandomCrop(-1), "padding"),
    (lambda: RandomHorizontalFlip(1.5), r"p in \[0, 1\]"),
    (lambda: RandomTranslation(1.0), "height_factor"),
    (lambda: Cutout(0), "size"),
    (lambda: Compose([RandomCrop(), "flip"]), "index 1"),
])
def test_bad_arguments(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_bad_batch(rng):
    with pytest.raises(ValueError, match=r"\(n, c, h, w\)"):
        RandomCrop(2)(np.zeros((3, 8, 8)), rng)
    with pytest.raises(TypeError, match="Generator"):
        RandomCrop(2)(np.zeros((1, 1, 8, 8)), 3)


# ---------------------------------------------------------------------------------- in fit -----
def convnet(seed=0):
    gen = np.random.default_rng(seed)
    return cnnx.Network([Conv2D(1, 4, 3, padding=1, rng=gen), ReLU(), Flatten(), Dense(4 * 8 * 8, 3, rng=gen)],
                        input_shape=(1, 8, 8), dtype="float64")


def data(n, seed):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, 1, 8, 8)), r.integers(0, 3, n)


class Spy(RandomHorizontalFlip):
    """Records what fit hands it and what it returns."""

    def __init__(self):
        super().__init__(p=0.5)
        self.seen = []

    def _transform(self, x, rng, owned):
        before = x.copy()  # with owned=True (fit's own buffer) the flip works in place
        out = super()._transform(x, rng, owned)
        self.seen.append((before, out.copy()))
        return out


@pytest.mark.parametrize("shuffle", [True, False])
def test_fit_augments_training_batches_only_and_repeats_with_a_seed(shuffle):
    x, y = data(20, seed=1)
    xv, yv = data(10, seed=2)
    x_before = x.copy()
    runs = []
    for _ in range(2):
        spy = Spy()
        net = convnet().compile("SoftmaxCrossEntropy", SGD(lr=0.05))
        net.fit(x, y, epochs=2, batch_size=8, validation_data=(xv, yv), seed=3, shuffle=shuffle, verbose=0,
                augment=[spy])
        runs.append((spy, net))
    (spy, net), (spy2, net2) = runs
    np.testing.assert_array_equal(x, x_before)  # the user's array is never written
    assert len(spy.seen) == 2 * 3  # every training batch, nothing else (no validation batch)
    assert any(not np.array_equal(a, b) for a, b in spy.seen)  # some image was flipped
    for (a1, b1), (a2, b2) in zip(spy.seen, spy2.seen):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)
    np.testing.assert_allclose(net.history["loss"], net2.history["loss"], rtol=1e-12)
    # the validation score fit recorded is the plain evaluation of the final network
    assert net.history["val_loss"][-1] == pytest.approx(net.evaluate(xv, yv)["loss"], rel=1e-12)


def test_fit_augmentation_continues_after_save_load(tmp_path):
    x, y = data(16, seed=4)
    aug = Compose([RandomCrop(1), RandomHorizontalFlip()])
    full = convnet().compile("SoftmaxCrossEntropy", SGD(lr=0.05))
    full.fit(x, y, epochs=3, batch_size=8, seed=9, verbose=0, augment=aug)
    part = convnet().compile("SoftmaxCrossEntropy", SGD(lr=0.05))
    part.fit(x, y, epochs=2, batch_size=8, seed=9, verbose=0, augment=aug)
    part.save(tmp_path / "m")
    resumed = cnnx.load(tmp_path / "m")
    resumed.fit(x, y, epochs=1, batch_size=8, seed=9, verbose=0, augment=aug)
    np.testing.assert_allclose(resumed.history["loss"], full.history["loss"], rtol=1e-10)


def test_fit_refuses_augment_for_non_images():
    net = cnnx.Network([Dense(4, 2)], input_shape=(4,)).compile("SoftmaxCrossEntropy", SGD(lr=0.1))
    with pytest.raises(ValueError, match=r"image inputs \(c, h, w\) for augment"):
        net.fit(np.zeros((4, 4)), np.zeros(4, dtype=int), augment=RandomCrop(1), verbose=0)
    with pytest.raises(TypeError, match="augment"):
        net.fit(np.zeros((4, 4)), np.zeros(4, dtype=int), augment="crop", verbose=0)
