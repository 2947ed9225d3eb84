"""Solvers for damped curvature systems ``(C + λI) X = B``.

Every solver has the same interface: it is built from a
:class:`~sklinfluence.curvature.Curvature` and solves for many right-hand
sides at once with ``solve(B)`` (``B`` of shape ``(k, P)``, one right-hand side
per row).  What it did is recorded in ``info`` (set-up) and ``last_solve``
(the latest call).

- :class:`ExactSolver` builds the dense matrix in float64 and factorises it
  once (Cholesky; for an indefinite Hessian it raises with the most negative
  eigenvalue).
- :class:`CGSolver` runs conjugate gradients on all right-hand sides together
  (one batched curvature product per iteration, each column with its own step
  sizes), stopping each column at its own relative residual ``tol``.  scipy's
  ``cg`` handles one right-hand side at a time, which would mean a Python loop
  over thousands of columns and a torch/numpy round trip per product.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from .curvature import Curvature

__all__ = ["ExactSolver", "CGSolver", "SOLVERS", "SolveInfo", "make_solver"]

SOLVERS = ("exact", "cg")


@dataclass
class SolveInfo:
    """What one call to ``solve`` did.

    Attributes
    ----------
    n_rhs : int
        Number of right-hand sides.
    n_iter : int
        Iterations (0 for a direct solve).
    max_relative_residual : float or None
        Largest ``‖b − A x‖ / ‖b‖`` over the right-hand sides, recomputed
        from the returned solution (``None`` for a direct solve, which is
        backward stable and would pay a full curvature product to check).
    converged : bool
        Whether every right-hand side met ``tol``.
    seconds : float
        Wall time of the call.
    """

    n_rhs: int
    n_iter: int
    max_relative_residual: float | None
    converged: bool
    seconds: float


@dataclass
class _SolverBase:
    curvature: Curvature
    info: dict = field(default_factory=dict)
    last_solve: SolveInfo | None = None

    def _relative_residual(self, X: Tensor, B: Tensor) -> Tensor:
        R = B - self.curvature.matmat(X.to(B.dtype))
        return R.norm(dim=1) / B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)


class ExactSolver(_SolverBase):
    """Direct solve with the dense damped curvature, factorised in float64.

    Parameters
    ----------
    curvature : Curvature
        The damped operator; its dense matrix is built once, here.

    Raises
    ------
    ValueError
        If the damped matrix is not positive definite (a Hessian with negative
        eigenvalues and too little damping); the message names the most
        negative eigenvalue and the damping that would fix it.
    """

    def __init__(self, curvature: Curvature) -> None:
        super().__init__(curvature)
        start = time.perf_counter()
        A = curvature.dense()
        built = time.perf_counter()
        factor, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            eigenvalues = torch.linalg.eigvalsh(A)
            lowest = float(eigenvalues[0])
            advice = (", or use curvature='ggn', which is positive semi-definite"
                      if curvature.kind == "hessian" else
                      " (a Gauss–Newton matrix is singular when some parameter direction "
                      "leaves every output unchanged, e.g. softmax logits shifted by a "
                      "constant)")
            raise ValueError(
                f"the damped {curvature.kind} matrix (damping={curvature.damping:g}) is "
                f"not positive definite: its most negative eigenvalue is {lowest:.3e}. "
                f"Increase damping above {curvature.damping - lowest:.3e}{advice}."
            )
        self._factor = factor
        self.info = {
            "solver": "exact",
            "build_seconds": built - start,
            "factor_seconds": time.perf_counter() - built,
            "n_params": curvature.n_params,
        }

    def solve(self, B: Tensor) -> Tensor:
        """Solve ``(C + λI) xᵀ = bᵀ`` for each row of ``B``; float64 result."""
        start = time.perf_counter()
        X = torch.cholesky_solve(B.to(torch.float64).T, self._factor).T
        self.last_solve = SolveInfo(int(B.shape[0]), 0, None, True,
                                    time.perf_counter() - start)
        return X


class CGSolver(_SolverBase):
    """Conjugate gradients on many right-hand sides at once.

    Parameters
    ----------
    curvature : Curvature
        Must be positive definite (GGN, or a damped Hessian at a minimum).
    tol : float, default=1e-10
        Relative residual ``‖b − A x‖ / ‖b‖`` at which a column stops.
    max_iter : int, optional
        Iteration cap; default ``10 P`` (as scipy's ``cg``: exact arithmetic
        would terminate after ``P`` iterations, rounding needs more).

    Notes
    -----
    When some column stops at ``max_iter`` above ``tol`` a
    :class:`~sklearn.exceptions.ConvergenceWarning` reports the residual.
    A non-positive curvature ``pᵀAp ≤ 0`` met on the way means the operator is
    indefinite: that raises ``ValueError`` instead of returning garbage.
    """

    def __init__(self, curvature: Curvature, tol: float = 1e-10,
                 max_iter: int | None = None) -> None:
        super().__init__(curvature)
        self.tol = float(tol)
        self.max_iter = int(max_iter) if max_iter is not None else 10 * curvature.n_params
        self.info = {"solver": "cg", "tol": self.tol, "max_iter": self.max_iter,
                     "n_params": curvature.n_params}

    def solve(self, B: Tensor) -> Tensor:
        """Solve ``(C + λI) xᵀ = bᵀ`` for each row of ``B`` by batched CG."""
        start = time.perf_counter()
        X = torch.zeros_like(B)
        R = B.clone()
        Pdir = R.clone()
        rr = (R * R).sum(dim=1)
        target = (self.tol * B.norm(dim=1)) ** 2
        active = torch.nonzero(rr > target).flatten()
        n_iter = 0
        while active.numel() and n_iter < self.max_iter:
            n_iter += 1
            p = Pdir[active]
            Ap = self.curvature.matmat(p)
            pAp = (p * Ap).sum(dim=1)
            if bool((pAp <= 0).any()):
                raise ValueError(
                    f"CG met non-positive curvature pᵀAp = {float(pAp.min()):.3e}: the "
                    f"damped {self.curvature.kind} (damping={self.curvature.damping:g}) "
                    "is not positive definite. Increase damping or use curvature='ggn'."
                )
            alpha = rr[active] / pAp
            X[active] += alpha[:, None] * p
            R[active] -= alpha[:, None] * Ap
            rr_new = (R[active] * R[active]).sum(dim=1)
            beta = rr_new / rr[active]
            rr[active] = rr_new
            Pdir[active] = R[active] + beta[:, None] * p
            active = active[rr_new > target[active]]
        residual = self._relative_residual(X, B) if B.shape[0] else B.new_zeros(1)
        worst = float(residual.max())
        self.last_solve = SolveInfo(int(B.shape[0]), n_iter, worst,
                                    bool(active.numel() == 0), time.perf_counter() - start)
        if active.numel():
            warnings.warn(
                f"CG stopped at max_iter={self.max_iter} with {active.numel()} of "
                f"{B.shape[0]} right-hand sides above tol={self.tol:g}; largest relative "
                f"residual {worst:.3e}. Increase max_iter or damping.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return X


def make_solver(name: str, curvature: Curvature, *, tol: float = 1e-10,
                max_iter: int | None = None) -> ExactSolver | CGSolver:
    """Build the solver called ``name`` (one of :data:`SOLVERS`)."""
    if name == "exact":
        return ExactSolver(curvature)
    if name == "cg":
        return CGSolver(curvature, tol=tol, max_iter=max_iter)
    raise ValueError(f"solver must be one of {SOLVERS}, got {name!r}")
