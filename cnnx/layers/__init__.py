"""Layer classes. Each module owns one family; ``LAYER_CLASSES`` maps class names to classes."""
from .base import LAYER_CLASSES, Layer, register_layer
from .activations import ACTIVATIONS, GELU, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .dense import Dense, Dropout, Flatten, Linear
from .conv import Conv2D
from .pooling import AvgPool2D, MaxPool2D
from .conv1d import AvgPool1D, Conv1D, MaxPool1D
from .normalization import BatchNorm1D, BatchNorm2D
from .residual import Residual
from .transpose import ConvTranspose2D, Reshape, Upsample2D
from .layer_norm import LayerNorm
from .global_pool import GlobalAvgPool2D, GlobalMaxPool2D
from .concat import Concat
