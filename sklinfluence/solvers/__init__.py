"""Solvers for damped curvature systems ``(C + λI) X = B``.

Every solver has the same interface: it is built from a
:class:`~sklinfluence.curvature.operator.Curvature` and solves for many right-hand
sides at once with ``solve(B)`` (``B`` of shape ``(k, P)``, one right-hand side
per row).  What it did is recorded in ``info`` (set-up) and ``last_solve``
(the latest call, a :class:`SolveInfo`): the approximations (EK-FAC, K-FAC,
Arnoldi below full rank) say so and report the residual they measure under
the true curvature on a few right-hand sides.

- :class:`ExactSolver` builds the dense matrix in float64 and factorises it
  once (Cholesky; for an indefinite Hessian it raises with the most negative
  eigenvalue).
- :class:`KernelSolver` is the same exact inverse of the Gauss–Newton
  matrix in kernel (Woodbury) form, an ``n × n`` Cholesky factorisation for
  ``n = N·K'`` kernel rows (:mod:`sklinfluence.curvature.kernel`): where the data are
  smaller than the net; in mixed precision a float32 factor whose solves are
  refined in float64 to ``tol``.
- :class:`CGSolver` runs (preconditioned) conjugate gradients on all
  right-hand sides together — one batched curvature product per iteration,
  each column with its own step sizes, stopping each column at its own
  relative residual ``tol``.  scipy's ``cg`` handles one right-hand side at a
  time, which would mean a Python loop over thousands of columns and a
  torch/numpy round trip per product.
- :class:`LissaSolver`: the truncated Neumann series of Agarwal et al. (2017),
  full batch, with its scale from a Lanczos estimate of the top eigenvalue.
- :class:`KroneckerSolver` (EK-FAC) and :class:`KFACSolver` (K-FAC)
  (:mod:`sklinfluence.curvature.kfac`).
- :class:`ArnoldiSolver`: top eigenpairs plus damping
  (:mod:`sklinfluence.curvature.lowrank`).
- :class:`IdentitySolver`: the curvature of the data replaced by 0, leaving
  weight decay and damping — grad-dot, the baseline every
  curvature-aware solver should beat.

Each solver is one module of this package, registered by name
(:func:`register_solver`, :mod:`sklinfluence.solvers.base`); :func:`make_solver`
builds one by name; ``"auto"`` is the exact option (dense, kernel form, block
CG) predicted cheapest among those predicted to fit ``time_budget_seconds`` and
the memory limit (:mod:`sklinfluence.solvers.cost`), the dense one whenever it
fits up to ``EXACT_MAX_PARAMS``, and an approximation with a
:class:`SolverBudgetWarning` where none fits. :func:`plan_solvers` is the one
place that decides this — for the configured solver, for the exact rung of the
ladder and for the factor the batched PBRF shares — each decision with its
reason (:class:`SolverPlan`); :func:`resolve_solver` reads what ``"auto"`` means
off it.

Memory, for ``k`` right-hand sides of ``P`` parameters in float64 (8 bytes):
exact ``8 P²`` held, ``16 P²`` while factorising (+ one chunk of Jacobians while
building, except for nets of ``nn.Linear`` layers, whose build stays within
``10 P²``); CG ``5 · 8 k P``
(solution, residual, direction, product, preconditioned residual) plus one
batched product's activations; LiSSA ``3 · 8 k P``; EK-FAC
``8 Σ_l (d_out² + d_in² + d_out d_in)``; Arnoldi ``8 r P`` for rank ``r``;
identity ``8 P``.
"""

# registration order is the order of solver_names(): import the solvers in it
from .base import (NEEDS, RESIDUAL_CHECKS, SOLVER_NAMES, SOLVER_TYPES, DirectSolver,  # noqa: I001
                   SolveInfo, Solver, default_tol, measured_rows, register_solver,
                   solver_names, unregister_solver)
from .exact import ExactSolver
from .kernel import KernelSolver
from .cg import CG_MAX_REFINEMENTS, PRECONDITIONERS, CGSolver
from .lissa import LissaSolver
from .kronecker import KFACSolver, KroneckerSolver
from .arnoldi import ArnoldiSolver
from .identity import IdentitySolver
from .policy import (CHORD_TOL, EXACT_MAX_PARAMS, MIXED_PRECISION_MIN_TOL, SOLVER_ROLES,
                     SolverBudgetWarning,
                     SolverDecision, SolverPlan, check_request, make_solver, plan_solvers,
                     resolve_solver)

__all__ = ["Solver", "DirectSolver", "SolveInfo", "register_solver", "unregister_solver",
           "solver_names", "SOLVER_TYPES", "SOLVER_NAMES", "NEEDS",
           "ExactSolver", "KernelSolver", "CGSolver", "LissaSolver", "KroneckerSolver",
           "KFACSolver", "ArnoldiSolver", "IdentitySolver",
           "EXACT_MAX_PARAMS", "MIXED_PRECISION_MIN_TOL", "RESIDUAL_CHECKS",
           "CG_MAX_REFINEMENTS", "CHORD_TOL", "PRECONDITIONERS", "SOLVER_ROLES",
           "SolverBudgetWarning", "SolverDecision", "SolverPlan", "check_request", "default_tol",
           "make_solver",
           "measured_rows", "plan_solvers", "resolve_solver"]
