"""EK-FAC and K-FAC: Kronecker-factored inverses of the damped Gauss–Newton matrix."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from ..curvature.kfac import KroneckerFactors
from ..curvature.layer_gradients import gradient_products, rotated_forms
from ..curvature.operator import Curvature
from ..model.removal import single_rows, stacked_rows
from ..utils.memory import holding
from .base import DirectSolver, SolveInfo, measured_rows, register_solver

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

    The training side of self-influence and of influence matrices is the fast
    tier (:mod:`sklinfluence.curvature.layer_gradients`): the removed rows'
    gradients come from the layers' captures, chunk by chunk within
    ``working_memory_bytes``; self-influence is the quadratic form read off
    the Kronecker eigenbases (no solve per row), and the products with the
    preconditioned queries are taken layer by layer in the net's precision.
    """

    name = "ekfac"
    approximate = True
    needs = frozenset({"ggn", "layers"})
    streams_rows = True

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

    def self_products(self, removals: list, forces: Callable) -> Tensor:
        """``g_sᵀ (G + μ + λI)⁻¹ g_s`` per removal from the rotated layer gradients
        (:func:`~sklinfluence.curvature.layer_gradients.rotated_forms`): what
        :meth:`solve` followed by the products gives, without a solve. The
        residual is measured as :meth:`solve` does, on the forces of
        :func:`measured_rows` of the removals. Records ``last_solve``."""
        start = time.perf_counter()
        c, f = self.curvature, self.factors
        if not removals:
            self.last_solve = SolveInfo(0, 0, None, None, 0.0, True, 0)
            return torch.zeros(0, dtype=torch.float64)
        X, T, owner = stacked_rows(removals, f.theta)
        single = single_rows(removals)
        forms = rotated_forms(c.model, f.theta, f.layers, f.bases, f.damping, X, T,
                              None if single else owner, len(removals), c.batch_size)
        residual, n_measured = None, 0
        if self.checks_residual:
            picked = [removals[int(i)] for i in measured_rows(len(removals))]
            residual, n_measured = self.measured_residual(forces(picked))
        self.last_solve = SolveInfo(len(removals), 0, residual, None,
                                    time.perf_counter() - start, True, n_measured)
        return forms

    def query_products(self, B: Tensor | None, X: Tensor, T: Tensor,
                       forces: Callable) -> Callable[[list], Tensor]:
        """Solve for the queries once; the products with removals contract
        their rows' layer captures with the solutions, layer by layer in the
        net's precision (:func:`~sklinfluence.curvature.layer_gradients.gradient_products`),
        added in float64. ``B`` None: the queries' gradients are read off
        their own captures, each layer's solved as it comes
        (:meth:`~sklinfluence.curvature.kfac.KroneckerFactors.solve_rows`), so
        that only the solutions are held. Records ``last_solve`` (the solve
        for the queries)."""
        c, f = self.curvature, self.factors
        k = X.shape[0]
        start_time = time.perf_counter()
        vectors = [torch.empty((k, layer.d_out, layer.n_cols), dtype=c.model.dtype,
                               device=f.theta.device) for layer in f.layers]
        held = sum(V.numel() * V.element_size() for V in vectors)
        with holding(held):  # the solutions count against working_memory_bytes
            solved = f.solve_layers(B, c.model.dtype) if B is not None else \
                f.solve_rows(X, T, c.model.dtype, c.batch_size)
            for start, stop, parts in solved:  # never all in float64
                for V, part in zip(vectors, parts):
                    V[start:stop] = part
        if B is None and self.checks_residual and k:  # the measured rows' gradients only
            rows = measured_rows(k)
            B = c.model.per_sample_grads(f.theta, X[rows], T[rows])
        residual, n_measured = (None, 0) if B is None else self.measured_residual(B)
        self.last_solve = SolveInfo(k, 0, residual, None, time.perf_counter() - start_time,
                                    True, n_measured)

        def products(removals: list) -> Tensor:
            if not removals:
                return torch.zeros((0, k), dtype=torch.float64, device=f.theta.device)
            rows_X, rows_T, owner = stacked_rows(removals, f.theta)
            with holding(held):
                P = gradient_products(c.model, f.theta, f.layers, rows_X, rows_T, vectors,
                                      c.batch_size)
            if single_rows(removals):
                return P
            return P.new_zeros((len(removals), P.shape[1])).index_add_(0, owner, P)
        return products


@register_solver
class KFACSolver(KroneckerSolver):
    """K-FAC: :class:`KroneckerSolver` without the eigenvalue correction
    (``corrected=False``)."""

    name = "kfac"

    def __init__(self, curvature: Curvature) -> None:
        super().__init__(curvature, corrected=False)
