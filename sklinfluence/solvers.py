"""Solvers for damped curvature systems ``(C + λI) X = B``.

Every solver has the same interface: it is built from a
:class:`~sklinfluence.curvature.Curvature` and solves for many right-hand
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
  ``n = N·K'`` kernel rows (:mod:`sklinfluence.kernel`): where the data are
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
- :class:`KroneckerSolver`: EK-FAC / K-FAC (:mod:`sklinfluence.kfac`).
- :class:`ArnoldiSolver`: top eigenpairs plus damping
  (:mod:`sklinfluence.lowrank`).
- :class:`IdentitySolver`: the curvature of the data replaced by 0, leaving
  weight decay and damping — grad-dot, the baseline every
  curvature-aware solver should beat.

:func:`make_solver` builds one by name; ``"auto"`` is exact while the dense
matrix is small (``EXACT_MAX_PARAMS``), the kernel form above where the data
are smaller than the net, block CG otherwise. :func:`plan_solvers` is the one
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

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor
from tqdm.auto import tqdm

from ._warnings import right_hand_side_name, warn
from .curvature import Curvature
from .kernel import GaussNewtonKernel, kernel_verdict
from .kfac import KroneckerFactors
from .lowrank import bottom_eigenvalue, top_eigenpairs, top_eigenvalue
from .memory import dense_bytes, dense_fits_memory, format_bytes, memory_limit
from .removal import removal_chunks, stacked_rows

__all__ = ["ExactSolver", "KernelSolver", "CGSolver", "LissaSolver", "KroneckerSolver",
           "ArnoldiSolver", "IdentitySolver",
           "SOLVERS", "SOLVER_PARAMS", "EXACT_MAX_PARAMS", "MIXED_PRECISION_MIN_TOL",
           "RESIDUAL_CHECKS", "CG_MAX_REFINEMENTS", "CHORD_TOL", "SOLVER_ROLES", "SolveInfo",
           "SolverDecision", "SolverPlan",
           "LissaDivergenceError", "default_tol", "make_solver", "measured_rows",
           "plan_solvers", "resolve_solver"]

SOLVERS = ("auto", "exact", "kernel", "cg", "lissa", "ekfac", "kfac", "arnoldi", "identity")
#: The ``solver_params`` each solver accepts (besides ``tol``/``max_iter``).
SOLVER_PARAMS = {
    "auto": (), "exact": (), "kernel": ("mixed_precision",),
    "cg": ("preconditioner", "rank", "block_size", "mixed_precision"),
    "lissa": ("scale",),
    "ekfac": (), "kfac": (), "arnoldi": ("rank",), "identity": (),
}
#: ``"auto"`` uses the exact solver up to this many parameters (8 P² bytes:
#: 200 MB at 5,000), mixed-precision block CG above. Read at call time by
#: :func:`plan_solvers` (private knob: the tests lower it to run the large-net
#: paths on small nets).
EXACT_MAX_PARAMS = 5000
#: Right-hand sides whose residual an approximate direct solve (EK-FAC, K-FAC,
#: Arnoldi) measures under the true curvature (:func:`measured_rows`).
RESIDUAL_CHECKS = 8
PRECONDITIONERS = (None, "ekfac", "kfac", "arnoldi")
#: Safety factor on the measured float32 rounding level in mixed-precision CG.
ROUNDING_MARGIN = 30.0
#: Most float32 refinement rounds of mixed-precision CG (each gains up to 1e-4).
CG_MAX_REFINEMENTS = 8
#: ``"auto"`` above the dense size uses mixed-precision CG at this ``tol`` or looser,
#: float64 CG below it (see :func:`plan_solvers`).
MIXED_PRECISION_MIN_TOL = 1e-6
#: Relative residual of the matrix-free chord factor's CG solves (batched PBRF above
#: the dense size). Each chord step needs only to contract the gradient; the outer
#: iteration measures the true gradient and stops at the PBRF's own ``tol``.
CHORD_TOL = 1e-8
#: ``tol=None`` means this relative residual for a float64 net ...
FLOAT64_TOL = 1e-10
#: ... and this one for a float32 net (skorch's default), whose gradients carry
#: float32 rounding: on a 38,282-parameter digits CNN its self-influence differs
#: from that of the same weights in float64 by up to 2.5e-7 relative, so a
#: tighter solve buys digits its inputs do not have.
FLOAT32_TOL = 1e-6


def default_tol(dtype: torch.dtype) -> float:
    """The solves' relative residual for ``tol=None``: :data:`FLOAT64_TOL` for a
    float64 net, :data:`FLOAT32_TOL` for a lower-precision one."""
    return FLOAT64_TOL if dtype == torch.float64 else FLOAT32_TOL


class LissaDivergenceError(ValueError):
    """LiSSA's series diverged: the scale is below half the top eigenvalue."""


def measured_rows(n_rhs: int) -> Tensor:
    """Rows of ``B`` whose residual an approximate direct solve measures.

    Up to :data:`RESIDUAL_CHECKS` of the ``n_rhs`` right-hand sides, evenly
    spaced from the first to the last (all of them when there are few):
    deterministic, so a repeated call reports the same number.
    """
    if n_rhs <= RESIDUAL_CHECKS:
        return torch.arange(n_rhs)
    return torch.linspace(0, n_rhs - 1, RESIDUAL_CHECKS, dtype=torch.float64).round().long()


@dataclass
class SolveInfo:
    """What one call to ``solve`` did.

    Attributes
    ----------
    n_rhs : int
        Number of right-hand sides.
    n_iter : int
        Iterations (0 for a direct solve), summed over CG's blocks and
        refinement rounds; ``max_iter`` caps each block of each round.
    max_relative_residual : float or None
        Largest ``‖b − A x‖ / ‖b‖`` over the right-hand sides it was measured
        on (``n_measured`` of them), ``A`` the true damped curvature,
        recomputed from the returned solution. CG and LiSSA measure every
        right-hand side (mixed-precision CG reports an upper bound); the
        approximate direct solvers (EK-FAC, K-FAC, Arnoldi) measure up to
        :data:`RESIDUAL_CHECKS` of them (:func:`measured_rows`), one batched
        curvature product — their actual error; ``None`` for the exact
        solver, which is backward stable and would pay a full curvature
        product to check.
    converged : bool or None
        Whether every right-hand side met ``tol`` (CG, LiSSA); ``True`` for
        an exact direct solve; ``None`` for an approximation (``approximate``),
        which has no stopping rule to meet — read ``max_relative_residual``.
    seconds : float
        Wall time of the call.
    approximate : bool, default=False
        Whether the solver applies an approximate inverse whatever its
        settings (EK-FAC, K-FAC, Arnoldi below full rank), as opposed to one
        exact up to rounding or ``tol``.
    n_measured : int, default=0
        Right-hand sides ``max_relative_residual`` covers.
    """

    n_rhs: int
    n_iter: int
    max_relative_residual: float | None
    converged: bool | None
    seconds: float
    approximate: bool = False
    n_measured: int = 0


@dataclass
class _SolverBase:
    curvature: Curvature
    info: dict = field(default_factory=dict)
    last_solve: SolveInfo | None = None

    def _relative_residual(self, X: Tensor, B: Tensor) -> Tensor:
        R = B - self.curvature.matmat(X.to(B.dtype))
        return R.norm(dim=1) / B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)

    def apply(self, B: Tensor) -> Tensor:
        """The inverse applied to each row of ``B`` as cheaply as the solver can,
        float64 — what a preconditioner calls. Here :meth:`solve` itself; a direct
        solver skips its residual check, the mixed-precision kernel its refinement.
        """
        return self.solve(B)

    def self_products(self, removals: list, forces: Callable) -> Tensor:
        """``g_sᵀ (C + λI)⁻¹ g_s`` for the force ``g_s = Σ_{i∈S_s} ∇L_i`` of each
        removal, float64 — what self-influence needs.

        ``forces(removals)`` gives the forces ``(len(removals), P)``. This
        default solves for them and takes the products; the direct solvers
        with a factorisation read the forms off it instead (no way back to
        parameters). Records ``last_solve``.
        """
        F = forces(removals)
        return (F.to(torch.float64) * self.solve(F)).sum(dim=1)

    def removal_products(self, B: Tensor, X: Tensor, T: Tensor, removals: list,
                         forces: Callable, max_rows: int | None = None) -> Tensor:
        """``[s, e] = g_sᵀ (C + λI)⁻¹ b_e`` for the loss gradients ``B`` (rows) of
        the samples ``(X, T)`` and ``g_s = Σ_{i∈S_s} ∇L_i`` the force of each
        removal, float64, ``(len(removals), len(B))`` — an influence matrix.

        This default solves for ``B`` and takes products with the forces,
        ``forces(part)`` for parts of at most ``max_rows`` removed rows
        (:func:`~sklinfluence.removal.removal_chunks`; ``None``: all at once);
        :meth:`KernelSolver.removal_products` needs most forces not at all.
        Records ``last_solve`` (the solve for ``B``).
        """
        S = self.solve(B).to(torch.float64)
        blocks = [forces(part).to(torch.float64) @ S.T
                  for part in removal_chunks(removals, max_rows)]
        return torch.cat(blocks) if blocks else S.new_zeros((0, S.shape[0]))

    def _warn_short(self, name: str, n_left: int, n_rhs: int, worst: float,
                    worst_at: int) -> None:
        """Warn that ``n_left`` right-hand sides stopped above tol, naming the worst
        (row ``worst_at`` of ``B``, named by :func:`~._warnings.naming_right_hand_sides`)."""
        warn(
            f"{name} stopped at max_iter={self.max_iter} with {n_left} of {n_rhs} "
            f"right-hand sides above tol={self.tol:g}; largest relative residual "
            f"{worst:.3e}, for {right_hand_side_name(worst_at)}. Increase max_iter or "
            "damping.",
            ConvergenceWarning,
        )


class _DirectSolver(_SolverBase):
    """A solver that applies a fixed (exact or approximate) inverse: no iterations.

    An approximate one (``approximate``) measures its relative residual under
    the true curvature on :func:`measured_rows` of each ``B`` (one batched
    curvature product of at most :data:`RESIDUAL_CHECKS` vectors) and reports
    ``converged=None``; an exact one reports ``converged=True`` and no residual.
    """

    #: Whether the inverse is an approximation (set by each solver).
    approximate: bool = False
    #: Whether ``solve`` measures residuals (every solver but the exact one).
    measures_residual: bool = True

    def apply(self, B: Tensor) -> Tensor:
        """The inverse applied to each row of ``B``, float64, recording nothing.

        What a preconditioner calls (every CG iteration): no residual check;
        the mixed-precision kernel applies its float32 factor unrefined.
        """
        return self._apply(B.to(torch.float64))

    def solve(self, B: Tensor) -> Tensor:
        """The inverse applied to each row of ``B``; float64 result.

        Records ``last_solve``; see the class notes for its residual.
        """
        start = time.perf_counter()
        X = self._apply(B.to(torch.float64))
        residual, n_measured = None, 0
        if self.measures_residual and B.shape[0]:
            rows = measured_rows(int(B.shape[0])).to(B.device)
            residual = float(self._relative_residual(X[rows], B[rows]).max())
            n_measured = int(rows.numel())
        self.last_solve = SolveInfo(int(B.shape[0]), 0, residual,
                                    None if self.approximate else True,
                                    time.perf_counter() - start, self.approximate, n_measured)
        return X


class ExactSolver(_DirectSolver):
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


class KernelSolver(_DirectSolver):
    """Exact damped Gauss–Newton inverse in kernel (Woodbury) form.

    ``(G + D)⁻¹ = D^{-1/2}(I − Ũᵀ(I + ŨŨᵀ)⁻¹Ũ)D^{-1/2}`` with the ``n = N·K'``
    rows of ``Ũ`` from per-layer captures (:mod:`sklinfluence.kernel`): the
    exact solver's answer, to rounding, for ``16 n²`` bytes instead of
    ``16 P²``. On the digits CNN (1,200 samples, 71,754 parameters) the kernel
    has 10,800 rows.

    Parameters
    ----------
    curvature : Curvature
        A Gauss–Newton operator (``kind="ggn"``) with weight decay plus
        damping positive; every trainable parameter in a registered layer
        type (:mod:`sklinfluence.layers`).
    tol : float, default=1e-10
        With ``mixed_precision``: the relative residual
        ``‖b − (G + D) x‖ / ‖b‖`` the float64 refinement reaches on the
        checked right-hand sides (:func:`measured_rows`).
    mixed_precision : bool, default=False
        Kernel and Cholesky factor in float32 (2.5× faster, half the memory),
        each solve refined in float64 until the checked residuals meet
        ``tol``; ``last_solve`` reports the largest and the rounds (as
        ``n_iter``). The kernel switches to float64 where float32 cannot get
        there, and refines the float64 solutions themselves where the kernel
        form's way back to parameters still misses ``tol``. Where even that
        stops short (``tol`` below what float64 allows for the matrix's
        conditioning) ``converged`` is False, ``info["stopped_short"]`` says
        why and a :class:`~sklearn.exceptions.ConvergenceWarning` repeats it.
        False: float64 throughout, no residual measured.
    verbose : int, default=0
        Progress bar over the kernel's blocks.

    Raises
    ------
    ValueError
        For a Hessian, a non-positive ``D``, or layers outside the registry
        (:class:`~sklinfluence.layers.UnsupportedLayerError`).
    NotEnoughMemoryError
        Before allocating, when the kernel does not fit.
    """

    measures_residual = False  # float64: exact to rounding; mixed: see solve

    def __init__(self, curvature: Curvature, tol: float = 1e-10,
                 mixed_precision: bool = False, verbose: int = 0) -> None:
        super().__init__(curvature)
        if curvature.kind != "ggn":
            raise ValueError("solver='kernel' inverts the Gauss–Newton matrix; with "
                             "curvature='hessian' use solver='exact' or 'cg'.")
        self.tol = tol
        self.mixed_precision = bool(mixed_precision)
        self._kernel = GaussNewtonKernel(curvature.model, curvature.theta, curvature.X,
                                         curvature.T, damping=curvature.damping,
                                         batch_size=curvature.batch_size,
                                         mixed_precision=self.mixed_precision, verbose=verbose)
        # one dict with the kernel's: it records a switch to float64 there
        self.info = self._kernel.info
        self.info.update(solver="kernel", approximate=False, n_params=curvature.n_params,
                         mixed_precision=self.mixed_precision, stopped_short=None)

    def _apply(self, B: Tensor) -> Tensor:
        return self._kernel.solve(B)

    def solve(self, B: Tensor) -> Tensor:
        """``(G + D)⁻¹`` applied to each row of ``B``; float64 result.

        Records ``last_solve``: in mixed precision the largest measured
        relative residual, the refinement rounds as ``n_iter`` and whether
        the checked rows met ``tol``; in float64 ``converged=True`` and no
        residual (exact to rounding).
        """
        if not self.mixed_precision:
            return super().solve(B)
        return self._recorded(B, lambda rows: self._kernel.solve(
            B, tol=self.tol, check_rows=rows))

    def _recorded(self, B: Tensor, compute) -> Tensor:
        start = time.perf_counter()
        rows = measured_rows(int(B.shape[0])).to(B.device)
        result = compute(rows if self.mixed_precision else None)
        residual = self._kernel.last_residual
        self.last_solve = SolveInfo(
            int(B.shape[0]), self._kernel.last_rounds, residual,
            True if residual is None else residual <= self.tol,
            time.perf_counter() - start, False,
            int(rows.numel()) if residual is not None else 0)
        self.info["stopped_short"] = self._kernel.last_stop
        if self._kernel.last_stop is not None:
            warn(f"solver='kernel' in mixed precision missed tol: {self._kernel.last_stop}",
                 ConvergenceWarning)
        return result

    def removal_products(self, B: Tensor, X: Tensor, T: Tensor, removals: list,
                         forces: Callable, max_rows: int | None = None) -> Tensor:
        """``[s, e] = g_sᵀ (G + D)⁻¹ b_e`` for the loss gradients ``B`` of the
        samples ``(X, T)`` and ``g_s = Σ_{i∈S_s} ∇L_i`` the force of each
        removal, float64; what :meth:`solve` followed by products with the
        forces gives (to rounding in float64, to ``tol`` in mixed precision),
        mostly without the forces (``max_rows`` is not needed: the forces it
        does compute are of a few removals, taken at once).

        The kernel's products with ``B`` come from layer captures of the
        samples (:meth:`~sklinfluence.kernel.GaussNewtonKernel.gradient_rows`),
        and a removal of training rows (with their training targets) whose
        loss gradients lie in the span of their output Hessians needs no
        gradient (:meth:`~sklinfluence.kernel.GaussNewtonKernel.removal_products`):
        on the digits CNN's 1,200 × 300 influence matrix, 1,019 of the 1,200
        rows; ``forces(removals)`` computes the others' (rows outside the
        training set, saturated outputs: a softmax class at probability
        0). Records ``last_solve``.
        """
        c, kernel = self.curvature, self._kernel
        fast, slow, rows, owner = self._split(removals)
        like = c.model.params.to(torch.float64)
        slow_removals = [removals[s] for s in slow]
        F = forces(slow_removals) if slow else like.new_zeros((0, c.n_params))
        F_rows = self._force_rows(slow_removals) if slow else like.new_zeros((0, 0))

        def compute(check):
            W = kernel.gradient_rows(c.model, c.theta, X, T, c.batch_size)
            if check is not None:  # the checked columns exactly Ũ D^{-1/2} b (a float32
                # net's captures differ from its gradients by float32 rounding)
                W[:, check] = kernel._rows_times(B[check].to(torch.float64) * kernel.scale)
            return kernel.removal_products(
                W, B, len(removals), rows=rows, owner=owner, forces=F,
                forces_rows=F_rows, forced=torch.tensor(slow, dtype=torch.long),
                tol=self.tol if self.mixed_precision else None, check_rows=check)

        return self._recorded(B, compute)

    def _split(self, removals: list) -> tuple:
        """Which removals need no gradient: ``(fast, slow, rows, owner)``.

        ``fast``: positions of the removals made of training rows (with their
        training targets) whose gradients lie in their rows' span
        (:meth:`~sklinfluence.kernel.GaussNewtonKernel.coefficients`);
        ``slow``: the others. ``rows`` and ``owner`` list the fast removals'
        training rows and their removal's position in ``removals``.
        """
        c = self.curvature
        _, eligible = self._kernel.coefficients(c.model, c.theta, c.X, c.T, c.batch_size)
        fast, slow = [], []
        for s, removal in enumerate(removals):
            index = torch.tensor(removal.index, dtype=torch.long)
            inside = bool((index >= 0).all()) and bool(eligible[index.clamp_min(0)].all())
            inside = inside and torch.equal(removal.X.to(c.X.dtype), c.X[index]) \
                and torch.equal(removal.T.to(c.T.dtype), c.T[index])
            (fast if inside else slow).append(s)
        like = c.model.params.to(torch.float64)
        picked = [removals[s] for s in fast]
        rows = torch.tensor([i for removal in picked for i in removal.index], dtype=torch.long)
        owner = stacked_rows(picked, like)[2] if picked else like.new_zeros(0)
        owner = torch.tensor(fast, dtype=torch.long)[owner.long()]
        return fast, slow, rows, owner

    def self_products(self, removals: list, forces: Callable) -> Tensor:
        """``g_sᵀ (G + D)⁻¹ g_s`` per removal, from the diagonal blocks of the
        kernel's inverse (:meth:`~sklinfluence.kernel.GaussNewtonKernel.quadratic_forms`):
        ``‖w‖²_* − wᵀ(I + ŨŨᵀ)⁻¹w``, for a removal of training rows ``w`` its
        rows' coefficients ``c_i`` in their own blocks (``‖w‖²_* = ‖w‖²``,
        no gradient at all), for any other ``w = Ũ D^{-1/2} g`` from its force
        (``‖w‖²_* = ‖D^{-1/2} g‖²``).

        In float64 exact to rounding (``last_solve`` reports no residual).
        With a float32 factor the plain forms are checked on
        :func:`measured_rows` against float64-accurate ones
        (:meth:`~sklinfluence.kernel.GaussNewtonKernel.refined_forms`); where
        their relative error exceeds ``tol`` every form is refined (one
        product with ``Ũᵀ`` per column: on a float32 digits CNN the plain
        forms err by 6.5e-5, the refined ones by 1.6e-8); where even that
        misses ``tol``, or there are more removals than training rows (then
        refining costs more than a rebuild), the kernel is rebuilt in float64. ``last_solve``'s
        ``max_relative_residual`` is then the largest relative error of the
        checked results (an estimate: the float32 forms' difference from the
        refined ones plus the refined ones' own second-order error).
        """
        start = time.perf_counter()
        c, kernel = self.curvature, self._kernel
        if not removals:
            self.last_solve = SolveInfo(0, 0, None, True, 0.0)
            return torch.zeros(0, dtype=torch.float64)
        fast, slow, rows, owner = self._split(removals)
        n, k = kernel.n_rows, len(removals)
        W = torch.zeros((n, k), dtype=torch.float64)
        base = torch.zeros(k, dtype=torch.float64)
        if fast:
            C = kernel.coefficients(c.model, c.theta, c.X, c.T, c.batch_size)[0]
            K = C.shape[1]
            at = (rows[:, None] * K + torch.arange(K)).reshape(-1)
            W.index_put_((at, owner.repeat_interleave(K)),
                         C[rows].reshape(-1), accumulate=True)
            base[fast] = (W[:, fast] ** 2).sum(dim=0)
        if slow:
            slow_removals = [removals[s] for s in slow]
            Fs = forces(slow_removals).to(torch.float64) * kernel.scale
            base[slow] = (Fs * Fs).sum(dim=1)
            W[:, slow] = kernel._rows_times(Fs)
        result, residual, check = base - kernel.quadratic_forms(W), None, measured_rows(k)
        if kernel.factor.dtype != torch.float64:  # float32: check, refine, or rebuild
            floor = result[check].abs().clamp_min(torch.finfo(torch.float64).tiny)
            exact, error = kernel.refined_forms(W[:, check])
            residual = float(((((base[check] - exact) - result[check]).abs() + error)
                              / floor).max())
            # too coarse: refine every form — one product with Ũᵀ and a float32 solve per
            # column, about 1/K' of a rebuild (Gram matrix and Cholesky, n = N·K' rows)
            # per training row's worth of columns — or rebuild in float64 where there
            # are more removals than training rows
            if residual > self.tol and k <= kernel.n_samples:
                q, error = kernel.refined_forms(W, check)
                result = base - q
                residual = float((error / result[check].abs().clamp_min(
                    torch.finfo(torch.float64).tiny)).max())
            if residual > self.tol:
                kernel._to_float64(f"self-influence from the float32 factor erred by "
                                   f"{residual:.1e} relative, above tol={self.tol:g}")
                result, residual = base - kernel.quadratic_forms(W), None
        self.last_solve = SolveInfo(k, 0, residual, True, time.perf_counter() - start, False,
                                    0 if residual is None else int(check.numel()))
        return result

    def _force_rows(self, removals: list) -> Tensor:
        """``Ũ D^{-1/2} g_s`` for each removal's force, ``(n, len(removals))``."""
        c = self.curvature
        X, T, owner = stacked_rows(removals, c.model.params.to(torch.float64))
        W = self._kernel.gradient_rows(c.model, c.theta, X.to(c.X.dtype), T.to(c.T.dtype),
                                       c.batch_size)
        return W.new_zeros((len(removals), W.shape[0])).index_add_(
            0, owner, W.T).T


class CGSolver(_SolverBase):
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
    :class:`~sklearn.exceptions.ConvergenceWarning` reports the residual.
    A block whose projected curvature ``PᵀAP`` is not positive definite means
    the operator is indefinite: that raises ``ValueError`` instead of
    returning garbage.
    """

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
        self.info = {"solver": "cg", "approximate": False, "tol": self.tol,
                     "max_iter": self.max_iter,
                     "block_size": self.block_size, "mixed_precision": self.mixed_precision,
                     "n_params": curvature.n_params,
                     "preconditioner": None if preconditioner is None else preconditioner.name}
        if preconditioner is not None:
            self.info.update({f"preconditioner_{k}": v for k, v in preconditioner.info.items()
                              if k not in ("solver", "n_params", "approximate")})

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
            if self.verbose:
                bar.update(int((~still).sum()))
                worst = float((residuals / norms[active]).max())
                bar.set_postfix(iteration=n_iter, worst=f"{worst:.1e}", refresh=False)
            active = active[still]
            if not active.numel():
                break
            Z = self._precondition(R[active])
            beta = torch.cholesky_solve(AP @ Z.T, factor)  # A-conjugate to the last block
            directions = self._orthonormal_rows(Z - beta.T @ directions)
            if not directions.shape[0]:
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
        if self._low is None:
            X, n_iter, n_left = self._solve_blocks(B, self.curvature, self.tol)
            residual = self._relative_residual(X, B) if B.shape[0] else B.new_zeros(1)
        else:
            X, n_iter, n_left, residual = self._refine(B)
        worst = float(residual.max())
        if n_left == 0 and B.dtype != torch.float64 and worst > self.tol:
            n_left = int((residual > self.tol).sum())  # the recurrence met tol, the truth did not
        self.last_solve = SolveInfo(int(B.shape[0]), n_iter, worst, n_left == 0,
                                    time.perf_counter() - start, False, int(B.shape[0]))
        if n_left:
            self._warn_short("CG", n_left, B.shape[0], worst, int(residual.argmax()))
        return X


class LissaSolver(_SolverBase):
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


class KroneckerSolver(_DirectSolver):
    """EK-FAC (``corrected=True``) or K-FAC inverse of the damped Gauss–Newton.

    See :mod:`sklinfluence.kfac`. Only ``curvature="ggn"``: the Kronecker
    factors are built from the Gauss–Newton decomposition. Layers of the types
    in :mod:`sklinfluence.layers` (Linear, Conv2d, Embedding, BatchNorm,
    LayerNorm, GroupNorm); others raise
    :class:`~sklinfluence.layers.UnsupportedLayerError` at construction. An
    approximation (exact only where the factorisation is, see
    :mod:`sklinfluence.kfac`): ``solve`` reports the relative residual it
    measures under the true curvature and ``converged=None``
    (:class:`SolveInfo`).
    """

    approximate = True

    def __init__(self, curvature: Curvature, corrected: bool = True) -> None:
        super().__init__(curvature)
        if curvature.kind != "ggn":
            raise ValueError(
                f"solver='{self.name_for(corrected)}' approximates the Gauss–Newton matrix; "
                f"got curvature={curvature.kind!r}. Use curvature='ggn', or solver='cg' / "
                "'lissa' / 'arnoldi' for the Hessian."
            )
        self.name = self.name_for(corrected)
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


class ArnoldiSolver(_DirectSolver):
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

    def _apply(self, B: Tensor) -> Tensor:
        coefficients = B @ self.vectors.T  # (k, r)
        return (B - coefficients @ self.vectors) / self.rest + \
            (coefficients / self.values) @ self.vectors


class IdentitySolver(_DirectSolver):
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
        One of :data:`SOLVERS`, never ``"auto"``.
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


def _check_request(name: str, solver_params: dict | None) -> dict:
    """``solver_params`` as a dict, after checking ``name`` and its options."""
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {name!r}")
    params = dict(solver_params or {})
    unknown = sorted(set(params) - set(SOLVER_PARAMS[name]))
    if unknown:
        raise ValueError(
            f"solver_params {unknown} are not options of solver={name!r}; it accepts "
            f"{list(SOLVER_PARAMS[name]) or 'none'}.")
    return params


def plan_solvers(model: Any, X: Tensor, *, damping: float, curvature: str = "ggn",
                 solver: str = "auto", solver_params: dict | None = None,
                 tol: float = 1e-10, max_iter: int | None = None) -> SolverPlan:
    """Which solver each role uses for ``model`` on ``X``, and why: the one solver policy.

    - ``influence``, the configured solver: the requested one, or for
      ``"auto"`` the exact solver up to :data:`EXACT_MAX_PARAMS` parameters
      where the dense matrix fits in memory; above, the
      kernel form where the data are smaller than the net and it fits
      (:func:`~sklinfluence.kernel.kernel_applies`: ``N·K ≤ P``, a Gauss–Newton
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
      (:func:`~sklinfluence.memory.dense_fits_memory`), else ``"auto"``'s
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
        The requested solver, one of :data:`SOLVERS`.
    solver_params : dict, optional
        Its options (:data:`SOLVER_PARAMS`; none for ``"auto"``).
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
    params = _check_request(solver, solver_params)
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
                verbose: int = 0) -> Any:
    """Build the solver called ``name`` (one of :data:`SOLVERS`).

    Parameters
    ----------
    name : str
        ``"auto"``, ``"exact"``, ``"cg"``, ``"lissa"``, ``"ekfac"``,
        ``"kfac"``, ``"arnoldi"`` or ``"identity"``.
    curvature : Curvature
        The damped operator.
    tol, max_iter : float, int
        Stopping rule of the iterative solvers (CG, LiSSA).
    solver_params : dict, optional
        Per-solver options (:data:`SOLVER_PARAMS`): ``preconditioner``
        (``"ekfac"``, ``"kfac"``, ``"arnoldi"`` or None) and ``rank`` for CG;
        ``scale`` for LiSSA; ``rank`` for Arnoldi.
    verbose : int, default=0
        Progress bars of the iterative solvers (CG).
    """
    params = _check_request(name, solver_params)
    if name == "auto":
        name, params = resolve_solver(name, curvature, tol)
    if name == "exact":
        return ExactSolver(curvature)
    if name == "kernel":
        return KernelSolver(curvature, tol=tol,
                            mixed_precision=params.get("mixed_precision", False),
                            verbose=verbose)
    if name == "cg":
        preconditioner = params.get("preconditioner")
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"solver_params['preconditioner'] must be one of "
                             f"{PRECONDITIONERS}, got {preconditioner!r}")
        if "rank" in params and preconditioner != "arnoldi":
            raise ValueError("solver_params['rank'] applies to preconditioner='arnoldi' only.")
        if preconditioner in ("ekfac", "kfac"):
            preconditioner = KroneckerSolver(
                Curvature(curvature.model, curvature.X, curvature.T, kind="ggn",
                          damping=curvature.damping, theta=curvature.theta,
                          batch_size=curvature.batch_size),
                corrected=preconditioner == "ekfac")
        elif preconditioner == "arnoldi":
            preconditioner = ArnoldiSolver(curvature, rank=params.get("rank"))
        return CGSolver(curvature, tol=tol, max_iter=max_iter, preconditioner=preconditioner,
                        block_size=params.get("block_size", 512),
                        mixed_precision=params.get("mixed_precision", False), verbose=verbose)
    if name == "lissa":
        return LissaSolver(curvature, tol=tol, max_iter=max_iter, scale=params.get("scale"))
    if name in ("ekfac", "kfac"):
        return KroneckerSolver(curvature, corrected=name == "ekfac")
    if name == "identity":
        return IdentitySolver(curvature)
    return ArnoldiSolver(curvature, rank=params.get("rank"))
