"""Tight full-batch minimisation of a response objective (rung 3, the PBRF).

The proximal Bregman response function of removing ``z_m`` minimises, from
``θˢ``,

    ``(1/N) Σ_i D_L(f(θ, x_i), f(θˢ, x_i); t_i) + (μ/2)‖θ − θˢ‖²
    − ε L_m(θ) + (λ/2)‖θ − θˢ‖²``.

Its driving force ``ε ∇L_m = O(1/N)`` is tiny, so it is solved full batch with
a second-order method — inexact Newton steps solved by scipy's MINRES on exact
Hessian-vector products from :mod:`torch.func` — to a gradient norm ``tol``
times the initial one. See :func:`minimize_response` for why the
Newton loop is not scipy's ``minimize``. Where the net has kinks (ReLU, max
pooling) :mod:`~sklinfluence.response.kinks` continues a stalled solve with
L-BFGS; :mod:`~sklinfluence.response.batched` solves many removals at once
with one shared factor.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh, minres
from torch import Tensor
from torch.func import grad, vjp

from ..model.functional import FunctionalModel

__all__ = ["ResponseObjective", "MinimizeResult", "minimize_response", "response_failure",
           "check_response", "flag_diverged"]

#: Cap on MINRES iterations per Newton step (a well-posed step needs far fewer).
MINRES_MAX_ITER = 1000
#: Newton stops when its gradient norm has not halved over this many iterations
#: (a converging solve gains orders of magnitude per iteration near the end).
STALL_WINDOW = 5
#: Parameters above which :meth:`ResponseObjective.lowest_curvature` does not try:
#: the smallest eigenvalue sits in a cluster of ``P − N·K`` eigenvalues near ``μ + λ``
#: (the Gauss–Newton matrix's null space) that bounded Lanczos cannot resolve — on the
#: digits CNN (71,754 parameters) 17 s per sample, never settled.
LOWEST_CURVATURE_MAX_PARAMS = 20_000
#: Lanczos restarts (20 Hessian-vector products each) of the failed-solve diagnostic
#: :meth:`ResponseObjective.lowest_curvature`.
LOWEST_CURVATURE_RESTARTS = 15


@dataclass
class ResponseObjective:
    """``(1/N) Σ_i ℓ_i(θ) + decay − ε Σ_{m∈S} w_m L_m(θ) + (λ/2)‖θ − θˢ‖²``.

    The objective of one removal ``S`` (rows ``X_S``, targets
    ``T_S``, weights ``w_S``: 1 for a removed row, 0 for a row that pads a smaller
    removal in a batch; one row is leave-one-out). ``ℓ_i``
    is the training loss (``bregman=False``) or its Bregman divergence around
    ``θˢ`` (``bregman=True``, whose weight decay becomes
    ``(μ/2)‖θ − θˢ‖²``, a choice taken from the authors' code).
    """

    model: FunctionalModel
    X: Tensor
    T: Tensor
    theta_s: Tensor
    X_S: Tensor
    T_S: Tensor
    w_S: Tensor
    epsilon: float
    damping: float
    bregman: bool = True

    def __post_init__(self) -> None:
        if self.bregman:
            with torch.no_grad():
                self._ref_outputs = self.model.forward(self.theta_s, self.X)

    def astype(self, dtype: torch.dtype) -> ResponseObjective:
        """The same objective computed in ``dtype`` (a float64 copy of a float32 net)."""
        def cast(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        return ResponseObjective(self.model.astype(dtype), cast(self.X), cast(self.T),
                                 cast(self.theta_s), cast(self.X_S), cast(self.T_S),
                                 cast(self.w_S), self.epsilon, self.damping, self.bregman)

    def shifted(self, theta: Tensor) -> Tensor:
        """``F(θ) − F(θˢ)``, without the rounding of ``F``'s ``O(1)`` terms.

        With the Bregman data term (0 at ``θˢ``, computed as a divergence) the
        only term that is not small near ``θˢ`` is ``ε L_m``; its value at
        ``θˢ`` is subtracted row by row, so a change of the objective of
        ``O(ε²)`` is resolved to rounding of itself — what a line search on
        the objective needs.
        """
        if not self.bregman:
            raise ValueError("shifted() is defined for the Bregman (PBRF) objective only")
        model, diff = self.model, theta - self.theta_s
        if not hasattr(self, "_removed_s"):
            with torch.no_grad():
                self._removed_s = model.losses(self.theta_s, self.X_S, self.T_S)
        data = model.loss.bregman(model.forward(theta, self.X), self._ref_outputs,
                                  self.T).mean()
        removed = (self.w_S * (model.losses(theta, self.X_S, self.T_S) - self._removed_s)).sum()
        return (data + model.penalty(diff) - self.epsilon * removed
                + 0.5 * self.damping * (diff * diff).sum())

    def change(self, theta: Tensor) -> float:
        """``F(θ) − F(θˢ)``: :meth:`shifted` for the Bregman objective, the difference
        of two evaluations otherwise."""
        with torch.no_grad():
            if self.bregman:
                return float(self.shifted(theta))
            return float(self(theta) - self(self.theta_s))

    def value_noise(self) -> float:
        """Rounding of :meth:`change` near ``θˢ``: ``10 u (|J| + ε |Σ_S w_m L_m|)``.

        ``J`` the training objective (mean loss plus weight decay) at ``θˢ``,
        ``u`` the unit roundoff: the size of the terms whose rounding remains in
        ``F(θ) − F(θˢ)`` (a removed row fitted to ``10⁻¹⁰`` moves the objective by
        ``10⁻²⁰``, below it).
        """
        theta_s = self.theta_s
        with torch.no_grad():
            if not hasattr(self, "_trained_s"):  # the same for every removal: kept
                self._trained_s = float(self.model.objective(theta_s, self.X, self.T))
            removed = float((self.w_S * self.model.losses(theta_s, self.X_S, self.T_S)).sum())
        return 10.0 * torch.finfo(theta_s.dtype).eps * (abs(self._trained_s)
                                                          + self.epsilon * abs(removed))

    def for_removal(self, X_S: Tensor, T_S: Tensor, w_S: Tensor) -> ResponseObjective:
        """The same objective for another removal, sharing what does not depend on it
        (``θˢ``'s outputs on the training rows: no forward pass)."""
        other = copy.copy(self)
        other.X_S, other.T_S, other.w_S = X_S, T_S, w_S
        other.__dict__.pop("_removed_s", None)
        return other

    def noise_floor(self) -> float:
        """Gradient norm below which rounding dominates: ``10 u ‖∇²F θˢ‖``.

        Computing the gradient at ``θ`` near ``θˢ`` loses about ``u ‖∇²F‖
        ‖θˢ‖`` (``u`` the unit roundoff) to rounding in the network outputs;
        a removed sample whose gradient is already that small — a residual
        of 0 at interpolation — has nothing left to solve.
        """
        _, pullback = vjp(grad(self), self.theta_s)
        curvature = float(pullback(self.theta_s)[0].norm())
        return 10.0 * torch.finfo(self.theta_s.dtype).eps * curvature

    def lowest_curvature(self) -> float:
        """Smallest eigenvalue of the objective's Hessian at ``θˢ`` (Lanczos).

        Negative when ``−ε L_m`` outweighs the curvature plus damping: the
        objective is then not convex at ``θˢ`` and may have no minimiser near
        it. Used to explain a failed solve, so its cost is bounded: Lanczos
        to three digits, at most ``LOWEST_CURVATURE_RESTARTS`` restarts of
        20 Hessian-vector products; NaN when that does not settle it (large
        nets, where the smallest eigenvalue sits in a dense cluster near 0),
        and without trying above ``LOWEST_CURVATURE_MAX_PARAMS`` parameters.
        """
        theta = self.theta_s
        P = theta.numel()
        if P > LOWEST_CURVATURE_MAX_PARAMS:
            return float("nan")
        _, pullback = vjp(grad(self), theta)

        def hessp(v: np.ndarray) -> np.ndarray:
            out = pullback(torch.as_tensor(v, dtype=theta.dtype, device=theta.device))[0]
            return out.detach().cpu().numpy().astype(np.float64)

        H = LinearOperator((P, P), matvec=hessp, dtype=np.float64)
        if P <= 2:
            dense = np.column_stack([hessp(e) for e in np.eye(P)])
            return float(np.linalg.eigvalsh(0.5 * (dense + dense.T))[0])
        try:  # a diagnostic: bounded work (a few hundred products), three digits
            return float(eigsh(H, k=1, which="SA", return_eigenvectors=False, tol=1e-3,
                               ncv=min(P, 20), maxiter=LOWEST_CURVATURE_RESTARTS)[0])
        except ArpackNoConvergence as stopped:
            found = stopped.eigenvalues
            return float(np.min(found)) if len(found) else float("nan")

    def __call__(self, theta: Tensor) -> Tensor:
        return self.evaluate(theta, self.X_S, self.T_S, self.w_S)

    def evaluate(self, theta: Tensor, X_S: Tensor, T_S: Tensor, w_S: Tensor) -> Tensor:
        """The objective for removing rows ``X_S`` with targets ``T_S`` and weights
        ``w_S`` (vmappable over all four; a weight of 0 pads a smaller removal)."""
        model, diff = self.model, theta - self.theta_s
        if self.bregman:
            outputs = model.forward(theta, self.X)
            data = model.loss.bregman(outputs, self._ref_outputs, self.T).mean()
            decay = model.penalty(diff)
        else:
            data = model.losses(theta, self.X, self.T).mean()
            decay = model.penalty(theta)
        removed = (w_S * model.losses(theta, X_S, T_S)).sum()
        return data + decay - self.epsilon * removed + 0.5 * self.damping * (diff * diff).sum()


@dataclass
class MinimizeResult:
    """Outcome of one response minimisation."""

    theta: Tensor
    grad_norm: float
    initial_grad_norm: float
    n_iter: int
    converged: bool
    seconds: float
    lowest_curvature: float | None = None
    #: How the solve ended: ``"newton"`` (or the batched ``"chord"``) where the
    #: gradient met ``tol``, ``"lbfgs"`` where the L-BFGS continuation took over.
    method: str = "newton"
    #: L-BFGS continuation: the objective's decrease over its last
    #: ``LBFGS_WINDOW`` iterations relative to its total decrease from ``θˢ``,
    #: and the iterate's move over them relative to ``‖θ − θˢ‖``.
    objective_decrease: float | None = None
    relative_step: float | None = None
    #: Set by :func:`check_response` when the point must not be taken for a minimiser:
    #: what was wrong with it (``converged`` is then False).
    failure: str | None = None


def response_failure(objective: ResponseObjective, theta: Tensor, grad_norm: float,
                     initial_grad_norm: float) -> str | None:
    """Why ``theta`` is not an answer to ``objective`` — a diverged solve — or None.

    A solve from ``θˢ`` that ends with a gradient norm above the one it started
    from at ``θˢ``, with the objective above ``F(θˢ)``, or with anything
    non-finite has not found a minimiser near ``θˢ``: on a net with kinks the
    PBRF objective is only piecewise smooth and, with the removed row's own
    Bregman term cancelling most of its loss term's curvature, unbounded below
    far from ``θˢ``, where a quasi-Newton solve can run off to. A rise within
    the objective's rounding (:meth:`ResponseObjective.value_noise`: a removed
    row already fitted, whose response is at rounding) is not one.

    Parameters
    ----------
    objective : ResponseObjective
        The objective solved.
    theta : Tensor
        Where the solve ended.
    grad_norm, initial_grad_norm : float
        ``‖∇F‖`` there and at ``θˢ``.

    Returns
    -------
    str or None
        The failure in words (with the numbers), None for a sound point.
    """
    if not (np.isfinite(grad_norm) and bool(torch.isfinite(theta).all())):
        return "the solve produced non-finite values"
    change = objective.change(theta)
    if not np.isfinite(change):
        return "the objective is not finite where the solve ended"
    if grad_norm > initial_grad_norm:
        return (f"the gradient norm grew from {initial_grad_norm:.3e} at θˢ to "
                f"{grad_norm:.3e} ({grad_norm / max(initial_grad_norm, 1e-300):.3g} times)")
    if change > objective.value_noise():
        return f"the objective rose above its value at θˢ (by {change:.3e})"
    return None


def check_response(objective: ResponseObjective, result: MinimizeResult) -> MinimizeResult:
    """``result``, marked not converged with its :func:`response_failure` if it has one.

    The guard every PBRF solve passes before its answer is returned: a diverged
    point is never reported converged.
    """
    failure = response_failure(objective, result.theta, result.grad_norm,
                               result.initial_grad_norm)
    if failure is None:
        return result
    return replace(result, converged=False, failure=failure)


def flag_diverged(objective: ResponseObjective, failed: MinimizeResult, retried: MinimizeResult,
                  fallback: Tensor, seconds: float) -> MinimizeResult:
    """The answer of a removal whose solve and one-at-a-time retry both diverged.

    Not converged, ``method="diverged"``, ``failure`` naming both failures,
    at ``fallback`` (e.g. where the diverged solve started) if it passes
    :func:`response_failure` with a gradient norm below the initial one, else
    at ``θˢ`` — the best point known not to have diverged, never a diverged one.

    Parameters
    ----------
    objective : ResponseObjective
        The removal's objective.
    failed, retried : MinimizeResult
        The first solve and its retry from ``θˢ``, both with a ``failure``.
    fallback : Tensor
        A candidate point.
    seconds : float
        Time spent on the removal.

    Returns
    -------
    MinimizeResult
    """
    g0 = failed.initial_grad_norm
    theta, g_norm = objective.theta_s, g0
    fallback = fallback.to(objective.theta_s.dtype)
    norm = float(grad(objective)(fallback).norm())
    if norm < g0 and response_failure(objective, fallback, norm, g0) is None:
        theta, g_norm = fallback, norm
    return MinimizeResult(theta.detach().clone(), g_norm, g0, failed.n_iter + retried.n_iter,
                          False, seconds, method="diverged",
                          failure=(f"{failed.method} solve: {failed.failure}; retried from θˢ "
                                   f"({retried.method}): {retried.failure}"))


def minimize_response(objective: ResponseObjective, *, tol: float = 1e-9,
                      max_iter: int = 50, start: Tensor | None = None,
                      initial_grad_norm: float | None = None,
                      stall_window: int = STALL_WINDOW) -> MinimizeResult:
    """Minimise ``objective`` from ``θˢ`` by inexact Newton with MINRES.

    Each iteration solves ``H p = −∇`` with scipy's MINRES (symmetric, may be
    indefinite; at most ``MINRES_MAX_ITER`` steps) on exact Hessian-vector
    products, then backtracks on the gradient norm. It gives up — reporting
    not converged — when the gradient norm has not halved in
    ``STALL_WINDOW`` iterations. Function values are never compared: the changes of the
    objective are ``O(ε²)`` and drown in the rounding of its ``O(1)`` terms,
    which is what makes value-based trust-region or line-search methods
    (scipy's ``trust-ncg``, ``Newton-CG``) stop early at ~1e-9 relative
    gradient.

    Parameters
    ----------
    objective : ResponseObjective
        The objective; computations run in its model's dtype.
    tol : float, default=1e-9
        Stop when ``‖∇‖ ≤ tol · ‖∇ at θˢ‖``, or when ``‖∇‖`` is at the
        objective's rounding noise (:meth:`ResponseObjective.noise_floor`).
    max_iter : int, default=50
        Newton iterations at most.
    start : Tensor, optional
        Where to start (default ``θˢ``): a better point found by the
        batched chord iteration.
    initial_grad_norm : float, optional
        ``‖∇‖`` at ``θˢ``, the scale of ``tol``, when starting elsewhere.
    stall_window : int, default=STALL_WINDOW
        Give up when the gradient norm has not halved over this many
        iterations.

    Returns
    -------
    MinimizeResult
        Checked by :func:`check_response`: a point whose objective rose above
        ``F(θˢ)`` (a saddle or maximum the gradient-norm line search can lead
        to where the objective is not convex) is reported not converged.
    """
    began = time.perf_counter()
    theta = (objective.theta_s if start is None else start).detach().clone()
    dtype, device = theta.dtype, theta.device
    grad_fn = grad(objective)

    def gradient(th: Tensor) -> Tensor:
        return grad_fn(th).detach()

    g = gradient(theta)
    g0 = float(g.norm()) if initial_grad_norm is None else float(initial_grad_norm)
    target = max(tol * g0, objective.noise_floor())
    n_iter = 0
    history = [float(g.norm())]
    while float(g.norm()) > target and n_iter < max_iter:
        if len(history) > stall_window and history[-1] > 0.5 * history[-1 - stall_window]:
            break  # wandering (no minimiser near θˢ?): report rather than grind on
        n_iter += 1
        _, pullback = vjp(grad_fn, theta)

        def hessp(v: np.ndarray, pullback=pullback) -> np.ndarray:
            out = pullback(torch.as_tensor(v, dtype=dtype, device=device))[0]
            return out.detach().cpu().numpy().astype(np.float64)

        P = theta.numel()
        H = LinearOperator((P, P), matvec=hessp, dtype=np.float64)
        g_np = g.cpu().numpy().astype(np.float64)
        forcing = min(0.1, np.sqrt(float(g.norm()) / g0))  # superlinear inexact Newton
        p, _ = minres(H, -g_np, rtol=forcing * 1e-3, maxiter=min(10 * P, MINRES_MAX_ITER))
        step = torch.as_tensor(p, dtype=theta.dtype, device=theta.device)
        t, g_norm = 1.0, float(g.norm())
        while True:
            candidate = theta + t * step
            g_new = gradient(candidate)
            if float(g_new.norm()) < (1 - 1e-4 * t) * g_norm or t < 1e-8:
                break
            t *= 0.5
        if float(g_new.norm()) >= g_norm:  # no progress possible at this precision
            break
        theta, g = candidate, g_new
        history.append(float(g.norm()))
    g_final = float(g.norm())
    result = MinimizeResult(theta, g_final, g0, n_iter, g_final <= target,
                            time.perf_counter() - began)
    return check_response(objective, result)
