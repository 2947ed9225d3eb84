"""Block conjugate gradients, optionally preconditioned and in mixed precision."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..curvature.operator import Curvature
from ..utils._warnings import warn
from .base import SOLVER_TYPES, Solver, SolveInfo, register_solver

__all__ = ["CGSolver", "CG_MAX_REFINEMENTS", "PRECONDITIONERS", "ROUNDING_MARGIN"]

#: The solvers CG takes as a preconditioner (``solver_params['preconditioner']``).
PRECONDITIONERS = (None, "ekfac", "kfac", "arnoldi")
#: Safety factor on the measured float32 rounding level in mixed-precision CG.
ROUNDING_MARGIN = 30.0
#: Most float32 refinement rounds of mixed-precision CG (each gains up to 1e-4).
CG_MAX_REFINEMENTS = 8
#: Iterations without halving its worst relative residual after which a block in
#: lower than float64 precision, already within :data:`STALL_LEVEL` eps of it, is
#: taken to have stalled at rounding (its search directions collapsed).
STALL_ITERATIONS = 20
#: Relative residual, in units of the precision's eps, below which a stall is rounding.
STALL_LEVEL = 1000.0


@register_solver
class CGSolver(Solver):
    """Block conjugate gradients (optionally preconditioned) on many right-hand sides.

    All right-hand sides share one block Krylov space: each iteration makes
    one batched curvature product with a block of search directions and
    takes, for every column, the best step within the whole block (O'Leary's
    block CG). The block Krylov space of ``s`` columns holds the ``s`` largest
    eigendirections early, so convergence goes like CG on a spectrum with
    its top ``s − 1`` eigenvalues removed — far fewer iterations than
    column-by-column CG when many gradients are solved at once. The
    directions are re-orthonormalised every iteration and columns that have
    converged leave the block (the breakdown-free variant of Ji & Li, 2017),
    so a block that loses rank never breaks the recurrence.

    Parameters
    ----------
    curvature : Curvature
        Must be positive definite (GGN, or a damped Hessian at a minimum).
    tol : float, default=1e-10
        Relative residual ``‖b − A x‖ / ‖b‖`` at which a column stops.
    max_iter : int, optional
        Iteration cap; default ``10 P`` (as scipy's ``cg``).
    preconditioner : object with ``solve(B)``, optional
        An approximate inverse ``M⁻¹ ≈ (C + λI)⁻¹`` (symmetric positive
        definite), e.g. :class:`KroneckerSolver` or :class:`ArnoldiSolver`
        (called through their ``apply``, which skips the residual check of
        ``solve``). It changes the iterations needed, never the answer.
    block_size : int, default=512
        Most right-hand sides per block (they are split into equal blocks);
        more share a larger Krylov space (fewer
        iterations) but cost ``O(block_size² P)`` per iteration in dense
        algebra.
    mixed_precision : bool, default=False
        Run the iterations with float32 curvature products and correct them
        by iterative refinement: each round solves for the remaining residual
        in float32, to the reduction still needed but at most ``1e-4`` (float32's
        reach), then recomputes the residual —
        in float32 when the float32 product's measured rounding error (with
        a 30× margin, added to the reported residual) is below ``tol/3``,
        in float64 otherwise. The reported residual bounds the true one and
        meets ``tol`` as before; the products cost a third to a half.
    verbose : int, default=0
        Above 0, a progress bar per block of right-hand sides: columns
        converged, iterations and the worst relative residual so far.

    Notes
    -----
    When some column stops at ``max_iter`` above ``tol`` a
    :class:`~sklearn.exceptions.ConvergenceWarning` reports the residual. In
    lower than float64 precision a block can stall at the precision's rounding
    before ``tol`` (its worst relative residual, within ``1000 eps``, not
    halving in :data:`STALL_ITERATIONS` iterations, or its directions losing
    all rank — about 1.3e-6 on a float32 digits MLP, above the float32 default
    ``tol`` of 1e-6): it stops there and the warning says so, rather than
    iterating on to ``max_iter``.
    A block whose projected curvature ``PᵀAP`` is not positive definite means
    the operator is indefinite: that raises ``ValueError`` instead of
    returning garbage.
    """

    name = "cg"
    params = ("preconditioner", "rank", "block_size", "mixed_precision")

    def __init__(self, curvature: Curvature, tol: float = 1e-10,
                 max_iter: int | None = None, preconditioner: Any = None,
                 block_size: int = 512, mixed_precision: bool = False,
                 verbose: int = 0) -> None:
        super().__init__(curvature)
        self.tol = float(tol)
        self.verbose = int(verbose)
        self.max_iter = int(max_iter) if max_iter is not None else 10 * curvature.n_params
        self.preconditioner = preconditioner
        self.block_size = int(block_size)
        if mixed_precision and curvature.model.dtype != torch.float64:
            warn(
                f"solver_params={{'mixed_precision': True}} has no effect with solver='cg' on a "
                f"{str(curvature.model.dtype).removeprefix('torch.')} net: its curvature "
                "products are already in that precision. Use solver='kernel' (float32 "
                "factor refined in float64) or a float64 net (net.module_.double()).",
                UserWarning)
        self.mixed_precision = bool(mixed_precision) and curvature.model.dtype == torch.float64
        self._low = curvature.astype(torch.float32) if self.mixed_precision else None
        self._eta: float | None = None
        self._stalled = 0  # columns of the latest solve whose block stalled at rounding
        self.info = {"solver": "cg", "approximate": False, "tol": self.tol,
                     "max_iter": self.max_iter,
                     "block_size": self.block_size, "mixed_precision": self.mixed_precision,
                     "n_params": curvature.n_params,
                     "preconditioner": None if preconditioner is None else preconditioner.name}
        if preconditioner is not None:
            self.info.update({f"preconditioner_{k}": v for k, v in preconditioner.info.items()
                              if k not in ("solver", "n_params", "approximate")})

    @classmethod
    def build(cls, curvature: Curvature, *, tol: float, max_iter: int | None, verbose: int,
              preconditioner: str | None = None, rank: int | None = None,
              block_size: int = 512, mixed_precision: bool = False) -> "CGSolver":
        """``preconditioner`` by name (one of :data:`PRECONDITIONERS`), built on the
        Gauss–Newton matrix; ``rank`` for ``"arnoldi"`` only."""
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"solver_params['preconditioner'] must be one of "
                             f"{PRECONDITIONERS}, got {preconditioner!r}")
        if rank is not None and preconditioner != "arnoldi":
            raise ValueError("solver_params['rank'] applies to preconditioner='arnoldi' only.")
        if preconditioner is not None:
            ggn = curvature if preconditioner == "arnoldi" else Curvature(
                curvature.model, curvature.X, curvature.T, kind="ggn",
                damping=curvature.damping, theta=curvature.theta,
                batch_size=curvature.batch_size)
            options = {"rank": rank} if preconditioner == "arnoldi" else {}
            preconditioner = SOLVER_TYPES[preconditioner].build(
                ggn, tol=tol, max_iter=None, verbose=0, **options)
        return cls(curvature, tol=tol, max_iter=max_iter, preconditioner=preconditioner,
                   block_size=block_size, mixed_precision=mixed_precision, verbose=verbose)

    def _precondition(self, R: Tensor) -> Tensor:
        if self.preconditioner is None:
            return R
        return self.preconditioner.apply(R).to(R.dtype)

    @staticmethod
    def _orthonormal_rows(W: Tensor) -> Tensor:
        """Orthonormal basis (rows) of the row space of ``W``, rank-revealing.

        Rows are scaled to unit length (so a nearly converged column's small
        residual still counts), then orthonormalised twice through the
        eigendecomposition of their Gram matrix, dropping directions whose
        singular value is below ``√eps`` of the largest (numerically
        dependent). Two Gram passes ("CholeskyQR2") are as orthogonal as an
        SVD and, at ``O(s² P)`` in matrix products, ten times cheaper for a
        block of 300 directions.
        """
        W = W / W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)
        threshold = torch.finfo(W.dtype).eps
        for _ in range(2):
            values, vectors = torch.linalg.eigh(W @ W.T)
            keep = values > values[-1:] * threshold
            W = (vectors[:, keep].T @ W) / values[keep].sqrt()[:, None]
        return W

    def _not_positive(self, value: float) -> ValueError:
        return ValueError(
            f"CG met non-positive curvature pᵀAp = {value:.3e}: the damped "
            f"{self.curvature.kind} (damping={self.curvature.damping:g}) is not positive "
            "definite. Increase damping or use curvature='ggn'."
        )

    def _solve_block(self, B: Tensor, curvature: Curvature,
                     tol: float) -> tuple[Tensor, int, Tensor]:
        X = torch.zeros_like(B)
        R = B.clone()
        norms = B.norm(dim=1)
        target = tol * norms
        active = torch.nonzero(R.norm(dim=1) > target).flatten()
        n_iter = 0
        if not active.numel():
            return X, n_iter, active
        bar = tqdm(total=B.shape[0], initial=B.shape[0] - active.numel(), unit="column",
                   desc=f"CG{' (float32)' if curvature.model.dtype == torch.float32 else ''}",
                   disable=not self.verbose, leave=False)
        directions = self._orthonormal_rows(self._precondition(R[active]))
        low = curvature.model.dtype != torch.float64
        level = STALL_LEVEL * torch.finfo(curvature.model.dtype).eps
        best, since = math.inf, 0
        while n_iter < self.max_iter:
            n_iter += 1
            AP = curvature.matmat(directions)
            PAP = directions @ AP.T
            PAP = 0.5 * (PAP + PAP.T)
            factor, failed = torch.linalg.cholesky_ex(PAP)
            if int(failed):
                bar.close()
                raise self._not_positive(float(torch.linalg.eigvalsh(PAP)[0]))
            alpha = torch.cholesky_solve(directions @ R[active].T, factor)  # (r, a)
            X[active] += alpha.T @ directions
            R[active] -= alpha.T @ AP
            residuals = R[active].norm(dim=1)
            still = residuals > target[active]
            worst = float((residuals / norms[active]).max())
            if self.verbose:
                bar.update(int((~still).sum()))
                bar.set_postfix(iteration=n_iter, worst=f"{worst:.1e}", refresh=False)
            active = active[still]
            if not active.numel():
                break
            best, since = (worst, 0) if worst < 0.5 * best else (best, since + 1)
            if low and since >= STALL_ITERATIONS and best < level:
                self._stalled += int(active.numel())  # stuck at rounding, not at max_iter
                break
            Z = self._precondition(R[active])
            beta = torch.cholesky_solve(AP @ Z.T, factor)  # A-conjugate to the last block
            directions = self._orthonormal_rows(Z - beta.T @ directions)
            if not directions.shape[0]:
                self._stalled += int(active.numel())  # the block lost every direction
                break
        bar.close()
        return X, n_iter, active

    def _solve_blocks(self, B: Tensor, curvature: Curvature, tol: float) -> tuple:
        X = torch.empty_like(B)
        n_iter, n_left = 0, 0
        n_blocks = max(1, math.ceil(B.shape[0] / self.block_size))
        for rows in torch.arange(B.shape[0]).tensor_split(n_blocks):  # equal blocks
            X[rows], iters, left = self._solve_block(B[rows], curvature, tol)
            n_iter, n_left = n_iter + iters, n_left + left.numel()
        return X, n_iter, n_left

    def _rounding_level(self) -> float:
        """``η``: the float32 product's error per unit of input norm.

        Measured once against the float64 product on 4 fixed random vectors
        (the largest ``‖A₃₂v − A₆₄v‖ / ‖v‖``).
        """
        if self._eta is None:
            V = torch.randn(4, self.curvature.n_params, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0)).to(self.curvature.X.device)
            V = V.to(self.curvature.model.dtype)
            error = self._low.matmat(V.float()).to(V.dtype) - self.curvature.matmat(V)
            self._eta = float((error.norm(dim=1) / V.norm(dim=1)).max())
        return self._eta

    def _residual(self, B: Tensor, X: Tensor, norms: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, bound on ‖R‖/‖b‖)``, from a float32 product where that is safe.

        The float32 product of ``x`` errs by about ``η ‖x‖``; with 30× that as
        margin (10× the worst seen), a float32 residual is used when the margin
        stays below ``tol/3`` for every column, and the margin is added to the
        reported residual so that it bounds the true one. Otherwise the residual
        is computed in float64.
        """
        margin = ROUNDING_MARGIN * self._rounding_level() * X.norm(dim=1) / norms
        if float(margin.max()) <= self.tol / 3:
            R = B - self._low.matmat(X.float()).to(B.dtype)
            return R, R.norm(dim=1) / norms + margin
        R = B - self.curvature.matmat(X)
        return R, R.norm(dim=1) / norms

    def _refine(self, B: Tensor) -> tuple:
        """Mixed precision: float32 solves of the remaining residual, until ``tol``.

        ``max_iter`` caps each block of each round, as in the plain solve. When
        float32 stops making progress (ill-conditioned systems), one last round
        in the working precision finishes the solve, so mixed precision is never
        less accurate than the plain solve.
        """
        X = torch.zeros_like(B)
        R, norms = B, B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)
        n_iter, residual = 0, torch.ones(B.shape[0], dtype=B.dtype)
        for _ in range(CG_MAX_REFINEMENTS):
            active = torch.nonzero(residual > self.tol).flatten()
            if not active.numel():
                break
            # the reduction still needed (a third of tol to spare), within float32's reach
            inner_tol = max(self.tol / (3 * float(residual[active].max())), 1e-4)
            scale = R[active].norm(dim=1, keepdim=True)
            D, iters, _ = self._solve_blocks((R[active] / scale).float(), self._low, inner_tol)
            X[active] += D.to(B.dtype) * scale
            n_iter += max(iters, 1)
            R, progress = self._residual(B, X, norms)
            stalled = not bool((progress[active] < 0.5 * residual[active]).all())
            residual = progress
            if stalled:
                break
        active = torch.nonzero(residual > self.tol).flatten()
        if active.numel():  # float32 could not get there: finish in the working precision
            scale = R[active].norm(dim=1, keepdim=True)
            needed = self.tol / float(residual[active].max())
            D, iters, _ = self._solve_blocks(R[active] / scale, self.curvature, needed)
            X[active] += D * scale
            n_iter += iters
            R = B - self.curvature.matmat(X)
            residual = R.norm(dim=1) / norms
        return X, n_iter, int((residual > self.tol).sum()), residual

    def solve(self, B: Tensor) -> Tensor:
        """Solve ``(C + λI) xᵀ = bᵀ`` for each row of ``B`` by block PCG."""
        start = time.perf_counter()
        self._stalled = 0
        if self._low is None:
            X, n_iter, n_left = self._solve_blocks(B, self.curvature, self.tol)
            residual = self._relative_residual(X, B) if B.shape[0] else B.new_zeros(1)
        else:
            X, n_iter, n_left, residual = self._refine(B)
        worst, rounding = float(residual.max()), None
        precision = str(self.curvature.model.dtype).removeprefix("torch.")
        collapsed = self._low is None and n_left > 0 and self._stalled >= n_left
        if collapsed:  # the block stalled at rounding before max_iter
            n_left, rounding = int((residual > self.tol).sum()), precision
        elif n_left == 0 and B.dtype != torch.float64 and worst > self.tol:
            n_left = int((residual > self.tol).sum())  # the recurrence met tol, the truth did not
            rounding = str(B.dtype).removeprefix("torch.")
        self.last_solve = SolveInfo(int(B.shape[0]), n_iter, worst, n_left == 0,
                                    time.perf_counter() - start, False, int(B.shape[0]))
        if n_left:
            self._warn_short("CG", n_left, B.shape[0], worst, int(residual.argmax()), rounding,
                             collapsed=collapsed)
        return X
