"""The exact solver: the dense damped curvature, factorised once in float64."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from ..curvature.operator import Curvature
from .base import DirectSolver, SolveInfo, register_solver

__all__ = ["ExactSolver"]

@register_solver
class ExactSolver(DirectSolver):
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

    name = "exact"
    measures_residual = False

    def __init__(self, curvature: Curvature) -> None:
        super().__init__(curvature)
        start = time.perf_counter()
        A = curvature.dense()
        built = time.perf_counter()
        factor, info = torch.linalg.cholesky_ex(A)
        pivots = factor.diagonal()
        singular = int(info) == 0 and float((pivots.min() / pivots.max()) ** 2) < \
            A.shape[0] * torch.finfo(A.dtype).eps  # condition number beyond 1/(P eps)
        if int(info) != 0 or singular:
            eigenvalues = torch.linalg.eigvalsh(A)
            lowest = float(eigenvalues[0])
            advice = (", or use curvature='ggn', which is positive semi-definite"
                      if curvature.kind == "hessian" else
                      " (a Gauss–Newton matrix is singular when some parameter direction "
                      "leaves every output unchanged, e.g. softmax logits shifted by a "
                      "constant)")
            if lowest < 0:
                what = f"its most negative eigenvalue is {lowest:.3e}"
                fix = f"Increase damping above {curvature.damping - lowest:.3e}"
            else:
                what = (f"it is numerically singular, with eigenvalues from {lowest:.3e} to "
                        f"{float(eigenvalues[-1]):.3e}")
                fix = f"Increase damping to about {1e-9 * float(eigenvalues[-1]):.1e} or more"
            raise ValueError(
                f"the damped {curvature.kind} matrix (damping={curvature.damping:g}) is "
                f"not positive definite: {what}. {fix}{advice}."
            )
        self._factor = factor
        self.info = {
            "solver": "exact",
            "approximate": False,
            "build_seconds": built - start,
            "factor_seconds": time.perf_counter() - built,
            "n_params": curvature.n_params,
            "memory_bytes": 8 * curvature.n_params ** 2,
        }

    def self_products(self, removals: list, forces: Callable) -> Tensor:
        """``gᵀ (C + λI)⁻¹ g = ‖L⁻¹ g‖²`` per removal's force: one triangular solve,
        half of :meth:`solve`'s two. Records ``last_solve``."""
        F = forces(removals).to(torch.float64)
        start = time.perf_counter()
        Y = torch.linalg.solve_triangular(self._factor.T, F, upper=True, left=False)
        self.last_solve = SolveInfo(int(F.shape[0]), 0, None, True,
                                    time.perf_counter() - start)
        return (Y * Y).sum(dim=1)

    def _apply(self, B: Tensor) -> Tensor:
        """``X L Lᵀ = B`` by two triangular solves (faster here than ``cholesky_solve``)."""
        Y = torch.linalg.solve_triangular(self._factor.T, B, upper=True, left=False)
        return torch.linalg.solve_triangular(self._factor, Y, upper=False, left=False)
