"""Baselines that users compare influence estimates against.

Their formulas are on the Theory page of the documentation, section
"Baselines".

- :class:`TracInCP` (Pruthi et al., 2020): the gradient dot products summed
  over checkpoints saved at the end of each epoch of the estimator's own fit,
  each weighted by the step size then;
- grad-dot is ``InfluenceEstimator(solver="identity")`` (the curvature
  replaced by 0), and the training loss ``L_z(θˢ)`` is
  :func:`training_loss`.

All in the library's sign convention: positive means that removing
the training row increases the measured loss (the row helped), so rankings,
correlations and the linear datamodeling score compare them directly with
the influence estimate and the ground truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from .utils._sklearn import _fit_context
from .base import BaseResponseEstimator
from .response.measure import to_numpy
from .model.removal import Removal
from .response.rungs import removal_forces
from .utils.threads import compute_section

__all__ = ["TracInCP", "training_loss"]


class TracInCP(BaseResponseEstimator):
    """TracIn-CP: gradient agreement summed over the checkpoints of the net's own fit.

    ``fit`` trains the net as every estimator does and keeps its parameters
    ``θ_k`` at the end of each epoch ``k`` with the step size ``η_k`` of that
    epoch's own steps (Pruthi et al.'s step size between checkpoints
    ``k − 1`` and ``k``). The score of removing row ``m`` on the loss of
    point ``z`` is

        ``Σ_k (η_k / B) ∇L_z(θ_k)ᵀ ∇L_m(θ_k)``,

    ``B`` the mini-batch size: each epoch's SGD step on ``m``'s batch
    lowered ``L_z`` by about that much, so removing ``m`` gives it back.

    Parameters
    ----------
    net : skorch.NeuralNet
        An unfitted skorch net (TracIn needs the training run: a
        ``FrozenEstimator`` or a scikit-learn linear model is refused).
    weight_decay : "auto" or float, default="auto"
        Only used to build the functional model (TracIn ignores it).
    batch_size : int, default=None
        Rows per batch of per-sample gradients (``None``: all).
    random_state : int, RandomState instance or None, default=None
        Seeds the fit, as for the other estimators.

    Attributes
    ----------
    checkpoints_ : Tensor of shape (n_epochs, n_params)
        ``θ_k``, held in memory: ``8 · n_epochs · P`` bytes in float64.
    learning_rates_ : ndarray of shape (n_epochs,)
        ``η_k``: the learning rate of epoch ``k``'s training steps (their mean
        where a scheduler changes it between steps). Under a schedule stepped
        at the end of each epoch (skorch's ``LRScheduler``), ``η_k`` is the
        rate epoch ``k`` trained with, not the one set for epoch ``k + 1``.
    train_batch_size_ : int
        ``B``.

    Notes
    -----
    **(choice)** One checkpoint per epoch, weighted by the step size of
    the epoch that ends there. For SGD this is the first-order effect of
    the epoch's step on ``m``'s batch; for adaptive optimisers (Adam,
    RMSprop) the learning rate is not the step size, and the score is only a
    heuristic. Momentum is not accounted for.

    References
    ----------
    Pruthi, Liu, Kale & Sundararajan, "Estimating Training Data Influence by
    Tracing Gradient Descent", NeurIPS 2020.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from sklearn.datasets import load_diabetes
    >>> from sklinfluence import TracInCP
    >>> X, y = load_diabetes(return_X_y=True)
    >>> net = NeuralNetRegressor(torch.nn.Linear(10, 1).double(), max_epochs=3,
    ...                          lr=0.1, verbose=0)
    >>> est = TracInCP(net, random_state=0).fit(X[:50], y[:50])
    >>> est.checkpoints_.shape
    torch.Size([3, 11])
    >>> est.loss_change(X[:4], y[:4], X[-2:], y[-2:]).shape
    (4, 2)
    """

    _parameter_constraints: dict = {
        k: v for k, v in BaseResponseEstimator._parameter_constraints.items()
        if k in ("net", "weight_decay", "batch_size", "random_state")}

    def __init__(self, net: Any, *, weight_decay: str | float = "auto",
                 batch_size: int | None = None, random_state: Any = None) -> None:
        self.net = net
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=False)
    @compute_section
    def fit(self, X: Any, y: Any) -> "TracInCP":
        """Train the net, keeping a checkpoint at the end of every epoch.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)

        Returns
        -------
        self : TracInCP
        """
        checkpoints: list = []
        self._fit_net(X, y, checkpoints=checkpoints)
        if not checkpoints:
            raise ValueError("the net trained for 0 epochs: TracIn needs max_epochs >= 1.")
        self.checkpoints_ = torch.stack([theta for theta, _ in checkpoints])
        self.learning_rates_ = np.array([lr for _, lr in checkpoints])
        size = int(self.net_.get_params().get("iterator_train__batch_size",
                                              self.net_.batch_size))
        self.train_batch_size_ = self.n_train_ if size <= 0 else min(size, self.n_train_)
        return self

    def _forces_at(self, theta: torch.Tensor, removals: list[Removal]) -> torch.Tensor:
        return removal_forces(self.model_, removals, self.batch_size,
                              theta.to(self.model_.dtype)).to(torch.float64)

    @compute_section
    def score_samples(self, X: Any, y: Any = None, groups: Any = None) -> np.ndarray:
        """Self-influence ``Σ_k (η_k/B) ‖∇L_m(θ_k)‖²`` of each row (or group).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like, default=None
            Targets (``None``: looked up among the training rows).
        groups : array-like of shape (n_samples,), default=None
            A label per row; a group's gradient is the sum of its rows'.

        Returns
        -------
        ndarray of shape (n_samples,) or (n_groups,)
            Positive: removing the row would increase its own loss.
        """
        check_is_fitted(self, "checkpoints_")
        removals, _ = self._removals(X, y, groups)
        total = torch.zeros(len(removals), dtype=torch.float64)
        for theta, lr in zip(self.checkpoints_, self.learning_rates_):
            g = self._forces_at(theta, removals)
            total += (lr / self.train_batch_size_) * (g * g).sum(dim=1)
        return to_numpy(total)

    @compute_section
    def loss_change(self, X: Any, y: Any = None, X_eval: Any = None, y_eval: Any = None,
                    groups: Any = None) -> np.ndarray:
        """``Σ_k (η_k/B) ∇L_e(θ_k)ᵀ ∇L_m(θ_k)`` for each row (or group) ``m`` and point ``e``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows (removals).
        y : array-like, default=None
            Their targets (``None``: looked up).
        X_eval, y_eval : array-like
            Evaluation points and their targets.
        groups : array-like of shape (n_samples,), default=None
            A label per row of ``X``.

        Returns
        -------
        ndarray of shape (n_samples or n_groups, n_eval)
        """
        check_is_fitted(self, "checkpoints_")
        Xe, Te = self._eval_targets(X_eval, y_eval)
        removals, _ = self._removals(X, y, groups)
        total = torch.zeros((len(removals), Xe.shape[0]), dtype=torch.float64)
        for theta, lr in zip(self.checkpoints_, self.learning_rates_):
            g_eval = self.model_.per_sample_grads(theta.to(self.model_.dtype), Xe, Te,
                                                  self.batch_size)
            total += (lr / self.train_batch_size_) * (
                self._forces_at(theta, removals) @ g_eval.to(torch.float64).T)
        return to_numpy(total)


def training_loss(estimator: Any, X: Any, y: Any = None) -> np.ndarray:
    """The training-loss baseline: each row's loss ``L_z(θˢ)`` under a fitted estimator.

    A strong mislabel detector (a flipped label is a high loss), in the
    sign convention of self-influence: the larger, the more the model had to
    bend to fit the row.

    Parameters
    ----------
    estimator : fitted sklinfluence estimator
    X : array-like of shape (n_samples, n_features)
    y : array-like, default=None
        Targets (``None``: looked up among the training rows).

    Returns
    -------
    ndarray of shape (n_samples,)
    """
    Xt, Tt, _ = estimator._targets_for(X, y)
    with torch.no_grad():
        return to_numpy(estimator.model_.losses(estimator.model_.params, Xt, Tt))
