"""What one fitted net's responses depend on: :class:`ResponseContext`.

Its own module so that both the rungs (:mod:`sklinfluence.response.rungs`), which
compute from it, and the :class:`~sklinfluence.response.responder.Responder`, which
holds it, import it from below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .cache import CacheOwner
from ..model.functional import FunctionalModel

__all__ = ["ResponseContext"]


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
        The model adapter (:mod:`sklinfluence.model.adapters`) whose ``retrain``
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
        responses (see :class:`~sklinfluence.response.cache.ResponseCache`); ``None``:
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
