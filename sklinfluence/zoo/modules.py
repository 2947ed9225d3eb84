"""The zoo's architectures: seven small ``torch.nn.Module`` classes for 8 × 8 digits and
the diabetes data, each taking images ``(n, 1, 8, 8)`` or flat rows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "Logistic", "MLP", "LeNet", "VGG", "ResNet", "Autoencoder",
           "RowTokenTransformer"]

#: Activation names every module accepts (``activation=``).
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
               "softplus": nn.Softplus, "silu": nn.SiLU}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SIDE = 8  # digits are 8 × 8 pixels


# ------------------------------------------------------------------------------ helpers
def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {name!r}.") \
            from None


def _torch_dtype(dtype: Any) -> torch.dtype:
    """``"float32"``/``"float64"``, a torch dtype or a numpy one, as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif dtype is None:  # np.dtype(None) would be float64
        name = None
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64'; got {dtype!r}.")
    return _DTYPES[name]


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draw initial weights from ``torch.manual_seed(seed)`` in a forked RNG (the
    global stream untouched), or from the global stream when ``seed`` is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_digits(x: Tensor) -> None:
    if x.ndim < 2 or x.shape[1:].numel() != _SIDE * _SIDE:
        raise ValueError(f"expected 8 × 8 digits as rows (n, 64) or images (n, 1, 8, 8); "
                         f"got a tensor of shape {tuple(x.shape)}.")


def _as_images(x: Tensor) -> Tensor:
    """``(n, 64)`` or ``(n, 1, 8, 8)`` → ``(n, 1, 8, 8)``."""
    _check_digits(x)
    return x.reshape(x.shape[0], 1, _SIDE, _SIDE)


def _as_rows(x: Tensor, n_in: int) -> Tensor:
    """``(n, ...)`` with ``n_in`` values per row → ``(n, n_in)``: images are flattened
    row by row."""
    if x.ndim < 2 or x.shape[1:].numel() != n_in:
        images = " or images (n, 1, 8, 8)" if n_in == _SIDE * _SIDE else ""
        raise ValueError(f"expected rows (n, {n_in}){images}; got a tensor of shape "
                         f"{tuple(x.shape)}.")
    return x.reshape(x.shape[0], n_in)


def _conv_bn(c_in: int, c_out: int, activation: str | None, stride: int = 1) -> nn.Sequential:
    """``Conv2d(3 × 3, no bias) → BatchNorm2d`` [→ activation]."""
    layers = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
              nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, *([_activation(activation)] if activation else []))


def _pool(kind: str) -> nn.Module:
    if kind not in ("avg", "max"):
        raise ValueError(f"pool must be 'avg' or 'max'; got {kind!r}.")
    return nn.AvgPool2d(2) if kind == "avg" else nn.MaxPool2d(2)


# ------------------------------------------------------------------------------ modules
class Logistic(nn.Module):
    """Multinomial logistic regression: one ``nn.Linear``, input to logits.

    The input is flattened; there is one logit per class. With
    ``CrossEntropyLoss`` its Gauss–Newton matrix equals its Hessian, and the
    influence of a sample has a closed form.

    Parameters at the defaults: 650 (64 × 10 weights, 10 biases).

    Parameters
    ----------
    n_in : int, default=64
        Values per input row (images are flattened).
    n_out : int, default=10
        Number of classes.
    width : int or None, default=None
        Unused: a linear model has no width (accepted so that every zoo
        module takes ``module__width``).
    dtype : {"float32", "float64"}, default="float32"
        Parameter precision.
    seed : int or None, default=None
        Draws the initial weights from ``torch.manual_seed(seed)`` without
        touching the global RNG; ``None`` draws them from the global RNG (what
        the estimators' ``random_state`` seeds).
    """

    def __init__(self, n_in: int = 64, n_out: int = 10, width: int | None = None, *,
                 dtype: Any = "float32", seed: int | None = None) -> None:
        super().__init__()
        with _seeded(seed):
            self.linear = nn.Linear(n_in, n_out)
        self.to(_torch_dtype(dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(n, n_out)`` of rows ``(n, n_in)`` or images (flattened)."""
        return self.linear(_as_rows(x, self.linear.in_features))


class MLP(nn.Module):
    """Multi-layer perceptron for digits (classification) or diabetes (regression).

    ``Linear → activation`` blocks, then a linear output.

    Parameters at the defaults: 2,410 (64 → 32 → 10).

    Parameters
    ----------
    n_in : int, default=64
        Values per input row (images are flattened).
    n_out : int, default=10
        Outputs: classes, or regression targets.
    width : int, default=32
        Units of each hidden layer when ``hidden`` is None.
    depth : int, default=1
        Number of hidden layers when ``hidden`` is None.
    hidden : tuple of int or None, default=None
        Explicit hidden widths, overriding ``width`` and ``depth``.
    activation : {"tanh", "relu", "gelu", "sigmoid", "softplus", "silu"}, default="tanh"
        Nonlinearity after each hidden layer.
    dtype : {"float32", "float64"}, default="float32"
        Parameter precision.
    seed : int or None, default=None
        As for :class:`Logistic`.
    """

    def __init__(self, n_in: int = 64, n_out: int = 10, width: int = 32, depth: int = 1,
                 hidden: tuple | None = None, activation: str = "tanh", *,
                 dtype: Any = "float32", seed: int | None = None) -> None:
        super().__init__()
        widths = (width,) * depth if hidden is None else tuple(hidden)
        layers: list[nn.Module] = []
        with _seeded(seed):
            for previous, current in zip((n_in, *widths), widths):
                layers += [nn.Linear(previous, current), _activation(activation)]
            layers.append(nn.Linear(widths[-1] if widths else n_in, n_out))
            self.layers = nn.Sequential(*layers)
        self.to(_torch_dtype(dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Outputs ``(n, n_out)`` of rows ``(n, n_in)`` or images (flattened)."""
        return self.layers(_as_rows(x, self.layers[0].in_features))


class LeNet(nn.Module):
    """LeNet-style CNN for 8 × 8 digits.

    ``Conv2d(1 → w, 3 × 3, padding 1) → activation → pool`` (4 × 4),
    ``Conv2d(w → 2w) → activation → pool`` (2 × 2), ``Flatten`` (8w values),
    ``Linear(8w → 4w) → activation → Linear(4w → n_out)``, with ``w = width``.

    Parameters at the defaults: 3,658.

    Parameters
    ----------
    n_out : int, default=10
        Number of classes.
    width : int, default=8
        Channels of the first convolution ``w``.
    activation : str, default="tanh"
        One of :data:`ACTIVATIONS`.
    pool : {"avg", "max"}, default="avg"
        2 × 2 average pooling (LeNet's subsampling, smooth) or max pooling.
    dtype : {"float32", "float64"}, default="float32"
        Parameter precision.
    seed : int or None, default=None
        As for :class:`Logistic`.
    """

    def __init__(self, n_out: int = 10, width: int = 8, activation: str = "tanh",
                 pool: str = "avg", *, dtype: Any = "float32", seed: int | None = None) -> None:
        super().__init__()
        with _seeded(seed):
            self.features = nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1), _activation(activation), _pool(pool),
                nn.Conv2d(width, 2 * width, 3, padding=1), _activation(activation), _pool(pool),
                nn.Flatten())
            self.classifier = nn.Sequential(
                nn.Linear(8 * width, 4 * width), _activation(activation),
                nn.Linear(4 * width, n_out))
        self.to(_torch_dtype(dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(n, n_out)`` of images ``(n, 1, 8, 8)`` or rows ``(n, 64)``."""
        return self.classifier(self.features(_as_images(x)))


class VGG(nn.Module):
    """Small VGG-style CNN with batch normalisation for 8 × 8 digits.

    Two stages of ``convs`` × ``[Conv2d(3 × 3, padding 1, no bias) →
    BatchNorm2d → activation]`` followed by 2 × 2 pooling, with ``w`` and
    ``2w`` channels (8 × 8 → 4 × 4 → 2 × 2), then ``Flatten`` (8w values) and
    ``Linear(8w → n_out)``, with ``w = width``.

    Parameters at the defaults: 4,850.

    Parameters
    ----------
    n_out : int, default=10
        Number of classes.
    width : int, default=8
        Channels of the first stage ``w``.
    convs : int, default=2
        Convolutions per stage.
    activation : str, default="relu"
        One of :data:`ACTIVATIONS`.
    pool : {"max", "avg"}, default="max"
        The pooling closing each stage.
    dtype : {"float32", "float64"}, default="float32"
        Parameter precision.
    seed : int or None, default=None
        As for :class:`Logistic`.

    Notes
    -----
    Batch normalisation normalises with the batch's statistics in training and
    with its running averages in eval mode, where the influence computations
    evaluate the net.
    """

    def __init__(self, n_out: int = 10, width: int = 8, convs: int = 2,
                 activation: str = "relu", pool: str = "max", *, dtype: Any = "float32",
                 seed: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        with _seeded(seed):
            for stage in (width, 2 * width):
                for _ in range(convs):
                    layers.append(_conv_bn(channels, stage, activation))
                    channels = stage
                layers.append(_pool(pool))
            self.features = nn.Sequential(*layers, nn.Flatten())
            self.classifier = nn.Linear(4 * channels, n_out)
        self.to(_torch_dtype(dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(n, n_out)`` of images ``(n, 1, 8, 8)`` or rows ``(n, 64)``."""
        return self.classifier(self.features(_as_images(x)))


class _BasicBlock(nn.Module):
    """``act(BN(conv(act(BN(conv(x))))) + shortcut(x))``; the shortcut is the
    identity, or ``Conv2d(1 × 1, stride) → BatchNorm2d`` where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str) -> None:
        super().__init__()
        self.residual = nn.Sequential(_conv_bn(c_in, c_out, activation, stride),
                                      _conv_bn(c_out, c_out, None))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))
        self.activation = _activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Small residual network with batch normalisation for 8 × 8 digits.

    A stem ``Conv2d(1 → w, 3 × 3) → BatchNorm2d → activation``; a stage of
    ``blocks`` residual blocks at ``w`` channels (8 × 8); a stage of ``blocks``
    at ``2w`` channels, the first with stride 2 and a ``1 × 1`` projection
    shortcut (4 × 4); global average pooling and ``Linear(2w → n_out)``. A
    block is ``act(BN(conv(act(BN(conv(x))))) + shortcut(x))`` with 3 × 3
    convolutions without bias.

    Parameters at the defaults: 5,122.

    Parameters
    ----------
    n_out : int, default=10
        Number of classes.
    width : int, default=8
        Channels of the stem and the first stage ``w``.
    blocks : int, default=1
        Residual blocks per stage.
    activation : str, default="relu"
        One of :data:`ACTIVATIONS`.
    dtype : {"float32", "float64"}, default="float32"
        Parameter precision.
    seed : int or None, default=None
        As for :class:`Logistic`.

    References
    ----------
    He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
    CVPR 2016.
    """

    def __init__(self, n_out: int = 10, width: int = 8, blocks: int = 1,
                 activation: str = "relu", *, dtype: Any = "float32",
                 seed: int | None = None) -> None:
        super().__init__()
        with _seeded(seed):
            self.stem = _conv_bn(1, width, activation)
            stages = [_BasicBlock(width, width, 1, activation) for _ in range(blocks)]
            stages.append(_BasicBlock(width, 2 * width, 2, activation))
            stages += [_BasicBlock(2 * width, 2 * width, 1, activation)
                       for _ in range(blocks - 1)]
            self.blocks = nn.Sequential(*stages)
            self.head = nn.Linear(2 * width, n_out)
        self.to(_torch_dtype(dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(n, n_out)`` of images ``(n, 1, 8, 8)`` or rows ``(n, 64)``."""
        features = self.blocks(self.stem(_as_images(x)))
        return self.head(features.mean(dim=(2, 3)))


class Autoencoder(nn.Module):
    """Fully connected autoencoder for 8 × 8 digits.

    ``Linear(64 → w) → activation → Linear(w → bottleneck)`` encodes,
    ``Linear(bottleneck → w) → activation → Linear(w → 64)`` decodes, with
    ``w = width``. The output is always flat ``(n, 64)``: train it as a
    regressor (``MSELoss``) whose target is the input's 64 pixels.

    Parameters at the defaults: 4,744.

    Parameters
    ----------
    width : int, default=32
        Units of the encoder's and the decoder's hidden layer ``w``.
    bottleneck : int, default=8
        Size of the code.
    activation : str, default="tanh"
        One of :data:`ACTIVATIONS`.
    dtype : {"float32", "float64"}, default="float32"
        Parameter precision.
    seed : int or None, default=None
        As for :class:`Logistic`.
    """

    def __init__(self, width: int = 32, bottleneck: int = 8, activation: str = "tanh", *,
                 dtype: Any = "float32", seed: int | None = None) -> None:
        super().__init__()
        pixels = _SIDE * _SIDE
        with _seeded(seed):
            self.encoder = nn.Sequential(nn.Linear(pixels, width), _activation(activation),
                                         nn.Linear(width, bottleneck))
            self.decoder = nn.Sequential(nn.Linear(bottleneck, width), _activation(activation),
                                         nn.Linear(width, pixels))
        self.to(_torch_dtype(dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstructions ``(n, 64)`` of rows ``(n, 64)`` or images ``(n, 1, 8, 8)``."""
        return self.decoder(self.encoder(_as_rows(x, _SIDE * _SIDE)))


class RowTokenTransformer(nn.Module):
    """Transformer encoder reading an 8 × 8 digit as a sequence of its 8 rows.

    Each row of 8 pixels is a token: ``Linear(8 → d)`` embeds it and a learned
    positional embedding ``(8, d)`` is added; ``layers`` ×
    ``nn.TransformerEncoderLayer(d, heads, 2d, batch_first=True)`` (post-norm),
    a mean over the 8 tokens and ``Linear(d → n_out)`` follow, with
    ``d = width``.

    Parameters at the defaults: 2,666.

    Parameters
    ----------
    n_out : int, default=10
        Number of classes.
    width : int, default=16
        Model dimension ``d`` (a multiple of ``heads``).
    heads : int, default=2
        Attention heads.
    layers : int, default=1
        Encoder layers.
    activation : {"gelu", "relu"}, default="gelu"
        Nonlinearity of the feed-forward sublayers.
    dropout : float, default=0.0
        Dropout of the encoder layers; 0 keeps the training objective
        deterministic (and the leave-one-out retrainings comparable).
    dtype : {"float32", "float64"}, default="float32"
        Parameter precision.
    seed : int or None, default=None
        As for :class:`Logistic`.

    References
    ----------
    Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
    """

    def __init__(self, n_out: int = 10, width: int = 16, heads: int = 2, layers: int = 1,
                 activation: str = "gelu", dropout: float = 0.0, *, dtype: Any = "float32",
                 seed: int | None = None) -> None:
        super().__init__()
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu'; got {activation!r}.")
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads}).")
        with _seeded(seed):
            self.embed = nn.Linear(_SIDE, width)
            self.position = nn.Parameter(torch.empty(1, _SIDE, width))
            nn.init.normal_(self.position, std=0.02)
            layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width,
                                               dropout=dropout, activation=activation,
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(width, n_out)
        self.to(_torch_dtype(dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(n, n_out)`` of images ``(n, 1, 8, 8)`` or rows ``(n, 64)``."""
        _check_digits(x)
        tokens = self.embed(x.reshape(x.shape[0], _SIDE, _SIDE)) + self.position
        return self.head(self.encoder(tokens).mean(dim=1))
