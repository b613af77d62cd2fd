# Type stubs for the compiled module cnnx._ops (see _ops.pyx). Arrays are C-contiguous float32 or
# float64 (one dtype per call); indices are int64. Validation happens in cnnx.functional.
import numpy as np
from numpy.typing import NDArray

Float = NDArray[np.float32] | NDArray[np.float64]

def openmp_enabled() -> bool: ...
def debug_build() -> bool: ...
def im2col(
    x: Float, first: int, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    out_h: int, out_w: int, cols: Float, n_threads: int,
) -> None: ...
def col2im(
    cols: Float, first: int, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    out_h: int, out_w: int, x: Float, n_threads: int,
) -> None: ...
def gemm_to_nchw(
    y_gemm: Float, bias: Float, has_bias: bool, rectify: bool, negative_slope: float, first: int, y: Float,
    n_threads: int,
) -> None: ...
def gemm_to_nchw_maxpool2(
    y_gemm: Float, bias: Float, has_bias: bool, rectify: bool, negative_slope: float, first: int, out_w: int,
    y: Float, n_threads: int,
) -> None: ...
def nchw_to_gemm(
    dy: Float, y: Float, rectify: bool, negative_slope: float, first: int, dy_gemm: Float,
    dbias_partial: NDArray[np.float64], n_threads: int,
) -> None: ...
def max_pool2d(
    x: Float, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    y: Float, indices: NDArray[np.int64], with_indices: bool, n_threads: int,
) -> None: ...
def max_pool2d_backward(dy: Float, indices: NDArray[np.int64], dx: Float, n_threads: int) -> int: ...
def avg_pool2d(
    x: Float, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int, y: Float, n_threads: int,
) -> None: ...
def avg_pool2d_backward(
    dy: Float, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int, dx: Float, n_threads: int,
) -> None: ...
def im2col_dilated(
    x: Float, first: int, kh: int, kw: int, sy: int, sx: int, dil_y: int, dil_x: int, pad_top: int,
    pad_left: int, out_h: int, out_w: int, cols: Float, n_threads: int,
) -> None: ...
def col2im_dilated(
    cols: Float, first: int, kh: int, kw: int, sy: int, sx: int, dil_y: int, dil_x: int, pad_top: int,
    pad_left: int, out_h: int, out_w: int, x: Float, n_threads: int,
) -> None: ...
def depthwise_conv2d(
    x: Float, weight: Float, bias: Float, has_bias: bool, sy: int, sx: int, dil_y: int, dil_x: int,
    pad_top: int, pad_left: int, rectify: bool, negative_slope: float, y: Float, n_threads: int,
) -> None: ...
def depthwise_conv2d_backward(
    dz: Float, x: Float, weight: Float, sy: int, sx: int, dil_y: int, dil_x: int, pad_top: int, pad_left: int,
    need_dx: bool, dx: Float, dweight_partial: Float, dbias_partial: NDArray[np.float64], n_threads: int,
) -> None: ...
