"""LiSSA: the truncated Neumann series for the damped inverse."""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..curvature.lowrank import top_eigenvalue
from ..curvature.operator import Curvature
from ..exceptions import LissaDivergenceError
from .base import Solver, SolveInfo, register_solver

__all__ = ["LissaSolver"]

@register_solver
class LissaSolver(Solver):
    """LiSSA: the truncated Neumann series for ``(C + λI)⁻¹``, full batch.

    ``h_0 = b``, ``h_t = b + (I − A/σ) h_{t−1}``, estimate ``x_t = h_t / σ``
    (Agarwal, Bullins & Hazan 2017; Koh & Liang 2017). The series converges iff
    ``σ > λ_max(A)/2``; each column stops when its relative residual
    ``‖b − A x_t‖/‖b‖ = ‖h_{t+1} − h_t‖/‖b‖`` (free: it is the update) reaches
    ``tol``. Every curvature product uses the full training set, so the
    result is deterministic and its error has the closed form
    ``x_T = A⁻¹[I − (I − A/σ)^{T+1}] b``.

    Parameters
    ----------
    curvature : Curvature
    tol : float, default=1e-10
    max_iter : int, default=1000
        Depth ``T`` of the series.
    scale : float, optional
        ``σ``. ``None`` takes 1.05 × the largest eigenvalue of ``A``, from a
        Lanczos estimate (scipy's ``eigsh``: the Krylov cousin of power
        iteration, more accurate for the same number of products).

    Raises
    ------
    LissaDivergenceError
        When the residual grows (``σ ≤ λ_max/2``, or an indefinite
        curvature): the message names the growth and a scale that converges.
        NaN is never returned.
    """

    name = "lissa"
    params = ("scale",)

    def __init__(self, curvature: Curvature, tol: float = 1e-10,
                 max_iter: int | None = None, scale: float | None = None) -> None:
        super().__init__(curvature)
        self.tol = float(tol)
        self.max_iter = 1000 if max_iter is None else int(max_iter)
        start = time.perf_counter()
        self.info = {"solver": "lissa", "approximate": False, "tol": self.tol,
                     "max_iter": self.max_iter,
                     "n_params": curvature.n_params}
        if scale is None:
            top = top_eigenvalue(curvature)
            self.info["top_eigenvalue"] = top
            scale = 1.05 * top
        elif not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"LiSSA's scale must be a positive number, got {scale!r}.")
        self.scale = float(scale)
        self.info.update({"scale": self.scale, "scale_seconds": time.perf_counter() - start})

    @classmethod
    def build(cls, curvature: Curvature, *, tol: float, max_iter: int | None, verbose: int,
              scale: float | None = None) -> "LissaSolver":
        return cls(curvature, tol=tol, max_iter=max_iter, scale=scale)

    def solve(self, B: Tensor) -> Tensor:
        """Approximate ``(C + λI)⁻¹ bᵀ`` for each row of ``B``."""
        start = time.perf_counter()
        sigma = self.scale
        H = B.clone()
        norms = B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)
        active = torch.nonzero(B.norm(dim=1) > 0).flatten()
        first = last = None
        n_iter = 0
        while active.numel() and n_iter < self.max_iter:
            h = H[active]
            R = B[active] - self.curvature.matmat(h) / sigma  # residual of x = h/σ
            relative = R.norm(dim=1) / norms[active]
            worst = float(relative.max()) if torch.isfinite(relative).all() else math.inf
            if first is None:
                first = worst
            if not worst <= 10 * first:
                self._diverged(n_iter, worst / first, last, worst)
            keep = relative > self.tol
            H[active] = h + R * keep[:, None]
            active, last = active[keep], worst
            n_iter += 1
        X = H / sigma
        residual = self._relative_residual(X, B) if B.shape[0] else B.new_zeros(1)
        worst = float(residual.max())
        if first is not None and not worst <= first:
            self._diverged(n_iter, worst / first, last, worst)
        self.last_solve = SolveInfo(int(B.shape[0]), n_iter, worst,
                                    bool(worst <= self.tol), time.perf_counter() - start,
                                    False, int(B.shape[0]))
        if worst > self.tol:
            self._warn_short("LiSSA", int((residual > self.tol).sum()), B.shape[0], worst,
                             int(residual.argmax()))
        return X

    def _diverged(self, n_iter: int, growth: float, previous: float | None,
                  current: float) -> None:
        rate = current / previous if previous and math.isfinite(current) else math.inf
        if math.isfinite(rate) and rate > 1:
            top = self.scale * (1 + rate)  # |1 − λ_max/σ| = rate
            advice = f"scale ≥ {1.1 * top:.3e} (the growth rate puts λ_max near {top:.3e})"
        else:
            advice = "a larger scale"
        raise LissaDivergenceError(
            f"LiSSA diverged after {n_iter} iteration{'s' * (n_iter != 1)}: the residual grew "
            f"{growth:.3g}× with scale={self.scale:.3e}. The series converges only when "
            f"scale > λ_max/2 of the damped {self.curvature.kind} and the curvature is "
            f"positive definite. Use {advice}, or leave scale=None to estimate it; with "
            "curvature='hessian' also check that the damping makes it positive definite."
        )
