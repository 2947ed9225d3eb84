"""The PBRF on nets with kinks (ReLU, max pooling): an L-BFGS continuation.

Where the objective is only piecewise smooth, Newton's quadratic model is
wrong across a kink and its solve stalls; :func:`minimize_kinked` continues
from the stalled point with L-BFGS (weak Wolfe line search, value-only trial
steps, the solver's cheap inverse as preconditioner) to a stopping rule on
the objective's decrease and the iterate's movement.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from .pbrf import (MinimizeResult, ResponseObjective, check_response, flag_diverged,
                   minimize_response)

__all__ = ["PIECEWISE_LINEAR", "has_kinks", "kinked_layers", "minimize_kinked",
           "minimize_from_start"]

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
#: Longest step of the continuation, relative to the larger of the response so far
#: ``‖θ − θˢ‖`` and its first (preconditioned gradient) step. The PBRF objective can
#: be unbounded below far from ``θˢ``: the removed row's own Bregman term cancels its
#: loss term's curvature (what remains is linear in its logits), and a deep ReLU net's
#: logits grow like a product of layers' weights, faster than the quadratic proximity.
#: A line search expanding along such a direction (to 2²⁹ times the step), or an
#: L-BFGS direction built on nearly flat curvature pairs, jumps there in one step.
LBFGS_MAX_STEP = 1.0
#: The continuation gives up (not converged; the divergence guard takes over) once its
#: gradient norm exceeds this multiple of the initial one: it has left ``θˢ``'s
#: neighbourhood for a region where the objective falls without end (ResNet above: from
#: 1e3 times on, the gradient grew to 1e22 times over the next 270 iterations).
LBFGS_DIVERGED = 1e3
#: Layer types whose output has kinks (the PBRF objective is then piecewise smooth).
PIECEWISE_LINEAR = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.PReLU,
                    torch.nn.Hardtanh, torch.nn.Hardswish, torch.nn.Hardsigmoid,
                    torch.nn.modules.pooling._MaxPoolNd,
                    torch.nn.modules.pooling._AdaptiveMaxPoolNd)


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
                max_evals: int = 30, max_t: float = math.inf
                ) -> tuple[float, float, Tensor] | None:
    """Step ``t`` along a descent direction meeting the weak Wolfe conditions.

    ``value(t)`` returns the objective and ``phi(t)`` ``(value, gradient,
    directional derivative)``; the gradient is computed only where the
    objective decreased enough (a forward pass costs a third of a forward and
    a backward one, and most trial steps on a kinked objective are refused).
    The bisection–expansion of Lewis & Overton (2013), made for nonsmooth
    objectives: sufficient decrease ``f(t) ≤ f0 + 1e-4 t slope`` and a
    directional derivative that rose to ``0.9 slope``; the expansion stops at
    ``max_t``. Returns ``(t, value, gradient)``, the best decreasing point if no
    step met both, or None if none decreased.
    """
    low, high, t, best = 0.0, math.inf, min(1.0, max_t), None
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
            if t >= max_t:  # as long a step as allowed
                return best
            low = t
        t = 0.5 * (low + high) if math.isfinite(high) else min(2.0 * low, max_t)
    return best


def minimize_kinked(objective: ResponseObjective, start: Tensor, *, tol: float = 1e-9,
                    initial_grad_norm: float, precondition: Callable | None = None,
                    max_iter: int | None = None, retry: bool = True) -> MinimizeResult:
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

    The objective can be unbounded below far from ``θˢ`` (where a removed
    row's loss grows without end), so no step is longer than
    :data:`LBFGS_MAX_STEP` times the larger of ``‖θ − θˢ‖`` and the first
    step, and the continuation gives up once its gradient norm exceeds
    :data:`LBFGS_DIVERGED` times ``initial_grad_norm``. Its answer
    passes :func:`~sklinfluence.response.pbrf.check_response`: one whose
    gradient norm ended above ``initial_grad_norm``, or whose objective rose
    above ``F(θˢ)``, is solved again from ``θˢ`` (with ``retry``, where
    ``start`` is elsewhere) and, if that fails the check too, reported not
    converged with ``method="diverged"`` at ``start`` or ``θˢ``
    (:func:`~sklinfluence.response.pbrf.flag_diverged`); without ``retry``,
    not converged with its ``failure``.
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
    first_step = None  # the first direction's length: the scale of the step cap
    n_iter, converged, decrease, step_ratio = 0, False, None, None
    while n_iter < max_iter:
        if float(g.norm()) <= target:
            converged = True
            break
        if float(g.norm()) > LBFGS_DIVERGED * float(initial_grad_norm):
            break  # left θˢ's neighbourhood: check_response below says so
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
        length = float(direction.norm())
        if first_step is None:
            first_step = length
        radius = LBFGS_MAX_STEP * max(float((theta - theta_s).norm()), first_step)
        max_t = radius / length if length > 0 else math.inf

        def value(t: float, theta=theta, direction=direction) -> float:
            with torch.no_grad():
                return float(obj.shifted(theta + t * direction))

        def phi(t: float, theta=theta, direction=direction) -> tuple[float, Tensor, float]:
            f_t, gradient = evaluate(theta + t * direction)
            return f_t, gradient, float(gradient @ direction)

        found = _weak_wolfe(value, phi, f, slope, max_t=max_t)
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
    result = check_response(obj, MinimizeResult(
        theta, float(g.norm()), float(initial_grad_norm), n_iter, converged,
        time.perf_counter() - began, method="lbfgs", objective_decrease=decrease,
        relative_step=step_ratio))
    if result.failure is not None and retry and not torch.equal(start.to(theta_s), theta_s):
        retried = minimize_kinked(objective, objective.theta_s, tol=tol,
                                  initial_grad_norm=initial_grad_norm,
                                  precondition=precondition, max_iter=max_iter, retry=False)
        seconds = time.perf_counter() - began
        if retried.failure is None:
            return replace(retried, seconds=seconds)
        result = flag_diverged(obj, result, retried, start, seconds)
    return replace(result, theta=result.theta.to(dtype), seconds=time.perf_counter() - began)


def minimize_from_start(objective: ResponseObjective, *, tol: float = 1e-9, max_iter: int = 50,
                        precondition: Callable | None = None) -> MinimizeResult:
    """The one-at-a-time PBRF solve from ``θˢ``: what a solve that diverged is retried with.

    On a net with kinks (Bregman objective) :func:`minimize_kinked` from
    ``θˢ``, with ``precondition`` (the shared damped Gauss–Newton inverse) as
    its initial inverse Hessian; elsewhere inexact Newton
    (:func:`~sklinfluence.response.pbrf.minimize_response`) from ``θˢ`` with
    its full stall window. Both answers pass
    :func:`~sklinfluence.response.pbrf.check_response`.

    Parameters
    ----------
    objective : ResponseObjective
        One removal's objective.
    tol, max_iter
        As for :func:`~sklinfluence.response.pbrf.minimize_response`
        (``max_iter`` bounds Newton; the continuation has its own cap,
        :data:`LBFGS_MAX_ITER`).
    precondition : callable, optional
        ``H₀⁻¹`` applied to the rows of its argument.

    Returns
    -------
    MinimizeResult
    """
    g0 = float(torch.func.grad(objective)(objective.theta_s).norm())
    if objective.bregman and has_kinks(objective.model.module):
        return minimize_kinked(objective, objective.theta_s, tol=tol, initial_grad_norm=g0,
                               precondition=precondition)
    return minimize_response(objective, tol=tol, max_iter=max_iter, initial_grad_norm=g0)
