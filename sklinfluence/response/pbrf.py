"""Tight full-batch minimisation of a response objective (rung 3, the PBRF).

The proximal Bregman response function of removing ``z_m`` minimises, from
``θˢ``,

    ``(1/N) Σ_i D_L(f(θ, x_i), f(θˢ, x_i); t_i) + (μ/2)‖θ − θˢ‖²
    − ε L_m(θ) + (λ/2)‖θ − θˢ‖²``.

Its driving force ``ε ∇L_m = O(1/N)`` is tiny, so it is solved full batch with
a second-order method — inexact Newton steps solved by scipy's MINRES on exact
Hessian-vector products from :mod:`torch.func` — to a gradient norm ``tol``
times the initial one. See :func:`minimize_response` for why the
Newton loop is not scipy's ``minimize``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh, minres
from torch import Tensor
from torch.func import grad, vjp, vmap

from ..model.functional import FunctionalModel

__all__ = ["ResponseObjective", "MinimizeResult", "has_kinks", "kinked_layers", "minimize_kinked",
           "minimize_response", "minimize_responses_batched"]

#: Cap on MINRES iterations per Newton step (a well-posed step needs far fewer).
MINRES_MAX_ITER = 1000
#: Newton stops when its gradient norm has not halved over this many iterations
#: (a converging solve gains orders of magnitude per iteration near the end).
STALL_WINDOW = 5
#: Stall window of the Newton solves the batched iteration hands its stalled samples
#: to: Newton converges quadratically where the objective is smooth and convex, so two
#: iterations without halving the gradient mean a kink or non-convexity that it will
#: not get past either (ReLU digits CNN: 5 iterations, 16 s per sample, for 3.4e-3 →
#: 3.3e-3 of the initial gradient norm).
FALLBACK_STALL_WINDOW = 2
#: Previous steps the batched chord iteration mixes (Anderson acceleration).
ANDERSON_MEMORY = 5
#: Curvature pairs kept by the L-BFGS continuation of a solve stalled on kinks.
LBFGS_MEMORY = 30
#: Iterations of the L-BFGS continuation at most.
LBFGS_MAX_ITER = 1000
#: The continuation's stopping rule looks back this many iterations ...
LBFGS_WINDOW = 5
#: ... and stops where the objective fell by at most this fraction of its total
#: decrease from θˢ and ...
LBFGS_FTOL = 1e-5
#: ... the iterate moved by at most this fraction of the response ``‖θ − θˢ‖``.
#: (ReLU digits CNN, rows 0–11, against a long independent L-BFGS run: every
#: response within 0.2 % and every self-influence within 0.005 %, at 4.3 s per row;
#: with 1e-8/1e-4 over 10 iterations within 0.05 % at 27 s per row.)
LBFGS_XTOL = 1e-3
#: Layer types whose output has kinks (the PBRF objective is then piecewise smooth).
PIECEWISE_LINEAR = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.PReLU,
                    torch.nn.Hardtanh, torch.nn.Hardswish, torch.nn.Hardsigmoid,
                    torch.nn.modules.pooling._MaxPoolNd,
                    torch.nn.modules.pooling._AdaptiveMaxPoolNd)
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
    return MinimizeResult(theta, g_final, g0, n_iter, g_final <= target,
                          time.perf_counter() - began)


def kinked_layers(module: torch.nn.Module) -> list[str]:
    """Names of the layer types in ``module`` whose output has kinks (ReLU, max pooling…)."""
    names = {type(layer).__name__ for layer in module.modules()
             if isinstance(layer, PIECEWISE_LINEAR)}
    names |= {"ReLU (in TransformerEncoderLayer)" for layer in module.modules()
              if isinstance(layer, torch.nn.TransformerEncoderLayer)
              and getattr(layer, "activation_relu_or_gelu", 0) == 1}
    return sorted(names)


def has_kinks(module: torch.nn.Module) -> bool:
    """Whether ``module`` has layers with kinks (:func:`kinked_layers`)."""
    return bool(kinked_layers(module))


def _weak_wolfe(value: Callable[[float], float],
                phi: Callable[[float], tuple[float, Tensor, float]], f0: float, slope: float,
                max_evals: int = 30) -> tuple[float, float, Tensor] | None:
    """Step ``t`` along a descent direction meeting the weak Wolfe conditions.

    ``value(t)`` returns the objective and ``phi(t)`` ``(value, gradient,
    directional derivative)``; the gradient is computed only where the
    objective decreased enough (a forward pass costs a third of a forward and
    a backward one, and most trial steps on a kinked objective are refused).
    The bisection–expansion of Lewis & Overton (2013), made for nonsmooth
    objectives: sufficient decrease ``f(t) ≤ f0 + 1e-4 t slope`` and a
    directional derivative that rose to ``0.9 slope``. Returns
    ``(t, value, gradient)``, the best decreasing point if no step met both, or
    None if none decreased.
    """
    low, high, t, best = 0.0, math.inf, 1.0, None
    for _ in range(max_evals):
        f = value(t)
        if math.isfinite(f) and f <= f0 + 1e-4 * t * slope:
            f, gradient, derivative = phi(t)
        if not math.isfinite(f) or f > f0 + 1e-4 * t * slope:
            high = t
        else:
            if best is None or f < best[1]:
                best = (t, f, gradient)
            if derivative >= 0.9 * slope:
                return t, f, gradient
            low = t
        t = 0.5 * (low + high) if math.isfinite(high) else 2.0 * low
    return best


def minimize_kinked(objective: ResponseObjective, start: Tensor, *, tol: float = 1e-9,
                    initial_grad_norm: float, precondition: Callable | None = None,
                    max_iter: int | None = None) -> MinimizeResult:
    """Continue a PBRF solve that stalled on kinks: L-BFGS on the objective, float64.

    Where a ReLU (or max-pooling) unit's input crosses 0 the objective has a
    kink, its minimiser may sit on one, and Newton and chord steps — built on
    a Hessian that does not see kinks — stall short of it. L-BFGS with a weak
    Wolfe line search on the objective itself is what Lewis & Overton (2013)
    found to converge on such piecewise-smooth functions. It runs on
    :meth:`ResponseObjective.shifted` (``F(θ) − F(θˢ)``: changes of
    ``O(ε²)`` resolved, not drowned in rounding) in float64 whatever the net's
    dtype (a float32 gradient's rounding is a few percent of the PBRF's
    ``O(1/N)`` driving force), from ``start``, with ``precondition`` — the
    damped Gauss–Newton inverse ``H₀⁻¹`` the batched solves share — as its
    initial inverse Hessian (plain scaled identity without it).

    It stops when the gradient norm meets ``tol`` times
    ``initial_grad_norm`` (or the objective's rounding noise,
    :meth:`ResponseObjective.noise_floor`), or — the rule that means something at a kink,
    where the gradient need not vanish — when over the last
    :data:`LBFGS_WINDOW` iterations the objective fell by at most
    :data:`LBFGS_FTOL` of its total decrease from ``θˢ`` and the iterate
    moved by at most :data:`LBFGS_XTOL` of ``‖θ − θˢ‖``, or when not even the
    preconditioned gradient direction — a descent direction wherever the
    objective is smooth — decreases it (a minimiser on a kink, to float64's
    resolution of ``F``); these count as converged and are reported
    (``objective_decrease``, ``relative_step``). At ``max_iter`` (default
    :data:`LBFGS_MAX_ITER`) it reports not converged.
    """
    began = time.perf_counter()
    max_iter = LBFGS_MAX_ITER if max_iter is None else max_iter
    dtype = objective.theta_s.dtype
    obj = objective if dtype == torch.float64 else objective.astype(torch.float64)
    theta_s = obj.theta_s
    value_and_grad = torch.func.grad_and_value(obj.shifted)

    def evaluate(theta: Tensor) -> tuple[float, Tensor]:
        g, f = value_and_grad(theta)
        return float(f), g.detach()

    theta = start.detach().to(torch.float64).clone()
    f, g = evaluate(theta)
    target = max(tol * float(initial_grad_norm), obj.noise_floor())
    pairs: list[tuple[Tensor, Tensor, float]] = []
    values, moves = [f], []
    n_iter, converged, decrease, step_ratio = 0, False, None, None
    while n_iter < max_iter:
        if float(g.norm()) <= target:
            converged = True
            break
        # two-loop recursion, initial inverse Hessian H₀⁻¹ (or a scaled identity)
        q, alphas = g.clone(), []
        for s_, y_, rho in reversed(pairs):
            a = rho * float(s_ @ q)
            alphas.append(a)
            q -= a * y_
        if precondition is not None:
            r = precondition(q.unsqueeze(0))[0].to(torch.float64)
        elif pairs:
            s_, y_, _ = pairs[-1]
            r = (float(s_ @ y_) / float(y_ @ y_)) * q
        else:  # the Hessian is about G + μ + λ ≥ μ + λ: a step no longer than q/(μ + λ)
            r = q / max(float(obj.model.damped_diagonal(obj.damping).max()), 1e-12)
        for (s_, y_, rho), a in zip(pairs, reversed(alphas)):
            r += (a - rho * float(y_ @ r)) * s_
        direction = -r
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction: forget the curvature pairs
            pairs.clear()
            direction = -g if precondition is None else \
                -precondition(g.unsqueeze(0))[0].to(torch.float64)
            slope = float(g @ direction)

        def value(t: float, theta=theta, direction=direction) -> float:
            with torch.no_grad():
                return float(obj.shifted(theta + t * direction))

        def phi(t: float, theta=theta, direction=direction) -> tuple[float, Tensor, float]:
            f_t, gradient = evaluate(theta + t * direction)
            return f_t, gradient, float(gradient @ direction)

        found = _weak_wolfe(value, phi, f, slope)
        if found is None and pairs:  # the curvature pairs misled it: once more without
            pairs.clear()
            continue
        if found is None:  # no decrease even along the (preconditioned) gradient, a
            # descent direction wherever F is smooth, down to 2⁻³⁰ of a Newton-sized step:
            # a minimiser on a kink, to float64's resolution of F
            if n_iter:
                back = min(n_iter, LBFGS_WINDOW)
                decrease = (values[-1 - back] - f) / max(-f, 1e-300)
            converged = True
            break
        t, f_new, g_new = found
        s_vec, y_vec = t * direction, g_new - g
        curvature = float(s_vec @ y_vec)
        if curvature > 1e-12 * float(s_vec.norm()) * float(y_vec.norm()):
            pairs.append((s_vec, y_vec, 1.0 / curvature))
            del pairs[:-LBFGS_MEMORY]
        theta, f, g = theta + s_vec, f_new, g_new
        n_iter += 1
        values.append(f)
        moves.append(float(s_vec.norm()))
        if n_iter >= LBFGS_WINDOW:
            total = max(-f, 1e-300)  # F(θˢ) − F(θ): the decrease so far
            decrease = (values[-1 - LBFGS_WINDOW] - f) / total
            step_ratio = sum(moves[-LBFGS_WINDOW:]) / max(float((theta - theta_s).norm()),
                                                          1e-300)
            if decrease <= LBFGS_FTOL and step_ratio <= LBFGS_XTOL:
                converged = True
                break
    return MinimizeResult(theta.to(dtype), float(g.norm()), float(initial_grad_norm), n_iter,
                          converged, time.perf_counter() - began, method="lbfgs",
                          objective_decrease=decrease, relative_step=step_ratio)


def _anderson(Theta: Tensor, F: Tensor, hist_T: list[Tensor], hist_F: list[Tensor]) -> Tensor:
    """Anderson-mixed iterate ``θ + f − (ΔΘ + ΔF) γ``, ``γ = argmin ‖f − ΔF γ‖``, per row.

    ``hist_T``/``hist_F`` hold the previous iterates and chord steps of the
    same rows, oldest first; without history it is the plain chord step.
    """
    if not hist_T:
        return Theta + F
    thetas, steps = hist_T + [Theta], hist_F + [F]
    dT = torch.stack([b - a for a, b in zip(thetas[:-1], thetas[1:])], dim=2)  # (B, P, m)
    dF = torch.stack([b - a for a, b in zip(steps[:-1], steps[1:])], dim=2)
    gram = dF.transpose(1, 2) @ dF  # (B, m, m)
    ridge = 1e-12 * gram.diagonal(dim1=1, dim2=2).sum(1).clamp_min(
        torch.finfo(F.dtype).tiny)
    gram = gram + ridge[:, None, None] * torch.eye(gram.shape[1], dtype=F.dtype,
                                                    device=F.device)
    gamma = torch.linalg.solve(gram, (dF.transpose(1, 2) @ F.unsqueeze(2)))  # (B, m, 1)
    return Theta + F - ((dT + dF) @ gamma).squeeze(2)


def minimize_responses_batched(objective: ResponseObjective, xs: Tensor, ts: Tensor,
                               ws: Tensor, solve: Callable[[Tensor], Tensor], *,
                               tol: float = 1e-9, max_iter: int = 50,
                               precondition: Callable[[Tensor], Tensor] | None = None
                               ) -> list[MinimizeResult]:
    """Minimise the objectives of several removals at once (Anderson-accelerated chord).

    Every removal's PBRF has, at ``θˢ``, the Hessian
    ``H₀ − ε Σ_S w_m ∇²L_m`` with ``H₀ = G + μI + λI`` the damped Gauss–Newton
    matrix — the same ``H₀`` for all removals, which ``solve`` applies (a
    Cholesky factor, the kernel form or batched CG, shared with the
    influence rungs). The chord step

        ``f(θ) = −H₀⁻¹ ∇F_m(θ)``

    for all samples at once (the gradients vectorised over a stack of
    parameter copies with :func:`torch.func.vmap`) is mixed with the last
    ``ANDERSON_MEMORY`` steps of the same sample (Anderson acceleration, the
    nonlinear counterpart of GMRES on the preconditioned system): the plain
    chord iteration converges only at the rate
    ``‖I − H₀⁻¹ ∇²F_m‖ = O(ε ‖∇²L_m‖ / (λ + μ))`` and diverges where that
    exceeds 1 (small damping, high-loss samples), which the mixing repairs
    while the departure of ``∇²F_m`` from ``H₀`` has few large directions.
    A sample whose best gradient norm has not halved in ``STALL_WINDOW``
    iterations is first checked for negative curvature of ``∇²F_m(θˢ)`` in
    the span of the directions the iteration took (Rayleigh–Ritz, at most
    ``ANDERSON_MEMORY + 1`` Hessian-vector products): a negative Ritz value
    proves the objective non-convex at ``θˢ``, and the sample is reported
    not converged at its best point, with that value (an upper bound on the
    lowest eigenvalue) as ``lowest_curvature``. Otherwise it is handed to
    :func:`minimize_response` from its best point (giving up after
    ``FALLBACK_STALL_WINDOW`` iterations without halving the gradient), so
    every answer is the one-at-a-time answer to within ``tol`` — or, on a net
    with kinks (ReLU, max pooling), to :func:`minimize_kinked`, L-BFGS on
    the objective preconditioned by ``precondition``, whose stopping rule
    holds at a minimiser on a kink.

    Parameters
    ----------
    objective : ResponseObjective
        Defines everything but the removal (its ``X_S``/``T_S``/``w_S`` are
        ignored).
    xs, ts, ws : Tensor
        The removals' rows, targets and weights, stacked: ``(B, k, ...)`` and
        ``(B, k)``, smaller removals padded with rows of weight 0.
    solve : callable
        ``solve(B)`` returns ``H₀⁻¹`` applied to each row of ``B``.
    tol, max_iter
        As for :func:`minimize_response`.
    precondition : callable, optional
        A cheaper approximation of ``solve`` for the L-BFGS continuation
        (called once or twice per iteration, where a preconditioner need not
        be exact: on the ReLU digits CNN the mixed-precision kernel's float32
        factor without refinement costs 0.03 s per application, refined 0.25 s);
        ``solve`` by default.

    Returns
    -------
    list of MinimizeResult
        One per removed sample, in order.
    """
    start = time.perf_counter()
    B = xs.shape[0]
    theta_s = objective.theta_s.detach()
    grad_one = grad(objective.evaluate)
    batched_grad = vmap(grad_one)

    def hvp_one(theta: Tensor, v: Tensor, x: Tensor, t: Tensor, w: Tensor) -> Tensor:
        return vjp(lambda p: grad_one(p, x, t, w), theta)[1](v)[0]

    Theta = theta_s.expand(B, -1).clone()
    G = batched_grad(Theta, xs, ts, ws).detach()
    g0 = G.norm(dim=1)
    # noise floors (ResponseObjective.noise_floor), a quarter of the batch at a time: a
    # Hessian-vector product holds half again a gradient's activations
    floor = 10 * torch.finfo(theta_s.dtype).eps * torch.cat([
        vmap(hvp_one)(Theta[s], Theta[s], xs[s], ts[s], ws[s]).detach().norm(dim=1)
        for s in (slice(i, i + max(1, B // 4)) for i in range(0, B, max(1, B // 4)))])
    target = torch.maximum(tol * g0, floor)
    best, best_norm = Theta.clone(), g0.clone()
    history = [g0.clone()]  # best norm after each iteration
    n_iter = torch.zeros(B, dtype=torch.long)
    fallback = torch.zeros(B, dtype=torch.bool)
    # previous iterates and chord steps, a ring of ANDERSON_MEMORY slots per sample:
    # the active samples have all been active since the start, so share the order
    hist_T = Theta.new_zeros(ANDERSON_MEMORY, *Theta.shape)
    hist_F = torch.zeros_like(hist_T)
    for k in range(max_iter):
        if len(history) > STALL_WINDOW:  # best norm not halved over the window
            fallback |= (best_norm > 0.5 * history[-1 - STALL_WINDOW]) & (best_norm > target)
        active = torch.nonzero((best_norm > target) & ~fallback).flatten()
        if not active.numel():
            break
        F = -solve(G[active]).to(Theta.dtype)
        order = [(k - n) % ANDERSON_MEMORY for n in range(min(k, ANDERSON_MEMORY), 0, -1)]
        candidate = _anderson(Theta[active], F, [hist_T[i, active] for i in order],
                              [hist_F[i, active] for i in order])
        hist_T[k % ANDERSON_MEMORY, active] = Theta[active]
        hist_F[k % ANDERSON_MEMORY, active] = F
        g_new = batched_grad(candidate, xs[active], ts[active], ws[active]).detach()
        new_norms = g_new.norm(dim=1)
        finite = torch.isfinite(new_norms)
        Theta[active[finite]], G[active[finite]] = candidate[finite], g_new[finite]
        fallback[active[~finite]] = True
        better = finite & (new_norms < best_norm[active])
        best[active[better]], best_norm[active[better]] = candidate[better], new_norms[better]
        n_iter[active] += 1
        history.append(best_norm.clone())
    seconds = (time.perf_counter() - start) / B
    results = []
    kinked = objective.bregman and has_kinks(objective.model.module)
    for b in range(B):
        g = float(best_norm[b])
        if g > float(target[b]):
            # Rayleigh–Ritz for ∇²F(θˢ) on the directions the iteration took: a negative
            # Ritz value proves the objective non-convex at θˢ (an upper bound on its
            # lowest eigenvalue), where Newton from θˢ would wander as the chord did
            directions = torch.cat([(best[b] - theta_s).unsqueeze(0), hist_F[:, b]])
            Q, R = torch.linalg.qr(directions.T)  # slots never written are zero columns
            pivots = R.diagonal().abs()
            Q = Q[:, pivots > 1e-8 * float(pivots.max())].T
            if Q.shape[0]:
                HQ = vmap(hvp_one, in_dims=(None, 0, None, None, None))(
                    theta_s, Q, xs[b], ts[b], ws[b]).detach()
                small = Q @ HQ.T
                rayleigh = float(torch.linalg.eigvalsh(0.5 * (small + small.T))[0])
                if rayleigh < 0:
                    results.append(MinimizeResult(best[b].clone(), g, float(g0[b]),
                                                  int(n_iter[b]), False, seconds, rayleigh))
                    continue
            single = ResponseObjective(objective.model, objective.X, objective.T, theta_s,
                                       xs[b], ts[b], ws[b], objective.epsilon,
                                       objective.damping, objective.bregman)
            if kinked:  # Newton's Hessian does not see the kinks it stalls on
                results.append(minimize_kinked(single, best[b], tol=tol,
                                               initial_grad_norm=float(g0[b]),
                                               precondition=precondition or solve))
                continue
            results.append(minimize_response(single, tol=tol, max_iter=max_iter,
                                             start=best[b], initial_grad_norm=float(g0[b]),
                                             stall_window=FALLBACK_STALL_WINDOW))
        else:
            results.append(MinimizeResult(best[b].clone(), g, float(g0[b]), int(n_iter[b]),
                                          True, seconds, method="chord"))
    return results
