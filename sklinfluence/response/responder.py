"""Computing responses: the :class:`Responder` of a fitted net, and its cache.

The rungs themselves (what each computes, and how) live in
:mod:`sklinfluence.response.rungs`; the unit of work is a
:class:`~sklinfluence.model.removal.Removal`. A :class:`Responder` holds what one
fitted net's responses depend on (:class:`ResponseContext`), owns its
curvature solvers (as :func:`~sklinfluence.solvers.plan_solvers` decides, once;
one per resolved solver, so ``"auto"`` and ``"exact"`` never build the same
matrix twice), and computes any rung's responses to a
list of removals: closed-form rungs in one solve, the others through the
in-process :data:`RESPONSE_CACHE`, the optional disk store, batching and
joblib workers (:func:`~sklinfluence.utils.execution.run_responses`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from ..utils._warnings import describe_removal, list_in_words, warn
from .cache import RESPONSE_CACHE, CacheOwner, ResponseCache
from .context import ResponseContext
from ..curvature.operator import Curvature
from ..utils.execution import run_responses
from ..model.removal import Removal
from .rungs import LADDER, TERMS, Rung, rung
from ..solvers import SolverDecision, SolverPlan, make_solver, plan_solvers

__all__ = ["Rung", "LADDER", "TERMS", "ResponseContext", "Responder", "ResponseCache",
           "CacheOwner", "RESPONSE_CACHE", "rung"]


@dataclass
class Responder:
    """Computes parameter responses ``θ_after − θˢ`` of any rung to a list of removals.

    Non-closed-form rungs are computed removal by removal (or in batches, as
    the rung plans) and kept in :data:`~sklinfluence.response.cache.RESPONSE_CACHE` on
    behalf of ``context.cache_owner`` (or of the responder itself when it has
    none).

    ``last_info`` holds per-removal diagnostics of the latest call: wall time,
    and for the PBRF the final and initial gradient norms and the iterations;
    ``last_removals`` the removals they belong to.
    ``timings`` maps each rung name to the wall times of every response
    computed so far (one per removal; one per call for closed-form rungs).
    """

    context: ResponseContext
    last_info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    last_removals: list = field(default_factory=list)
    _solvers: dict = field(default_factory=dict, repr=False)
    _keys: dict = field(default_factory=dict, repr=False)
    _owner: CacheOwner | None = field(default=None, repr=False)
    _plan: SolverPlan | None = field(default=None, repr=False)

    def cache_owner(self) -> CacheOwner:
        """The token that owns this responder's entries in the response cache."""
        if self.context.cache_owner is not None:
            return self.context.cache_owner
        if self._owner is None:
            self._owner = CacheOwner()
        return self._owner

    def rung_key(self, r: Rung) -> str:
        """Digest of everything that determines rung ``r``'s responses.

        Trained parameters, training data, loss, architecture, ε, and what
        the rung itself names (:meth:`~sklinfluence.response.rungs.Rung.key_parts`:
        damping, recipe, seed and epochs, solver tolerances …). Two
        estimators with equal keys (e.g. clones in a grid search that differ
        in an unrelated parameter) share responses through
        :data:`RESPONSE_CACHE`.
        """
        if r.name not in self._keys:
            ctx = self.context
            digest = hashlib.sha256()
            tensors = [ctx.model.params, ctx.X, ctx.T, ctx.model.weight_decay,
                       *r.key_tensors(ctx)]
            for tensor in tensors:
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            parts: list = [type(r).__name__, r, ctx.epsilon, repr(ctx.model.module),
                           ctx.model.loss.describe(), *r.key_parts(ctx)]
            digest.update(repr(parts).encode())
            self._keys[r.name] = digest.hexdigest()
        return self._keys[r.name]

    def _curvature(self, kind: str) -> Curvature:
        ctx = self.context
        return Curvature(ctx.model, ctx.X, ctx.T, kind=kind, damping=ctx.damping,
                         batch_size=ctx.batch_size)

    def solver_plan(self) -> SolverPlan:
        """Which solver the configured rung, the exact rung and the batched PBRF use,
        and why (:func:`~sklinfluence.solvers.plan_solvers`), decided once: at the
        first call, with the memory available then."""
        if self._plan is None:
            ctx = self.context
            self._plan = plan_solvers(ctx.model, ctx.X, damping=ctx.damping,
                                      curvature=ctx.curvature, solver=ctx.solver,
                                      solver_params=ctx.solver_params, tol=ctx.tol,
                                      max_iter=ctx.max_iter, targets=ctx.T)
        return self._plan

    def _built(self, decision: SolverDecision, key: Any = None):
        """The solver ``decision`` names, built once per key (default: what it
        resolves to, so that roles deciding alike share one factorisation)."""
        if key is None:
            key = (decision.curvature, decision.solver, repr(sorted(decision.params.items())))
        if key not in self._solvers:
            self._solvers[key] = make_solver(
                decision.solver, self._curvature(decision.curvature), tol=decision.tol,
                max_iter=decision.max_iter, solver_params=decision.params,
                verbose=self.context.verbose)
        return self._solvers[key]

    def solver(self, exact: bool = False):
        """The linear solver of the exact rung or of the configured one.

        As :meth:`solver_plan` decides (the ``exact_influence`` or the
        ``influence`` role). Solvers are kept by what they resolve to: with
        ``solver="auto"`` resolving to ``"exact"`` (or ``"kernel"``) both rungs
        share one factorisation.
        """
        plan = self.solver_plan()
        return self._built(plan.exact_influence if exact else plan.influence)

    def chord_solver(self):
        """``(G + μI + λI)⁻¹``, shared by the batched PBRF solves.

        As :meth:`solver_plan` decides (the ``pbrf_chord`` role): the exact
        rung's solver where it is a factorisation (the dense Cholesky or the
        kernel form), batched CG to :data:`~sklinfluence.solvers.CHORD_TOL`
        otherwise.
        """
        plan = self.solver_plan()
        if plan.chord_is_exact:
            return self.solver(exact=True)
        return self._built(plan.pbrf_chord, key="chord")

    def param_change(self, r: Rung, removals: list[Removal]) -> Tensor:
        """Responses ``θ_after − θˢ`` of rung ``r`` to each removal, ``(n, P)``."""
        ctx = self.context
        r.check(ctx, removals)
        if not removals:
            return ctx.model.params.new_zeros((0, ctx.model.n_params))
        if r.closed_form:
            start = time.perf_counter()
            delta = r.responses(self, removals)
            self.last_removals = list(removals)
            self.last_info = {"rung": r.name, "seconds": time.perf_counter() - start}
            self.timings.setdefault(r.name, []).append(self.last_info["seconds"])
            return delta
        rung_key = self.rung_key(r)
        owner = self.cache_owner()
        keys = [removal.key for removal in removals]
        known: dict = {}
        missing: dict = {}
        for removal, key in zip(removals, keys):
            found = RESPONSE_CACHE.get((rung_key, key), owner)
            if found is not None:
                known[key] = found
            elif key not in missing:
                missing[key] = removal
        compute, batch = r.plan(self) if missing else (None, 1)
        computed = run_responses(
            compute, missing.items(), rung_key=rung_key, n_jobs=ctx.n_jobs, store=ctx.store,
            verbose=ctx.verbose, desc=r.name, batch=batch, like=ctx.model.params)
        stopped = []
        for key, (delta, info, fresh) in computed.items():
            RESPONSE_CACHE.put((rung_key, key), (delta, info), owner=owner)
            known[key] = (delta, info)
            if fresh:
                self.timings.setdefault(r.name, []).append(info["seconds"])
                if not info.get("converged", True):
                    stopped.append((missing[key], info))
        diverged = [s for s in stopped if s[1].get("method") == "diverged"]
        short = [s for s in stopped if s[1].get("method") != "diverged"]
        if short:
            warn(r.stopped_short(ctx, short, len(computed)) + " Not converged: "
                 + _named_residuals(short) + ".", ConvergenceWarning)
        if diverged:
            warn(_diverged_warning(r, ctx, diverged, len(computed)), ConvergenceWarning)
        rows = [known[key][0] for key in keys]
        infos = [known[key][1] for key in keys]
        keys_ = dict.fromkeys(k for info in infos for k in info)
        self.last_removals = list(removals)
        self.last_info = {"rung": r.name,
                          **{k: np.array([info.get(k, np.nan) for info in infos]) for k in keys_}}
        return torch.stack(rows)


def _named_residuals(stopped: list) -> str:
    """Every removal of ``stopped`` (``(removal, info)`` pairs), in order, with its final
    gradient norm relative to its initial one where the rung measures them."""
    def one(removal: Removal, info: dict) -> str:
        name = describe_removal(removal)
        if "grad_norm" not in info or "initial_grad_norm" not in info:
            return name
        relative = info["grad_norm"] / max(info["initial_grad_norm"], 1e-300)
        return f"{name} (relative gradient norm {relative:.3e})"

    return list_in_words([one(removal, info) for removal, info in stopped])


def _diverged_warning(r: Rung, ctx: ResponseContext, diverged: list, n: int) -> str:
    """The warning for removals whose solve diverged and whose retry from θˢ did too
    (``info["method"] == "diverged"``, :func:`~sklinfluence.response.pbrf.flag_diverged`)."""
    return (f"{len(diverged)} of {n} {r.name} solves diverged (their gradient norm grew "
            "above its value at θˢ, or their objective rose above it) and so did their "
            "one-at-a-time retries from θˢ: " + _named_residuals(diverged) + ". Their "
            "responses are the best points reached that had not diverged (relative gradient "
            "norms as given), not minimisers. The objective is unbounded below far from θˢ "
            "where a removed row's loss can grow without end, and no minimiser was found "
            f"near θˢ at damping={ctx.damping:g}: a larger damping keeps the solves there."
            + (f" The first: {diverged[0][1]['failure']}." if diverged[0][1].get("failure")
               else ""))
