"""Retraining many leave-one-out copies of a skorch net at once (a vectorised ensemble).

:func:`retrain_ensemble` trains ``B`` copies of the net, copy ``b`` without
the training rows ``S_b`` (one row, or a group of rows: every ``S_b`` of one
call has the same size), as one stack of parameters ``(B, P)``: each optimiser
step evaluates all copies on their own mini-batches with
:func:`torch.func.vmap` and updates the stack with the net's own optimiser
class and hyper-parameters (element-wise optimisers update every copy exactly
as they would update it alone). The mini-batch order is the one skorch's own
``fit`` would draw: it is recorded by iterating the net's training iterator
over row positions under the same seed, after the same initialisation draws.

It applies where replaying the recipe is exact — :func:`ensemble_supported`
says when: a single parameter group, an element-wise optimiser (SGD, Adam,
AdamW, RMSprop, Adagrad), no user callbacks (schedulers, clipping, early
stopping change the loop), no dropout or batch-norm (random or batch-coupled
in train mode), skorch's default dataset and iterator. Otherwise the
estimators retrain one copy at a time with the net's own ``fit``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from torch import Tensor
from torch.func import vmap

from .functional import FunctionalModel
from .retrain import initialize_net

__all__ = ["ensemble_supported", "retrain_ensemble"]

_ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
                torch.optim.Adagrad)
_TRAIN_MODE_DEPENDENT = (torch.nn.modules.dropout._DropoutNd,
                         torch.nn.modules.batchnorm._BatchNorm)


def ensemble_supported(net: Any, module: torch.nn.Module) -> tuple[bool, str]:
    """Whether ``net``'s recipe can be replayed exactly as a vectorised ensemble.

    ``module`` is the (trained) module the recipe builds. Returns
    ``(supported, reason)``; ``reason`` says what prevents it.
    """
    from skorch.dataset import Dataset
    from torch.utils.data import DataLoader

    if getattr(net, "callbacks", None) not in (None, [], (), "disable"):
        return False, "the net has callbacks, which may change the training loop"
    if net.optimizer not in _ELEMENTWISE:
        name = getattr(net.optimizer, "__name__", net.optimizer)
        return False, f"optimizer {name} is not element-wise"
    params = net.get_params()
    if "optimizer__param_groups" in params:
        return False, "the optimiser has several parameter groups"
    if net.iterator_train is not DataLoader or net.dataset is not Dataset:
        return False, "a custom iterator or dataset"
    if getattr(net, "compile", False):
        return False, "torch.compile is on"
    if any(isinstance(m, _TRAIN_MODE_DEPENDENT) for m in module.modules()):
        return False, "the module has dropout or batch-norm layers"
    return True, ""


def _batch_order(net: Any, X: np.ndarray, n_rows: int, seed: int | None,
                 max_epochs: int) -> list[Tensor]:
    """Row positions of every mini-batch skorch's ``fit`` would draw, in order."""
    probe = clone(net).set_params(train_split=None, max_epochs=max_epochs, verbose=0,
                                  warm_start=False)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        initialize_net(probe, X)
        dataset = probe.get_dataset(np.arange(n_rows), np.zeros(n_rows))
        order = []
        for _ in range(max_epochs):
            for positions, _ in probe.get_iterator(dataset, training=True):
                order.append(torch.as_tensor(positions, dtype=torch.long))
    return order, probe


def retrain_ensemble(net: Any, model: FunctionalModel, X: Tensor, T: Tensor,
                     removed: list, *, start: Tensor, seed: int | None, max_epochs: int,
                     anchor: Tensor, proximity: float) -> Tensor:
    """Train one copy per removed set of rows, each on the other rows; returns ``(B, P)``.

    Parameters
    ----------
    net : skorch.NeuralNet
        The recipe (must pass :func:`ensemble_supported`).
    model : FunctionalModel
        The net as a function of flat parameters (its loss is the net's).
    X, T : Tensor
        All N training rows.
    removed : list of sequences of int
        The rows each copy leaves out (the same number for every copy).
    start, seed, max_epochs, anchor, proximity
        As for :func:`~sklinfluence.model.retrain.retrain`.
    """
    n = X.shape[0]
    sizes = {len(rows) for rows in removed}
    if len(sizes) != 1:
        raise ValueError(f"every copy of an ensemble must leave out as many rows; got sizes "
                         f"{sorted(sizes)}.")
    everything = torch.arange(n)
    keeps = torch.stack([everything[~torch.isin(everything, torch.as_tensor(list(rows)))]
                         for rows in removed]).to(X.device)
    order, probe = _batch_order(net, X.cpu().numpy(), n - sizes.pop(), seed, max_epochs)
    B = len(removed)
    stack = start.detach().to(model.dtype).expand(B, -1).clone().requires_grad_(True)
    optimizer = type(probe.optimizer_)([stack], **probe.optimizer_.defaults)
    anchor = anchor.detach()

    def copy_loss(theta: Tensor, xb: Tensor, tb: Tensor) -> Tensor:
        loss = model.losses(theta, xb, tb).mean()
        if proximity:
            loss = loss + 0.5 * proximity * ((theta - anchor) ** 2).sum()
        return loss

    batched_loss = vmap(copy_loss)
    for positions in order:
        rows = keeps[:, positions.to(X.device)]
        optimizer.zero_grad()
        batched_loss(stack, X[rows], T[rows]).sum().backward()
        optimizer.step()
    return stack.detach()
