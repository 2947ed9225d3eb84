"""Measuring a response: how much a loss changes when the parameters move by ``Δθ``.

The training objective decides the response ``Δθ`` of a removal; a
*measurement* ``Q`` — a loss on evaluation points, or the removed rows' own
loss — turns it into a score (Kronfluence's split of training loss from
measurement). Two named measurements, the same for every rung and estimator
(the ``measure`` parameter):

- ``"loss"``: ``Q(θˢ + Δθ) − Q(θˢ)``, the change of the loss at the
  response parameters;
- ``"linear"``: ``∇Q(θˢ)ᵀ Δθ``, its first-order form. For the influence
  rungs (``Δθ = ε (C + λI)⁻¹ g``) this is the classic influence function
  ``ε ∇Q(θˢ)ᵀ (C + λI)⁻¹ g`` of Koh & Liang (2017).

A removal's own loss is the weighted sum over its rows,
``Σ_{m∈S} w_m L_m`` (one row: ``L_m``). :func:`to_numpy` is the one place
where results leave torch.

Sign convention: a positive change means that the removal
increases the measured loss.

A lower-precision (float32) net's ``"loss"`` measurements are evaluated in
float64 on its own weights (:func:`in_float64`): a removal moves the
parameters by ``O(1/N)``, and the change of a well-fit row's loss falls below
float32's rounding of the loss itself — on a 20,000-row digits CNN every such
difference of two float32 losses came out exactly 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..model.functional import FunctionalModel, iterate_batches
from ..model.removal import Removal, stacked_rows

__all__ = ["MEASURES", "to_numpy", "in_float64", "loss_change", "linear_change",
           "own_change", "mean_losses"]

MEASURES = ("linear", "loss")


def to_numpy(values: Tensor) -> np.ndarray:
    """A result as a float64 numpy array on the CPU (the library's numpy/torch boundary)."""
    return values.detach().to(torch.float64).cpu().numpy()


def in_float64(model: FunctionalModel, *tensors: Tensor) -> tuple:
    """``model`` and ``tensors`` (those of floating point) in float64, for a
    difference of losses that the model's own precision would round away; the
    same objects where the model is float64 already."""
    if model.dtype == torch.float64:
        return (model, *tensors)
    return (model.astype(torch.float64), *(_float64(t) for t in tensors))


def _float64(t: Tensor) -> Tensor:
    return t.to(torch.float64) if t.is_floating_point() else t


def loss_change(model: FunctionalModel, deltas: Tensor, X: Tensor, T: Tensor) -> Tensor:
    """``L_e(θˢ + Δ_j) − L_e(θˢ)`` for each response ``j`` and evaluation row ``e``, ``(n, m)``,
    evaluated in float64 (:func:`in_float64`)."""
    model, X, T = in_float64(model, X, T)
    theta = model.params
    with torch.no_grad():
        before = model.losses(theta, X, T)
        if not len(deltas):
            return before.new_zeros((0, len(before)))
        return torch.stack([model.losses(theta + d, X, T) - before for d in deltas])


def linear_change(model: FunctionalModel, deltas: Tensor, X: Tensor, T: Tensor,
                  batch_size: int | None = None) -> Tensor:
    """``∇L_e(θˢ)ᵀ Δ_j`` for each response ``j`` and evaluation row ``e``, ``(n, m)``.

    The evaluation gradients are computed in chunks of ``batch_size`` rows.
    """
    blocks = [deltas.to(torch.float64) @ model.per_sample_grads(
        model.params, xb, tb, batch_size).to(torch.float64).T
        for xb, tb in iterate_batches(X, T, batch_size)]
    return torch.cat(blocks, dim=1) if blocks else deltas.new_zeros((len(deltas), 0))


def own_change(model: FunctionalModel, removals: list[Removal], deltas: Tensor,
               measure: str = "loss", batch_size: int | None = None) -> Tensor:
    """Change of each removal's own (weighted, summed) loss under its response, ``(n,)``.

    Parameters
    ----------
    model : FunctionalModel
    removals : list of Removal
    deltas : Tensor of shape (n, P)
        ``deltas[j]`` is the response to ``removals[j]``.
    measure : {"loss", "linear"}
        See the module docstring.
    batch_size : int, optional
        Rows per gradient chunk (``"linear"``).
    """
    theta = model.params
    if not removals:
        return theta.new_zeros(0)
    X, T, owner = stacked_rows(removals, theta)
    if measure == "linear":  # Σ_S ∇L_m(θˢ)ᵀ Δ_S
        rows = torch.cat([model.per_sample_grads(theta, xb, tb, batch_size).to(torch.float64)
                          for xb, tb in iterate_batches(X, T, batch_size)])
        per_row = (rows * deltas.to(torch.float64)[owner]).sum(dim=1)
    else:
        exact, theta, X, T = in_float64(model, theta, X, T)
        with torch.no_grad():
            before = exact.losses(theta, X, T)
            after = torch.cat([exact.losses(theta + delta, _float64(r.X), _float64(r.T))
                               for r, delta in zip(removals, deltas)])
        per_row = after - before
    if all(r.size == 1 for r in removals):
        return per_row
    return per_row.new_zeros(len(removals)).index_add_(0, owner, per_row)


def mean_losses(model: FunctionalModel, deltas: Tensor, X: Tensor, T: Tensor,
                measure: str = "loss", batch_size: int | None = None) -> Tensor:
    """The mean evaluation loss ``Q`` at ``θˢ + Δ_j`` for each response, ``(n,)``.

    With ``measure="linear"``, its first-order model ``Q(θˢ) + ∇Q(θˢ)ᵀ Δ_j``.
    Evaluated in float64 (:func:`in_float64`).
    """
    if measure == "linear":
        with torch.no_grad():
            base = model.losses(model.params, X, T).mean().to(torch.float64)
        return base + linear_change(model, deltas, X, T, batch_size).mean(dim=1)
    model, X, T = in_float64(model, X, T)
    theta = model.params
    with torch.no_grad():
        base = model.losses(theta, X, T).mean()
        return torch.stack([model.losses(theta + d, X, T).mean() for d in deltas]) \
            if len(deltas) else base.new_zeros(0)
