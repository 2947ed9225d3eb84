"""Grad-dot: the curvature of the data replaced by 0."""

from __future__ import annotations

import torch
from torch import Tensor

from ..curvature.operator import Curvature
from .base import DirectSolver, register_solver

__all__ = ["IdentitySolver"]

@register_solver
class IdentitySolver(DirectSolver):
    """Grad-dot: the curvature of the data replaced by 0.

    ``(C + λI)⁻¹ ≈ diag(1 / (μ + λ))``, ``μ`` the weight decay of each
    parameter: the ``G → 0`` limit of the damped Gauss–Newton inverse. With
    one weight decay for every parameter (or none) the scores are
    the gradient dot products ``∇Qᵀ ∇L`` divided by ``μ + λ``, so rankings do
    not depend on the damping. Always ``approximate``: each solve reports the
    relative residual it measures under the true curvature — how far the
    baseline is from the influence it stands in for.

    Raises
    ------
    ValueError
        If some parameter has neither damping nor weight decay (``μ + λ = 0``).
    """

    name = "identity"
    approximate = True

    def __init__(self, curvature: Curvature) -> None:
        super().__init__(curvature)
        self.diagonal = curvature.model.damped_diagonal(curvature.damping).to(torch.float64)
        if not bool((self.diagonal > 0).all()):
            raise ValueError(
                "solver='identity' (grad-dot) divides by damping + weight decay: it needs "
                f"damping > 0, got damping={curvature.damping:g} with no weight decay on some "
                "parameters. Any damping > 0 gives the same ranking, e.g. damping=1.0.")
        self.info = {"solver": "identity", "approximate": True,
                     "n_params": curvature.n_params, "memory_bytes": 8 * curvature.n_params}

    def _apply(self, B: Tensor) -> Tensor:
        return B / self.diagonal
