"""Retraining with the net's own recipe: rungs 0–2 of the response ladder.

Leave-one-out means what a user means by it: the skorch net's own training
recipe (optimizer, learning rate, batch size, callbacks, weight decay) run on
the ``N − 1`` remaining rows. :func:`retrain` does that on a private clone,

- from a given start point (``θ⁰`` for cold start, ``θˢ`` for warm start),
- under a given torch seed (the one the original fit used, so initialisation
  draws and shuffling follow the same random stream),
- optionally with a proximity term ``(c/2)‖θ − θˢ‖²`` added to the training
  loss (rung 2).

With a mean-reduced loss the recipe minimises
``(1/(N−1)) Σ_{i≠m} L_i + (μ/2)‖θ‖² + (c/2)‖θ − θˢ‖²``, which is
``N/(N−1)`` times ``J_{μ'}(θ) − εL_m(θ) + (λ/2)‖θ − θˢ‖²`` with ``ε = 1/N``,
``μ' = μ(N−1)/N`` and ``c = λN/(N−1)``. The proximity coefficient is
scaled that way so that rungs 1 and 2 differ only by ``(λ/2)‖θ − θˢ‖²``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from torch import Tensor

__all__ = ["retrain", "set_flat_params", "get_flat_params", "initialize_net", "module_dtype"]


def module_dtype(net: Any) -> torch.dtype:
    """dtype of the (initialised) net's parameters."""
    return next(net.module_.parameters()).dtype


def initialize_net(net: Any, X: np.ndarray) -> Any:
    """``net.initialize()``, then materialise lazy modules with one input row.

    ``θ⁰`` must exist before training to be recorded (and restored for a
    cold-start retraining); lazy layers (``LazyLinear``…) only create their
    parameters on a first forward pass, which this runs on ``X[:1]`` (eval
    mode, no grad).
    """
    net.initialize()
    if any(isinstance(p, torch.nn.parameter.UninitializedParameter)
           for p in net.module_.parameters()):
        row = torch.tensor(np.array(X[:1]), dtype=module_dtype(net))
        was_training = net.module_.training
        net.module_.eval()
        with torch.no_grad():
            net.infer(row)
        net.module_.train(was_training)
    return net


def get_flat_params(module: torch.nn.Module) -> Tensor:
    """Trainable parameters of ``module`` as one flat (detached) vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])


def set_flat_params(module: torch.nn.Module, theta: Tensor) -> None:
    """Copy a flat vector into the trainable parameters of ``module``."""
    params = [p for p in module.parameters() if p.requires_grad]
    chunks = torch.split(theta.detach(), [p.numel() for p in params])
    with torch.no_grad():  # copy_, never vector_to_parameters: that aliases theta
        for p, chunk in zip(params, chunks):
            p.copy_(chunk.reshape(p.shape))


class _ProximalGetLoss:
    """``net.get_loss`` plus ``(c/2)‖θ − anchor‖²`` while training.

    Installed on a private clone's instance, so the net's whole recipe
    (optimizer steps, LBFGS closures, callbacks) sees the proximal objective.
    """

    def __init__(self, net: Any, anchor: Tensor, coef: float) -> None:
        self.net = net
        self.anchor = anchor
        self.coef = coef

    def __call__(self, y_pred: Tensor, y_true: Tensor, X: Any = None,
                 training: bool = False) -> Tensor:
        loss = type(self.net).get_loss(self.net, y_pred, y_true, X=X, training=training)
        if training:
            params = [p for p in self.net.module_.parameters() if p.requires_grad]
            flat = torch.cat([p.reshape(-1) for p in params])
            loss = loss + 0.5 * self.coef * ((flat - self.anchor) ** 2).sum()
        return loss


def retrain(
    net: Any,
    X: np.ndarray,
    y: np.ndarray,
    *,
    start: Tensor,
    seed: int | None,
    max_epochs: int,
    anchor: Tensor | None = None,
    proximity: float = 0.0,
) -> Tensor:
    """Train a clone of ``net`` with its own recipe and return its parameters.

    Parameters
    ----------
    net : skorch.NeuralNet
        The recipe (cloned, never modified).
    X, y : ndarray
        Training rows (the removed sample already left out), in the form
        ``net.fit`` takes them.
    start : Tensor
        Flat start parameters (``θ⁰`` or ``θˢ``).
    seed : int or None
        torch seed set (in a forked RNG) before the clone is initialised.
    max_epochs : int
        Epochs to train.
    anchor : Tensor, optional
        ``θˢ``, the centre of the proximity term.
    proximity : float, default=0.0
        Coefficient ``c`` of ``(c/2)‖θ − anchor‖²``; 0 disables it.

    Returns
    -------
    Tensor
        The retrained flat parameters.
    """
    clone_ = clone(net).set_params(train_split=None, max_epochs=int(max_epochs), verbose=0,
                                   warm_start=False)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        initialize_net(clone_, X[:1])
        set_flat_params(clone_.module_, start)
        if proximity:
            clone_.get_loss = _ProximalGetLoss(clone_, anchor.detach().clone(), float(proximity))
        if max_epochs > 0:
            clone_.partial_fit(X, y)
    return get_flat_params(clone_.module_)
