"""The one solver policy: which solver each role uses, and why; building it by name."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..curvature.kernel import kernel_verdict
from ..curvature.operator import Curvature
from ..utils.memory import dense_bytes, dense_fits_memory, format_bytes, memory_limit
from .base import SOLVER_TYPES, Solver, solver_names

__all__ = ["EXACT_MAX_PARAMS", "MIXED_PRECISION_MIN_TOL", "CHORD_TOL", "SOLVER_ROLES",
           "SolverDecision", "SolverPlan", "check_request", "make_solver", "plan_solvers",
           "resolve_solver"]

#: ``"auto"`` uses the exact solver up to this many parameters (8 P² bytes:
#: 200 MB at 5,000), mixed-precision block CG above. Read at call time by
#: :func:`plan_solvers` (private knob: the tests lower it to run the large-net
#: paths on small nets).
EXACT_MAX_PARAMS = 5000
#: ``"auto"`` above the dense size uses mixed-precision CG at this ``tol`` or looser,
#: float64 CG below it (see :func:`plan_solvers`).
MIXED_PRECISION_MIN_TOL = 1e-6
#: Relative residual of the matrix-free chord factor's CG solves (batched PBRF above
#: the dense size). Each chord step needs only to contract the gradient; the outer
#: iteration measures the true gradient and stops at the PBRF's own ``tol``.
CHORD_TOL = 1e-8


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
    """

    solver: str
    params: dict
    curvature: str
    tol: float
    max_iter: int | None
    reason: str

    def describe(self) -> dict:
        """``{"solver", "params", "reason"}``, as ``diagnostics_["solver_policy"]`` shows it."""
        return {"solver": self.solver, "params": dict(self.params), "reason": self.reason}


@dataclass(frozen=True)
class SolverPlan:
    """The solver of each role (:data:`SOLVER_ROLES`) of one fitted net (:func:`plan_solvers`).

    Attributes
    ----------
    influence, exact_influence, pbrf_chord : SolverDecision
        The configured solver, the exact rung's and the batched PBRF's factor.
    chord_is_exact : bool
        Whether the batched PBRF shares the exact rung's factor (the dense
        Cholesky or the kernel form) rather than a CG of its own.
    """

    influence: SolverDecision
    exact_influence: SolverDecision
    pbrf_chord: SolverDecision
    chord_is_exact: bool

    def describe(self) -> dict:
        """Role → :meth:`SolverDecision.describe`: ``diagnostics_["solver_policy"]``."""
        return {role: getattr(self, role).describe() for role in SOLVER_ROLES}


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
                 tol: float = 1e-10, max_iter: int | None = None) -> SolverPlan:
    """Which solver each role uses for ``model`` on ``X``, and why: the one solver policy.

    - ``influence``, the configured solver: the requested one, or for
      ``"auto"`` the exact solver up to :data:`EXACT_MAX_PARAMS` parameters
      where the dense matrix fits in memory; above, the
      kernel form where the data are smaller than the net and it fits
      (:func:`~sklinfluence.curvature.kernel.kernel_applies`: ``N·K ≤ P``, a Gauss–Newton
      matrix, registered layers; the exact answer, on the digits CNN faster
      than CG even at tol 1e-3), in mixed precision at ``tol ≥``
      :data:`MIXED_PRECISION_MIN_TOL` and always for a float32 net, whose
      kernel rows carry float32 rounding anyway (float32 kernel and factor,
      solves refined in float64 to ``tol``: 2.5× faster factorisation, and at
      tol 1e-3 no refinement on the digits CNN); otherwise block CG without a
      preconditioner (an EK-FAC preconditioner doubled the block iterations
      on the benchmark's MLP and on the digits CNN: 21 against 9 to 1e-3), in
      mixed precision for float64 models when ``tol`` is at least
      :data:`MIXED_PRECISION_MIN_TOL` (float32 products, float64 residuals:
      the same answer for less). Tighter, each float32 refinement round
      restarts the Krylov space and plain float64 CG is faster (digits CNN,
      71,754 parameters, 1,200 × 30 matrix: mixed 0.84× plain at tol 1e-5,
      1.65× at 1e-10 with 76 block iterations against 16).
    - ``exact_influence``, rung 4 (the Gauss–Newton matrix): the dense solve
      where ``"auto"`` takes it; above, the kernel form where ``"auto"`` picks
      it (the same inverse), else the dense matrix where it fits in memory
      (:func:`~sklinfluence.utils.memory.dense_fits_memory`), else ``"auto"``'s
      pick, block CG to ``tol`` (the same answer to its residual).
    - ``pbrf_chord``, the factor ``(G + μI + λI)⁻¹`` the batched PBRF solves
      share: the exact rung's where it is the dense Cholesky within
      :data:`EXACT_MAX_PARAMS` or the kernel form; block CG to
      :data:`CHORD_TOL` otherwise.

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

    Returns
    -------
    SolverPlan

    Raises
    ------
    ValueError
        For an unknown solver, or ``solver_params`` it does not accept.
    """
    params = check_request(solver, solver_params)
    P = model.n_params
    limit = memory_limit()
    small, fits = P <= EXACT_MAX_PARAMS, dense_fits_memory(P, limit)
    dense = small and fits
    double = model.dtype == torch.float64
    loose = tol >= MIXED_PRECISION_MIN_TOL
    memory = f"16·P² = {format_bytes(dense_bytes(P))}" + (
        "" if limit is None else f", limit {format_bytes(limit)}")
    size = f"{P:,} parameters {'≤' if small else '>'} EXACT_MAX_PARAMS = {EXACT_MAX_PARAMS:,}"
    size += (" and the dense matrix fits in memory" if fits
             else " and the dense matrix does not fit in memory") + f" ({memory})"
    verdicts: list = []

    def kernel(kind: str) -> tuple[bool, str]:
        """Whether the kernel form applies to ``kind``, and why (computed once)."""
        if kind != "ggn":
            return False, "the kernel form inverts the Gauss–Newton matrix, not the Hessian"
        if not verdicts:
            verdicts.append(kernel_verdict(model, X, damping))
        applies, why = verdicts[0]
        return applies, why if applies else f"the kernel form does not apply: {why}"

    def auto(kind: str) -> SolverDecision:
        """What ``"auto"`` picks for the curvature ``kind``."""
        if dense:
            return SolverDecision("exact", {}, kind, tol, max_iter, f"exact: {size}")
        applies, why = kernel(kind)
        if applies:
            mixed = loose or not double
            precision = (_precision(tol, mixed, "float32 factor refined in float64") if double
                         else "float32 factor refined in float64: a float32 net's kernel "
                         "rows carry float32 rounding anyway")
            return SolverDecision("kernel", {"mixed_precision": mixed}, kind, tol, max_iter,
                                  f"kernel: {size}; {why}; {precision}")
        precision = (_precision(tol, loose, "float32 products refined in float64") if double
                     else f"no mixed precision: a {str(model.dtype).removeprefix('torch.')} "
                     "net's products are in that precision already")
        return SolverDecision("cg", {"mixed_precision": double and loose}, kind, tol, max_iter,
                              f"cg: {size}; {why}; {precision}")

    configured = auto(curvature) if solver == "auto" else SolverDecision(
        solver, params, curvature, tol, max_iter, f"{solver}: requested")
    picked = auto("ggn")
    if dense or picked.solver == "kernel" or not fits:
        exact = picked  # the dense solve, the kernel form (the same inverse), or CG to tol
    else:
        exact = SolverDecision("exact", {}, "ggn", tol, max_iter,
                               f"exact: {size}; {kernel('ggn')[1]}")
    shared = dense or picked.solver == "kernel"
    if shared:
        chord = replace(exact, reason=f"{exact.solver}: the exact rung's factor; "
                        f"{exact.reason.split(': ', 1)[1]}")
    else:
        chord = SolverDecision("cg", {}, "ggn", CHORD_TOL, None,
                               f"cg to CHORD_TOL = {CHORD_TOL:g}, no factor to share: "
                               f"{size}; {kernel('ggn')[1]}")
    return SolverPlan(configured, exact, chord, shared)


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
                          curvature=curvature.kind, tol=tol).influence
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
