"""InfluenceEstimator: the influence-function estimate of removing a sample."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions

from .base import BaseResponseEstimator, RungViewMixin
from .curvature import CURVATURES
from .response import Responder, Rung, rung
from .solvers import SOLVERS

__all__ = ["InfluenceEstimator"]


class InfluenceEstimator(RungViewMixin, BaseResponseEstimator):
    """Influence-function estimate of the effect of removing training samples.

    Linearises the training objective around the trained parameters ``θˢ``:
    removing sample ``z_m`` (objective ``J(θ) − ε L_m(θ)``) moves the
    parameters by

        ``Δθ_m = ε (C + λI)⁻¹ ∇_θ L_m(θˢ)``,

    where ``C`` is the Gauss–Newton matrix (or the Hessian) of
    ``J(θ) = (1/N) Σ_i L_i(θ) + (μ/2)‖θ‖²`` and ``λ`` the damping. This is
    rung 4/5 of the response ladder of Bae et al. (2022): it approximates the
    proximal Bregman response function (PBRF), not leave-one-out retraining.

    Parameters
    ----------
    net : skorch.NeuralNet or FrozenEstimator
        A skorch ``NeuralNetRegressor``, ``NeuralNetClassifier`` or
        ``NeuralNetBinaryClassifier`` (criteria ``MSELoss``,
        ``CrossEntropyLoss``, ``NLLLoss``, ``BCEWithLogitsLoss``). ``fit``
        trains a clone on exactly the rows it is given (the clone's
        ``train_split`` is set to ``None``). To use an already-trained net
        without retraining, wrap it: ``FrozenEstimator(trained_net)``.
    damping : float, default=1e-3
        ``λ ≥ 0`` added to the curvature's diagonal.
    solver : {"exact", "cg"}, default="exact"
        ``"exact"`` builds the dense ``P × P`` curvature in float64 and
        factorises it once at ``fit`` (memory ``8 P²`` bytes). ``"cg"`` is
        matrix-free conjugate gradients over all right-hand sides at once.
    curvature : {"ggn", "hessian"}, default="ggn"
        Gauss–Newton matrix (positive semi-definite) or the Hessian of ``J``.
    epsilon : float, default=None
        Weight removed from the sample: ``None`` means ``1/N`` (remove one
        sample); ``-1/N`` estimates adding a copy.
    weight_decay : "auto" or float, default="auto"
        ``μ`` of the objective: ``"auto"`` reads the optimiser's
        ``weight_decay`` per parameter group; a float overrides it.
    tol : float, default=1e-10
        Relative residual at which CG stops (``solver="cg"``).
    max_iter : int, default=None
        CG iteration cap (``None``: ten times the number of parameters).
    batch_size : int, default=None
        Number of samples processed at once for gradients and curvature
        products (``None``: all). Bounds memory, never changes results.
    random_state : int, RandomState instance or None, default=None
        Seeds what the net draws in ``fit`` — the module's initial weights
        when ``net.module`` is a class, the batch order when it shuffles,
        dropout masks — in a forked torch RNG, so the global RNG is left
        untouched. A module passed as an instance keeps the weights it has.

    Attributes
    ----------
    net_ : skorch.NeuralNet
        The trained net (the frozen one itself when ``net`` is frozen).
    model_ : FunctionalModel
        The net as a pure function of its flat parameters.
    responder_ : Responder
        Computes the parameter responses (``param_change``).
    solver_ : ExactSolver or CGSolver
        The fitted solver; ``solver_.last_solve`` records the latest solve
        (iterations, relative residual, time).
    solver_info_ : dict
        What ``fit`` did to prepare the solver (build and factor times, …).
    epsilon_ : float
        The ``ε`` in use.
    n_train_ : int
        Number of training rows ``N``.
    classes_ : ndarray
        Class labels, for classifiers.
    n_features_in_ : int
        Number of input features.

    Notes
    -----
    **Sign convention**: every score is ``Q(θ_after) − Q(θˢ)`` for a loss
    ``Q``; a positive score means that removing the sample *increases* the
    measured loss, i.e. the sample was helpful (SPEC §4).

    The influence on a measurement ``Q`` is ``ε ∇Q(θˢ)ᵀ (C + λI)⁻¹ ∇L_m(θˢ)``.
    For an influence matrix the solve is done on the side with fewer vectors.

    References
    ----------
    Bae, Ng, Lo, Ghassemi & Grosse, "If Influence Functions are the Answer,
    Then What is the Question?", NeurIPS 2022.
    Koh & Liang, "Understanding Black-box Predictions via Influence
    Functions", ICML 2017.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from sklearn.datasets import load_diabetes
    >>> from sklinfluence import InfluenceEstimator
    >>> X, y = load_diabetes(return_X_y=True)
    >>> net = NeuralNetRegressor(torch.nn.Linear(10, 1).double(), max_epochs=5,
    ...                          lr=0.1, verbose=0)
    >>> est = InfluenceEstimator(net, damping=1e-3, random_state=0).fit(X, y)
    >>> est.score_samples(X[:3]).shape
    (3,)
    >>> est.loss_change(X[:5], y[:5], X[-2:], y[-2:]).shape
    (5, 2)
    """

    _parameter_constraints: dict = {
        **BaseResponseEstimator._parameter_constraints,
        "solver": [StrOptions(set(SOLVERS))],
        "curvature": [StrOptions(set(CURVATURES))],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [None, Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        net: Any,
        *,
        damping: float = 1e-3,
        solver: str = "exact",
        curvature: str = "ggn",
        epsilon: float | None = None,
        weight_decay: str | float = "auto",
        tol: float = 1e-10,
        max_iter: int | None = None,
        batch_size: int | None = None,
        random_state: Any = None,
    ) -> None:
        self.net = net
        self.damping = damping
        self.solver = solver
        self.curvature = curvature
        self.epsilon = epsilon
        self.weight_decay = weight_decay
        self.tol = tol
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X: Any, y: Any) -> "InfluenceEstimator":
        """Train (or adopt) the net and prepare the curvature solver.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs; the objective ``J`` is the mean loss over them.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Targets: class labels for classifiers (any values that
            :class:`~sklearn.preprocessing.LabelEncoder` accepts), real values
            for regressors (1-D is fine).

        Returns
        -------
        self : InfluenceEstimator
        """
        self._fit_net(X, y)
        self.responder_ = Responder(self._context(
            curvature=self.curvature, solver=self.solver, tol=self.tol, max_iter=self.max_iter))
        self.solver_ = self.responder_.solver()
        self.solver_info_ = dict(self.solver_.info)
        return self

    def _rung(self) -> Rung:
        return rung("influence")

    def _grads(self, X: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        return self.model_.per_sample_grads(self.model_.params, X, T, self.batch_size)

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        return self.solver_.solve(B).to(torch.float64)

    def score_samples(self, X: Any, y: Any = None) -> np.ndarray:
        """Estimated change of each sample's own loss when it is removed.

        Self-influence ``ε ∇L_m(θˢ)ᵀ (C + λI)⁻¹ ∇L_m(θˢ)``: large values flag
        samples the model had to bend to fit (often mislabeled ones).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to score.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs), default=None
            Their targets; ``None`` looks the rows up among the training rows.

        Returns
        -------
        ndarray of shape (n_samples,)
            Positive = removing the sample increases its own loss (it was
            helpful to itself, as every training sample is with ``C`` PSD).
        """
        Xt, Tt, _ = self._targets_for(X, y)
        G = self._grads(Xt, Tt)
        S = self._solve(G)
        return (self.epsilon_ * (G.to(torch.float64) * S).sum(dim=1)).cpu().numpy()

    def loss_change(self, X: Any, y: Any = None, X_eval: Any = None,
                    y_eval: Any = None) -> np.ndarray:
        """Estimated change of each evaluation loss when each sample is removed.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to remove.
        y : array-like, default=None
            Their targets; ``None`` looks the rows up among the training rows.
        X_eval : array-like of shape (n_eval, n_features)
            Evaluation inputs (e.g. test points).
        y_eval : array-like, default=None
            Their targets; ``None`` looks them up among the training rows.

        Returns
        -------
        ndarray of shape (n_samples, n_eval)
            Entry ``[m, e]`` is ``ε ∇L_e(θˢ)ᵀ (C + λI)⁻¹ ∇L_m(θˢ)``; positive =
            removing sample ``m`` increases the loss on point ``e`` (``m``
            helped ``e``).
        """
        Xe, Te = self._eval_targets(X_eval, y_eval)
        Xt, Tt, _ = self._targets_for(X, y)
        G_train, G_eval = self._grads(Xt, Tt), self._grads(Xe, Te)
        if G_eval.shape[0] <= G_train.shape[0]:  # solve on the side with fewer vectors
            result = G_train.to(torch.float64) @ self._solve(G_eval).T
        else:
            result = self._solve(G_train) @ G_eval.to(torch.float64).T
        return (self.epsilon_ * result).cpu().numpy()
