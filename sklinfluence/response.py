"""Computing responses: the :class:`Responder` of a fitted net, and its cache.

The rungs themselves (what each computes, and how) live in
:mod:`sklinfluence.rungs`; the unit of work is a
:class:`~sklinfluence.removal.Removal`. A :class:`Responder` holds what one
fitted net's responses depend on (:class:`ResponseContext`), owns its
curvature solvers (one per resolved solver, so ``"auto"`` and ``"exact"``
never build the same matrix twice), and computes any rung's responses to a
list of removals: closed-form rungs in one solve, the others through the
in-process :data:`RESPONSE_CACHE`, the optional disk store, batching and
joblib workers (:func:`~sklinfluence.execution.run_responses`).
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

from ._warnings import describe_removal, warn
from .cache import RESPONSE_CACHE, CacheOwner, ResponseCache
from .curvature import Curvature
from .execution import run_responses
from .functional import FunctionalModel
from .memory import dense_fits_memory
from . import pbrf
from .removal import Removal
from .rungs import LADDER, TERMS, Rung, rung
from .solvers import dense_fits, make_solver, resolve_solver

__all__ = ["Rung", "LADDER", "TERMS", "ResponseContext", "Responder", "ResponseCache",
           "CacheOwner", "RESPONSE_CACHE", "rung"]


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
        Removals whose PBRF is solved (or whose retraining is run) together
        (1: one at a time).
    cache_owner : CacheOwner or None
        The token of the estimator family that owns this net's cached
        responses (see :class:`~sklinfluence.cache.ResponseCache`); ``None``:
        the :class:`Responder` owns them itself.
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
    cache_owner: CacheOwner | None = field(default=None, repr=False, compare=False)


#: Relative residual of the matrix-free chord factor's CG solves (batched PBRF above
#: the dense size). Each chord step needs only to contract the gradient; the outer
#: iteration measures the true gradient and stops at the PBRF's own ``tol``.
CHORD_TOL = 1e-8


@dataclass
class Responder:
    """Computes parameter responses ``θ_after − θˢ`` of any rung to a list of removals.

    Non-closed-form rungs are computed removal by removal (or in batches, as
    the rung plans) and kept in :data:`~sklinfluence.cache.RESPONSE_CACHE` on
    behalf of ``context.cache_owner`` (or of the responder itself when it has
    none).

    ``last_info`` holds per-removal diagnostics of the latest call: wall time,
    and for the PBRF the final and initial gradient norms and the iterations.
    ``timings`` maps each rung name to the wall times of every response
    computed so far (one per removal; one per call for closed-form rungs).
    """

    context: ResponseContext
    last_info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    _solvers: dict = field(default_factory=dict, repr=False)
    _keys: dict = field(default_factory=dict, repr=False)
    _owner: CacheOwner | None = field(default=None, repr=False)

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
        the rung itself names (:meth:`~sklinfluence.rungs.Rung.key_parts`:
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

    def solver(self, exact: bool = False):
        """The linear solver of the exact rung or of the configured one.

        Solvers are kept by what they resolve to: with ``solver="auto"``
        resolving to ``"exact"`` (or ``"kernel"``) both rungs share one
        factorisation. The exact rung is the dense Gauss–Newton solve up to
        :data:`~sklinfluence.solvers.EXACT_MAX_PARAMS` parameters; above, the
        kernel form where ``"auto"`` picks it (the same inverse), else the
        dense matrix where it fits in memory
        (:func:`~sklinfluence.memory.dense_fits_memory`), else what ``"auto"``
        picks, block CG to ``tol``, the same answer to its residual.
        """
        ctx = self.context
        kind, name = ("ggn", "exact") if exact else (ctx.curvature, ctx.solver)
        params = None if exact else ctx.solver_params
        curvature = self._curvature(kind)
        if exact and not dense_fits(curvature.n_params):
            picked, implied = resolve_solver("auto", curvature, ctx.tol)
            if picked == "kernel" or not dense_fits_memory(curvature.n_params):
                name, params = picked, implied
        resolved, implied = resolve_solver(name, curvature, ctx.tol)
        key = (kind, resolved, repr(sorted({**implied, **(params or {})}.items())))
        if key not in self._solvers:
            self._solvers[key] = make_solver(name, curvature, tol=ctx.tol,
                                             max_iter=ctx.max_iter, solver_params=params,
                                             verbose=ctx.verbose)
        return self._solvers[key]

    def chord_solver(self):
        """``(G + μI + λI)⁻¹``, shared by the batched PBRF solves.

        The exact rung-4 solver where it is a factorisation: the dense
        Cholesky up to :data:`~sklinfluence.solvers.EXACT_MAX_PARAMS`
        parameters where it fits in memory
        (:func:`~sklinfluence.solvers.dense_fits`), or the kernel form
        (:class:`~sklinfluence.solvers.KernelSolver`); batched CG to 1e-8
        otherwise.
        """
        ctx = self.context
        if dense_fits(ctx.model.n_params) or resolve_solver(
                "auto", self._curvature("ggn"), ctx.tol)[0] == "kernel":
            return self.solver(exact=True)
        if "chord" not in self._solvers:
            self._solvers["chord"] = make_solver("cg", self._curvature("ggn"), tol=CHORD_TOL,
                                                 verbose=ctx.verbose)
        return self._solvers["chord"]

    def param_change(self, r: Rung, removals: list[Removal]) -> Tensor:
        """Responses ``θ_after − θˢ`` of rung ``r`` to each removal, ``(n, P)``."""
        ctx = self.context
        r.check(ctx, removals)
        if not removals:
            return ctx.model.params.new_zeros((0, ctx.model.n_params))
        if r.closed_form:
            start = time.perf_counter()
            delta = r.responses(self, removals)
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
        if stopped:
            _warn_not_converged(r, ctx, stopped, len(computed))
        rows = [known[key][0] for key in keys]
        infos = [known[key][1] for key in keys]
        keys_ = dict.fromkeys(k for info in infos for k in info)
        self.last_info = {"rung": r.name,
                          **{k: np.array([info.get(k, np.nan) for info in infos]) for k in keys_}}
        return torch.stack(rows)




def _warn_not_converged(r: Rung, ctx: ResponseContext, stopped: list, n: int) -> None:
    """One warning for the solves of a call that stopped short, the worst one named.

    ``stopped`` holds ``(removal, info)`` pairs.
    """
    removal, info = max(stopped, key=lambda s: s[1]["grad_norm"]
                        / max(s[1]["initial_grad_norm"], 1e-300))
    found = [v for v in (i.get("lowest_curvature", 0.0) for _, i in stopped) if np.isfinite(v)]
    lowest = min(found, default=float("nan"))
    kinked = pbrf.kinked_layers(ctx.model.module)
    kinks = (f" The net has piecewise-linear layers ({', '.join(kinked)}): its objective has "
             "kinks where a unit's input crosses 0, and a minimiser on a kink has no zero "
             "gradient; the L-BFGS continuation that takes such solves on stopped at its "
             f"iteration cap (sklinfluence.pbrf.LBFGS_MAX_ITER = {pbrf.LBFGS_MAX_ITER}) "
             "before the objective and the step "
             "stopped changing (smooth activations such as Tanh, GELU or Softplus do not "
             "have kinks)." if kinked else "")
    if lowest < 0:
        advice = (" The most negative eigenvalue of their Hessians at θˢ is at most "
                  f"{lowest:.3e}: the removal term outweighs curvature plus damping, so these "
                  "objectives are not convex there and may have no minimiser near θˢ; they "
                  f"need damping above {ctx.damping - lowest:.3e} at least to be convex.")
    elif found:
        advice = " Increase max_iter." + kinks
    else:
        advice = (" Whether their objectives are convex at θˢ could not be settled cheaply "
                  "(bounded Lanczos did not find the smallest Hessian eigenvalue, or the net "
                  "is too large to try)." + (kinks or " If a larger max_iter does not help, "
                                             "increase damping."))
    warn(
        f"{len(stopped)} of {n} {r.name} solves stopped short of tol={ctx.pbrf_tol:g}; the "
        f"worst, for the removal of {describe_removal(removal)}, after "
        f"{int(info['n_iter'])} iterations with gradient norm "
        f"{info['grad_norm']:.3e} (initial {info['initial_grad_norm']:.3e})." + advice,
        ConvergenceWarning)
