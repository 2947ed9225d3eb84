"""PBRFEstimator and LOOEstimator: the ground-truth rungs as estimators."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from .utils._sklearn import Interval, _fit_context
from .utils._warnings import describe_removal
from .utils._docs import fill_doc
from .base import BaseResponseEstimator, RungViewMixin
from .response.responder import Responder, Rung, rung
from .utils.threads import compute_section

__all__ = ["PBRFEstimator", "LOOEstimator"]


def warm_start_epochs(max_epochs: int, fraction: float) -> int:
    """Epochs of a retraining from ``θˢ``: ``fraction`` of the net's ``max_epochs``, ≥ 1."""
    return max(1, int(round(fraction * int(max_epochs))))


@fill_doc
class PBRFEstimator(RungViewMixin, BaseResponseEstimator):
    """Proximal Bregman response function: what influence functions approximate.

    For each removed sample ``z_m`` it minimises, from the trained ``θˢ``,

        ``(1/N) Σ_i D_L(f(θ, x_i), f(θˢ, x_i); t_i) + (μ/2)‖θ − θˢ‖²
        − ε L_m(θ) + (λ/2)‖θ − θˢ‖²``

    (rung 3 of Bae et al. 2022): stay close to the trained network in function
    space (Bregman divergence of the output loss) and in weight space
    (damping), while down-weighting ``z_m``. Solved full batch with
    inexact Newton (MINRES on exact Hessian-vector products) or, for many
    samples at once, a chord iteration with the shared damped Gauss–Newton
    factor, to a gradient norm ``tol`` times the initial one. A float32 net's
    PBRF is solved on a float64 copy (its gradient rounding is a few percent
    of the ``O(1/N)`` driving force). On a net with kinks (ReLU, max pooling)
    a minimiser may sit on a kink, where no gradient vanishes and Newton
    steps stall: those solves continue with L-BFGS on the objective itself
    (:func:`~sklinfluence.response.kinks.minimize_kinked`), which stops when the
    objective and the step stop changing.

    Parameters
    ----------
    net : skorch.NeuralNet or FrozenEstimator
        As for :class:`~sklinfluence.InfluenceEstimator`.
    damping : float, default=1e-3
        ``λ ≥ 0``, the weight-space proximity.
    epsilon : float, default=None
        Weight removed (``None``: ``1/N``).
    weight_decay : "auto" or float, default="auto"
        ``μ``; ``"auto"`` reads the optimiser's ``weight_decay``.
    tol : float, default=1e-9
        Relative gradient-norm tolerance of each solve.
    max_iter : int, default=50
        Newton iterations per removed sample.
    batch_size : int, default=None
        Samples per batch for per-sample gradients.
    {pbrf_batch}
    {measure}
    {execution}
    random_state : int, RandomState instance or None, default=None
        Seeds the net's training in ``fit``.

    Attributes
    ----------
    net_, model_, epsilon_, n_train_, classes_, n_features_in_, input_shape_
        As for :class:`~sklinfluence.InfluenceEstimator`.
    responder_ : Responder
        Computes and memoises the responses; ``responder_.last_info`` has, per
        removal of the latest call, the final and initial gradient norms,
        iterations, time, whether it converged, ``method`` (``"chord"``,
        ``"newton"`` or ``"lbfgs"``; ``"diverged"`` for a solve that diverged
        and whose retry from ``θˢ`` diverged too, answered with the best
        point that had not) and, for the L-BFGS continuation, the
        objective's ``objective_decrease`` and the ``relative_step`` over its
        last iterations.
    diagnostics_ : dict
        The latest call's solves summed up (empty before the first):
        ``n_removals``, ``converged`` (all of them), ``methods`` (removals per
        method), ``max_relative_grad_norm`` (largest final over initial
        gradient norm), ``not_converged`` (one entry per removal that did not
        converge, in order: its ``removal`` in words, ``method``,
        ``relative_grad_norm`` and ``failure``, what went wrong in words where
        a check caught it, else ``""``), ``n_diverged`` (removals whose solves
        diverged), ``max_objective_decrease`` and ``max_relative_step``
        (of the L-BFGS continuations, ``None`` without one),
        ``seconds_per_removal`` and ``solver_policy``: the solver of each role
        (``"pbrf_chord"``, the factor the batched solves share, among them)
        with its ``params`` and the ``reason`` it was chosen
        (:func:`~sklinfluence.solvers.plan_solvers`).

    Notes
    -----
    **Sign convention**: scores are ``Q(θ_after) − Q(θˢ)``; positive means
    removing the sample increases the measured loss (it was helpful).

    A :class:`~sklearn.exceptions.ConvergenceWarning` reports any solve that
    stops at ``max_iter`` above tolerance, with its gradient norm, naming
    every such removal; another names the removals whose solves diverged
    (gradient norm above the initial one, or objective above ``F(θˢ)``) once
    and again when retried from ``θˢ`` — never returned as answers. The
    measurement is exact: ``score_samples`` is ``L_m(θ_m) − L_m(θˢ)`` at the
    solved ``θ_m``, not a linearisation.

    References
    ----------
    Bae, Ng, Lo, Ghassemi & Grosse, "If Influence Functions are the Answer,
    Then What is the Question?", NeurIPS 2022.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from sklearn.datasets import load_diabetes
    >>> from sklinfluence import PBRFEstimator
    >>> X, y = load_diabetes(return_X_y=True)
    >>> net = NeuralNetRegressor(torch.nn.Linear(10, 1).double(), max_epochs=5,
    ...                          lr=0.1, verbose=0)
    >>> est = PBRFEstimator(net, damping=1e-3, random_state=0).fit(X, y)
    >>> est.score_samples(X[:3]).shape
    (3,)
    """

    _parameter_constraints: dict = {
        **BaseResponseEstimator._parameter_constraints,
        **BaseResponseEstimator._execution_constraints,
        "tol": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "removal_batch_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, net: Any, *, damping: float = 1e-3, epsilon: float | None = None,
                 weight_decay: str | float = "auto", tol: float = 1e-9, max_iter: int = 50,
                 batch_size: int | None = None, removal_batch_size: int = 32,
                 n_jobs: int | None = None, memory: Any = None, verbose: int = 0,
                 measure: str = "loss",
                 random_state: Any = None) -> None:
        self.net = net
        self.damping = damping
        self.epsilon = epsilon
        self.weight_decay = weight_decay
        self.tol = tol
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.removal_batch_size = removal_batch_size
        self.n_jobs = n_jobs
        self.memory = memory
        self.verbose = verbose
        self.measure = measure
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=False)
    @compute_section
    def fit(self, X: Any, y: Any) -> "PBRFEstimator":
        """Train (or adopt) the net; responses are solved when asked for.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Targets.

        Returns
        -------
        self : PBRFEstimator
        """
        self._fit_net(X, y, epsilon=self.epsilon)
        self.responder_ = Responder(self._context(pbrf_tol=self.tol,
                                                  pbrf_max_iter=self.max_iter))
        return self

    def _rung(self) -> Rung:
        return rung("pbrf")

    @property
    def diagnostics_(self) -> dict:
        """How the latest call's PBRF solves ended (see the class docstring)."""
        check_is_fitted(self, "responder_")
        info = self.responder_.last_info
        if info.get("rung") != "pbrf" or not len(info.get("converged", ())):
            return {}
        methods, counts = np.unique(info["method"].astype(str), return_counts=True)
        continued = info["method"] == "lbfgs"

        def largest(key: str) -> float | None:
            return float(np.max(info[key][continued])) if continued.any() else None

        relative = info["grad_norm"] / np.maximum(info["initial_grad_norm"], 1e-300)
        removals = self.responder_.last_removals
        return {"n_removals": int(len(info["converged"])),
                "converged": bool(np.all(info["converged"])),
                "methods": dict(zip(methods.tolist(), counts.tolist())),
                "max_relative_grad_norm": float(np.max(relative)),
                "not_converged": [{"removal": describe_removal(removals[j]),
                                   "method": str(info["method"][j]),
                                   "relative_grad_norm": float(relative[j]),
                                   "failure": str(info["failure"][j]) if "failure" in info
                                   else ""}
                                  for j in np.flatnonzero(~info["converged"].astype(bool))],
                "n_diverged": int(np.sum(info["method"] == "diverged")),
                "max_objective_decrease": largest("objective_decrease"),
                "max_relative_step": largest("relative_step"),
                "seconds_per_removal": float(np.mean(info["seconds"])),
                "solver_policy": self.responder_.solver_plan().describe()}


@fill_doc
class LOOEstimator(RungViewMixin, BaseResponseEstimator):
    """Leave-one-out retraining with the net's own recipe (rungs 0–2).

    For each removed training sample a clone of the net is trained, with the
    net's optimizer, learning rate, batch size and callbacks, on the ``N − 1``
    remaining rows:

    - ``warm_start=False`` (default, rung 0): from the original initialisation
      ``θ⁰`` with the same torch seed as the original fit, for the net's
      ``max_epochs`` — true leave-one-out;
    - ``warm_start=True`` (rung 1): from the trained ``θˢ``, for
      ``warm_start_fraction × max_epochs`` epochs;
    - ``proximal=True`` (rung 2): the warm start with ``(λ/2)‖θ − θˢ‖²``
      (``λ`` = ``damping``) added to the objective. It always starts at
      ``θˢ`` — the proximity term is centred there — whatever ``warm_start``
      says.

    Parameters
    ----------
    net : skorch.NeuralNet or FrozenEstimator
        The recipe. Cold start needs the unfitted net (a frozen one has no
        recorded ``θ⁰``); warm start works with either.
    warm_start : bool, default=False
        Reuse the fitted solution ``θˢ`` as the start of every retraining
        instead of the original initialisation ``θ⁰`` (scikit-learn's meaning
        of ``warm_start``, applied to the leave-one-out refits).
    proximal : bool, default=False
        Proximal warm start (rung 2); implies starting at ``θˢ``.
    damping : float, default=1e-3
        ``λ`` of the proximity term (used only when ``proximal=True``).
    warm_start_fraction : float, default=0.5
        Length of a warm-start retraining as a fraction of the net's
        ``max_epochs`` (at least one epoch). Bae et al. continue training
        from ``θˢ`` for a fraction of the original run; the default is this
        library's choice — set it to what your comparison needs.
    weight_decay : "auto" or float, default="auto"
        ``μ`` of the functional model (used for measurements only; the
        retraining applies the optimiser's own decay).
    batch_size : int, default=None
        Samples per batch for per-sample computations.
    removal_batch_size : int, default=32
        Leave-one-out copies trained together as a vectorised ensemble: one
        stack of parameters, each optimiser step evaluating every copy on its
        own mini-batch (the batch order skorch's ``fit`` would draw, same
        seed) with ``torch.func.vmap`` and updating the stack with the net's
        optimiser — equal to one-at-a-time retraining to rounding. Used when
        the recipe can be replayed exactly (one parameter group, SGD / Adam /
        AdamW / RMSprop / Adagrad, no callbacks, no dropout or batch-norm,
        skorch's default dataset and iterator); otherwise each copy runs the
        net's own ``fit``. Memory per copy: at most about
        ``8 (3P + 8 B (d + W))`` bytes for ``P`` parameters, mini-batches of
        ``B`` rows, ``d`` input features and summed layer widths ``W``
        (parameters, gradients and optimiser state; the mini-batch and its
        activations, forward and backward).
    {measure}
    {execution}
    random_state : int, RandomState instance or None, default=None
        Seeds the original fit; every retraining reuses that seed.

    Attributes
    ----------
    net_, model_, n_train_, classes_, n_features_in_, input_shape_
        As for :class:`~sklinfluence.InfluenceEstimator`.
    initial_params_ : Tensor or None
        ``θ⁰`` of the original fit (``None`` for a frozen net).
    seed_ : int
        torch seed of the original fit and of every retraining.
    responder_ : Responder
        Runs and memoises the retrainings.

    Notes
    -----
    **Sign convention**: scores are ``Q(θ_after) − Q(θˢ)``; positive means
    removing the sample increases the measured loss (it was helpful).

    With a mean-reduced loss the recipe minimises
    ``(1/(N−1)) Σ_{i≠m} L_i + (μ/2)‖θ‖²``, whose minimiser is that of
    ``J − L_m/N`` with ``μ`` replaced by ``μ(N−1)/N`` — identical when
    ``μ = 0``. The proximity coefficient is applied as
    ``λN/(N−1)`` so that rung 2's objective is rung 1's plus exactly
    ``(λ/2)‖θ − θˢ‖²`` in that normalisation. Only training rows can be
    removed.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from sklearn.datasets import load_diabetes
    >>> from sklinfluence import LOOEstimator
    >>> X, y = load_diabetes(return_X_y=True)
    >>> net = NeuralNetRegressor(torch.nn.Linear(10, 1).double(), max_epochs=3,
    ...                          lr=0.1, verbose=0)
    >>> loo = LOOEstimator(net, random_state=0).fit(X[:50], y[:50])
    >>> loo.score_samples(X[:2]).shape
    (2,)
    """

    _parameter_constraints: dict = {
        **{k: v for k, v in BaseResponseEstimator._parameter_constraints.items()
           if k != "epsilon"},
        **BaseResponseEstimator._execution_constraints,
        "warm_start": ["boolean"],
        "proximal": ["boolean"],
        "removal_batch_size": [Interval(Integral, 1, None, closed="left")],
        "warm_start_fraction": [Interval(Real, 0, None, closed="neither")],
    }

    def __init__(self, net: Any, *, warm_start: bool = False, proximal: bool = False,
                 damping: float = 1e-3, warm_start_fraction: float = 0.5,
                 weight_decay: str | float = "auto", batch_size: int | None = None,
                 removal_batch_size: int = 32, n_jobs: int | None = None, memory: Any = None,
                 verbose: int = 0, measure: str = "loss", random_state: Any = None) -> None:
        self.net = net
        self.warm_start = warm_start
        self.proximal = proximal
        self.damping = damping
        self.warm_start_fraction = warm_start_fraction
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.removal_batch_size = removal_batch_size
        self.n_jobs = n_jobs
        self.memory = memory
        self.verbose = verbose
        self.measure = measure
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=False)
    @compute_section
    def fit(self, X: Any, y: Any) -> "LOOEstimator":
        """Train (or adopt) the net and record ``θ⁰`` and the seed.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Targets.

        Returns
        -------
        self : LOOEstimator
        """
        self._fit_net(X, y)
        self.responder_ = Responder(self._context(
            warm_start_epochs=warm_start_epochs(self._adapter.max_epochs(self.net_),
                                                self.warm_start_fraction)))
        return self

    def _rung(self) -> Rung:
        if self.proximal:
            return rung("proximal")
        return rung("warm_start" if self.warm_start else "cold_start_loo")
