"""The one solver policy: which solver each role uses, and why; building it by name."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .._config import get_config
from ..curvature.kernel import kernel_verdict
from ..curvature.layers import kronecker_layers
from ..curvature.operator import Curvature
from ..exceptions import UnsupportedLayerError
from ..utils._warnings import warn
from ..utils.memory import format_bytes, memory_limit
from .base import SOLVER_TYPES, Solver, solver_names
from .cost import Cost, CostModel, format_seconds, stand_in_targets

__all__ = ["EXACT_MAX_PARAMS", "MIXED_PRECISION_MIN_TOL", "CHORD_TOL", "SOLVER_ROLES",
           "SolverBudgetWarning", "SolverDecision", "SolverPlan", "check_request",
           "make_solver", "plan_solvers", "resolve_solver"]

#: Up to this many parameters ``"auto"`` prefers the dense exact solve (backward
#: stable, no refinement; its ``16 P²`` bytes are 400 MB at 5,000) whenever it is
#: predicted to fit the memory limit and ``time_budget_seconds``, even where the
#: kernel form is predicted faster; above, the cheapest exact option predicted to
#: fit. Read at call time by :func:`plan_solvers` (private knob: the tests lower
#: it to run the large-net paths on small nets).
EXACT_MAX_PARAMS = 5000
#: ``"auto"``'s kernel and CG use mixed precision at this ``tol`` or looser,
#: float64 below it (see :func:`plan_solvers`).
MIXED_PRECISION_MIN_TOL = 1e-6
#: Relative residual of the matrix-free chord factor's CG solves (batched PBRF above
#: the dense size). Each chord step needs only to contract the gradient; the outer
#: iteration measures the true gradient and stops at the PBRF's own ``tol``.
CHORD_TOL = 1e-8


class SolverBudgetWarning(UserWarning):
    """``solver="auto"`` chose an approximation: no exact option is predicted to fit
    ``time_budget_seconds`` and the memory limit (:func:`plan_solvers`)."""


#: The roles a :class:`SolverPlan` decides: the configured solver (the
#: ``influence`` rung), the exact rung (``exact_influence``) and the factor the
#: batched PBRF's chord iteration shares (``pbrf_chord``).
SOLVER_ROLES = ("influence", "exact_influence", "pbrf_chord")


@dataclass(frozen=True)
class SolverDecision:
    """One role's solver: what :func:`make_solver` builds for it, and why.

    Attributes
    ----------
    solver : str
        A registered solver's name (:data:`~.base.SOLVER_TYPES`), never ``"auto"``.
    params : dict
        Its ``solver_params``.
    curvature : str
        ``"ggn"`` or ``"hessian"``.
    tol : float
        Relative residual of its solves (the iterative solvers and the
        mixed-precision kernel).
    max_iter : int or None
        Iteration cap of the iterative solvers (``None``: their default).
    reason : str
        Why this solver, in a line.
    predicted : dict, default={}
        For a decision ``"auto"`` took: option (``"exact"``, ``"kernel"``,
        ``"cg"``) → its predicted ``{"seconds", "bytes", "how"}``
        (:class:`~sklinfluence.solvers.cost.Cost`), each option it weighed.
    """

    solver: str
    params: dict
    curvature: str
    tol: float
    max_iter: int | None
    reason: str
    predicted: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """``{"solver", "params", "reason"}``, and ``"predicted"`` where ``"auto"``
        weighed options: as ``diagnostics_["solver_policy"]`` shows it."""
        shown = {"solver": self.solver, "params": dict(self.params), "reason": self.reason}
        if self.predicted:
            shown["predicted"] = {name: dict(cost) for name, cost in self.predicted.items()}
        return shown


class SolverPlan:
    """The solver of each role (:data:`SOLVER_ROLES`) of one fitted net (:func:`plan_solvers`).

    The configured solver (``influence``) is decided at once; the exact
    rung's and the batched PBRF's factor when first read, where deciding them
    costs a prediction (a requested approximate solver: no cost model runs
    for a net whose exact rung is never used).

    Attributes
    ----------
    influence, exact_influence, pbrf_chord : SolverDecision
        The configured solver, the exact rung's and the batched PBRF's factor.
    chord_is_exact : bool
        Whether the batched PBRF shares the exact rung's factor (the dense
        Cholesky or the kernel form) rather than a CG of its own.
    """

    def __init__(self, influence: SolverDecision, request: dict,
                 exact_roles: tuple | None = None) -> None:
        self.influence = influence
        self._request = request  # plan_solvers' arguments: the exact roles decided from them
        self._decided = exact_roles  # (exact_influence, pbrf_chord, chord_is_exact)

    def _exact(self) -> tuple:
        if self._decided is None:
            whole = plan_solvers(**self._request, decide_exact=True)
            self._decided = (whole.exact_influence, whole.pbrf_chord, whole.chord_is_exact)
        return self._decided

    @property
    def exact_influence(self) -> SolverDecision:
        return self._exact()[0]

    @property
    def pbrf_chord(self) -> SolverDecision:
        return self._exact()[1]

    @property
    def chord_is_exact(self) -> bool:
        return self._exact()[2]

    @property
    def decided(self) -> tuple[str, ...]:
        """The roles decided so far (all of them once an exact role is read)."""
        return SOLVER_ROLES if self._decided is not None else ("influence",)

    def describe(self) -> dict:
        """Role → :meth:`SolverDecision.describe` for the roles decided so far
        (:attr:`decided`): ``diagnostics_["solver_policy"]``."""
        return {role: getattr(self, role).describe() for role in self.decided}


def check_request(name: str, solver_params: dict | None) -> dict:
    """``solver_params`` as a dict, after checking ``name`` (:func:`~.base.solver_names`)
    and that the solver declares each option (its ``params``)."""
    if name not in SOLVER_TYPES and name != "auto":
        raise ValueError(f"solver must be one of {solver_names()}, got {name!r}")
    params = dict(solver_params or {})
    accepted = SOLVER_TYPES[name].params if name != "auto" else ()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"solver_params {unknown} are not options of solver={name!r}; it accepts "
            f"{list(accepted) or 'none'}.")
    return params


def plan_solvers(model: Any, X: Tensor, *, damping: float, curvature: str = "ggn",
                 solver: str = "auto", solver_params: dict | None = None,
                 tol: float = 1e-10, max_iter: int | None = None,
                 targets: Tensor | None = None, n_rhs: int | None = None,
                 decide_exact: bool | None = None) -> SolverPlan:
    """Which solver each role uses for ``model`` on ``X``, and why: the one solver policy.

    ``"auto"`` weighs the exact options by their predicted time and memory
    (:mod:`sklinfluence.solvers.cost`: flops and curvature products at rates
    measured on this machine and this net) against ``time_budget_seconds`` and
    the memory limit (:func:`sklinfluence.set_config`):

    - the dense exact solve where it is predicted to fit both and the net has
      at most :data:`EXACT_MAX_PARAMS` parameters;
    - otherwise the cheapest predicted of the dense solve, the kernel form
      (where :func:`~sklinfluence.curvature.kernel.kernel_verdict` applies it:
      ``N·K ≤ P`` and a Gauss–Newton matrix, on any net) and block CG
      among those predicted to fit both;
    - where none fits, an approximation — EK-FAC for a Gauss–Newton matrix
      whose layers it factors, Arnoldi otherwise — with a
      :class:`SolverBudgetWarning` naming the cheapest exact option and its
      predicted cost: ``"auto"`` never starts an exact computation predicted
      to exceed the budget.

    The kernel is in mixed precision at ``tol ≥`` :data:`MIXED_PRECISION_MIN_TOL`
    and always for a float32 net, whose kernel rows carry float32 rounding
    anyway (float32 kernel and factor, solves refined in float64 to ``tol``:
    2.5× faster factorisation); CG has no preconditioner (an EK-FAC
    preconditioner doubled the block iterations on the benchmark's MLP and on
    the digits CNN: 21 against 9 to 1e-3) and float32 products refined in
    float64 for float64 models at ``tol ≥`` :data:`MIXED_PRECISION_MIN_TOL`
    (tighter, each refinement round restarts the Krylov space and plain
    float64 CG is faster: digits CNN, 71,754 parameters, 1,200 × 30 matrix,
    mixed 0.84× plain at tol 1e-5, 1.65× at 1e-10).

    The roles:

    - ``influence``, the configured solver: the requested one, or ``"auto"``'s
      pick for ``curvature``;
    - ``exact_influence``, rung 4 (the Gauss–Newton matrix): ``"auto"``'s pick
      where it is the dense solve or the kernel form; otherwise the dense
      matrix where it is predicted to fit the memory limit and the budget; else
      the cheapest exact option predicted to fit in memory (there is no
      approximation of an exact rung), its predicted time in the reason;
    - ``pbrf_chord``, the factor ``(G + μI + λI)⁻¹`` the batched PBRF solves
      share: the exact rung's where ``"auto"`` picks a factorisation (the dense
      Cholesky or the kernel form); block CG to :data:`CHORD_TOL` otherwise.

    Parameters
    ----------
    model : FunctionalModel
        The trained net.
    X : Tensor
        The training inputs.
    damping : float
        ``λ``.
    curvature : {"ggn", "hessian"}, default="ggn"
        The configured solver's curvature (the other roles' is ``"ggn"``).
    solver : str, default="auto"
        The requested solver: ``"auto"`` or a registered name.
    solver_params : dict, optional
        Its options (the solver's ``params``; none for ``"auto"``).
    tol, max_iter : float, int or None
        The configured stopping rule (:func:`make_solver`).
    targets : Tensor, optional
        The training targets, for timing the products (``None``: the net's own
        predictions, :func:`~sklinfluence.solvers.cost.stand_in_targets`).
    n_rhs : int, optional
        Right-hand sides a solve will have (``None``:
        ``min(N, DEFAULT_RHS_BLOCK)``, :mod:`~sklinfluence.solvers.cost`).
    decide_exact : bool, optional
        Whether to decide the exact roles now. ``None``: where that predicts
        nothing more (``"auto"``, or the exact Gauss–Newton solvers),
        otherwise when the plan's exact roles are first read.

    Returns
    -------
    SolverPlan
        With a requested solver other than the exact Gauss–Newton ones, the
        exact roles are decided (their costs predicted) when first read.

    Raises
    ------
    ValueError
        For an unknown solver, or ``solver_params`` it does not accept.

    Warns
    -----
    SolverBudgetWarning
        Where ``solver="auto"`` chose an approximation.
    """
    params = check_request(solver, solver_params)
    P = model.n_params
    limit = memory_limit()
    budget = float(get_config()["time_budget_seconds"])
    double = model.dtype == torch.float64
    loose = tol >= MIXED_PRECISION_MIN_TOL
    T = stand_in_targets(model, X) if targets is None else targets
    small = P <= EXACT_MAX_PARAMS
    size = f"{P:,} parameters {'≤' if small else '>'} EXACT_MAX_PARAMS = {EXACT_MAX_PARAMS:,}"
    within = (f"time_budget_seconds = {budget:g}" + (
        "" if limit is None else f" and the memory limit of {format_bytes(limit)}"))
    verdicts: list = []
    predictions: dict = {}

    def kernel(kind: str) -> tuple[bool, str]:
        """Whether the kernel form applies to ``kind``, and why (computed once)."""
        if kind != "ggn":
            return False, "the kernel form inverts the Gauss–Newton matrix, not the Hessian"
        if not verdicts:
            verdicts.append(kernel_verdict(model, X, damping))
        applies, why = verdicts[0]
        return applies, why if applies else f"the kernel form does not apply: {why}"

    def options(kind: str) -> dict[str, Cost]:
        """The exact options for ``kind`` and their predicted costs (computed once)."""
        if kind not in predictions:
            costs = CostModel(Curvature(model, X, T, kind=kind, damping=damping),
                              n_rhs=n_rhs, tol=tol, max_iter=max_iter)
            found = {"exact": costs.exact()}
            if kernel(kind)[0]:
                found["kernel"] = costs.kernel()
            found["cg"] = costs.cg()
            predictions[kind] = found
        return predictions[kind]

    def fits(cost: Cost) -> bool:
        """Whether a factorisation fits the memory limit (CG holds what the caller's
        right-hand sides already take, a few times over: not checked)."""
        return cost.solver == "cg" or limit is None or cost.bytes <= limit

    def summary(kind: str) -> str:
        return "predicted " + "; ".join(
            f"{name} {format_seconds(c.seconds)}, {format_bytes(c.bytes)}"
            + ("" if fits(c) else " (does not fit in memory)")
            for name, c in options(kind).items())

    def decide(name: str, kind: str, why: str) -> SolverDecision:
        """``name`` with its parameters, the reason ``why`` and the predictions."""
        predicted = {n: c.describe() for n, c in options(kind).items()}
        if name == "kernel":
            mixed = loose or not double
            precision = (_precision(tol, mixed, "float32 factor refined in float64") if double
                         else "float32 factor refined in float64: a float32 net's kernel "
                         "rows carry float32 rounding anyway")
            return SolverDecision("kernel", {"mixed_precision": mixed}, kind, tol, max_iter,
                                  f"kernel: {why}; {kernel(kind)[1]}; {precision}; "
                                  f"{summary(kind)}", predicted)
        if name == "cg":
            precision = (_precision(tol, loose, "float32 products refined in float64") if double
                         else f"no mixed precision: a {str(model.dtype).removeprefix('torch.')} "
                         "net's products are in that precision already")
            return SolverDecision("cg", {"mixed_precision": double and loose}, kind, tol,
                                  max_iter, f"cg: {why}; {kernel(kind)[1]}; {precision}; "
                                  f"{summary(kind)}", predicted)
        return SolverDecision(name, {}, kind, tol, max_iter,
                              f"{name}: {why}; {summary(kind)}", predicted)

    def auto(kind: str) -> tuple[SolverDecision, str | None]:
        """What ``"auto"`` picks for ``kind``, and the warning an approximation needs."""
        costs = options(kind)
        fitting = [c for c in costs.values() if fits(c) and c.seconds <= budget]
        dense = costs["exact"]
        if small and dense in fitting:
            return decide("exact", kind, f"{size} and the dense solve is predicted to fit "
                          f"{within}"), None
        if fitting:
            best = min(fitting, key=lambda c: c.seconds)
            return decide(best.solver, kind, f"{size}; the cheapest exact option predicted to "
                          f"fit {within}"), None
        return approximation(kind, costs)

    def approximation(kind: str, costs: dict) -> tuple[SolverDecision, str]:
        """EK-FAC where it applies, else Arnoldi; and the warning naming the exact way."""
        try:
            kronecker_layers(model)
            name = "ekfac" if kind == "ggn" else "arnoldi"
        except UnsupportedLayerError:
            name = "arnoldi"
        in_memory = sorted((c for c in costs.values() if fits(c)), key=lambda c: c.seconds)
        best = in_memory[0]  # CG at least
        over = ", ".join(f"{format_seconds(c.seconds)} ({c.solver})" for c in in_memory)
        why = (f"the exact options are predicted to take ≥ {over}, above "
               f"time_budget_seconds={budget:g}")
        advice = (f"pass solver={best.solver!r} to run it anyway or raise the budget "
                  "(sklinfluence.set_config(time_budget_seconds=...))")
        decision = SolverDecision(name, {}, kind, tol, max_iter,
                                  f"{name} (approximate): {why}; {summary(kind)}",
                                  {n: c.describe() for n, c in costs.items()})
        return decision, (f"solver='auto' chose {name!r} (approximate): {why}; {advice}.")

    if solver == "auto":
        configured, warning = auto(curvature)
        if warning is not None:
            warn(warning, SolverBudgetWarning)
    else:
        configured = SolverDecision(solver, params, curvature, tol, max_iter,
                                    f"{solver}: requested")

    def exact_roles() -> tuple[SolverDecision, SolverDecision, bool]:
        """The exact rung's solver, the batched PBRF's factor, and whether they share it."""
        if curvature == "ggn" and solver in ("auto", "exact", "kernel"):
            picked = configured  # an exact Gauss–Newton inverse already: nothing to predict
        else:
            picked = auto("ggn")[0]
        shared = picked.solver in ("exact", "kernel")
        if shared:
            exact = picked  # the dense solve or the kernel form (the same inverse)
        else:
            costs = options("ggn")
            dense = costs["exact"]
            in_memory = [c for c in costs.values() if fits(c)]  # CG at least
            if fits(dense) and dense.seconds <= budget:
                exact = decide("exact", "ggn", f"the dense matrix is predicted to fit {within}")
            else:
                best = min(in_memory, key=lambda c: c.seconds)
                exact = decide(best.solver, "ggn", "no exact option is predicted to fit "
                               f"{within}; the cheapest predicted to fit in memory (an exact "
                               "rung has no approximation)")
        if shared:
            chord = replace(exact, reason=f"{exact.solver}: the exact rung's factor; "
                            f"{exact.reason.split(': ', 1)[1]}")
        else:
            chord = SolverDecision("cg", {}, "ggn", CHORD_TOL, None,
                                   f"cg to CHORD_TOL = {CHORD_TOL:g}, no factor to share: "
                                   f"{picked.reason}")
        return exact, chord, shared

    if decide_exact is None:
        decide_exact = solver == "auto" or (curvature == "ggn" and solver in ("exact", "kernel"))
    request = {"model": model, "X": X, "damping": damping, "curvature": curvature,
               "solver": solver, "solver_params": solver_params, "tol": tol,
               "max_iter": max_iter, "targets": T, "n_rhs": n_rhs}
    return SolverPlan(configured, request, exact_roles() if decide_exact else None)


def _precision(tol: float, mixed: bool, how: str) -> str:
    """Why mixed precision is (or is not) used at ``tol`` (a float64 net)."""
    if mixed:
        return f"{how}: tol = {tol:g} ≥ MIXED_PRECISION_MIN_TOL = {MIXED_PRECISION_MIN_TOL:g}"
    return f"float64: tol = {tol:g} < MIXED_PRECISION_MIN_TOL = {MIXED_PRECISION_MIN_TOL:g}"


def resolve_solver(name: str, curvature: Curvature, tol: float = 1e-10) -> tuple[str, dict]:
    """What ``"auto"`` means for this curvature and ``tol``: ``(solver, solver_params)``.

    The configured solver of :func:`plan_solvers` (its ``influence`` role),
    which says why. Any other name is returned unchanged.
    """
    if name != "auto":
        return name, {}
    picked = plan_solvers(curvature.model, curvature.X, damping=curvature.damping,
                          curvature=curvature.kind, tol=tol, targets=curvature.T).influence
    return picked.solver, dict(picked.params)


def make_solver(name: str, curvature: Curvature, *, tol: float = 1e-10,
                max_iter: int | None = None, solver_params: dict | None = None,
                verbose: int = 0) -> Solver:
    """Build the solver called ``name``: ``"auto"`` (:func:`plan_solvers` decides)
    or a registered one (:data:`~sklinfluence.solvers.base.SOLVER_TYPES`).

    Parameters
    ----------
    name : str
        ``"auto"``, ``"exact"``, ``"kernel"``, ``"cg"``, ``"lissa"``, ``"ekfac"``,
        ``"kfac"``, ``"arnoldi"``, ``"identity"`` or a solver registered with
        :func:`~sklinfluence.solvers.register_solver`.
    curvature : Curvature
        The damped operator.
    tol, max_iter : float, int
        Stopping rule of the iterative solvers (CG, LiSSA) and the
        mixed-precision kernel's refinement.
    solver_params : dict, optional
        Options the solver declares in its ``params``: ``preconditioner``
        (``"ekfac"``, ``"kfac"``, ``"arnoldi"`` or None), ``rank``,
        ``block_size`` and ``mixed_precision`` for CG; ``mixed_precision``
        for the kernel; ``scale`` for LiSSA; ``rank`` for Arnoldi.
    verbose : int, default=0
        Progress bars of the solvers that have them (CG, the kernel).

    Raises
    ------
    ValueError
        For an unknown name or an option the solver does not declare.
    """
    params = check_request(name, solver_params)
    if name == "auto":
        name, params = resolve_solver(name, curvature, tol)
    solver = SOLVER_TYPES[name].build(curvature, tol=tol, max_iter=max_iter, verbose=verbose,
                                      **params)
    # what the estimators' diagnostics read, for a solver whose info leaves it out
    solver.info.setdefault("solver", name)
    solver.info.setdefault("approximate", solver.approximate)
    solver.info.setdefault("n_params", curvature.n_params)
    return solver
