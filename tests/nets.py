"""Small skorch nets for the tests, one per supported criterion.

Modules are given to skorch as a class (``module=MLP`` with ``module__...``
arguments) so that the net initialises them itself, under the estimator's
``random_state``.
"""

from __future__ import annotations

import numpy as np
import torch
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor

CRITERIA = ("MSELoss", "CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss")


class MLP(torch.nn.Sequential):
    """``Linear → Tanh → Linear`` (optionally ``→ Softmax``) in float64."""

    def __init__(self, n_in: int = 4, n_out: int = 3, hidden: int = 6, softmax: bool = False):
        layers = [torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_out)]
        if softmax:
            layers.append(torch.nn.Softmax(dim=-1))
        super().__init__(*layers)
        self.double()


def mlp(n_in: int, n_out: int, hidden: int = 6, softmax: bool = False) -> torch.nn.Module:
    return MLP(n_in, n_out, hidden, softmax)


def make_net(kind: str, n_in: int, n_out: int = 3, *, hidden: int = 6, **kwargs):
    """A small float64 skorch net for criterion ``kind``; kwargs override defaults."""
    options = dict(max_epochs=5, lr=0.1, batch_size=32, verbose=0, train_split=None,
                   iterator_train__shuffle=True, module__n_in=n_in, module__hidden=hidden,
                   module__n_out=n_out)
    if kind == "MSELoss":
        cls = NeuralNetRegressor
    elif kind == "CrossEntropyLoss":
        cls, options["criterion"] = NeuralNetClassifier, torch.nn.CrossEntropyLoss
    elif kind == "NLLLoss":
        cls, options["module__softmax"] = NeuralNetClassifier, True
    elif kind == "BCEWithLogitsLoss":
        cls, options["module__n_out"] = NeuralNetBinaryClassifier, 1
    else:
        raise ValueError(kind)
    options.update(kwargs)
    return cls(MLP, **options)


def toy_data(criterion: str, n: int = 40, d: int = 4, n_out: int = 3, seed: int = 0):
    """Inputs and targets suited to ``criterion`` (float64)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    if criterion == "MSELoss":
        y = X @ rng.normal(size=(d, n_out)) + 0.1 * rng.normal(size=(n, n_out))
    elif criterion == "BCEWithLogitsLoss":
        y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    else:
        y = np.argmax(X[:, :n_out] + 0.5 * rng.normal(size=(n, n_out)), axis=1)
    return X, y
