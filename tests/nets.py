"""Small skorch nets for the tests, one per supported criterion."""

from __future__ import annotations

import torch
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor


def mlp(n_in: int, n_out: int, hidden: int = 6, softmax: bool = False) -> torch.nn.Module:
    layers = [torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_out)]
    if softmax:
        layers.append(torch.nn.Softmax(dim=-1))
    return torch.nn.Sequential(*layers).double()


def make_net(criterion: str, n_in: int, n_out: int = 3, *, hidden: int = 6,
             max_epochs: int = 5, **kwargs):
    """A small float64 skorch net trained with ``criterion``."""
    common = dict(max_epochs=max_epochs, lr=0.1, batch_size=32, verbose=0,
                  train_split=None, **kwargs)
    if criterion == "MSELoss":
        return NeuralNetRegressor(mlp(n_in, n_out, hidden), **common)
    if criterion == "CrossEntropyLoss":
        return NeuralNetClassifier(mlp(n_in, n_out, hidden),
                                   criterion=torch.nn.CrossEntropyLoss, **common)
    if criterion == "NLLLoss":
        return NeuralNetClassifier(mlp(n_in, n_out, hidden, softmax=True), **common)
    if criterion == "BCEWithLogitsLoss":
        return NeuralNetBinaryClassifier(mlp(n_in, 1, hidden), **common)
    raise ValueError(criterion)


CRITERIA = ("MSELoss", "CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss")


def toy_data(criterion: str, n: int = 40, d: int = 4, n_out: int = 3, seed: int = 0):
    """Inputs and targets suited to ``criterion`` (float64)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    if criterion == "MSELoss":
        y = X @ rng.normal(size=(d, n_out)) + 0.1 * rng.normal(size=(n, n_out))
    elif criterion == "BCEWithLogitsLoss":
        y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    else:
        y = np.argmax(X[:, :n_out] + 0.5 * rng.normal(size=(n, n_out)), axis=1)
    return X, y
