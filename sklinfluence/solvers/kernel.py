"""The kernel solver: the exact damped Gauss–Newton inverse in kernel (Woodbury) form."""

from __future__ import annotations

import time
from typing import Callable

import torch
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from ..curvature.kernel import GaussNewtonKernel
from ..curvature.operator import Curvature
from ..model.removal import stacked_rows
from ..utils._warnings import warn
from .base import DirectSolver, SolveInfo, measured_rows, register_solver

__all__ = ["KernelSolver"]

@register_solver
class KernelSolver(DirectSolver):
    """Exact damped Gauss–Newton inverse in kernel (Woodbury) form.

    ``(G + D)⁻¹ = D^{-1/2}(I − Ũᵀ(I + ŨŨᵀ)⁻¹Ũ)D^{-1/2}`` with the ``n = N·K'``
    rows of ``Ũ`` from per-layer captures of the registered layer types and,
    for every other parameter (attention, bare ``nn.Parameter`` s, any
    module), from per-sample vector–Jacobian products with ``torch.func``
    (:mod:`sklinfluence.curvature.kernel`): the exact solver's answer, to
    rounding, for ``16 n²`` bytes (plus ``8 n`` per parameter whose rows are
    materialised) instead of ``16 P²``, on any differentiable net. On the
    digits CNN (1,200 samples, 71,754 parameters) the kernel has 10,800 rows.

    Parameters
    ----------
    curvature : Curvature
        A Gauss–Newton operator (``kind="ggn"``) with weight decay plus
        damping positive.
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
        For a Hessian or a non-positive ``D``.
    NotEnoughMemoryError
        Before allocating, when the kernel, its factor and the materialised
        rows do not fit (the message names each).
    """

    name = "kernel"
    params = ("mixed_precision",)
    needs = frozenset({"ggn"})  # any layers: those outside the registry by autograd
    measures_residual = False  # float64: exact to rounding; mixed: see solve

    def __init__(self, curvature: Curvature, tol: float = 1e-10,
                 mixed_precision: bool = False, verbose: int = 0) -> None:
        super().__init__(curvature)
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

    @classmethod
    def build(cls, curvature: Curvature, *, tol: float, max_iter: int | None, verbose: int,
              mixed_precision: bool = False) -> "KernelSolver":
        return cls(curvature, tol=tol, mixed_precision=mixed_precision, verbose=verbose)

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
        samples (:meth:`~sklinfluence.curvature.kernel.GaussNewtonKernel.gradient_rows`),
        and a removal of training rows (with their training targets) whose
        loss gradients lie in the span of their output Hessians needs no
        gradient (:meth:`~sklinfluence.curvature.kernel.GaussNewtonKernel.removal_products`):
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
        (:meth:`~sklinfluence.curvature.kernel.GaussNewtonKernel.coefficients`);
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
        kernel's inverse (:meth:`~sklinfluence.curvature.kernel.GaussNewtonKernel.quadratic_forms`):
        ``‖w‖²_* − wᵀ(I + ŨŨᵀ)⁻¹w``, for a removal of training rows ``w`` its
        rows' coefficients ``c_i`` in their own blocks (``‖w‖²_* = ‖w‖²``,
        no gradient at all), for any other ``w = Ũ D^{-1/2} g`` from its force
        (``‖w‖²_* = ‖D^{-1/2} g‖²``).

        In float64 exact to rounding (``last_solve`` reports no residual).
        With a float32 factor the plain forms are checked on
        :func:`measured_rows` against float64-accurate ones
        (:meth:`~sklinfluence.curvature.kernel.GaussNewtonKernel.refined_forms`); where
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
