"""A zoo of small architectures on the data that ships with scikit-learn.

Seven ``torch.nn.Module`` classes, each small enough (about 650 to 5,200
parameters at the defaults) for the exact solvers to run on a laptop, and a
registry, :data:`ZOO`, that pairs each with its data and a training recipe:

================  ============================  ========  =========  ==========
entry             module                        data      target     parameters
================  ============================  ========  =========  ==========
``logistic``      :class:`Logistic`             digits    labels            650
``mlp``           :class:`MLP`                  digits    labels          2,410
``mlp_diabetes``  :class:`MLP`                  diabetes  values          1,441
``lenet``         :class:`LeNet`                digits    labels          3,658
``vgg``           :class:`VGG`                  digits    labels          4,850
``resnet``        :class:`ResNet`               digits    labels          5,122
``autoencoder``   :class:`Autoencoder`          digits    the input       4,744
``transformer``   :class:`RowTokenTransformer`  digits    labels          2,666
================  ============================  ========  =========  ==========

:func:`make_zoo_net` returns an unfitted skorch net for an entry and
:func:`load_zoo_data` its data::

    X, y = load_zoo_data("lenet", n_samples=500)
    est = InfluenceEstimator(make_zoo_net("lenet"), random_state=0).fit(X, y)

The modules are given to skorch as classes (``module=LeNet`` with
``module__width=...``), so that the net initialises them itself — under the
``random_state`` of the estimator that trains it — and a study can vary any
argument, the ``width`` that every module has in particular, through
``set_params(module__width=...)``. Every digits module takes images of shape
``(n, 1, 8, 8)`` as well as flat rows ``(n, 64)`` (it reshapes inside
``forward``) and answers both alike. Modules are float32 unless given
``dtype="float64"``, which the exact closed-form checks want.

Smooth activations (``tanh``, ``gelu``) give the proximal Bregman response a
smooth objective; the ReLU and max-pooling defaults of :class:`VGG` and
:class:`ResNet` follow their originals and put kinks into it, which the
PBRF's solver continues past, more slowly
(:class:`~sklinfluence.PBRFEstimator`).

With ``solver="auto"``, :class:`~sklinfluence.InfluenceEstimator` inverts the
curvature of every entry but ``resnet`` exactly (dense, at most 5,000
parameters); the ResNet's 5,122 take the kernel form up to 512 training rows
(``N·K ≤ P``) and conjugate gradients above. The Kronecker-factored solvers
(``"ekfac"``, ``"kfac"``, ``"kernel"``) do not apply to
:class:`RowTokenTransformer`, whose attention and positional embedding they do
not factor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ZOO", "ZooSpec", "make_zoo_net", "load_zoo_data", "ACTIVATIONS", "Logistic", "MLP",
           "LeNet", "VGG", "ResNet", "Autoencoder", "RowTokenTransformer"]

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


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ZooSpec:
    """One entry of :data:`ZOO`: a module, its arguments, its data and its recipe.

    Parameters
    ----------
    module : type
        The ``torch.nn.Module`` class.
    module_kwargs : dict
        Its arguments for this entry (skorch's ``module__...``).
    data : {"digits", "diabetes"}
        The scikit-learn data set.
    target : {"labels", "values", "input"}
        Class labels (a classifier), standardised values as a column (a
        regressor) or the input's pixels (an autoencoder, a regressor).
    images : bool
        Whether :func:`load_zoo_data` gives ``(n, 1, 8, 8)`` images by default.
    lr : float
        Learning rate of SGD with momentum 0.9 in :func:`make_zoo_net`.
    n_params : int
        Number of parameters at these arguments.
    description : str
        One line.
    """

    module: type
    module_kwargs: dict = field(default_factory=dict)
    data: str = "digits"
    target: str = "labels"
    images: bool = False
    lr: float = 0.05
    n_params: int = 0
    description: str = ""

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return "classification" if self.target == "labels" else "regression"


#: Entry name → :class:`ZooSpec`. Parameter counts are at the entry's arguments.
ZOO: dict[str, ZooSpec] = {
    "logistic": ZooSpec(Logistic, {}, lr=0.1, n_params=650,
                        description="multinomial logistic regression on digits"),
    "mlp": ZooSpec(MLP, {}, lr=0.1, n_params=2_410,
                   description="MLP 64-32-10 (tanh) classifying digits"),
    "mlp_diabetes": ZooSpec(MLP, {"n_in": 10, "n_out": 1, "width": 32, "depth": 2},
                            data="diabetes", target="values", lr=0.01, n_params=1_441,
                            description="MLP 10-32-32-1 (tanh) regressing diabetes"),
    "lenet": ZooSpec(LeNet, {}, images=True, lr=0.1, n_params=3_658,
                     description="LeNet-style CNN (tanh, average pooling) on digits"),
    "vgg": ZooSpec(VGG, {}, images=True, lr=0.05, n_params=4_850,
                   description="VGG-style CNN with BatchNorm2d on digits"),
    "resnet": ZooSpec(ResNet, {}, images=True, lr=0.05, n_params=5_122,
                      description="residual network with BatchNorm2d on digits"),
    "autoencoder": ZooSpec(Autoencoder, {}, target="input", lr=0.2, n_params=4_744,
                           description="autoencoder 64-32-8-32-64 reconstructing digits"),
    "transformer": ZooSpec(RowTokenTransformer, {}, images=True, lr=0.05, n_params=2_666,
                           description="transformer encoder over a digit's 8 rows"),
}


def _spec(name: str) -> ZooSpec:
    try:
        return ZOO[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown zoo entry {name!r}; the entries are "
                         f"{', '.join(ZOO)}.") from None


def make_zoo_net(name: str, *, max_epochs: int = 20, lr: float | None = None,
                 batch_size: int = 32, weight_decay: float = 1e-4, momentum: float = 0.9,
                 random_state: int | None = None, dtype: Any = "float32",
                 **kwargs: Any) -> Any:
    """An unfitted skorch net for a zoo entry.

    A ``NeuralNetClassifier`` with ``CrossEntropyLoss`` for the classifiers, a
    ``NeuralNetRegressor`` (``MSELoss``) for ``mlp_diabetes`` and
    ``autoencoder``; SGD with momentum and weight decay on shuffled
    mini-batches, ``train_split=None`` (the net sees exactly the rows it is
    given) and ``verbose=0``.

    Parameters
    ----------
    name : str
        A key of :data:`ZOO`.
    max_epochs : int, default=20
        Training epochs.
    lr : float or None, default=None
        Learning rate; ``None`` takes the entry's :attr:`ZooSpec.lr`.
    batch_size : int, default=32
        Mini-batch size.
    weight_decay : float, default=1e-4
        SGD's weight decay ``μ``, which the estimators read as the
        objective's ``(μ/2)‖θ‖²``.
    momentum : float, default=0.9
        SGD's momentum.
    random_state : int or None, default=None
        Seeds the module's initial weights (``module__seed``) without touching
        the global RNG, so that ``net.fit`` starts from the same weights every
        time (its batch order still comes from torch's global RNG). ``None``
        leaves the draw to the caller: the estimators' ``random_state`` seeds
        it along with the batch order.
    dtype : {"float32", "float64"}, default="float32"
        Parameter precision (``module__dtype``); float64 for the exact
        closed-form checks. Give :func:`load_zoo_data` the same.
    **kwargs
        Further skorch arguments, overriding the above: ``module__width=16``,
        ``optimizer=torch.optim.Adam``, ``callbacks=[...]``...

    Returns
    -------
    skorch.NeuralNetClassifier or skorch.NeuralNetRegressor
        Unfitted; its module is given as a class.

    Examples
    --------
    >>> from sklinfluence.zoo import load_zoo_data, make_zoo_net
    >>> X, y = load_zoo_data("lenet", n_samples=64)
    >>> X.shape
    (64, 1, 8, 8)
    >>> net = make_zoo_net("lenet", max_epochs=2, random_state=0).fit(X, y)
    >>> net.predict_proba(X).shape
    (64, 10)
    >>> sum(p.numel() for p in net.module_.parameters())
    3658

    Influence of the training digits of an MLP:

    >>> from sklinfluence import InfluenceEstimator
    >>> X, y = load_zoo_data("mlp", n_samples=100)
    >>> est = InfluenceEstimator(make_zoo_net("mlp", max_epochs=2), random_state=0).fit(X, y)
    >>> est.score_samples(X[:3]).shape
    (3,)
    >>> est.diagnostics_["solver"]
    'exact'
    """
    from skorch import NeuralNetClassifier, NeuralNetRegressor

    spec = _spec(name)
    options = {f"module__{key}": value for key, value in spec.module_kwargs.items()}
    options.update(module__dtype=str(_torch_dtype(dtype)).removeprefix("torch."),
                   max_epochs=max_epochs, lr=spec.lr if lr is None else lr,
                   batch_size=batch_size, optimizer=torch.optim.SGD,
                   optimizer__momentum=momentum, optimizer__weight_decay=weight_decay,
                   iterator_train__shuffle=True, train_split=None, verbose=0)
    if random_state is not None:
        options["module__seed"] = int(random_state)
    options.update(kwargs)
    if spec.task == "classification":
        return NeuralNetClassifier(spec.module, criterion=options.pop("criterion",
                                                                      nn.CrossEntropyLoss),
                                   **options)
    return NeuralNetRegressor(spec.module, **options)


def load_zoo_data(name: str, *, n_samples: int | None = None, images: bool | None = None,
                  random_state: int | None = 0, dtype: Any = "float32"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The inputs and targets of a zoo entry, from scikit-learn's data sets.

    - digits (1,797 images): pixels scaled to ``[0, 1]``; targets the labels
      (``int64``) or, for ``autoencoder``, the 64 pixels themselves;
    - diabetes (442 patients): features and target standardised (mean 0,
      standard deviation 1), the target as a column ``(n, 1)`` as skorch's
      regressor wants it.

    Parameters
    ----------
    name : str
        A key of :data:`ZOO`.
    n_samples : int or None, default=None
        A random subset of this many rows (drawn with ``random_state``);
        ``None``: every row, in the data set's order.
    images : bool or None, default=None
        Digits as images ``(n, 1, 8, 8)`` (True) or rows ``(n, 64)`` (False);
        ``None`` takes the entry's :attr:`ZooSpec.images`. Every digits module
        takes both.
    random_state : int or None, default=0
        Seed of the subset.
    dtype : {"float32", "float64"}, default="float32"
        Precision of ``X`` and of real-valued targets: the net's.

    Returns
    -------
    X : ndarray of shape (n, 64), (n, 1, 8, 8) or (n, 10)
        The inputs: digits as rows or images, or diabetes features.
    y : ndarray of shape (n,), (n, 1) or (n, 64)
        Class labels, standardised targets, or the autoencoder's 64 pixels.

    Examples
    --------
    >>> from sklinfluence.zoo import load_zoo_data
    >>> X, y = load_zoo_data("autoencoder", n_samples=10, dtype="float64")
    >>> X.shape, y.shape, X.dtype
    ((10, 64), (10, 64), dtype('float64'))
    >>> X, y = load_zoo_data("mlp_diabetes")
    >>> X.shape, y.shape, round(float(y.std()), 6)
    ((442, 10), (442, 1), 1.0)
    """
    from sklearn.datasets import load_diabetes, load_digits

    spec = _spec(name)
    float_type = np.dtype(str(_torch_dtype(dtype)).removeprefix("torch."))
    if spec.data == "diabetes":
        if images:
            raise ValueError(f"zoo entry {name!r} is on the diabetes data, which has no "
                             "images; pass images=None or False.")
        X, y = load_diabetes(return_X_y=True)
        X = (X - X.mean(0)) / X.std(0)
        y = ((y - y.mean()) / y.std())[:, None]
    else:
        X, y = load_digits(return_X_y=True)
        X = X / 16.0
        y = X.copy() if spec.target == "input" else y.astype(np.int64)
    if n_samples is not None:
        if not 1 <= n_samples <= len(X):
            raise ValueError(f"n_samples must be between 1 and {len(X)} for zoo entry "
                             f"{name!r}; got {n_samples}.")
        rows = np.random.default_rng(random_state).permutation(len(X))[:n_samples]
        X, y = X[rows], y[rows]
    if spec.data == "digits" and (spec.images if images is None else images):
        X = X.reshape(-1, 1, _SIDE, _SIDE)
    y = y if y.dtype == np.int64 else y.astype(float_type)
    return np.ascontiguousarray(X, dtype=float_type), np.ascontiguousarray(y)
