"""InfluenceEstimator: the influence-function estimate of removing a sample."""

from __future__ import annotations

import time
from functools import partial
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from joblib import effective_n_jobs
from sklearn.utils import Bunch
from sklearn.utils.validation import check_is_fitted

from .utils._sklearn import Interval, StrOptions, _fit_context
from .utils._warnings import naming_right_hand_sides, removal_names
from .base import BaseResponseEstimator, RungViewMixin
from .curvature.operator import CURVATURES
from .model.functional import iterate_batches
from .model.removal import removal_chunks, removal_rows, single_removals
from .response.responder import Responder, Rung, rung
from .response.rungs import removal_forces
from .response.measure import MEASURES, to_numpy
from .solvers import SOLVER_NAMES, default_tol
from .utils.execution import map_parts
from .utils.memory import chunk_rows
from .utils.ranking import TopK
from .utils.threads import compute_section

__all__ = ["InfluenceEstimator"]


class _Stopwatch:
    """Computes gradients (``timed(compute, *args)``), adding up their wall time
    (``seconds``: a scoring call's ``gradient_seconds``)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, compute: Any, *args: Any) -> torch.Tensor:
        start = time.perf_counter()
        G = compute(*args)
        self.seconds += time.perf_counter() - start
        return G


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
    solver : {"auto", "exact", "kernel", "cg", "lissa", "ekfac", "kfac", "arnoldi", "identity"}, default="auto"
        How ``(C + λI)⁻¹`` is applied (:mod:`sklinfluence.solvers`):

        - ``"exact"``: dense ``P × P`` curvature in float64, factorised once
          at ``fit`` (memory ``8 P²`` bytes);
        - ``"kernel"``: the same exact inverse of the Gauss–Newton matrix in
          kernel (Woodbury) form, an ``n × n`` factorisation for ``n = N·K'``
          rows (``K'`` output-Hessian root columns per sample; memory
          ``16 n²`` bytes) — for nets larger than their data, of the layer
          types EK-FAC handles (:mod:`sklinfluence.curvature.kernel`); with
          ``solver_params={"mixed_precision": True}`` the kernel is built and
          factorised in float32 and each solve refined in float64 to ``tol``
          (its measured residual in ``diagnostics_``); ``loss_change`` needs
          no gradients of the removed training rows;
        - ``"cg"``: matrix-free conjugate gradients on all right-hand sides at
          once, optionally preconditioned (``solver_params``); exact to
          ``tol``;
        - ``"lissa"``: truncated Neumann series (full batch), its scale from a
          Lanczos estimate of the top eigenvalue; exact to ``tol`` but slow
          when the curvature is ill-conditioned;
        - ``"ekfac"`` / ``"kfac"``: (eigenvalue-corrected) Kronecker-factored
          Gauss–Newton of ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``,
          normalisation layers and ``nn.MultiheadAttention``'s projections
          (:mod:`sklinfluence.curvature.kfac`) — approximate, fast,
          no iterations; each call measures its relative residual under the
          true curvature on up to 8 right-hand sides (``diagnostics_``)
          where training rows × parameters are at most 10⁷;
        - ``"arnoldi"``: top-``rank`` eigenpairs plus damping — approximate
          below full rank, its residual measured as for EK-FAC;
        - ``"identity"``: grad-dot, a baseline — the curvature
          of the data replaced by 0, ``∇Qᵀ∇L / (μ + λ)`` (needs
          ``damping > 0`` or weight decay; rankings do not depend on it);
        - ``"auto"``: the exact option — ``"exact"``, ``"kernel"`` (where
          ``N·K ≤ P``) or block ``"cg"`` — predicted cheapest from the sizes
          and rates measured on this machine, among those predicted to fit
          ``time_budget_seconds`` and the memory limit
          (:func:`~sklinfluence.set_config`); ``"exact"`` whenever it fits
          up to 5,000 parameters. Where none fits, EK-FAC (Arnoldi where
          EK-FAC does not apply) with a warning naming the exact option and
          its predicted cost. The kernel and CG in mixed precision at
          ``tol ≥ 1e-6`` (float32 factor or products, refined to ``tol`` in
          float64), the kernel also for every float32 net.
    solver_params : dict, default=None
        Options of the solver: for ``"cg"`` ``{"preconditioner": "ekfac" |
        "kfac" | "arnoldi" | None, "rank": int, "block_size": int,
        "mixed_precision": bool}`` (see
        :class:`~sklinfluence.solvers.CGSolver`); for ``"kernel"``
        ``{"mixed_precision": bool}``; for ``"lissa"``
        ``{"scale": float}``; for ``"arnoldi"`` ``{"rank": int}`` (default 50).
    curvature : {"ggn", "hessian"}, default="ggn"
        Gauss–Newton matrix (positive semi-definite) or the Hessian of ``J``.
        ``"ekfac"``/``"kfac"`` support the Gauss–Newton matrix only.
    epsilon : float, default=None
        Weight removed from the sample: ``None`` means ``1/N`` (remove one
        sample); ``-1/N`` estimates adding a copy.
    weight_decay : "auto" or float, default="auto"
        ``μ`` of the objective: ``"auto"`` reads the optimiser's
        ``weight_decay`` per parameter group; a float overrides it.
    tol : float, default=None
        Relative residual ``‖b − A x‖/‖b‖`` at which CG and LiSSA stop, and
        to which the mixed-precision kernel refines (for self-influence: the
        relative error of the checked scores). ``None``: ``1e-10`` for a
        float64 net, ``1e-6`` for a float32 net (skorch's default), whose
        gradients carry float32 rounding — on a 38,282-parameter digits CNN
        its self-influence differs from that of the same weights in float64
        by up to 2.5e-7 relative, so a tighter solve buys nothing. The value
        used is ``diagnostics_["tol"]``.
    max_iter : int, default=None
        Iteration cap of CG (``None``: ten times the number of parameters)
        and LiSSA (``None``: 1,000); a solve stopped short warns with its
        residual (:class:`~sklearn.exceptions.ConvergenceWarning`).
    batch_size : int, default=None
        Number of samples processed at once for gradients and curvature
        products (``None``: all), and the chunk in which the larger side of
        an influence matrix is streamed (``None``: as many rows as keep its
        gradients within ``working_memory_bytes`` of
        :func:`~sklinfluence.set_config`, 64 MiB by default). Bounds memory,
        never changes results beyond rounding.
    measure : {"linear", "loss"}, default="linear"
        How a response is turned into a score (:mod:`sklinfluence.response.measure`):
        ``"linear"``, the first-order change ``∇Q(θˢ)ᵀ Δθ`` — the classic
        influence function ``ε ∇Q(θˢ)ᵀ (C + λI)⁻¹ ∇L_m(θˢ)``; ``"loss"``, the
        change of the loss at the response, ``Q(θˢ + Δθ) − Q(θˢ)`` (what the
        ground-truth estimators and the Decomposer report by default).
    n_jobs : int, default=None
        Workers (joblib) over which the training side of self-influence,
        influence matrices and :meth:`most_influential` is split, in chunks
        of rows — ``None`` means 1 unless in a
        :func:`joblib.parallel_config` context, ``-1`` all cores; under
        ``joblib.parallel_config(backend="dask")`` the chunks run on a Dask
        cluster. Each worker gets a copy of the fitted solver; the answers
        equal the sequential ones.
    verbose : int, default=0
        Above 0, a progress bar for each block of conjugate-gradient solves
        (``solver="cg"``, and ``"auto"`` above the dense size): columns
        converged, iterations, and the worst relative residual so far.
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
    solver_ : object
        The fitted solver (:mod:`sklinfluence.solvers`);
        ``solver_.last_solve`` records the latest solve.
    diagnostics_ : dict
        What the solver did: set by ``fit`` (``solver``, the solver ``"auto"``
        chose, ``approximate`` — whether it applies an approximate inverse
        (EK-FAC, K-FAC, Arnoldi below full rank) —, set-up times such as
        ``build_seconds``/``fit_seconds``, ``memory_bytes``, eigenvalue
        estimates ``top_eigenvalue`` … where computed) and updated by every
        scoring call (``n_rhs``, ``n_iter``, ``approximate``,
        ``max_relative_residual`` — the largest ``‖b − (C + λI)x‖/‖b‖`` under
        the true curvature over the ``n_measured`` right-hand sides it was
        measured on: all of them for CG and LiSSA, up to 8 per solve for the
        approximations, ``None`` for the exact solver —, ``converged`` —
        whether CG/LiSSA met ``tol``, ``True`` for the exact solver, ``None``
        for an approximation —, ``gradient_seconds``, ``solve_seconds``).
        ``solver_policy`` maps each role — ``"influence"`` (this solver),
        ``"exact_influence"`` (the ladder's exact rung) and ``"pbrf_chord"``
        (the factor the batched PBRF of a ``score`` reference shares) — to
        its ``solver``, ``params`` and the ``reason`` it was chosen
        (:func:`~sklinfluence.solvers.plan_solvers`); with a requested
        approximate or iterative solver only ``"influence"`` (the exact
        roles are decided, their costs predicted, only if used).
    epsilon_ : float
        The ``ε`` in use.
    n_train_ : int
        Number of training rows ``N``.
    classes_ : ndarray
        Class labels, for classifiers.
    n_features_in_ : int
        Number of input features (for N-dimensional inputs, the size of the
        second axis, as scikit-learn counts it).
    input_shape_ : tuple of int
        The shape of one row of ``X`` in ``fit`` (``(64,)`` for flat digits,
        ``(1, 8, 8)`` for images): every method takes rows of this shape.

    Notes
    -----
    **Sign convention**: every score is ``Q(θ_after) − Q(θˢ)`` for a loss
    ``Q``; a positive score means that removing the sample *increases* the
    measured loss, i.e. the sample was helpful.

    The influence on a measurement ``Q`` is ``ε ∇Q(θˢ)ᵀ (C + λI)⁻¹ ∇L_m(θˢ)``.
    For an influence matrix (``loss_change``) the solve is done on the side
    with fewer vectors (``s`` of them) and the other side's gradients are
    streamed in chunks of ``c = batch_size`` rows, so the memory is about

        ``8 P (2 s + c) + 8 n_train n_eval`` bytes

    plus the solver's own (``8 P²`` exact; ``40 s P`` CG; EK-FAC
    ``8 Σ_l (d_out² + d_in² + d_out d_in)``; Arnoldi ``8 rank P``) and one
    batch of activations, in float64.

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
    >>> top = est.most_influential(X[-2:], y[-2:], n_top=4)  # the 4 most helpful rows
    >>> top.proponents.shape, top.opponent_scores.shape
    ((2, 4), (2, 4))
    """

    _parameter_constraints: dict = {
        **BaseResponseEstimator._parameter_constraints,
        "solver": [StrOptions(SOLVER_NAMES)],
        "solver_params": [None, dict],
        "curvature": [StrOptions(set(CURVATURES))],
        "tol": [None, Interval(Real, 0, None, closed="neither")],
        "max_iter": [None, Interval(Integral, 1, None, closed="left")],
        "measure": [StrOptions(set(MEASURES))],
        "n_jobs": [None, Integral],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        net: Any,
        *,
        damping: float = 1e-3,
        solver: str = "auto",
        solver_params: dict | None = None,
        curvature: str = "ggn",
        epsilon: float | None = None,
        weight_decay: str | float = "auto",
        tol: float | None = None,
        max_iter: int | None = None,
        batch_size: int | None = None,
        measure: str = "linear",
        n_jobs: int | None = None,
        verbose: int = 0,
        random_state: Any = None,
    ) -> None:
        self.net = net
        self.damping = damping
        self.solver = solver
        self.solver_params = solver_params
        self.curvature = curvature
        self.epsilon = epsilon
        self.weight_decay = weight_decay
        self.tol = tol
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.measure = measure
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=False)
    @compute_section
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
        self._fit_net(X, y, epsilon=self.epsilon)
        tol = default_tol(self.model_.dtype) if self.tol is None else float(self.tol)
        self.responder_ = Responder(self._context(
            curvature=self.curvature, solver=self.solver, solver_params=self.solver_params,
            tol=tol, max_iter=self.max_iter))
        self.solver_ = self.responder_.solver()
        self.diagnostics_ = {"requested_solver": self.solver, "tol": tol, **self.solver_.info,
                             "solver_policy": self.responder_.solver_plan().describe()}
        return self

    def _execution_options(self) -> dict:
        """None: influence is one solve for all removals, with nothing to run in
        parallel or to store (the context's defaults)."""
        return {}

    def _rung(self) -> Rung:
        return rung("influence")

    def _grads(self, X: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        return self.model_.per_sample_grads(self.model_.params, X, T, self._vmap_rows())

    def _vmap_rows(self) -> int:
        """Rows differentiated at once: ``batch_size``, or as many as keep the
        vectorised pass's gradients and temporaries (about four flat gradients a
        row) within ``working_memory_bytes``."""
        return self.batch_size or chunk_rows(4 * 8 * self.model_.n_params)

    def _record(self, gradient_seconds: float, solves: list) -> None:
        """Merge the latest call's solves into ``diagnostics_``.

        ``converged`` is ``None`` when any solve was an approximation (which
        has no stopping rule), else whether all met ``tol``.
        """
        residuals = [s.max_relative_residual for s in solves
                     if s.max_relative_residual is not None]
        verdicts = [s.converged for s in solves]
        self.diagnostics_.update(self.solver_.info)  # current: a kernel may switch precision
        self.diagnostics_.update({
            "n_rhs": sum(s.n_rhs for s in solves),
            "n_iter": max((s.n_iter for s in solves), default=0),
            "approximate": any(s.approximate for s in solves) if solves
            else self.solver_.info["approximate"],
            "max_relative_residual": max(residuals) if residuals else None,
            "n_measured": sum(s.n_measured for s in solves),
            "converged": None if None in verdicts else all(verdicts),
            "gradient_seconds": gradient_seconds,
            "solve_seconds": sum(s.seconds for s in solves),
        })

    def _solve(self, B: torch.Tensor, solves: list) -> torch.Tensor:
        X = self.solver_.solve(B).to(torch.float64)
        solves.append(self.solver_.last_solve)
        return X

    def _stream_rows(self) -> int:
        """Rows per chunk of the streamed side of an influence matrix."""
        return self.batch_size or chunk_rows(8 * self.model_.n_params)

    def _linear_parts(self, removals: list, row_bytes: int = 0) -> list:
        """Chunks of removals (one removal at least each): of at most
        :meth:`_stream_rows` rows, or, for a solver that streams the rows itself,
        as many as keep ``row_bytes`` a row within ``working_memory_bytes`` —
        and at least two per worker when ``n_jobs`` gives several."""
        n_rows = removal_rows(removals)
        rows = chunk_rows(row_bytes, n_rows) if self.solver_.streams_rows else self._stream_rows()
        workers = effective_n_jobs(self.n_jobs)
        if workers > 1 and n_rows > 1:
            rows = min(rows, -(-n_rows // (2 * workers)))
        if self.solver_.streams_rows and not row_bytes and workers == 1:
            rows = None
        return removal_chunks(removals, rows)

    def _map(self, function: Any, parts: list) -> list:
        """``function(part)`` for each part, in order (on ``n_jobs`` workers)."""
        results = [None] * len(parts)
        for position, result in map_parts(function, parts, self.n_jobs):
            results[position] = result
        return results

    def _self_scores(self, removals: list, row_bytes: int = 0) -> tuple[list, list, Any]:
        """Parts of the removals, their self-products (float64) and the solves."""
        timed = _Stopwatch()
        solver, forces = self.solver_, partial(timed, self._forces)
        parts = self._linear_parts(removals, row_bytes)

        def one(part: list) -> tuple:
            with naming_right_hand_sides(removal_names(part)):
                return solver.self_products(part, forces), solver.last_solve
        done = self._map(one, parts)
        return parts, [d[0] for d in done], ([d[1] for d in done], timed)

    def _query_products(self, Xq: torch.Tensor, Tq: torch.Tensor, forces: Any,
                        timed: Any) -> Any:
        """The solver's products with the queries ``(Xq, Tq)``
        (:meth:`~sklinfluence.solvers.Solver.query_products`): a solver that
        streams rows (EK-FAC, K-FAC) reads the queries' gradients off their
        layer captures itself; the others get them as rows."""
        B = None if self.solver_.streams_rows else timed(self._grads, Xq, Tq)
        return self.solver_.query_products(B, Xq, Tq, forces)

    def _streamed_matrix(self, Xe: torch.Tensor, Te: torch.Tensor, removals: list,
                         forces: Any, timed: Any, solves: list) -> torch.Tensor:
        """The products of a solver that streams the rows (EK-FAC, K-FAC), queries a
        chunk at a time: each chunk's solutions (a flat vector a query in the
        net's precision) within half of ``working_memory_bytes`` (the products
        take the other half), then the removals' captures streamed — once per
        chunk, so that a few queries of a large net stay within the setting
        (the more chunks, the more passes over the removals)."""
        itemsize = torch.finfo(self.model_.dtype).bits // 8  # solutions in half the setting
        step = chunk_rows(2 * itemsize * self.model_.n_params, Xe.shape[0])
        blocks = []
        for start in range(0, Xe.shape[0], step):
            with naming_right_hand_sides(lambda j, s=start: f"row {j + s} of X_eval"):
                products = self._query_products(Xe[start:start + step], Te[start:start + step],
                                                forces, timed)
            blocks.append(products(removals))
            solves.append(self.solver_.last_solve)
        if not blocks:
            return torch.zeros((len(removals), 0), dtype=torch.float64)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def _forces(self, removals: list) -> torch.Tensor:
        return removal_forces(self.model_, removals, self._vmap_rows())

    @compute_section
    def score_samples(self, X: Any, y: Any = None, groups: Any = None) -> np.ndarray:
        """Estimated change of each sample's (or group's) own loss when it is removed.

        Self-influence ``ε ∇L_m(θˢ)ᵀ (C + λI)⁻¹ ∇L_m(θˢ)`` (``measure="linear"``;
        for a group, ``ε gᵀ (C + λI)⁻¹ g`` with ``g = Σ_{m∈S} ∇L_m(θˢ)``), or
        ``L_m(θˢ + Δθ_m) − L_m(θˢ)`` (``measure="loss"``): large values flag
        samples the model had to bend to fit (often mislabeled ones).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to score.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs), default=None
            Their targets; ``None`` looks the rows up among the training rows.
        groups : array-like of shape (n_samples,), default=None
            A label per row; rows sharing a label are removed together, one
            score per distinct label in sorted order (``numpy.unique``).

        Returns
        -------
        ndarray of shape (n_samples,) or (n_groups,)
            Positive = removing the sample increases its own loss (it was
            helpful to itself, as every training sample is with ``C`` PSD).
        """
        if self.measure == "loss":
            return super().score_samples(X, y, groups)
        removals, _ = self._removals(X, y, groups)
        # a factorisation gives the forms directly (EK-FAC: from the rotated layer
        # gradients; the kernel: from its diagonal blocks); other solvers solve
        _, scores, (solves, timed) = self._self_scores(removals)
        self._record(timed.seconds, solves)
        result = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
        return to_numpy(self.epsilon_ * result)

    @compute_section
    def loss_change(self, X: Any, y: Any = None, X_eval: Any = None,
                    y_eval: Any = None, groups: Any = None) -> np.ndarray:
        """Estimated change of each evaluation loss when each sample (or group) is removed.

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
        groups : array-like of shape (n_samples,), default=None
            A label per row of ``X``; rows sharing a label are removed
            together, one row of the result per distinct label in sorted
            order.

        Returns
        -------
        ndarray of shape (n_samples or n_groups, n_eval)
            Entry ``[m, e]`` is ``ε ∇L_e(θˢ)ᵀ (C + λI)⁻¹ ∇L_m(θˢ)``
            (``measure="linear"``) or ``L_e(θˢ + Δθ_m) − L_e(θˢ)``
            (``"loss"``); positive = removing sample ``m`` increases the loss on
            point ``e`` (``m`` helped ``e``).
        """
        if self.measure == "loss":
            return super().loss_change(X, y, X_eval, y_eval, groups)
        Xe, Te = self._eval_targets(X_eval, y_eval)
        removals, _ = self._removals(X, y, groups)
        solves: list = []
        timed = _Stopwatch()
        if Xe.shape[0] <= len(removals):  # solve on the side with fewer vectors
            forces = partial(timed, self._forces)
            if self.solver_.streams_rows and effective_n_jobs(self.n_jobs) == 1:
                result = self._streamed_matrix(Xe, Te, removals, forces, timed, solves)
                self._record(timed.seconds, solves)
                return to_numpy(result.mul_(self.epsilon_))  # in place: no n × k copy
            with naming_right_hand_sides(lambda j: f"row {j} of X_eval"):
                if effective_n_jobs(self.n_jobs) == 1:
                    # the solver streams the removals' forces (the kernel form needs
                    # few of them)
                    result = self.solver_.removal_products(
                        timed(self._grads, Xe, Te), Xe, Te, removals, forces,
                        max_rows=self._stream_rows())
                else:  # one solve here, the products with the removals on the workers
                    products = self._query_products(Xe, Te, forces, timed)
                    result = torch.cat(self._map(products, self._linear_parts(
                        removals, 8 * Xe.shape[0])))
            solves.append(self.solver_.last_solve)
            self._record(timed.seconds, solves)
            return to_numpy(result.mul_(self.epsilon_))  # in place: no second n × k copy
        G_small = timed(self._forces, removals)
        with naming_right_hand_sides(removal_names(removals)):
            S = self._solve(G_small, solves)  # (n_removals, P)
        del G_small
        blocks = [timed(self._grads, *part).to(torch.float64) @ S.T  # stream the eval side
                  for part in iterate_batches(Xe, Te, self._stream_rows())]
        self._record(timed.seconds, solves)
        result = torch.cat(blocks) if blocks else S.new_zeros((0, S.shape[0]))
        return to_numpy(self.epsilon_ * result.T)

    # ------------------------------------------------------------------ top-k
    def _candidates(self, X: Any, y: Any, groups: Any) -> list:
        """The removals ranked: the training rows (``X`` None) or those ``X`` describes."""
        if X is None:
            if y is not None or groups is not None:
                raise ValueError("y and groups describe the rows of X; pass X with them "
                                 "(X=None ranks the training rows).")
            return single_removals(self.X_train_, self.T_train_, np.arange(self.n_train_))
        return self._removals(X, y, groups)[0]

    @staticmethod
    def _check_n_top(n_top: Any) -> int:
        if isinstance(n_top, bool) or not isinstance(n_top, Integral) or n_top < 1:
            raise ValueError(f"n_top must be an integer >= 1, got {n_top!r}.")
        return int(n_top)

    @compute_section
    def most_influential(self, X_eval: Any, y_eval: Any = None, *, n_top: int = 10,
                         X: Any = None, y: Any = None, groups: Any = None) -> Bunch:
        """The training rows (or groups) whose removal most raises — and most lowers —
        each evaluation loss, without the full influence matrix.

        Ranks by the influence ``ε ∇L_e(θˢ)ᵀ (C + λI)⁻¹ ∇L_m(θˢ)`` (the
        ``measure="linear"`` entries of :meth:`loss_change`, whatever
        ``measure``): the evaluation rows are solved for once and the candidate
        rows streamed in chunks — in the layers' own form for EK-FAC/K-FAC, on
        ``n_jobs`` workers — keeping the ``n_top`` best and worst per
        evaluation row, so the memory is proportional to
        ``n_top × n_eval`` plus one chunk, not to ``n_candidates × n_eval``.

        Parameters
        ----------
        X_eval : array-like of shape (n_eval, n_features)
            Evaluation inputs (e.g. test points).
        y_eval : array-like, default=None
            Their targets; ``None`` looks them up among the training rows.
        n_top : int, default=10
            How many proponents and opponents to return per evaluation row
            (fewer when there are fewer candidates).
        X, y : array-like, default=None
            The candidate rows and their targets; ``None``: the training rows.
        groups : array-like of shape (n_candidates,), default=None
            A label per row of ``X``; rows sharing a label are removed together
            and ranked as one candidate (positions then refer to the sorted
            labels, ``numpy.unique(groups)``).

        Returns
        -------
        Bunch
            ``proponents`` and ``opponents``, int arrays of shape
            ``(n_eval, k)``: positions of the candidates (rows of ``X``, or of
            the training data) whose removal most increases (proponents:
            they helped) and most decreases (opponents: they hurt) each
            evaluation loss, the strongest first; ``proponent_scores`` and
            ``opponent_scores``, their influences (``loss_change`` entries:
            positive for proponents unless none helped).

        Examples
        --------
        See the class's examples.
        """
        check_is_fitted(self)
        n_top = self._check_n_top(n_top)
        Xe, Te = self._eval_targets(X_eval, y_eval)
        candidates = self._candidates(X, y, groups)
        timed = _Stopwatch()
        with naming_right_hand_sides(lambda j: f"row {j} of X_eval"):
            products = self._query_products(Xe, Te, partial(timed, self._forces), timed)
        solves = [self.solver_.last_solve]
        parts = self._linear_parts(candidates, 8 * 3 * Xe.shape[0])
        best, worst = TopK(n_top, Xe.shape[0]), TopK(n_top, Xe.shape[0])
        starts = np.cumsum([0] + [len(part) for part in parts])
        for position, block in map_parts(products, parts, self.n_jobs):
            block = self.epsilon_ * block
            best.add(block, starts[position])
            worst.add(-block, starts[position])
        self._record(timed.seconds, solves)
        (up, up_scores), (down, down_scores) = best.result(), worst.result()
        return Bunch(proponents=up.T.numpy(), proponent_scores=up_scores.T.numpy(),
                     opponents=down.T.numpy(), opponent_scores=-down_scores.T.numpy())

    @compute_section
    def most_self_influential(self, n_top: int = 10, X: Any = None, y: Any = None,
                              groups: Any = None) -> Bunch:
        """The training rows (or groups) with the largest self-influence
        (:meth:`score_samples`) — the usual mislabel candidates — streamed in
        chunks of rows (on ``n_jobs`` workers), keeping only the ``n_top`` best.

        Parameters
        ----------
        n_top : int, default=10
            How many to return (fewer when there are fewer candidates).
        X, y : array-like, default=None
            The candidate rows and their targets; ``None``: the training rows.
        groups : array-like of shape (n_candidates,), default=None
            A label per row of ``X``; rows sharing a label are scored together
            (positions then refer to ``numpy.unique(groups)``).

        Returns
        -------
        Bunch
            ``indices``, int array of shape ``(k,)``: positions of the
            candidates, largest self-influence first; ``scores``, their
            :meth:`score_samples` values (``measure="linear"`` whatever
            ``measure``).
        """
        check_is_fitted(self)
        n_top = self._check_n_top(n_top)
        candidates = self._candidates(X, y, groups)
        parts, scores, (solves, timed) = self._self_scores(candidates, 8 * 3)
        top, start = TopK(n_top, 1), 0
        for part, block in zip(parts, scores):
            top.add(self.epsilon_ * block[:, None], start)
            start += len(part)
        self._record(timed.seconds, solves)
        rows, values = top.result()
        return Bunch(indices=rows[:, 0].numpy(), scores=values[:, 0].numpy())
