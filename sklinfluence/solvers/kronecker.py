"""EK-FAC and K-FAC: Kronecker-factored inverses of the damped Gauss–Newton matrix."""

from __future__ import annotations

from torch import Tensor

from ..curvature.kfac import KroneckerFactors
from ..curvature.operator import Curvature
from .base import DirectSolver, register_solver

__all__ = ["KroneckerSolver", "KFACSolver"]

@register_solver
class KroneckerSolver(DirectSolver):
    """EK-FAC (``corrected=True``) or K-FAC inverse of the damped Gauss–Newton.

    See :mod:`sklinfluence.curvature.kfac`. Only ``curvature="ggn"``: the Kronecker
    factors are built from the Gauss–Newton decomposition. Layers of the types
    in :mod:`sklinfluence.curvature.layers` (Linear, Conv2d, Embedding, BatchNorm,
    LayerNorm, GroupNorm); others raise
    :class:`~sklinfluence.curvature.layers.UnsupportedLayerError` at construction. An
    approximation (exact only where the factorisation is, see
    :mod:`sklinfluence.curvature.kfac`): ``solve`` reports the relative residual it
    measures under the true curvature and ``converged=None``
    (:class:`SolveInfo`).
    """

    name = "ekfac"
    approximate = True
    needs = frozenset({"ggn", "layers"})

    def __init__(self, curvature: Curvature, corrected: bool = True) -> None:
        self.name = self.name_for(corrected)
        super().__init__(curvature)
        self.factors = KroneckerFactors(curvature.model, curvature.X, curvature.T,
                                        damping=curvature.damping, corrected=corrected,
                                        theta=curvature.theta, batch_size=curvature.batch_size)
        self.info = {"solver": self.name, "approximate": True, "n_params": curvature.n_params,
                     "memory_bytes": self.factors.memory_bytes, **self.factors.info}

    @staticmethod
    def name_for(corrected: bool) -> str:
        return "ekfac" if corrected else "kfac"

    def _apply(self, B: Tensor) -> Tensor:
        return self.factors.solve(B)


@register_solver
class KFACSolver(KroneckerSolver):
    """K-FAC: :class:`KroneckerSolver` without the eigenvalue correction
    (``corrected=False``)."""

    name = "kfac"

    def __init__(self, curvature: Curvature) -> None:
        super().__init__(curvature, corrected=False)
