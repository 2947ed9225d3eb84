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

With ``solver="auto"``, :class:`~sklinfluence.InfluenceEstimator` picks the
exact option predicted to be cheapest (:mod:`sklinfluence.solvers.cost`): the
dense inverse for every entry at the usual sizes, the ResNet's 5,122
parameters included (5 s at 600 rows, where conjugate gradients would take
minutes). The kernel form (``"kernel"``) applies to every entry, its rows of
parameters outside registered layers from autograd. EK-FAC and K-FAC factor
the attention of :class:`RowTokenTransformer` but not its positional
embedding, a bare ``nn.Parameter``: they apply to it once that is frozen
(``net.module_.position.requires_grad_(False)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .modules import (ACTIVATIONS, MLP, VGG, Autoencoder, LeNet, Logistic, ResNet,
                      RowTokenTransformer, _SIDE, _torch_dtype)

__all__ = ["ZOO", "ZooSpec", "make_zoo_net", "load_zoo_data", "ACTIVATIONS", "Logistic", "MLP",
           "LeNet", "VGG", "ResNet", "Autoencoder", "RowTokenTransformer"]


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
