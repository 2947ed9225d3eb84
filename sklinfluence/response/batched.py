"""Many PBRF responses at once: a chord iteration with one shared factor."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from .kinks import has_kinks, minimize_from_start, minimize_kinked
from .pbrf import (STALL_WINDOW, MinimizeResult, ResponseObjective, check_response,
                   flag_diverged, minimize_response)

__all__ = ["minimize_responses_batched"]

#: Stall window of the Newton solves the batched iteration hands its stalled samples
#: to: Newton converges quadratically where the objective is smooth and convex, so two
#: iterations without halving the gradient mean a kink or non-convexity that it will
#: not get past either (ReLU digits CNN: 5 iterations, 16 s per sample, for 3.4e-3 →
#: 3.3e-3 of the initial gradient norm).
FALLBACK_STALL_WINDOW = 2
#: Previous steps the batched chord iteration mixes (Anderson acceleration).
ANDERSON_MEMORY = 5


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

    Every answer then passes :func:`~sklinfluence.response.pbrf.check_response`:
    one whose gradient norm ended above its initial one, or whose objective
    rose above ``F(θˢ)``, is never returned as it is. It is solved again one at
    a time from ``θˢ`` (:func:`~sklinfluence.response.kinks.minimize_from_start`,
    preconditioned alike); if that fails the check too,
    the removal is reported not converged with ``method="diverged"``, its
    ``failure`` saying what went wrong both times, at the best point that
    passes the check (the chord iteration's best, else ``θˢ``).

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
    results, best = _solve_batch(objective, xs, ts, ws, solve, tol=tol, max_iter=max_iter,
                                 precondition=precondition)
    return [_guarded(_single(objective, xs[b], ts[b], ws[b]), result, best[b],
                     precondition or solve, tol=tol, max_iter=max_iter)
            for b, result in enumerate(results)]


def _single(objective: ResponseObjective, x: Tensor, t: Tensor, w: Tensor) -> ResponseObjective:
    """The objective of one removal of a batch."""
    return objective.for_removal(x, t, w)


def _guarded(single: ResponseObjective, result: MinimizeResult, fallback: Tensor,
             precondition: Callable[[Tensor], Tensor], *, tol: float,
             max_iter: int) -> MinimizeResult:
    """``result`` if it passes :func:`check_response`; else the one-at-a-time solve from
    ``θˢ`` if that passes; else ``fallback`` (the chord iteration's best point) if it
    passes, or ``θˢ``, flagged ``"diverged"`` (:func:`flag_diverged`). The L-BFGS
    continuation retries and flags its own (:func:`minimize_kinked`)."""
    if result.method == "diverged":
        return result
    if result.failure is None:
        result = check_response(single, result)
        if result.failure is None:
            return result
    retried = minimize_from_start(single, tol=tol, max_iter=max_iter, precondition=precondition)
    seconds = result.seconds + retried.seconds
    if retried.failure is None or retried.method == "diverged":
        return replace(retried, seconds=seconds)
    return flag_diverged(single, result, retried, fallback, seconds)


def _solve_batch(objective: ResponseObjective, xs: Tensor, ts: Tensor, ws: Tensor,
                 solve: Callable[[Tensor], Tensor], *, tol: float, max_iter: int,
                 precondition: Callable[[Tensor], Tensor] | None
                 ) -> tuple[list[MinimizeResult], Tensor]:
    """The chord iteration and its hand-overs (:func:`minimize_responses_batched`), before
    the results are checked; with the chord iteration's best point of each removal."""
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
                                                  int(n_iter[b]), False, seconds, rayleigh,
                                                  method="chord"))
                    continue
            single = _single(objective, xs[b], ts[b], ws[b])
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
    return results, best
