"""The response ladder of Bae et al. (2022), SPEC §2, as one objective with switches.

Every rung answers "what are the parameters after removing ``z_m``?" by
minimising

    ``(1/N) Σ_i ℓ_i(θ) + decay − ε L_m(θ) + [proximal] (λ/2)‖θ − θˢ‖²``

from a start point, where ``ℓ_i`` is the training loss or its Bregman
divergence around ``θˢ``. A :class:`Rung` is a row of switches:

=================  =========  =======  ========  ========  =====
rung               start      Bregman  proximal  method    exact
=================  =========  =======  ========  ========  =====
cold_start_loo     θ⁰         no       no        retrain
warm_start         θˢ         no       no        retrain
proximal           θˢ         no       yes       retrain
pbrf               θˢ         yes      yes       minimize
exact_influence    θˢ         yes      yes       linear    yes
influence          θˢ         yes      yes       linear    no
=================  =========  =======  ========  ========  =====

``retrain`` runs the net's own recipe on the N−1 remaining rows
(:mod:`sklinfluence.retrain`), ``minimize`` solves the objective full batch
to a tight tolerance (:mod:`sklinfluence.pbrf`), ``linear`` minimises its
second-order model in closed form, ``ε (C + λI)⁻¹ ∇L_m(θˢ)``: with the exact
Gauss–Newton solve (rung 4) or with the estimator's own curvature and solver
(rung 5). Adding a rung is adding a row to :data:`LADDER`.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from .curvature import Curvature
from .execution import run_responses, sample_key
from .functional import FunctionalModel
from .pbrf import ResponseObjective, minimize_response, minimize_responses_batched
from .solvers import dense_fits, make_solver

__all__ = ["Rung", "LADDER", "TERMS", "ResponseContext", "Responder", "ResponseCache",
           "RESPONSE_CACHE", "rung"]


@dataclass(frozen=True)
class Rung:
    """One configuration of the response objective (a row of SPEC §2's table)."""

    name: str
    start: str = "trained"  # "initial" (θ⁰) or "trained" (θˢ)
    bregman: bool = False
    proximal: bool = False
    method: str = "retrain"  # "retrain", "minimize" or "linear"
    exact: bool = False  # linear only: exact GGN solve instead of the configured solver


LADDER: tuple[Rung, ...] = (
    Rung("cold_start_loo", start="initial"),
    Rung("warm_start"),
    Rung("proximal", proximal=True),
    Rung("pbrf", bregman=True, proximal=True, method="minimize"),
    Rung("exact_influence", bregman=True, proximal=True, method="linear", exact=True),
    Rung("influence", bregman=True, proximal=True, method="linear"),
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


@dataclass
class ResponseContext:
    """Everything that determines the responses of one fitted net.

    Attributes
    ----------
    model : FunctionalModel
        The trained net at ``θˢ``.
    X, T : Tensor
        Training inputs and targets (the objective's data).
    epsilon, damping : float
        ``ε`` and ``λ``.
    curvature, solver, solver_params, tol, max_iter, batch_size
        Curvature and solver of the ``influence`` rung (see
        :func:`~sklinfluence.solvers.make_solver`).
    pbrf_tol, pbrf_max_iter
        Relative gradient tolerance and iteration cap of ``minimize`` rungs.
    recipe : adapter or None
        The model adapter (:mod:`sklinfluence.adapters`) whose ``retrain``
        runs the ``retrain`` rungs.
    theta_0 : Tensor or None
        Initial parameters ``θ⁰`` of the original fit (cold start).
    seed : int or None
        torch seed of the original fit.
    max_epochs : int
        Epochs of a cold-start retraining (the original recipe's).
    warm_start_epochs : int
        Epochs of a retraining started at ``θˢ``.
    n_jobs : int or None
        joblib workers for per-sample responses.
    store : DiskStore or None
        Where finished per-sample responses are persisted (resumable runs).
    verbose : int
        > 0 shows a progress bar over removed samples.
    removal_batch_size : int
        Removed samples whose PBRF is solved together (1: one at a time).
    """

    model: FunctionalModel
    X: Tensor
    T: Tensor
    epsilon: float
    damping: float
    curvature: str = "ggn"
    solver: str = "auto"
    solver_params: dict | None = None
    tol: float = 1e-10
    max_iter: int | None = None
    batch_size: int | None = None
    pbrf_tol: float = 1e-9
    pbrf_max_iter: int = 50
    recipe: Any = None
    theta_0: Tensor | None = None
    seed: int | None = None
    max_epochs: int = 0
    warm_start_epochs: int = 0
    n_jobs: int | None = None
    store: Any = None
    verbose: int = 0
    removal_batch_size: int = 1


class ResponseCache:
    """In-process LRU of computed responses, bounded by the bytes it holds.

    Keys are :meth:`Responder.rung_key` digests plus the removed sample, so
    a response is reused only where it would be recomputed identically —
    across calls, estimators and grid-search candidates in one process.
    ``clear()`` empties it; ``max_bytes=0`` disables it.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple) -> tuple | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple, value: tuple) -> None:
        size = value[0].numel() * value[0].element_size()
        if size > self.max_bytes:
            return
        self._items[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (old, _) = self._items.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def resize(self, max_bytes: int) -> None:
        """Set the bound, evicting the least recently used entries to meet it."""
        self.max_bytes = max_bytes
        while self._bytes > self.max_bytes:
            _, (old, _) = self._items.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


#: The process-wide response cache (see :class:`ResponseCache`).
RESPONSE_CACHE = ResponseCache()


@dataclass
class Responder:
    """Computes parameter responses ``θ_after − θˢ`` for any rung.

    Non-linear rungs are computed one removed sample at a time and kept in
    :data:`RESPONSE_CACHE`.

    ``last_info`` holds per-sample diagnostics of the latest call: wall time,
    and for ``minimize`` rungs the final and initial gradient norms and the
    iterations. ``timings`` maps each rung name to the wall times of every
    response computed so far (one per removed sample; one per call for the
    batched ``linear`` rungs).
    """

    context: ResponseContext
    last_info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    _solvers: dict = field(default_factory=dict, repr=False)
    _keys: dict = field(default_factory=dict, repr=False)

    def rung_key(self, r: Rung) -> str:
        """Digest of everything that determines rung ``r``'s responses.

        Trained and initial parameters, training data, loss, architecture, ε,
        and per rung what it uses (damping, recipe, seed and epochs, solver
        tolerances). Two estimators with equal keys (e.g. clones in a grid
        search that differ in an unrelated parameter) share responses
        through :data:`RESPONSE_CACHE`.
        """
        if r.name not in self._keys:
            ctx = self.context
            digest = hashlib.sha256()
            tensors = [ctx.model.params, ctx.X, ctx.T, ctx.model.weight_decay]
            if r.method == "retrain" and r.start == "initial" and ctx.theta_0 is not None:
                tensors.append(ctx.theta_0)
            for tensor in tensors:
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            parts: list = [r, ctx.epsilon, repr(ctx.model.module), ctx.model.loss.describe()]
            if r.proximal or r.method == "linear":
                parts.append(ctx.damping)
            if r.method == "minimize" or (r.proximal and ctx.recipe.exact_proximal):
                parts += [ctx.pbrf_tol, ctx.pbrf_max_iter]
            if r.method == "retrain":
                epochs = ctx.max_epochs if r.start == "initial" else ctx.warm_start_epochs
                parts += [ctx.seed, epochs, ctx.recipe.recipe_key()]
            if r.method == "linear":
                parts += [r.exact, ctx.curvature, ctx.solver,
                          sorted((ctx.solver_params or {}).items()), ctx.tol, ctx.max_iter]
            digest.update(repr(parts).encode())
            self._keys[r.name] = digest.hexdigest()
        return self._keys[r.name]

    def solver(self, exact: bool = False):
        """The (cached) linear solver of the exact rung or of the configured one."""
        ctx = self.context
        key = ("ggn", "exact") if exact else (ctx.curvature, ctx.solver)
        if key not in self._solvers:
            curvature = Curvature(ctx.model, ctx.X, ctx.T, kind=key[0], damping=ctx.damping,
                                  batch_size=ctx.batch_size)
            self._solvers[key] = make_solver(
                key[1], curvature, tol=ctx.tol, max_iter=ctx.max_iter,
                solver_params=None if exact else ctx.solver_params)
        return self._solvers[key]

    def chord_solver(self):
        """``(G + μI + λI)⁻¹``, shared by the batched PBRF solves.

        The exact rung-4 solver (dense Cholesky) up to
        :data:`~sklinfluence.solvers.EXACT_MAX_PARAMS` parameters
        (:func:`~sklinfluence.solvers.dense_fits`), batched CG to 1e-8 above.
        """
        ctx = self.context
        if dense_fits(ctx.model.n_params):
            return self.solver(exact=True)
        if "chord" not in self._solvers:
            curvature = Curvature(ctx.model, ctx.X, ctx.T, kind="ggn", damping=ctx.damping,
                                  batch_size=ctx.batch_size)
            self._solvers["chord"] = make_solver("cg", curvature, tol=1e-8)
        return self._solvers["chord"]

    def param_change(self, r: Rung, X: Tensor, T: Tensor, index: np.ndarray) -> Tensor:
        """Responses ``θ_after − θˢ`` of rung ``r`` to removing each row, ``(n, P)``.

        ``index`` gives each row's position among the training rows (−1 when
        it is not one; ``retrain`` rungs need training rows).
        """
        ctx = self.context
        if r.method == "linear":
            start = time.perf_counter()
            grads = ctx.model.per_sample_grads(ctx.model.params, X, T, ctx.batch_size)
            delta = ctx.epsilon * self.solver(r.exact).solve(grads).to(ctx.model.dtype)
            self.last_info = {"rung": r.name, "seconds": time.perf_counter() - start}
            self.timings.setdefault(r.name, []).append(self.last_info["seconds"])
            return delta
        if r.method == "retrain" and np.any(index < 0):
            raise ValueError(
                f"the {r.name} rung retrains without the sample, so it can only remove "
                f"training rows; {int(np.sum(index < 0))} of the given rows are not "
                "training rows (with these targets)."
            )
        rung_key = self.rung_key(r)
        keys = [sample_key(X[i], T[i]) for i in range(X.shape[0])]
        known: dict = {}
        missing: dict = {}
        for i, key in enumerate(keys):
            found = RESPONSE_CACHE.get((rung_key, key))
            if found is not None:
                known[key] = found
            elif key not in missing:
                missing[key] = (r, X[i], T[i], int(index[i]))
        if not missing:
            compute, batch = None, 1
        elif r.method == "minimize" and r.bregman and ctx.removal_batch_size > 1:
            compute = partial(compute_pbrf_batch, ctx, self.chord_solver())
            batch = ctx.removal_batch_size
        elif (r.method == "retrain" and ctx.removal_batch_size > 1
              and not (r.proximal and ctx.recipe.exact_proximal)
              and ctx.recipe.can_retrain_batch(ctx.model)):
            compute, batch = partial(compute_retrain_batch, ctx), ctx.removal_batch_size
        else:
            compute, batch = partial(compute_each, ctx), 1
        computed = run_responses(
            compute, missing.items(), rung_key=rung_key, n_jobs=ctx.n_jobs, store=ctx.store,
            verbose=ctx.verbose, desc=r.name, batch=batch, like=ctx.model.params)
        stopped = []
        for key, (delta, info, fresh) in computed.items():
            RESPONSE_CACHE.put((rung_key, key), (delta, info))
            known[key] = (delta, info)
            if fresh:
                self.timings.setdefault(r.name, []).append(info["seconds"])
                if not info.get("converged", True):
                    stopped.append((int(missing[key][3]), info))
        if stopped:
            _warn_not_converged(r, ctx, stopped, len(computed))
        rows = [known[key][0] for key in keys]
        infos = [known[key][1] for key in keys]
        keys_ = dict.fromkeys(k for info in infos for k in info)
        self.last_info = {"rung": r.name,
                          **{k: np.array([info.get(k, np.nan) for info in infos]) for k in keys_}}
        if not rows:
            return ctx.model.params.new_zeros((0, ctx.model.n_params))
        return torch.stack(rows)


def _warn_not_converged(r: Rung, ctx: ResponseContext, stopped: list, n: int) -> None:
    """One warning for the solves of a call that stopped short, the worst one named."""
    m, info = max(stopped, key=lambda s: s[1]["grad_norm"] / max(s[1]["initial_grad_norm"],
                                                                   1e-300))
    lowest = min(i.get("lowest_curvature", 0.0) for _, i in stopped)
    advice = (f" The most negative eigenvalue of their Hessians at θˢ is {lowest:.3e}: the "
              "removal term outweighs curvature plus damping, so these objectives are not "
              "convex there and may have no minimiser near θˢ; damping above "
              f"{ctx.damping - lowest:.3e} makes them convex." if lowest < 0
              else " Increase max_iter.")
    where = f"training row {m}" if m >= 0 else "a sample"
    warnings.warn(
        f"{len(stopped)} of {n} {r.name} solves stopped short of tol={ctx.pbrf_tol:g}; the "
        f"worst, for {where}, after {int(info['n_iter'])} iterations with gradient norm "
        f"{info['grad_norm']:.3e} (initial {info['initial_grad_norm']:.3e})." + advice,
        ConvergenceWarning, stacklevel=4)


def compute_each(ctx: ResponseContext, items: list) -> list:
    """:func:`compute_response` for each ``(rung, x, t, m)`` in ``items``."""
    return [compute_response(ctx, *args) for args in items]


def compute_retrain_batch(ctx: ResponseContext, items: list) -> list:
    """Retraining responses of several rows at once (a vectorised ensemble)."""
    start_time = time.perf_counter()
    r = items[0][0]
    theta_s = ctx.model.params
    n = int(ctx.X.shape[0])
    stack = ctx.recipe.retrain_batch(
        ctx.model, ctx.X, ctx.T, [int(args[3]) for args in items],
        start=_retrain_start(ctx, r), seed=ctx.seed,
        max_epochs=ctx.max_epochs if r.start == "initial" else ctx.warm_start_epochs,
        anchor=theta_s, proximity=ctx.damping * n / (n - 1) if r.proximal else 0.0)
    seconds = (time.perf_counter() - start_time) / len(items)
    return [(theta.to(theta_s.dtype) - theta_s, {"seconds": seconds}) for theta in stack]


def _retrain_start(ctx: ResponseContext, r: Rung) -> Tensor:
    """``θ⁰`` for a cold start (refused when the net did not record it), else ``θˢ``."""
    if r.start == "initial":
        if ctx.theta_0 is None and ctx.recipe.needs_initial_params:
            raise ValueError(
                "cold-start leave-one-out retrains from the original initialisation θ⁰, "
                "which a FrozenEstimator net does not record. Pass the unfitted net so the "
                "estimator trains it, or use warm_start=True."
            )
        if ctx.theta_0 is not None:
            return ctx.theta_0
    return ctx.model.params


def compute_pbrf_batch(ctx: ResponseContext, solver: Any, items: list) -> list:
    """PBRF responses of several samples at once (:func:`minimize_responses_batched`)."""
    start = time.perf_counter()
    r = items[0][0]
    xs = torch.stack([args[1] for args in items])
    ts = torch.stack([args[2] for args in items])
    theta_s = ctx.model.params
    objective = ResponseObjective(ctx.model, ctx.X, ctx.T, theta_s, xs[0], ts[0], ctx.epsilon,
                                  ctx.damping if r.proximal else 0.0, True)
    results = minimize_responses_batched(objective, xs, ts, solver.solve, tol=ctx.pbrf_tol,
                                         max_iter=ctx.pbrf_max_iter)
    seconds = (time.perf_counter() - start) / len(items)
    out = []
    for result, (_, x, t, _) in zip(results, items):
        info = {"grad_norm": result.grad_norm, "initial_grad_norm": result.initial_grad_norm,
                "n_iter": result.n_iter, "converged": result.converged, "seconds": seconds}
        if not result.converged:
            info["lowest_curvature"] = result.lowest_curvature if result.lowest_curvature \
                is not None else ResponseObjective(ctx.model, ctx.X, ctx.T, theta_s, x, t,
                                                   ctx.epsilon, objective.damping,
                                                   True).lowest_curvature()
        out.append((result.theta - theta_s, info))
    return out


def compute_response(ctx: ResponseContext, r: Rung, x: Tensor, t: Tensor,
                     m: int) -> tuple[Tensor, dict]:
    """One removed sample's response ``θ_after − θˢ`` for a non-linear rung, and its info.

    A module-level function of the context, so that joblib can ship it to
    workers.
    """
    theta_s = ctx.model.params
    start = time.perf_counter()
    if r.method == "minimize":
        objective = ResponseObjective(ctx.model, ctx.X, ctx.T, theta_s, x, t, ctx.epsilon,
                                      ctx.damping if r.proximal else 0.0, r.bregman)
        result = minimize_response(objective, tol=ctx.pbrf_tol, max_iter=ctx.pbrf_max_iter)
        info = {"grad_norm": result.grad_norm, "initial_grad_norm": result.initial_grad_norm,
                "n_iter": result.n_iter, "converged": result.converged}
        if not result.converged:
            info["lowest_curvature"] = objective.lowest_curvature()
        return result.theta - theta_s, {**info, "seconds": time.perf_counter() - start}
    if r.proximal and ctx.recipe.exact_proximal:  # convex baselines: minimise exactly
        objective = ResponseObjective(ctx.model, ctx.X, ctx.T, theta_s, x, t, ctx.epsilon,
                                      ctx.damping, bregman=False)
        result = minimize_response(objective, tol=ctx.pbrf_tol, max_iter=ctx.pbrf_max_iter)
        return result.theta - theta_s, {"seconds": time.perf_counter() - start}
    # retrain with the recipe on the N - 1 remaining rows
    keep = torch.arange(ctx.X.shape[0], device=ctx.X.device) != m
    n = int(ctx.X.shape[0])
    theta = ctx.recipe.retrain(
        ctx.X[keep], ctx.T[keep], start=_retrain_start(ctx, r), seed=ctx.seed,
        max_epochs=ctx.max_epochs if r.start == "initial" else ctx.warm_start_epochs,
        anchor=theta_s,
        proximity=ctx.damping * n / (n - 1) if r.proximal else 0.0,
    )
    return theta.to(theta_s.dtype) - theta_s, {"seconds": time.perf_counter() - start}
