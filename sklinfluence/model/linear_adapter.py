"""Adapter for scikit-learn's linear models: the same ladder on a linear baseline.

``LinearRegression``, ``Ridge`` and ``LogisticRegression`` (L2, binary or
multinomial) become a float64 ``torch.nn.Linear`` with the equivalent loss and
weight decay, so that every estimator and the Decomposer run on them:

=====================  ==================================  =====================
model                  scikit-learn minimises               as ``J = mean L + μ/2‖w‖²``
=====================  ==================================  =====================
LinearRegression       ``Σ_i ‖y_i − ŷ_i‖²``                 MSE, ``μ = 0``
Ridge(alpha)           ``Σ_i ‖y_i − ŷ_i‖² + α‖W‖²``         MSE, ``μ = 2α/(N K)``
LogisticRegression(C)  ``C Σ_i CE_i + ½‖W‖²``               (B)CE, ``μ = 1/(C N)``
=====================  ==================================  =====================

(``K`` outputs; MSE averages over them like ``torch.nn.MSELoss``.) The
intercept is never penalised, as in scikit-learn. Refitting the same
scikit-learn estimator on ``N − 1`` rows minimises exactly ``J − L_m/N``
(the penalty is absolute, not per sample), so leave-one-out *is* scikit-learn's
own refit; the proximal rung adds ``(λ/2)‖θ − θˢ‖²`` to that objective and is
minimised exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from torch import Tensor

from .functional import FunctionalModel
from .losses import output_loss_from_criterion

__all__ = ["LinearAdapter", "is_linear_model"]

_PREDICTION_RTOL = 1e-9


def is_linear_model(est: Any) -> bool:
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge

    return isinstance(est, (LinearRegression, Ridge, LogisticRegression))


class LinearAdapter:
    """A scikit-learn linear model as sklinfluence sees it.

    Parameters
    ----------
    est : LinearRegression, Ridge or LogisticRegression
        The model (unfitted recipe, or the fitted model when ``frozen``).
    frozen : bool
        Passed as ``FrozenEstimator(model)``: adopt, never refit for ``fit``.
    """

    accepts_nd = False  # scikit-learn's linear models take 2-D X

    exact_proximal = True  # rung 2 is minimised exactly (scikit-learn has no proximity)
    needs_initial_params = False  # convex: the refit does not depend on its start

    def __init__(self, est: Any, frozen: bool = False) -> None:
        from sklearn.linear_model import LogisticRegression, Ridge

        self.est, self.frozen = est, frozen
        self.classifier = isinstance(est, LogisticRegression)
        self.target_kind = "index" if self.classifier else "float"
        if isinstance(est, Ridge) and np.ndim(est.alpha) != 0:
            raise ValueError("Ridge with one alpha per target is not supported; "
                             "use a scalar alpha.")
        if getattr(est, "positive", False):
            raise ValueError(f"{type(est).__name__}(positive=True) is a constrained fit; "
                             "influence needs an unconstrained one. Use positive=False.")
        if self.classifier:
            penalty = getattr(est, "penalty", "l2")
            l1_ratio = getattr(est, "l1_ratio", None)
            if penalty not in ("l2", "deprecated") or l1_ratio not in (None, 0, 0.0) \
                    or est.C in (np.inf,):
                raise ValueError(
                    "only L2-penalised LogisticRegression is supported (penalty='l2', "
                    f"l1_ratio None or 0, finite C); got penalty={penalty!r}, "
                    f"l1_ratio={l1_ratio!r}, C={est.C!r}.")
            if est.class_weight is not None:
                raise ValueError("LogisticRegression(class_weight=...) weights samples "
                                 "unequally; use class_weight=None.")
            if est.solver == "liblinear":
                raise ValueError("LogisticRegression(solver='liblinear') penalises the "
                                 "intercept; use solver='lbfgs' (the default).")
        if frozen and not hasattr(est, "coef_"):
            raise ValueError(f"FrozenEstimator({type(est).__name__}) needs a fitted model.")

    def resolve_target_kind(self, classes: np.ndarray | None) -> str:
        """Binary logistic regression has one logit (BCE); multinomial K (CE)."""
        if self.classifier and classes is not None and len(classes) == 2:
            self.target_kind = "binary"
        return self.target_kind

    def known_classes(self) -> np.ndarray | None:
        return np.asarray(self.est.classes_) if self.frozen and self.classifier else None

    def _targets(self, T: np.ndarray) -> np.ndarray:
        if self.target_kind == "float":
            return T[:, 0] if T.ndim == 2 and T.shape[1] == 1 else T
        return T

    def fit(self, X: np.ndarray, encoded: np.ndarray, seed: int,
            checkpoints: list | None = None) -> tuple[Any, None]:
        """Fit a clone with scikit-learn (``seed`` unused: the fit is convex)."""
        if checkpoints is not None:
            raise ValueError(f"{type(self.est).__name__} is fitted by scikit-learn's solver, "
                             "which has no epochs to checkpoint; TracIn needs a skorch net.")
        self.n_samples, self.n_outputs = X.shape[0], (encoded.shape[1] if encoded.ndim == 2 else 1)
        if self.frozen:
            return self.est, None
        return clone(self.est).fit(X, self._targets(encoded)), None

    def _theta(self, fitted: Any) -> tuple[np.ndarray, np.ndarray | None]:
        coef = np.atleast_2d(np.asarray(fitted.coef_, dtype=np.float64))
        intercept = (np.atleast_1d(np.asarray(fitted.intercept_, dtype=np.float64))
                     if fitted.fit_intercept else None)
        return coef, intercept

    def functional_model(self, fitted: Any, weight_decay: Any) -> FunctionalModel:
        coef, intercept = self._theta(fitted)
        module = torch.nn.Linear(coef.shape[1], coef.shape[0], bias=intercept is not None,
                                 dtype=torch.float64)
        with torch.no_grad():
            module.weight.copy_(torch.as_tensor(coef))
            if intercept is not None:
                module.bias.copy_(torch.as_tensor(intercept))
        if self.classifier:
            criterion = (torch.nn.BCEWithLogitsLoss() if self.target_kind == "binary"
                         else torch.nn.CrossEntropyLoss())
            mu = 1.0 / (fitted.C * self.n_samples)
        else:
            criterion = torch.nn.MSELoss()
            alpha = float(getattr(fitted, "alpha", 0.0))
            mu = 2.0 * alpha / (self.n_samples * self.n_outputs)
        if weight_decay != "auto":
            decay = [float(weight_decay)] * (2 if intercept is not None else 1)
        else:
            decay = [mu, 0.0] if intercept is not None else [mu]
        return FunctionalModel(module, output_loss_from_criterion(criterion), decay)

    @staticmethod
    def max_epochs(fitted: Any) -> int:
        return 0

    def check(self, fitted: Any, model: FunctionalModel, X: Tensor, T: Tensor) -> None:
        """The torch model must reproduce scikit-learn's decision function."""
        X = X[:16]
        with torch.no_grad():
            ours = model.forward(model.params, X).numpy()
        theirs = np.asarray(fitted.decision_function(X.numpy()) if self.classifier
                            else fitted.predict(X.numpy()), dtype=np.float64)
        if not np.allclose(ours, theirs.reshape(ours.shape), rtol=_PREDICTION_RTOL,
                           atol=_PREDICTION_RTOL * max(1.0, np.abs(theirs).max())):
            raise ValueError(f"the torch model of {type(fitted).__name__} does not reproduce "
                             "its predictions; this is a bug in sklinfluence.")

    def recipe_key(self) -> str:
        """A stable description of the refit (for the response cache)."""
        return repr(self.est.get_params(deep=False))

    @staticmethod
    def can_retrain_batch(model: FunctionalModel) -> bool:
        return False  # scikit-learn refits one model at a time

    def retrain(self, X: Tensor, T: Tensor, *, start: Tensor, seed: int | None,
                max_epochs: int, anchor: Tensor, proximity: float) -> Tensor:
        """scikit-learn's refit on ``(X, T)`` (start, seed and epochs do not apply)."""
        if proximity:
            raise ValueError("linear baselines minimise the proximal rung exactly")
        refit = clone(self.est).fit(X.cpu().numpy(), self._targets(T.cpu().numpy()))
        coef, intercept = self._theta(refit)
        theta = np.concatenate([coef.reshape(-1)] + ([intercept] if intercept is not None else []))
        if theta.size != start.numel():
            raise ValueError("the refit without this sample has a different number of "
                             "parameters: removing it removes a class from the data.")
        return torch.as_tensor(theta, dtype=start.dtype, device=start.device)
