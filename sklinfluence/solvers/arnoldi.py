"""Arnoldi: the top eigenpairs of the damped curvature, damping on the rest."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..curvature.lowrank import bottom_eigenvalue, top_eigenpairs
from ..curvature.operator import Curvature
from .base import DirectSolver, register_solver

__all__ = ["ArnoldiSolver"]

@register_solver
class ArnoldiSolver(DirectSolver):
    """Top eigenpairs of the damped curvature plus damping on the rest.

    ``(C + λI)⁻¹ ≈ Q diag(1/ν) Qᵀ + (I − QQᵀ) / (μ̄ + λ)``, with ``(ν, Q)``
    the ``rank`` largest eigenpairs of ``C + λI`` (Lanczos, scipy's ``eigsh``:
    the symmetric form of the Arnoldi iteration) and ``μ̄`` the mean weight
    decay: directions outside the top eigenspace are treated as carrying only
    weight decay and damping. Exact when ``rank`` covers every direction with
    curvature beyond that; ``approximate`` below full rank (``rank < P``),
    when ``solve`` reports ``converged=None`` — every solve reports the
    relative residual it measures under the true curvature (:class:`SolveInfo`).
    A non-positive eigenvalue (an indefinite Hessian;
    for ``curvature="hessian"`` the smallest eigenvalue is checked too) raises
    ``ValueError``.

    Parameters
    ----------
    curvature : Curvature
    rank : int, optional
        Eigenpairs kept (``None``: ``min(50, P)``).
    tol : float, default=1e-6
        Relative accuracy of the eigenpairs (``eigsh``'s ``tol``).
    """

    name = "arnoldi"
    params = ("rank",)

    def __init__(self, curvature: Curvature, rank: int | None = None,
                 tol: float = 1e-6) -> None:
        super().__init__(curvature)
        start = time.perf_counter()
        rank = min(50, curvature.n_params) if rank is None else int(rank)
        self.values, self.vectors = top_eigenpairs(curvature, rank, tol=tol)
        lowest = float(self.values[-1])
        if curvature.kind == "hessian" and lowest > 0:  # a Hessian may be indefinite below
            lowest = min(lowest, bottom_eigenvalue(curvature))
        if lowest <= 0:
            raise ValueError(
                f"solver='arnoldi' met a non-positive eigenvalue {lowest:.3e} "
                f"of the damped {curvature.kind} (damping={curvature.damping:g}): it is not "
                "positive definite. Increase damping above "
                f"{curvature.damping - lowest:.3e} or use curvature='ggn'.")
        self.rest = float(curvature.model.weight_decay.to(torch.float64).mean()) + \
            curvature.damping
        if self.rest <= 0:
            raise ValueError(
                "solver='arnoldi' needs damping > 0 (or weight decay) for the directions "
                "outside the top eigenspace; got damping=0 and no weight decay.")
        self.approximate = len(self.values) < curvature.n_params
        self.info = {"solver": "arnoldi", "approximate": self.approximate,
                     "rank": len(self.values),
                     "n_params": curvature.n_params,
                     "top_eigenvalue": float(self.values[0]),
                     "smallest_kept_eigenvalue": float(self.values[-1]),
                     "memory_bytes": 8 * self.vectors.numel(),
                     "eigen_seconds": time.perf_counter() - start}

    @classmethod
    def build(cls, curvature: Curvature, *, tol: float, max_iter: int | None, verbose: int,
              rank: int | None = None) -> "ArnoldiSolver":
        return cls(curvature, rank=rank)

    def _apply(self, B: Tensor) -> Tensor:
        coefficients = B @ self.vectors.T  # (k, r)
        return (B - coefficients @ self.vectors) / self.rest + \
            (coefficients / self.values) @ self.vectors
