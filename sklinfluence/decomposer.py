"""Decomposer: the five-term decomposition of the influence–LOO gap."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .utils._sklearn import Interval, StrOptions, _fit_context
from .utils._docs import fill_doc
from .base import BaseResponseEstimator
from .curvature.operator import CURVATURES
from .ground_truth import warm_start_epochs
from .response.measure import mean_losses, to_numpy
from .response.responder import LADDER, TERMS, Responder
from .solvers import SOLVER_NAMES, default_tol
from .utils.threads import compute_section

__all__ = ["Decomposer"]

METRICS = ("output_l2", "loss")


@fill_doc
class Decomposer(TransformerMixin, BaseResponseEstimator):
    """Split the gap between influence estimates and leave-one-out into five terms.

    For each removed training sample, walks the response ladder of Bae et al.
    (2022) — cold-start LOO, warm start, proximal warm start, PBRF, exact
    linearised PBRF, practical influence — and reports the distance between
    consecutive rungs:

    ====================  ============  ==============================================
    term                  rungs         isolates
    ====================  ============  ==============================================
    warm_start_gap        0 → 1         dependence on the initialisation
    proximity_gap         1 → 2         the proximity that damping implies
    non_convergence_gap   2 → 3         ``θˢ`` not being a minimiser of ``J``
    linearization_error   3 → 4         non-linearity in ``θ`` and ``ε``
    solver_error          4 → 5         the inexact solve (solver, curvature)
    ====================  ============  ==============================================

    Parameters
    ----------
    net : skorch.NeuralNet
        The recipe (trained by ``fit``; cold-start LOO needs ``θ⁰``, so a
        ``FrozenEstimator`` net is refused by ``transform``).
    damping : float, default=1e-3
        ``λ`` of the proximal rungs and the influence solves.
    solver : {"auto", "exact", "kernel", "cg", "lissa", "ekfac", "kfac", "arnoldi", "identity"}, default="auto"
        Solver of the practical influence (rung 5), as in
        :class:`~sklinfluence.InfluenceEstimator`. Rung 4 is always the exact
        damped Gauss–Newton solve: ``"auto"``'s dense solve or kernel form
        (where the data are smaller than the net) where it picks one, else
        the dense solve where it is predicted to fit the memory limit and
        ``time_budget_seconds``, else the cheapest exact option that fits in
        memory (block CG to ``tol``).
    solver_params : dict, default=None
        Options of ``solver`` (see :class:`~sklinfluence.InfluenceEstimator`).
    curvature : {"ggn", "hessian"}, default="ggn"
        Curvature of rung 5.
    metric : {"output_l2", "loss"}, default="output_l2"
        ``"output_l2"``: the paper's function-space distance
        ``(1/|E|) Σ_{x∈E} ‖f(θ_a, x) − f(θ_b, x)‖₂`` (non-negative);
        ``"loss"``: the signed change of the mean evaluation loss,
        ``Q(θ_{k+1}) − Q(θ_k)``, whose five terms sum to
        ``Q(θ_5) − Q(θ_0)`` exactly.
    warm_start_fraction : float, default=0.5
        Length of the warm-start and proximal retrainings as a fraction of
        the net's ``max_epochs``.
    weight_decay : "auto" or float, default="auto"
        ``μ``; ``"auto"`` reads the optimiser's ``weight_decay``.
    tol : float, default=None
        CG/LiSSA tolerance of rung 5 (and of a mixed-precision kernel's
        refinement); ``None``: ``1e-10`` for a float64 net, ``1e-6`` for a
        float32 net (see :class:`~sklinfluence.InfluenceEstimator`).
    max_iter : int, default=None
        CG/LiSSA iteration cap of rung 5.
    pbrf_tol : float, default=1e-9
        Relative gradient tolerance of the PBRF solves.
    pbrf_max_iter : int, default=50
        Newton iterations per PBRF solve.
    batch_size : int, default=None
        Samples per batch for per-sample gradients and curvature products.
    removal_batch_size : int, default=32
        Removed samples computed together: the PBRF rung by the shared-factor
        chord iteration of :class:`~sklinfluence.PBRFEstimator` (to within
        ``pbrf_tol`` of the one-at-a-time answer), the retraining rungs as
        the vectorised ensemble of :class:`~sklinfluence.LOOEstimator` where
        the recipe allows (equal to rounding); memory as documented there.
    {measure}
    {execution}
    random_state : int, RandomState instance or None, default=None
        Seeds the original fit; the retrainings reuse its seed.

    Attributes
    ----------
    net_, model_, n_train_, classes_, n_features_in_, input_shape_, initial_params_, seed_
        As for :class:`~sklinfluence.LOOEstimator`.
    X_eval_, T_eval_ : Tensor
        The evaluation set ``E`` (default: the training rows).
    rungs_ : list of str
        Names of the six rungs, in ladder order (the columns of
        :meth:`rung_losses` and :meth:`rung_scores`).
    responder_ : Responder
        Computes and memoises every rung's responses.

    Notes
    -----
    Rungs 4 and 5 are evaluated as the network at ``θˢ + Δθ`` (a choice;
    see the Theory page of the documentation, section "The five terms").
    Every removal uses ``ε = 1/N``, the weight that retraining removes.
    :meth:`rung_responses` and :meth:`rung_losses` give each rung's
    own result, not just the differences, and :meth:`rung_scores` each rung's
    self-influence; ``responder_.timings`` records the wall time of every
    response computed.

    References
    ----------
    Bae, Ng, Lo, Ghassemi & Grosse, "If Influence Functions are the Answer,
    Then What is the Question?", NeurIPS 2022.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from sklearn.datasets import load_diabetes
    >>> from sklinfluence import Decomposer
    >>> X, y = load_diabetes(return_X_y=True)
    >>> net = NeuralNetRegressor(torch.nn.Linear(10, 1).double(), max_epochs=3,
    ...                          lr=0.1, verbose=0)
    >>> dec = Decomposer(net, random_state=0).fit(X[:40], y[:40])
    >>> dec.transform(X[:2]).shape
    (2, 5)
    >>> list(dec.get_feature_names_out())[:2]
    ['warm_start_gap', 'proximity_gap']
    """

    _parameter_constraints: dict = {
        **{k: v for k, v in BaseResponseEstimator._parameter_constraints.items()
           if k != "epsilon"},
        **BaseResponseEstimator._execution_constraints,
        "solver": [StrOptions(SOLVER_NAMES)],
        "solver_params": [None, dict],
        "curvature": [StrOptions(set(CURVATURES))],
        "metric": [StrOptions(set(METRICS))],
        "warm_start_fraction": [Interval(Real, 0, None, closed="neither")],
        "tol": [None, Interval(Real, 0, None, closed="neither")],
        "max_iter": [None, Interval(Integral, 1, None, closed="left")],
        "pbrf_tol": [Interval(Real, 0, None, closed="neither")],
        "pbrf_max_iter": [Interval(Integral, 1, None, closed="left")],
        "removal_batch_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, net: Any, *, damping: float = 1e-3, solver: str = "auto",
                 solver_params: dict | None = None, curvature: str = "ggn", metric: str = "output_l2",
                 warm_start_fraction: float = 0.5, weight_decay: str | float = "auto",
                 tol: float | None = None, max_iter: int | None = None, pbrf_tol: float = 1e-9,
                 pbrf_max_iter: int = 50, batch_size: int | None = None,
                 removal_batch_size: int = 32, n_jobs: int | None = None,
                 memory: Any = None, verbose: int = 0, measure: str = "loss",
                 random_state: Any = None) -> None:
        self.net = net
        self.damping = damping
        self.solver = solver
        self.solver_params = solver_params
        self.curvature = curvature
        self.metric = metric
        self.warm_start_fraction = warm_start_fraction
        self.weight_decay = weight_decay
        self.tol = tol
        self.max_iter = max_iter
        self.pbrf_tol = pbrf_tol
        self.pbrf_max_iter = pbrf_max_iter
        self.batch_size = batch_size
        self.removal_batch_size = removal_batch_size
        self.n_jobs = n_jobs
        self.memory = memory
        self.verbose = verbose
        self.measure = measure
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=False)
    @compute_section
    def fit(self, X: Any, y: Any, X_eval: Any = None, y_eval: Any = None) -> "Decomposer":
        """Train the net and prepare every rung.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Targets.
        X_eval, y_eval : array-like, default=None
            The evaluation set ``E`` of the metric (default: the training
            rows). ``y_eval`` is needed for ``metric="loss"`` unless ``X_eval``
            rows are training rows.

        Returns
        -------
        self : Decomposer
        """
        self._fit_net(X, y)
        self.rungs_ = [r.name for r in LADDER]
        self.responder_ = Responder(self._context(
            curvature=self.curvature, solver=self.solver, solver_params=self.solver_params,
            tol=default_tol(self.model_.dtype) if self.tol is None else float(self.tol),
            max_iter=self.max_iter, pbrf_tol=self.pbrf_tol, pbrf_max_iter=self.pbrf_max_iter,
            warm_start_epochs=warm_start_epochs(self._adapter.max_epochs(self.net_),
                                                self.warm_start_fraction)))
        if X_eval is None:
            self.X_eval_, self.T_eval_ = self.X_train_, self.T_train_
        elif y_eval is not None or self.metric == "loss":
            self.X_eval_, self.T_eval_ = self._eval_targets(X_eval, y_eval)
        else:  # the function-space distance needs inputs only
            X_eval = self._validate_rows(X_eval, "X_eval")
            self.X_eval_ = torch.tensor(X_eval, dtype=self.model_.dtype, device=self.model_.device)
            self.T_eval_ = None
        return self

    def _deltas(self, X: Any, y: Any, groups: Any = None) -> tuple:
        """The removals and every rung's response ``θ_k − θˢ``, shape ``(n, 6, P)``."""
        check_is_fitted(self, "responder_")
        removals, _ = self._removals(X, y, groups)
        deltas = [self.responder_.param_change(r, removals) for r in LADDER]
        return removals, torch.stack(deltas, dim=1)

    @compute_section
    def rung_responses(self, X: Any, y: Any = None, groups: Any = None) -> dict:
        """Each rung's parameter response ``θ_k − θˢ`` to removing each sample (or group).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows to remove.
        y : array-like, default=None
            Their targets (``None``: looked up).
        groups : array-like of shape (n_samples,), default=None
            A label per row; rows sharing a label are removed together, one
            removal per distinct label in sorted order (``numpy.unique``).

        Returns
        -------
        dict of str to ndarray of shape (n_samples or n_groups, n_params)
            Keyed by rung name, in ladder order.
        """
        deltas = to_numpy(self._deltas(X, y, groups)[1])
        return {r.name: deltas[:, k] for k, r in enumerate(LADDER)}

    @compute_section
    def rung_losses(self, X: Any, y: Any = None, groups: Any = None) -> np.ndarray:
        """Mean evaluation loss ``Q(θ_k)`` at each rung, shape ``(n_removals, 6)``.

        With ``measure="linear"``, its first-order model ``Q(θˢ) + ∇Q(θˢ)ᵀ Δθ_k``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows to remove.
        y : array-like, default=None
            Their targets (``None``: looked up).
        groups : array-like of shape (n_samples,), default=None
            A label per row; rows sharing a label are removed together.

        Returns
        -------
        ndarray of shape (n_samples or n_groups, 6)
            Columns in ladder order (cold-start LOO … influence).
        """
        check_is_fitted(self, "responder_")
        if self.T_eval_ is None:
            raise ValueError("rung_losses needs evaluation targets: fit with y_eval.")
        deltas = self._deltas(X, y, groups)[1]
        q = [mean_losses(self.model_, deltas[:, k], self.X_eval_, self.T_eval_, self.measure,
                         self.batch_size) for k in range(len(LADDER))]
        return to_numpy(torch.stack(q, dim=1))

    @compute_section
    def rung_scores(self, X: Any, y: Any = None, groups: Any = None) -> np.ndarray:
        """Each rung's self-influence, shape ``(n_removals, 6)``.

        ``L_m(θ_k) − L_m(θˢ)`` (``measure="loss"``; rungs 4 and 5 evaluated at
        ``θˢ + Δθ``) or ``∇L_m(θˢ)ᵀ Δθ_k`` (``"linear"``; column 5 is then
        :meth:`InfluenceEstimator.score_samples <sklinfluence.InfluenceEstimator.score_samples>`
        with the same solver); for a group, the change of its rows' summed
        loss. The per-rung counterpart of the estimators' ``score_samples``,
        for comparing how the rungs rank the same samples. Positive =
        removing the sample increases its own loss.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows to remove.
        y : array-like, default=None
            Their targets (``None``: looked up).
        groups : array-like of shape (n_samples,), default=None
            A label per row; rows sharing a label are removed together.

        Returns
        -------
        ndarray of shape (n_samples or n_groups, 6)
            Columns in ladder order (cold-start LOO … influence).
        """
        removals, deltas = self._deltas(X, y, groups)
        return np.column_stack([self._own_change(removals, deltas[:, k])
                                for k in range(len(LADDER))]).reshape(len(removals),
                                                                      len(LADDER))

    @compute_section
    def transform(self, X: Any, y: Any = None, groups: Any = None) -> np.ndarray:
        """The five terms for each removed sample (or group).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows to remove.
        y : array-like, default=None
            Their targets (``None``: looked up among the training rows).
        groups : array-like of shape (n_samples,), default=None
            A label per row; rows sharing a label are removed together, one
            row of terms per distinct label in sorted order
            (``numpy.unique``).

        Returns
        -------
        ndarray of shape (n_samples or n_groups, 5)
            Columns ``warm_start_gap, proximity_gap, non_convergence_gap,
            linearization_error, solver_error`` (see ``metric``).
        """
        if self.metric == "loss":
            return np.diff(self.rung_losses(X, y, groups), axis=1)
        deltas = self._deltas(X, y, groups)[1]  # checks fitted first
        thetas = self.model_.params + deltas
        with torch.no_grad():
            rows = []
            for row in thetas:
                outputs = torch.stack([self.model_.forward(th, self.X_eval_) for th in row])
                rows.append((outputs[1:] - outputs[:-1]).norm(dim=-1).mean(dim=-1))
        result = torch.stack(rows) if rows else thetas.new_zeros((0, len(TERMS)))
        return to_numpy(result)

    @compute_section
    def non_additivity(self, X: Any, y: Any = None, *, groups: Any) -> np.ndarray:
        """How far each group's response is from the sum of its members' responses.

        For each rung, the metric between the network after removing the
        group together, ``θˢ + Δθ_S``, and after adding up its members'
        single responses, ``θˢ + Σ_{m∈S} Δθ_m``: the mean output distance
        over the evaluation inputs (``metric="output_l2"``) or the signed
        difference of the mean evaluation loss, group minus sum
        (``metric="loss"``). Influence (rungs 4 and 5) is additive, so its
        columns are zero up to rounding; the others grow with the group's
        size and coherence (Koh et al., 2019).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows to remove.
        y : array-like, default=None
            Their targets (``None``: looked up).
        groups : array-like of shape (n_samples,)
            A label per row; rows sharing a label are removed together.

        Returns
        -------
        ndarray of shape (n_groups, 6)
            Rows in sorted label order, columns in ladder order.
        """
        if groups is None:
            raise ValueError("non_additivity compares groups with their members: pass groups.")
        removals, grouped = self._deltas(X, y, groups)
        singles = self._deltas(X, y)[1]
        inverse = torch.as_tensor(np.unique(np.asarray(groups), return_inverse=True)[1])
        summed = torch.zeros_like(grouped).index_add_(0, inverse.reshape(-1), singles)
        theta = self.model_.params
        if self.metric == "loss":
            if self.T_eval_ is None:
                raise ValueError("metric='loss' needs evaluation targets: fit with y_eval.")
            columns = [mean_losses(self.model_, grouped[:, k], self.X_eval_, self.T_eval_,
                                   self.measure, self.batch_size)
                       - mean_losses(self.model_, summed[:, k], self.X_eval_, self.T_eval_,
                                     self.measure, self.batch_size)
                       for k in range(len(LADDER))]
            return to_numpy(torch.stack(columns, dim=1))
        with torch.no_grad():
            result = torch.stack([
                torch.stack([(self.model_.forward(theta + a, self.X_eval_)
                              - self.model_.forward(theta + b, self.X_eval_)).norm(dim=-1).mean()
                             for a, b in zip(group, total)])
                for group, total in zip(grouped, summed)])
        return to_numpy(result)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names of the five terms, in column order.

        Parameters
        ----------
        input_features : ignored
            Present for API consistency.

        Returns
        -------
        ndarray of str
        """
        return np.asarray(TERMS, dtype=object)
