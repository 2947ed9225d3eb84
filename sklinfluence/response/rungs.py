"""The rungs of the response ladder, each a small class.

The mathematics is on the Theory page of the documentation, sections "The
response ladder" and "Removing groups of rows".

Every rung answers "what are the parameters after this removal?" by
minimising

    ``(1/N) Σ_i ℓ_i(θ) + decay − ε Σ_{m∈S} L_m(θ) + [proximal] (λ/2)‖θ − θˢ‖²``

from a start point, where ``ℓ_i`` is the training loss or its Bregman
divergence around ``θˢ``:

=================  =========  =======  ========  ==================
rung               start      Bregman  proximal  class
=================  =========  =======  ========  ==================
cold_start_loo     θ⁰         no       no        :class:`Retrain`
warm_start         θˢ         no       no        :class:`Retrain`
proximal           θˢ         no       yes       :class:`Retrain`
pbrf               θˢ         yes      yes       :class:`Minimize`
exact_influence    θˢ         yes      yes       :class:`Linear` (exact)
influence          θˢ         yes      yes       :class:`Linear`
=================  =========  =======  ========  ==================

A rung owns what determines its answers (:meth:`Rung.key_parts`, part of
the cache key), what it accepts (:meth:`Rung.check`), how one removal is
computed (:meth:`Rung.compute`, run in joblib workers) and, optionally, how
several are computed at once (:meth:`Rung.plan`). The
:class:`~sklinfluence.response.responder.Responder` does the rest — caching in memory
and on disk, batching, parallel execution, resuming — the same way for every
rung. :class:`Linear` rungs are closed forms, computed for all removals in one
solve and never cached.

Adding a rung is one small class and a row of :data:`LADDER`; the developer
guide (``docs/developers.rst``) shows the smallest real one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from . import kinks
from ..utils._warnings import describe_removal, naming_right_hand_sides, removal_names
from .context import ResponseContext
from ..model.functional import FunctionalModel
from .batched import minimize_responses_batched
from .kinks import has_kinks, minimize_kinked
from .pbrf import MinimizeResult, ResponseObjective, minimize_response
from ..model.removal import Removal, single_rows, stacked_rows

__all__ = ["Rung", "Retrain", "Minimize", "Linear", "LADDER", "TERMS", "rung", "removal_forces",
           "compute_each", "compute_pbrf_batch", "compute_retrain_batch", "ResponderLike"]


class ResponderLike(Protocol):
    """What a rung uses of the :class:`~sklinfluence.response.responder.Responder` that computes
    it (declared here, so that this module need not import that one)."""

    context: ResponseContext

    def solver(self, exact: bool = False) -> Any:
        """The linear solver of the exact rung (``exact``) or of the configured one."""

    def chord_solver(self) -> Any:
        """The factor the batched PBRF solves share."""


@dataclass(frozen=True)
class Rung:
    """One configuration of the response objective (a row of the ladder's table).

    Subclasses say how a removal's response is computed. Attributes are the
    objective's switches.
    """

    name: str
    start: str = "trained"  # "initial" (θ⁰) or "trained" (θˢ)
    bregman: bool = False
    proximal: bool = False

    #: Whether responses are closed forms of the whole batch (no cache, no workers).
    closed_form = False

    def key_parts(self, ctx: ResponseContext) -> list:
        """What, besides the data, parameters, loss, architecture and ``ε``, determines
        this rung's responses (part of the cache key)."""
        return [ctx.damping] if self.proximal else []

    def key_tensors(self, ctx: ResponseContext) -> list[Tensor]:
        """Tensors, besides ``θˢ`` and the data, that determine the responses."""
        return []

    def check(self, ctx: ResponseContext, removals: list[Removal]) -> None:
        """Refuse removals this rung cannot compute (before any work)."""

    def compute(self, ctx: ResponseContext, removal: Removal) -> tuple[Tensor, dict]:
        """One removal's response ``θ_after − θˢ`` and its diagnostics (``seconds`` at least)."""
        raise NotImplementedError  # pragma: no cover

    def plan(self, responder: ResponderLike) -> tuple[Callable, int]:
        """The function that computes a list of removals, and how many it takes at once
        (default: :meth:`compute` on one removal at a time)."""
        return partial(compute_each, responder.context, self), 1

    def stopped_short(self, ctx: ResponseContext, stopped: list, n: int) -> str:
        """The warning for the removals of a call whose computation did not converge
        (``info["converged"]`` False): ``stopped`` holds their ``(removal, info)``
        pairs, of ``n`` computed. Rungs whose computations can stop short say why."""
        removal, _ = stopped[0]
        return (f"{len(stopped)} of {n} {self.name} computations did not converge; the "
                f"first, for the removal of {describe_removal(removal)}.")


def compute_each(ctx: ResponseContext, r: Rung, removals: list[Removal]) -> list:
    """``r.compute`` for each removal (module level, so joblib can ship it)."""
    return [r.compute(ctx, removal) for removal in removals]


def _proximity(ctx: ResponseContext, removal: Removal) -> float:
    """``λN/(N − |S|)``: the recipe on the remaining rows then differs from rung 1 by
    exactly ``(λ/2)‖θ − θˢ‖²``."""
    n = int(ctx.X.shape[0])
    return ctx.damping * n / (n - removal.size)


def _objective(ctx: ResponseContext, removal: Removal, damping: float,
               bregman: bool) -> ResponseObjective:
    objective = ResponseObjective(ctx.model, ctx.X, ctx.T, ctx.model.params, removal.X,
                                  removal.T, ctx.X.new_ones(removal.size), ctx.epsilon,
                                  damping, bregman)
    # the PBRF's driving force ε∇L_m is O(1/N): a float32 net's gradient rounding is a
    # few percent of it, so its PBRF is solved on a float64 copy of the net
    if bregman and ctx.model.dtype != torch.float64:
        return objective.astype(torch.float64)
    return objective


@dataclass(frozen=True)
class Retrain(Rung):
    """Rungs 0–2: the net's own recipe on the rows that remain.

    Cold (from ``θ⁰`` with the original seed) or warm (from ``θˢ``, for
    ``warm_start_epochs``), optionally with the proximity term. Convex
    baselines whose refit is exact minimise the proximal rung exactly
    instead (``recipe.exact_proximal``). Removals must be training rows;
    several of the same size retrain at once as a vectorised
    ensemble when the recipe can be replayed (:mod:`sklinfluence.model.ensemble`).
    """

    def key_parts(self, ctx: ResponseContext) -> list:
        parts = super().key_parts(ctx)
        if self.proximal and ctx.recipe.exact_proximal:
            parts += [ctx.pbrf_tol, ctx.pbrf_max_iter]
        epochs = ctx.max_epochs if self.start == "initial" else ctx.warm_start_epochs
        return parts + [ctx.seed, epochs, ctx.recipe.recipe_key()]

    def key_tensors(self, ctx: ResponseContext) -> list[Tensor]:
        return [ctx.theta_0] if self.start == "initial" and ctx.theta_0 is not None else []

    def check(self, ctx: ResponseContext, removals: list[Removal]) -> None:
        outside = sum(1 for removal in removals for i in removal.index if i < 0)
        if outside:
            raise ValueError(
                f"the {self.name} rung retrains without the removed rows, so it can only "
                f"remove training rows; {outside} of the given rows are not training rows "
                "(with these targets).")
        n = int(ctx.X.shape[0])
        if any(n - len(set(removal.index)) < 1 for removal in removals):
            raise ValueError(f"the {self.name} rung needs at least one remaining training row.")

    def start_point(self, ctx: ResponseContext) -> Tensor:
        """``θ⁰`` for a cold start (refused when the net did not record it), else ``θˢ``."""
        if self.start == "initial":
            if ctx.theta_0 is None and ctx.recipe.needs_initial_params:
                raise ValueError(
                    "cold-start leave-one-out retrains from the original initialisation θ⁰, "
                    "which a FrozenEstimator net does not record. Pass the unfitted net so "
                    "the estimator trains it, or use warm_start=True.")
            if ctx.theta_0 is not None:
                return ctx.theta_0
        return ctx.model.params

    def epochs(self, ctx: ResponseContext) -> int:
        return ctx.max_epochs if self.start == "initial" else ctx.warm_start_epochs

    def compute(self, ctx: ResponseContext, removal: Removal) -> tuple[Tensor, dict]:
        theta_s = ctx.model.params
        start = time.perf_counter()
        if self.proximal and ctx.recipe.exact_proximal:  # convex baselines: minimise exactly
            result = minimize_response(_objective(ctx, removal, ctx.damping, bregman=False),
                                       tol=ctx.pbrf_tol, max_iter=ctx.pbrf_max_iter)
            return result.theta - theta_s, {"seconds": time.perf_counter() - start}
        keep = ~torch.isin(torch.arange(ctx.X.shape[0], device=ctx.X.device),
                           torch.as_tensor(removal.index, device=ctx.X.device))
        theta = ctx.recipe.retrain(
            ctx.X[keep], ctx.T[keep], start=self.start_point(ctx), seed=ctx.seed,
            max_epochs=self.epochs(ctx), anchor=theta_s,
            proximity=_proximity(ctx, removal) if self.proximal else 0.0)
        return theta.to(theta_s.dtype) - theta_s, {"seconds": time.perf_counter() - start}

    def plan(self, responder: ResponderLike) -> tuple[Callable, int]:
        ctx = responder.context
        if ctx.removal_batch_size > 1 and not (self.proximal and ctx.recipe.exact_proximal) \
                and ctx.recipe.can_retrain_batch(ctx.model):
            return partial(compute_retrain_batch, ctx, self), ctx.removal_batch_size
        return super().plan(responder)


def compute_retrain_batch(ctx: ResponseContext, r: Retrain, removals: list[Removal]) -> list:
    """Retraining responses of several removals at once (vectorised ensembles, one per
    removal size)."""
    start_time = time.perf_counter()
    theta_s = ctx.model.params
    out: dict = {}
    for size in dict.fromkeys(removal.size for removal in removals):
        same = [i for i, removal in enumerate(removals) if removal.size == size]
        stack = ctx.recipe.retrain_batch(
            ctx.model, ctx.X, ctx.T, [removals[i].index for i in same],
            start=r.start_point(ctx), seed=ctx.seed, max_epochs=r.epochs(ctx), anchor=theta_s,
            proximity=_proximity(ctx, removals[same[0]]) if r.proximal else 0.0)
        out.update(zip(same, stack))
    seconds = (time.perf_counter() - start_time) / len(removals)
    return [(out[i].to(theta_s.dtype) - theta_s, {"seconds": seconds})
            for i in range(len(removals))]


@dataclass(frozen=True)
class Minimize(Rung):
    """Rung 3, the PBRF: the objective minimised full batch to a tight tolerance.

    One removal at a time by inexact Newton (:func:`~.pbrf.minimize_response`),
    or several at once by the chord iteration with the shared damped
    Gauss–Newton factor (:func:`~.batched.minimize_responses_batched`).
    """

    def key_parts(self, ctx: ResponseContext) -> list:
        return super().key_parts(ctx) + [ctx.pbrf_tol, ctx.pbrf_max_iter]

    def damping(self, ctx: ResponseContext) -> float:
        return ctx.damping if self.proximal else 0.0

    def compute(self, ctx: ResponseContext, removal: Removal) -> tuple[Tensor, dict]:
        start = time.perf_counter()
        objective = _objective(ctx, removal, self.damping(ctx), self.bregman)
        result = minimize_response(objective, tol=ctx.pbrf_tol, max_iter=ctx.pbrf_max_iter)
        if not result.converged and self.bregman and has_kinks(ctx.model.module):
            result = minimize_kinked(objective, result.theta, tol=ctx.pbrf_tol,
                                     initial_grad_norm=result.initial_grad_norm)
        if result.failure is not None and result.method != "diverged":
            # Newton from θˢ diverged (its own start: nothing to retry): flag it and
            # return θˢ, never the diverged point
            result = replace(result, theta=objective.theta_s, grad_norm=result.initial_grad_norm,
                             method="diverged")
        info = _solve_info(result)
        if not result.converged:
            info["lowest_curvature"] = objective.lowest_curvature()
        delta = (result.theta - objective.theta_s).to(ctx.model.dtype)
        return delta, {**info, "seconds": time.perf_counter() - start}

    def plan(self, responder: ResponderLike) -> tuple[Callable, int]:
        ctx = responder.context
        if self.bregman and ctx.removal_batch_size > 1:
            return (partial(compute_pbrf_batch, ctx, self, responder.chord_solver()),
                    ctx.removal_batch_size)
        return super().plan(responder)


    def stopped_short(self, ctx: ResponseContext, stopped: list, n: int) -> str:
        """The solves that stopped short of ``pbrf_tol``, the worst one named, and
        what may help: more iterations, more damping where the objective is not
        convex at ``θˢ`` (``lowest_curvature``), or, on a net with kinks, what
        the L-BFGS continuation met."""
        removal, info = max(stopped, key=lambda s: s[1]["grad_norm"]
                            / max(s[1]["initial_grad_norm"], 1e-300))
        found = [v for v in (i.get("lowest_curvature", 0.0) for _, i in stopped)
                 if np.isfinite(v)]
        lowest = min(found, default=float("nan"))
        kinked = kinks.kinked_layers(ctx.model.module)
        kink_note = (f" The net has piecewise-linear layers ({', '.join(kinked)}): its objective "
                 "has kinks where a unit's input crosses 0, and a minimiser on a kink has no "
                 "zero gradient; the L-BFGS continuation that takes such solves on stopped at "
                 "its iteration cap (sklinfluence.response.kinks.LBFGS_MAX_ITER = "
                 f"{kinks.LBFGS_MAX_ITER}) before the objective and the step "
                 "stopped changing (smooth activations such as Tanh, GELU or Softplus do not "
                 "have kinks)." if kinked else "")
        if lowest < 0:
            advice = (" The most negative eigenvalue of their Hessians at θˢ is at most "
                      f"{lowest:.3e}: the removal term outweighs curvature plus damping, so "
                      "these objectives are not convex there and may have no minimiser near "
                      f"θˢ; they need damping above {ctx.damping - lowest:.3e} at least to be "
                      "convex.")
        elif found:
            advice = " Increase max_iter." + kink_note
        else:
            advice = (" Whether their objectives are convex at θˢ could not be settled "
                      "cheaply (bounded Lanczos did not find the smallest Hessian eigenvalue, "
                      "or the net is too large to try)."
                      + (kink_note or " If a larger max_iter does not help, increase damping."))
        return (f"{len(stopped)} of {n} {self.name} solves stopped short of "
                f"tol={ctx.pbrf_tol:g}; the worst, for the removal of "
                f"{describe_removal(removal)}, after {int(info['n_iter'])} iterations with "
                f"gradient norm {info['grad_norm']:.3e} (initial "
                f"{info['initial_grad_norm']:.3e})." + advice)


def _solve_info(result: MinimizeResult) -> dict:
    """What a PBRF solve reports per removal (``responder_.last_info``): gradient norms,
    iterations, whether it converged, how it ended, what went wrong in words
    (``failure``: ``""`` for a sound end) and, for the L-BFGS continuation on
    kinks, the objective's relative decrease and the relative step over its last
    iterations (``nan`` otherwise)."""
    return {"grad_norm": result.grad_norm, "initial_grad_norm": result.initial_grad_norm,
            "n_iter": result.n_iter, "converged": result.converged, "method": result.method,
            "failure": result.failure or "",
            "objective_decrease": (float("nan") if result.objective_decrease is None
                                   else result.objective_decrease),
            "relative_step": (float("nan") if result.relative_step is None
                              else result.relative_step)}


def _stacked(removals: list[Removal], like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows, targets and weights of removals, ``(B, k, ...)``: weight 1 for each
    removed row; smaller removals are padded with copies of their first row at
    weight 0."""
    k = max(removal.size for removal in removals)
    xs, ts, ws = [], [], []
    for removal in removals:
        pad = k - removal.size
        w = like.new_ones(removal.size)
        if pad:
            rows = torch.cat([torch.arange(removal.size), torch.zeros(pad, dtype=torch.long)])
            xs.append(removal.X[rows])
            ts.append(removal.T[rows])
            ws.append(torch.cat([w, w.new_zeros(pad)]))
        else:
            xs.append(removal.X)
            ts.append(removal.T)
            ws.append(w)
    return torch.stack(xs), torch.stack(ts), torch.stack(ws)


def compute_pbrf_batch(ctx: ResponseContext, r: Minimize, solver: Any,
                       removals: list[Removal]) -> list:
    """PBRF responses of several removals at once (:func:`minimize_responses_batched`)."""
    start = time.perf_counter()
    theta_s = ctx.model.params
    objective = _objective(ctx, removals[0], r.damping(ctx), True)
    xs, ts, ws = _stacked(removals, objective.X)
    if xs.is_floating_point():
        xs = xs.to(objective.X.dtype)
    ts = ts.to(objective.T.dtype)
    results = minimize_responses_batched(objective, xs, ts, ws, solver.solve, tol=ctx.pbrf_tol,
                                         max_iter=ctx.pbrf_max_iter, precondition=solver.apply)
    own = [result.seconds if result.method == "lbfgs" else 0.0 for result in results]
    shared = (time.perf_counter() - start - sum(own)) / len(removals)  # the chord's share
    out = []
    for result, removal, seconds in zip(results, removals, own):
        info = {**_solve_info(result), "seconds": shared + seconds}
        if not result.converged:
            info["lowest_curvature"] = result.lowest_curvature \
                if result.lowest_curvature is not None \
                else _objective(ctx, removal, objective.damping, True).lowest_curvature()
        out.append(((result.theta - objective.theta_s).to(theta_s.dtype), info))
    return out


@dataclass(frozen=True)
class Linear(Rung):
    """Rungs 4–5: the minimiser of rung 3's quadratic model, ``ε (C + λI)⁻¹ Σ_S ∇L_m``.

    ``exact`` uses the exact damped Gauss–Newton solve (rung 4), otherwise
    the estimator's own curvature and solver (rung 5). Additive over the
    rows of a removal, and computed for all removals in one solve.
    """

    exact: bool = False
    closed_form = True

    def key_parts(self, ctx: ResponseContext) -> list:
        return [ctx.damping, self.exact, ctx.curvature, ctx.solver,
                sorted((ctx.solver_params or {}).items()), ctx.tol, ctx.max_iter]

    def responses(self, responder: ResponderLike, removals: list[Removal]) -> Tensor:
        """All removals' responses in one solve, ``(n, P)``."""
        ctx = responder.context
        with naming_right_hand_sides(removal_names(removals)):
            return ctx.epsilon * responder.solver(self.exact).solve(
                removal_forces(ctx.model, removals, ctx.batch_size)).to(ctx.model.dtype)


def removal_forces(model: FunctionalModel, removals: list[Removal],
                   batch_size: int | None = None, theta: Tensor | None = None) -> Tensor:
    """The driving force of each removal, ``Σ_{m∈S} ∇L_m(θ)``, ``(n, P)``.

    Per-sample gradients at ``theta`` (default ``θˢ``) of all removed rows, in
    chunks of ``batch_size``, summed per removal; one row per removal returns
    the gradients themselves.
    """
    theta = model.params if theta is None else theta
    rows_X, rows_T, owner = stacked_rows(removals, theta)
    grads = model.per_sample_grads(theta, rows_X, rows_T, batch_size)
    if single_rows(removals):
        return grads
    return grads.new_zeros((len(removals), grads.shape[1])).index_add_(0, owner, grads)


LADDER: tuple[Rung, ...] = (
    Retrain("cold_start_loo", start="initial"),
    Retrain("warm_start"),
    Retrain("proximal", proximal=True),
    Minimize("pbrf", bregman=True, proximal=True),
    Linear("exact_influence", bregman=True, proximal=True, exact=True),
    Linear("influence", bregman=True, proximal=True),
)

#: The five terms: differences between consecutive rungs of :data:`LADDER`.
TERMS: tuple[str, ...] = ("warm_start_gap", "proximity_gap", "non_convergence_gap",
                          "linearization_error", "solver_error")


def rung(name: str) -> Rung:
    """The rung of :data:`LADDER` called ``name``."""
    for r in LADDER:
        if r.name == name:
            return r
    raise ValueError(f"unknown rung {name!r}; rungs are {[r.name for r in LADDER]}")
