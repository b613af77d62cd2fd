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
    y_gemm: Float, bias: Float, has_bias: bool, leaky_relu: bool, negative_slope: float, first: int, y: Float,
    n_threads: int,
) -> None: ...
def gemm_to_nchw_max_pool_2x2(
    y_gemm: Float, bias: Float, has_bias: bool, leaky_relu: bool, negative_slope: float, first: int, out_w: int,
    y: Float, n_threads: int,
) -> None: ...
def nchw_to_gemm(
    dy: Float, y: Float, leaky_relu: bool, negative_slope: float, first: int, dy_gemm: Float,
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

# per-element passes (flat C-contiguous arrays of one length; see cnnx.functional)
def leaky_relu_forward(x: Float, negative_slope: float, y: Float, n_threads: int) -> None: ...
def leaky_relu_backward(dy: Float, ref: Float, negative_slope: float, dx: Float, n_threads: int) -> None: ...
def sigmoid_forward(x: Float, y: Float, n_threads: int) -> None: ...
def tanh_forward(x: Float, y: Float, n_threads: int) -> None: ...
def sigmoid_tanh_backward(dy: Float, y: Float, is_tanh: bool, dx: Float, n_threads: int) -> None: ...
def gelu_forward(x: Float, approximate_tanh: bool, y: Float, n_threads: int) -> None: ...
def gelu_backward(dy: Float, x: Float, approximate_tanh: bool, dx: Float, n_threads: int) -> None: ...
def dropout_forward(x: Float, seed: int, p: float, y: Float, mask: Float, n_threads: int) -> None: ...
def multiply(a: Float, b: Float, out: Float, n_threads: int) -> None: ...
def sgd_step(
    param: Float, grad: Float, momentum_buffer: Float, lr: float, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool, first: bool, n_threads: int,
) -> None: ...
def adam_step(
    param: Float, grad: Float, exp_avg: Float, exp_avg_sq: Float, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, decoupled: bool, step: int, n_threads: int,
) -> None: ...
def softmax_cross_entropy(
    logits: Float, ids: NDArray[np.intp], rows: Float, use_ids: bool, label_smoothing: float, grad: Float,
    row_loss: NDArray[np.float64], n_threads: int,
) -> None: ...
def channel_moments(x: Float, mean: NDArray[np.float64], var: NDArray[np.float64], n_threads: int) -> None: ...
def channel_dot_sums(
    dy: Float, other: Float, sum_dy: NDArray[np.float64], sum_dy_other: NDArray[np.float64], n_threads: int,
) -> None: ...
def batchnorm_normalize(
    x: Float, mean: NDArray[np.float64], inv_std: NDArray[np.float64], gamma: Float, beta: Float,
    x_hat: Float, y: Float, keep_x_hat: bool, n_threads: int,
) -> None: ...
def batchnorm_train_backward(
    dy: Float, x_hat: Float, scale: NDArray[np.float64], mean_dy: NDArray[np.float64],
    mean_dy_xhat: NDArray[np.float64], dx: Float, n_threads: int,
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
    pad_top: int, pad_left: int, leaky_relu: bool, negative_slope: float, y: Float, n_threads: int,
) -> None: ...
def depthwise_conv2d_backward(
    dz: Float, x: Float, weight: Float, sy: int, sx: int, dil_y: int, dil_x: int, pad_top: int, pad_left: int,
    need_dx: bool, dx: Float, dweight_partial: Float, dbias_partial: NDArray[np.float64], n_threads: int,
) -> None: ...
def gemm_to_nchw_max_pool_2x2_argmax(
    y_gemm: Float, bias: Float, has_bias: bool, rectify: bool, negative_slope: float, first: int, out_w: int,
    y: Float, argmax: NDArray[np.int32], pair_max: Float, pair_arg: NDArray[np.int32], n_threads: int,
) -> None: ...
def gemm_to_nchw_max_pool_2x2_vectorised(
    y_gemm: Float, bias: Float, has_bias: bool, rectify: bool, negative_slope: float, first: int, out_w: int,
    y: Float, n_threads: int,
) -> None: ...
def max_pool_2x2_argmax_to_gemm(
    dy: Float, y: Float, argmax: NDArray[np.int32], rectify: bool, negative_slope: float, first: int,
    out_w: int, dy_gemm: Float, dbias_partial: NDArray[np.float64], n_threads: int,
) -> None: ...

# cnnx's packed float32 GEMM (_gemm.pxi).
F32 = NDArray[np.float32]

def gemm_config() -> dict[str, int]: ...
def conv_gemm_nchw(
    x: F32, first: int, count: int, weight: F32, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    out_h: int, out_w: int, bias: F32, has_bias: bool, leaky_relu: bool, negative_slope: float, y: F32,
    n_threads: int,
) -> None: ...
def conv_gemm_nchw_max_pool_2x2(
    x: F32, first: int, count: int, weight: F32, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    out_h: int, out_w: int, bias: F32, has_bias: bool, leaky_relu: bool, negative_slope: float, y: F32,
    n_threads: int,
) -> None: ...
def conv_gemm_nchw_max_pool_2x2_argmax(
    x: F32, first: int, count: int, weight: F32, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    out_h: int, out_w: int, bias: F32, has_bias: bool, leaky_relu: bool, negative_slope: float, y: F32,
    argmax: NDArray[np.int32], n_threads: int,
) -> None: ...
def conv_gemm_columns(
    x: F32, first: int, weight: F32, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    out_h: int, out_w: int, y_gemm: F32, n_threads: int,
) -> None: ...
def gemm(a: F32, b: F32, c: F32, n_threads: int) -> None: ...
def conv_weight_grad(
    x: F32, first: int, dy_gemm: F32, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    out_h: int, out_w: int, dweight: F32, n_threads: int,
) -> None: ...
def dense_gemm(
    x: F32, weight: F32, bias: F32, has_bias: bool, leaky_relu: bool, negative_slope: float, z: F32,
    n_threads: int,
) -> None: ...

# Winograd F(2x2, 3x3) for float32 3x3 stride-1 convolutions (_winograd.pxi): the arguments of
# the conv_gemm_nchw forms they replace, plus the weights transformed once (winograd_weights).
def winograd_config() -> dict[str, int]: ...
def winograd_weights(weight: F32, c: int) -> F32: ...
def winograd_conv_nchw(
    x: F32, first: int, count: int, weight: F32, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    out_h: int, out_w: int, bias: F32, has_bias: bool, leaky_relu: bool, negative_slope: float, y: F32,
    n_threads: int, transformed: F32 | None = None,
) -> None: ...
def winograd_conv_nchw_max_pool_2x2(
    x: F32, first: int, count: int, weight: F32, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    out_h: int, out_w: int, bias: F32, has_bias: bool, leaky_relu: bool, negative_slope: float, y: F32,
    n_threads: int, transformed: F32 | None = None,
) -> None: ...
def winograd_conv_nchw_max_pool_2x2_argmax(
    x: F32, first: int, count: int, weight: F32, kh: int, kw: int, sy: int, sx: int, pad_top: int, pad_left: int,
    out_h: int, out_w: int, bias: F32, has_bias: bool, leaky_relu: bool, negative_slope: float, y: F32,
    argmax: NDArray[np.int32], n_threads: int, transformed: F32 | None = None,
) -> None: ...
def winograd_conv_input_grad(
    dy_gemm: F32, out_h: int, out_w: int, transformed: F32, pad_top: int, pad_left: int, dx: F32, first: int,
    n_threads: int,
) -> None: ...
def winograd_conv_weight_grad(
    x: F32, first: int, dy_gemm: F32, pad_top: int, pad_left: int, out_h: int, out_w: int, dweight: F32,
) -> None: ...
