"""Output losses: per-sample values, output Hessians and Bregman divergences.

An :class:`OutputLoss` is the training criterion of a net written as a pure
function of the network output ``y`` (shape ``(n, K)``) and the targets ``t``,
returning one loss per sample.  The per-sample losses average to exactly what
the net's ``get_loss`` returns for a batch (this is checked when a net is
adopted, see :mod:`sklinfluence.model.functional`), so the training objective is
``J(θ) = (1/N) Σ_i L_i(θ) + (μ/2)‖θ‖²`` with the criterion's own scaling
(see the Theory page of the documentation, section "Conventions that bite").

The output Hessian ``H_i = ∂²L/∂y²`` and the Bregman divergence
``D_L(y, y'; t) = L(y, t) − L(y', t) − ∇_y L(y', t)ᵀ(y − y')`` are derived
generically from the per-sample loss with :mod:`torch.func`, so they always use
the same scaling as the loss itself.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, jacrev, vmap

__all__ = ["OutputLoss", "SUPPORTED_CRITERIA", "output_loss_from_criterion"]

#: Criteria that sklinfluence can turn into an :class:`OutputLoss`.
SUPPORTED_CRITERIA = ("MSELoss", "CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss")

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


class OutputLoss:
    """A convex loss of the network output, evaluated per sample.

    Parameters
    ----------
    name : str
        Name of the criterion it mirrors (e.g. ``"CrossEntropyLoss"``).
    fn : callable
        ``fn(outputs, targets) -> losses`` with ``outputs`` of shape ``(n, K)``
        and one loss per sample (shape ``(n,)``).
    target_kind : {"index", "float"}
        Whether targets are class indices (int64, shape ``(n,)``) or real
        values of the outputs' shape.
    """

    def __init__(self, name: str, fn: PerSampleLoss, target_kind: str) -> None:
        self.name = name
        self._fn = fn
        self.target_kind = target_kind

    def __repr__(self) -> str:
        return f"OutputLoss({self.name!r})"

    def describe(self) -> str:
        """A stable description (name and options), the same in every process."""
        options = getattr(self._fn, "keywords", {})
        return f"{self.name}{sorted((k, repr(v)) for k, v in options.items())}"

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample losses, shape ``(n,)``."""
        return self._fn(outputs, targets)

    def _single(self, y: Tensor, t: Tensor) -> Tensor:
        return self._fn(y.unsqueeze(0), t.unsqueeze(0))[0]

    def output_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample gradient ``∇_y L(y_i, t_i)``, shape ``(n, K)``."""
        return vmap(grad(self._single))(outputs, targets)

    def output_hessian(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample output Hessians ``H_i = ∂²L/∂y²``, shape ``(n, K, K)``."""
        return vmap(jacrev(grad(self._single)))(outputs, targets)

    def output_hessian_root(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``L_i`` with ``L_i L_iᵀ = H_i`` (symmetric eigendecomposition), ``(n, K, K)``.

        The supported losses are convex, so ``H_i`` is positive semi-definite;
        rounding below zero is clipped.
        """
        w, V = torch.linalg.eigh(self.output_hessian(outputs, targets))
        return V * w.clamp_min(0).sqrt().unsqueeze(-2)

    def bregman(self, outputs: Tensor, ref_outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample Bregman divergence ``D_L(y, y'; t)`` with ``y'`` = ``ref_outputs``.

        Non-negative for the supported (convex) losses, zero with zero
        gradient and Hessian ``H`` at ``y = y'``.
        """
        ref_loss = self._fn(ref_outputs, targets)
        ref_grad = self.output_grad(ref_outputs, targets)
        linear = (ref_grad * (outputs - ref_outputs)).sum(dim=-1)
        return self._fn(outputs, targets) - ref_loss - linear


def _per_sample_mean(values: Tensor) -> Tensor:
    return values.reshape(values.shape[0], -1).mean(dim=1)


def _check_mean_reduction(criterion: torch.nn.Module) -> None:
    reduction = getattr(criterion, "reduction", "mean")
    if reduction != "mean":
        raise ValueError(
            f"criterion {type(criterion).__name__}(reduction={reduction!r}) is not "
            "supported: sklinfluence needs reduction='mean' so that the training "
            "objective is the mean of per-sample losses. Use the default "
            "reduction='mean'."
        )


def _check_no_weight(criterion: torch.nn.Module) -> None:
    if getattr(criterion, "weight", None) is not None:
        raise ValueError(
            f"criterion {type(criterion).__name__} with a `weight` tensor is not "
            "supported: a weighted mean is normalised per batch and does not split "
            "into per-sample losses. Remove `criterion__weight`."
        )


def output_loss_from_criterion(
    criterion: torch.nn.Module, *, nll_takes_probabilities: bool = False
) -> OutputLoss:
    """Build the :class:`OutputLoss` that mirrors an initialised torch criterion.

    Parameters
    ----------
    criterion : torch.nn.Module
        One of :data:`SUPPORTED_CRITERIA`, with ``reduction="mean"``.
    nll_takes_probabilities : bool, default=False
        skorch's :class:`~skorch.NeuralNetClassifier` with ``NLLLoss`` expects
        the module to output probabilities and applies ``log(p + eps)``
        (``eps`` the dtype's machine epsilon) before the criterion; set this
        to mirror it.

    Returns
    -------
    OutputLoss

    Raises
    ------
    ValueError
        If the criterion is not supported or uses options (per-class weights,
        a reduction other than the mean) that do not split into per-sample
        losses.
    """
    name = type(criterion).__name__
    if not isinstance(criterion, torch.nn.Module) or name not in SUPPORTED_CRITERIA:
        raise ValueError(
            f"criterion {name} is not supported; supported criteria are "
            f"{', '.join(SUPPORTED_CRITERIA)} (torch.nn, reduction='mean')."
        )
    _check_mean_reduction(criterion)

    if isinstance(criterion, torch.nn.MSELoss):
        return OutputLoss(name, _mse, "float")
    _check_no_weight(criterion)
    if isinstance(criterion, torch.nn.CrossEntropyLoss):
        smoothing = float(criterion.label_smoothing)
        return OutputLoss(name, partial(_cross_entropy, smoothing=smoothing), "index")
    if isinstance(criterion, torch.nn.NLLLoss):
        return OutputLoss(name, partial(_nll, on_probabilities=nll_takes_probabilities), "index")
    return OutputLoss(name, partial(_bce_with_logits, pos_weight=criterion.pos_weight), "float")


# Module-level (not closures) so that losses, models and estimators pickle.
def _mse(y: Tensor, t: Tensor) -> Tensor:
    return _per_sample_mean((y - t.reshape(y.shape)) ** 2)


def _cross_entropy(y: Tensor, t: Tensor, *, smoothing: float) -> Tensor:
    return F.cross_entropy(y, t, reduction="none", label_smoothing=smoothing)


def _nll(y: Tensor, t: Tensor, *, on_probabilities: bool) -> Tensor:
    if on_probabilities:  # skorch's NeuralNetClassifier.get_loss
        y = torch.log(y + torch.finfo(y.dtype).eps)
    return F.nll_loss(y, t, reduction="none")


def _bce_with_logits(y: Tensor, t: Tensor, *, pos_weight: Tensor | None) -> Tensor:
    values = F.binary_cross_entropy_with_logits(
        y, t.reshape(y.shape), reduction="none", pos_weight=pos_weight
    )
    return _per_sample_mean(values)
