"""Winograd F(2x2, 3x3) forward against the naive reference over 3x3 / stride-1 geometries."""
import itertools

import numpy as np
import pytest

import cnnx.functional as F
import reference as ref
from test_functional import PADDINGS, TOL, non_contiguous

CASES = list(itertools.product([np.float32, np.float64], PADDINGS, [(7, 9), (8, 8), (5, 6)], [1, 3]))


@pytest.mark.parametrize("dtype,pad_name,hw,batch", CASES,
                         ids=[f"{np.dtype(d).name}-{p}-{h}x{w}-n{b}" for d, p, (h, w), b in CASES])
def test_winograd_forward_matches_reference(dtype, pad_name, hw, batch, rng, monkeypatch):
    monkeypatch.setattr(F, "WINOGRAD_MIN_CHANNELS", 1)
    pads = PADDINGS[pad_name]
    x = rng.standard_normal((batch, 4) + hw).astype(dtype)
    if batch > 1:
        x = non_contiguous(x)
    w = rng.standard_normal((5, 4, 3, 3)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    assert F.conv_algorithm(4, (3, 3), (1, 1)) == "winograd"
    y = F.conv2d(x, w, b, padding=pads, activation="leaky_relu", negative_slope=0.1)
    z = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), (1, 1), pads)
    np.testing.assert_allclose(y, np.where(z > 0, z, 0.1 * z), **TOL[dtype])
